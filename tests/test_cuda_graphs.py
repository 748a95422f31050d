"""The kernel backends' ops inside a CUDA graph: captured once, replayed on new inputs, every output and gradient as
the same call gives eagerly on those inputs. Whole-step capture (benchmarks/vit_bench.py's `+graphs` providers) and
torch.compile's mode="reduce-overhead" rely on it: no launch may synchronise, allocate outside the graph's pool,
run on another stream, or bake a host-side value of the captured inputs into the graph. GPU only (skips on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, rel_error, skip_unless_runs

import vit_kernels as vk

B, N, C, H = 2, 197, 128, 2  # N = 197: ViT-B/16's ragged token count


def _inputs(op: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], object]:
    """(leaf tensors, fn(backend, *leaves) -> tuple of outputs) of one op at a small ViT shape."""

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dtype)

    ln = [p(C, scale=0.1) + 1, p(C, scale=0.1)]
    w_qkv, b_qkv, w_proj, b_proj = p(3 * C, C, scale=C**-0.5), p(3 * C), p(C, C, scale=C**-0.5), p(C)
    w1, b1, w2, b2 = p(4 * C, C, scale=C**-0.5), p(4 * C), p(C, 4 * C, scale=(4 * C) ** -0.5), p(C)
    x = p(B, N, C)
    ops = {
        "attention": ([p(B, H, N, C // H) for _ in range(3)], lambda be, q, k, v: (vk.attention(q, k, v, backend=be),)),
        "fused_qkv": ([x, w_qkv, b_qkv], lambda be, *t: vk.fused_qkv(*t, H, backend=be)),
        "gelu_mlp": ([x, w1, b1, w2, b2], lambda be, *t: (vk.gelu_mlp(*t, backend=be),)),
        "ln_fused_qkv": ([x, *ln, w_qkv, b_qkv],
                         lambda be, x, lw, lb, w, b: vk.ln_fused_qkv(x, lw, lb, 1e-6, w, b, H, backend=be)),
        "proj_residual": ([x, w_proj, b_proj, p(B, N, C)], lambda be, *t: (vk.proj_residual(*t, backend=be),)),
        "ln_gelu_mlp": ([x, *ln, w1, b1, w2, b2],
                        lambda be, x, lw, lb, *t: (vk.ln_gelu_mlp(x, lw, lb, 1e-6, *t, backend=be),)),
    }  # fmt: skip
    leaves, fn = ops[op]
    return [t.clone().requires_grad_(True) for t in leaves], fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", ["attention", "fused_qkv", "gelu_mlp", "ln_fused_qkv", "proj_residual", "ln_gelu_mlp"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_op_replays_in_a_cuda_graph_as_it_runs_eagerly(backend, op, dtype):
    skip_unless_runs(backend, "cuda")
    leaves, fn = _inputs(op, dtype)
    outs = fn(backend, *leaves)
    grad_outs = [torch.randn_like(o) for o in outs]

    def step():
        outs = fn(backend, *leaves)
        return [*outs, *torch.autograd.grad(outs, leaves, grad_outs)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS picks) off the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in captured:  # poison: a result the replay does not write stays NaN
        t.detach().fill_(float("nan"))

    with torch.no_grad():  # new inputs, written into the captured ones
        for t in (*leaves, *grad_outs):
            t.copy_(torch.randn_like(t) * t.abs().mean().clamp(min=0.1))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    names = [f"output {i}" for i in range(len(outs))] + [f"grad of input {i}" for i in range(len(leaves))]
    for name, got, want in zip(names, captured, eager, strict=True):
        assert got.shape == want.shape, name
        assert not got.isnan().any(), f"{name}: the replay left NaN (not written)"
        err = rel_error(got, want)
        assert err <= TOLERANCES[dtype] / 10, f"{name}: replay vs eager rel err {err:.2e}"
