"""Triton GEMMs (vit_kernels/triton/linear.py): fused QKV and GELU-MLP, forward and every gradient.

Each case compares against the float64 reference (vit_kernels.reference) by relative error with per-dtype
tolerances, on token counts that never fill a tile (N = 1, 17, 197), odd channel counts (C = 24, 40, 72),
with and without biases, both GELU forms, non-contiguous x and dq / dk / dv views, and every buffer the
launchers allocate NaN-poisoned first, so an element a kernel forgets to write fails the test. Under the
interpreter (no GPU) the shapes are small; the last test compiles the shipped GPU configs for sm_80 / sm_90.
"""

import pytest
import torch
from conftest import TOLERANCES, nan_alloc, randn, rel_error, tf32_model, tf32_tolerance

import vit_kernels as vk
from vit_kernels import reference
from vit_kernels import triton as vit_triton
from vit_kernels.ops.fused_qkv import QKV
from vit_kernels.ops.gelu_mlp import MLP
from vit_kernels.triton import linear

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: a skipped tile, row or column cannot pass."""
    monkeypatch.setattr(vit_triton, "alloc", nan_alloc)


# The GEMM path of the parity tests below: "tma" (tma_gemm.py, what Hopper runs: the interpreter's default) or
# "pointer" (`_gemm_kernel`, what sm_80 runs; its fp16 and bf16 are one code path, so bf16 stands for both). Exact
# fp32 has no tensor-core path and runs "pointer" either way.
DTYPE_PATHS = [(F32, "pointer"), (F16, "tma"), (BF16, "tma"), (BF16, "pointer")]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "pointer":
        monkeypatch.setattr(linear, "TMA_ARCHS", ())
    return request.param


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten element of a poisoned buffer?)"
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.1g}"


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t (..., R, C) in another memory layout (a view, never contiguous unless asked)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "sliced":  # row stride C + 8: a channel slice of a wider tensor
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype, device=t.device)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if layout == "transposed":  # the first two dims swapped in memory: (B, N) no longer merge into one stride
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "channels_first":  # unit stride along rows, not channels
        return t.transpose(-2, -1).contiguous().transpose(-2, -1)
    raise ValueError(layout)


def _grads(B, N, H, D, dtype, layout, device):
    """dq, dk, dv (B, H, N, D) as the views attention's backward might hand over."""
    if layout == "packed":  # views of one (B, N, 3, H, D) gradient: stride 3C along tokens
        return randn(B, N, 3, H, D, dtype=dtype, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "contiguous":
        return tuple(randn(B, H, N, D, dtype=dtype, device=device) for _ in range(3))
    if layout == "mixed":  # three different stride patterns at once
        dq = randn(B, H, D, N, dtype=dtype, device=device).transpose(2, 3)
        dk = randn(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)
        dv = randn(B, H, N, D, dtype=dtype, device=device)
        return dq, dk, dv
    raise ValueError(layout)


def _qkv_reference(x, weight, bias, num_heads, grads):
    """q, k, v and (dx, dweight, dbias) in float64."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    outs = reference.fused_qkv(*leaves, num_heads)
    torch.autograd.backward(outs, [g.double() for g in grads])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _mlp_reference(x, w1, b1, w2, b2, approximate, dy, dtype=torch.float64):
    """y and (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias) of the eager reference, computed in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in (x, w1, b1, w2, b2)]
    y = reference.gelu_mlp(*leaves, approximate)
    y.backward(dy.to(dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _mlp_tolerances(allow_tf32, x, w1, b1, w2, b2, approximate, dy, y_ref, grads_ref):
    """Per-output tolerance (y, dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias).
    - fp32 exact: the fp32 tolerance. fp32 through tf32: twice the error of the float64 computation with every
      GEMM operand rounded to tf32 (conftest.tf32_tolerance), output by output.
    - 16-bit: the dtype's tolerance, or twice the error of plain eager torch in the same dtype if that is larger
      (FlashAttention's parity rule). Hidden and GELU(hidden) are rounded to the dtype before fc2 and dfc2_weight
      use them, in eager torch as in the kernels; at bf16 that alone can cost ~1% on dfc2_weight."""
    tol = TOLERANCES[x.dtype]
    if x.dtype == F32 and not allow_tf32:
        return [tol] * 6
    if x.dtype == F32:
        y_model, grads_model = tf32_model(_mlp_reference, x, w1, b1, w2, b2, approximate, dy)
        pairs = [(y_model, y_ref), *zip(grads_model, grads_ref, strict=True)]
        return [tf32_tolerance(m, r) if r is not None else tol for m, r in pairs]
    y_eager, grads_eager = _mlp_reference(x, w1, b1, w2, b2, approximate, dy, dtype=x.dtype)
    pairs = [(y_eager, y_ref), *zip(grads_eager, grads_ref, strict=True)]
    return [max(tol, 2 * rel_error(e, r)) if r is not None else tol for e, r in pairs]


# ----------------------------------------------------------------------------------------------------
# fused QKV: launchers
# ----------------------------------------------------------------------------------------------------
QKV_SHAPES = [(2, 17, 72, 3), (3, 1, 24, 2), (1, 197, 40, 5)]  # (B, N, C, H): M = 34, 3, 197


def _run_qkv(B, N, C, H, dtype, has_bias, allow_tf32, x_layout, grad_layout, device):
    D = C // H
    x = _layout(randn(B, N, C, dtype=dtype, device=device), x_layout)
    weight = randn(3 * C, C, dtype=dtype, device=device, scale=C**-0.5)
    bias = randn(3 * C, dtype=dtype, device=device) if has_bias else None
    grads = _grads(B, N, H, D, dtype, grad_layout, device)

    q, k, v = linear.qkv_fwd(x, weight, bias, H, allow_tf32)
    dx, dweight, dbias = linear.qkv_bwd(*grads, x, weight, has_bias, allow_tf32)
    outs_ref, grads_ref = _qkv_reference(x, weight, bias, H, grads)
    if dtype == F32 and allow_tf32:  # q, k, v, dx, dweight, dbias: each against its tf32-modelled error
        outs_model, grads_model = tf32_model(_qkv_reference, x, weight, bias, H, grads)
        tols = [tf32_tolerance(m, r) if r is not None else None for m, r in zip(
            (*outs_model, *grads_model), (*outs_ref, *grads_ref), strict=True)]  # fmt: skip
    else:
        tols = [TOLERANCES[dtype]] * 6
    for name, out, ref, tol in zip("qkv", (q, k, v), outs_ref, tols, strict=False):
        assert out.shape == (B, H, N, D) and out.is_contiguous(), name
        _check(name, out, ref, tol)
    _check("dx", dx, grads_ref[0], tols[3])
    _check("dweight", dweight, grads_ref[1], tols[4])
    if has_bias:
        _check("dbias", dbias, grads_ref[2], tols[5])
    else:
        assert dbias is None


@pytest.mark.parametrize("dtype, path", DTYPE_PATHS, indirect=["path"])
@pytest.mark.parametrize("shape", QKV_SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_qkv_matches_reference(device, dtype, path, shape, has_bias):
    _run_qkv(*shape, dtype, has_bias, False, "contiguous", "packed", device)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("x_layout", ["sliced", "transposed", "channels_first"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "mixed"])
def test_qkv_layouts(device, dtype, x_layout, grad_layout):
    _run_qkv(2, 17, 72, 3, dtype, True, False, x_layout, grad_layout, device)


@pytest.mark.parametrize("path", ["tma", "pointer"], indirect=True)
def test_qkv_tf32(device, path):
    _run_qkv(2, 17, 72, 3, F32, True, True, "contiguous", "packed", device)


def test_qkv_bwd_reads_gradients_in_place(monkeypatch, device):
    """dQKV is never gathered: the kernels get the caller's dq, dk, dv storage, and x (B, N, C) whose (B, N) do not
    merge is read through the split row index instead of a copy."""
    B, N, C, H = 2, 17, 24, 2
    seen = []
    original = linear.kernel_args

    def spy(a, b, c, *args, **kwargs):
        seen.append((a, b, kwargs.get("dqkv")))
        return original(a, b, c, *args, **kwargs)

    monkeypatch.setattr(linear, "kernel_args", spy)
    x = _layout(randn(B, N, C, dtype=F32, device=device), "transposed")
    grads = _grads(B, N, H, C // H, F32, "packed", device)
    linear.qkv_bwd(*grads, x, randn(3 * C, C, dtype=F32, device=device), True, False)
    assert len(seen) == 2
    for _a, _b, dqkv in seen:
        assert [t.data_ptr() for t in dqkv] == [g.data_ptr() for g in grads]
    b_operand = seen[1][1].args
    assert b_operand[0].data_ptr() == x.data_ptr() and b_operand[1] == N  # rows read as (b, t) = (r // N, r % N)


# ----------------------------------------------------------------------------------------------------
# GELU-MLP: launchers
# ----------------------------------------------------------------------------------------------------
MLP_SHAPES = [(34, 72, 96, 72), (1, 16, 64, 24), (197, 40, 160, 40)]  # (M, C, Hd, C_out)


def _run_mlp(M, C, Hd, C_out, dtype, biases, approximate, allow_tf32, x_layout, device, dy_layout="contiguous"):
    x = _layout(randn(M, C, dtype=dtype, device=device), x_layout)
    w1 = randn(Hd, C, dtype=dtype, device=device, scale=C**-0.5)
    w2 = randn(C_out, Hd, dtype=dtype, device=device, scale=Hd**-0.5)
    b1 = randn(Hd, dtype=dtype, device=device) if biases in ("both", "fc1") else None
    b2 = randn(C_out, dtype=dtype, device=device) if biases in ("both", "fc2") else None
    dy = _layout(randn(M, C_out, dtype=dtype, device=device), dy_layout)

    y, hidden = linear.mlp_fwd(x, w1, b1, w2, b2, approximate, allow_tf32)
    grads = linear.mlp_bwd(dy, x, w1, w2, hidden, b1 is not None, b2 is not None, approximate, allow_tf32)
    y_ref, grads_ref = _mlp_reference(x, w1, b1, w2, b2, approximate, dy)
    tols = _mlp_tolerances(allow_tf32, x, w1, b1, w2, b2, approximate, dy, y_ref, grads_ref)
    _check("y", y, y_ref, tols[0])
    hidden_ref = x.double() @ w1.double().t() + (b1.double() if b1 is not None else 0.0)
    tol = TOLERANCES[dtype]
    if dtype == F32 and allow_tf32:
        bias_term = b1.double() if b1 is not None else 0.0
        model = tf32_model(torch.matmul, x.double(), w1.double().t()).to(hidden_ref.device)  # the model runs on CPU
        tol = tf32_tolerance(model + bias_term, hidden_ref)
    _check("hidden", hidden, hidden_ref, tol)
    names = ("dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias")
    for name, g, ref, t in zip(names, grads, grads_ref, tols[1:], strict=True):
        if ref is None:
            assert g is None, name
        else:
            _check(name, g, ref, t)


@pytest.mark.parametrize("dtype, path", DTYPE_PATHS, indirect=["path"])
@pytest.mark.parametrize("shape", MLP_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("biases", ["both", "none"])
def test_mlp_matches_reference(device, dtype, path, shape, approximate, biases):
    _run_mlp(*shape, dtype, biases, approximate, False, "contiguous", device)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("x_layout", ["sliced", "channels_first"])
@pytest.mark.parametrize("biases", ["fc1", "fc2"])
def test_mlp_layouts(device, dtype, x_layout, biases):
    _run_mlp(34, 72, 96, 72, dtype, biases, "none", False, x_layout, device, dy_layout="channels_first")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("path", ["tma", "pointer"], indirect=True)
def test_mlp_tf32(device, approximate, path):
    _run_mlp(34, 72, 96, 72, F32, "both", approximate, True, "contiguous", device)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(2u) -> inf, on purpose
def test_gelu_saturates_without_nan(device):
    """Pre-activations far out in both tails (tanh's exp(2u) overflows to inf there): finite, and still exact."""
    M, C, Hd = 5, 16, 32
    x = randn(M, C, dtype=F32, device=device) * 30.0
    w1 = randn(Hd, C, dtype=F32, device=device)
    w2 = randn(C, Hd, dtype=F32, device=device, scale=Hd**-0.5)
    dy = randn(M, C, dtype=F32, device=device)
    for approximate in ("none", "tanh"):
        y, hidden = linear.mlp_fwd(x, w1, None, w2, None, approximate, False)
        assert hidden.abs().max() > 100
        grads = linear.mlp_bwd(dy, x, w1, w2, hidden, False, False, approximate, False)
        y_ref, grads_ref = _mlp_reference(x, w1, None, w2, None, approximate, dy)
        _check(f"y ({approximate})", y, y_ref, TOLERANCES[F32])
        for i, name in ((0, "dx"), (1, "dfc1_weight"), (3, "dfc2_weight")):
            _check(f"{name} ({approximate})", grads[i], grads_ref[i], TOLERANCES[F32])


# ----------------------------------------------------------------------------------------------------
# split-K (the weight-gradient products; `linear.WEIGHT_GRAD_SPLIT_K` turns it on in the ops)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("split_k", [2, 3, 5])
def test_split_k_weight_gradient(device, dtype, split_k):
    """dW1 = dhidden^T @ x, K = 197 tokens cut into slices of whole BLOCK_K tiles: 2 -> 2 slices, 3 -> 3 (the last
    5 tokens long), 5 -> 4 (fewer than asked) under the interpreter's BLOCK_K = 32."""
    M, C, Hd = 197, 24, 40
    dhidden = _layout(randn(M, Hd, dtype=dtype, device=device), "sliced")
    x = randn(M, C, dtype=dtype, device=device)
    dw = vit_triton.alloc(Hd, C, like=x)
    linear.launch(
        linear.Operand(dhidden, transpose=True), linear.Operand(x), dw, Hd, C, M, dtype, False, split_k=split_k
    )
    _check("dW1", dw, dhidden.double().t() @ x.double(), TOLERANCES[dtype])


def test_split_k_qkv_weight_gradient_reads_dqkv_in_place(device):
    """The QKV weight gradient dW = dQKV^T @ x, dQKV read from packed dq, dk, dv (A_DQKV_T), in 3 slices."""
    B, N, C, H = 2, 45, 24, 2
    grads = _grads(B, N, H, C // H, F32, "packed", device)
    x = randn(B * N, C, dtype=F32, device=device)
    dw = vit_triton.alloc(3 * C, C, like=x)
    linear.launch(
        None, linear.Operand(x), dw, 3 * C, C, B * N, F32, False, split_k=3,
        a_mode=linear.A_DQKV_T, dqkv=grads, n_tok=N, qkv_c=C, qkv_d=C // H,
    )  # fmt: skip
    dqkv = torch.cat([g.transpose(1, 2).reshape(B * N, C) for g in grads], 1).double()
    _check("dW", dw, dqkv.t() @ x.double(), TOLERANCES[F32])


# ----------------------------------------------------------------------------------------------------
# through autograd: the custom ops (vit_kernels/ops/*.py) with backend "triton"
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("has_bias", [True, False])
def test_qkv_autograd(device, dtype, has_bias):
    B, N, C, H = 2, 17, 72, 3
    x = _layout(randn(B, N, C, dtype=dtype, device=device), "sliced").requires_grad_(True)
    weight = randn(3 * C, C, dtype=dtype, device=device, scale=C**-0.5).requires_grad_(True)
    bias = randn(3 * C, dtype=dtype, device=device).requires_grad_(True) if has_bias else None
    grads = _grads(B, N, H, C // H, dtype, "packed", device)
    q, k, v = QKV.forward_op(x, weight, bias, H, False, "triton")
    torch.autograd.backward((q, k, v), grads)
    outs_ref, grads_ref = _qkv_reference(x, weight, bias, H, grads)
    tol = TOLERANCES[dtype]
    for name, out, ref in zip("qkv", (q, k, v), outs_ref, strict=True):
        _check(name, out, ref, tol)
    for name, t, ref in zip(("x", "weight", "bias"), (x, weight, bias), grads_ref, strict=True):
        if t is not None:
            _check(f"d{name}", t.grad, ref, tol)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_mlp_autograd(device, dtype, approximate, has_bias):
    M, C, Hd = 34, 72, 96
    x = _layout(randn(M, C, dtype=dtype, device=device), "sliced").requires_grad_(True)
    w1 = randn(Hd, C, dtype=dtype, device=device, scale=C**-0.5).requires_grad_(True)
    w2 = randn(C, Hd, dtype=dtype, device=device, scale=Hd**-0.5).requires_grad_(True)
    b1 = randn(Hd, dtype=dtype, device=device).requires_grad_(True) if has_bias else None
    b2 = randn(C, dtype=dtype, device=device).requires_grad_(True) if has_bias else None
    dy = randn(M, C, dtype=dtype, device=device)
    y, _hidden = MLP.forward_op(x, w1, b1, w2, b2, approximate, False, True, "triton")
    y.backward(dy)
    y_ref, grads_ref = _mlp_reference(x, w1, b1, w2, b2, approximate, dy)
    tols = _mlp_tolerances(False, x, w1, b1, w2, b2, approximate, dy, y_ref, grads_ref)
    _check("y", y, y_ref, tols[0])
    names = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    for name, t, ref, tol in zip(names, (x, w1, b1, w2, b2), grads_ref, tols[1:], strict=True):
        if t is not None:
            _check(f"d{name}", t.grad, ref, tol)


# ----------------------------------------------------------------------------------------------------
# vk.gelu_mlp writes the pre-activation only for autograd
# ----------------------------------------------------------------------------------------------------
def _spy_mlp_fwd(monkeypatch) -> list:
    """linear.mlp_fwd (the kernel module's launcher the op looks up at call time) wrapped: the returned list gets
    (save_hidden, hidden returned) of each call."""
    calls, original = [], linear.mlp_fwd

    def spy(*args, save_hidden=True, **kwargs):
        y, hidden = original(*args, save_hidden=save_hidden, **kwargs)
        calls.append((save_hidden, hidden))
        return y, hidden

    monkeypatch.setattr(linear, "mlp_fwd", spy)
    return calls


# How the call meets autograd: the first two ask for no gradient (fc1 need not store hidden), the last two do.
AUTOGRAD_MODES = ["no_grad", "inputs_without_grad", "x_requires_grad", "fc2_bias_requires_grad"]


@pytest.mark.parametrize("dtype, path", DTYPE_PATHS, indirect=["path"])
@pytest.mark.parametrize("mode", AUTOGRAD_MODES)
def test_gelu_mlp_writes_the_pre_activation_only_for_autograd(monkeypatch, device, highest_precision, dtype, path,
                                                              mode):  # fmt: skip
    """vk.gelu_mlp on triton, x (1, 197, C): without autograd (no_grad, or no input requiring grad) mlp_fwd gets
    save_hidden=False and returns no hidden; both fc1 kernels (TMA and pointer) then allocate GELU(hidden) only
    (one (M, Hd) buffer instead of two: STORE_PRE off). With an input requiring grad, hidden is saved and
    backward's gradients match. y matches the float64 reference either way (GELU(hidden) is NaN-poisoned before
    fc1 writes it, so a store the switch skipped wrongly would show). Exact fp32 (highest precision) runs the pointer
    kernel on either path."""
    B, N, C, Hd, C_out = 1, 197, 40, 160, 40
    M, grad = B * N, mode.endswith("requires_grad")
    shapes = []

    def recording_alloc(*shape, like, dtype=None):
        shapes.append(shape)
        return nan_alloc(*shape, like=like, dtype=dtype)

    monkeypatch.setattr(vit_triton, "alloc", recording_alloc)
    calls = _spy_mlp_fwd(monkeypatch)
    x = randn(B, N, C, dtype=dtype, device=device)
    w1 = randn(Hd, C, dtype=dtype, device=device, scale=C**-0.5)
    b1 = randn(Hd, dtype=dtype, device=device)
    w2 = randn(C_out, Hd, dtype=dtype, device=device, scale=Hd**-0.5)
    b2 = randn(C_out, dtype=dtype, device=device)
    dy = randn(B, N, C_out, dtype=dtype, device=device)
    # under no_grad a weight requires grad (as a model's do), which must not matter
    leaf = {"no_grad": w1, "x_requires_grad": x, "fc2_bias_requires_grad": b2}.get(mode)
    if leaf is not None:
        leaf.requires_grad_(True)
    with torch.set_grad_enabled(mode != "no_grad"):
        y = vk.gelu_mlp(x, w1, b1, w2, b2, backend="triton")

    assert [(save, None if h is None else tuple(h.shape)) for save, h in calls] == [(grad, (M, Hd) if grad else None)]
    assert shapes.count((M, Hd)) == (2 if grad else 1)
    assert y.requires_grad == grad
    flat = [t.reshape(M, -1) for t in (x, dy)]
    y_ref, grads_ref = _mlp_reference(flat[0], w1, b1, w2, b2, "none", flat[1])
    tols = _mlp_tolerances(False, flat[0], w1, b1, w2, b2, "none", flat[1], y_ref, grads_ref)
    _check("y", y.reshape(M, C_out), y_ref, tols[0])
    if grad:
        y.backward(dy)
        i = 0 if leaf is x else 4  # dx or dfc2_bias in grads_ref, tols[i + 1]
        _check(f"gradient of {mode[: -len('_requires_grad')]}", leaf.grad.reshape(grads_ref[i].shape), grads_ref[i],
               tols[i + 1])  # fmt: skip


@pytest.mark.parametrize("dtype, path", DTYPE_PATHS, indirect=["path"])
@pytest.mark.parametrize("x_layout", ["contiguous", "transposed"])
def test_qkv_fwd_packed(device, dtype, path, x_layout):
    """qkv_fwd(packed=True): q, k, v as the slices of one NaN-poisoned (B, N, 3, H, D) buffer, written by one plain
    GEMM; an x whose (B, N) do not merge gets the head-split kernel's contiguous q, k, v instead. Right either way."""
    B, N, C, H = 2, 17, 72, 3
    x = _layout(randn(B, N, C, dtype=dtype, device=device), x_layout)
    weight = randn(3 * C, C, dtype=dtype, device=device, scale=C**-0.5)
    bias = randn(3 * C, dtype=dtype, device=device)
    q, k, v = linear.qkv_fwd(x, weight, bias, H, False, packed=True)
    if x_layout == "contiguous":
        step = C * q.element_size()
        assert [t.data_ptr() - q.data_ptr() for t in (q, k, v)] == [0, step, 2 * step]
        assert q.stride() == (N * 3 * C, C // H, 3 * C, 1)
    else:
        assert all(t.is_contiguous() for t in (q, k, v))
    outs_ref, _ = _qkv_reference(x, weight, bias, H, _grads(B, N, H, C // H, dtype, "contiguous", device))
    for name, out, ref in zip("qkv", (q, k, v), outs_ref, strict=True):
        _check(name, out, ref, TOLERANCES[dtype])


def test_eager_fused_qkv_returns_slices_of_one_buffer(device):
    """vk.fused_qkv on triton, eager: q, k, v are views of one (B, N, 3, H, D) tensor (as the reference's unbind
    returns them), and in-place edits are refused as PyTorch refuses them on unbind's outputs."""
    import vit_kernels as vk

    B, N, C, H = 2, 5, 96, 3
    x = randn(B, N, C, dtype=BF16, device=device).requires_grad_(True)
    w = randn(3 * C, C, dtype=BF16, device=device).requires_grad_(True)
    q, k, v = vk.fused_qkv(x, w, None, H, backend="triton")
    assert k.data_ptr() - q.data_ptr() == C * q.element_size() and q.stride()[2] == 3 * C
    with pytest.raises(RuntimeError, match="view"):
        q.mul_(2)
