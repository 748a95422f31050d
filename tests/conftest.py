"""Test setup: Triton's interpreter on machines without a CUDA device, and a seed per test.

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before the kernel modules are
imported; conftest.py is imported by pytest before any test module, so setting it here is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Per-dtype relative-error tolerances (||out - ref|| / ||ref|| against a float64 reference).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 1e-3


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in `out` gives inf, so it never passes.

    The denominator is floored at 1e-6 * sqrt(numel): where the true value is zero (dq and dk at N=1,
    where softmax is constant) a reference holds rounding dust, and the kernel must then be ~zero too.
    """
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    floor = 1e-6 * max(ref.numel(), 1) ** 0.5
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


@pytest.fixture(autouse=True, scope="session")
def _interpreter_bf16_dot():
    """Triton 3.6's interpreter multiplies bf16 dot operands as their raw uint16 bit patterns (numpy has no
    bf16). Upcast them to fp32 first, which is what the tensor cores do (exact products, fp32 accumulation).
    Only the interpreter is patched; compiled kernels never see this."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter.InterpreterBuilder.create_dot
        convert = interpreter._convert_float
    except (ImportError, AttributeError):  # no triton, or an interpreter without this code path
        yield
        return

    def create_dot(self, a, b, *args, **kwargs):
        def up(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            return interpreter.TensorHandle(convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

        return original(self, up(a), up(b), *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = create_dot
    yield
    interpreter.InterpreterBuilder.create_dot = original


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
