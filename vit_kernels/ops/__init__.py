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
