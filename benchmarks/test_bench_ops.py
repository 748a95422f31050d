"""pytest-benchmark: every op x available backend x mode (fwd, fwd+bwd), each checked against float64 first.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=run.json
    pytest-benchmark compare old.json run.json --group-by=group --columns=min,median,max   # what changed

Shapes suit the device: on a GPU ViT-B/16 at 224 in bf16 (256 images; attention on views of a packed qkv
tensor); on CPU a few tokens in fp32, with Triton under its interpreter (a test of the suite, not a speed).
Each benchmark's `extra_info` carries op, backend, mode, dtype, shape, the parity error and the FLOPs, so a
row of the JSON is self-describing. The numbers are wall-clock rounds with a CUDA synchronize at the end of
each call; the event-timed tables (attn_bench.py, mlp_bench.py) remain the reference for absolute speed.
"""

import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the bench extra)")

from tests_conftest import TOLERANCES, rel_error  # noqa: E402  (benchmarks/conftest.py loads it)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vit_kernels as vk  # noqa: E402
from vit_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = vk.available_backends(DEVICE)  # reference, torch, and triton / cuda where they run
if DEVICE == "cuda":
    DTYPE, ROUNDS = torch.bfloat16, 20
    B, H, N, D, HIDDEN = 256, 12, 197, 64, 3072  # ViT-B/16 at 224
else:
    DTYPE, ROUNDS = torch.float32, 3
    B, H, N, D, HIDDEN = 1, 2, 17, 32, 256
C = H * D
SHAPE = f"B={B} H={H} N={N} D={D} C={C} hidden={HIDDEN}"


def _leaf(*size, std=1.0):
    return (torch.randn(*size, device=DEVICE) * std).to(DTYPE).requires_grad_(True)


def attention_problem():
    qkv = _leaf(B, N, 3, H, D)  # a ViT block's packed projection: q, k, v are strided views of it

    def fn(backend, cast=None):
        q, k, v = (t if cast is None else t.to(cast) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        return (reference.attention(q, k, v),) if backend == "ref64" else (vk.attention(q, k, v, backend=backend),)

    flops = functools.partial(common.attention_flops, B, H, N, D)
    return (qkv,), fn, (torch.randn(B, H, N, D, device=DEVICE).to(DTYPE),), flops


def qkv_problem():
    x, w, b = _leaf(B, N, C), _leaf(3 * C, C, std=C**-0.5), _leaf(3 * C, std=0.1)

    def fn(backend, cast=None):
        args = (x, w, b) if cast is None else (x.to(cast), w.to(cast), b.to(cast))
        if backend == "ref64":
            return tuple(reference.fused_qkv(*args, H))
        return tuple(vk.fused_qkv(*args, H, backend=backend))

    douts = tuple(torch.randn(B, H, N, D, device=DEVICE).to(DTYPE) for _ in range(3))
    return (x, w, b), fn, douts, functools.partial(common.linear_flops, B * N, C, 3 * C)


def mlp_problem():
    params = (_leaf(B, N, C), _leaf(HIDDEN, C, std=C**-0.5), _leaf(HIDDEN, std=0.1),
              _leaf(C, HIDDEN, std=HIDDEN**-0.5), _leaf(C, std=0.1))  # fmt: skip

    def fn(backend, cast=None):
        args = params if cast is None else tuple(t.to(cast) for t in params)
        if backend == "ref64":
            return (reference.gelu_mlp(*args),)
        return (vk.gelu_mlp(*args, backend=backend),)

    douts = (torch.randn(B, N, C, device=DEVICE).to(DTYPE),)
    return params, fn, douts, functools.partial(common.mlp_flops, B * N, C, HIDDEN)


# op -> () -> (leaves, fn(backend, cast), douts, flops(mode)): flops by common's formulas, "fwd" or "fwd_bwd"
PROBLEMS = {"attention": attention_problem, "fused_qkv": qkv_problem, "gelu_mlp": mlp_problem}


def _run(fn, backend, leaves, douts, mode, cast=None):
    if mode == "fwd":
        with torch.no_grad():
            return list(fn(backend, cast))
    outs = fn(backend, cast)
    grads = torch.autograd.grad(outs, leaves, [d if cast is None else d.to(cast) for d in douts])
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(PROBLEMS))
def test_op(benchmark, op, backend, mode):
    leaves, fn, douts, flops = PROBLEMS[op]()
    # parity before timing: the output (and every gradient) against float64, with the tests' tolerances
    try:
        got = _run(fn, backend, leaves, douts, mode)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        pytest.skip(f"{backend} cannot run {op} here: {common.short_reason(exc)}")
    want = _run(fn, "ref64", leaves, douts, mode, cast=torch.float64)
    err = max(rel_error(g, w) for g, w in zip(got, want, strict=True))
    assert err <= TOLERANCES[DTYPE], f"{op} {backend} {mode}: relative error {err:.3g} > {TOLERANCES[DTYPE]}"
    del got, want

    def step():
        _run(fn, backend, leaves, douts, mode)
        common._sync(DEVICE)

    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(
        op=op, backend=backend, mode=mode, dtype=str(DTYPE).removeprefix("torch."), device=DEVICE, shape=SHAPE,
        rel_err=err, flops=flops(mode),
    )  # fmt: skip
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
