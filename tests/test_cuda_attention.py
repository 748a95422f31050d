"""CUDA C++ flash attention (csrc/attention_*.cu via vit_kernels/cuda/attention.py): forward, lse, every gradient.

GPU tests go through the public op (`vk.attention(..., backend="cuda")` and `.backward()`) and compare with the
float64 reference (`vit_kernels.reference.attention` on float64 copies of exactly the values the kernel sees)
by relative error with per-dtype tolerances, at odd token counts (1, 17, 197, 257: never a multiple of a tile)
and every supported head dim, on contiguous tensors and on views of a packed (B, N, 3, H, D) qkv tensor.
Every buffer the wrapper allocates (out, lse, delta, dq, dk, dv) starts as NaN, so an element a kernel never
writes fails the test. CPU tests check the error paths and the launchers' preconditions, which run before any
CUDA call.
"""

import pytest
import torch
from conftest import TOLERANCES, attention_reference, flash_order_grads, rel_error

import vit_kernels as vk
from vit_kernels import cuda as vit_cuda
from vit_kernels import reference
from vit_kernels.cuda import attention as cuda_attention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
HEAD_DIMS = [32, 48, 64, 80, 96, 128]
HALF = 1  # DType code of fp16 (csrc/common.cuh)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _extension():
    try:
        from vit_kernels import _C
    except ImportError as exc:
        pytest.skip(f"vit_kernels._C not built here ({exc})")
    return _C


def _nan_empty(shape, like, dtype=None):
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the wrapper allocates (out, lse, delta, dq, dk, dv) starts as NaN."""
    monkeypatch.setattr(vit_cuda, "empty", _nan_empty)


def _qkv_leaves(B, H, N, D, dtype, layout):
    """Leaves to differentiate and the (B, H, N, D) views of them that the op sees."""
    if layout == "contiguous":
        leaves = [torch.randn(B, H, N, D, device="cuda").to(dtype).requires_grad_(True) for _ in range(3)]
        return leaves, leaves
    if layout == "packed":  # timm's qkv: views of one (B, N, 3, H, D) tensor, strides (3NHD, D, 3HD, 1)
        qkv = torch.randn(B, N, 3, H, D, device="cuda").to(dtype).requires_grad_(True)
        return [qkv], list(qkv.permute(2, 0, 3, 1, 4).unbind(0))
    if layout == "transposed":  # unit stride along N, not D: the wrapper copies
        leaves = [torch.randn(B, H, D, N, device="cuda").to(dtype).requires_grad_(True) for _ in range(3)]
        return leaves, [t.transpose(-2, -1) for t in leaves]
    if layout == "offset":  # one element into a larger buffer: 16-bit tiles are misaligned, the wrapper copies
        buf = torch.randn(3 * B * H * N * D + 1, device="cuda").to(dtype).requires_grad_(True)
        return [buf], list(buf[1:].view(3, B, H, N, D).unbind(0))
    raise ValueError(layout)


def _eager_error(q, k, v, dout, scale, ref_grads):
    """Relative errors of plain eager attention's gradients in the inputs' own dtype (the parity baseline)."""
    qe, ke, ve = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    reference.attention(qe, ke, ve, scale).backward(dout)
    return [rel_error(g, r) for g, r in zip((qe.grad, ke.grad, ve.grad), ref_grads, strict=True)]


def _check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def _check_grads(grads, ref_grads, dtype, eager_errors) -> None:
    """Each gradient within the dtype's tolerance, with two documented exceptions:
    - N = 1: softmax over one key is constant, so dq = dk = 0 exactly; the kernel gets there as P * (dP - delta)
      with dP (tensor-core dot) and delta (rowsum(dO * O)) equal up to fp32 rounding, so it must be small next
      to the terms that cancel, whose size is dv's (P dO);
    - bf16: dS = P * (dP - delta) is rounded to bf16 for the tensor-core product, which costs ~1% at sharp
      softmaxes in any flash kernel and in eager torch; the error may then be up to 2x plain eager bf16's
      (FlashAttention's parity rule)."""
    tol = TOLERANCES[dtype]
    for name, g, ref, eager in zip(("dq", "dk", "dv"), grads, ref_grads, eager_errors, strict=True):
        assert torch.isfinite(g).all(), f"{name}: not finite"
        if name != "dv" and ref.shape[2] == 1:
            err = (g.double().norm() / ref_grads[2].norm()).item()
            assert err <= tol, f"{name}: |{name}| / |dv| = {err:.3g} > {tol:.1g} where the exact value is 0"
        else:
            _check(name, g, ref, max(tol, 2 * eager) if dtype == BF16 else tol)


def _grads_of_views(leaves, layout, B, H, N, D):
    if layout == "contiguous":
        return [t.grad for t in leaves]
    if layout == "packed":
        return list(leaves[0].grad.permute(2, 0, 3, 1, 4).unbind(0))
    if layout == "transposed":
        return [t.grad.transpose(-2, -1) for t in leaves]
    return list(leaves[0].grad[1:].view(3, B, H, N, D).unbind(0))


def _run_and_check(dtype, N, D, layout, scale=None, B=2, H=3):
    leaves, (q, k, v) = _qkv_leaves(B, H, N, D, dtype, layout)
    scale_value = D**-0.5 if scale is None else scale
    dout = torch.randn(B, H, N, D, device="cuda").to(dtype)

    out = vk.attention(q, k, v, scale=scale, backend="cuda")
    out.backward(dout)

    ref_out, _ref_lse, ref_grads = attention_reference(q, k, v, dout, scale_value)
    assert out.shape == (B, H, N, D) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out (B, N, H, D) in memory"
    _check("out", out, ref_out, TOLERANCES[dtype])
    grads = _grads_of_views(leaves, layout, B, H, N, D)
    eager = _eager_error(q, k, v, dout, scale_value, ref_grads) if dtype == BF16 else [0.0] * 3
    _check_grads(grads, ref_grads, dtype, eager)


# ----------------------------------------------------------------------------------------------------
# GPU parity
# ----------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 17, 197, 257])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("layout", ["contiguous", "packed"])
def test_attention_matchesattention_reference(poisoned, dtype, N, D, layout):
    _run_and_check(dtype, N, D, layout)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "offset"])
@pytest.mark.parametrize("N, D", [(17, 80), (197, 64)])
def test_layouts_the_wrapper_copies(poisoned, dtype, layout, N, D):
    _, views = _qkv_leaves(1, 2, N, D, dtype, layout)
    copied = cuda_attention._operand(views[0]).data_ptr() != views[0].data_ptr()
    # fp32 SIMT kernels read single elements: only the transposed view (D not unit-stride) needs a copy.
    assert copied == (layout == "transposed" or dtype != F32), "the test must exercise the path it names"
    _run_and_check(dtype, N, D, layout, B=1, H=2)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, D", [(1, 64), (197, 80), (257, 128)])
def test_launcher_outputs_lse_and_layouts(poisoned, dtype, N, D):
    """The contract's layouts (out (B, N, H, D) memory, contiguous grads) and lse against float64."""
    B, H, scale = 2, 2, 0.3
    q, k, v = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(3))
    dout = torch.randn(B, N, H, D, device="cuda").to(dtype).transpose(1, 2)
    out, lse = cuda_attention.attention_fwd(q, k, v, scale, False)
    dq, dk, dv = cuda_attention.attention_bwd(dout, q, k, v, out, lse, scale, False)
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, scale)
    assert out.transpose(1, 2).is_contiguous() and lse.shape == (B, H, N) and lse.dtype == F32
    assert all(g.is_contiguous() and g.shape == (B, H, N, D) and g.dtype == dtype for g in (dq, dk, dv))
    _check("out", out, ref_out, TOLERANCES[dtype])
    _check("lse", lse, ref_lse, TOLERANCES[F32] if dtype == F32 else 1e-3)
    eager = _eager_error(q, k, v, dout, scale, ref_grads) if dtype == BF16 else [0.0] * 3
    _check_grads((dq, dk, dv), ref_grads, dtype, eager)


@needs_gpu
@pytest.mark.parametrize("dtype, N, D", [(F32, 1, 32), (F16, 17, 80), (BF16, 197, 64), (F16, 257, 128)])
def test_packed_gradients_are_the_same_numbers_in_one_buffer(poisoned, dtype, N, D):
    """attention_bwd(packed=True): dq, dk, dv bit for bit as unpacked, written as the q / k / v slices of one
    (B, N, 3, H, D) buffer (NaN-poisoned first, so a slice the kernels miss fails), i.e. one (B*N, 3HD) dQKV; on
    the tensor-core kernels (16-bit) and the SIMT ones (fp32)."""
    B, H = 2, 3
    q, k, v = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(3))
    dout = torch.randn(B, N, H, D, device="cuda").to(dtype).transpose(1, 2)
    out, lse = cuda_attention.attention_fwd(q, k, v, D**-0.5, False)
    apart = cuda_attention.attention_bwd(dout, q, k, v, out, lse, D**-0.5, False)
    packed = cuda_attention.attention_bwd(dout, q, k, v, out, lse, D**-0.5, False, packed=True)
    base, step = packed[0].data_ptr(), H * D * packed[0].element_size()
    assert [g.data_ptr() for g in packed] == [base, base + step, base + 2 * step]
    assert all(g.stride() == (N * 3 * H * D, D, 3 * H * D, 1) for g in packed)
    for name, a, p in zip(("dq", "dk", "dv"), apart, packed, strict=True):
        assert torch.isfinite(p).all() and torch.equal(a, p), name


@needs_gpu
def test_eager_backward_hands_the_cuda_qkv_backward_one_packed_dqkv(monkeypatch):
    """fused_qkv -> attention -> backward on the cuda backend's eager path: attention's gradients arrive at the QKV
    projection's backward as slices of one buffer, which the sm_90a path reads in place as dQKV (no gather copy),
    and the gradients are right."""
    from vit_kernels.cuda import linear

    seen = []
    original = linear._packed_qkv

    def spy(dq, dk, dv):
        packed = original(dq, dk, dv)
        seen.append(packed is not None)
        return packed

    monkeypatch.setattr(linear, "_packed_qkv", spy)
    B, N, C, H = 2, 197, 128, 2
    x = torch.randn(B, N, C, device="cuda", dtype=BF16, requires_grad=True)
    w = (torch.randn(3 * C, C, device="cuda") * C**-0.5).to(BF16).requires_grad_(True)
    b = torch.randn(3 * C, device="cuda", dtype=BF16, requires_grad=True)
    q, k, v = vk.fused_qkv(x, w, b, H, backend="cuda")
    vk.attention(q, k, v, backend="cuda").sum().backward()
    # the sm_90a GEMMs read dQKV as one matrix (else a gather copy); mma.sync reads any three views with one layout
    assert seen == ([True] if linear.gemm_path(x.device, BF16).startswith("sm_90a") else []), seen
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    qr, kr, vr = reference.fused_qkv(*leaves, H)
    reference.attention(qr, kr, vr, (C // H) ** -0.5).sum().backward()
    for name, got, ref in zip(("dx", "dweight", "dbias"), (x.grad, w.grad, b.grad), leaves, strict=True):
        assert rel_error(got, ref.grad) <= TOLERANCES[BF16], name


@needs_gpu
def test_packed_views_are_read_in_place():
    qkv = torch.randn(2, 197, 3, 3, 64, device="cuda", dtype=F16)
    for view in qkv.permute(2, 0, 3, 1, 4).unbind(0):
        assert cuda_attention._operand(view) is view


@needs_gpu
@pytest.mark.parametrize("dtype", [F16, F32])
def test_large_logits_stay_finite(poisoned, dtype):
    """Scores of several hundred: the online softmax must subtract the running max before exp2."""
    _run_and_check(dtype, 197, 64, "contiguous", scale=4.0, B=1, H=2)


@needs_gpu
@pytest.mark.parametrize("dtype", [F32, F16])
def test_very_negative_lse(poisoned, dtype):
    """Every logit near -144 (lse far below exp's fp32 range): the padding keys of the last tile score 0 and
    must be masked before exp2, or they become inf and NaN in the backward's registers."""
    B, H, N, D = 1, 2, 40, 64
    u = torch.nn.functional.normalize(torch.randn(B, H, 1, D, device="cuda"), dim=-1) * 12
    q = (-u + 0.01 * torch.randn(B, H, N, D, device="cuda")).to(dtype)
    k = (u + 0.01 * torch.randn(B, H, N, D, device="cuda")).to(dtype)
    v, dout = (torch.randn(B, H, N, D, device="cuda").to(dtype) for _ in range(2))
    out, lse = cuda_attention.attention_fwd(q, k, v, 1.0, False)
    grads = cuda_attention.attention_bwd(dout, q, k, v, out, lse, 1.0, False)
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, 1.0)
    assert ref_lse.max() < -100, "the test must push lse below exp's fp32 range"
    # Logits of ~144 carry rounding of ~1e-5 in fp32, amplified in dq and dk: every k_j is u plus 1% noise, so
    # dq = sum_j dS_j k_j cancels u's share (about 150x). In fp16 the kernel rounds P and dS to fp16 for the
    # tensor cores; amplified alike that alone gives dq 3-5e-2 (flash_order_grads; the H100 measured 5.0e-2),
    # so 16-bit dq and dk may be within twice that model's error instead.
    tol = 1e-4 if dtype == F32 else 2e-2
    _check("out", out, ref_out, tol)
    model = flash_order_grads(q, k, v, dout, 1.0, round_to=dtype) if dtype != F32 else (None, None)
    for name, got, ref, rounded in zip(("dq", "dk", "dv"), grads, ref_grads, (*model, None), strict=True):
        _check(name, got, ref, tol if rounded is None else max(tol, 2 * rel_error(rounded, ref)))


@needs_gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_negative_scale(poisoned, dtype):
    """Masked keys are set to -inf after scaling; a negative scale must not turn them into +inf."""
    _run_and_check(dtype, 17, 32, "contiguous", scale=-0.2, B=1, H=2)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_deterministic(dtype):
    q, k, v, dout = (torch.randn(2, 3, 197, 64, device="cuda").to(dtype) for _ in range(4))
    out, lse = cuda_attention.attention_fwd(q, k, v, 0.125, False)
    first = cuda_attention.attention_bwd(dout, q, k, v, out, lse, 0.125, False)
    second = cuda_attention.attention_bwd(dout, q, k, v, out, lse, 0.125, False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# CPU: error paths, launcher preconditions, layout helpers (no GPU needed)
# ----------------------------------------------------------------------------------------------------
def test_cuda_backend_on_cpu_tensors_is_a_clear_value_error():
    q = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match="backend='cuda'"):
        vk.attention(q, q, q, backend="cuda")


def test_wrappers_reject_cpu_tensors():
    q = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match="needs CUDA tensors, but q is on cpu"):
        cuda_attention.attention_fwd(q, q, q, 0.125, False)
    lse = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="needs CUDA tensors, but dout is on cpu"):
        cuda_attention.attention_bwd(q, q, q, q, q, lse, 0.125, False)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        cuda_attention.attention_fwd(q, None, q, 0.125, False)


def test_extension_binds_the_attention_launchers():
    _C = _extension()
    for name in ("attention_fwd", "attention_bwd"):
        assert callable(getattr(_C, name, None)), f"_C.{name} is not bound"


def _fwd_args(**overrides):
    # Null pointers are fine: each call below must fail its precondition checks before any CUDA call.
    s = (3 * 5 * 64, 64, 3 * 64)  # a packed (B, N, 3, H, D) view with H = 1, D = 64
    args = dict(q=0, q_strides=s, k=0, k_strides=s, v=0, v_strides=s, out=0, out_strides=(5 * 64, 64, 64), lse=0,
                B=1, H=1, N=5, D=64, scale=0.125, dtype=HALF, stream=0)  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(D=40), r"head dim D=40 is not supported"),
        (dict(D=256), r"head dim D=256 is not supported"),
        (dict(dtype=7), r"unknown dtype code 7"),
        (dict(N=0), r"B, H and N must be positive"),
        (dict(q=8), r"q: pointer must be 16-byte aligned"),
        (dict(v=0x1008), r"v: pointer must be 16-byte aligned"),
        (dict(k_strides=(960, 64, 196)), r"k: strides \(B, H, N\) must be multiples of 8 elements"),
        (dict(out_strides=(320, 68, 64)), r"out: strides \(B, H, N\) must be multiples of 8 elements"),
        (dict(lse=2), r"lse: pointer must be 4-byte aligned"),
        (dict(out_strides=(320, 64, 32)), r"out: \(B, H, N\) strides \(320, 64, 32\) make rows overlap at B=1, H=1"),
        (dict(B=2, H=2, out_strides=(320, 64, 128)), r"out: \(B, H, N\) strides \(320, 64, 128\) make rows overlap"),
    ],
)
def test_fwd_launcher_checks_preconditions(overrides, message):
    _C = _extension()
    with pytest.raises(ValueError, match=message):
        _C.attention_fwd(**_fwd_args(**overrides))


def test_bwd_launcher_checks_preconditions():
    _C = _extension()
    s = (5 * 64, 5 * 64, 64)
    args = dict(dout=0, dout_strides=s, q=0, q_strides=s, k=0, k_strides=s, v=0, v_strides=s, out=0, out_strides=s,
                lse=0, delta=0, dq=0, dk=0, dv=0, grad_strides=s, B=1, H=1, N=5, D=64, scale=0.125, dtype=HALF,
                stream=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"dout: strides \(B, H, N\) must be multiples of 8 elements"):
        _C.attention_bwd(**{**args, "dout_strides": (320, 320, 66)})
    with pytest.raises(ValueError, match=r"head dim D=72 is not supported"):
        _C.attention_bwd(**{**args, "D": 72})
    with pytest.raises(ValueError, match=r"lse and delta: pointers must be 4-byte aligned"):
        _C.attention_bwd(**{**args, "delta": 6})
    with pytest.raises(ValueError, match=r"16-bit gradients are stored in pairs, so their \(B, H, N\) strides must"):
        _C.attention_bwd(**{**args, "grad_strides": (5 * 64, 5 * 64, 65)})
    with pytest.raises(ValueError, match=r"dq, dk, dv: rows of D elements must not overlap \(N stride >= D\)"):
        _C.attention_bwd(**{**args, "grad_strides": (5 * 64, 5 * 64, 32)})
    # Heads or batches that land on each other's rows, and one buffer for two gradients, are refused too.
    many = {**args, "B": 2, "H": 3, "dq": 0, "dk": 1024, "dv": 2048, "grad_strides": (960, 320, 64)}
    for strides in [(960, 0, 64), (0, 320, 64), (960, 16, 192), (960, 64, 64), (900, 320, 64)]:
        with pytest.raises(ValueError, match=r"dq, dk, dv: \(B, H, N\) strides \(.*\) make rows overlap at B=2"):
            _C.attention_bwd(**{**many, "grad_strides": strides})
    with pytest.raises(ValueError, match=r"dq, dk, dv: \(B, H, N\) strides must not be negative"):
        _C.attention_bwd(**{**many, "grad_strides": (960, -320, 64)})
    with pytest.raises(ValueError, match=r"dq, dk, dv: three distinct buffers \(or slices\) are needed"):
        _C.attention_bwd(**{**many, "dv": 0})


@pytest.mark.skipif(torch.cuda.is_available(), reason="reaches the launch with made-up pointers: only without a GPU")
@pytest.mark.parametrize("layout", ["packed", "contiguous"])
def test_bwd_launcher_takes_the_gradient_layouts_python_allocates(layout):
    """The q / k / v slices of one packed (B, N, 3, H, D) buffer, and contiguous (B, H, N, D) gradients, pass the
    overlap checks and reach the launch (which fails here: no driver)."""
    B, H, N, D = 2, 3, 5, 64
    s = (H * N * D, N * D, D)
    grad = {"packed": (N * 3 * H * D, D, 3 * H * D), "contiguous": s}[layout]
    args = dict(dout=0, dout_strides=s, q=0, q_strides=s, k=0, k_strides=s, v=0, v_strides=s, out=0, out_strides=s,
                lse=0, delta=0, dq=0, dk=H * D * 2, dv=2 * H * D * 2, grad_strides=grad, B=B, H=H, N=N, D=D,
                scale=0.125, dtype=HALF, stream=0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"attn_delta_kernel failed: CUDA error \d+"):
        _extension().attention_bwd(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path, on a machine without a GPU")
def test_launch_failures_raise_runtime_error_naming_the_call():
    """Past the preconditions, a CUDA failure (here: no driver) is a RuntimeError that names the call."""
    _C = _extension()
    # fp32 takes the SIMT path, which reads single elements: odd strides pass the checks and reach the launch.
    with pytest.raises(RuntimeError, match=r"attn_fwd_simt_kernel failed: CUDA error \d+"):
        _C.attention_fwd(**_fwd_args(dtype=0, k_strides=(963, 65, 193)))
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute\(attn_fwd_kernel\) failed: CUDA error \d+"):
        _C.attention_fwd(**_fwd_args())


def test_layout_helpers_copy_only_what_the_kernels_cannot_read():
    packed = torch.randn(2, 5, 3, 4, 32, dtype=F16)
    views = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert all(cuda_attention._operand(t) is t for t in views)
    transposed = torch.randn(2, 4, 32, 5, dtype=F16).transpose(-2, -1)
    copied = cuda_attention._operand(transposed)
    assert copied.is_contiguous() and torch.equal(copied, transposed)
    offset = torch.randn(2 * 4 * 5 * 32 + 1, dtype=F16)[1:].view(2, 4, 5, 32)  # 2 bytes past an aligned start
    assert offset.data_ptr() % 16 != 0
    copied = cuda_attention._operand(offset)
    assert copied.data_ptr() % 16 == 0 and torch.equal(copied, offset)
    offset32 = torch.randn(2 * 4 * 5 * 32 + 1)[1:].view(2, 4, 5, 32)  # fp32 SIMT path: read in place
    assert cuda_attention._operand(offset32) is offset32
    # A size-1 dim's stride is never used (and torch may report any value for it).
    assert cuda_attention._strides(torch.randn(1, 4, 1, 32)) == (0, 32, 0)


def test_poisoned_outputs_never_pass():
    """The poisoned fixture's buffers are all NaN, and a NaN anywhere is an infinite error."""
    buf = _nan_empty((2, 3), torch.zeros(1), torch.float32)
    assert torch.isnan(buf).all()
    ref = torch.randn(2, 3)
    out = ref.clone()
    out[1, 2] = float("nan")
    assert rel_error(out, ref) == float("inf")
