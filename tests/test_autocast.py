"""torch.autocast: the ops run in the autocast dtype, as F.linear and SDPA do, on every backend.

Under `torch.autocast(device, dtype)` LayerNorm returns fp32 and the parameters are fp32 master weights, so
without a cast the kernel backends would run their fp32 kernels. Checked here: what dtype every Triton kernel
launch receives (a spy around the launched `@triton.jit` objects), that all backends agree in that dtype,
that gradients come back in each input's own dtype, and that the ViT trains under autocast. Each test runs
on CPU (Triton under the interpreter) and on CUDA, each skipping with its reason where it cannot run.
"""

import pytest
import torch
from conftest import TOLERANCES, rel_error, skip_unless_runs, spy_triton_launches

import vit
import vit_kernels as vk
from vit_kernels import dispatch, reference

DEVICES = ("cpu", "cuda")
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------
# a spy on the Triton kernel launches
# ----------------------------------------------------------------------------------------------------
def _operand_dtypes(name, grid, args, kwargs):
    """(kernel name, dtypes of its first two tensor arguments: the operands q and k, out and dout, A and B; a TMA
    descriptor stands for the tensor it describes)."""
    tensors = [getattr(a, "base", a) for a in args]
    return name, tuple(a.dtype for a in tensors if isinstance(a, torch.Tensor))[:2]


@pytest.fixture
def triton_launches(monkeypatch):
    """The list of (kernel name, operand dtypes) of every Triton kernel launched while the test runs."""
    pytest.importorskip("triton")
    from vit_kernels.triton import attention as attention_ops
    from vit_kernels.triton import linear as linear_ops
    from vit_kernels.triton import tma_gemm

    return spy_triton_launches(monkeypatch, (attention_ops, linear_ops, tma_gemm), _operand_dtypes)


def _block(x, w_qkv, b_qkv, w1, b1, w2, b2, backend):
    """fused_qkv -> attention -> gelu_mlp, what one ViT block calls (B, N, C) -> (B, N, C)."""
    q, k, v = vk.fused_qkv(x, w_qkv, b_qkv, 2, backend=backend)
    o = vk.attention(q, k, v, backend=backend).transpose(1, 2).reshape(x.shape)
    return vk.gelu_mlp(o, w1, b1, w2, b2, backend=backend)


def _block_params(device, C=64, hidden=128):
    return [
        (torch.randn(*shape, device=device) * scale).requires_grad_(True)
        for shape, scale in (
            ((2, 5, C), 1.0),
            ((3 * C, C), C**-0.5),
            ((3 * C,), 0.1),
            ((hidden, C), C**-0.5),
            ((hidden,), 0.1),
            ((C, hidden), hidden**-0.5),
            ((C,), 0.1),
        )
    ]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_launches_see_the_autocast_dtype(device, dtype, triton_launches):
    skip_unless_runs("triton", device)
    params = _block_params(device)
    with torch.autocast(device, dtype=dtype):
        y = _block(*params, backend="triton")
    assert y.dtype == dtype
    y.float().sum().backward()
    launched = {name for name, _ in triton_launches}
    from vit_kernels import triton as vit_triton
    from vit_kernels.triton import linear as linear_ops

    # 16-bit GEMMs run tma_gemm.py's entry kernels on Hopper and under the interpreter, else linear.py's
    on_tma = vit_triton.arch(torch.device(device)) in linear_ops.TMA_ARCHS
    gemms = {"_gelu_kernel", "_dgelu_kernel", "_store_kernel"} if on_tma else {"_gemm_kernel"}
    # GEMMs, attention forward, and all three attention backward kernels
    assert launched >= {
        *gemms,
        "_attn_fwd_kernel",
        "_attn_bwd_preprocess_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
    }, launched
    wrong = [(name, dtypes) for name, dtypes in triton_launches if set(dtypes) != {dtype}]
    assert not wrong, f"launches with operands not in {dtype}: {wrong}"
    assert all(p.grad.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_no_cast_without_autocast(device, triton_launches):
    skip_unless_runs("triton", device)
    with torch.autocast(device, enabled=False):
        y = _block(*_block_params(device), backend="triton")
    assert y.dtype == torch.float32
    assert triton_launches and all(set(dtypes) == {torch.float32} for _, dtypes in triton_launches)


# ----------------------------------------------------------------------------------------------------
# every backend: the autocast dtype, agreement, and gradients in each input's own dtype
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_runs_in_the_autocast_dtype(device, backend, dtype):
    skip_unless_runs(backend, device)
    params = _block_params(device)
    with torch.autocast(device, dtype=dtype):
        y = _block(*params, backend=backend)
    assert y.dtype == dtype
    # Agreement: the float64 block on the inputs rounded to `dtype` (what every backend must compute).
    rounded = [p.detach().to(dtype).double() for p in params]
    q, k, v = reference.fused_qkv(rounded[0], rounded[1], rounded[2], 2)
    o = reference.attention(q, k, v, 32**-0.5).transpose(1, 2).reshape(rounded[0].shape)
    expected = reference.gelu_mlp(o, *rounded[3:], "none")
    assert rel_error(y, expected) < 2 * TOLERANCES[dtype]
    y.float().square().sum().backward()
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


def test_mixed_dtype_inputs_under_autocast_are_cast_not_rejected():
    """A bf16 activation and fp32 weights are a TypeError without autocast, and run under it (like F.linear)."""
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    w, b = torch.randn(192, 64), torch.randn(192)
    with pytest.raises(TypeError, match="weight has dtype"):
        vk.fused_qkv(x, w, b, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = vk.fused_qkv(x, w, b, 2)
    assert q.dtype == torch.bfloat16


def test_float64_is_not_cast_by_autocast():
    """Autocast leaves fp64 alone (as it does for F.linear), so fp64 is still rejected with its reason."""
    q = torch.randn(1, 2, 5, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="q must be float32"):
        vk.attention(q, q, q)


def test_explain_backend_sees_the_autocast_dtype(monkeypatch):
    """The table key uses the dtype the kernels will run: under autocast, the autocast dtype (fake CUDA device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(dispatch, "_TABLE", {})
    monkeypatch.setattr(dispatch, "_CAPABILITY", {0: (9, 0)})
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    with FakeTensorMode():
        q = torch.empty(2, 3, 197, 64, device="cuda")
        backend, reason = vk.explain_backend("attention", q, q, q)
    assert (backend, reason) == (
        "torch",
        "no committed GPU measurement for sm_90 attention bf16 D=64 N<=256 B*H<=8: torch",
    )


# ----------------------------------------------------------------------------------------------------
# the ViT under autocast trains
# ----------------------------------------------------------------------------------------------------
# Head dim 32, N = 5 tokens, one block: a training step is a few seconds under the interpreter.
TINY_KERNEL = dict(
    img_size=16, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=1, num_heads=2, mlp_ratio=2.0
)


@pytest.mark.parametrize("device", DEVICES)
def test_vit_trains_under_autocast(device, triton_launches):
    skip_unless_runs("triton", device)
    torch.manual_seed(0)
    model = vit.VisionTransformer(backend="triton", **TINY_KERNEL).to(device)
    images = torch.randn(4, 3, 16, 16, device=device)
    labels = torch.randint(0, 10, (4,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
        assert logits.dtype == torch.bfloat16
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert triton_launches and all(set(dtypes) == {torch.bfloat16} for _, dtypes in triton_launches)
