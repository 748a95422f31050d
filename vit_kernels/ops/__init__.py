"""Triton kernel modules (attention.py, linear.py, block.py) and what their launchers share."""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make that t's device (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
