"""torch.compile beyond aot_eager: Inductor (the default backend), fullgraph, forward and backward, around the
custom ops of the kernel backends; and fullgraph compile under torch.autocast.

Inductor treats each `vit_kernels::*` custom op as an opaque extern call and generates code for what lies
between them. On CPU the kernel backend is Triton under the interpreter (CPU tensors), so Inductor emits C++
for the surrounding graph; on a GPU the same tests run on CUDA tensors for every kernel backend available.
Each test runs this machine's device and skips a backend that cannot run here, with its reason.
"""

import pytest
import torch
from conftest import DEVICE, rel_error, skip_unless_runs

import vit
import vit_kernels as vk

KERNEL_BACKENDS = ("triton", "cuda")


def _block(x, w, b, w1, b1, w2, b2, backend):
    q, k, v = vk.fused_qkv(x, w, b, 2, backend=backend)
    o = vk.attention(q, k, v, backend=backend).transpose(1, 2).reshape(x.shape)
    return vk.gelu_mlp(o, w1, b1, w2, b2, backend=backend)


def _params(device, C=64, hidden=128):
    shapes = ((1, 5, C), (3 * C, C), (3 * C,), (hidden, C), (hidden,), (C, hidden), (C,))
    return [(torch.randn(*s, device=device) * s[-1] ** -0.5).requires_grad_(True) for s in shapes]


def _outputs_and_grads(fn, params):
    for p in params:
        p.grad = None
    out = fn(*params)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return [out.detach(), *(p.grad.clone() for p in params)]


def _assert_close(got, expected, tol):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == e.dtype, i
        assert rel_error(g, e) < tol, (i, rel_error(g, e))


@pytest.fixture(autouse=True)
def _exact_fp32(highest_precision):
    # Eager and compiled must run the same kernels; exact fp32 keeps tf32 rounding out of the comparison.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inductor_fullgraph_block(backend):
    """fused_qkv -> attention -> gelu_mlp under Inductor, forward and backward. Between the ops there are only
    views (attention's output is laid out (B, N, H, D)), so Inductor lowers the custom ops as extern calls and
    generates no kernel of its own: cheap enough for every run. The ViT below adds Inductor's own kernels."""
    skip_unless_runs(backend)
    params = _params(DEVICE)
    eager = _outputs_and_grads(lambda *p: _block(*p, backend=backend), params)
    compiled = torch.compile(lambda *p: _block(*p, backend=backend), fullgraph=True)
    _assert_close(_outputs_and_grads(compiled, params), eager, 1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inductor_fullgraph_gelu_mlp_under_no_grad(backend, monkeypatch):
    """Inference: the op is traced with needs_grad False, its fake gives an empty hidden, and the compiled call asks
    the kernels for no pre-activation (save_hidden=False), with the eager result."""
    skip_unless_runs(backend)
    from vit_kernels import kernel_op

    kernels = kernel_op.kernels(backend, "linear")
    saves, original = [], kernels.mlp_fwd

    def spy(*args, save_hidden=True, **kwargs):
        saves.append(save_hidden)
        return original(*args, save_hidden=save_hidden, **kwargs)

    monkeypatch.setattr(kernels, "mlp_fwd", spy)
    x, _w, _b, w1, b1, w2, b2 = _params(DEVICE)

    def mlp(x):
        return vk.gelu_mlp(x, w1, b1, w2, b2, backend=backend)

    with torch.no_grad():
        eager = mlp(x)
        compiled = torch.compile(mlp, fullgraph=True)(x)
    assert saves == [False, False]
    assert not compiled.requires_grad
    _assert_close([compiled], [eager], 1e-5)


# A ViT with head dim 32 and N = 5 tokens. Inductor's first C++ build of its graph takes about a minute on a
# 2-core CPU (seconds once cached), hence slow: deselected under the interpreter unless --slow.
TINY_KERNEL = dict(img_size=16, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=1, num_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inductor_fullgraph_vit(backend):
    skip_unless_runs(backend)
    torch.manual_seed(0)
    model = vit.VisionTransformer(backend=backend, **TINY_KERNEL).to(DEVICE)
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    params = list(model.parameters())
    eager = _outputs_and_grads(lambda *_: model(images), params)
    compiled_model = torch.compile(model, fullgraph=True)
    _assert_close(_outputs_and_grads(lambda *_: compiled_model(images), params), eager, 1e-5)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_fullgraph_under_autocast(backend):
    """The autocast cast happens in the public functions, which Dynamo traces: no graph break, the compiled
    graph runs in the autocast dtype and gives fp32 gradients to fp32 parameters, like eager."""
    skip_unless_runs(backend)
    params = _params(DEVICE)

    def run(*p):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return _block(*p, backend=backend)

    eager = _outputs_and_grads(run, params)
    assert eager[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in eager[1:])
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    _assert_close(_outputs_and_grads(compiled, params), eager, 1e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tracing_sees_one_custom_op_per_call(backend):
    """Eager calls skip the custom-op dispatcher (kernel_op._eager); anything that traces must still see the ops:
    make_fx (a dispatch mode) records vit_kernels::attention_fwd, not the kernel's internals."""
    skip_unless_runs(backend)
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = (torch.randn(1, 2, 5, 32, device=DEVICE) for _ in range(3))
    graph = make_fx(lambda q, k, v: vk.attention(q, k, v, backend=backend))(q, k, v)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert "vit_kernels.attention_fwd.default" in targets, targets


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_fullgraph_with_dynamic_shapes(backend):
    """dynamic=True makes the default scale (D ** -0.5) and LayerNorm's eps symbolic: math.isfinite on them broke
    the graph (an error with fullgraph=True, on every backend, where SDPA compiles); a second batch size reuses the
    graph, outputs and gradients as eager."""
    skip_unless_runs(backend)
    torch.manual_seed(0)
    model = vit.VisionTransformer(backend=backend, **TINY_KERNEL).to(DEVICE)
    params = list(model.parameters())
    torch._dynamo.reset()
    compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (2, 3):
        images = torch.randn(batch, 3, 16, 16, device=DEVICE)
        eager = _outputs_and_grads(lambda *_, images=images: model(images), params)
        compiled = _outputs_and_grads(lambda *_, images=images: compiled_model(images), params)
        _assert_close(compiled, eager, 1e-5)
    attention = torch.compile(lambda q: vk.attention(q, q, q, backend=backend), fullgraph=True, dynamic=True)
    for n in (5, 9):  # the default scale of a symbolic head dim
        q = torch.randn(2, 2, n, 32, device=DEVICE)
        assert rel_error(attention(q), vk.attention(q, q, q, backend=backend)) < 1e-5


class _Mlp(torch.nn.Module):
    def __init__(self, op: str, backend: str, C: int = 64):
        super().__init__()
        self.op, self.backend = op, backend
        self.norm = torch.nn.LayerNorm(C) if op == "ln_gelu_mlp" else None  # every parameter gets a gradient
        self.fc1, self.fc2 = torch.nn.Linear(C, 2 * C), torch.nn.Linear(2 * C, C)

    def forward(self, x):
        n, f1, f2 = self.norm, self.fc1, self.fc2
        if self.op == "gelu_mlp":
            return vk.gelu_mlp(x, f1.weight, f1.bias, f2.weight, f2.bias, backend=self.backend)
        return vk.ln_gelu_mlp(x, n.weight, n.bias, n.eps, f1.weight, f1.bias, f2.weight, f2.bias, backend=self.backend)


@pytest.mark.parametrize("op", ["gelu_mlp", "ln_gelu_mlp"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_export_under_no_grad_then_trained_says_why(backend, op):
    """The MLP ops keep the pre-activation only when gradients will be asked for, decided when traced: a module
    exported under no_grad and then trained failed in backward on the raw op's shape check ("hidden must have
    shape ..."); now it says the trace had gradients off. Exported with gradients on, it trains as eager."""
    skip_unless_runs(backend)
    torch.manual_seed(0)
    model, x = _Mlp(op, backend).to(DEVICE), torch.randn(2, 5, 64, device=DEVICE)
    with torch.no_grad():
        inference_only = torch.export.export(model, (x,)).module()
    with pytest.raises(RuntimeError, match=f"^{op}: backward needs .* traced with gradients disabled"):
        inference_only(x).sum().backward()
    trainable = torch.export.export(model, (x,)).module()
    eager = _outputs_and_grads(lambda *_: model(x), list(model.parameters()))
    exported = _outputs_and_grads(lambda *_: trainable(x), list(trainable.parameters()))
    _assert_close(exported, eager, 1e-5)
