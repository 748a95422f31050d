"""Triton kernel modules (attention.py, linear.py, block.py, tma_gemm.py) and what their launchers share.

The launchers call these as attributes of this package (`vit_triton.alloc(...)` after
`from vit_kernels import triton as vit_triton`), never through a from-import: tests replace `alloc` here (and
`on_device`) with monkeypatch, and a name bound at import time would not see the replacement."""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make that t's device (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def arch(device: torch.device) -> int:
    """Which launch tables apply: 90 for Hopper, else 80 (Ampere, Ada and anything newer that is not Hopper use
    the mma.sync tables); 0 for the interpreter's CPU tensors."""
    if device.type != "cuda":
        return 0
    major, _minor = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


def alloc(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised buffer on `like`'s device, of `like`'s dtype unless `dtype` is given. Every output and
    scratch buffer of the Triton launchers comes from here (tma_gemm.py's split-K partials included), so that the
    tests can replace it with a NaN-filling allocator (conftest.nan_alloc): an element a kernel never writes then
    fails them."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The INPUT_PRECISION constexpr of a kernel's dots: "tf32" for fp16 / bf16 operands (exact products
    accumulated in fp32 regardless; the flag only picks fp32's path) and for fp32 with `allow_tf32`, else "ieee"
    (exact fp32 FMA dots, PyTorch's default matmul precision "highest")."""
    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def contiguous_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A bias as the kernels read it, with unit stride: t itself when contiguous, else a
    contiguous copy (a strided vector is rare enough to copy); None stays None. No alignment is asked for (the
    cuda wrappers' `_aligned_vector` also wants a 16-byte aligned start)."""
    return None if t is None else t.contiguous()


def packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The (B, N, 3, H, D) tensor whose q / k / v slices q, k, v (B, H, N, D) are, as a view of their storage; None
    where they are not such slices (the layout of fused_qkv's packed outputs and of attention's packed gradients)."""
    B, H, N, D = q.shape
    C = H * D
    strides = (N * 3 * C, D, 3 * C, 1)
    step = C * q.element_size()
    if (
        k.shape == q.shape == v.shape
        and q.stride() == k.stride() == v.stride() == strides
        and k.data_ptr() == q.data_ptr() + step
        and v.data_ptr() == q.data_ptr() + 2 * step
    ):
        return q.as_strided((B, N, 3, H, D), (N * 3 * C, 3 * C, C, D, 1))
    return None
