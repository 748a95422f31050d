"""Thin wrappers from tensors to `vit_kernels._C` calls: pointers, sizes, strides and the current stream.

`_C` takes raw pointers so that it needs no torch headers; these helpers are the only place that turns
tensors into that interface. Per-op wrappers live in `cuda/attention.py` and `cuda/linear.py`; they call `empty`
as an attribute of this package (`vit_cuda.empty(...)` after `from vit_kernels import cuda as vit_cuda`), so that a
test's replacement of it here reaches them all.
"""

from __future__ import annotations

import torch

# dtype codes understood by the C++ launchers (csrc/common.cuh: enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def extension():
    """The compiled module, or a RuntimeError that says why it cannot be used here."""
    try:
        from vit_kernels import _C
    except ImportError as exc:
        raise RuntimeError(
            "the cuda backend needs the compiled extension vit_kernels._C, which is not built here "
            f"({exc}); reinstall with nvcc available (VIT_KERNELS_BUILD_CUDA=1 pip install -e .)"
        ) from exc
    return _C


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised buffer of `shape` on `like`'s device, of `like`'s dtype unless `dtype` is given. Every output
    and scratch buffer of the cuda wrappers comes from here, so tests can poison them (NaN-fill) and catch any
    element a kernel forgets to write."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def stream_of(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device, for launches ordered with torch's work."""
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def check_cuda_tensors(**tensors: torch.Tensor | None) -> None:
    """Last line of defence before pointers cross into C++ (dispatch.py has validated already): every
    named tensor is a CUDA tensor, all on the first one's device (one launch cannot read two GPUs)."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_cuda:
            raise ValueError(f"the cuda backend needs CUDA tensors, but {name} is on {t.device}")
        if first is None:
            first_name, first = name, t
        elif t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must match")


def check_like(like_name: str, like: torch.Tensor, **expected: tuple[torch.Tensor | None, tuple[int, ...]]) -> None:
    """Each named tensor has `like`'s dtype and the given shape. The backward custom ops are public, so a
    direct caller can pass gradients that autograd never would; the kernels take one dtype code per launch
    and trust the sizes, so a mismatch must stop here rather than read out of bounds."""
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; all must match")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
