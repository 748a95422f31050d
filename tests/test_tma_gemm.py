"""The Hopper GEMMs (vit_kernels/triton/tma_gemm.py): every entry kernel against float64, and the ops' routing to them.

Under the interpreter (no GPU) linear.TMA_ARCHS includes the CPU, so these kernels run with small tiles and 4
persistent programs (each program walks several tiles). Shapes are ragged on purpose: M = 296 and 197 rows never
fill a tile, K = 80 is not a multiple of BLOCK_K, and A comes stored both ways ((M, K), and (K, M) as the weight
gradients read dY^T). Every output buffer is NaN before the kernel writes it. The parity of whole ops on this path
(forward and every gradient) is in test_linear.py and test_block_fusion.py; the sm_90 compile is checked in
test_static_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, nan_alloc, randn, rel_error, tf32_round, tf32_tolerance

from vit_kernels import triton as vit_triton
from vit_kernels.triton import block, linear, tma_gemm

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
M, K, N = 296, 80, 200  # N * 2 bytes and N * 4 bytes are multiples of 16: every operand is TMA-describable


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(vit_triton, "alloc", nan_alloc)


@pytest.fixture
def arch(device):
    """The launch tables' arch: 0 (the interpreter's small tiles) on CPU, 90 (the shipped configs) on Hopper."""
    arch = vit_triton.arch(device)
    if arch != 0 and arch not in tma_gemm.CONFIGS:
        pytest.skip(f"the TMA GEMMs need Hopper (sm_90); this GPU takes the sm_{arch} tables")
    return arch


def nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _check(name, out, ref, tol):
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element the kernel never wrote?)"
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.1g}"


def _operands(dtype, a_stored, device):
    """a (M, K) stored as (M, K) or as (K, M); b (K, N) for x @ W^T (stored (N, K)); bias (N,)."""
    a = randn(M, K, dtype=dtype, device=device)
    if a_stored == "transposed":
        a = a.t().contiguous().t()
    w = randn(N, K, dtype=dtype, device=device, scale=K**-0.5)
    return a, w.t(), randn(N, dtype=dtype, device=device)


def _product_tol(dtype, a, b, ref_fn):
    """The dtype's tolerance; for fp32 (tf32 dots) twice the error of ref_fn on tf32-rounded operands."""
    if dtype != F32:
        return TOLERANCES[dtype]
    return tf32_tolerance(ref_fn(tf32_round(a.double()), tf32_round(b.double())), ref_fn(a.double(), b.double()))


DTYPES = [F16, BF16, F32]  # fp32 runs tf32 dots: exact fp32 has no tensor-core path and stays on linear.py's kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_stored", ["rows", "transposed"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_store(device, arch, dtype, a_stored, has_bias):
    a, b, bias = _operands(dtype, a_stored, device)
    bias = bias if has_bias else None
    c = nan(M, N, dtype=dtype, device=device)
    tma_gemm.launch(*tma_gemm.store_args(a, b, c, bias, True, arch))
    ref = a.double() @ b.double() + (bias.double() if has_bias else 0.0)
    _check("c", c, ref, _product_tol(dtype, a, b, torch.matmul))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_layout", ["rows", "split_rows", "channels_first"])
def test_residual(device, arch, dtype, residual_layout):
    """out = a @ b + bias + residual; the residual read in place with any strides: (N, B, C) in memory, or with
    unit stride along tokens instead of channels."""
    a, b, bias = _operands(dtype, "rows", device)
    if residual_layout == "rows":
        residual = randn(M, N, dtype=dtype, device=device)
        rows = (residual, 1, N, 0, 1)
        flat = residual
    elif residual_layout == "split_rows":  # (B, T, C) = (8, 37, N) laid out (T, B, C): batch and token dims split
        residual = randn(37, 8, N, dtype=dtype, device=device).transpose(0, 1)
        rows = (residual, *block._rows(residual))
        flat = residual.reshape(M, N)
    else:
        residual = randn(N, M, dtype=dtype, device=device).t()
        rows = (residual, 1, 1, 0, M)
        flat = residual
    c = nan(M, N, dtype=dtype, device=device)
    tma_gemm.launch(*tma_gemm.residual_args(a, b, c, bias, rows, True, arch))
    ref = a.double() @ b.double() + bias.double() + flat.double()
    tol = _product_tol(dtype, a, b, lambda x, y: x @ y + bias.double() + flat.double())
    _check("c", c, ref, tol)


@pytest.fixture
def quarters(request, monkeypatch):
    """The GELU epilogues in halves or quarters of the tile (sm_90 ships quarters for 16-bit, halves for tf32; the
    interpreter's config halves)."""
    monkeypatch.setattr(tma_gemm, "_INTERPRETER_CONFIG", tma_gemm._INTERPRETER_CONFIG._replace(quarters=request.param))
    return request.param


# (dtype, quarters): both sub-tilings in fp16, what sm_90 ships for bf16 (quarters) and tf32 (halves)
GELU_CASES = [(F16, False), (F16, True), (BF16, True), (F32, False)]


@pytest.mark.parametrize("dtype, quarters", GELU_CASES, indirect=["quarters"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("store_pre", [True, False])
def test_gelu(device, arch, dtype, approximate, store_pre, quarters):
    """hidden = a @ b + bias (stored only when backward needs it) and act = GELU(hidden) from the rounded hidden."""
    a, b, bias = _operands(dtype, "rows", device)
    hidden = nan(M, N, dtype=dtype, device=device) if store_pre else None
    act = nan(M, N, dtype=dtype, device=device)
    tma_gemm.launch(*tma_gemm.gelu_args(a, b, hidden, act, bias, approximate == "tanh", True, arch))
    ref = a.double() @ b.double() + bias.double()
    if store_pre:
        _check("hidden", hidden, ref, _product_tol(dtype, a, b, lambda x, y: x @ y + bias.double()))
        _check("act vs GELU(stored hidden)", act, F.gelu(hidden.double(), approximate=approximate), TOLERANCES[dtype])
    _check("act", act, F.gelu(ref, approximate=approximate), 2 * _product_tol(dtype, a, b, torch.matmul))


@pytest.mark.parametrize("dtype, quarters", GELU_CASES, indirect=["quarters"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("store_act", [True, False])
def test_dgelu(device, arch, dtype, approximate, store_act, quarters):
    """dhidden = (dy @ W2) * GELU'(hidden), hidden read by TMA; act = GELU(hidden) where asked; the column sums of
    dhidden per row tile (the bias gradient), every row of the partial buffer written (it starts NaN)."""
    dy, b, _bias = _operands(dtype, "rows", device)
    hidden = randn(M, N, dtype=dtype, device=device)
    dhidden = nan(M, N, dtype=dtype, device=device)
    act = nan(M, N, dtype=dtype, device=device) if store_act else None
    part = nan(tma_gemm.dbias_rows(arch, dtype, M), N, dtype=F32, device=device)  # the bias gradient's row-tile sums
    tma_gemm.launch(*tma_gemm.dgelu_args(dy, b, hidden, dhidden, act, approximate == "tanh", True, arch, part))
    h = hidden.double().requires_grad_(True)
    dact = dy.double() @ b.double()
    (ref,) = torch.autograd.grad(F.gelu(h, approximate=approximate), h, dact)
    _check("dhidden", dhidden, ref, 2 * _product_tol(dtype, dy, b, torch.matmul))
    _check("dbias", part.sum(0), ref.sum(0), 2 * _product_tol(dtype, dy, b, torch.matmul))
    if store_act:
        _check("act", act, F.gelu(hidden.double(), approximate=approximate), TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 148, 64, 4), (3, 1, 40, 5), (1, 197, 48, 3)])  # (B, T, C, H)
def test_qkv_head_split(device, arch, dtype, shape):
    B, T, C, H = shape
    D = C // H
    x = randn(B * T, C, dtype=dtype, device=device)
    w = randn(3 * C, C, dtype=dtype, device=device, scale=C**-0.5)
    bias = randn(3 * C, dtype=dtype, device=device)
    q, k, v = (nan(B, H, T, D, dtype=dtype, device=device) for _ in range(3))
    tma_gemm.launch(*tma_gemm.qkv_args(x, w.t(), q, k, v, bias, T, True, arch))
    full = x.double() @ w.double().t() + bias.double()
    refs = full.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    tol = _product_tol(dtype, x, w.t(), lambda a, b: a @ b + bias.double())
    for name, out, ref in zip("qkv", (q, k, v), refs, strict=True):
        _check(name, out, ref, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [197, 296])
def test_weight_grad_split_k(device, arch, dtype, tokens, monkeypatch):
    """dW = dY^T @ X with K = tokens: A stored transposed, K cut into slices (2 under the interpreter; on a GPU this
    short K is not cut) whose fp32 partials (NaN-poisoned buffer, from vit_kernels.triton.alloc) torch adds in
    order."""
    dy = randn(tokens, 72, dtype=dtype, device=device)
    x = randn(tokens, 40, dtype=dtype, device=device)
    dw = nan(72, 40, dtype=dtype, device=device)
    allocs = []

    def alloc(*shape, like, dtype=None):
        allocs.append((shape, dtype))
        return nan_alloc(*shape, like=like, dtype=dtype)

    monkeypatch.setattr(vit_triton, "alloc", alloc)
    tma_gemm.weight_grad(dy.t(), x, dw, True, arch)
    if arch == 0:
        assert allocs == [((2, 72, 40), torch.float32)], allocs
    _check("dW", dw, dy.double().t() @ x.double(), _product_tol(dtype, dy.t(), x, torch.matmul))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_entry_kernel_at_the_shipped_sm90_configs(device, dtype):
    """The tests above run the interpreter's small tiles on the CPU; a Hopper GPU runs CONFIGS[90]: 128 x 256 x 64
    with quarter-tile GELU epilogues and a flattened store (128 x 128 x 32 in tf32) on a persistent grid of 132.
    Here every entry kernel runs at those configs (under the interpreter on the CPU), on shapes whose last tiles
    are ragged: 44 of 128 rows, 72 of 256 columns (so two of a tile's four quarters hold nothing), K = 192."""
    if device.type != "cpu" and vit_triton.arch(device) != 90:
        pytest.skip("the sm_90 configs run on Hopper, or on the CPU under the interpreter")
    Ms, Ns, Ks = 300, 584, 192
    a = randn(Ms, Ks, dtype=dtype, device=device)
    b = randn(Ns, Ks, dtype=dtype, device=device, scale=Ks**-0.5).t()
    bias = randn(Ns, dtype=dtype, device=device)
    ref = a.double() @ b.double() + bias.double()
    tol = 2 * _product_tol(dtype, a, b, lambda x, y: x @ y + bias.double())

    c = nan(Ms, Ns, dtype=dtype, device=device)
    tma_gemm.launch(*tma_gemm.store_args(a, b, c, bias, True, 90))
    _check("store", c, ref, tol)
    residual = randn(Ms, Ns, dtype=dtype, device=device)
    tma_gemm.launch(*tma_gemm.residual_args(a, b, c, bias, (residual, 1, Ns, 0, 1), True, 90))
    _check("residual", c, ref + residual.double(), tol)
    hidden, act = nan(Ms, Ns, dtype=dtype, device=device), nan(Ms, Ns, dtype=dtype, device=device)
    tma_gemm.launch(*tma_gemm.gelu_args(a, b, hidden, act, bias, False, True, 90))
    _check("gelu: hidden", hidden, ref, tol)
    _check("gelu: act", act, F.gelu(ref), tol)

    h = randn(Ms, Ns, dtype=dtype, device=device)
    dh, act = nan(Ms, Ns, dtype=dtype, device=device), nan(Ms, Ns, dtype=dtype, device=device)
    part = nan(tma_gemm.dbias_rows(90, dtype, Ms), Ns, dtype=F32, device=device)
    tma_gemm.launch(*tma_gemm.dgelu_args(a, b, h, dh, act, False, True, 90, part))
    hd = h.double().requires_grad_(True)
    (dh_ref,) = torch.autograd.grad(F.gelu(hd), hd, a.double() @ b.double())
    _check("dgelu: dhidden", dh, dh_ref, tol)
    _check("dgelu: dbias partial sums", part.sum(0), dh_ref.sum(0), tol)
    _check("dgelu: act", act, F.gelu(h.double()), TOLERANCES[dtype])

    B, T, C, H = 2, 150, 200, 5  # 3C = 600 columns: tiles straddle the q / k and k / v boundaries
    x, w = randn(B * T, C, dtype=dtype, device=device), randn(3 * C, C, dtype=dtype, device=device, scale=C**-0.5)
    qkv_bias = randn(3 * C, dtype=dtype, device=device)
    q, k, v = (nan(B, H, T, C // H, dtype=dtype, device=device) for _ in range(3))
    tma_gemm.launch(*tma_gemm.qkv_args(x, w.t(), q, k, v, qkv_bias, T, True, 90))
    full = (x.double() @ w.double().t() + qkv_bias.double()).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    for name, out, expected in zip("qkv", (q, k, v), full, strict=True):
        _check(f"qkv: {name}", out, expected, tol)

    dy, xs = randn(1000, 72, dtype=dtype, device=device), randn(1000, 40, dtype=dtype, device=device)
    dw = nan(72, 40, dtype=dtype, device=device)
    tma_gemm.weight_grad(dy.t(), xs, dw, True, 90)  # split along K = 1000 tokens at the sm_90 slice count
    _check("weight_grad", dw, dy.double().t() @ xs.double(), 2 * _product_tol(dtype, dy.t(), xs, torch.matmul))


def test_split_k_slices_fill_the_gpu():
    """The weight gradients of ViT-B/16 at B=256 (tiles of 128 x 256, K = 50,432 tokens) get work units that fill
    the last wave of 132 SMs to >= 90% with slices of >= 8 BLOCK_K steps; products with many tiles are not split."""
    for tiles in (54, 72):  # qkv dW (2304 x 768), mlp dW1 / dW2 (3072 x 768 and 768 x 3072)
        s = tma_gemm.split_k_slices(90, tiles, 50432, 64, 132)
        units = tiles * s
        assert units / (-(-units // 132) * 132) >= 0.9 and 50432 // s >= 8 * 64, (tiles, s)
    assert tma_gemm.split_k_slices(90, 1182, 50432, 64, 132) == 1  # ~9 waves already
    assert tma_gemm.split_k_slices(90, 6, 300, 64, 132) == 1  # too short to cut


@pytest.mark.parametrize("sms", [132, 114, 78, 42])  # H100 SXM / H200, H100 PCIe, H20, a MIG slice
def test_split_k_slices_fill_any_sm_count(sms):
    for tiles in (54, 72):
        s = tma_gemm.split_k_slices(90, tiles, 50432, 64, sms)
        units = tiles * s
        assert units / (-(-units // sms) * sms) >= 0.9 and 50432 // s >= 8 * 64, (tiles, sms, s)


def test_persistent_grid_is_the_devices_own_sm_count(monkeypatch):
    """A launch on a GPU sizes its grid (and its split-K slices) by that device's SMs, not by the 132 of an H200:
    132 one-CTA-per-SM programs on an H100 PCIe's 114 SMs would leave 18 of them for a second round, which nearly
    doubles the time. The device query is replaced (no GPU here); on a GPU, test_grid_on_this_gpu checks it."""
    monkeypatch.setattr(tma_gemm, "_device_sms", lambda index: {0: 114, 1: 78}[index])
    assert tma_gemm.sm_count(torch.device("cuda", 0), 90) == 114
    assert tma_gemm.sm_count(torch.device("cuda", 1), 90) == 78
    assert tma_gemm.sm_count(torch.device("meta"), 90) == tma_gemm.SM_COUNT[90]  # the static report's H200
    assert tma_gemm.sm_count(torch.device("cpu"), 0) == tma_gemm._INTERPRETER_PROGRAMS
    assert tma_gemm.programs(114, 10_000) == 114 and tma_gemm.programs(114, 7) == 7
    # the launchers ask sm_count with the operands' device
    asked = []
    monkeypatch.setattr(tma_gemm, "sm_count", lambda device, arch: asked.append((device.type, arch)) or 114)
    a, w, c = (torch.empty(*shape, dtype=torch.bfloat16, device="meta") for shape in ((50432, 768), (768, 768),
                                                                                       (50432, 768)))  # fmt: skip
    *_, grid = tma_gemm.store_args(a, w.t(), c, None, True, 90)
    assert grid == (114,) and asked == [("meta", 90)]


def test_per_sm_sizes_the_persistent_grid(monkeypatch):
    """A config's per_sm multiplies the persistent grid (two programs per SM where two CTAs fit), still capped by
    the work; the shipped configs keep one program per SM."""
    assert all(cfg.per_sm == 1 for table in tma_gemm.CONFIGS.values() for cfg in table.values())
    a, w, c = (torch.empty(*shape, dtype=torch.bfloat16, device="meta") for shape in ((50432, 768), (768, 768),
                                                                                       (50432, 768)))  # fmt: skip
    key = ("16bit", "store")
    monkeypatch.setitem(tma_gemm.CONFIGS[90], key, tma_gemm.CONFIGS[90][key]._replace(per_sm=2))
    *_, grid = tma_gemm.store_args(a, w.t(), c, None, True, 90)
    assert grid == (2 * tma_gemm.SM_COUNT[90],)
    small = torch.empty(256, 768, dtype=torch.bfloat16, device="meta")  # 2 x 3 tiles of 128 x 256: 6 programs
    *_, grid = tma_gemm.store_args(small, w.t(), small, None, True, 90)
    assert grid == (6,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the SM count is the device's own")
def test_grid_on_this_gpu():
    device = torch.device("cuda")
    if vit_triton.arch(device) != 90:
        pytest.skip("the persistent TMA GEMMs run on sm_90 only")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    a, w, c = (torch.empty(*shape, dtype=torch.bfloat16, device=device) for shape in ((50432, 768), (768, 768),
                                                                                       (50432, 768)))  # fmt: skip
    *_, grid = tma_gemm.store_args(a, w.t(), c, None, True, 90)
    assert grid == (sms,)


def test_describable():
    t = torch.empty(64, 40, dtype=F16)
    assert tma_gemm.describable(t, t.t())  # rows and columns
    assert not tma_gemm.describable(torch.empty(64, 41, dtype=F16)[:, :40])  # 82-byte rows
    assert not tma_gemm.describable(t[:, 1:])  # base off 16-byte alignment
    assert not tma_gemm.describable(torch.empty(64, 40, 2, dtype=F16)[..., 0])  # no unit stride
    assert not tma_gemm.describable(torch.empty(4, 8, dtype=torch.float64))
    # lines that overlap: one row for all (dy of y.sum(0)), rows closer than their width, and the transposed twins
    assert not tma_gemm.describable(torch.empty(1, 40, dtype=F16).expand(64, 40))
    assert not tma_gemm.describable(torch.empty(64 * 8 + 32, dtype=F16).as_strided((64, 40), (8, 1)))
    assert not tma_gemm.describable(torch.empty(40, 1, dtype=F16).expand(40, 64))
    assert tma_gemm.describable(torch.empty(1, 40, dtype=F16))  # a single row overlaps nothing
    # what a kernel stores, or reads through an output's descriptor, must be stored by rows
    assert tma_gemm.describable(t, rows=(t,)) and not tma_gemm.describable(t, rows=(t.t(),))


# ----------------------------------------------------------------------------------------------------
# routing: which products of the ops take this path
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """Names of the entry kernels the ops launch through tma_gemm, and how many pointer-kernel launches."""
    seen = {"tma": [], "pointer": 0}
    tma_launch = tma_gemm.launch

    def spy_tma(kernel, *args):
        seen["tma"].append(kernel.fn.__name__)
        return tma_launch(kernel, *args)

    pointer_args = linear.kernel_args

    def spy_pointer(*args, **kwargs):
        seen["pointer"] += 1
        return pointer_args(*args, **kwargs)

    monkeypatch.setattr(tma_gemm, "launch", spy_tma)
    monkeypatch.setattr(linear, "kernel_args", spy_pointer)
    return seen


def test_ops_take_the_tma_path(device, arch, launches):
    B, T, C, H, Hd = 2, 67, 48, 3, 96  # 134 tokens: the weight gradients split in 2 under the interpreter
    x = randn(B, T, C, dtype=BF16, device=device)
    w = randn(3 * C, C, dtype=BF16, device=device)
    q, k, v = linear.qkv_fwd(x, w, None, H, True)
    linear.qkv_bwd(q, k, v, x, w, True, True)
    w1, w2 = randn(Hd, C, dtype=BF16, device=device), randn(C, Hd, dtype=BF16, device=device)
    y, hidden = linear.mlp_fwd(x.view(-1, C), w1, None, w2, None, "none", True)
    linear.mlp_bwd(y, x.view(-1, C), w1, w2, hidden, True, True, "none", True)
    dw = "_partial_kernel" if vit_triton.arch(device) == 0 else "_store_kernel"  # 134 tokens: split on the interpreter
    assert launches["tma"] == [
        "_qkv_kernel", "_store_kernel", dw,  # qkv: fwd, dx, dW
        "_gelu_kernel", "_store_kernel",  # mlp fc1, fc2
        "_dgelu_kernel", dw, dw, "_store_kernel",  # dhidden, dW2, dW1, dx
    ]  # fmt: skip
    assert launches["pointer"] == 0


def test_block_ops_take_the_tma_path(device, arch, launches):
    B, T, C, H = 2, 17, 48, 3
    x = randn(B, T, C, dtype=F16, device=device)
    ln_w, ln_b = randn(C, dtype=F16, device=device), randn(C, dtype=F16, device=device)
    block.ln_qkv_fwd(x, ln_w, ln_b, 1e-6, randn(3 * C, C, dtype=F16, device=device), None, H, True)
    block.proj_residual_fwd(x, randn(C, C, dtype=F16, device=device), None, x, True)
    w1, w2 = randn(4 * C, C, dtype=F16, device=device), randn(C, 4 * C, dtype=F16, device=device)
    block.ln_mlp_fwd(x, ln_w, ln_b, 1e-6, w1, None, w2, None, "none", True, True)
    assert launches["tma"] == ["_qkv_kernel", "_residual_kernel", "_gelu_kernel", "_residual_kernel"]
    assert launches["pointer"] == 0


@pytest.mark.parametrize(
    "why, dtype, layout, allow_tf32",
    [
        ("exact fp32 has no tensor-core path", F32, "contiguous", False),
        ("(B, N) dims that do not merge", F16, "transposed", True),
        ("rows of 56 bytes, not a multiple of 16", F16, "odd_rows", True),
    ],
)
def test_pointer_kernel_where_tma_cannot(device, launches, why, dtype, layout, allow_tf32):
    B, T, C, H = 2, 17, 24, 2
    x = randn(B, T, C, dtype=dtype, device=device)
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "odd_rows":
        x = torch.cat([x, x[..., :4]], -1)[..., :C]  # row stride 28 elements
    linear.qkv_fwd(x, randn(3 * C, C, dtype=dtype, device=device), None, H, allow_tf32)
    assert launches == {"tma": [], "pointer": 1}, why


def test_stride_zero_gradient_runs_the_pointer_kernel(device, arch, launches):
    """dy of y.sum() is an expanded tensor (strides 0): TMA cannot describe it, so mlp_bwd runs linear.py's kernel,
    and its gradients are right."""
    M, C, Hd = 34, 48, 96
    x = randn(M, C, dtype=F16, device=device)
    w1, w2 = randn(Hd, C, dtype=F16, device=device, scale=C**-0.5), randn(C, Hd, dtype=F16, device=device)
    _y, hidden = linear.mlp_fwd(x, w1, None, w2, None, "none", True)
    dy = torch.ones(1, 1, dtype=F16, device=device).expand(M, C)
    dx, *_ = linear.mlp_bwd(dy, x, w1, w2, hidden, False, False, "none", True)
    assert launches["tma"] == ["_gelu_kernel", "_store_kernel"] and launches["pointer"] == 4
    h = hidden.double().requires_grad_(True)
    (dh,) = torch.autograd.grad(F.gelu(h), h, dy.double() @ w2.double())
    _check("dx", dx, dh @ w1.double(), TOLERANCES[F16])


def test_gradient_of_a_token_sum_runs_the_pointer_kernel(device, arch, launches):
    """dy of y.sum(0) is one row expanded over M (strides (0, 1)): TMA is not given a stride-0 operand, so mlp_bwd
    runs linear.py's kernel where dy is read, and its gradients are right."""
    M, C, Hd = 34, 48, 96
    x = randn(M, C, dtype=F16, device=device)
    w1, w2 = randn(Hd, C, dtype=F16, device=device, scale=C**-0.5), randn(C, Hd, dtype=F16, device=device)
    _y, hidden = linear.mlp_fwd(x, w1, None, w2, None, "none", True)
    dy = randn(1, C, dtype=F16, device=device).expand(M, C)
    dx, dw1, _, dw2, _ = linear.mlp_bwd(dy, x, w1, w2, hidden, False, False, "none", True)
    assert launches["tma"] == ["_gelu_kernel", "_store_kernel"] and launches["pointer"] == 4
    h = hidden.double().requires_grad_(True)
    (dh,) = torch.autograd.grad(F.gelu(h), h, dy.double() @ w2.double())
    _check("dx", dx, dh @ w1.double(), TOLERANCES[F16])
    _check("dfc2_weight", dw2, dy.double().t() @ F.gelu(hidden.double()), TOLERANCES[F16])
    _check("dfc1_weight", dw1, dh.t() @ x.double(), TOLERANCES[F16])


def test_hidden_stored_transposed_runs_the_pointer_kernel(device, arch, launches):
    """mlp_bwd reads hidden through the dGELU kernel's output descriptor, which needs rows: a hidden stored
    transposed (a direct caller's; the ops save it contiguous) runs linear.py's kernel instead of failing."""
    M, C, Hd = 32, 48, 96
    x = randn(M, C, dtype=F16, device=device)
    w1, w2 = randn(Hd, C, dtype=F16, device=device, scale=C**-0.5), randn(C, Hd, dtype=F16, device=device)
    hidden = randn(Hd, M, dtype=F16, device=device).t()
    dy = randn(M, C, dtype=F16, device=device)
    dx, *_ = linear.mlp_bwd(dy, x, w1, w2, hidden, False, False, "none", True)
    assert launches["tma"] == [] and launches["pointer"] == 4
    h = hidden.double().requires_grad_(True)
    (dh,) = torch.autograd.grad(F.gelu(h), h, dy.double() @ w2.double())
    _check("dx", dx, dh @ w1.double(), TOLERANCES[F16])


def test_packed_dqkv_is_read_in_place(device):
    """dq, dk, dv that are slices of one (B, N, 3, H, D) buffer are read as one (B*N, 3C) matrix without a copy;
    separate tensors are gathered into one."""
    B, T, H, D = 2, 17, 3, 16
    packed = randn(B, T, 3, H, D, dtype=F16, device=device)
    grads = packed.permute(2, 0, 3, 1, 4).unbind(0)
    view = linear._packed_dqkv(*grads)
    assert view.data_ptr() == packed.data_ptr() and torch.equal(view, packed.view(B * T, 3 * H * D))
    separate = [g.contiguous() for g in grads]
    gathered = linear._packed_dqkv(*separate)
    assert gathered.data_ptr() not in [g.data_ptr() for g in separate]
    assert torch.equal(gathered, packed.view(B * T, 3 * H * D))
