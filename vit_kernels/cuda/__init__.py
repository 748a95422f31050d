"""Thin wrappers from tensors to `vit_kernels._C` calls: pointers, sizes, strides and the current stream.

`_C` takes raw pointers so that it needs no torch headers; these helpers are the only place that turns
tensors into that interface. Per-op wrappers live in `cuda/attention.py` and `cuda/linear.py`.
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


def stream_of(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device, for launches ordered with torch's work."""
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def check_cuda_tensors(**tensors: torch.Tensor | None) -> None:
    """Last line of defence before pointers cross into C++ (dispatch.py has validated already)."""
    for name, t in tensors.items():
        if t is not None and not t.is_cuda:
            raise ValueError(f"the cuda backend needs CUDA tensors, but {name} is on {t.device}")
