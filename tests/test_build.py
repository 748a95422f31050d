"""The CUDA extension: built for sm_80 and sm_90a where nvcc exists, importable without a GPU, clear errors."""

import os
import shutil

import pytest
import torch

import vit_kernels as vk

NVCC_HERE = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def _extension():
    try:
        from vit_kernels import _C
    except ImportError as exc:
        if NVCC_HERE and os.environ.get("VIT_KERNELS_BUILD_CUDA") == "1":
            raise AssertionError(f"nvcc is here and VIT_KERNELS_BUILD_CUDA=1, but _C did not import: {exc}") from exc
        pytest.skip(f"vit_kernels._C not built here ({exc})")
    return _C


def test_build_info_reports_archs_and_versions():
    _C = _extension()
    info = _C.build_info()
    assert info["archs"] == "80 90a"
    assert info["cuda_version"] >= 12000
    assert "-O3" in info["cuda_flags"]
    assert vk.build_info()["cuda_extension"] == info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path, on a machine without a GPU")
def test_runtime_without_driver_raises_clear_error():
    _C = _extension()
    with pytest.raises(RuntimeError, match=r"cudaGetDeviceCount failed: CUDA error \d+"):
        _C.device_count()


def test_build_info_lists_what_runs_here():
    info = vk.build_info()
    assert info["available_backends"] == vk.available_backends()
    assert info["torch"] == torch.__version__
