"""CUDA C++ backend of attention: tensors -> `vit_kernels._C` flash-attention launchers (csrc/attention_*.cu).

Implements the attention part of the kernel-module contract of `vit_kernels/ops/attention.py` (attention_fwd,
attention_bwd). fp16/bf16 run on tensor cores (mma.sync, fp32 accumulation and fp32 softmax); fp32 runs
SIMT kernels in full fp32, so `allow_tf32` is accepted for the contract and ignored.

Layout rules (the only copies made here): the kernels index the head dim with unit stride, so a tensor
whose last stride is not 1 (e.g. a transposed view) is copied to a contiguous tensor. fp16/bf16 tiles are
also loaded in 16-byte cp.async chunks, which needs a 16-byte aligned pointer and (B, H, N) strides that
are multiples of 8 elements; a view that breaks that (an odd offset into a larger tensor) is copied too.
Views of a packed (B, N, 3, H, D) qkv tensor satisfy both and are read in place.
"""

from __future__ import annotations

import torch

from vit_kernels import cuda as vit_cuda
from vit_kernels.cuda import DTYPE_CODES, check_cuda_tensors, dtype_code, extension, ptr, stream_of

SUPPORTED_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
# attention_bwd(..., packed=True) writes dq, dk, dv into one (B, N, 3, H, D) buffer (ops/attention.py's
# attention_bwd_packed), whose slices the cuda qkv_bwd reads in place as dQKV.
PACKED_GRADS = True


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(B, H, N) element strides; a size-1 dim's stride is never multiplied by a non-zero index, so it is 0."""
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3], strict=True))


def _readable(t: torch.Tensor) -> bool:
    if t.stride(3) != 1:
        return False
    if t.dtype == torch.float32:  # SIMT kernels read single elements
        return True
    return t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in _strides(t))


def _operand(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, D) as the kernels can read it: in place when possible, else a contiguous copy (module doc)."""
    return t if _readable(t) else t.clone(memory_format=torch.contiguous_format)


def _check_inputs(named: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Shapes, dtypes and devices of (B, H, N, D) tensors, before any pointer reaches C++."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_cuda_tensors(**named)
    (first_name, first), *rest = named.items()
    for name, t in named.items():
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} must have {first_name}'s shape {tuple(first.shape)}, got {tuple(t.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; all must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must match")
    B, H, N, D = first.shape
    if min(B, H, N) < 1:
        raise ValueError(f"{first_name} must be non-empty, got shape {tuple(first.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported by the cuda backend (supported: {SUPPORTED_HEAD_DIMS})")
    return B, H, N, D


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allow_tf32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward.

    q, k, v: (B, H, N, D), any strides. Returns out (B, H, N, D), a view of (B, N, H, D) memory (so that
    `out.transpose(1, 2).reshape(B, N, H * D)` is free), and lse (B, H, N) fp32, the natural-log
    log-sum-exp of each row of q @ k^T * scale. The autograd op saves q, k, v, out and lse for backward:
    lse lets it recompute P tile by tile, out gives delta = rowsum(dO * O).
    """
    B, H, N, D = _check_inputs({"q": q, "k": k, "v": v})
    q, k, v = _operand(q), _operand(k), _operand(v)
    out = vit_cuda.empty((B, N, H, D), q).transpose(1, 2)
    lse = vit_cuda.empty((B, H, N), q, torch.float32)
    with torch.cuda.device(q.device):
        extension().attention_fwd(
            ptr(q), _strides(q), ptr(k), _strides(k), ptr(v), _strides(v), ptr(out), _strides(out), ptr(lse),
            B, H, N, D, float(scale), dtype_code(q), stream_of(q),
        )  # fmt: skip
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward.

    dout, q, k, v, out: (B, H, N, D), any strides; lse (B, H, N) fp32 from `attention_fwd`.
    Returns dq, dk, dv: (B, H, N, D) contiguous; with `packed`, the q / k / v slices of one (B, N, 3, H, D) buffer
    (what fused_qkv's backward reads in place as dQKV). Scratch: delta (B, H, N) fp32 = rowsum(dout * out).
    Deterministic: one kernel owns dk, dv (per key block), another dq (per query block); no atomics.
    """
    B, H, N, D = _check_inputs({"dout": dout, "q": q, "k": k, "v": v, "out": out})
    check_cuda_tensors(q=q, lse=lse)
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, H, N):
        raise ValueError(f"lse must be float32 of shape (B, H, N) = {(B, H, N)}, got {lse.dtype} {tuple(lse.shape)}")
    dout, q, k, v, out = (_operand(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    delta = vit_cuda.empty((B, H, N), q, torch.float32)
    if packed:
        dq, dk, dv = vit_cuda.empty((B, N, 3, H, D), q).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        dq, dk, dv = (vit_cuda.empty((B, H, N, D), q) for _ in range(3))
    with torch.cuda.device(q.device):
        extension().attention_bwd(
            ptr(dout), _strides(dout), ptr(q), _strides(q), ptr(k), _strides(k), ptr(v), _strides(v),
            ptr(out), _strides(out), ptr(lse), ptr(delta), ptr(dq), ptr(dk), ptr(dv), _strides(dq),
            B, H, N, D, float(scale), dtype_code(q), stream_of(q),
        )  # fmt: skip
    return dq, dk, dv
