"""The reference ops (the definition of correct) against PyTorch's own fused primitives, forward and grads."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, rel_error, tf32_model, tf32_round

import vit_kernels as vk
from vit_kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grads(fn, inputs, seed_grad):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*inputs)
    out.backward(seed_grad.to(out.dtype))
    return out, [t.grad for t in inputs if t is not None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 1, 32), (2, 3, 17, 64), (1, 2, 197, 80)])
def test_reference_attention_matches_sdpa(dtype, shape):
    q, k, v = (torch.randn(shape) for _ in range(3))
    dout = torch.randn(shape)
    scale = 0.3
    ref_out, ref_grads = _grads(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale),
        [t.double() for t in (q, k, v)],
        dout.double(),
    )
    out, grads = _grads(lambda a, b, c: reference.attention(a, b, c, scale), [t.to(dtype) for t in (q, k, v)], dout)
    # The naive path is allowed the usual low-precision error of its dtype, no more.
    tol = TOLERANCES[dtype] * (5 if dtype != torch.float32 else 1)
    assert rel_error(out, ref_out) < tol
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < tol


def _qkv_by_loops(x, w, b, H):
    """q, k, v (B, H, N, D) written element by element from the definition, independent of reference.fused_qkv's
    linear + reshape + permute: q[b, h, t, d] = x[b, t, :] . w[h * D + d, :] + bias[h * D + d]; k and v read
    the weight rows C + ... and 2C + ...."""
    B, N, C = x.shape
    D = C // H
    out = torch.zeros(3, B, H, N, D, dtype=x.dtype)
    for which in range(3):
        for h in range(H):
            for d in range(D):
                row = which * C + h * D + d
                for t in range(N):
                    for bi in range(B):
                        out[which, bi, h, t, d] = torch.dot(x[bi, t], w[row]) + (b[row] if b is not None else 0.0)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_fused_qkv_matches_definition(dtype, bias):
    """reference.fused_qkv against q, k, v built element by element in float64 (forward), and its gradients
    against the float64 gradients of that element-wise construction."""
    B, N, C, H = 2, 5, 12, 3  # D = 4: small enough for Python loops, H and D distinct, B and N > 1
    x, w = torch.randn(B, N, C), torch.randn(3 * C, C) / C**0.5
    b = torch.randn(3 * C) if bias else None
    grads = [torch.randn(B, H, N, C // H) for _ in range(3)]
    leaves64 = [t.double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    ref = _qkv_by_loops(*leaves64, H)
    torch.autograd.backward(list(ref.unbind(0)), [g.double() for g in grads])

    low = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (x, w, b)]
    q, k, v = reference.fused_qkv(*low, H)
    torch.autograd.backward((q, k, v), [g.to(dtype) for g in grads])
    tol = TOLERANCES[dtype] * 2
    for name, t, r in zip("qkv", (q, k, v), ref.unbind(0), strict=True):
        assert t.shape == (B, H, N, C // H), name
        assert rel_error(t, r) < tol, name
    for name, t, r in zip(("x", "weight", "bias"), low, leaves64, strict=True):
        if t is not None:
            assert rel_error(t.grad, r.grad) < tol, f"d{name}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_gelu_mlp_matches_torch(dtype, approximate, bias):
    M, C, Hd = 19, 24, 40
    params = [
        torch.randn(M, C),
        torch.randn(Hd, C) / C**0.5,
        torch.randn(Hd) if bias else None,
        torch.randn(C, Hd) / Hd**0.5,
        torch.randn(C) if bias else None,
    ]
    dy = torch.randn(M, C)

    def torch_mlp(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)

    ref_out, ref_grads = _grads(torch_mlp, [p.double() if p is not None else None for p in params], dy.double())
    out, grads = _grads(
        lambda *a: reference.gelu_mlp(*a, approximate=approximate),
        [p.to(dtype) if p is not None else None for p in params],
        dy,
    )
    tol = TOLERANCES[dtype] * (5 if dtype != torch.float32 else 1)
    assert rel_error(out, ref_out) < tol
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < tol


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_eager_backends_through_public_api(backend):
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.float64).float() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_error(vk.attention(q, k, v, backend=backend), ref) < 1e-5


def test_tf32_model_rounds_every_gemm_operand_forward_and_backward():
    """The tf32 model behind the tf32 tolerances (conftest.tf32_model): forward and autograd's backward GEMMs see
    operands truncated to 10 mantissa bits, non-GEMM ops and the added term of addmm do not."""
    x = torch.randn(4, 8, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(3, 8, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64)
    dy = torch.randn(4, 3, dtype=torch.float64)

    def run(x, w, b, dy):
        y = F.linear(x, w, b)
        y.backward(dy)
        return y

    y = tf32_model(run, x, w, b, dy)
    r = tf32_round
    assert torch.equal(r(torch.tensor([1.0 + 2.0**-10 + 2.0**-11])), torch.tensor([1.0 + 2.0**-10]))
    assert torch.allclose(y, r(x) @ r(w).t() + b, rtol=1e-14, atol=0)
    assert torch.allclose(x.grad, r(dy) @ r(w), rtol=1e-14, atol=0)
    assert torch.allclose(w.grad, r(dy).t() @ r(x), rtol=1e-14, atol=0)
    assert not torch.allclose(y, x @ w.t() + b, rtol=1e-6, atol=0), "the model must differ from plain float64"
