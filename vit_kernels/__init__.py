"""vit-kernels: fused Triton and CUDA C++ kernels for Vision Transformers.

The public API (see shared DESIGN.md): `attention`, `fused_qkv`, `gelu_mlp`, `available_backends`,
`build_info`, and `explain_backend` (which backend a call runs on, and why). Every op validates its
inputs and picks its backend in `dispatch.py`; under `torch.autocast` its floating inputs are first cast
to the autocast dtype, as `F.linear` and SDPA do.
"""

from __future__ import annotations

import torch

from vit_kernels import dispatch, library, reference, torch_backend
from vit_kernels.dispatch import available_backends

__all__ = ["attention", "fused_qkv", "gelu_mlp", "available_backends", "build_info", "explain_backend"]
__version__ = "0.1.0"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"):
    """softmax(q @ k^T * scale) @ v, flash style (no N x N matrix) on the kernel backends.

    q, k, v: (B, H, N, D), any strides (views of a packed (B, N, 3, H, D) tensor work without copies).
    scale: defaults to D ** -0.5. Returns (B, H, N, D); on the kernel backends its memory is laid out
    (B, N, H, D), so `out.transpose(1, 2).reshape(B, N, H * D)` is free.
    fp32 inputs use tf32 on the kernel backends unless `torch.get_float32_matmul_precision() == "highest"`.
    """
    (backend, _why), (q, k, v), scale = _plan_attention(q, k, v, scale=scale, backend=backend)
    if backend == "reference":
        return reference.attention(q, k, v, scale)
    if backend == "torch":
        return torch_backend.attention(q, k, v, scale)
    out, _lse = library.run_attention(q, k, v, scale, dispatch.allow_tf32(), backend)
    return out


def fused_qkv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, *, backend: str = "auto"
):
    """x (B, N, C) @ weight (3C, C)^T + bias (3C,) -> q, k, v each (B, H, N, C // H), split in the GEMM epilogue."""
    (backend, _why), (x, weight, bias) = _plan_fused_qkv(x, weight, bias, num_heads, backend=backend)
    if backend == "reference":
        return reference.fused_qkv(x, weight, bias, num_heads)
    if backend == "torch":
        return torch_backend.fused_qkv(x, weight, bias, num_heads)
    return library.run_qkv(x, weight, bias, num_heads, dispatch.allow_tf32(), backend)


def gelu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    backend: str = "auto",
):
    """Linear -> GELU -> Linear: x (..., C), fc1 (hidden, C), fc2 (C_out, hidden) -> (..., C_out).

    `approximate="none"` is exact erf GELU (timm and Hugging Face), `"tanh"` the tanh form.
    """
    (backend, _why), (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) = _plan_gelu_mlp(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate, backend=backend
    )
    if backend == "reference":
        return reference.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    if backend == "torch":
        return torch_backend.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    y, _hidden = library.run_mlp(
        x.reshape(-1, x.shape[-1]),
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        approximate,
        dispatch.allow_tf32(),
        backend,
    )
    return y.reshape(*x.shape[:-1], fc2_weight.shape[0])


def explain_backend(op: str, *args, **kwargs) -> dispatch.Choice:
    """Which backend `vk.<op>(*args, **kwargs)` would run on, and why, without running it.

    op: "attention", "fused_qkv", "gelu_mlp", or a whole-block op ("ln_fused_qkv", "proj_residual",
    "ln_gelu_mlp"); the other arguments are exactly the op's. Returns a
    `(backend, reason)` named tuple, e.g. on an H100 with bf16 ViT-B inputs and no measurement yet:
    ('torch', 'no committed GPU measurement for sm_90 attention bf16 D=64 N<=256: torch').
    Raises what the op would raise for bad inputs.
    """
    if op not in _PLANS:
        raise ValueError(f"op must be one of {tuple(_PLANS)}, got {op!r}")
    return _PLANS[op](*args, **kwargs)[0]


# ----------------------------------------------------------------------------------------------------
# what every op does before its kernel: autocast, validation, backend choice (shared with explain_backend)
# ----------------------------------------------------------------------------------------------------
def _plan_attention(q, k, v, *, scale=None, backend="auto"):
    q, k, v = dispatch.autocast_inputs(q, k, v)
    choice, scale = dispatch.check_attention(q, k, v, scale, backend)
    return choice, (q, k, v), scale


def _plan_fused_qkv(x, weight, bias, num_heads, *, backend="auto"):
    x, weight, bias = dispatch.autocast_inputs(x, weight, bias)
    return dispatch.check_fused_qkv(x, weight, bias, num_heads, backend), (x, weight, bias)


def _plan_gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", backend="auto"):
    tensors = dispatch.autocast_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return dispatch.check_gelu_mlp(*tensors, approximate, backend), tensors


_PLANS = {"attention": _plan_attention, "fused_qkv": _plan_fused_qkv, "gelu_mlp": _plan_gelu_mlp}


def build_info() -> dict:
    """What was built (the CUDA extension's compile info) and what can run here."""
    _C, reason = dispatch._cuda_extension()
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_extension": _C.build_info() if _C is not None else None,
        "cuda_extension_missing_reason": reason,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "available_backends": available_backends(),
        # how many (arch, op, dtype, size) cells of `auto`'s measured table name a backend (0: auto is torch on CUDA)
        "measured_table_entries": len(dispatch._TABLE),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# Whole-block fusion (LayerNorm in the qkv / fc1 GEMMs, residual adds in proj / fc2): see vit_kernels/block.py.
from vit_kernels import block as _block  # noqa: E402
from vit_kernels.block import ln_fused_qkv, ln_gelu_mlp, proj_residual  # noqa: E402

__all__ += ["ln_fused_qkv", "proj_residual", "ln_gelu_mlp"]
_PLANS.update(
    ln_fused_qkv=_block.plan_ln_fused_qkv,
    proj_residual=_block.plan_proj_residual,
    ln_gelu_mlp=_block.plan_ln_gelu_mlp,
)
