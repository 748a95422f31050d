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


def attention_reference(q, k, v, dout, scale):
    """float64 out, lse and (dq, dk, dv) of attention, on exactly the values the kernel sees (any backend)."""
    from vit_kernels import reference

    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = reference.attention(qd, kd, vd, scale)
    out.backward(dout.double())
    lse = torch.logsumexp(qd.detach() @ kd.detach().transpose(-2, -1) * scale, dim=-1)
    return out.detach(), lse, (qd.grad, kd.grad, vd.grad)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_bf16_like_the_gpu():
    """Make Triton 3.6's interpreter treat bf16 as the GPU does (numpy has no bf16, and it shows):
    - dot: it multiplies bf16 operands as their raw uint16 bit patterns; upcast them to fp32 first, which is
      what the tensor cores do (exact products, fp32 accumulation);
    - fp32 -> bf16 casts: it truncates where compiled kernels round to nearest even, a bias that adds up
      coherently over sums (bias gradients, dW).
    Only the interpreter is patched; compiled kernels never see this."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        original_dot, original_cast = builder.create_dot, builder.cast_impl
        convert = interpreter._convert_float
    except (ImportError, AttributeError):  # no triton, or an interpreter without these code paths
        yield
        return

    def create_dot(self, a, b, *args, **kwargs):
        def up(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            return interpreter.TensorHandle(convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

        return original_dot(self, up(a), up(b), *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.array(src.data, dtype=np.float32))  # a copy; keeps 0-d scalars 0-d
            return interpreter.TensorHandle(
                values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16
            )
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    yield
    builder.create_dot, builder.cast_impl = original_dot, original_cast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
