"""Limits a first large GPU run would hit, checked on this machine (issue 12, items 4, 5 and 7).

- 64-bit addresses: an index below 2^31 times a stride below 2^31 can pass 2^31 elements. The Triton GEMM
  widens every index before it meets a stride; the attention kernels address within one head in int32 and the
  launchers copy any operand whose heads span 2^31 elements. Shown on strided views over a storage of 2^32 + fp16
  elements (8.6 GB of address space, almost none of it touched): the operand rows sit past 2^31 elements, and an
  int32 product would wrap to the zero pages below, so the result would be wrong rather than a crash.
- Grid limits: CUDA grid axes 1 and 2 stop at 65,535; B * H goes on axis 1 (row tiles first, so the programs of
  one head run together and share its K / V through L2), and on axis 0 once it passes 65,535 (checked on the
  launch grid; both orders checked for parity).
- Device: Triton launches on the current CUDA device, so every launch must run under the tensors' device.
"""

import math

import pytest
import torch
from conftest import DEVICE, TOLERANCES, attention_reference, rel_error, spy_triton_launches

from vit_kernels import triton as vit_triton
from vit_kernels.triton import attention, block, linear

F16 = torch.float16
ROW_STRIDE = 2**26  # elements: rows 32.. of an operand start at or past 2^31 elements
AXIS_0_MAX, AXIS_12_MAX = 2**31 - 1, 65535


def _far_rows(rows: int, cols: int, n: int):
    """n (rows, cols) fp16 views, row stride 2^26 elements, over one storage, their row 0 at element 2^31: rows
    >= 32 lie past 2^31 elements, and a wrapped int32 offset would land in [0, 2^31), memory no view covers."""
    need = 2**31 + (rows - 1) * ROW_STRIDE + n * cols
    try:
        storage = torch.empty(need, dtype=F16, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve {need * 2 / 2**30:.1f} GiB of address space here ({exc})")
    views = [storage.as_strided((rows, cols), (ROW_STRIDE, 1), 2**31 + i * cols) for i in range(n)]
    for view in views:
        view.copy_(torch.randn(rows, cols).to(F16))
    return storage, views


def test_gemm_k_times_stride_past_2_31_elements():
    """The dfc1 weight gradient of mlp_bwd, dW1 = dhidden^T @ x: A = dhidden^T, K = tokens, stride_ak = hidden.
    Item 4's case (ViT-L/16 at 384 px, batch 1024: k up to 590,848 x stride 4096) at 40 tokens x stride 2^26."""
    hidden, channels, tokens = 16, 24, 40
    storage, (dhidden,) = _far_rows(tokens, hidden, 1)
    x = torch.randn(tokens, channels, device=DEVICE).to(F16)
    dw = torch.full((hidden, channels), float("nan"), dtype=F16, device=DEVICE)
    dh_t = linear.Operand(dhidden, transpose=True)
    linear.launch(dh_t, linear.Operand(x), dw, hidden, channels, tokens, F16, False)
    ref = dhidden.double().T @ x.double()
    assert rel_error(dw, ref) <= TOLERANCES[F16], f"dW: relative error {rel_error(dw, ref):.3g}"
    del storage


def test_attention_rows_past_2_31_elements():
    """q, k, v, dout (1, 1, N, D) whose N stride is 2^26 elements (a sequence-first layout at giant batch)."""
    N, D = 40, 32
    storage, views = _far_rows(N, D, 4)
    q, k, v, dout = (t.view(1, 1, N, D) for t in views)
    scale = D**-0.5
    out, lse = attention.attention_fwd(q, k, v, scale, allow_tf32=False)
    dq, dk, dv = attention.attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32=False)
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, scale)
    for name, got, ref in [
        ("out", out, ref_out),
        ("lse", lse, ref_lse),
        *zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads),
    ]:
        err = rel_error(got, ref)
        assert err <= TOLERANCES[F16], f"{name}: relative error {err:.3g}"
    del storage


# ----------------------------------------------------------------------------------------------------
# grid limits
# ----------------------------------------------------------------------------------------------------
class _Guard:
    """Stands in for `vit_kernels.triton.on_device`: records the device it was entered for."""

    active = None

    def __init__(self, t: torch.Tensor):
        self.device = t.device

    def __enter__(self):
        _Guard.active = self.device

    def __exit__(self, *exc):
        _Guard.active = None


ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
BLOCK_KERNELS = ("_block_gemm_kernel", "_ln_rows_kernel", "_ln_bwd_kernel")


def _grid_and_guard(name, grid, args, kwargs):
    return name, tuple(grid), _Guard.active


@pytest.fixture
def spied(monkeypatch):
    """(kernel name, grid, device guard active) of each launch, recorded and not run: grids no CPU could run."""
    monkeypatch.setattr(vit_triton, "on_device", _Guard)
    names = (*ATTENTION_KERNELS, "_gemm_kernel", *BLOCK_KERNELS)
    return spy_triton_launches(monkeypatch, (attention, linear, block), _grid_and_guard, names=names, launch=False)


def _attention_launches(B, H, N, D, device="cpu"):
    q, k, v, dout = (torch.zeros(B, H, N, D, device=device) for _ in range(4))
    out, lse = attention.attention_fwd(q, k, v, 0.25, allow_tf32=False)
    attention.attention_bwd(dout, q, k, v, out, lse, 0.25, allow_tf32=False)


@pytest.fixture
def spied_order(monkeypatch):
    """(kernel name, grid, HEADS_FIRST) of each attention launch, recorded and not run."""
    monkeypatch.setattr(vit_triton, "on_device", _Guard)

    def record(name, grid, args, kwargs):
        return name, tuple(grid), kwargs["HEADS_FIRST"]

    return spy_triton_launches(monkeypatch, (attention,), record, names=ATTENTION_KERNELS, launch=False)


@pytest.mark.parametrize("B, H", [(5462, 12), (65536, 1), (7, 16411)])
def test_attention_grid_past_65535_heads_puts_them_on_axis_0(spied_order, B, H):
    """ViT-B (H = 12) at batch 5,462 is the first B * H past 65,535 (item 5)."""
    N, D = 3, 32
    _attention_launches(B, H, N, D)
    assert [name for name, _, _ in spied_order] == list(ATTENTION_KERNELS)
    for name, grid, heads_first in spied_order:
        assert grid[0] <= AXIS_0_MAX and all(g <= AXIS_12_MAX for g in grid[1:]), f"{name}: grid {grid}"
        assert grid[0] == B * H and math.prod(grid) >= B * H * math.ceil(N / 128), f"{name}: grid {grid}"
        assert heads_first, f"{name}: B * H on axis 0 must come with HEADS_FIRST"


@pytest.mark.parametrize("B, H, N", [(256, 12, 197), (5461, 12, 197), (65535, 1, 577)])
def test_attention_grid_launches_the_tiles_of_a_head_together(spied_order, B, H, N):
    """Within 65,535 heads the row tiles go on axis 0 (launched first): the H200 profile of B * H first read K and
    V from DRAM once per query tile, 2.5x the forward's bytes. Meta tensors: the launchers see only shapes."""
    q = torch.empty(B, H, N, 64, device="meta")
    out, lse = attention.attention_fwd(q, q, q, 0.125, allow_tf32=False)
    attention.attention_bwd(q, q, q, q, out, lse, 0.125, allow_tf32=False)
    assert [name for name, _, _ in spied_order] == list(ATTENTION_KERNELS)
    for name, grid, heads_first in spied_order:
        assert grid[1] == B * H and grid[0] < N, f"{name}: grid {grid}"
        assert not heads_first, f"{name}: tiles on axis 0 must come with HEADS_FIRST=False"


@pytest.mark.parametrize("heads_on_axis_0", [False, True])
def test_attention_parity_in_both_grid_orders(monkeypatch, heads_on_axis_0):
    """Both orders of `_tile_and_head` at a small shape (several tiles and heads): axis 1's limit is lowered to
    put B * H = 6 on axis 0, so the order that ViT batches past 5,461 take is checked here too, not only on a
    GPU at 65,537 heads."""
    if heads_on_axis_0:
        monkeypatch.setattr(attention, "_AXIS_1_MAX", 5)
    B, H, N, D = 2, 3, 70, 32
    q, k, v, dout = (torch.randn(B, H, N, D, device=DEVICE) for _ in range(4))
    launches = spy_triton_launches(
        monkeypatch, (attention,), lambda name, grid, args, kwargs: kwargs["HEADS_FIRST"], names=ATTENTION_KERNELS
    )
    out, lse = attention.attention_fwd(q, k, v, D**-0.5, allow_tf32=False)
    grads = attention.attention_bwd(dout, q, k, v, out, lse, D**-0.5, allow_tf32=False)
    assert launches == [heads_on_axis_0] * 4
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, D**-0.5)
    for name, got, ref in [("out", out, ref_out), ("lse", lse, ref_lse), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        err = rel_error(got, ref)
        assert err <= TOLERANCES[torch.float32], f"{name}: relative error {err:.3g}"


def test_attention_grid_beyond_cuda_is_a_value_error():
    # meta tensors: shapes without memory; the launcher must refuse before any launch.
    q = torch.empty(2**16, 2**15, 1, 32, device="meta")
    with pytest.raises(ValueError, match="exceed the CUDA grid"):
        attention.attention_fwd(q, q, q, 0.25, allow_tf32=False)


def test_gemm_grid_is_one_axis_within_2_31(spied):
    """ViT-L/16 at 384 px, batch 1024: 590,848 tokens through the MLP (meta tensors, so nothing is allocated)."""
    M, C, Hd = 1024 * 577, 1024, 4096
    x, w1, w2 = (torch.empty(*s, device="meta") for s in ((M, C), (Hd, C), (C, Hd)))
    hidden = torch.empty(M, Hd, device="meta")
    linear.mlp_bwd(torch.empty(M, C, device="meta"), x, w1, w2, hidden, True, True, "none", False)
    assert len(spied) == 4
    for _, grid, _ in spied:
        assert len(grid) == 1 and grid[0] <= AXIS_0_MAX


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: the interpreter takes ~22 ms a program, 24 min for 65,537"
)
def test_attention_just_past_65535_heads_runs():
    """A real launch with B * H = 65,537 (N = 1): every head written (on CPU the spy test above checks the grid)."""
    B, H, N, D = 65537, 1, 1, 32
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE) for _ in range(3))
    out, lse = attention.attention_fwd(q, k, v, 0.25, allow_tf32=False)
    # N = 1: softmax over one key is 1, so out = v and lse = q . k * scale.
    assert rel_error(out, v) <= TOLERANCES[torch.float32]
    assert rel_error(lse, (q * k).sum(-1) * 0.25) <= TOLERANCES[torch.float32]


# ----------------------------------------------------------------------------------------------------
# device
# ----------------------------------------------------------------------------------------------------
def test_every_launch_runs_under_the_tensors_device(spied):
    """Triton launches on the current device (item 7): each kernel launch must happen inside `on_device`."""
    _attention_launches(2, 3, 5, 32)
    x = torch.zeros(2, 5, 32)
    linear.qkv_fwd(x, torch.zeros(96, 32), torch.zeros(96), 2, False)
    linear.mlp_fwd(x.view(10, 32), torch.zeros(64, 32), None, torch.zeros(32, 64), None, "none", False)
    assert len(spied) == 4 + 1 + 2
    for name, _, device in spied:
        assert device == x.device, f"{name} launched outside the tensors' device guard"


def test_every_block_launch_runs_under_the_tensors_device(spied):
    """The whole-block launchers (triton/block.py) too: their own kernels and linear.py's backward GEMMs."""
    C, H = 32, 2
    x, ln_w, ln_b = torch.zeros(2, 5, C), torch.ones(C), torch.zeros(C)
    w_qkv, w_proj, w1, w2 = torch.zeros(3 * C, C), torch.zeros(C, C), torch.zeros(2 * C, C), torch.zeros(C, 2 * C)
    q, k, v, mean, rstd = block.ln_qkv_fwd(x, ln_w, ln_b, 1e-6, w_qkv, None, H, False)
    block.ln_qkv_bwd(q, k, v, x, mean, rstd, ln_w, ln_b, w_qkv, False, False)
    out = block.proj_residual_fwd(x, w_proj, None, x, False)
    block.proj_residual_bwd(out, x, w_proj, False, False)
    out, hidden, mean, rstd = block.ln_mlp_fwd(x, ln_w, ln_b, 1e-6, w1, None, w2, None, "none", True, False)
    block.ln_mlp_bwd(out, x, mean, rstd, ln_w, ln_b, w1, w2, hidden, False, False, "none", True, False)
    assert {name for name, _, _ in spied} == {*BLOCK_KERNELS, "_gemm_kernel"}
    for name, _, device in spied:
        assert device == x.device, f"{name} launched outside the tensors' device guard"


def test_block_gemm_past_32_bit_indices_is_a_value_error():
    # meta tensors: 2^31 rows without memory; the launcher must refuse before any launch, as linear.launch does.
    o = torch.empty(1, 2**31, 8, device="meta")
    with pytest.raises(ValueError, match="too large for 32-bit tile indices"):
        block.proj_residual_fwd(o, torch.empty(8, 8, device="meta"), None, o, False)


def test_on_device_guard():
    cpu = torch.zeros(1)
    with vit_triton.on_device(cpu):  # the interpreter's CPU tensors: nothing to switch
        pass

    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = vit_triton.on_device(FakeCudaTensor())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (tensors on cuda:1, device 0 current)"
)
def test_triton_ops_on_the_second_gpu():
    import vit_kernels as vk
    from vit_kernels import reference

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    B, N, C, H = 2, 197, 128, 2
    x = torch.randn(B, N, C, device=dev, dtype=F16, requires_grad=True)
    w = (torch.randn(3 * C, C, device=dev) * C**-0.5).to(F16).requires_grad_(True)
    q, k, v = vk.fused_qkv(x, w, None, H, backend="triton")
    out = vk.attention(q, k, v, backend="triton")
    y = vk.gelu_mlp(out.transpose(1, 2).reshape(B, N, C), w[:C].T.contiguous(), None, w[:C], None, backend="triton")
    y.float().square().sum().backward()
    assert torch.cuda.current_device() == 0
    assert y.device == dev and x.grad.device == dev and w.grad.device == dev
    rq, rk, rv = reference.fused_qkv(x.detach().double(), w.detach().double(), None, H)
    ref = reference.attention(rq, rk, rv, (C // H) ** -0.5)
    assert rel_error(out, ref) <= TOLERANCES[F16]
    torch.cuda.synchronize(dev)
