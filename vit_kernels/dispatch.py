"""The one place that validates inputs and picks a backend.

Each backend declares what it supports (devices, dtypes, head dims, channel alignment, compute
capability, whether it is built/importable here); `auto` takes the first backend in its preference
list that accepts the inputs, and a backend named explicitly either accepts them or raises with its
reasons. Nothing ever falls back silently.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
# GEMM tiles load 16-byte vectors along the reduction dim, so channels come in multiples of 8.
KERNEL_CHANNEL_MULTIPLE = 8
# Preference of `auto` on a CUDA device. Triton first: its kernels cover sm_80 and sm_90 through the
# compiler; to be revisited with the committed GPU measurements in benchmarks/results/.
AUTO_ORDER_CUDA = ("triton", "cuda", "torch")


@dataclass(frozen=True)
class BackendSupport:
    name: str
    head_dims: tuple[int, ...] | None  # None: any head dim
    channel_multiple: int  # 1: any channel count


SUPPORT = {
    "reference": BackendSupport("reference", None, 1),
    "torch": BackendSupport("torch", None, 1),
    "triton": BackendSupport("triton", KERNEL_HEAD_DIMS, KERNEL_CHANNEL_MULTIPLE),
    "cuda": BackendSupport("cuda", KERNEL_HEAD_DIMS, KERNEL_CHANNEL_MULTIPLE),
}


# ----------------------------------------------------------------------------------------------------
# what can run here
# ----------------------------------------------------------------------------------------------------
def _triton_interpreting() -> bool:
    # Triton's own switch: CPU tensors can run Triton kernels only under its interpreter.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_extension():
    try:
        from vit_kernels import _C
    except ImportError as exc:  # built without nvcc, or a broken build
        return None, f"the CUDA extension vit_kernels._C is not built ({exc})"
    return _C, None


def device_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` here, or None if it can."""
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cpu":
            return None if _triton_interpreting() else "CPU tensors run Triton kernels only with TRITON_INTERPRET=1"
        if device.type != "cuda":
            return f"triton kernels need a CUDA device, got {device.type}"
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else "triton kernels need compute capability >= 8.0"
    if backend == "cuda":
        _C, reason = _cuda_extension()
        if reason:
            return reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else "the CUDA kernels are built for compute capability >= 8.0"
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in BACKENDS if device_unavailable_reason(b, device) is None]


# ----------------------------------------------------------------------------------------------------
# input checks shared by the ops
# ----------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")


def _check_same(named: dict[str, torch.Tensor | None]) -> None:
    present = {n: t for n, t in named.items() if t is not None}
    (first_name, first), *rest = present.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; all must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must match")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def _missing_kernels(backend: str, family: str) -> str | None:
    """Why this package has no `family` kernels for `backend` (a partial build), or None."""
    from vit_kernels.library import _KERNEL_MODULES

    module = _KERNEL_MODULES.get((backend, family))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"this build of vit_kernels has no {backend} {family} kernels ({module} is missing)"


def _select(backend: str, device: torch.device, family: str, kernel_reasons: dict[str, str | None]) -> str:
    """Resolve `backend` for `family` ("attention" or "linear") on `device`; `kernel_reasons` gives each
    backend's objection to these particular inputs."""

    def reason(b: str) -> str | None:
        return device_unavailable_reason(b, device) or _missing_kernels(b, family) or kernel_reasons.get(b)

    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for b in AUTO_ORDER_CUDA:
            if reason(b) is None:
                return b
        raise AssertionError("unreachable: the torch backend accepts every validated input")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    why = reason(backend)
    if why is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {why}")
    return backend


def _channel_reasons(dims: dict[str, int]) -> dict[str, str | None]:
    reasons = {}
    for b, support in SUPPORT.items():
        bad = [f"{n}={d}" for n, d in dims.items() if d % support.channel_multiple]
        reasons[b] = (
            f"needs channel sizes that are multiples of {support.channel_multiple}, got {', '.join(bad)}"
            if bad
            else None
        )
    return reasons


# ----------------------------------------------------------------------------------------------------
# per-op validation: returns the resolved backend
# ----------------------------------------------------------------------------------------------------
def check_attention(q, k, v, scale, backend: str) -> tuple[str, float]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=4)
    _check_same({"q": q, "k": k, "v": v})
    _check_shape("k", k, q.shape, "q.shape (B, H, N, D)")
    _check_shape("v", v, q.shape, "q.shape (B, H, N, D)")
    head_dim = q.shape[-1]
    if scale is None:
        scale = head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    reasons = {}
    for b, support in SUPPORT.items():
        if support.head_dims is not None and head_dim not in support.head_dims:
            reasons[b] = f"head dim D={head_dim} is not supported (supported: {support.head_dims})"
    return _select(backend, q.device, "attention", reasons), float(scale)


def check_fused_qkv(x, weight, bias, num_heads, backend: str) -> str:
    _check_tensor("x", x, ndim=3)
    _check_tensor("weight", weight, ndim=2)
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
    _check_same({"x": x, "weight": weight, "bias": bias})
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
    C = x.shape[-1]
    if C % num_heads:
        raise ValueError(f"x's channel count C={C} must be divisible by num_heads={num_heads}")
    _check_shape("weight", weight, (3 * C, C), "(3C, C)")
    if bias is not None:
        _check_shape("bias", bias, (3 * C,), "(3C,)")
    # The head-split epilogue stores 16-byte vectors per head, so the head dim is aligned like a channel count.
    return _select(backend, x.device, "linear", _channel_reasons({"C": C, "head dim C // num_heads": C // num_heads}))


def check_gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, backend: str) -> str:
    _check_tensor("x", x)
    _check_tensor("fc1_weight", fc1_weight, ndim=2)
    _check_tensor("fc2_weight", fc2_weight, ndim=2)
    for name, t in (("fc1_bias", fc1_bias), ("fc2_bias", fc2_bias)):
        if t is not None:
            _check_tensor(name, t, ndim=1)
    _check_same(
        {"x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias}
    )
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    C, hidden, C_out = x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    _check_shape("fc1_weight", fc1_weight, (hidden, C), "(hidden, C) with C = x.shape[-1]")
    _check_shape("fc2_weight", fc2_weight, (C_out, hidden), "(C_out, hidden) with hidden = fc1_weight.shape[0]")
    if fc1_bias is not None:
        _check_shape("fc1_bias", fc1_bias, (hidden,), "(hidden,)")
    if fc2_bias is not None:
        _check_shape("fc2_bias", fc2_bias, (C_out,), "(C_out,)")
    return _select(backend, x.device, "linear", _channel_reasons({"C": C, "hidden": hidden, "C_out": C_out}))


# A constant to torch.compile (the precision setting is read at trace time, like a Python global), so it
# costs no graph break; changing the precision after compiling needs a recompile, as with any global.
@torch.compiler.assume_constant_result
def allow_tf32() -> bool:
    """fp32 inputs use tf32 tensor cores when PyTorch's own matmul precision allows it."""
    return torch.get_float32_matmul_precision() != "highest"
