"""Dispatch: backend choice as documented (`auto` from the measured table), clear errors on bad input, the
per-device caches, and no graph breaks under torch.compile.

Tests that run a backend use this machine's device (CUDA when present) and run every backend that can run
there, skipping the others with their reason; the selection logic on CUDA is also checked without a GPU,
on fake CUDA tensors (FakeTensorMode) with a faked compute capability.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, REPO, TOLERANCES, rel_error
from torch._subclasses.fake_tensor import FakeTensorMode

import vit_kernels as vk
from vit_kernels import dispatch
from vit_kernels.ops import attention as attention_op
from vit_kernels.ops import fused_qkv as fused_qkv_op
from vit_kernels.ops import gelu_mlp as gelu_mlp_op

KERNEL_BACKENDS = ("triton", "cuda")


def _skip_unless_runs(backend: str, device: torch.device | str = DEVICE) -> None:
    why = dispatch.device_unavailable_reason(backend, torch.device(device))
    if why:
        pytest.skip(f"{backend} cannot run on {device} here: {why}")


def _attn_inputs(B=1, H=2, N=5, D=32, dtype=torch.float32, device=DEVICE):
    return [torch.randn(B, H, N, D, dtype=dtype, device=device) for _ in range(3)]


def _qkv_inputs(B=1, N=5, C=64, dtype=torch.float32, bias=True, device=DEVICE):
    return (
        torch.randn(B, N, C, dtype=dtype, device=device),
        torch.randn(3 * C, C, dtype=dtype, device=device),
        torch.randn(3 * C, dtype=dtype, device=device) if bias else None,
    )


def _mlp_inputs(M=5, C=32, Hd=64, dtype=torch.float32, device=DEVICE):
    return (
        torch.randn(M, C, dtype=dtype, device=device),
        torch.randn(Hd, C, dtype=dtype, device=device),
        torch.randn(Hd, dtype=dtype, device=device),
        torch.randn(C, Hd, dtype=dtype, device=device),
        torch.randn(C, dtype=dtype, device=device),
    )


# ----------------------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------------------
def test_available_backends_on_cpu():
    names = vk.available_backends("cpu")
    assert names[:2] == ["reference", "torch"]
    assert "cuda" not in names  # no CUDA tensors on a CPU device, whatever was built
    assert ("triton" in names) == (
        dispatch._triton_interpreting() and dispatch.importlib.util.find_spec("triton") is not None
    )


def test_auto_on_cpu_is_torch_never_reference():
    q, k, v = _attn_inputs(device="cpu")
    reason = "auto on cpu is torch: kernel backends are picked only from GPU measurements"
    assert attention_op.check(q, k, v, None, "auto")[0] == ("torch", reason)
    assert fused_qkv_op.check(*_qkv_inputs(device="cpu"), 2, "auto") == ("torch", reason)
    assert gelu_mlp_op.check(*_mlp_inputs(device="cpu"), "none", "auto") == ("torch", reason)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_is_torch_where_nothing_was_measured(monkeypatch):
    monkeypatch.setattr(dispatch, "_TABLE", {})
    q, k, v = _attn_inputs(device="cuda", dtype=torch.bfloat16, N=197, D=64)
    backend, reason = vk.explain_backend("attention", q, k, v)
    major, minor = torch.cuda.get_device_capability()
    assert (backend, reason) == (
        "torch",
        f"no committed GPU measurement for sm_{major}{minor} attention bf16 D=64 N<=256 B*H<=2: torch",  # B=1, H=2
    )
    assert vk.explain_backend("fused_qkv", *_qkv_inputs(device="cuda"), 2).backend == "torch"
    assert vk.explain_backend("gelu_mlp", *_mlp_inputs(device="cuda")).backend == "torch"


def test_explicit_backend_is_honoured_or_raises():
    q, k, v = _attn_inputs()
    for backend in vk.available_backends(DEVICE):
        assert attention_op.check(q, k, v, None, backend)[0] == (backend, f"backend={backend!r} was requested")
    cpu = _attn_inputs(device="cpu")
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA"):
        vk.attention(*cpu, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.attention(q, k, v, backend="flash")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_unsupported_head_dim_names_backend_and_dim(backend):
    q, k, v = _attn_inputs(D=40)
    assert attention_op.check(q, k, v, None, "auto")[0].backend == "torch"  # auto routes around it
    _skip_unless_runs(backend)
    with pytest.raises(ValueError, match=rf"backend='{backend}'.*head dim D=40 is not supported"):
        vk.attention(q, k, v, backend=backend)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _attn_inputs(D=64)
    assert attention_op.check(q, k, v, None, "torch")[1] == pytest.approx(64**-0.5)


def test_scale_takes_numpy_and_int_scalars_as_sdpa_does():
    import numpy as np

    q, k, v = _attn_inputs(D=64)
    for scale in (np.float32(0.125), np.float64(0.125), np.int64(1), 1):
        choice, taken = attention_op.check(q, k, v, scale, "torch")
        assert type(taken) is float and taken == float(scale), scale
        torch.testing.assert_close(vk.attention(q, k, v, scale=scale, backend="torch"),
                                   F.scaled_dot_product_attention(q, k, v, scale=float(scale)))  # fmt: skip


@pytest.mark.parametrize("backend", ("reference", "torch") + KERNEL_BACKENDS)
def test_attention_output_takes_in_place_edits_as_sdpa_does(backend):
    """The kernel backends' output (laid out (B, N, H, D)) was a view made inside the autograd Function, which
    autograd refuses to edit in place: `o = out.transpose(1, 2).reshape(B, N, C); o += x` raised at once, with
    inputs that require grad, where SDPA's output takes it. Now it takes it; the backward of the edited output it
    saved is refused, as SDPA's flash backward does, instead of differentiating a value it never returned."""
    _skip_unless_runs(backend)
    B, H, N, D = 1, 2, 5, 32
    q, k, v = (t.requires_grad_(True) for t in _attn_inputs(B, H, N, D))
    with torch.no_grad():
        expected = vk.attention(q, k, v, backend="reference").transpose(1, 2).reshape(B, N, H * D) + 1
    o = vk.attention(q, k, v, backend=backend).transpose(1, 2).reshape(B, N, H * D)
    o += 1
    tol = 1e-5 if backend in ("reference", "torch") else 2e-3  # the kernels on a GPU: fp32 as tf32
    torch.testing.assert_close(o.detach(), expected, rtol=tol, atol=tol)
    out = vk.attention(q, k, v, backend=backend)
    out.mul_(2)
    if backend != "reference":  # the reference saves its softmax, not its output
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vmap_runs_and_torch_func_grad_says_what_to_do(backend, highest_precision):
    """vmap reached the eager path's internal autograd.Function, and torch.func.grad a custom op without a func
    rule: both raised torch's "must override the setup_context staticmethod", about code the user never wrote.
    vmap now runs the custom op (as torch.compile's path does); grad / jvp transforms say what to use."""
    _skip_unless_runs(backend)
    q, k, v = (torch.randn(3, 1, 2, 5, 32, device=DEVICE) for _ in range(3))
    out = torch.vmap(lambda a, b, c: vk.attention(a, b, c, backend=backend))(q, k, v)
    torch.testing.assert_close(out, torch.stack([vk.attention(*t, backend="torch") for t in zip(q, k, v)]))
    x, w1, b1, w2, b2 = _mlp_inputs()
    xs = torch.stack([x, x.flip(0)])
    out = torch.vmap(lambda x: vk.gelu_mlp(x, w1, b1, w2, b2, backend=backend))(xs)
    torch.testing.assert_close(out, vk.gelu_mlp(xs, w1, b1, w2, b2, backend="torch"))
    with pytest.raises(NotImplementedError, match=r"vit_kernels::attention_fwd has no torch\.func grad rule"):
        torch.func.grad(lambda a: vk.attention(a, a, a, backend=backend).sum())(q[0])
    with pytest.raises(NotImplementedError, match=r"vit_kernels::mlp_fwd has no torch\.func jvp rule"):
        torch.func.jvp(lambda x: vk.gelu_mlp(x, w1, b1, w2, b2, backend=backend), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_says_it_is_not_supported(backend, highest_precision):
    """create_graph=True makes a first gradient that requires grad; differentiating it again must stop with the
    custom op's error, not return second derivatives of a graph half made of kernel outputs (silently wrong)."""
    _skip_unless_runs(backend)
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in _mlp_inputs())
    (gx,) = torch.autograd.grad(vk.gelu_mlp(x, w1, b1, w2, b2, backend=backend).square().sum(), x, create_graph=True)
    (ref,) = torch.autograd.grad(vk.gelu_mlp(x, w1, b1, w2, b2, backend="torch").square().sum(), x)
    assert rel_error(gx, ref) <= TOLERANCES[torch.float32]  # the first gradient itself is right
    with pytest.raises(RuntimeError, match=r"(?s)mlp_bwd.*autograd|autograd.*mlp_bwd"):
        torch.autograd.grad(gx.sum(), w1)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _attn_inputs(device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        vk.attention(q, k, v, backend="triton")


LATE_INTERPRETER = """
import os, sys, torch
import vit_kernels as vk
late = sys.argv[1] == "late"
if late:  # after the import: Triton (imported through torch._dynamo) has built its helpers for the GPU
    os.environ["TRITON_INTERPRET"] = "1"
q = torch.randn(1, 2, 5, 32)
print("available:", vk.available_backends("cpu"))
try:
    out = vk.attention(q, q, q, backend="triton")
    print("max error", (out - torch.nn.functional.scaled_dot_product_attention(q, q, q)).abs().max().item())
except ValueError as e:
    print("ValueError:", e)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("when", ["late", "early"])
def test_triton_interpret_set_after_import_says_what_to_do(when):
    """TRITON_INTERPRET=1 set after `import vit_kernels` passed the dispatcher and then failed inside Triton
    ("Cannot call @triton.jit'd outside of the scope of a kernel"): Triton builds its own @jit helpers (tl.zeros,
    ...) when imported, and vit_kernels imports it. Now the dispatcher says so and what to do; set before the
    import (the control), the interpreter runs. In a subprocess: this process has its interpreter set up."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if when == "early":
        import numpy
        import triton

        # Triton 3.6's interpreter fails under numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python
        # scalars", inside any kernel): seen on the H200 image, 2026-12-04; CI pins numpy < 2.4 for Triton 3.6.
        def major_minor(version: str) -> tuple[int, int]:
            return tuple(int(p) for p in version.split(".")[:2])

        if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
            pytest.skip(f"Triton {triton.__version__}'s interpreter does not run under numpy {numpy.__version__}")
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", LATE_INTERPRETER, when], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-3000:]  # before: InterpreterError from inside Triton (late)
    # Early, it runs; late, it runs too where `import vit_kernels` does not import triton (another torch), else
    # the dispatcher refuses, saying what to do.
    if when == "early" or "max error" in res.stdout:
        assert "'triton'" in res.stdout and "max error" in res.stdout, res.stdout
        assert float(res.stdout.split("max error")[1]) < 1e-4, res.stdout
        return
    assert "'triton'" not in res.stdout.splitlines()[0], res.stdout  # not offered where it cannot run
    message = res.stdout.split("ValueError:")[1] if "ValueError:" in res.stdout else res.stdout
    assert "TRITON_INTERPRET=1 was set after triton was imported" in message, res.stdout
    assert "before importing vit_kernels" in message, res.stdout


# ----------------------------------------------------------------------------------------------------
# bad input: every case raises TypeError/ValueError naming the argument
# ----------------------------------------------------------------------------------------------------
def _bad_attention_cases():
    q, k, v = _attn_inputs()
    return [
        ((q.cpu().numpy(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        ((q[0], k[0], v[0]), {}, ValueError, "q must be 4-D"),
        ((q, k.half(), v), {}, TypeError, "k has dtype"),
        ((q.double(), k.double(), v.double()), {}, TypeError, "q must be float32, float16 or bfloat16"),
        ((q.int(), k, v), {}, TypeError, "q must be float32"),
        ((q, k[:, :, :3], v), {}, ValueError, "k must have shape"),
        ((q, k, v[..., :16]), {}, ValueError, "v must have shape"),
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0]), {}, ValueError, "q must be non-empty"),
        ((q, k, v), {"scale": float("nan")}, ValueError, "scale must be finite, got nan"),
        ((q, k, v), {"scale": 10**400}, ValueError, "scale must be finite"),  # past float: not an OverflowError
        ((q, k, v), {"scale": "0.1"}, TypeError, "scale must be a real number or None, got str"),
        ((q, k, v), {"scale": True}, TypeError, "scale must be a real number or None, got bool"),
        ((q, k, v), {"scale": torch.tensor(0.1)}, TypeError, "scale must be a real number or None, got Tensor"),
        ((q.cpu(), k.cpu(), v.cpu()), {"backend": "cuda"}, ValueError, "cuda"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_attention_cases())))
def test_bad_attention_input_raises_clear_error(case):
    args, kwargs, exc, match = _bad_attention_cases()[case]
    with pytest.raises(exc, match=match):
        vk.attention(*args, **kwargs)


def _bad_qkv_cases():
    x, w, b = _qkv_inputs()
    return [
        ((x[0], w, b, 2), ValueError, "x must be 3-D"),
        ((x, w[:64], b, 2), ValueError, r"weight must have shape \(3C, C\)"),
        ((x, w, b[:10], 2), ValueError, r"bias must have shape \(3C,\)"),
        ((x, w, b, 3), ValueError, "divisible by num_heads=3"),
        ((x, w, b, 0), TypeError, "num_heads must be a positive int"),
        ((x, w, b, 2.0), TypeError, "num_heads must be a positive int"),
        ((x, w.half(), b, 2), TypeError, "weight has dtype"),
        ((x, w, b.half(), 2), TypeError, "bias has dtype"),
        ((x, w, [1.0], 2), TypeError, "bias must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_qkv_cases())))
def test_bad_fused_qkv_input_raises_clear_error(case):
    args, exc, match = _bad_qkv_cases()[case]
    with pytest.raises(exc, match=match):
        vk.fused_qkv(*args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_qkv_channel_alignment_for_kernel_backends(backend):
    x, w, b = _qkv_inputs(C=36)
    assert len(vk.fused_qkv(x, w, b, 3, backend="torch")) == 3  # eager backends take any C
    _skip_unless_runs(backend)
    with pytest.raises(ValueError, match=rf"backend='{backend}'.*multiples of 8, got C=36"):
        vk.fused_qkv(x, w, b, 3, backend=backend)


def _bad_mlp_cases():
    x, w1, b1, w2, b2 = _mlp_inputs()
    return [
        ((x, w1[:, :5], b1, w2, b2), {}, ValueError, r"fc1_weight must have shape \(hidden, C\)"),
        ((x, w1, b1[:5], w2, b2), {}, ValueError, r"fc1_bias must have shape"),
        ((x, w1, b1, w2[:, :5], b2), {}, ValueError, r"fc2_weight must have shape \(C_out, hidden\)"),
        ((x, w1, b1, w2, b2[:5]), {}, ValueError, r"fc2_bias must have shape"),
        ((x, w1, b1, w2, b2.bfloat16()), {}, TypeError, "fc2_bias has dtype"),
        ((x, w1, b1, w2, b2), {"approximate": "erf"}, ValueError, "approximate must be 'none' or 'tanh'"),
        ((x, w1[None], b1, w2, b2), {}, ValueError, "fc1_weight must be 2-D"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_mlp_cases())))
def test_bad_gelu_mlp_input_raises_clear_error(case):
    args, kwargs, exc, match = _bad_mlp_cases()[case]
    with pytest.raises(exc, match=match):
        vk.gelu_mlp(*args, **kwargs)


def test_device_mismatch_is_a_value_error():
    q, k, v = _attn_inputs()
    k = k.to("meta")
    with pytest.raises(ValueError, match=f"k is on meta but q is on {q.device}"):
        vk.attention(q, k, v)


# ----------------------------------------------------------------------------------------------------
# torch.compile: each op is one node, no graph break, forward and backward
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_torch_compile_has_no_graph_breaks(backend, monkeypatch):
    _skip_unless_runs(backend)
    monkeypatch.setattr(dispatch, "_MODULE_FOUND", {})  # cold, as when compiling before any eager call
    torch._dynamo.reset()
    x, w, b = _qkv_inputs(B=1, N=5, C=64)
    _, w1, b1, w2, b2 = _mlp_inputs(C=64, Hd=64)
    params = [t.requires_grad_(True) for t in (x, w, b, w1, b1, w2, b2)]

    def block(x, w, b, w1, b1, w2, b2):
        q, k, v = vk.fused_qkv(x, w, b, 2, backend=backend)
        o = vk.attention(q, k, v, backend=backend).transpose(1, 2).reshape(x.shape)
        return vk.gelu_mlp(o, w1, b1, w2, b2, backend=backend)

    explanation = torch._dynamo.explain(block)(*params)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(*params)
    out.sum().backward()
    expected = block(*(p.detach() for p in params))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_partial_build_is_reported_not_crashed(monkeypatch):
    from vit_kernels import kernel_op

    monkeypatch.setitem(kernel_op.KERNEL_MODULES, ("torch", "attention"), "vit_kernels.no_such_module")
    reason = dispatch._missing_kernels("torch", "attention")
    assert reason == "this build of vit_kernels has no torch attention kernels (vit_kernels.no_such_module is missing)"
    assert dispatch._missing_kernels("torch", "linear") is None


# ----------------------------------------------------------------------------------------------------
# auto on CUDA: the measured table (fake CUDA tensors, faked compute capability: no GPU needed)
# ----------------------------------------------------------------------------------------------------
def _table(*entries):
    """Entries as tuples (arch, op, dtype, dim, tokens, backend), attention's with its batch (B * H bucket) last."""
    return dispatch.parse_table(
        {"entries": [dict(zip(("arch", "op", "dtype", "dim", "tokens", "backend", "batch"), e)) for e in entries]}
    )


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA tensors (shapes and dtypes only) on a device whose capability the test sets; an empty table."""
    capability = {0: (9, 0)}
    monkeypatch.setattr(dispatch, "_CAPABILITY", capability)
    monkeypatch.setattr(dispatch, "_TABLE", {})
    with FakeTensorMode():
        yield capability


def _cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_committed_table_loads():
    table = dispatch.load_table(dispatch.MEASURED_TABLE)
    assert table == dispatch._TABLE
    assert vk.build_info()["measured_table_entries"] == len(table)
    assert all(entry["backend"] in ("torch", "triton", "cuda") for entry in table.values())


@pytest.mark.parametrize("table", ["proposed", "missing", "broken"])
def test_a_table_named_by_the_environment_replaces_the_committed_one(tmp_path, table):
    """VIT_KERNELS_MEASURED_TABLE (gpu_check times vit:auto with auto_table's proposal) is read instead of the
    committed table; a name that is no file, or no valid table, warns at import and leaves auto on torch."""
    import subprocess
    import sys

    path = tmp_path / "proposed.json"
    entry = {"arch": "sm_90", "op": "gelu_mlp", "dtype": "bf16", "dim": 1024, "tokens": 65536, "backend": "triton"}
    if table == "proposed":
        path.write_text(json.dumps({"entries": [entry, {**entry, "op": "fused_qkv"}]}))
    elif table == "broken":
        path.write_text('{"entries": [')
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import vit_kernels as vk\n"
        "print(vk.build_info()['measured_table_entries'])"
    )
    env = {**__import__("os").environ, "VIT_KERNELS_MEASURED_TABLE": str(path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == ("2" if table == "proposed" else "0"), res.stdout
    if table == "proposed":
        assert "RuntimeWarning" not in res.stderr, res.stderr
    else:
        why = "names no file" if table == "missing" else "not valid JSON"
        assert why in res.stderr and "runs torch everywhere" in res.stderr, res.stderr


def test_auto_without_a_measurement_is_torch_and_says_so(fake_cuda):
    q = _cuda(2, 3, 197, 64)
    assert vk.explain_backend("attention", q, q, q) == (
        "torch",
        "no committed GPU measurement for sm_90 attention bf16 D=64 N<=256 B*H<=8: torch",
    )
    x, w, b = _cuda(8, 197, 768), _cuda(3 * 768, 768), _cuda(3 * 768)
    assert vk.explain_backend("fused_qkv", x, w, b, 12) == (
        "torch",
        "no committed GPU measurement for sm_90 fused_qkv bf16 C<=1024 B*N<=2048: torch",
    )


def test_auto_takes_the_measured_backend_only_where_it_was_measured(fake_cuda, monkeypatch):
    _skip_unless_runs("triton", "cuda:0")  # the real availability check, on the faked sm_90
    monkeypatch.setattr(dispatch, "_TABLE", _table(("sm_90", "attention", "bf16", 64, 256, "triton", 8)))
    q = _cuda(2, 3, 197, 64)
    backend, reason = vk.explain_backend("attention", q, q, q)
    assert (backend, reason) == (
        "triton",
        "measured correct and fastest for sm_90 attention bf16 D=64 N<=256 B*H<=8: triton",
    )
    assert attention_op.check(q, q, q, None, "auto")[0].backend == "triton"
    assert vk.explain_backend("attention", *[_cuda(2, 3, 129, 64)] * 3).backend == "triton"  # same bucket
    # every other key misses: another N bucket, head dim, dtype, op, arch
    assert vk.explain_backend("attention", *[_cuda(2, 3, 257, 64)] * 3).backend == "torch"
    assert vk.explain_backend("attention", *[_cuda(2, 3, 128, 64)] * 3).backend == "torch"
    assert vk.explain_backend("attention", *[_cuda(2, 3, 197, 80)] * 3).backend == "torch"
    assert vk.explain_backend("attention", *[_cuda(2, 3, 197, 64, dtype=torch.float16)] * 3).backend == "torch"
    # another batch: B * H = 2 or 9 is outside the measured B * H <= 8 bucket, 5..8 inside it
    assert vk.explain_backend("attention", *[_cuda(1, 2, 197, 64)] * 3) == (
        "torch",
        "no committed GPU measurement for sm_90 attention bf16 D=64 N<=256 B*H<=2: torch",
    )
    assert vk.explain_backend("attention", *[_cuda(3, 3, 197, 64)] * 3).backend == "torch"
    assert vk.explain_backend("attention", *[_cuda(1, 5, 197, 64)] * 3).backend == "triton"
    x = _cuda(1, 197, 192)
    assert vk.explain_backend("fused_qkv", x, _cuda(576, 192), None, 3).backend == "torch"
    fake_cuda[0] = (8, 6)  # an sm_86 card: the sm_90 measurement says nothing about it
    assert vk.explain_backend("attention", q, q, q) == (
        "torch",
        "no committed GPU measurement for sm_86 attention bf16 D=64 N<=256 B*H<=8: torch",
    )
    assert vk.explain_backend("attention", q, q, q, backend="reference").backend == "reference"


def test_auto_linear_ops_use_channel_and_token_buckets(fake_cuda, monkeypatch):
    _skip_unless_runs("triton", "cuda:0")
    monkeypatch.setattr(
        dispatch,
        "_TABLE",
        _table(
            ("sm_90", "gelu_mlp", "fp16", 1024, 65536, "triton"), ("sm_90", "fused_qkv", "fp16", 1024, 65536, "torch")
        ),
    )
    x = _cuda(256, 197, 768, dtype=torch.float16)  # B * N = 50432 rows, C = 768
    w1, b1 = _cuda(3072, 768, dtype=torch.float16), _cuda(3072, dtype=torch.float16)
    w2, b2 = _cuda(768, 3072, dtype=torch.float16), _cuda(768, dtype=torch.float16)
    assert vk.explain_backend("gelu_mlp", x, w1, b1, w2, b2) == (
        "triton",
        "measured correct and fastest for sm_90 gelu_mlp fp16 C<=1024 B*N<=65536: triton",
    )
    assert (
        vk.explain_backend("gelu_mlp", _cuda(8, 197, 768, dtype=torch.float16), w1, b1, w2, b2).backend == "torch"
    )  # 1576 rows: not measured
    w, b = _cuda(3 * 768, 768, dtype=torch.float16), _cuda(3 * 768, dtype=torch.float16)
    assert vk.explain_backend("fused_qkv", x, w, b, 12).backend == "torch"  # measured: torch won


def test_auto_fp32_is_keyed_by_the_matmul_precision(fake_cuda, monkeypatch, highest_precision):
    _skip_unless_runs("triton", "cuda:0")
    monkeypatch.setattr(dispatch, "_TABLE", _table(("sm_90", "attention", "tf32", 64, 256, "triton", 8)))
    q = _cuda(2, 3, 197, 64, dtype=torch.float32)
    # "highest" (the fixture's; restored after the test): exact fp32, the tf32 measurement does not apply
    assert vk.explain_backend("attention", q, q, q).reason.startswith(
        "no committed GPU measurement for sm_90 attention fp32"
    )
    torch.set_float32_matmul_precision("high")
    assert vk.explain_backend("attention", q, q, q).backend == "triton"


def test_auto_measured_backend_that_cannot_run_these_inputs_is_torch(fake_cuda, monkeypatch):
    monkeypatch.setattr(dispatch, "_TABLE", _table(("sm_90", "attention", "bf16", 40, 256, "triton", 8)))
    q = _cuda(2, 3, 197, 40)
    backend, reason = vk.explain_backend("attention", q, q, q)
    assert backend == "torch"
    assert reason.startswith(
        "measured fastest for sm_90 attention bf16 D=40 N<=256 B*H<=8 is triton, which cannot run here ("
    )
    assert reason.endswith("): torch")


def test_explain_backend_on_cpu_and_bad_arguments():
    q, k, v = _attn_inputs(device="cpu")
    assert vk.explain_backend("attention", q, k, v, scale=0.5) == (
        "torch",
        "auto on cpu is torch: kernel backends are picked only from GPU measurements",
    )
    assert vk.explain_backend("gelu_mlp", *_mlp_inputs(device="cpu"), approximate="tanh", backend="reference") == (
        "reference",
        "backend='reference' was requested",
    )
    with pytest.raises(ValueError, match="op must be one of"):
        vk.explain_backend("softmax", q, k, v)
    with pytest.raises(TypeError, match="k has dtype"):
        vk.explain_backend("attention", q, k.half(), v)  # the op's own validation


@pytest.mark.parametrize(
    "entry, match",
    [
        (("sm_90", "attention", "bf16", 64, 197, "triton", 8), "tokens 197 is not a power of two"),
        (("sm_90", "mlp", "bf16", 64, 256, "triton"), "op 'mlp' is not one of"),
        (("sm_90", "gelu_mlp", "bf16", 768, 256, "triton"), "dim 768 is not a power of two"),
        (("sm_90", "attention", "fp64", 64, 256, "triton", 8), "dtype 'fp64'"),
        (("90", "attention", "bf16", 64, 256, "triton", 8), "arch '90' is not sm_"),
        (("sm_90", "attention", "bf16", 64, 256, "auto", 8), "backend 'auto' is not torch, triton or cuda"),
        (("sm_90", "attention", "bf16", 64, 256, "triton"), "is malformed: missing batch"),
        (("sm_90", "attention", "bf16", 64, 256, "triton", 6), "batch 6 is not a power of two"),
        (("sm_90", "gelu_mlp", "bf16", 1024, 256, "triton", 8), "batch is attention's field"),
    ],
)
def test_bad_table_entry_is_named(entry, match):
    with pytest.raises(ValueError, match=match):
        _table(entry)


def test_table_key_repeated_or_missing_fields():
    with pytest.raises(ValueError, match="repeats the key sm_90 attention bf16 D=64 N<=256 B\\*H<=8"):
        _table(*[("sm_90", "attention", "bf16", 64, 256, "triton", 8)] * 2)
    with pytest.raises(ValueError, match="entry 0 .* is malformed"):
        dispatch.parse_table({"entries": [{"arch": "sm_90", "op": "attention"}]})


# The arch keys the dispatcher builds (_table_key): f"sm_{major}{minor}" from torch's compute capability.
@pytest.mark.parametrize("arch", ["sm_9", "sm_90a", "sm_090", "SM_90", "sm_", "sm_9.0", 90])
def test_table_arch_the_dispatcher_can_never_match_is_refused(arch):
    with pytest.raises(ValueError, match=r"entry 0 .*arch"):
        _table((arch, "attention", "bf16", 64, 256, "triton", 8))


def test_table_accepts_every_arch_a_device_can_have():
    assert [k.arch for k in _table(*[(a, "attention", "bf16", 64, 256, "triton", 8) for a in ("sm_80", "sm_86", "sm_90",
                                                                                           "sm_100", "sm_120")])] == [
        "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("dim", 64.9, "dim 64.9 is not an integer"),  # int() would have made it D=64
        ("dim", 64.0, "dim 64.0 is not an integer"),
        ("dim", "64", "dim '64' is not an integer"),
        ("tokens", True, "tokens True is not an integer"),
        ("batch", 8.0, "batch 8.0 is not an integer"),
        ("dim", 0, "dim 0 is not positive"),
        ("op", ["attention"], r"op \['attention'\] is not a string"),
        ("backend", None, "backend None is not a string"),
        ("evidence", 3, "evidence 3 is not a string"),
    ],
)
def test_table_entry_of_the_wrong_type_is_named(field, value, match):
    entry = {"arch": "sm_90", "op": "attention", "dtype": "bf16", "dim": 64, "tokens": 256, "batch": 8,
             "backend": "triton"}  # fmt: skip
    good = dict(entry, dim=80)
    with pytest.raises(ValueError, match=rf"^t\.json: entry 1 \(.*{match}"):
        dispatch.parse_table({"entries": [good, {**entry, field: value}]}, source="t.json")


@pytest.mark.parametrize(
    "text, match",
    [
        ("[]", r"a JSON object with an \"entries\" list, got a list"),
        ('{"entries": null}', r"\"entries\" is null"),
        ('{"entries": {"arch": "sm_90"}}', r"\"entries\" is a dict"),
        ("{}", r"no \"entries\""),
        ('{"entries": ["sm_90"]}', r"entry 0 \('sm_90'\) is not an object"),
        ('{"entries": [', "not valid JSON"),
        ("\xff", "not valid JSON"),
    ],
)
def test_malformed_table_file_is_a_value_error_naming_the_file(tmp_path, text, match):
    path = tmp_path / "measured_backends.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=match) as info:
        dispatch.load_table(path)
    assert str(info.value).startswith(f"{path}: "), info.value


def test_auto_says_when_the_committed_table_could_not_be_read(fake_cuda, monkeypatch):
    monkeypatch.setattr(dispatch, "_TABLE_PROBLEM", "measured_backends.json: not valid JSON (...)")
    q = _cuda(2, 3, 197, 64)
    assert vk.explain_backend("attention", q, q, q) == (
        "torch",
        "no committed GPU measurement for sm_90 attention bf16 D=64 N<=256 B*H<=8: torch "
        "(the committed table was not read: measured_backends.json: not valid JSON (...))",
    )


def test_malformed_committed_table_warns_and_leaves_auto_on_torch(tmp_path):
    """`import vit_kernels` must not break for a bad committed table (CPU users never read it): a copy of the
    package with a malformed table imports, warns naming the file and the problem, and auto has no entries."""
    import shutil
    import subprocess
    import sys

    package = Path(dispatch.__file__).parent
    shutil.copytree(package, tmp_path / "vit_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    table = tmp_path / "vit_kernels" / "measured_backends.json"
    table.write_text('{"entries": [{"arch": "sm_9", "op": "attention", "dtype": "bf16", "dim": 64.9}]}')
    res = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import vit_kernels as vk; from vit_kernels import dispatch; print(dispatch.__file__, len(dispatch._TABLE))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(tmp_path / "vit_kernels" / "dispatch.py"), "0"], res.stdout
    assert f"{table}: entry 0 (" in res.stderr and "backend='auto' runs torch" in res.stderr, res.stderr
    assert "arch 'sm_9'" in res.stderr or "dim 64.9 is not an integer" in res.stderr, res.stderr


def test_bucket():
    assert [dispatch.bucket(n) for n in (1, 2, 3, 197, 256, 257, 577, 50432)] == [1, 2, 4, 256, 256, 512, 1024, 65536]


# ----------------------------------------------------------------------------------------------------
# host overhead: per-device caches of the capability and of find_spec
# ----------------------------------------------------------------------------------------------------
def test_compute_capability_is_looked_up_once_per_device(monkeypatch):
    calls = []

    def get_device_capability(device=None):
        calls.append(device)
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dispatch, "_CAPABILITY", {}, raising=False)
    for _ in range(50):
        for index in (0, 1):
            assert dispatch.device_unavailable_reason("triton", torch.device("cuda", index)) is None
    assert len(calls) == 2 and set(calls) == {0, 1}, calls  # once per device index, not once per call


def test_a_cuda_device_this_process_lacks_is_a_reason_not_a_crash(monkeypatch):
    """available_backends("cuda") on a machine without CUDA (or an index past the device count) lists what can run
    ("reference", "torch"), a kernel backend's reason says why not, and auto on fake CUDA tensors traced there is
    torch, where the capability lookup used to raise torch's AssertionError."""
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    monkeypatch.setattr(dispatch, "_CAPABILITY", {})
    assert vk.available_backends(missing) == ["reference", "torch"]
    for backend in ("triton", "cuda"):
        why = dispatch.device_unavailable_reason(backend, torch.device(missing))
        assert why is not None and ("not a device of this process" in why or "extension" in why), why
    if not torch.cuda.is_available():  # fake CUDA tensors are of this process's devices where it has one
        with FakeTensorMode():
            q = torch.empty(2, 3, 17, 64, device="cuda")
            backend, reason = vk.explain_backend("attention", q, q, q)
            assert backend == "torch" and "no CUDA device here" in reason, reason
            with pytest.raises(ValueError, match="backend='triton' cannot run these inputs: .*no CUDA device here"):
                vk.explain_backend("attention", q, q, q, backend="triton")


def test_capability_lookup_on_a_cold_cache_compiles_fullgraph(monkeypatch):
    """A process that compiles before any eager call looks the capability up under dynamo: it is a trace-time
    constant (assume_constant_result), not traced CUDA queries (on a GPU: device_count, get_device_capability)."""
    monkeypatch.setattr(dispatch, "_CAPABILITY", {})
    device = torch.device("cuda", 0)

    def f(x):
        return x + (0 if dispatch._capability(device) is None else 1)

    torch._dynamo.reset()
    expected = torch.zeros(2) + (0 if dispatch._capability(device) is None else 1)
    monkeypatch.setattr(dispatch, "_CAPABILITY", {})
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)), expected)


def test_find_spec_is_looked_up_once_per_module(monkeypatch):
    calls = []
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        calls.append(name)
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(dispatch, "_MODULE_FOUND", {}, raising=False)
    q, k, v = _attn_inputs(device="cpu")
    x, w, b = _qkv_inputs(device="cpu")
    for _ in range(50):
        dispatch.available_backends("cpu")
        for backend in ("auto", "torch", *vk.available_backends("cpu")):
            attention_op.check(q, k, v, None, backend)
            fused_qkv_op.check(x, w, b, 2, backend)
    assert len(calls) == len(set(calls)), calls


# ----------------------------------------------------------------------------------------------------
# benchmarks/auto_table.py: benchmark results -> proposed table entries
# ----------------------------------------------------------------------------------------------------
def _results(path, device, rows, dtype="bf16"):
    env = {"device": device, "device_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "AMD EPYC", "dtype": dtype}
    path.write_text(json.dumps({"env": env, "rows": [{"dtype": dtype, "commit": "abc", **r} for r in rows]}))
    return path


def _attn_rows(N, D, mode, times, errors=None):
    errors = errors or {}
    shape = {"bench": "attn_bench", "model": "m", "B": 8, "H": 12, "N": N, "D": D, "mode": mode, "layout": "contiguous"}
    return [{**shape, "provider": p, "ms": ms, "rel_err": errors.get(p, 1e-3)} for p, ms in times.items()]


@pytest.fixture
def auto_table(monkeypatch):
    """benchmarks/auto_table.py as a module. monkeypatch restores sys.path afterwards: left in place, the
    benchmarks folder would shadow tests/conftest.py for spawned subprocesses (benchmarks has a conftest.py)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import auto_table

    return auto_table


def test_auto_table_proposes_only_correct_and_faster_backends(auto_table, tmp_path, capsys):
    sdpa = {"sdpa_flash": 1.0, "sdpa_efficient": 1.2, "sdpa_math": 5.0}
    sdpa_bwd = {"sdpa_flash": 3.0, "sdpa_efficient": 3.5, "sdpa_math": 9.0}
    rows = [
        # D=64, N=197: triton beats the fastest SDPA in both modes; cuda is faster still but fails parity
        *_attn_rows(197, 64, "fwd", {**sdpa, "triton": 0.8, "cuda": 0.5}, {"cuda": 0.5}),
        *_attn_rows(197, 64, "fwd_bwd", {**sdpa_bwd, "triton": 2.9, "cuda": 1.0}, {"cuda": 0.5}),
        # D=64, N=257: triton wins forward but loses forward+backward: no entry
        *_attn_rows(257, 64, "fwd", {**sdpa, "triton": 0.9}),
        *_attn_rows(257, 64, "fwd_bwd", {**sdpa_bwd, "triton": 3.1}),
        # D=80: triton's output has a NaN (rel err nan); cuda passes and wins
        *_attn_rows(197, 80, "fwd", {**sdpa, "triton": 0.1, "cuda": 0.9}, {"triton": float("nan")}),
        # D=96: beats sdpa_efficient and sdpa_math but not sdpa_flash, the fastest: no entry
        *_attn_rows(197, 96, "fwd", {**sdpa, "triton": 1.1}),
    ]
    mlp = {"bench": "mlp_bench", "model": "ViT-B/16", "M": 50432, "C": 768, "hidden": 3072, "heads": 12, "mode": "fwd"}
    rows += [
        {**mlp, "op": "mlp", "provider": "eager", "ms": 2.0, "rel_err": 1e-3},
        {**mlp, "op": "mlp", "provider": "cuda", "ms": 1.5, "rel_err": 2e-3},
        {**mlp, "op": "qkv", "provider": "eager", "ms": 2.0, "rel_err": 1e-3},  # with copies: not the baseline
        {**mlp, "op": "qkv", "provider": "views", "ms": 0.5, "rel_err": 1e-3},
        {**mlp, "op": "qkv", "provider": "triton", "ms": 0.6, "rel_err": 1e-3},
    ]
    gpu = _results(tmp_path / "gpu.json", "cuda", rows)
    cpu = _results(tmp_path / "cpu.json", "cpu", _attn_rows(197, 64, "fwd", {**sdpa, "triton": 0.01}))
    out = tmp_path / "table.json"
    assert auto_table.main([str(gpu), str(cpu), "--out", str(out)]) == 0
    table = dispatch.load_table(out)
    assert {str(key): entry["backend"] for key, entry in table.items()} == {
        "sm_90 attention bf16 D=64 N<=256 B*H<=128": "triton",  # B = 8, H = 12
        "sm_90 attention bf16 D=80 N<=256 B*H<=128": "cuda",
        "sm_90 gelu_mlp bf16 C<=1024 B*N<=65536": "cuda",
    }
    evidence = table[dispatch.TableKey("sm_90", "attention", "bf16", 64, 256, 128)]["evidence"]
    assert [e.get("batch") for e in json.loads(out.read_text())["entries"]] == [128, 128, None]
    assert evidence.startswith("NVIDIA H100 80GB HBM3: 2 cases, 1.03-1.25x faster than torch, max rel err 1.0e-03")
    report = capsys.readouterr().out
    assert "cpu.json: skipped, measured on cpu" in report
    assert "sm_90 attention bf16 D=64 N<=512 B*H<=128: torch (no entry): triton: slower than torch at" in report
    assert "sm_90 attention bf16 D=96 N<=256 B*H<=128: torch (no entry)" in report
    assert "sm_90 fused_qkv bf16 C<=1024 B*N<=65536: torch (no entry): triton: slower than torch" in report


def test_auto_table_needs_an_arch_it_can_tell(auto_table, tmp_path):
    rows = _attn_rows(197, 64, "fwd", {"sdpa_flash": 1.0, "triton": 0.5})
    path = _results(tmp_path / "gpu.json", "cuda", rows)
    data = json.loads(path.read_text())
    data["env"]["device_name"] = "Some Future GPU"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="pass --arch"):
        auto_table.main([str(path), "--out", str(tmp_path / "t.json")])
    auto_table.main([str(path), "--out", str(tmp_path / "t.json"), "--arch", "sm_100"])
    assert [str(k) for k in dispatch.load_table(tmp_path / "t.json")] == ["sm_100 attention bf16 D=64 N<=256 B*H<=128"]


@pytest.mark.parametrize("committed", ['{"entries": [', "[]", '{"entries": []}'])
def test_auto_table_rewrites_a_broken_committed_table(auto_table, tmp_path, monkeypatch, committed):
    """auto_table is how a broken committed table gets fixed: it must not need to read it (only its "about")."""
    broken = tmp_path / "measured_backends.json"
    broken.write_text(committed)
    monkeypatch.setattr(dispatch, "MEASURED_TABLE", broken)
    path = _results(tmp_path / "gpu.json", "cuda", _attn_rows(197, 64, "fwd", {"sdpa_flash": 1.0, "triton": 0.5}))
    assert auto_table.main([str(path), "--out", str(tmp_path / "t.json")]) == 0
    assert [str(k) for k in dispatch.load_table(tmp_path / "t.json")] == ["sm_90 attention bf16 D=64 N<=256 B*H<=128"]
    assert "auto" in json.loads((tmp_path / "t.json").read_text())["about"]


def test_auto_table_takes_the_arch_from_the_capability_the_benchmarks_record(auto_table, tmp_path):
    """common.Env writes capability "sm_XY" into every result's env: it names the arch even where the GPU's name
    is unknown."""
    path = _results(tmp_path / "gpu.json", "cuda", _attn_rows(197, 64, "fwd", {"sdpa_flash": 1.0, "triton": 0.5}))
    data = json.loads(path.read_text())
    data["env"].update(device_name="Some Future GPU", capability="sm_100")
    path.write_text(json.dumps(data))
    auto_table.main([str(path), "--out", str(tmp_path / "t.json")])
    assert [str(k) for k in dispatch.load_table(tmp_path / "t.json")] == ["sm_100 attention bf16 D=64 N<=256 B*H<=128"]


# ----------------------------------------------------------------------------------------------------
# the whole-block fused ops (vit_kernels/ops/pre_ln_block.py) and the ViT block on auto: the same table
# ----------------------------------------------------------------------------------------------------
def _block_args(B=8, N=197, C=192, hidden=768, heads=3, dtype=torch.bfloat16):
    """Fake CUDA arguments of the three block ops (call inside fake_cuda)."""
    x, ln_w, ln_b = _cuda(B, N, C, dtype=dtype), _cuda(C, dtype=dtype), _cuda(C, dtype=dtype)
    qkv = (x, ln_w, ln_b, 1e-6, _cuda(3 * C, C, dtype=dtype), _cuda(3 * C, dtype=dtype), heads)
    proj = (x, _cuda(C, C, dtype=dtype), _cuda(C, dtype=dtype), x)
    w1, b1, w2, b2 = (
        _cuda(hidden, C, dtype=dtype),
        _cuda(hidden, dtype=dtype),
        _cuda(C, hidden, dtype=dtype),
        _cuda(C, dtype=dtype),
    )
    mlp = (x, ln_w, ln_b, 1e-6, w1, b1, w2, b2)
    return x, {"ln_fused_qkv": qkv, "proj_residual": proj, "ln_gelu_mlp": mlp}


def _block_table(*ops, dim=256, tokens=2048, dtype="bf16", arch="sm_90"):
    return _table(*[(arch, op, dtype, dim, tokens, "triton") for op in ops])


def test_auto_block_ops_follow_the_measured_table(fake_cuda, monkeypatch):
    from vit_kernels.ops import pre_ln_block as vkb

    x, args = _block_args()  # C = 192 -> C<=256, B * N = 1576 -> B*N<=2048
    for op, op_args in args.items():
        assert vk.explain_backend(op, *op_args) == (
            "torch",
            f"no committed GPU measurement for sm_90 {op} bf16 C<=256 B*N<=2048: torch",
        )
    assert not vkb.fuses_block("auto", x)
    assert vkb.fuses_block("triton", x) and not vkb.fuses_block("torch", x)

    _skip_unless_runs("triton", "cuda:0")  # the real availability check, on the faked sm_90
    monkeypatch.setattr(dispatch, "_TABLE", _block_table(*dispatch.BLOCK_OPS))
    for op, op_args in args.items():
        assert vk.explain_backend(op, *op_args) == (
            "triton",
            f"measured correct and fastest for sm_90 {op} bf16 C<=256 B*N<=2048: triton",
        )
        assert vk.explain_backend(op, *op_args, backend="torch").backend == "torch"  # explicit wins
    assert vkb.fuses_block("auto", x)  # (autocast, which turns fusion off, cannot be enabled for CUDA on CPU builds)
    # every other key misses: another token bucket, width bucket, dtype, arch
    for other in (_block_args(B=16)[0], _block_args(C=512, heads=4)[0], _block_args(dtype=torch.float16)[0]):
        assert not vkb.fuses_block("auto", other)
    assert vk.explain_backend("ln_fused_qkv", *_block_args(B=16)[1]["ln_fused_qkv"]).backend == "torch"
    fake_cuda[0] = (8, 6)
    assert not vkb.fuses_block("auto", x)
    fake_cuda[0] = (9, 0)
    # the block fuses only where all three ops were measured to win
    monkeypatch.setattr(dispatch, "_TABLE", _block_table("ln_fused_qkv", "ln_gelu_mlp"))
    assert not vkb.fuses_block("auto", x)
    assert vk.explain_backend("proj_residual", *args["proj_residual"]).backend == "torch"


def test_auto_block_op_measured_triton_that_cannot_run_these_inputs_is_torch(fake_cuda, monkeypatch):
    _skip_unless_runs("triton", "cuda:0")
    monkeypatch.setattr(dispatch, "_TABLE", _block_table("ln_gelu_mlp"))
    _x, args = _block_args(hidden=770)  # hidden not a multiple of 8
    backend, reason = vk.explain_backend("ln_gelu_mlp", *args["ln_gelu_mlp"])
    assert backend == "torch"
    assert "measured fastest for sm_90 ln_gelu_mlp bf16 C<=256 B*N<=2048 is triton, which cannot run here" in reason
    assert "hidden=770" in reason


def test_block_ops_in_the_table_are_checked():
    with pytest.raises(ValueError, match="backend 'reference' is not torch, triton or cuda"):
        _table(("sm_90", "ln_gelu_mlp", "bf16", 1024, 65536, "reference"))
    assert len(_table(("sm_90", "ln_gelu_mlp", "bf16", 1024, 65536, "cuda"))) == 1  # the block ops have cuda kernels
    assert len(_block_table(*dispatch.BLOCK_OPS)) == 3


def test_vit_block_on_auto_fuses_only_where_the_table_says(fake_cuda, monkeypatch):
    """vit.model.Block with backend="auto" on (fake) CUDA: the unfused ops without a measurement, the fused ops
    (each resolving to triton) where the table names triton for all three."""
    from torch import nn

    from vit.model import PRESETS, Block

    cfg = PRESETS["vit_tiny_patch16_224"]  # C = 192, hidden 768, 3 heads
    blk = Block(cfg, 0.0, "auto").eval()
    for mod in blk.modules():  # fake CUDA parameters (autograd on fake CUDA needs a CUDA build: no_grad)
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, nn.Parameter(torch.empty(p.shape, device="cuda"), requires_grad=False))
    calls = []
    for op in ("fused_qkv", "gelu_mlp", *dispatch.BLOCK_OPS):
        fn = getattr(vk, op)
        monkeypatch.setattr(
            vk, op, lambda *a, _op=op, _fn=fn, **k: (calls.append((_op, k["backend"])), _fn(*a, **k))[1]
        )
    x = _cuda(8, 197, 192, dtype=torch.float32)
    with torch.no_grad():
        assert blk(x).shape == x.shape
        assert calls == [("fused_qkv", "auto"), ("gelu_mlp", "auto")]
        _skip_unless_runs("triton", "cuda:0")
        monkeypatch.setattr(dispatch, "_TABLE", _block_table(*dispatch.BLOCK_OPS, dtype="fp32"))
        calls.clear()
        assert blk(x).shape == x.shape
        assert calls == [(op, "auto") for op in dispatch.BLOCK_OPS]
        assert blk.attn.qkv.weight.device.type == "cuda"


def test_auto_table_turns_block_bench_rows_into_the_three_block_ops(auto_table, tmp_path, capsys):
    def block_rows(B, mode, times, errors=None):
        shape = {"bench": "block_bench", "model": "ViT-B/16", "B": B, "N": 197, "C": 768, "hidden": 3072, "heads": 12}
        errors = errors or {}
        return [
            {**shape, "mode": mode, "provider": p, "ms": ms, "rel_err": errors.get(p, 1e-3)} for p, ms in times.items()
        ]

    rows = [
        # B=256 (B*N = 50432): fused beats eager in both modes; compile is faster still, but auto cannot pick it
        *block_rows(256, "fwd", {"eager": 2.0, "compile": 1.0, "unfused": 1.9, "fused": 1.6}),
        *block_rows(256, "fwd_bwd", {"eager": 6.0, "compile": 4.0, "unfused": 5.8, "fused": 5.0}),
        # B=64 (B*N = 12608): fused wins forward but fails parity forward+backward: no entry
        *block_rows(64, "fwd", {"eager": 0.5, "fused": 0.4}),
        *block_rows(64, "fwd_bwd", {"eager": 1.5, "fused": 1.2}, {"fused": 0.5}),
        # B=1: fused slower than eager: no entry
        *block_rows(1, "fwd", {"eager": 0.05, "fused": 0.06}),
    ]
    out = tmp_path / "table.json"
    assert auto_table.main([str(_results(tmp_path / "gpu.json", "cuda", rows)), "--out", str(out)]) == 0
    table = dispatch.load_table(out)
    assert {str(key): entry["backend"] for key, entry in table.items()} == {
        f"sm_90 {op} bf16 C<=1024 B*N<=65536": "triton" for op in dispatch.BLOCK_OPS
    }
    evidence = table[dispatch.TableKey("sm_90", "ln_gelu_mlp", "bf16", 1024, 65536)]["evidence"]
    assert evidence.startswith("NVIDIA H100 80GB HBM3: 2 cases, 1.20-1.25x faster than torch")
    report = capsys.readouterr().out
    assert "sm_90 block bf16 C<=1024 B*N<=65536: triton for ln_fused_qkv, proj_residual, ln_gelu_mlp" in report
    assert "sm_90 block bf16 C<=1024 B*N<=16384: torch (no entry): triton: failed parity at" in report
    assert "sm_90 block bf16 C<=1024 B*N<=256: torch (no entry): triton: slower than torch" in report
    assert "gpu.json: 4 rows of other benchmarks or providers ignored" in report  # compile and unfused
