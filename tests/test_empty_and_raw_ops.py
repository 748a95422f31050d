"""The raw custom ops refuse bad arguments; empty batches (B = 0) give empty outputs and gradients.

Raw ops: `torch.ops.vit_kernels.*` (each op's module in vit_kernels/ops/) are public, so a direct caller can hand
them what autograd never would (a wrong-shaped lse or hidden, a gradient of another dtype). Each checks every
tensor argument before a kernel sees it and raises ValueError / TypeError naming the argument and what was
expected; the checks are real `if ... raise`, not `assert` (which `python -O` removes). The eager path of the
public ops (`KernelOp.__call__`, which skips the dispatcher) is validated by the op modules' own checks and must
not run them a second time.

Empty batches: every op, on every backend, returns correctly-shaped empty outputs for B = 0 (for gelu_mlp, x with
no rows), and backward gives input gradients of the inputs' shapes and weight / bias gradients of zeros, as
`F.linear` and SDPA do. No kernel is launched for them (a zero-size grid is a CUDA launch error).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, skip_unless_runs

import vit
import vit_kernels as vk
from vit_kernels import kernel_op
from vit_kernels.ops import attention, fused_qkv, gelu_mlp, ln_fused_qkv, ln_gelu_mlp, proj_residual

F32 = torch.float32
# Small shapes every kernel backend takes: head dim 32, channels multiples of 8; C_out != C catches swapped sizes.
B, H, N, D = 1, 2, 5, 32
C, HD, C_OUT = H * D, 64, 48


def _t(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype).to(DEVICE)


# ----------------------------------------------------------------------------------------------------
# raw custom ops: valid arguments, then one bad argument at a time
# ----------------------------------------------------------------------------------------------------
def _valid(op: str) -> dict:
    """Valid arguments of raw op `op` (in its schema's order, by name), for B=1, H=2, N=5, D=32."""
    if op == "attention_fwd":
        return dict(q=_t(B, H, N, D), k=_t(B, H, N, D), v=_t(B, H, N, D), scale=D**-0.5, allow_tf32=False)
    if op == "attention_bwd":
        return dict(dout=_t(B, H, N, D), q=_t(B, H, N, D), k=_t(B, H, N, D), v=_t(B, H, N, D), out=_t(B, H, N, D),
                    lse=_t(B, H, N), scale=D**-0.5, allow_tf32=False)  # fmt: skip
    if op == "qkv_fwd":
        return dict(x=_t(B, N, C), weight=_t(3 * C, C), bias=_t(3 * C), num_heads=H, allow_tf32=False)
    if op == "qkv_bwd":
        return dict(dq=_t(B, H, N, D), dk=_t(B, H, N, D), dv=_t(B, H, N, D), x=_t(B, N, C), weight=_t(3 * C, C),
                    has_bias=True, allow_tf32=False)  # fmt: skip
    if op == "mlp_fwd":
        return dict(x=_t(N, C), fc1_weight=_t(HD, C), fc1_bias=_t(HD), fc2_weight=_t(C_OUT, HD), fc2_bias=_t(C_OUT),
                    approximate="none", allow_tf32=False, needs_grad=True)  # fmt: skip
    if op == "mlp_bwd":
        return dict(dy=_t(N, C_OUT), x=_t(N, C), fc1_weight=_t(HD, C), fc2_weight=_t(C_OUT, HD), hidden=_t(N, HD),
                    has_fc1_bias=True, has_fc2_bias=True, approximate="none", allow_tf32=False)  # fmt: skip
    stats = dict(mean=_t(B * N), rstd=_t(B * N).abs() + 1)
    ln = dict(ln_weight=_t(C), ln_bias=_t(C))
    if op == "ln_qkv_fwd":
        return dict(x=_t(B, N, C), **ln, eps=1e-6, weight=_t(3 * C, C), bias=_t(3 * C), num_heads=H, allow_tf32=False)
    if op == "ln_qkv_bwd":
        return dict(dq=_t(B, H, N, D), dk=_t(B, H, N, D), dv=_t(B, H, N, D), x=_t(B, N, C), **stats, **ln,
                    weight=_t(3 * C, C), has_bias=True, allow_tf32=False)  # fmt: skip
    if op == "proj_residual_fwd":
        return dict(o=_t(B, N, C), weight=_t(C_OUT, C), bias=_t(C_OUT), residual=_t(B, N, C_OUT), allow_tf32=False)
    if op == "proj_residual_bwd":
        return dict(dout=_t(B, N, C_OUT), o=_t(B, N, C), weight=_t(C_OUT, C), has_bias=True, allow_tf32=False)
    if op == "ln_mlp_fwd":
        return dict(x=_t(B, N, C), **ln, eps=1e-6, fc1_weight=_t(HD, C), fc1_bias=_t(HD), fc2_weight=_t(C_OUT, HD),
                    fc2_bias=_t(C_OUT), approximate="none", residual=False, allow_tf32=False,
                    needs_grad=True)  # fmt: skip
    if op == "ln_mlp_bwd":
        return dict(dout=_t(B, N, C_OUT), x=_t(B, N, C), **stats, **ln, fc1_weight=_t(HD, C), fc2_weight=_t(C_OUT, HD),
                    hidden=_t(B * N, HD), has_fc1_bias=True, has_fc2_bias=True, approximate="none", residual=False,
                    allow_tf32=False)  # fmt: skip
    raise AssertionError(op)


LIBRARY_OPS = ("attention_fwd", "attention_bwd", "qkv_fwd", "qkv_bwd", "mlp_fwd", "mlp_bwd")
BLOCK_OPS = ("ln_qkv_fwd", "ln_qkv_bwd", "proj_residual_fwd", "proj_residual_bwd", "ln_mlp_fwd", "ln_mlp_bwd")


def _call(op: str, args: dict, backend: str):
    return getattr(torch.ops.vit_kernels, op)(*args.values(), backend)


# (op, {argument: replacement}, exception, message): the replacement is a function of the valid arguments.
RAW_CASES = [
    # attention
    ("attention_fwd", {"q": lambda a: a["q"][0]}, ValueError, r"q must be 4-D \(B, H, N, D\)"),
    ("attention_fwd", {"k": lambda a: a["k"][:, :, :3]}, ValueError, r"k must have shape .* \(1, 2, 5, 32\)"),
    ("attention_fwd", {"v": lambda a: a["v"].half()}, TypeError, "v must be torch.float32"),
    ("attention_fwd", {n: (lambda a, n=n: a[n].double()) for n in "qkv"}, TypeError, "q must be float32, float16"),
    ("attention_fwd", {n: (lambda a, n=n: a[n][..., :20]) for n in "qkv"}, ValueError, "head dim D=20"),
    ("attention_fwd", {n: (lambda a, n=n: a[n][:0]) for n in "qkv"}, ValueError, "q must be non-empty"),
    ("attention_fwd", {"scale": lambda a: math.nan}, ValueError, "scale must be finite"),
    ("attention_bwd", {"lse": lambda a: a["lse"][:, :, :2]}, ValueError, r"lse must have shape \(B, H, N\)"),
    ("attention_bwd", {"lse": lambda a: a["lse"][0]}, ValueError, r"lse must have shape \(B, H, N\) = \(1, 2, 5\)"),
    ("attention_bwd", {"lse": lambda a: a["lse"].half()}, TypeError, "lse must be torch.float32"),
    ("attention_bwd", {"dout": lambda a: a["dout"][:, :, :4]}, ValueError, "dout must have shape"),
    ("attention_bwd", {"out": lambda a: a["out"].bfloat16()}, TypeError, "out must be torch.float32"),
    ("attention_bwd", {"k": lambda a: a["k"][:, :1]}, ValueError, "k must have shape"),
    # fused QKV
    ("qkv_fwd", {"x": lambda a: a["x"][0]}, ValueError, r"x must be 3-D \(B, N, C\)"),
    ("qkv_fwd", {"weight": lambda a: a["weight"][:C]}, ValueError, r"weight must have shape \(3C, C\)"),
    ("qkv_fwd", {"bias": lambda a: a["bias"][:C]}, ValueError, r"bias must have shape \(3C,\)"),
    ("qkv_fwd", {"num_heads": lambda a: 3}, ValueError, "divisible by num_heads=3"),
    ("qkv_fwd", {"num_heads": lambda a: 0}, ValueError, "num_heads must be positive"),
    ("qkv_fwd", {"num_heads": lambda a: 16}, ValueError, "multiples of 8"),  # head dim 4
    ("qkv_fwd", {"weight": lambda a: a["weight"].half()}, TypeError, "weight must be torch.float32"),
    ("qkv_bwd", {"dq": lambda a: a["dq"][:, :, :4]}, ValueError, r"dq must have shape \(B, H, N, D\)"),
    ("qkv_bwd", {"dk": lambda a: a["dk"][..., :16]}, ValueError, "dk must have shape"),
    ("qkv_bwd", {"dv": lambda a: a["dv"].half()}, TypeError, "dv must be torch.float32"),
    ("qkv_bwd", {"dq": lambda a: a["dq"][0]}, ValueError, r"dq must be 4-D \(B, H, N, D\)"),
    ("qkv_bwd", {"x": lambda a: a["x"][..., :48]}, ValueError, r"weight must have shape \(3C, C\)"),
    ("qkv_bwd", {"weight": lambda a: a["weight"][:, :48]}, ValueError, r"weight must have shape \(3C, C\)"),
    # GELU-MLP (x is (M, C): the public op flattens its leading dims)
    ("mlp_fwd", {"x": lambda a: a["x"][None]}, ValueError, r"x must be 2-D \(M, C\)"),
    ("mlp_fwd", {"fc1_weight": lambda a: a["fc1_weight"][:, :8]}, ValueError, r"fc1_weight must have shape"),
    ("mlp_fwd", {"fc1_bias": lambda a: a["fc1_bias"][:8]}, ValueError, r"fc1_bias must have shape \(Hd,\)"),
    ("mlp_fwd", {"fc2_weight": lambda a: a["fc2_weight"][:, :8]}, ValueError, r"fc2_weight must have shape"),
    ("mlp_fwd", {"fc2_bias": lambda a: a["fc2_bias"][:8]}, ValueError, r"fc2_bias must have shape \(C_out,\)"),
    ("mlp_fwd", {"fc2_weight": lambda a: a["fc2_weight"][0]}, ValueError, r"fc2_weight must be 2-D"),
    ("mlp_fwd", {"approximate": lambda a: "erf"}, ValueError, "approximate must be 'none' or 'tanh'"),
    (
        "mlp_fwd",
        {"x": lambda a: a["x"][:, :36], "fc1_weight": lambda a: a["fc1_weight"][:, :36]},
        ValueError,
        "multiples of 8",
    ),  # fmt: skip
    ("mlp_bwd", {"hidden": lambda a: a["hidden"][:1]}, ValueError, r"hidden must have shape \(M, Hd\) = \(5, 64\)"),
    ("mlp_bwd", {"hidden": lambda a: a["hidden"].half()}, TypeError, "hidden must be torch.float32"),
    ("mlp_bwd", {"dy": lambda a: a["dy"][:, :8]}, ValueError, r"dy must have shape \(M, C_out\) = \(5, 48\)"),
    ("mlp_bwd", {"dy": lambda a: a["dy"][:2]}, ValueError, r"dy must have shape"),
    ("mlp_bwd", {"fc2_weight": lambda a: a["fc2_weight"][:, :8]}, ValueError, "fc2_weight must have shape"),
    ("mlp_bwd", {"x": lambda a: a["x"][0]}, ValueError, r"x must be 2-D"),
    # whole-block ops (triton only)
    ("ln_qkv_fwd", {"ln_weight": lambda a: a["ln_weight"][:8]}, ValueError, r"ln_weight must have shape \(C,\)"),
    ("ln_qkv_fwd", {"ln_bias": lambda a: a["ln_bias"].half()}, TypeError, "ln_bias must be torch.float32"),
    ("ln_qkv_fwd", {"eps": lambda a: 0.0}, ValueError, "eps must be positive"),
    ("ln_qkv_fwd", {"weight": lambda a: a["weight"][:C]}, ValueError, r"weight must have shape \(3C, C\)"),
    ("ln_qkv_bwd", {"mean": lambda a: a["mean"][:2]}, ValueError, r"mean must have shape \(B \* N,\) = \(5,\)"),
    ("ln_qkv_bwd", {"rstd": lambda a: a["rstd"].half()}, TypeError, "rstd must be torch.float32"),
    ("ln_qkv_bwd", {"dk": lambda a: a["dk"][:, :, :2]}, ValueError, "dk must have shape"),
    ("ln_qkv_bwd", {"ln_weight": lambda a: a["ln_weight"][:8]}, ValueError, "ln_weight must have shape"),
    ("proj_residual_fwd", {"residual": lambda a: a["residual"][..., :8]}, ValueError, "residual must have shape"),
    ("proj_residual_fwd", {"weight": lambda a: a["weight"][:, :8]}, ValueError, r"weight must have shape"),
    ("proj_residual_fwd", {"bias": lambda a: a["bias"][:8]}, ValueError, r"bias must have shape \(C,\)"),
    ("proj_residual_fwd", {"o": lambda a: a["o"][0]}, ValueError, r"o must be 3-D \(B, N, C_in\)"),
    ("proj_residual_bwd", {"dout": lambda a: a["dout"][..., :8]}, ValueError, r"dout must have shape \(B, N, C\)"),
    ("proj_residual_bwd", {"dout": lambda a: a["dout"].half()}, TypeError, "dout must be torch.float32"),
    ("ln_mlp_fwd", {"residual": lambda a: True}, ValueError, "residual=True adds x"),
    ("ln_mlp_fwd", {"fc2_bias": lambda a: a["fc2_bias"][:8]}, ValueError, "fc2_bias must have shape"),
    ("ln_mlp_fwd", {"x": lambda a: a["x"][0]}, ValueError, "x must be 3-D"),
    ("ln_mlp_bwd", {"hidden": lambda a: a["hidden"][:1]}, ValueError, r"hidden must have shape \(B \* N, Hd\)"),
    ("ln_mlp_bwd", {"dout": lambda a: a["dout"][..., :8]}, ValueError, r"dout must have shape \(B, N, C_out\)"),
    ("ln_mlp_bwd", {"mean": lambda a: a["mean"][None]}, ValueError, "mean must have shape"),
]


def _case_id(case) -> str:
    op, changes, _exc, _match = case
    return f"{op}-{'+'.join(changes)}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", RAW_CASES, ids=[_case_id(c) for c in RAW_CASES])
def test_raw_op_names_the_bad_argument(case, backend):
    op, changes, exc, match = case
    skip_unless_runs(backend)
    args = _valid(op)
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(exc, match=match):
        _call(op, args, backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", LIBRARY_OPS + BLOCK_OPS)
def test_raw_op_takes_valid_arguments(op, backend):
    """The checks refuse nothing the kernels take: each raw op runs on valid arguments (finite outputs)."""
    skip_unless_runs(backend)
    args = _valid(op)
    if op == "attention_bwd":  # a real lse, so that exp(s - lse) stays finite
        args["out"], args["lse"] = torch.ops.vit_kernels.attention_fwd(
            args["q"], args["k"], args["v"], args["scale"], False, backend
        )
    outputs = _call(op, args, backend)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    assert all(torch.isfinite(t).all() for t in outputs)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["mlp_fwd", "ln_mlp_fwd"])
def test_raw_op_without_needs_grad_returns_no_hidden(op, backend):
    """needs_grad=False (what the public ops pass without autograd): the same output, and an empty tensor where the
    pre-activation hidden (M, Hd) would be, since nothing will ask for it."""
    skip_unless_runs(backend)
    args = _valid(op)
    with_hidden = _call(op, args, backend)
    without = _call(op, {**args, "needs_grad": False}, backend)
    assert with_hidden[1].shape == (N, HD) and without[1].shape == (0,)
    assert torch.allclose(without[0], with_hidden[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference", "tritonn"])
@pytest.mark.parametrize("op", ["attention_fwd", "proj_residual_fwd"])
def test_raw_op_refuses_a_backend_without_kernels(op, backend):
    with pytest.raises(ValueError, match=rf"backend must be 'triton' or 'cuda'.*got '{backend}'"):
        _call(op, _valid(op), backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a second device type (CUDA)")
@pytest.mark.parametrize("op, name", [("attention_bwd", "lse"), ("qkv_bwd", "weight"), ("mlp_bwd", "hidden"),
                                      ("ln_qkv_bwd", "rstd"), ("proj_residual_fwd", "residual")])  # fmt: skip
def test_raw_op_names_an_argument_on_another_device(op, name):
    skip_unless_runs("triton")
    args = _valid(op)
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=f"{name} is on cpu"):
        _call(op, args, "triton")


def test_eager_forward_skips_the_raw_op_checks(monkeypatch):
    """The public ops validate once (each op module's `check`) and call the kernels through `KernelOp.__call__`
    without the dispatcher; the raw ops' checks would only cost host time there. (Backward always goes through the
    checked raw ops.)"""
    skip_unless_runs("triton")

    def refuse(*args, **kwargs):
        raise AssertionError("a raw-op check ran on the eager forward path")

    for module in (attention, fused_qkv, gelu_mlp):
        monkeypatch.setattr(module, "check_forward_args", refuse)
    for name in ("check_first", "check_arg"):  # what the block ops' raw forwards check with
        for module in (kernel_op, proj_residual, ln_gelu_mlp):
            monkeypatch.setattr(module, name, refuse, raising=False)
    monkeypatch.setattr(ln_fused_qkv.fused_qkv, "check_forward_args", refuse)
    x, w, b = _t(B, N, C), _t(3 * C, C), _t(3 * C)
    q, k, v = vk.fused_qkv(x, w, b, H, backend="triton")
    out = vk.attention(q, k, v, backend="triton")
    vk.gelu_mlp(out.transpose(1, 2).reshape(B, N, C), _t(HD, C), _t(HD), _t(C_OUT, HD), None, backend="triton")
    ln_w, ln_b = _t(C), _t(C)
    q, k, v = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, H, backend="triton")
    o = vk.attention(q, k, v, backend="triton").transpose(1, 2).reshape(B, N, C)
    y = vk.proj_residual(o, _t(C, C), _t(C), x, backend="triton")
    vk.ln_gelu_mlp(y, ln_w, ln_b, 1e-6, _t(HD, C), _t(HD), _t(C, HD), None, backend="triton")


# ----------------------------------------------------------------------------------------------------
# empty batches
# ----------------------------------------------------------------------------------------------------
def _ln():
    return _t(C), _t(C)


def _empty_case(op: str, batch: int = 0):
    """(function of the tensors, tensors, names of the weights and biases) of `op` on a batch of `batch` images."""
    if op == "attention":
        return (
            (lambda q, k, v, backend: vk.attention(q, k, v, backend=backend)),
            [_t(batch, H, N, D) for _ in "qkv"],
            (),
        )
    if op == "fused_qkv":
        return (
            lambda x, w, b, backend: vk.fused_qkv(x, w, b, H, backend=backend),
            [_t(batch, N, C), _t(3 * C, C), _t(3 * C)],
            (1, 2),
        )
    if op == "gelu_mlp":
        return (
            lambda x, w1, b1, w2, b2, backend: vk.gelu_mlp(x, w1, b1, w2, b2, backend=backend),
            [_t(batch, N, C), _t(HD, C), _t(HD), _t(C_OUT, HD), _t(C_OUT)],
            (1, 2, 3, 4),
        )
    if op == "ln_fused_qkv":
        return (
            lambda x, lw, lb, w, b, backend: vk.ln_fused_qkv(x, lw, lb, 1e-6, w, b, H, backend=backend),
            [_t(batch, N, C), *_ln(), _t(3 * C, C), _t(3 * C)],
            (1, 2, 3, 4),
        )
    if op == "proj_residual":
        return (
            lambda o, w, b, r, backend: vk.proj_residual(o, w, b, r, backend=backend),
            [_t(batch, N, C), _t(C_OUT, C), _t(C_OUT), _t(batch, N, C_OUT)],
            (1, 2),
        )
    if op == "ln_gelu_mlp":
        return (
            lambda x, lw, lb, w1, b1, w2, b2, backend: vk.ln_gelu_mlp(x, lw, lb, 1e-6, w1, b1, w2, b2, backend=backend),
            [_t(batch, N, C), *_ln(), _t(HD, C), _t(HD), _t(C, HD), _t(C)],
            (1, 2, 3, 4, 5, 6),
        )
    raise AssertionError(op)


EMPTY_OPS = ("attention", "fused_qkv", "gelu_mlp", "ln_fused_qkv", "proj_residual", "ln_gelu_mlp")


def _no_kernels(monkeypatch):
    """Make any kernel-module lookup fail the test: an empty batch must launch nothing."""

    def refuse(*args):
        raise AssertionError(f"an empty batch reached the kernels {args}")

    monkeypatch.setattr(kernel_op, "kernels", refuse)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "cuda"])
@pytest.mark.parametrize("op", EMPTY_OPS)
def test_empty_batch_gives_empty_outputs_and_zero_weight_gradients(op, backend, monkeypatch):
    skip_unless_runs(backend)
    _no_kernels(monkeypatch)
    fn, tensors, weights = _empty_case(op)
    tensors = [t.requires_grad_(True) for t in tensors]
    outputs = fn(*tensors, backend=backend)
    expected = fn(*(t.detach() for t in tensors), backend="reference")  # plain torch ops: PyTorch's own answer
    outputs, expected = [o if isinstance(o, (tuple, list)) else (o,) for o in (outputs, expected)]
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert all(o.numel() == 0 for o in outputs)
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    for i, t in enumerate(tensors):
        assert t.grad is not None and t.grad.shape == t.shape, f"tensor {i}"
        if i in weights:  # a sum over no rows, as F.linear's and LayerNorm's backward give
            assert torch.equal(t.grad, torch.zeros_like(t)), f"tensor {i}"
    if backend in ("triton", "cuda"):
        assert "empty" in vk.explain_backend(op, *_explain_args(op, tensors), backend=backend).reason


def _explain_args(op, tensors):
    if op == "attention":
        return tensors
    if op == "fused_qkv":
        return (*tensors, H)
    if op == "gelu_mlp":
        return tensors
    if op == "ln_fused_qkv":
        x, lw, lb, w, b = tensors
        return x, lw, lb, 1e-6, w, b, H
    if op == "proj_residual":
        return tensors
    x, lw, lb, *mlp = tensors
    return (x, lw, lb, 1e-6, *mlp)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_explain_backend_says_an_empty_batch_runs_no_kernel(backend):
    skip_unless_runs(backend)
    q, k, v = (_t(0, H, N, D) for _ in range(3))
    choice = vk.explain_backend("attention", q, k, v, backend=backend)
    assert choice.backend == "torch"
    if backend != "torch":
        assert f"backend={backend!r} was requested" in choice.reason and "no kernel" in choice.reason


@pytest.mark.parametrize("shape", [(0, C), (2, 0, C), (0, 3, N, C)])
@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_gelu_mlp_takes_x_with_no_rows(shape, backend, monkeypatch):
    skip_unless_runs(backend)
    _no_kernels(monkeypatch)
    x = _t(*shape).requires_grad_(True)
    w1, b1, w2, b2 = (_t(*s).requires_grad_(True) for s in ((HD, C), (HD,), (C_OUT, HD), (C_OUT,)))
    y = vk.gelu_mlp(x, w1, b1, w2, b2, backend=backend)
    assert y.shape == (*shape[:-1], C_OUT)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in (w1, b1, w2, b2))


def test_gelu_mlp_0d_x_is_a_value_error_naming_x():
    with pytest.raises(ValueError, match=r"x must have at least 1 dim \(\.\.\., C\)"):
        vk.gelu_mlp(torch.tensor(1.0), torch.randn(4, 1), None, torch.randn(1, 4), None)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: vk.attention(*(torch.randn(1, 2, 0, 32) for _ in range(3))), "q must be non-empty"),
        (lambda: vk.attention(*(torch.randn(0, 0, 5, 32) for _ in range(3))), "q must be non-empty"),
        (lambda: vk.fused_qkv(torch.randn(0, 5, 64), torch.randn(0, 64), None, 2), "weight must be non-empty"),
        (lambda: vk.gelu_mlp(torch.randn(0, 0), torch.randn(4, 0), None, torch.randn(1, 4), None), "x must be non-emp"),
        (lambda: vk.proj_residual(torch.randn(0, 5, 8), torch.randn(8, 8), None, torch.randn(0, 5, 0)), "residual"),
    ],
)
def test_only_the_batch_may_be_empty(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "op, kwargs, match",
    [
        ("attention", {"backend": "cuda"}, "backend='cuda' cannot run these inputs"),
        ("fused_qkv", {"backend": "nope"}, "backend must be one of"),
    ],
)
def test_an_empty_batch_is_validated_like_any_other(op, kwargs, match):
    """An empty batch runs no kernel, but the backend asked for must still be one that could run these inputs."""
    if op == "attention" and torch.cuda.is_available():
        pytest.skip("needs CPU tensors for the cuda backend to refuse them")
    _fn, tensors, _weights = _empty_case(op)
    with pytest.raises(ValueError, match=match):
        getattr(vk, op)(*tensors[:3], *([H] if op == "fused_qkv" else []), **kwargs)
    if "triton" in vk.available_backends(DEVICE):
        q, k, v = (_t(0, H, N, 20) for _ in range(3))
        with pytest.raises(ValueError, match="head dim D=20"):
            vk.attention(q, k, v, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "auto"])
def test_vit_forward_and_backward_on_an_empty_batch(backend, monkeypatch):
    skip_unless_runs(backend if backend != "auto" else "torch")
    _no_kernels(monkeypatch)
    model = vit.VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=64, depth=2, num_heads=2,
                                  backend=backend).to(DEVICE)  # fmt: skip
    images = _t(0, 3, 16, 16)
    logits = model(images)
    assert logits.shape == (0, 3)
    F.cross_entropy(logits, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction="sum").backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
