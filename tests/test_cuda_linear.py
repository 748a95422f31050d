"""CUDA C++ GEMMs (csrc/gemm.cu via vit_kernels/cuda/linear.py): fused QKV and GELU-MLP, forward and every grad.

GPU tests compare against the float64 reference (vit_kernels.reference) by relative error with per-dtype
tolerances, on odd token counts (M = B*N never a multiple of the 128-row tile), non-contiguous inputs and
gradient views, with every output buffer NaN-poisoned first so an unwritten element fails the test.
CPU tests check the error paths and the launchers' preconditions, which run before any CUDA call.
"""

import contextlib
import unittest.mock

import pytest
import torch
from conftest import TOLERANCES, rel_error

import vit_kernels as vk
from vit_kernels import cuda as vit_cuda
from vit_kernels import reference
from vit_kernels.cuda import check_like, linear
from vit_kernels.triton import packed_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOAT, HALF = 0, 1  # DType codes of fp32 and fp16 (csrc/common.cuh)


def _extension():
    try:
        from vit_kernels import _C
    except ImportError as exc:
        pytest.skip(f"vit_kernels._C not built here ({exc})")
    return _C


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the wrappers allocate starts as NaN: a skipped tile, row or column cannot pass."""

    def nan_empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(vit_cuda, "empty", nan_empty)


def _leaf(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    # .to() returns t itself when nothing changes, so a strided view keeps its layout.
    if t is None:
        return None
    return t.detach().to(device="cuda", dtype=dtype or t.dtype).requires_grad_(True)


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_error(out, ref)
    assert err <= TOLERANCES[dtype], f"{name}: relative error {err:.3g} > {TOLERANCES[dtype]:.1g} ({dtype})"


def _x_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x (..., C) in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":  # unit stride along tokens, not channels: the wrapper must copy
        return x.transpose(-2, -1).contiguous().transpose(-2, -1)
    if layout == "sliced":  # row stride C + 8, read in place by the kernels
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 8, dtype=x.dtype, device=x.device)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    raise ValueError(layout)


# ----------------------------------------------------------------------------------------------------
# GPU parity: fused QKV
# ----------------------------------------------------------------------------------------------------
# (B, N, C, H). 5 x 197 = 985 tokens: the bias sum splits its rows three ways (256 rows or more each), the last
# split shorter than the others.
QKV_SHAPES = [(1, 1, 64, 2), (2, 197, 72, 9), (3, 50, 192, 3), (1, 257, 768, 12), (5, 197, 72, 9)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_fused_qkv_matches_reference(poisoned, dtype, shape, has_bias, layout):
    B, N, C, H = shape
    # Inputs are rounded to dtype first: the float64 reference sees exactly what the kernel sees.
    x = torch.randn(B, N, C).to(dtype)
    w = (torch.randn(3 * C, C) * C**-0.5).to(dtype)
    b = torch.randn(3 * C).to(dtype) if has_bias else None
    grads = [torch.randn(B, H, N, C // H, device="cuda").to(dtype) for _ in range(3)]

    ref_inputs = [_leaf(t, torch.float64) for t in (x, w, b)]
    ref_out = reference.fused_qkv(*ref_inputs, H)
    torch.autograd.backward(ref_out, [g.double() for g in grads])

    xc = _leaf(_x_layout(x.cuda(), layout))
    wc, bc = _leaf(w), _leaf(b)
    out = vk.fused_qkv(xc, wc, bc, H, backend="cuda")
    torch.autograd.backward(out, grads)

    # the eager path (ops/fused_qkv.py's eager forward, PACKED_QKV): q, k, v are the slices of one (B, N, 3, H, D)
    # buffer
    assert packed_qkv(*out) is not None, "q, k, v must be the slices of one packed buffer"
    for name, o, r in zip("qkv", out, ref_out):
        _check(name, o, r, dtype)
    _check("dx", xc.grad, ref_inputs[0].grad, dtype)
    _check("dweight", wc.grad, ref_inputs[1].grad, dtype)
    if has_bias:
        _check("dbias", bc.grad, ref_inputs[2].grad, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_layout", ["packed", "mixed"])
def test_qkv_bwd_reads_gradient_views(poisoned, dtype, grad_layout):
    """dq, dk, dv as views of one packed (B, N, 3, H, D) tensor (read in place), or in mixed layouts (copied)."""
    B, N, C, H = 2, 197, 72, 9
    x = torch.randn(B, N, C, device="cuda").to(dtype)
    w = (torch.randn(3 * C, C, device="cuda") * C**-0.5).to(dtype)
    packed = torch.randn(B, N, 3, H, C // H, device="cuda").to(dtype)
    grads = [packed[:, :, i].transpose(1, 2) for i in range(3)]  # (B, H, N, D), strides (3NC, D, 3C, 1)
    if grad_layout == "mixed":
        grads[1] = grads[1].contiguous()
    in_place = linear._heads(*grads)[0].data_ptr() == grads[0].data_ptr()
    assert in_place == (grad_layout == "packed"), "the test must exercise the path it names"

    ref_inputs = [_leaf(t, torch.float64) for t in (x, w)]
    ref_out = reference.fused_qkv(*ref_inputs, None, H)
    torch.autograd.backward(ref_out, [g.double() for g in grads])
    # dbias = column sums of dQKV (B*N, 3C); column j = (which, head, d) sums over (b, t).
    ref_dbias = torch.cat([g.double().sum(dim=(0, 2)).reshape(C) for g in grads])

    dx, dw, dbias = linear.qkv_bwd(*grads, x, w, True, False)
    _check("dx", dx, ref_inputs[0].grad, dtype)
    _check("dweight", dw, ref_inputs[1].grad, dtype)
    _check("dbias", dbias, ref_dbias, dtype)


# ----------------------------------------------------------------------------------------------------
# GPU parity: GELU-MLP
# ----------------------------------------------------------------------------------------------------
# (M, C, Hd, C_out); M = 600: the bias sums split their rows two ways.
MLP_SHAPES = [(1, 8, 16, 8), (394, 72, 288, 72), (5, 192, 768, 192), (300, 768, 3072, 768), (600, 72, 288, 72)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_gelu_mlp_matches_reference(poisoned, dtype, shape, has_bias, approximate, layout):
    M, C, Hd, C_out = shape
    x = torch.randn(M, C).to(dtype)
    w1, w2 = (torch.randn(Hd, C) * C**-0.5).to(dtype), (torch.randn(C_out, Hd) * Hd**-0.5).to(dtype)
    b1, b2 = (torch.randn(Hd).to(dtype), torch.randn(C_out).to(dtype)) if has_bias else (None, None)
    dy = torch.randn(M, C_out, device="cuda").to(dtype)

    ref_inputs = [_leaf(t, torch.float64) for t in (x, w1, b1, w2, b2)]
    ref_out = reference.gelu_mlp(*ref_inputs, approximate)
    ref_out.backward(dy.double())

    xc = _leaf(_x_layout(x.cuda(), layout))
    params = [_leaf(t) for t in (w1, b1, w2, b2)]
    out = vk.gelu_mlp(xc, *params, approximate=approximate, backend="cuda")
    out.backward(dy)

    _check("y", out, ref_out, dtype)
    names = ["dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"]
    for name, got, ref in zip(names, [xc, *params], ref_inputs):
        if ref is not None:
            _check(name, got.grad, ref.grad, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlp_fwd_saves_pre_activation(poisoned, dtype):
    """hidden (saved for backward) is x @ fc1^T + b1 before GELU, contiguous (M, Hd)."""
    M, C, Hd = 197, 64, 256
    x = torch.randn(M, C, device="cuda", dtype=dtype)
    w1, b1 = torch.randn(Hd, C, device="cuda", dtype=dtype) * C**-0.5, torch.randn(Hd, device="cuda", dtype=dtype)
    w2 = torch.randn(C, Hd, device="cuda", dtype=dtype) * Hd**-0.5
    _y, hidden = linear.mlp_fwd(x, w1, b1, w2, None, "none", False)
    assert hidden.is_contiguous() and hidden.shape == (M, Hd)
    _check("hidden", hidden, x.double() @ w1.double().t() + b1.double(), dtype)


# ----------------------------------------------------------------------------------------------------
# GPU parity: the Hopper GEMMs (csrc/gemm_sm90_impl.cuh, CUTLASS 3: TMA + warp-specialised wgmma)
# ----------------------------------------------------------------------------------------------------
def _sm90_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs compute capability 9.0 for the sm_90a GEMMs, got {torch.cuda.get_device_capability()}"
    try:
        from vit_kernels import _C
    except ImportError as exc:
        return f"vit_kernels._C not built here ({exc})"
    if not _C.build_info().get("sm90_gemm_built"):
        return f"this _C has no sm_90a GEMMs: {_C.build_info().get('sm90_gemm')}"
    return None


needs_sm90 = pytest.mark.skipif(_sm90_skip_reason() is not None, reason=str(_sm90_skip_reason()))
HALVES = [torch.float16, torch.bfloat16]


def _check_against_torch(name, out, ref, torch_out, dtype):
    """The fixed per-dtype tolerance, and FlashAttention's rule: at most 2x the error of PyTorch's own ops in the
    same dtype on the same inputs (floored, where torch happens to be near exact)."""
    _check(name, out, ref, dtype)
    err, torch_err = rel_error(out, ref), rel_error(torch_out, ref)
    assert err <= max(2 * torch_err, 1e-4), f"{name}: error {err:.3g} > 2x torch's {torch_err:.3g} ({dtype})"


# (M, C, Hd, C_out): M = 296 leaves a ragged 128-row tile (and a ragged K in the weight gradients, K = M); C = 72
# is narrower than one 256-column tile; (1, 8, 16, 8) is a single element row with K = 8.
SM90_MLP_SHAPES = [(296, 768, 3072, 768), (296, 72, 288, 72), (1, 8, 16, 8)]


@needs_sm90
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", SM90_MLP_SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_sm90_gelu_mlp_matches_reference(poisoned, dtype, shape, has_bias, approximate, layout):
    """Every sm_90a epilogue through gelu_mlp: bias + GELU + aux (fc1), bias (fc2), d-GELU with the aux load
    (dfc1 path), the NN GEMM (dx) and the stream-K weight gradients (A transposed), bias sums."""
    M, C, Hd, C_out = shape
    x = torch.randn(M, C).to(dtype)
    w1, w2 = (torch.randn(Hd, C) * C**-0.5).to(dtype), (torch.randn(C_out, Hd) * Hd**-0.5).to(dtype)
    b1, b2 = (torch.randn(Hd).to(dtype), torch.randn(C_out).to(dtype)) if has_bias else (None, None)
    dy = torch.randn(M, C_out, device="cuda").to(dtype)
    assert linear.gemm_path(dy.device, dtype).startswith("sm_90a"), linear.gemm_path(dy.device, dtype)

    ref_inputs = [_leaf(t, torch.float64) for t in (x, w1, b1, w2, b2)]
    ref_out = reference.gelu_mlp(*ref_inputs, approximate)
    ref_out.backward(dy.double())
    torch_inputs = [_leaf(t) for t in (x, w1, b1, w2, b2)]
    torch_out = vk.gelu_mlp(*torch_inputs, approximate=approximate, backend="torch")
    torch_out.backward(dy)

    xc = _leaf(_x_layout(x.cuda(), layout))
    params = [_leaf(t) for t in (w1, b1, w2, b2)]
    out = vk.gelu_mlp(xc, *params, approximate=approximate, backend="cuda")
    out.backward(dy)

    _check_against_torch("y", out, ref_out, torch_out, dtype)
    names = ["dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"]
    for name, got, ref, tt in zip(names, [xc, *params], ref_inputs, torch_inputs):
        if ref is not None:
            _check_against_torch(name, got.grad, ref.grad, tt.grad, dtype)
    _y, hidden = linear.mlp_fwd(xc.detach(), *(p.detach() if p is not None else None for p in params), approximate,
                                False)  # fmt: skip
    ref_hidden = x.cuda().double() @ w1.cuda().double().t() + (b1.cuda().double() if has_bias else 0)
    _check("hidden (the aux store)", hidden, ref_hidden, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SM90_MLP_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_fwd_without_autograd_writes_no_pre_activation(poisoned, dtype, shape, approximate):
    """save_hidden=False (no autograd): y as with it, hidden None and never allocated. On an H100 / H200 in 16 bits
    fc1 is the sm_90a product without the aux store (linear_bias_gelu_act), elsewhere the mma.sync / SIMT epilogue
    with a null pre-activation; both write act, whose NaN poison y would carry."""
    M, C, Hd, C_out = shape
    x = torch.randn(M, C, device="cuda").to(dtype)
    w1, b1 = (torch.randn(Hd, C, device="cuda") * C**-0.5).to(dtype), torch.randn(Hd, device="cuda").to(dtype)
    w2, b2 = (torch.randn(C_out, Hd, device="cuda") * Hd**-0.5).to(dtype), torch.randn(C_out, device="cuda").to(dtype)
    y, hidden = linear.mlp_fwd(x, w1, b1, w2, b2, approximate, False, save_hidden=False)
    assert hidden is None
    ref = reference.gelu_mlp(*(t.double() for t in (x, w1, b1, w2, b2)), approximate)
    _check("y without hidden", y, ref, dtype)
    y_saved, _hidden = linear.mlp_fwd(x, w1, b1, w2, b2, approximate, False)
    assert torch.equal(y, y_saved), "the forward without the pre-activation must give the same y"


@needs_sm90
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", SM90_MLP_SHAPES)
@pytest.mark.parametrize("act_in_epilogue, dfc1_bias_in_epilogue", [(True, True), (True, False), (False, True),
                                                                    (False, False)])  # fmt: skip
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_sm90_dgelu_epilogue_outputs_match_reference(
    poisoned, monkeypatch, dtype, shape, act_in_epilogue, dfc1_bias_in_epilogue, approximate
):
    """mlp_bwd on sm_90a with act = gelu(hidden) and dfc1_bias's per-tile partial sums from the d-GELU epilogue (the
    default, sm90::dgelu_act) or from the separate passes they replaced (a row pass, the two-pass column sum), each
    way, for both GELU forms: a ragged last row tile, N = 288 and 16 not multiples of the 256-column tile, M = 1;
    every output against float64, act too (hidden near GELU's bend), the scratch NaN-poisoned like the outputs."""
    monkeypatch.setattr(linear, "SM90_ACT_IN_EPILOGUE", act_in_epilogue)
    monkeypatch.setattr(linear, "SM90_DFC1_BIAS_IN_EPILOGUE", dfc1_bias_in_epilogue)
    acts = []
    monkeypatch.setattr(vit_cuda, "empty", _recording(vit_cuda.empty, acts))
    M, C, Hd, C_out = shape
    x = torch.randn(M, C, device="cuda").to(dtype)
    w1 = (torch.randn(Hd, C, device="cuda") * C**-0.5).to(dtype)
    w2 = (torch.randn(C_out, Hd, device="cuda") * Hd**-0.5).to(dtype)
    hidden = (x.float() @ w1.float().t() + torch.randn(Hd, device="cuda")).to(dtype)
    dy = torch.randn(M, C_out, device="cuda").to(dtype)
    dx, dw1, db1, dw2, db2 = linear.mlp_bwd(dy, x, w1, w2, hidden, True, True, approximate, False)
    xd, w1d, w2d, hd, dyd = (t.double() for t in (x, w1, w2, hidden, dy))
    dh = torch.ops.aten.gelu_backward(dyd @ w2d, hd, approximate=approximate)
    act = torch.nn.functional.gelu(hd, approximate=approximate)
    refs = {"dx": dh @ w1d, "dfc1_weight": dh.t() @ xd, "dfc1_bias": dh.sum(0), "dfc2_weight": dyd.t() @ act,
            "dfc2_bias": dyd.sum(0)}  # fmt: skip
    where = f"{approximate} GELU; act in the epilogue: {act_in_epilogue}, dfc1_bias: {dfc1_bias_in_epilogue}"
    for (name, ref), got in zip(refs.items(), (dx, dw1, db1, dw2, db2), strict=True):
        _check(f"{name} ({where})", got, ref, dtype)
    # the act buffer itself: the second (M, Hd) allocation of mlp_bwd (dhidden, act)
    _check(f"act ({where})", [t for t in acts if t.shape == (M, Hd)][1], act, dtype)


def _recording(empty, out: list):
    def record(shape, like, dtype=None):
        out.append(empty(shape, like, dtype))
        return out[-1]

    return record


@needs_sm90
@pytest.mark.parametrize("variant", ["cooperative_cluster1x1", "pingpong_128x128", "cooperative_256x128_cluster1x2"])
@pytest.mark.parametrize("MNK", [(296, 2304, 768), (296, 72, 3072), (1, 8, 8)])
def test_sm90_linear_bias_variants_match_reference(poisoned, variant, MNK):
    """The configuration variants probe_gemm.py times beside the shipped linear_bias (bf16 only) compute the same
    product: ragged M, N narrower than a tile, a single row."""
    assert variant in linear.sm90_variants()
    M, N, K = MNK
    a = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") * K**-0.5).to(torch.bfloat16)
    b = torch.randn(N, device="cuda").to(torch.bfloat16)
    out = linear.linear_fwd_variant(a, w, b, variant)
    ref = a.double() @ w.double().t() + b.double()
    _check_against_torch(variant, out, ref, torch.nn.functional.linear(a, w, b), torch.bfloat16)
    with pytest.raises(ValueError, match="built for bf16 only"):
        linear.linear_fwd_variant(a.half(), w.half(), b.half(), variant)
    with pytest.raises(ValueError, match="unknown linear_bias variant 'nope'"):
        linear.linear_fwd_variant(a, w, b, "nope")


# (B, N, C, H): B * N = 296 (a ragged tile), one token, and a narrow C.
SM90_QKV_SHAPES = [(2, 148, 768, 12), (1, 1, 64, 2), (3, 50, 192, 3)]


@needs_sm90
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", SM90_QKV_SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("grad_layout", ["separate", "packed"])
def test_sm90_fused_qkv_matches_reference(poisoned, dtype, shape, has_bias, grad_layout):
    """qkv_fwd (bias GEMM into (B*N, 3C) scratch, then the split pass) and qkv_bwd (dQKV read in place when packed,
    else packed by one copy; the NN GEMM for dx, stream-K for dweight, the column sum for dbias)."""
    B, N, C, H = shape
    D = C // H
    x = torch.randn(B, N, C).to(dtype)
    w = (torch.randn(3 * C, C) * C**-0.5).to(dtype)
    b = torch.randn(3 * C).to(dtype) if has_bias else None
    if grad_layout == "packed":
        packed = torch.randn(B, N, 3, H, D, device="cuda").to(dtype)
        grads = [packed[:, :, i].transpose(1, 2) for i in range(3)]
        assert linear._packed_qkv(*grads) is not None, "the test must exercise the in-place path"
    else:
        grads = [torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(3)]

    ref_inputs = [_leaf(t, torch.float64) for t in (x, w, b)]
    ref_out = reference.fused_qkv(*ref_inputs, H)
    torch.autograd.backward(ref_out, [g.double() for g in grads])
    torch_inputs = [_leaf(t) for t in (x, w, b)]
    torch.autograd.backward(vk.fused_qkv(*torch_inputs, H, backend="torch"), grads)

    inputs = [_leaf(t) for t in (x, w, b)]
    out = vk.fused_qkv(*inputs, H, backend="cuda")
    torch.autograd.backward(out, grads)

    assert packed_qkv(*out) is not None, "the eager path returns the slices of one packed buffer"
    for name, o, r in zip("qkv", out, ref_out):
        _check(name, o, r, dtype)
    for name, got, ref, tt in zip(["dx", "dweight", "dbias"], inputs, ref_inputs, torch_inputs):
        if ref is not None:
            _check_against_torch(name, got.grad, ref.grad, tt.grad, dtype)
    # the custom op (what torch.compile traces) returns three contiguous tensors: the split pass
    raw = torch.ops.vit_kernels.qkv_fwd(*(t.detach() if t is not None else None for t in inputs), H, False, "cuda")
    for name, o, r in zip("qkv", raw, ref_out):
        assert o.is_contiguous(), f"{name} of the custom op must be contiguous (B, H, N, D)"
        _check(f"custom op {name}", o, r, dtype)


# (M, K, N): a ragged 128-row tile and a narrow N; one row.
LINEAR_SHAPES = [(296, 768, 768), (1, 64, 72), (197, 72, 192)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("gemms", ["auto", "mma.sync"])
def test_linear_with_residual_matches_reference(poisoned, monkeypatch, dtype, shape, has_bias, gemms):
    """linear_fwd (bias + residual epilogue: CUTLASS's source C with beta = 1 on sm_90a, EpiBias elsewhere) and
    linear_bwd (da, dweight, dbias), the block ops' projection, with a residual read through a row stride of N + 8.
    "mma.sync" forces csrc/gemm.cu's kernels where the sm_90a GEMMs would run."""
    if gemms == "mma.sync":
        monkeypatch.setattr(linear, "_sm90", lambda t: False)
    M, K, N = shape
    a = torch.randn(M, K, device="cuda").to(dtype)
    w = (torch.randn(N, K, device="cuda") * K**-0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype) if has_bias else None
    residual = torch.randn(M, N + 8, device="cuda").to(dtype)[:, :N]
    dout = torch.randn(M, N, device="cuda").to(dtype)
    out = linear.linear_fwd(a, w, b, residual)
    a64, w64, r64 = a.double(), w.double(), residual.double()
    ref = a64 @ w64.t() + r64 + (b.double() if has_bias else 0)
    _check("out", out, ref, dtype)
    da, dw, db = linear.linear_bwd(dout, a, w, has_bias)
    _check("da", da, dout.double() @ w64, dtype)
    _check("dweight", dw, dout.double().t() @ a64, dtype)
    if has_bias:
        _check("dbias", db, dout.double().sum(0), dtype)
    else:
        assert db is None


@needs_sm90
@pytest.mark.parametrize("dtype", HALVES)
def test_sm90_weight_gradients_are_deterministic(dtype):
    """The stream-K weight gradients reduce their K slices in a fixed order (no atomics): two runs are bitwise
    equal. 8192 tokens at ViT-B widths: dfc1_weight has 72 output tiles for 132 SMs, so K is split."""
    M, C, Hd = 8192, 768, 3072
    x = torch.randn(M, C, device="cuda", dtype=dtype)
    w1 = torch.randn(Hd, C, device="cuda", dtype=dtype) * C**-0.5
    w2 = torch.randn(C, Hd, device="cuda", dtype=dtype) * Hd**-0.5
    dy = torch.randn(M, C, device="cuda", dtype=dtype)
    _y, hidden = linear.mlp_fwd(x, w1, None, w2, None, "none", False)
    runs = [linear.mlp_bwd(dy, x, w1, w2, hidden, True, True, "none", False) for _ in range(2)]
    for name, a, b in zip(["dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"], *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------------------------------
# CPU: error paths and launcher preconditions (no GPU needed)
# ----------------------------------------------------------------------------------------------------
def test_cuda_backend_on_cpu_tensors_is_a_clear_value_error():
    x, w, b = torch.randn(1, 5, 64), torch.randn(192, 64), torch.randn(192)
    with pytest.raises(ValueError, match="backend='cuda'"):
        vk.fused_qkv(x, w, b, 2, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        vk.gelu_mlp(torch.randn(5, 32), torch.randn(64, 32), None, torch.randn(32, 64), None, backend="cuda")


def test_wrappers_reject_cpu_tensors():
    x, w = torch.randn(1, 5, 64), torch.randn(192, 64)
    with pytest.raises(ValueError, match="needs CUDA tensors, but x is on cpu"):
        linear.qkv_fwd(x, w, None, 2, False)
    g = torch.randn(1, 2, 5, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors, but dq is on cpu"):
        linear.qkv_bwd(g, g, g, x, w, True, False)
    x2, w1, w2 = torch.randn(5, 32), torch.randn(64, 32), torch.randn(32, 64)
    with pytest.raises(ValueError, match="needs CUDA tensors, but x is on cpu"):
        linear.mlp_fwd(x2, w1, None, w2, None, "none", False)
    with pytest.raises(ValueError, match="needs CUDA tensors, but dy is on cpu"):
        linear.mlp_bwd(torch.randn(5, 32), x2, w1, w2, torch.randn(5, 64), False, False, "none", False)


def test_check_like_names_dtype_and_shape_mismatches():
    """The guard the wrappers run before any pointer is taken (CPU tensors: the check itself needs no GPU)."""
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    check_like("x", x, dy=(torch.randn(5, 16, dtype=torch.bfloat16), (5, 16)), bias=(None, (16,)))
    with pytest.raises(TypeError, match="dy has dtype torch.float32 but x has torch.bfloat16"):
        check_like("x", x, dy=(torch.randn(5, 16), (5, 16)))
    with pytest.raises(ValueError, match=r"hidden must have shape \(5, 64\), got \(4, 64\)"):
        check_like("x", x, hidden=(torch.randn(4, 64, dtype=torch.bfloat16), (5, 64)))


@needs_gpu
def test_backward_wrappers_reject_inconsistent_gradients():
    """The backward custom ops are public: gradients of the wrong dtype or size raise before any launch."""
    x, w = torch.randn(1, 5, 64, device="cuda", dtype=torch.bfloat16), torch.randn(192, 64, device="cuda")
    g = torch.randn(1, 2, 5, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="weight has dtype torch.float32"):
        linear.qkv_bwd(g, g, g, x, w, True, False)
    w = w.bfloat16()
    with pytest.raises(ValueError, match="dk must have shape"):
        linear.qkv_bwd(g, g[:, :, :4], g, x, w, True, False)
    x2, w1, w2 = (torch.randn(*s, device="cuda", dtype=torch.float16) for s in ((5, 32), (64, 32), (32, 64)))
    dy = torch.randn(5, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dy has dtype torch.bfloat16"):
        linear.mlp_bwd(dy, x2, w1, w2, x2, False, False, "none", False)
    with pytest.raises(ValueError, match="hidden must have shape"):
        linear.mlp_bwd(torch.randn_like(x2), x2, w1, w2, x2, False, False, "none", False)


def test_extension_binds_the_linear_launchers():
    _C = _extension()
    for name in ("qkv_fwd", "qkv_bwd", "mlp_fwd", "mlp_bwd", "linear_fwd", "linear_bwd", "qkv_fwd_sm90",
                 "mlp_fwd_sm90", "mlp_bwd_sm90", "linear_fwd_sm90", "linear_bwd_sm90"):  # fmt: skip
        assert callable(getattr(_C, name, None)), f"_C.{name} is not bound"


# Valid launcher arguments with null pointers: each call below overrides one to break a precondition, which
# must raise before any CUDA call.
_QKV_FWD_ARGS = dict(x=0, ldx=64, weight=0, ldw=64, bias=0, q=0, k=0, v=0, batch=1, tokens=5, channels=64, heads=2,
                     dtype=HALF, stream=0)  # fmt: skip
_QKV_BWD_ARGS = dict(dq=0, dk=0, dv=0, s_b=5 * 64, s_h=5 * 32, s_t=32, x=0, ldx=64, weight=0, ldw=64, dx=0,
                     dweight=0, dbias=0, scratch=0, scratch_floats=0, batch=1, tokens=5, channels=64, heads=2,
                     dtype=HALF, stream=0)  # fmt: skip
_MLP_FWD_ARGS = dict(x=0, ldx=32, fc1_weight=0, ldw1=32, fc1_bias=0, fc2_weight=0, ldw2=64, fc2_bias=0, residual=0,
                     ld_res=0, hidden=0, act=0, y=0, M=5, C=32, hidden_features=64, C_out=32, tanh=False, dtype=HALF,
                     stream=0)  # fmt: skip
_LINEAR_FWD_ARGS = dict(a=0, lda=32, weight=0, ldw=32, bias=0, residual=0, ld_res=0, out=0, ldo=64, M=5, N=64, K=32,
                        dtype=HALF, stream=0)  # fmt: skip
_LINEAR_BWD_ARGS = dict(dout=0, ld_dout=64, a=0, lda=32, weight=0, ldw=32, da=0, dweight=0, dbias=0, scratch=0,
                        scratch_floats=0, M=5, N=64, K=32, dtype=HALF, stream=0)  # fmt: skip
_MLP_BWD_ARGS = dict(dy=0, ldy=32, x=0, ldx=32, fc1_weight=0, ldw1=32, fc2_weight=0, ldw2=64, hidden=0, ldh=64,
                     dhidden=0, act=0, dx=0, dfc1_weight=0, dfc1_bias=0, dfc2_weight=0, dfc2_bias=0, scratch=0,
                     scratch_floats=0, M=5, C=32, hidden_features=64, C_out=32, tanh=False, dtype=HALF,
                     stream=0)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(channels=60, ldx=60, ldw=60), r"C=60 must be a positive multiple of 8"),
        (dict(heads=16), r"head dim D=C/num_heads=4 must be a multiple of 8"),
        (dict(heads=3), r"C=64 must be divisible by num_heads=3"),
        (dict(dtype=7), r"unknown dtype code 7"),
        (dict(x=8), r"operand A: pointer must be 16-byte aligned"),
        (dict(ldx=68), r"operand A: needs unit stride along K and a row stride that is a multiple of 8"),
        (dict(weight=24), r"operand B: pointer must be 16-byte aligned"),
        (dict(k=2), r"qkv_fwd gemm_kernel k: needs a pointer aligned to two elements"),
    ],
)
def test_qkv_fwd_launcher_checks_preconditions(overrides, message):
    _C = _extension()
    with pytest.raises(ValueError, match=message):
        _C.qkv_fwd(**{**_QKV_FWD_ARGS, **overrides})


def test_qkv_bwd_launcher_checks_gradient_strides():
    _C = _extension()
    with pytest.raises(ValueError, match=r"dq, dk, dv strides \(B, H, N\) must be multiples of 8"):
        _C.qkv_bwd(**{**_QKV_BWD_ARGS, "s_t": 36})
    with pytest.raises(ValueError, match=r"dq, dk, dv must be 16-byte aligned"):
        _C.qkv_bwd(**{**_QKV_BWD_ARGS, "dk": 4})


def test_bias_sums_need_their_scratch_before_any_launch():
    """A bias gradient (a two-pass column sum) needs fp32 scratch for one row of sums at least, checked with the
    other preconditions, before the first GEMM launches."""
    _C = _extension()
    with pytest.raises(ValueError, match=r"qkv_bwd dbias: the fp32 scratch must hold at least one row of 192 column"):
        _C.qkv_bwd(**{**_QKV_BWD_ARGS, "dbias": 16})
    with pytest.raises(ValueError, match=r"mlp_bwd dfc2_bias: .* of 32 column sums, got 16 floats"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "dfc2_bias": 16, "scratch": 64, "scratch_floats": 16})
    with pytest.raises(ValueError, match=r"mlp_bwd dfc1_bias: .* of 64 column sums, got 32 floats"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "dfc1_bias": 16, "scratch": 64, "scratch_floats": 32})
    with pytest.raises(ValueError, match=r"mlp_bwd dfc1_bias: the fp32 scratch must be 4-byte aligned"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "dfc1_bias": 16, "scratch": 66, "scratch_floats": 64})


def test_mlp_launchers_check_channels_and_layout():
    _C = _extension()
    with pytest.raises(ValueError, match=r"hidden=60 must be a positive multiple of 8"):
        _C.mlp_fwd(**{**_MLP_FWD_ARGS, "hidden_features": 60})
    with pytest.raises(ValueError, match=r"mlp_fwd fc2_weight: needs unit stride along K"):
        _C.mlp_fwd(**{**_MLP_FWD_ARGS, "ldw2": 66})
    with pytest.raises(ValueError, match=r"C_out=12 must be a positive multiple of 8"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "C_out": 12})
    with pytest.raises(ValueError, match=r"mlp_bwd x: needs unit row stride and a K stride that is a multiple of 8"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "ldx": 36})


def test_gemm_launchers_check_output_alignment_before_any_launch():
    # Outputs are stored in element pairs; a misaligned output of the last GEMM must stop the first launch too.
    _C = _extension()
    with pytest.raises(ValueError, match=r"mlp_fwd fc1 activation: needs a pointer aligned to two elements"):
        _C.mlp_fwd(**{**_MLP_FWD_ARGS, "act": 4, "dtype": FLOAT})  # fp32: act is no 16-byte operand, only a pair store
    with pytest.raises(ValueError, match=r"mlp_fwd fc2 output: needs a pointer aligned to two elements"):
        _C.mlp_fwd(**{**_MLP_FWD_ARGS, "y": 6})
    with pytest.raises(ValueError, match=r"mlp_bwd hidden: needs a pointer aligned to two elements and an even"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "ldh": 63})
    with pytest.raises(ValueError, match=r"mlp_bwd dx output: needs a pointer aligned to two elements"):
        _C.mlp_bwd(**{**_MLP_BWD_ARGS, "dx": 2})
    with pytest.raises(ValueError, match=r"qkv_bwd dweight output: needs a pointer aligned to two elements"):
        _C.qkv_bwd(**{**_QKV_BWD_ARGS, "dweight": 4, "dtype": FLOAT})  # fp32 pairs are 8 bytes


_MLP_FWD_SM90_ARGS = {**_MLP_FWD_ARGS}
_MLP_BWD_SM90_ARGS = {**_MLP_BWD_ARGS, "act_in_epilogue": True, "dfc1_bias_in_epilogue": True}
_MLP_BWD_COLSUM_ARGS = {**_MLP_BWD_SM90_ARGS, "dfc1_bias_in_epilogue": False}  # dfc1_bias by the two-pass column sum
_PARTIALS_255 = (
    r"dfc1_bias: the d-GELU epilogue's partial sums need .* \(hidden rounded up to 256\) = 256 floats, got 255"
)
_VARIANT_ARGS = dict(variant="pingpong_128x128", a=0, lda=32, weight=0, ldw=32, bias=0, out=0, ldo=64, M=5, N=64, K=32,
                     dtype=2, stream=0)  # fmt: skip
_QKV_FWD_SM90_ARGS = {**_QKV_FWD_ARGS, "qkv": 0}


@pytest.mark.parametrize(
    "launcher, args, overrides, message",
    [
        ("mlp_fwd_sm90", _MLP_FWD_SM90_ARGS, dict(dtype=FLOAT), r"GEMMs take fp16 or bf16, got dtype code 0"),
        ("mlp_fwd_sm90", _MLP_FWD_SM90_ARGS, dict(x=8), r"mlp_fwd_sm90 x: pointer must be 16-byte aligned"),
        ("mlp_fwd_sm90", _MLP_FWD_SM90_ARGS, dict(ldw2=68), r"mlp_fwd_sm90 fc2_weight: needs unit stride along K"),
        ("mlp_fwd_sm90", _MLP_FWD_SM90_ARGS, dict(fc1_bias=8), r"mlp_fwd_sm90: biases must be 16-byte aligned"),
        ("mlp_bwd_sm90", _MLP_BWD_SM90_ARGS, dict(ldh=60), r"mlp_bwd_sm90 hidden: needs unit stride along K"),
        ("mlp_bwd_sm90", _MLP_BWD_SM90_ARGS, dict(dfc2_bias=16, scratch=64, scratch_floats=16), r"dfc2_bias: .* 16"),
        # the d-GELU epilogue's partial sums of dfc1_bias: ceil(5 / 128) rows of 64 columns rounded up to 256
        ("mlp_bwd_sm90", _MLP_BWD_SM90_ARGS, dict(dfc1_bias=16, scratch=64, scratch_floats=255), _PARTIALS_255),
        ("mlp_bwd_sm90", _MLP_BWD_SM90_ARGS, dict(dfc1_bias=16, scratch=72, scratch_floats=256), r"16-byte aligned"),
        ("mlp_bwd_sm90", _MLP_BWD_COLSUM_ARGS, dict(dfc1_bias=16, scratch=64, scratch_floats=32), r"dfc1_bias: .* 32"),
        ("qkv_fwd_sm90", _QKV_FWD_SM90_ARGS, dict(qkv=8), r"qkv_fwd_sm90 qkv scratch: pointer must be 16-byte aligned"),
        ("qkv_fwd_sm90", _QKV_FWD_SM90_ARGS, dict(v=8), r"qkv_fwd_sm90: q, k, v must be 16-byte aligned"),
        ("qkv_fwd_sm90", _QKV_FWD_SM90_ARGS, dict(heads=16), r"head dim D=C/num_heads=4 must be a multiple of 8"),
        ("linear_bwd_sm90", _LINEAR_BWD_ARGS, dict(dweight=4), r"linear_bwd_sm90 dweight: pointer must be 16-byte"),
        ("linear_bwd_sm90", _LINEAR_BWD_ARGS, dict(M=0), r"M must be positive and below 2\^31"),
        ("mlp_fwd_sm90", _MLP_FWD_SM90_ARGS, dict(residual=16, ld_res=36), r"mlp_fwd_sm90 residual: needs unit"),
        ("linear_fwd_sm90", _LINEAR_FWD_ARGS, dict(residual=8), r"linear_fwd_sm90 residual: pointer must be 16-byte"),
        ("linear_fwd_sm90", _LINEAR_FWD_ARGS, dict(ldo=60), r"linear_fwd_sm90 output: needs unit stride along K"),
        ("linear_fwd_sm90", _LINEAR_FWD_ARGS, dict(bias=8), r"linear_fwd_sm90: the bias must be 16-byte aligned"),
        ("linear_fwd_sm90", _LINEAR_FWD_ARGS, dict(K=12, lda=12, ldw=12), r"K=12 must be a positive multiple of 8"),
        ("linear_bwd_sm90", _LINEAR_BWD_ARGS, dict(dbias=16), r"linear_bwd_sm90 dbias: the fp32 scratch must hold"),
        ("linear_bwd_sm90", _LINEAR_BWD_ARGS, dict(ld_dout=68), r"linear_bwd_sm90 dout: needs unit stride along K"),
        ("linear_fwd_sm90_variant", _VARIANT_ARGS, dict(dtype=HALF), r"the variants are built for bf16 only"),
        ("linear_fwd_sm90_variant", _VARIANT_ARGS, dict(ldo=60), r"linear_fwd_sm90_variant output: needs unit"),
        ("linear_fwd_sm90_variant", _VARIANT_ARGS, dict(bias=8), r"linear_fwd_sm90_variant: the bias must be 16-"),
    ],
)
def test_sm90_launchers_check_preconditions(launcher, args, overrides, message):
    """The Hopper launchers validate dtype, shapes and every operand's TMA layout before any CUDA call, also in a
    build without them (they are bound either way)."""
    _C = _extension()
    with pytest.raises(ValueError, match=message):
        getattr(_C, launcher)(**{**args, **overrides})


@pytest.mark.parametrize(
    "launcher, args, overrides, message",
    [
        ("linear_fwd", _LINEAR_FWD_ARGS, dict(residual=2, ld_res=64), r"linear_fwd residual: needs a pointer aligned"),
        ("linear_fwd", _LINEAR_FWD_ARGS, dict(residual=16, ld_res=63), r"residual: .* and an even row stride"),
        ("linear_fwd", _LINEAR_FWD_ARGS, dict(out=2), r"linear_fwd output: needs a pointer aligned to two elements"),
        ("linear_fwd", _LINEAR_FWD_ARGS, dict(lda=36), r"linear_fwd a: needs unit stride along K and a row stride"),
        ("linear_fwd", _LINEAR_FWD_ARGS, dict(N=60, ldo=60), r"N=60 must be a positive multiple of 8"),
        ("linear_bwd", _LINEAR_BWD_ARGS, dict(dbias=16, scratch=64, scratch_floats=32), r"dbias: .* got 32 floats"),
        ("linear_bwd", _LINEAR_BWD_ARGS, dict(lda=36), r"linear_bwd a: needs unit row stride and a K stride"),
        ("linear_bwd", _LINEAR_BWD_ARGS, dict(da=2, dtype=FLOAT), r"linear_bwd da output: needs a pointer aligned"),
        ("mlp_fwd", _MLP_FWD_ARGS, dict(residual=2, ld_res=32), r"mlp_fwd fc2 residual: needs a pointer aligned"),
    ],
)
def test_linear_launchers_check_preconditions(launcher, args, overrides, message):
    """The block ops' launchers (one linear layer with the bias and residual epilogue, and its backward) and the
    MLP's fc2 residual check every operand before any CUDA call, as the other launchers do."""
    _C = _extension()
    with pytest.raises(ValueError, match=message):
        getattr(_C, launcher)(**{**args, **overrides})


def test_sm90_dgelu_partial_sums_take_one_row_per_row_tile():
    """The scratch the wrapper sizes for the d-GELU epilogue's dfc1_bias partial sums: ceil(M / 128) rows of the
    columns rounded up to the 256-column tile (gemm_sm90.h), also in a build without the sm_90a GEMMs."""
    _C = _extension()
    sizes = {(M, N): _C.sm90_dgelu_colsums_floats(M, N) for M, N in ((1, 16), (296, 288), (256 * 197, 3072))}
    assert sizes == {(1, 16): 256, (296, 288): 3 * 512, (256 * 197, 3072): 394 * 3072}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path of a machine without a GPU")
def test_sm90_launchers_say_why_they_cannot_run_here():
    """Valid arguments reach the device check: without a driver it is CUDA's error, in a build without CUTLASS it is
    the build's reason."""
    _C = _extension()
    built = _C.build_info()["sm90_gemm_built"]
    message = r"cudaGetDevice failed" if built else r"this build has no sm_90a GEMMs \(not built: "
    with pytest.raises(RuntimeError, match=message):
        _C.mlp_fwd_sm90(**_MLP_FWD_SM90_ARGS)


def _by_separate_passes(call):
    """call() with the sm_90a mlp_bwd's act and dfc1_bias by their own passes, not from the d-GELU epilogue."""
    with unittest.mock.patch.multiple(linear, SM90_ACT_IN_EPILOGUE=False, SM90_DFC1_BIAS_IN_EPILOGUE=False):
        return call()


def _wrapper_calls(dtype):
    """name -> a call of each wrapper of vit_kernels/cuda/linear.py on small CPU tensors, in the layouts that take
    their other branches too (packed q / k / v, gradients read in place, a residual)."""
    B, N, C, H, Hd = 2, 5, 64, 2, 128
    x, w, b = torch.randn(B, N, C, dtype=dtype), torch.randn(3 * C, C, dtype=dtype), torch.randn(3 * C, dtype=dtype)
    grads = [torch.randn(B, H, N, C // H, dtype=dtype) for _ in range(3)]
    packed = torch.randn(B, N, 3, H, C // H, dtype=dtype)
    packed_grads = [packed[:, :, i].transpose(1, 2) for i in range(3)]
    x2, h = x.view(B * N, C), torch.randn(B * N, Hd, dtype=dtype)
    w1, b1, w2 = torch.randn(Hd, C, dtype=dtype), torch.randn(Hd, dtype=dtype), torch.randn(C, Hd, dtype=dtype)
    w_proj, b_proj = torch.randn(C, C, dtype=dtype), torch.randn(C, dtype=dtype)
    return {
        "qkv_fwd": lambda: linear.qkv_fwd(x, w, b, H, False),
        "qkv_fwd packed": lambda: linear.qkv_fwd(x, w, b, H, False, packed=True),
        "qkv_bwd": lambda: linear.qkv_bwd(*grads, x, w, True, False),
        "qkv_bwd packed grads": lambda: linear.qkv_bwd(*packed_grads, x, w, True, False),
        "mlp_fwd": lambda: linear.mlp_fwd(x2, w1, b1, w2, b_proj, "none", False),
        "mlp_fwd residual": lambda: linear.mlp_fwd(x2, w1, b1, w2, b_proj, "tanh", False, residual=x),
        "mlp_fwd without hidden": lambda: linear.mlp_fwd(x2, w1, b1, w2, b_proj, "none", False, save_hidden=False),
        "mlp_bwd": lambda: linear.mlp_bwd(x2, x2, w1, w2, h, True, True, "none", False),
        "mlp_bwd by separate passes": lambda: _by_separate_passes(
            lambda: linear.mlp_bwd(x2, x2, w1, w2, h, True, False, "tanh", False)
        ),
        "linear_fwd": lambda: linear.linear_fwd(x2, w_proj, b_proj, x),
        "linear_bwd": lambda: linear.linear_bwd(x2, x2, w_proj, True),
        **(
            {"linear_fwd_variant": lambda: linear.linear_fwd_variant(x2, w_proj, b_proj, "pingpong_128x128")}
            if dtype == torch.bfloat16
            else {}
        ),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the parity tests above run every wrapper for real")
@pytest.mark.parametrize("gemms", ["sm_90a", "mma.sync"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_wrappers_pass_the_launchers_checks_and_stop_at_cuda(monkeypatch, gemms, dtype):
    """The wrappers' calls into `_C` run nowhere else without a GPU. On CPU tensors, with the device plumbing (device
    check, stream, device guard) stubbed, each must reach the real launcher with arguments it accepts: their number
    and types (else TypeError) and every layout precondition (else ValueError), so that the first failure is the
    launch itself, which needs the driver this machine lacks. "sm_90a" routes fp16 / bf16 as an H100 / H200 does."""
    _extension()
    monkeypatch.setattr(linear, "check_cuda_tensors", lambda **tensors: None)
    monkeypatch.setattr(linear, "stream_of", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(linear, "_sm90", lambda t: gemms == "sm_90a" and t.dtype != torch.float32)
    for name, call in _wrapper_calls(dtype).items():
        # no driver: CUDA's error at the first CUDA call; a build without CUTLASS stops its sm_90a launchers first
        with pytest.raises(RuntimeError, match=r"CUDA error|this build has no sm_90a GEMMs"):
            call()
            pytest.fail(f"{name}: returned without reaching CUDA")


def test_layout_helpers_copy_only_what_the_kernels_cannot_read():
    base = torch.randn(10, 40)
    sliced = base[:, :32]  # row stride 40: readable in place
    assert linear._rows(sliced).data_ptr() == sliced.data_ptr()
    transposed = torch.randn(32, 10).t()
    copied = linear._rows(transposed)
    assert copied.is_contiguous() and torch.equal(copied, transposed)
    odd_stride = torch.randn(10, 36)[:, :32]  # row stride 36 is not a multiple of 8
    assert linear._rows(odd_stride).stride() == (32, 1)

    packed = torch.randn(2, 5, 3, 4, 8)
    views = [packed[:, :, i].transpose(1, 2) for i in range(3)]
    assert [t.data_ptr() for t in linear._heads(*views)] == [t.data_ptr() for t in views]
    mixed = [views[0], views[1].contiguous(), views[2]]
    out = linear._heads(*mixed)
    assert all(t.is_contiguous() for t in out) and all(torch.equal(a, b) for a, b in zip(out, mixed))


def test_nan_output_never_passes():
    # The poisoned-buffer tests rely on this: a NaN left in an output is an infinite error.
    ref = torch.randn(4, 8)
    out = ref.clone()
    out[2, 3] = float("nan")
    assert rel_error(out, ref) == float("inf")
