"""vit-kernels: fused Triton and CUDA C++ kernels for Vision Transformers.

The public API (README.md describes it): `attention`,
`fused_qkv`, `gelu_mlp`, the whole-block ops `ln_fused_qkv`, `proj_residual`, `ln_gelu_mlp`, `available_backends`,
`build_info`, and `explain_backend` (which backend a call runs on, and why). Each op lives in one module of
vit_kernels/ops/ (its function, input checks, backend choice and custom ops), on dispatch.py's backend choice and
kernel_op.py's custom-op wiring; under `torch.autocast` its floating inputs are first cast to the autocast dtype,
as `F.linear` and SDPA do.
"""

from __future__ import annotations

import torch

from vit_kernels import dispatch
from vit_kernels.dispatch import available_backends
from vit_kernels.ops import attention as _attention_op
from vit_kernels.ops import fused_qkv as _fused_qkv_op
from vit_kernels.ops import gelu_mlp as _gelu_mlp_op
from vit_kernels.ops import ln_fused_qkv as _ln_fused_qkv_op
from vit_kernels.ops import ln_gelu_mlp as _ln_gelu_mlp_op
from vit_kernels.ops import proj_residual as _proj_residual_op

attention = _attention_op.attention
fused_qkv = _fused_qkv_op.fused_qkv
gelu_mlp = _gelu_mlp_op.gelu_mlp
ln_fused_qkv = _ln_fused_qkv_op.ln_fused_qkv
proj_residual = _proj_residual_op.proj_residual
ln_gelu_mlp = _ln_gelu_mlp_op.ln_gelu_mlp

__all__ = [
    "attention", "fused_qkv", "gelu_mlp", "ln_fused_qkv", "proj_residual", "ln_gelu_mlp", "available_backends",
    "build_info", "explain_backend",
]  # fmt: skip
__version__ = "0.1.0"

# What each op does before its kernels (autocast, validation, backend choice), shared with explain_backend.
_PLANS = {
    "attention": _attention_op.plan,
    "fused_qkv": _fused_qkv_op.plan,
    "gelu_mlp": _gelu_mlp_op.plan,
    "ln_fused_qkv": _ln_fused_qkv_op.plan,
    "proj_residual": _proj_residual_op.plan,
    "ln_gelu_mlp": _ln_gelu_mlp_op.plan,
}


def explain_backend(op: str, *args, **kwargs) -> dispatch.Choice:
    """Which backend `vk.<op>(*args, **kwargs)` would run on, and why, without running it.

    op: "attention", "fused_qkv", "gelu_mlp", or a whole-block op ("ln_fused_qkv", "proj_residual",
    "ln_gelu_mlp"); the other arguments are exactly the op's. Returns a
    `(backend, reason)` named tuple, e.g. on an H100 with bf16 ViT-B inputs and no measurement yet:
    ('torch', 'no committed GPU measurement for sm_90 attention bf16 D=64 N<=256 B*H<=4096: torch').
    Raises what the op would raise for bad inputs.
    """
    if op not in _PLANS:
        raise ValueError(f"op must be one of {tuple(_PLANS)}, got {op!r}")
    return _PLANS[op](*args, **kwargs)[0]


def build_info() -> dict:
    """What was built (the CUDA extension's compile info) and what can run here."""
    _C, reason = dispatch.cuda_extension()
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_extension": _C.build_info() if _C is not None else None,
        "cuda_extension_missing_reason": reason,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "available_backends": available_backends(),
        # how many (arch, op, dtype, size) cells of `auto`'s measured table name a backend (0: auto is torch on CUDA)
        "measured_table_entries": dispatch.measured_table_size(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
