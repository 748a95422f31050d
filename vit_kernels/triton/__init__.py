"""Triton kernel modules (attention.py, linear.py, block.py) and what their launchers share."""

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
