"""Triton flash attention (vit_kernels/triton/attention.py): forward, lse and every gradient against float64.

Each case calls the launchers directly and, for a subset, goes through the autograd custom op
(`vit_kernels.ops.attention.ATTENTION.forward_op(..., "triton")` and `.backward()`). Inputs are drawn in the test
dtype and
the reference (`vit_kernels.reference.attention`, grads by autograd) runs on float64 copies of exactly those
values. Every buffer the launchers allocate starts as NaN, so an element a kernel never writes (a tail row,
a masked head-dim column) fails the test. Every tensor lives on the `device` fixture's device: compiled kernels
on a CUDA GPU when there is one, else TRITON_INTERPRET=1 on CPU (tests/conftest.py), so the same cases (odd N,
packed and strided layouts, large logits) run on both. Layouts are crossed with dtypes; the default run takes a
subset that puts every (dtype, layout) pair at several N and D, the full cross is marked slow.
"""

import itertools
import math
import warnings

import pytest
import torch
from conftest import (
    INTERPRETING,
    TF32_FACTOR,
    TOLERANCES,
    attention_reference,
    flash_order_grads,
    nan_alloc,
    randn,
    rel_error,
    tf32_model,
    tf32_tolerance,
)

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels import triton as vit_triton
from vit_kernels.ops.attention import ATTENTION
from vit_kernels.triton import attention as triton_attention


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate (out, lse, delta, dq, dk, dv) starts as NaN."""
    monkeypatch.setattr(vit_triton, "alloc", nan_alloc)


def _qkv(B: int, H: int, N: int, D: int, dtype: torch.dtype, layout: str, device):
    """Random q, k, v (B, H, N, D) in dtype on device, in the given memory layout."""
    if layout == "contiguous":
        return [randn(B, H, N, D, dtype=dtype, device=device) for _ in range(3)]
    if layout == "packed":  # timm's qkv: views of one (B, N, 3, H, D) tensor, read in place
        return list(randn(B, N, 3, H, D, dtype=dtype, device=device).permute(2, 0, 3, 1, 4).unbind(0))
    if layout == "transposed":  # head dim not unit-stride: (B, H, D, N) memory
        return [randn(B, H, D, N, dtype=dtype, device=device).transpose(-2, -1) for _ in range(3)]
    if layout == "mixed":  # three stride patterns at once: a kernel reading one operand with another's strides fails
        q = randn(B, H, N, D, dtype=dtype, device=device)
        k = randn(B, H, D, N, dtype=dtype, device=device).transpose(-2, -1)
        v = randn(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
        return [q, k, v]
    raise ValueError(layout)


def _eager_grads(q, k, v, dout, scale):
    """Plain eager attention's gradients in the inputs' own dtype: the parity baseline for low precision."""
    qe, ke, ve = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    reference.attention(qe, ke, ve, scale).backward(dout)
    return qe.grad, ke.grad, ve.grad


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LAYOUTS = ("contiguous", "packed", "transposed", "mixed")
SCALES = (None, 0.3, 1.0)  # None: D ** -0.5


def _case(N, D, dtype, allow_tf32, layout, scale):
    name = {F32: "tf32" if allow_tf32 else "fp32", F16: "fp16", BF16: "bf16"}[dtype]
    return pytest.param(
        N, D, dtype, allow_tf32, layout, scale, id=f"N{N}-D{D}-{name}-{layout}-scale{scale or 'D^-0.5'}"
    )


# Default cases: every (N, D, dtype) at N = 1 and 17 (one partial tile, cheap under the interpreter), the layout
# and scale turning with N and D so that each dtype meets each layout at both N and several D (not, as before,
# one layout per dtype); then ViT lengths (197 = 14^2 + 1, 257 = 16^2 + 1), tf32 and the odd head dims.
CASES = []
for (i_n, N), (i_d, D), (i_t, dtype) in itertools.product(
    enumerate((1, 17)), enumerate((32, 64, 80, 128)), enumerate((F32, F16, BF16))
):
    CASES.append(_case(N, D, dtype, False, LAYOUTS[(i_t + i_d + i_n) % 4], SCALES[(i_d + 2 * i_n) % 3]))
CASES += [
    _case(17, 48, F16, False, "transposed", None),
    _case(17, 96, BF16, False, "packed", 0.3),
    _case(17, 96, F32, False, "packed", 1.0),
    _case(17, 64, F32, True, "contiguous", 0.3),
    _case(17, 80, F32, True, "transposed", None),
    _case(197, 64, F16, False, "contiguous", None),
    _case(197, 64, F32, True, "packed", None),
    _case(197, 80, BF16, False, "transposed", 1.0),
    _case(197, 32, F32, False, "mixed", 0.3),
    _case(197, 128, F16, False, "packed", None),
    _case(257, 48, BF16, False, "contiguous", None),
    _case(257, 64, F32, False, "transposed", None),
]
# The full cross: a few seconds on a GPU, many minutes under the interpreter (conftest skips it there without
# --slow).
FULL_CROSS = [
    _case(N, D, dtype, tf32, layout, None)
    for N, D, (dtype, tf32), layout in itertools.product(
        (1, 17, 197, 257), (32, 48, 64, 80, 96, 128), ((F32, False), (F32, True), (F16, False), (BF16, False)), LAYOUTS
    )
]


def _run_launchers(N, D, dtype, allow_tf32, layout, scale, device):
    B, H = (2, 2) if N <= 17 else (1, 2)
    scale = D**-0.5 if scale is None else scale
    q, k, v = _qkv(B, H, N, D, dtype, layout, device)
    dout = randn(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)  # gradient of a (B, N, H * D) input

    out, lse = triton_attention.attention_fwd(q, k, v, scale, allow_tf32)
    dq, dk, dv = triton_attention.attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32)

    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, scale)
    assert out.shape == (B, H, N, D) and out.dtype == dtype and out.device == q.device
    assert out.transpose(1, 2).is_contiguous(), "out must be (B, N, H, D) in memory"
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    assert all(g.is_contiguous() and g.shape == (B, H, N, D) for g in (dq, dk, dv))
    if dtype == F32 and allow_tf32:
        # Each output against twice the error of the same computation with every GEMM operand rounded to tf32.
        model_out, model_lse, model_grads = tf32_model(attention_reference, q, k, v, dout, scale)
        _check("out", out, ref_out, tf32_tolerance(model_out, ref_out))
        _check("lse", lse, ref_lse, tf32_tolerance(model_lse, ref_lse))
        tols = [tf32_tolerance(m, r) for m, r in zip(model_grads, ref_grads, strict=True)]
        if N == 1:
            # dq = dk = 0 exactly, and the tf32 model of the autograd reference has no dust there (it takes
            # delta = sum(P dP), which cancels exactly). The kernel's dust is dP - delta with dP from tf32 dO and
            # V: model that order instead (on the H100, 2.4-6.2e-4 of |dv|; this model gives 1.6-7e-4).
            dust = tf32_model(flash_order_grads, q, k, v, dout, scale)
            dv_norm = ref_grads[2].norm().item()
            tols[:2] = [max(t, TF32_FACTOR * d.norm().item() / dv_norm) for t, d in zip(tols[:2], dust, strict=True)]
        _check_grads((dq, dk, dv), ref_grads, tols, (None,) * 3)
        return
    tol = TOLERANCES[dtype]
    _check("out", out, ref_out, tol)
    _check("lse", lse, ref_lse, TOLERANCES[torch.float32] if dtype == F32 else 1e-3)
    _check_grads((dq, dk, dv), ref_grads, [tol] * 3, _eager_grads(q, k, v, dout, scale))


@pytest.mark.parametrize("N, D, dtype, allow_tf32, layout, scale", CASES)
def test_launchers_match_attention_reference(poisoned, device, N, D, dtype, allow_tf32, layout, scale):
    _run_launchers(N, D, dtype, allow_tf32, layout, scale, device)


@pytest.mark.slow
@pytest.mark.parametrize("N, D, dtype, allow_tf32, layout, scale", FULL_CROSS)
def test_launchers_full_cross(poisoned, device, N, D, dtype, allow_tf32, layout, scale):
    _run_launchers(N, D, dtype, allow_tf32, layout, scale, device)


def _check_grads(grads, ref_grads, tols, eager_grads) -> None:
    """Each gradient within its tolerance; bf16 gradients may instead be within 2x plain eager attention's bf16
    error (FlashAttention's parity rule): dq and dk come from dS = P * (dP - delta), whose rows sum to zero, so
    rounding dS to bf16 for the tensor-core product costs ~1-2% at sharp softmaxes (scale 1), in eager torch as in
    any flash kernel. Measured here: the kernel's error stays below eager bf16's in every case."""
    for name, g, ref, tol, eager in zip(("dq", "dk", "dv"), grads, ref_grads, tols, eager_grads, strict=True):
        if name != "dv" and ref.shape[2] == 1:
            # One key: softmax is constant, so dq = dk = 0 exactly, which the kernel reaches as P * (dP - delta)
            # with dP = delta up to rounding. That rounding dust must be small next to the terms that cancel,
            # whose size is dv's (P dO).
            assert torch.isfinite(g).all(), f"{name}: not finite"
            err = (g.double().norm() / ref_grads[2].norm()).item()
            assert err <= tol, f"{name}: |{name}| / |dv| = {err:.3g} > {tol:.3g} where the exact value is 0"
        else:
            parity = 2 * rel_error(eager, ref) if g.dtype == torch.bfloat16 else 0.0
            _check(name, g, ref, max(tol, parity))


# (N, D, dtype, layout) through the custom op and autograd; packed q, k, v get their grads through the views.
AUTOGRAD_CASES = [
    (1, 64, F32, "contiguous"),
    (17, 80, F16, "packed"),
    (17, 32, BF16, "transposed"),
    (17, 64, F32, "mixed"),
    (197, 64, BF16, "packed"),
]


@pytest.mark.parametrize("N, D, dtype, layout", AUTOGRAD_CASES)
def test_autograd_custom_op_matches_attention_reference(poisoned, device, N, D, dtype, layout):
    B, H, scale = 2, 2, D**-0.5
    if layout == "packed":
        qkv = randn(B, N, 3, H, D, dtype=dtype, device=device).requires_grad_(True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        leaves = (qkv,)
    else:
        q, k, v = (t.requires_grad_(True) for t in _qkv(B, H, N, D, dtype, layout, device))
        leaves = (q, k, v)
    dout = randn(B, H, N, D, dtype=dtype, device=device)

    out, lse = ATTENTION.forward_op(q, k, v, scale, False, "triton")
    out.backward(dout)

    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, scale)
    tol = TOLERANCES[dtype]
    _check("out", out, ref_out, tol)
    _check("lse", lse, ref_lse, 1e-3)
    grads = leaves[0].grad.permute(2, 0, 3, 1, 4).unbind(0) if layout == "packed" else [t.grad for t in leaves]
    _check_grads(grads, ref_grads, [tol] * 3, _eager_grads(q, k, v, dout, scale))


@pytest.mark.skipif(
    INTERPRETING or not torch.cuda.is_available(),
    reason="proves nothing here: the interpreter runs programs one after another, so no two can race and any "
    "backward, atomics or not, gives the same bits twice; runs on a CUDA device",
)
@pytest.mark.parametrize("dtype", [F16, F32])
def test_backward_is_deterministic(poisoned, device, dtype):
    """Bit-identical gradients over repeated runs with thousands of programs in flight (ViT-B/16's 12 heads at
    batch 32, N = 197: 4 tiles x 384 heads per kernel, several waves on any GPU): a backward that accumulated dQ or
    dK / dV with atomics, or raced on a shared buffer, would differ in the last bits from run to run."""
    B, H, N, D = 32, 12, 197, 64
    q, k, v = _qkv(B, H, N, D, dtype, "packed", device)
    dout = randn(B, H, N, D, dtype=dtype, device=device)
    out, lse = triton_attention.attention_fwd(q, k, v, 0.125, False)
    first = triton_attention.attention_bwd(dout, q, k, v, out, lse, 0.125, False)
    assert all(torch.isfinite(g).all() for g in first)
    bits = torch.int16 if dtype == F16 else torch.int32
    for _ in range(4):
        again = triton_attention.attention_bwd(dout, q, k, v, out, lse, 0.125, False)
        for name, a, b in zip(("dq", "dk", "dv"), first, again, strict=True):
            assert torch.equal(a.view(bits), b.view(bits)), f"{name} differs between two runs"


# ----------------------------------------------------------------------------------------------------
# numerical robustness
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16])
def test_large_logits_stay_finite(poisoned, device, dtype):
    """Logits of magnitude ~1e4 (exp would overflow fp32 at 89): the running max keeps every exp2 <= 1."""
    B, H, N, D = 1, 2, 40, 64
    q, k, v = _qkv(B, H, N, D, dtype, "contiguous", device)
    q = (q.float() * 16).to(dtype)
    k = (k.float() * 16).to(dtype)
    dout = randn(B, H, N, D, dtype=dtype, device=device)
    out, lse = triton_attention.attention_fwd(q, k, v, 1.0, False)
    dq, dk, dv = triton_attention.attention_bwd(dout, q, k, v, out, lse, 1.0, False)
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, 1.0)
    assert ref_lse.abs().max() > 3e3, "the test must reach logits of order 1e4"
    for t in (out, lse, dq, dk, dv):
        assert torch.isfinite(t).all()
    # Rounding a logit of 1e4 in fp32 moves it by ~1e-3, which moves near-tied softmax weights by as much.
    _check("out", out, ref_out, 1e-2)
    _check("lse", lse, ref_lse, 1e-5)
    _check("dv", dv, ref_grads[2], 1e-2)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_identical_keys_give_uniform_weights(poisoned, device, dtype):
    B, H, N, D = 1, 2, 45, 80
    q, k, v = _qkv(B, H, N, D, dtype, "packed", device)
    k = randn(B, H, 1, D, dtype=dtype, device=device).expand(B, H, N, D)  # stride 0 along tokens
    scale = D**-0.5
    out, lse = triton_attention.attention_fwd(q, k, v, scale, False)
    mean = v.double().mean(dim=2, keepdim=True).expand(B, H, N, D)
    _check("out", out, mean, TOLERANCES[dtype])
    expected_lse = (q.double() @ k[:, :, :1].double().transpose(-2, -1)).squeeze(-1) * scale + math.log(N)
    _check("lse", lse, expected_lse, 1e-5 if dtype == F32 else 1e-3)


def test_very_negative_lse_backward_has_no_overflow(poisoned, device):
    """Every logit near -144 (lse far below -88): the zero-filled padding keys of the last tile score 0, and
    exp2(0 - lse) would overflow to inf there unless they are masked. Under the interpreter numpy reports the
    overflow as a RuntimeWarning, which this test turns into an error."""
    B, H, N, D = 1, 2, 40, 64
    u = torch.nn.functional.normalize(torch.randn(B, H, 1, D, dtype=torch.float64), dim=-1) * 12
    q = (-u + 0.01 * torch.randn(B, H, N, D, dtype=torch.float64)).to(device=device, dtype=F32)
    k = (u + 0.01 * torch.randn(B, H, N, D, dtype=torch.float64)).to(device=device, dtype=F32)
    v, dout = randn(B, H, N, D, dtype=F32, device=device), randn(B, H, N, D, dtype=F32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, lse = triton_attention.attention_fwd(q, k, v, 1.0, False)
        dq, dk, dv = triton_attention.attention_bwd(dout, q, k, v, out, lse, 1.0, False)
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, 1.0)
    assert ref_lse.max() < -100, "the test must push lse below exp's fp32 range"
    _check("lse", lse, ref_lse, TOLERANCES[F32])
    # fp32 logits of ~144 carry ~1e-5 absolute rounding, which moves the weights by as much; dq and dk
    # (sums of P (dP - delta), nearly cancelling) show it amplified a few times.
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, strict=True):
        _check(name, got, ref, 1e-4)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the NaN row, as intended
def test_nan_query_row_stays_in_its_row(poisoned, device):
    """A NaN in one query row poisons that output row only (its softmax is NaN; other rows never read it).
    A NaN in a key or value row reaches every query, in the kernel as in the reference."""
    B, H, N, D = 1, 2, 70, 64
    q, k, v = _qkv(B, H, N, D, F32, "contiguous", device)
    q[0, 1, 33, 5] = float("nan")
    out, lse = triton_attention.attention_fwd(q, k, v, 0.125, False)
    bad = torch.zeros(B, H, N, dtype=torch.bool, device=device)
    bad[0, 1, 33] = True
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(lse[~bad]).all()
    ref = reference.attention(q.double(), k.double(), v.double(), 0.125)
    _check("clean rows", out[~bad], ref[~bad], TOLERANCES[F32])

    v[0, 0, 3, 0] = float("nan")
    out, _ = triton_attention.attention_fwd(q, k, v, 0.125, False)
    assert torch.isnan(out[0, 0, :, 0]).all() and torch.isfinite(out[0, 0, :, 1:]).all()


@pytest.mark.parametrize("N, D, dtype", [(1, 32, F32), (17, 80, F16), (197, 64, BF16)])
def test_packed_gradients_are_the_same_numbers_in_one_buffer(poisoned, device, N, D, dtype):
    """attention_bwd(packed=True): dq, dk, dv bit for bit as unpacked, written as the q / k / v slices of one
    (B, N, 3, H, D) buffer (NaN-poisoned first, so a slice the kernels miss fails), i.e. one (B*N, 3HD) dQKV."""
    B, H = 2, 3
    q, k, v = _qkv(B, H, N, D, dtype, "packed", device)
    dout = randn(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
    out, lse = triton_attention.attention_fwd(q, k, v, D**-0.5, False)
    apart = triton_attention.attention_bwd(dout, q, k, v, out, lse, D**-0.5, False)
    packed = triton_attention.attention_bwd(dout, q, k, v, out, lse, D**-0.5, False, packed=True)
    base = packed[0].data_ptr()
    step = H * D * packed[0].element_size()
    assert [g.data_ptr() for g in packed] == [base, base + step, base + 2 * step]
    assert all(g.stride() == (N * 3 * H * D, D, 3 * H * D, 1) for g in packed)
    for name, a, p in zip(("dq", "dk", "dv"), apart, packed, strict=True):
        assert torch.isfinite(p).all() and torch.equal(a, p), name


def test_eager_backward_hands_fused_qkv_one_packed_dqkv(device, monkeypatch):
    """fused_qkv -> attention -> backward on the eager path: attention's gradients arrive at the QKV projection's
    backward as slices of one buffer, which it reads in place (no gather copy), and the gradients are right."""
    from vit_kernels.triton import linear

    seen = []
    original = linear._packed_dqkv

    def spy(dq, dk, dv):
        packed = original(dq, dk, dv)
        seen.append(packed.data_ptr() == dq.data_ptr())
        return packed

    monkeypatch.setattr(linear, "_packed_dqkv", spy)
    B, N, C, H = 2, 17, 96, 3
    x = randn(B, N, C, dtype=BF16, device=device).requires_grad_(True)
    w = randn(3 * C, C, dtype=BF16, device=device, scale=C**-0.5).requires_grad_(True)
    b = randn(3 * C, dtype=BF16, device=device).requires_grad_(True)
    dout = randn(B, H, N, C // H, dtype=BF16, device=device)
    q, k, v = vk.fused_qkv(x, w, b, H, backend="triton")
    vk.attention(q, k, v, backend="triton").backward(dout)
    assert seen == [True], seen
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    qr, kr, vr = reference.fused_qkv(*leaves, H)
    reference.attention(qr, kr, vr, (C // H) ** -0.5).backward(dout.double())
    for name, t, ref in zip(("dx", "dweight", "dbias"), (x, w, b), leaves, strict=True):
        _check(name, t.grad, ref.grad, TOLERANCES[BF16])
