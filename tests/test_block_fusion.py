"""Whole-block fusion (vit_kernels/ops/ln_fused_qkv.py, proj_residual.py, ln_gelu_mlp.py; the kernels in
vit_kernels/triton/block.py and vit_kernels/cuda/block.py): LayerNorm in the QKV / fc1 GEMM prologue, the residual add
in the proj / fc2 GEMM epilogue, forward and every gradient (dgamma and dbeta included).

Each case runs the public op on backend="triton" (both GEMM paths) and "cuda" (GPU only) and compares it with
the float64 reference (vit_kernels.reference) by relative error: the per-dtype tolerance, or twice the error of the
unfused eager composition in the same dtype if that is larger (FlashAttention's parity rule: in 16-bit, LN's
output is rounded to the dtype before the GEMM in eager torch as in the kernel). Token counts that never fill a
tile (N = 1, 17, 197), heads of 32 and 48, both LayerNorm eps (timm 1e-6, HF 1e-12), rows whose mean is 100x
their spread, non-contiguous inputs, every launcher buffer NaN-poisoned. The last tests compile the new kernels
for sm_80 / sm_90 without a GPU.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICE,
    SMEM_LIMIT,
    TOLERANCES,
    compile_report_rows,
    import_timm,
    nan_alloc,
    ptxas_available,
    randn,
    rel_error,
    skip_unless_runs,
)

import vit_kernels as vk
from vit_kernels import cuda as vit_cuda
from vit_kernels import reference
from vit_kernels import triton as vit_triton
from vit_kernels.triton import block, linear

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
_, TIMM_MISSING = import_timm()

# (B, N, C, H, eps, rows): "shifted" rows have mean +-100 and std 1 (the case E[x^2] - E[x]^2 cancels on).
CASES = [
    (1, 1, 64, 2, 1e-6, "shifted"),
    (2, 17, 96, 2, 1e-12, "shifted"),
    (1, 197, 64, 2, 1e-6, "plain"),
]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the launchers allocate (this file's and linear.py's, which backward reuses, and the cuda
    backend's GEMM wrappers) starts as NaN."""
    monkeypatch.setattr(vit_triton, "alloc", nan_alloc)
    monkeypatch.setattr(vit_cuda, "empty", lambda shape, like, dtype=None: nan_alloc(*shape, like=like, dtype=dtype))


@pytest.fixture(params=["tma", "pointer", "cuda"])
def path(request, monkeypatch):
    """The GEMM path: triton's "tma" (Hopper and the interpreter: LayerNorm as a row kernel, TMA GEMMs) or "pointer"
    (sm_80: LayerNorm in the A-tile prologue of `_block_gemm_kernel`; exact fp32 runs it either way), or the "cuda"
    backend (csrc's GEMMs, CUTLASS sm_90a on Hopper fp16 / bf16, beside the same Triton LayerNorm row kernels)."""
    if request.param == "pointer":
        monkeypatch.setattr(linear, "TMA_ARCHS", ())
    if request.param == "cuda":
        skip_unless_runs("cuda")
    return request.param


def _backend(path: str) -> str:
    return "cuda" if path == "cuda" else "triton"


_randn = functools.partial(randn, device=DEVICE)  # every input on the Triton tests' device


def _x(B, N, C, dtype, rows):
    shift = 100.0 * torch.randn(B, N, 1).sign() if rows == "shifted" else None
    return _randn(B, N, C, dtype=dtype, shift=shift)


def _ln_params(C, dtype):
    return 1.0 + 0.2 * _randn(C, dtype=dtype), 0.2 * _randn(C, dtype=dtype)


def _run(fn, inputs, grads_out):
    """Outputs and the gradients of every tensor input of fn(*inputs) (None where an input is not a tensor)."""
    # detach(), not clone(): a clone of a sliced view is contiguous, and the strided layouts are the point.
    leaves = [t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(outs[0].dtype) for g in grads_out])
    return [o.detach() for o in outs], [t.grad if isinstance(t, torch.Tensor) else None for t in leaves]


def _double(inputs):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]


def _check_all(name, fn, inputs, grads_out, backend_fn):
    """Compare backend_fn(...)'s outputs and gradients with the float64 reference `fn` and with eager `fn` in the
    input dtype (for the tolerance)."""
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor))
    outs, grads = _run(backend_fn, inputs, grads_out)
    outs_ref, grads_ref = _run(fn, _double(inputs), grads_out)
    outs_eager, grads_eager = _run(fn, inputs, grads_out)
    pairs = [(f"{name} out{i}", o, r, e) for i, (o, r, e) in enumerate(zip(outs, outs_ref, outs_eager, strict=True))]
    pairs += [
        (f"{name} grad of input {i}", g, r, e)
        for i, (g, r, e) in enumerate(zip(grads, grads_ref, grads_eager, strict=True))
        if r is not None
    ]
    for what, out, ref, eager in pairs:
        assert out is not None, f"{what}: no gradient"
        assert out.dtype == dtype and out.shape == ref.shape, what
        assert torch.isfinite(out).all(), f"{what}: non-finite values (an unwritten element of a poisoned buffer?)"
        tol = max(TOLERANCES[dtype], 2 * rel_error(eager, ref))
        err = rel_error(out, ref)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("B, N, C, H, eps, rows", CASES)
def test_ln_fused_qkv(B, N, C, H, eps, rows, dtype, path):
    x = _x(B, N, C, dtype, rows)
    if N > 1:  # (B, N) that do not merge into one stride, as in a sliced residual stream
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    ln_w, ln_b = _ln_params(C, dtype)
    w, b = _randn(3 * C, C, dtype=dtype, scale=C**-0.5), _randn(3 * C, dtype=dtype)
    grads = [_randn(B, H, N, C // H, dtype=dtype) for _ in range(3)]

    def triton_fn(x, ln_w, ln_b, w, b):
        return vk.ln_fused_qkv(x, ln_w, ln_b, eps, w, b, H, backend=_backend(path))

    def ref_fn(x, ln_w, ln_b, w, b):
        return tuple(reference.ln_fused_qkv(x, ln_w, ln_b, eps, w, b, H))

    _check_all("ln_fused_qkv", ref_fn, [x, ln_w, ln_b, w, b], grads, triton_fn)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("B, N, C, H, eps, rows", CASES)
@pytest.mark.parametrize("o_rows", ["split", "merged"])
def test_proj_residual(B, N, C, H, eps, rows, dtype, o_rows, path):
    # o and the residual stream as channel slices of wider tensors (row stride C + 8); o's (B, N) not mergeable
    # ("split": the pointer kernel reads it in place), or mergeable (a TMA operand on the Hopper path)
    if o_rows == "split":
        o = _randn(N, B, C + 8, dtype=dtype).transpose(0, 1)[..., :C]
    else:
        o = _randn(B, N, C + 8, dtype=dtype)[..., :C]
    wide = _x(B, N, C + 8, dtype, rows)
    residual = wide[..., :C]
    w, b = _randn(C, C, dtype=dtype, scale=C**-0.5), _randn(C, dtype=dtype)
    grads = [_randn(B, N, C, dtype=dtype)]

    def triton_fn(o, w, b, residual):
        return vk.proj_residual(o, w, b, residual, backend=_backend(path))

    _check_all("proj_residual", reference.proj_residual, [o, w, b, residual], grads, triton_fn)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("B, N, C, H, eps, rows", CASES)
def test_ln_gelu_mlp(B, N, C, H, eps, rows, dtype, path):
    x = _x(B, N, C, dtype, rows)
    if N == 17:  # a channel slice of a wider stream: LN, the fc2 residual epilogue and LN backward read it strided
        wide = torch.zeros(B, N, C + 8, dtype=dtype, device=DEVICE)
        wide[..., :C] = x
        x = wide[..., :C]
    ln_w, ln_b = _ln_params(C, dtype)
    Hd = 2 * C  # ViT's 4C adds nothing the interpreter can check but time; 2C still spans several N-tiles
    w1, b1 = _randn(Hd, C, dtype=dtype, scale=C**-0.5), _randn(Hd, dtype=dtype)
    w2, b2 = _randn(C, Hd, dtype=dtype, scale=Hd**-0.5), _randn(C, dtype=dtype)
    approximate = "tanh" if N == 17 else "none"
    grads = [_randn(B, N, C, dtype=dtype)]

    def triton_fn(x, ln_w, ln_b, w1, b1, w2, b2):
        return vk.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, b1, w2, b2, approximate=approximate, backend=_backend(path))

    def ref_fn(x, ln_w, ln_b, w1, b1, w2, b2):
        return reference.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, b1, w2, b2, approximate)

    _check_all("ln_gelu_mlp", ref_fn, [x, ln_w, ln_b, w1, b1, w2, b2], grads, triton_fn)


def _vjp(fn, inputs, grads_out):
    """fn(*inputs) and the gradients of its tensor inputs (None for None inputs) for the output gradients."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    with torch.enable_grad():
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


class _TorchGemms:
    """The part of vit_kernels/cuda/linear.py that cuda/block.py calls, in torch (same contract, CPU)."""

    @staticmethod
    def qkv_fwd(x, weight, bias, num_heads, allow_tf32):
        return tuple(t.contiguous() for t in reference.fused_qkv(x, weight, bias, num_heads))

    @staticmethod
    def qkv_bwd(dq, dk, dv, x, weight, has_bias, allow_tf32):
        H = dq.shape[1]
        _, (dx, dw, db) = _vjp(lambda *a: reference.fused_qkv(*a, H), [x, weight, dq.new_zeros(weight.shape[0])],
                               [dq, dk, dv])  # fmt: skip
        return dx, dw, db if has_bias else None

    @staticmethod
    def mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, residual=None,
                save_hidden=True):  # fmt: skip
        hidden = F.linear(x, fc1_weight, fc1_bias)
        y = F.linear(F.gelu(hidden, approximate=approximate), fc2_weight, fc2_bias)
        return (y if residual is None else y + residual.reshape(y.shape)), (hidden if save_hidden else None)

    @staticmethod
    def mlp_bwd(dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32):
        def fc2_of_hidden(h, w2):
            return F.linear(F.gelu(h, approximate=approximate), w2)

        _, (dh, dw2) = _vjp(fc2_of_hidden, [hidden, fc2_weight], [dy])
        db1, db2 = (dh.sum(0) if has_fc1_bias else None), (dy.sum(0) if has_fc2_bias else None)
        return dh @ fc1_weight, dh.t() @ x, db1, dw2, db2

    @staticmethod
    def linear_fwd(a, weight, bias, residual=None):
        out = F.linear(a, weight, bias)
        return out if residual is None else out + residual.reshape(out.shape)

    @staticmethod
    def linear_bwd(dout, a, weight, has_bias):
        return dout @ weight, dout.t() @ a, dout.sum(0) if has_bias else None


@pytest.mark.parametrize("residual", [True, False])
def test_cuda_block_module_composes_its_gemms_and_layernorm(monkeypatch, residual):
    """vit_kernels/cuda/block.py's wiring on the CPU: its GEMMs (cuda/linear.py, which need a GPU) replaced by torch
    versions of the same contract, its LayerNorm the real Triton row kernels (interpreter); each op's forward and
    backward function against the float64 reference, every gradient. The kernels themselves: path "cuda" above."""
    skip_unless_runs("triton")
    from vit_kernels.cuda import block as cuda_block

    monkeypatch.setattr(cuda_block, "linear", _TorchGemms)
    B, N, C, H, Hd, eps = 2, 17, 64, 2, 128, 1e-6
    x = _x(B, N, C, F32, "shifted").transpose(0, 1).contiguous().transpose(0, 1)  # (B, N) not mergeable
    ln_w, ln_b = _ln_params(C, F32)
    w, b = _randn(3 * C, C, dtype=F32, scale=C**-0.5), _randn(3 * C, dtype=F32)
    w1, b1 = _randn(Hd, C, dtype=F32, scale=C**-0.5), _randn(Hd, dtype=F32)
    w2, b2 = _randn(C, Hd, dtype=F32, scale=Hd**-0.5), _randn(C, dtype=F32)
    residual_in = _randn(B, N, C, dtype=F32)

    def close(what, got, ref):
        assert got is not None and got.shape == ref.shape, what
        assert rel_error(got, ref) <= 1e-5, f"{what}: relative error {rel_error(got, ref):.3g}"

    # ln_qkv
    q, k, v, mean, rstd = cuda_block.ln_qkv_fwd(x, ln_w, ln_b, eps, w, b, H, False)
    grads = [_randn(*q.shape, dtype=F32) for _ in range(3)]
    ref_out, ref_grads = _vjp(lambda *a: reference.ln_fused_qkv(a[0], a[1], a[2], eps, a[3], a[4], H),
                              _double([x, ln_w, ln_b, w, b]), [g.double() for g in grads])  # fmt: skip
    for name, got, ref in zip("qkv", (q, k, v), ref_out, strict=True):
        close(f"ln_qkv {name}", got, ref)
    got_grads = cuda_block.ln_qkv_bwd(*grads, x, mean, rstd, ln_w, ln_b, w, True, False)
    for name, got, ref in zip(("dx", "dln_w", "dln_b", "dw", "db"), got_grads, ref_grads, strict=True):
        close(f"ln_qkv {name}", got, ref)
    # proj_residual
    o = _randn(B, N, C, dtype=F32)
    out = cuda_block.proj_residual_fwd(o, w[:C], b[:C], residual_in, False)
    dout = _randn(B, N, C, dtype=F32)
    ref_out, ref_grads = _vjp(reference.proj_residual, _double([o, w[:C], b[:C], residual_in]), [dout.double()])
    close("proj_residual out", out, ref_out[0])
    got_grads = cuda_block.proj_residual_bwd(dout, o, w[:C], True, False)
    for name, got, ref in zip(("do", "dw", "db"), got_grads, ref_grads, strict=False):
        close(f"proj_residual {name}", got, ref)
    # ln_mlp
    out, hidden, mean, rstd = cuda_block.ln_mlp_fwd(x, ln_w, ln_b, eps, w1, b1, w2, b2, "none", residual, False)
    ref_out, ref_grads = _vjp(
        lambda *a: reference.ln_gelu_mlp(a[0], a[1], a[2], eps, *a[3:], "none", residual),
        _double([x, ln_w, ln_b, w1, b1, w2, b2]), [dout.double()],
    )  # fmt: skip
    close("ln_mlp out", out, ref_out[0])
    got_grads = cuda_block.ln_mlp_bwd(dout, x, mean, rstd, ln_w, ln_b, w1, w2, hidden, True, True, "none", residual,
                                      False)  # fmt: skip
    for name, got, ref in zip(("dx", "dln_w", "dln_b", "dw1", "db1", "dw2", "db2"), got_grads, ref_grads, strict=True):
        close(f"ln_mlp {name}", got, ref)
    _out, no_hidden, _mean, _rstd = cuda_block.ln_mlp_fwd(x, ln_w, ln_b, eps, w1, b1, w2, b2, "none", residual, False,
                                                          save_hidden=False)  # fmt: skip
    assert no_hidden is None


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_ln_gelu_mlp_without_residual_or_biases(dtype):
    B, N, C, Hd, eps = 2, 5, 64, 128, 1e-12
    x = _x(B, N, C, dtype, "shifted")
    ln_w, ln_b = _ln_params(C, dtype)
    w1, w2 = _randn(Hd, C, dtype=dtype, scale=C**-0.5), _randn(32, Hd, dtype=dtype, scale=Hd**-0.5)
    grads = [_randn(B, N, 32, dtype=dtype)]

    def triton_fn(x, ln_w, ln_b, w1, w2):
        return vk.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, None, w2, None, residual=False, backend="triton")

    def ref_fn(x, ln_w, ln_b, w1, w2):
        return reference.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, None, w2, None, "none", False)

    _check_all("ln_gelu_mlp(residual=False)", ref_fn, [x, ln_w, ln_b, w1, w2], grads, triton_fn)


# LayerNorm's eps and constant rows. The cases above use eps 1e-6 / 1e-12 on rows of variance ~1, where eps changes
# nothing the tolerance can see: a kernel that ignored it passed. Here rows have variance ~eps (0.1 * randn, eps 1e-2,
# so eps halves rstd) and one token row is constant (variance 0: without eps its rstd is inf and LN(x) NaN).
LARGE_EPS = 1e-2


def _x_large_eps(B, N, C, dtype):
    x = _randn(B, N, C, dtype=dtype, scale=0.1)
    x[B - 1, N // 2] = 3.0  # one constant token row (exact in every dtype)
    return x


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ln_fused_qkv_large_eps_and_constant_row(backend, dtype):
    B, N, C, H = 2, 5, 64, 2
    x = _x_large_eps(B, N, C, dtype)
    ln_w, ln_b = _ln_params(C, dtype)
    w, b = _randn(3 * C, C, dtype=dtype, scale=C**-0.5), _randn(3 * C, dtype=dtype)
    grads = [_randn(B, H, N, C // H, dtype=dtype) for _ in range(3)]

    def backend_fn(x, ln_w, ln_b, w, b):
        return vk.ln_fused_qkv(x, ln_w, ln_b, LARGE_EPS, w, b, H, backend=backend)

    def ref_fn(x, ln_w, ln_b, w, b):
        return tuple(reference.ln_fused_qkv(x, ln_w, ln_b, LARGE_EPS, w, b, H))

    _check_all(f"ln_fused_qkv[{backend}]", ref_fn, [x, ln_w, ln_b, w, b], grads, backend_fn)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ln_gelu_mlp_large_eps_and_constant_row(backend, dtype):
    B, N, C, Hd = 2, 5, 64, 128
    x = _x_large_eps(B, N, C, dtype)
    ln_w, ln_b = _ln_params(C, dtype)
    w1, b1 = _randn(Hd, C, dtype=dtype, scale=C**-0.5), _randn(Hd, dtype=dtype)
    w2, b2 = _randn(C, Hd, dtype=dtype, scale=Hd**-0.5), _randn(C, dtype=dtype)
    grads = [_randn(B, N, C, dtype=dtype)]

    def backend_fn(x, ln_w, ln_b, w1, b1, w2, b2):
        return vk.ln_gelu_mlp(x, ln_w, ln_b, LARGE_EPS, w1, b1, w2, b2, backend=backend)

    def ref_fn(x, ln_w, ln_b, w1, b1, w2, b2):
        return reference.ln_gelu_mlp(x, ln_w, ln_b, LARGE_EPS, w1, b1, w2, b2)

    _check_all(f"ln_gelu_mlp[{backend}]", ref_fn, [x, ln_w, ln_b, w1, b1, w2, b2], grads, backend_fn)


# A residual stream in (N, B, C) memory order (sequence-first, as nn.MultiheadAttention keeps it): its batch and
# token strides do not merge into one row stride. The cases above only ever slice contiguous residuals, where they
# always merge, so a kernel indexing the residual's rows as b * N + n with one stride passed. The output gradient
# is (N, B, C)-ordered too: ln_gelu_mlp's LN backward adds it to dx as the residual's own gradient.
def _sequence_first(B, N, C, dtype):
    return _randn(N, B, C, dtype=dtype).transpose(0, 1)  # (B, N, C), strides (C, B * C, 1)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_proj_residual_sequence_first_residual(backend, dtype):
    B, N, C = 2, 5, 64
    o, residual = _sequence_first(B, N, C, dtype), _sequence_first(B, N, C, dtype)
    w, b = _randn(C, C, dtype=dtype, scale=C**-0.5), _randn(C, dtype=dtype)
    grads = [_sequence_first(B, N, C, dtype)]

    def backend_fn(o, w, b, residual):
        return vk.proj_residual(o, w, b, residual, backend=backend)

    _check_all(f"proj_residual[{backend}]", reference.proj_residual, [o, w, b, residual], grads, backend_fn)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ln_gelu_mlp_sequence_first_residual(backend, dtype):
    B, N, C, Hd, eps = 2, 5, 64, 128, 1e-6
    x = _sequence_first(B, N, C, dtype)
    ln_w, ln_b = _ln_params(C, dtype)
    w1, b1 = _randn(Hd, C, dtype=dtype, scale=C**-0.5), _randn(Hd, dtype=dtype)
    w2, b2 = _randn(C, Hd, dtype=dtype, scale=Hd**-0.5), _randn(C, dtype=dtype)
    grads = [_sequence_first(B, N, C, dtype)]

    def backend_fn(x, ln_w, ln_b, w1, b1, w2, b2):
        return vk.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, b1, w2, b2, backend=backend)

    def ref_fn(x, ln_w, ln_b, w1, b1, w2, b2):
        return reference.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, b1, w2, b2)

    _check_all(f"ln_gelu_mlp[{backend}]", ref_fn, [x, ln_w, ln_b, w1, b1, w2, b2], grads, backend_fn)


def test_ln_stats_two_pass_where_one_pass_cancels():
    """Rows with mean 100x their spread: the kernel's mean / rstd match float64 to ~1e-6, and the inputs are hard
    enough that the one-pass E[x^2] - E[x]^2 variance in fp32 misses the tolerance (so the test can fail)."""
    x = _x(3, 7, 96, F32, "shifted")
    mean, rstd = block.ln_stats(x, 1e-12)
    xd = x.double().reshape(-1, 96)
    mean_ref = xd.mean(-1)
    rstd_ref = ((xd - mean_ref[:, None]) ** 2).mean(-1).add(1e-12).rsqrt()
    assert rel_error(mean, mean_ref) < 1e-6 and rel_error(rstd, rstd_ref) < 1e-5
    x2 = x.reshape(-1, 96)
    one_pass = ((x2 * x2).mean(-1) - x2.mean(-1) ** 2).add(1e-12).rsqrt()
    assert rel_error(one_pass, rstd_ref) > 1e-5


def test_backends_agree_and_auto_is_torch():
    B, N, C, H = 1, 3, 64, 2
    x = _x(B, N, C, F32, "plain")
    ln_w, ln_b = _ln_params(C, F32)
    w, b = _randn(3 * C, C, dtype=F32, scale=C**-0.5), _randn(3 * C, dtype=F32)
    auto = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, H)
    torch_out = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, H, backend="torch")
    ref = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, H, backend="reference")
    for a, t, r in zip(auto, torch_out, ref, strict=True):
        assert torch.equal(a, t)
        assert rel_error(t, r) < 1e-5
    ln = F.layer_norm(x, (C,), ln_w, ln_b, 1e-6)
    w1, w2 = _randn(128, C, dtype=F32), _randn(C, 128, dtype=F32)
    out = vk.ln_gelu_mlp(x, ln_w, ln_b, 1e-6, w1, None, w2, None, backend="torch")
    assert torch.allclose(out, x + F.linear(F.gelu(F.linear(ln, w1)), w2), atol=1e-5)


def test_bad_arguments_are_named():
    C = 64
    x = _randn(1, 3, C, dtype=F32)
    ln_w, ln_b = _ln_params(C, F32)
    w, b = _randn(3 * C, C, dtype=F32), _randn(3 * C, dtype=F32)
    with pytest.raises(ValueError, match="ln_weight"):
        vk.ln_fused_qkv(x, _randn(C + 1, dtype=F32), ln_b, 1e-6, w, b, 2)
    with pytest.raises(ValueError, match="eps"):
        vk.ln_fused_qkv(x, ln_w, ln_b, 0.0, w, b, 2)
    with pytest.raises(TypeError, match="qkv_weight"):
        vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w.half(), b, 2)
    with pytest.raises(ValueError, match="qkv_weight"):
        vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w[:C], b, 2)
    with pytest.raises(ValueError, match="num_heads"):
        vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, 3)
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs"):  # CPU tensors (on a GPU too)
        vk.ln_fused_qkv(*(t.cpu() for t in (x, ln_w, ln_b)), 1e-6, w.cpu(), b.cpu(), 2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, 2, backend="fast")
    with pytest.raises(ValueError, match="multiples of 8"):
        vk.proj_residual(_randn(1, 3, 20, dtype=F32), _randn(20, 20, dtype=F32), None, _randn(1, 3, 20, dtype=F32),
                          backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="residual"):
        vk.proj_residual(x, _randn(C, C, dtype=F32), None, _randn(1, 4, C, dtype=F32))
    with pytest.raises(ValueError, match="residual"):
        vk.ln_gelu_mlp(x, ln_w, ln_b, 1e-6, _randn(128, C, dtype=F32), None, _randn(32, 128, dtype=F32), None)
    with pytest.raises(ValueError, match="approximate"):
        w1, w2 = _randn(128, C, dtype=F32), _randn(C, 128, dtype=F32)
        vk.ln_gelu_mlp(x, ln_w, ln_b, 1e-6, w1, None, w2, None, approximate="x")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        vk.ln_gelu_mlp(None, ln_w, ln_b, 1e-6, _randn(128, C, dtype=F32), None, _randn(C, 128, dtype=F32), None)


# ----------------------------------------------------------------------------------------------------
# static: the new kernels compile for sm_80 / sm_90 without spills, on tensor cores
# ----------------------------------------------------------------------------------------------------
REPORT = """
import json, sys, torch
from vit_kernels.triton.block import compile_report
arch = int(sys.argv[1])
rows = compile_report(arch, dtypes=(torch.float16, torch.float32))
# the 64-row "small" tiles of batch 1 (the row kernels do not depend on the batch: compiled once above)
gemms = ("ln_qkv_fwd", "proj_residual_fwd", "ln_mlp_fc1", "mlp_fc2_residual")
rows += compile_report(arch, shapes=((1, 197, 768, 12),), dtypes=(torch.bfloat16,), kernels=gemms)
print(json.dumps(rows))
"""
KERNELS = {"ln_qkv_fwd", "proj_residual_fwd", "ln_mlp_fc1", "mlp_fc2_residual", "ln_stats", "ln_apply", "ln_bwd"}
NO_DOT = {"ln_stats", "ln_apply", "ln_bwd"}


@pytest.mark.skipif(not ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available here")
@pytest.mark.parametrize("arch", [80, 90])
def test_block_kernels_compile_without_spills_on_tensor_cores(arch):
    rows = compile_report_rows(REPORT, arch)
    assert {row["kernel"] for row in rows} == KERNELS
    # fp32 once per dot precision (exact "ieee", PyTorch's default, and "tf32"), as tests/test_static_kernels.py
    for variant in (("fp16", None), ("fp32", "ieee"), ("fp32", "tf32")):
        assert {row["kernel"] for row in rows if (row["dtype"], row["precision"]) == variant} == KERNELS, variant
    for row in rows:
        what = f"{row} on sm_{arch}"
        assert row["n_spills"] == 0, f"{what}: {row['n_spills']} bytes of register spills"
        assert 0 < row["n_regs"] <= 255, f"{what}: {row['n_regs']} registers"
        assert row["shared"] <= SMEM_LIMIT[arch], f"{what}: {row['shared']} bytes of shared memory"
        if row["kernel"] in NO_DOT:
            continue
        if row["precision"] == "ieee":  # exact fp32 dots are FMA loops: a tensor-core instruction would be tf32
            assert not (row["wgmma"] or row["mma"]), f"{what}: tensor-core instruction in an ieee kernel"
        else:
            assert row["wgmma"] if arch == 90 else row["mma"], f"{what}: no tensor-core instruction in the PTX"


def test_autocast_casts_inputs_and_returns_grads_in_their_dtype():
    C, H = 64, 2
    x = _randn(1, 5, C, dtype=F32).requires_grad_()
    ln_w, ln_b = (t.requires_grad_() for t in _ln_params(C, F32))
    w = _randn(3 * C, C, dtype=F32, scale=C**-0.5).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=BF16):
        q, k, v = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, None, H, backend="triton")
    assert q.dtype == BF16
    ref = reference.ln_fused_qkv(*_double([x, ln_w, ln_b]), 1e-6, w.double(), None, H)
    assert rel_error(q, ref[0]) < 2e-2
    (q.float().sum() + k.float().sum() + v.float().sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == F32 and torch.isfinite(t.grad).all() for t in (x, ln_w, ln_b, w))


# ----------------------------------------------------------------------------------------------------
# the ViT block takes the fused ops on the kernel backends (whole-model parity: tests/test_vit.py)
# ----------------------------------------------------------------------------------------------------
def _spy_ops(monkeypatch):
    import vit_kernels as vk

    seen = []
    for op in ("fused_qkv", "gelu_mlp", "ln_fused_qkv", "proj_residual", "ln_gelu_mlp"):
        original = getattr(vk, op)

        def spy(*args, _original=original, _op=op, **kwargs):
            seen.append(_op)
            return _original(*args, **kwargs)

        monkeypatch.setattr(vk, op, spy)
    return seen


@pytest.mark.parametrize("backend, fused", [("triton", True), ("cuda", True), ("torch", False), ("reference", False)])
def test_vit_block_uses_fused_ops_on_the_kernel_backends(monkeypatch, backend, fused):
    import vit

    skip_unless_runs(backend)

    seen = _spy_ops(monkeypatch)
    model = vit.VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=64, depth=1, num_heads=2,
                                  backend=backend).to(DEVICE)  # fmt: skip
    model.eval()(_randn(1, 3, 16, 16, dtype=F32))
    assert seen == (["ln_fused_qkv", "proj_residual", "ln_gelu_mlp"] if fused else ["fused_qkv", "gelu_mlp"])


def test_vit_block_with_drop_path_in_training_stays_unfused(monkeypatch):
    import vit

    seen = _spy_ops(monkeypatch)
    model = vit.VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=64, depth=2, num_heads=2,
                                  drop_path_rate=0.5, backend="triton").to(DEVICE)  # fmt: skip
    model.train()(_randn(2, 3, 16, 16, dtype=F32))
    # drop-path rates rise linearly from 0: the first block has none (fused), the second drops (unfused)
    assert seen == ["ln_fused_qkv", "proj_residual", "ln_gelu_mlp", "fused_qkv", "gelu_mlp"]
    seen.clear()
    model.eval()(_randn(2, 3, 16, 16, dtype=F32))
    assert seen == ["ln_fused_qkv", "proj_residual", "ln_gelu_mlp"] * 2


@pytest.mark.parametrize("grad", [False, True])
def test_ln_gelu_mlp_writes_the_pre_activation_only_for_autograd(monkeypatch, grad):
    """Under no_grad fc1 stores GELU(hidden) only: one (M, hidden) buffer instead of two, and the result is the same."""
    B, N, C, Hd, eps = 1, 5, 64, 128, 1e-6
    shapes = []

    def recording_alloc(*shape, like, dtype=None):
        shapes.append(shape)
        return nan_alloc(*shape, like=like, dtype=dtype)

    monkeypatch.setattr(vit_triton, "alloc", recording_alloc)
    x = _x(B, N, C, F32, "plain").requires_grad_(grad)
    ln_w, ln_b = _ln_params(C, F32)
    w1, b1, w2 = _randn(Hd, C, dtype=F32, scale=C**-0.5), _randn(Hd, dtype=F32), _randn(C, Hd, dtype=F32)
    with torch.set_grad_enabled(grad):
        out = vk.ln_gelu_mlp(x, ln_w, ln_b, eps, w1, b1, w2, None, backend="triton")
    assert shapes.count((B * N, Hd)) == (2 if grad else 1)
    assert out.requires_grad == grad
    ref = reference.ln_gelu_mlp(*_double([x.detach(), ln_w, ln_b]), eps, w1.double(), b1.double(), w2.double(), None)
    assert rel_error(out, ref) <= TOLERANCES[F32]


def test_torch_compile_sees_one_node_per_op_no_graph_break(monkeypatch):
    """The triton ops are torch.library custom ops: torch.compile (fullgraph) runs a fused block forward and
    backward without tracing into the Triton launches, with the eager results. The dispatch caches start empty,
    as in a process that compiles before any eager call (find_spec under dynamo was a graph break)."""
    from vit_kernels import dispatch

    monkeypatch.setattr(dispatch, "_MODULE_FOUND", {})
    torch._dynamo.reset()
    C, H, Hd = 64, 2, 128
    x = _randn(1, 5, C, dtype=F32)
    ln_w, ln_b = _ln_params(C, F32)
    w, pw, pb = _randn(3 * C, C, dtype=F32, scale=C**-0.5), _randn(C, C, dtype=F32, scale=C**-0.5), _randn(C, dtype=F32)
    w1, w2 = _randn(Hd, C, dtype=F32, scale=C**-0.5), _randn(C, Hd, dtype=F32, scale=Hd**-0.5)
    params = [t.requires_grad_(True) for t in (x, ln_w, ln_b, w, pw, pb, w1, w2)]

    def fused_block(x, ln_w, ln_b, w, pw, pb, w1, w2):
        q, k, v = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, None, H, backend="triton")
        o = q.transpose(1, 2).reshape(x.shape) + v.transpose(1, 2).reshape(x.shape) * k.mean()
        x = vk.proj_residual(o, pw, pb, x, backend="triton")
        return vk.ln_gelu_mlp(x, ln_w, ln_b, 1e-6, w1, None, w2, None, backend="triton")

    explanation = torch._dynamo.explain(fused_block)(*params)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(fused_block, backend="aot_eager", fullgraph=True)(*params)
    grads = torch.autograd.grad(out.sum(), params)
    expected = fused_block(*params)
    expected_grads = torch.autograd.grad(expected.sum(), params)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(TIMM_MISSING is not None, reason=str(TIMM_MISSING))
def test_vit_on_the_fused_path_matches_timm(highest_precision):
    """A timm checkpoint in our ViT on backend="triton" (every block fused): timm's logits and gradients."""
    from timm.models.vision_transformer import VisionTransformer

    import vit

    tiny = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=2)
    timm_model = VisionTransformer(**tiny).eval()
    with torch.no_grad():  # timm zero-inits biases and unit-inits norms: randomise them so the mapping matters
        for name, p in timm_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    timm_model.to(DEVICE)
    ours = vit.VisionTransformer(backend="triton", **tiny).to(DEVICE).eval()
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    x, g = _randn(2, 3, 32, 32, dtype=F32), _randn(2, 10, dtype=F32)
    results = []
    for model in (timm_model, ours):
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.backward(g)
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    assert rel_error(logits, ref_logits) < 1e-5
    for name, ref in ref_grads.items():
        assert rel_error(grads[name], ref) < 1e-5, name
