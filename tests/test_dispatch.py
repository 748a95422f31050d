"""Dispatch: backend choice as documented, clear errors on bad input, and no graph breaks under torch.compile."""

import pytest
import torch

import vit_kernels as vk
from vit_kernels import dispatch


def _attn_inputs(B=1, H=2, N=5, D=32, dtype=torch.float32):
    return [torch.randn(B, H, N, D, dtype=dtype) for _ in range(3)]


def _qkv_inputs(B=1, N=5, C=64, dtype=torch.float32, bias=True):
    return (
        torch.randn(B, N, C, dtype=dtype),
        torch.randn(3 * C, C, dtype=dtype),
        torch.randn(3 * C, dtype=dtype) if bias else None,
    )


def _mlp_inputs(M=5, C=32, Hd=64, dtype=torch.float32):
    return (
        torch.randn(M, C, dtype=dtype),
        torch.randn(Hd, C, dtype=dtype),
        torch.randn(Hd, dtype=dtype),
        torch.randn(C, Hd, dtype=dtype),
        torch.randn(C, dtype=dtype),
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
    q, k, v = _attn_inputs()
    assert dispatch.check_attention(q, k, v, None, "auto")[0] == "torch"
    assert dispatch.check_fused_qkv(*_qkv_inputs(), 2, "auto") == "torch"
    assert dispatch.check_gelu_mlp(*_mlp_inputs(), "none", "auto") == "torch"


def test_explicit_backend_is_honoured_or_raises():
    q, k, v = _attn_inputs()
    for backend in ("torch", "reference"):
        assert dispatch.check_attention(q, k, v, None, backend)[0] == backend
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA"):
        vk.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.attention(q, k, v, backend="flash")


def test_unsupported_head_dim_names_backend_and_dim():
    q, k, v = _attn_inputs(D=40)
    if "triton" in vk.available_backends("cpu"):
        with pytest.raises(ValueError, match=r"head dim D=40 is not supported"):
            vk.attention(q, k, v, backend="triton")
    assert dispatch.check_attention(q, k, v, None, "auto")[0] == "torch"  # auto routes around it


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _attn_inputs(D=64)
    assert dispatch.check_attention(q, k, v, None, "torch")[1] == pytest.approx(64**-0.5)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _attn_inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        vk.attention(q, k, v, backend="triton")


# ----------------------------------------------------------------------------------------------------
# bad input: every case raises TypeError/ValueError naming the argument
# ----------------------------------------------------------------------------------------------------
def _bad_attention_cases():
    q, k, v = _attn_inputs()
    return [
        ((q.numpy(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        ((q[0], k[0], v[0]), {}, ValueError, "q must be 4-D"),
        ((q, k.half(), v), {}, TypeError, "k has dtype"),
        ((q.double(), k.double(), v.double()), {}, TypeError, "q must be float32, float16 or bfloat16"),
        ((q.int(), k, v), {}, TypeError, "q must be float32"),
        ((q, k[:, :, :3], v), {}, ValueError, "k must have shape"),
        ((q, k, v[..., :16]), {}, ValueError, "v must have shape"),
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0]), {}, ValueError, "q must be non-empty"),
        ((q, k, v), {"scale": float("nan")}, TypeError, "scale must be a finite float"),
        ((q, k, v), {"scale": "0.1"}, TypeError, "scale must be a finite float"),
        ((q, k, v), {"backend": "cuda"}, ValueError, "cuda"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_attention_cases())))
def test_bad_attention_input_raises_clear_error(case):
    args, kwargs, exc, match = _bad_attention_cases()[case]
    with pytest.raises(exc, match=match):
        vk.attention(*args, **kwargs)


def _bad_qkv_cases():
    x, w, b = _qkv_inputs()
    return [
        ((x[0], w, b, 2), TypeError if False else ValueError, "x must be 3-D"),
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


def test_fused_qkv_channel_alignment_for_kernel_backends():
    x, w, b = _qkv_inputs(C=36)
    assert len(vk.fused_qkv(x, w, b, 3, backend="torch")) == 3  # eager backends take any C
    if "triton" in vk.available_backends("cpu"):
        with pytest.raises(ValueError, match="multiples of 8, got C=36"):
            vk.fused_qkv(x, w, b, 3, backend="triton")


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
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        vk.attention(q, k, v)


# ----------------------------------------------------------------------------------------------------
# torch.compile: each op is one node, no graph break, forward and backward
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", vk.available_backends("cpu"))
def test_torch_compile_has_no_graph_breaks(backend):
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
    from vit_kernels import library

    monkeypatch.setitem(library._KERNEL_MODULES, ("torch", "attention"), "vit_kernels.no_such_module")
    reason = dispatch._missing_kernels("torch", "attention")
    assert reason == "this build of vit_kernels has no torch attention kernels (vit_kernels.no_such_module is missing)"
    assert dispatch._missing_kernels("torch", "linear") is None
