"""The two GEMM-epilogue fusions of a ViT block, against what a user would write instead.

    python benchmarks/mlp_bench.py                        # ViT-B on GPU (M = 256 x 197), small on CPU
    python benchmarks/mlp_bench.py --op mlp --mode fwd --shapes "64,197,1024,4096,16"

gelu_mlp  y = fc2(GELU(fc1(x)))     x (B, N, C), fc1 (hidden, C), fc2 (C, hidden)
  eager       vit_kernels.torch_backend.gelu_mlp: F.linear -> F.gelu -> F.linear (cuBLAS on GPU)
  reference   vit_kernels.reference.gelu_mlp: matmuls and a written-out erf GELU
  compile     torch.compile of the eager chain
  triton/cuda vk.gelu_mlp(backend=...): bias + GELU fused into the first GEMM's epilogue
fused_qkv q, k, v = split(x @ W^T + b)  x (B, N, C), W (3C, C) -> three (B, H, N, C // H)
  eager       vit_kernels.reference.fused_qkv (F.linear + reshape/permute) + .contiguous() on q, k, v:
              the copy a head-major consumer pays for
  views       vit_kernels.torch_backend.fused_qkv: the same without the copies (strided views)
  compile     torch.compile of eager
  triton/cuda vk.fused_qkv(backend=...): the head split done by the GEMM epilogue

FLOPs 2 M N K per GEMM, backward 2x forward (common.linear_flops); bytes: common.mlp_bytes / qkv_bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--include-interpreter" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vit_kernels as vk  # noqa: E402
from vit_kernels import reference, torch_backend  # noqa: E402

OPS = ("mlp", "qkv")
PROVIDERS = {
    "mlp": ("eager", "reference", "compile", "triton", "cuda"),
    "qkv": ("eager", "views", "compile", "triton", "cuda"),
}
ALL_PROVIDERS = tuple(dict.fromkeys(p for ps in PROVIDERS.values() for p in ps))
MODES = ("fwd", "fwd_bwd")


class Shape(common.LayerShape):
    def __str__(self) -> str:  # the GEMMs see M = B * N rows, whatever B and N are
        return f"{self.model} M={self.M} C={self.C} hidden={self.hidden} heads={self.heads}"


def default_shapes(device: str) -> list[Shape]:
    if device == "cpu":
        return [Shape("ViT-S/16", 1, 197, 384, 1536, 6), Shape("ViT-B/16", 1, 197, 768, 3072, 12)]
    return [Shape("ViT-B/16", 256, 197, 768, 3072, 12)]


def parse_shapes(text: str) -> list[Shape]:
    return common.parse_layer_shapes(text, Shape)


def global_skip_reason(provider: str, device: str, args) -> str | None:
    if provider in ("triton", "cuda"):
        return common.kernel_skip_reason(provider, device, args.include_interpreter)
    return None


# ----------------------------------------------------------------------------------------------------
# the two ops: inputs, providers, reference, flops, bytes
# ----------------------------------------------------------------------------------------------------
def eager_qkv_contiguous(x, weight, bias, num_heads):
    return tuple(t.contiguous() for t in reference.fused_qkv(x, weight, bias, num_heads))


_compiled = {}


def _compile(key, fn, device):
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=device == "cpu")
    return _compiled[key]


def op_fn(op: str, provider: str, shape: Shape, device: str):
    """A function of the op's parameter tuple returning a tuple of outputs."""
    if op == "mlp":
        fns = {
            "eager": lambda x, w1, b1, w2, b2: torch_backend.gelu_mlp(x, w1, b1, w2, b2, "none"),
            "reference": lambda x, w1, b1, w2, b2: reference.gelu_mlp(x, w1, b1, w2, b2, "none"),
            "compile": lambda x, w1, b1, w2, b2: _compile("mlp", torch_backend.gelu_mlp, device)(
                x, w1, b1, w2, b2, "none"
            ),
        }
        if provider in fns:
            f = fns[provider]
        else:
            f = lambda x, w1, b1, w2, b2: vk.gelu_mlp(x, w1, b1, w2, b2, backend=provider)
        return lambda *a: (f(*a),)
    H = shape.heads
    fns = {
        "eager": lambda x, w, b: eager_qkv_contiguous(x, w, b, H),
        "views": lambda x, w, b: tuple(torch_backend.fused_qkv(x, w, b, H)),
        "compile": lambda x, w, b: _compile("qkv", eager_qkv_contiguous, device)(x, w, b, H),
    }
    return fns.get(provider, lambda x, w, b: tuple(vk.fused_qkv(x, w, b, H, backend=provider)))


def reference_fn(op: str, shape: Shape):
    if op == "mlp":
        return lambda x, w1, b1, w2, b2: (reference.gelu_mlp(x, w1, b1, w2, b2, "none"),)
    return lambda x, w, b: tuple(reference.fused_qkv(x, w, b, shape.heads))


def make_inputs(op: str, shape: Shape, dtype, device: str, mode: str, n_sets: int):
    """`n_sets` (params, douts) sets; weights scaled like a trained layer (std ~ 1/sqrt(fan_in))."""
    grad = mode == "fwd_bwd"
    B, N, C, Hd = shape.B, shape.N, shape.C, shape.hidden

    def rand(*size, std=1.0):
        return (torch.randn(*size, device=device, dtype=torch.float32) * std).to(dtype).requires_grad_(grad)

    sets = []
    for _ in range(n_sets):
        if op == "mlp":
            params = (
                rand(B, N, C),
                rand(Hd, C, std=C**-0.5),
                rand(Hd, std=0.1),
                rand(C, Hd, std=Hd**-0.5),
                rand(C, std=0.1),
            )
            douts = (torch.randn(B, N, C, device=device, dtype=dtype),) if grad else None
        else:
            params = (rand(B, N, C), rand(3 * C, C, std=C**-0.5), rand(3 * C, std=0.1))
            D = C // shape.heads
            douts = (
                tuple(torch.randn(B, shape.heads, N, D, device=device, dtype=dtype) for _ in range(3)) if grad else None
            )
        sets.append((params, douts))
    return sets


def set_bytes(op: str, shape: Shape, elem: int, mode: str) -> int:
    M, C, Hd = shape.M, shape.C, shape.hidden
    if op == "mlp":
        n = 2 * M * C + 2 * C * Hd + (M * C if mode == "fwd_bwd" else 0)
    else:
        n = M * C + 3 * C * C + (3 * M * C if mode == "fwd_bwd" else 0)
    return n * elem


def flops_bytes(op: str, shape: Shape, elem: int, mode: str) -> tuple[float, float]:
    if op == "mlp":
        return common.mlp_flops(shape.M, shape.C, shape.hidden, mode), common.mlp_bytes(
            shape.M, shape.C, shape.hidden, elem, mode
        )
    return common.linear_flops(shape.M, shape.C, 3 * shape.C, mode), common.qkv_bytes(shape.M, shape.C, elem, mode)


def step_fn(f, sets, mode: str):
    if mode == "fwd":

        def run(i):
            with torch.no_grad():
                return f(*sets[i][0])

    else:

        def run(i):
            params, douts = sets[i]
            return torch.autograd.grad(f(*params), params, douts)

    return run


def check(op, f, shape, params, douts, mode) -> float:
    """Largest relative error over outputs (and every input gradient for fwd_bwd) against the
    reference in float64 on CPU, float32 on GPU."""
    ref_dtype = torch.float64 if params[0].device.type == "cpu" else torch.float32
    ref_f = reference_fn(op, shape)
    ref_params = tuple(p.detach().to(ref_dtype).requires_grad_(mode == "fwd_bwd") for p in params)
    if mode == "fwd":
        with torch.no_grad():
            outs, refs = f(*params), ref_f(*ref_params)
        return max(common.rel_error(o, r) for o, r in zip(outs, refs, strict=True))
    outs, refs = f(*params), ref_f(*ref_params)
    grads = torch.autograd.grad(outs, params, douts)
    ref_grads = torch.autograd.grad(refs, ref_params, tuple(d.to(ref_dtype) for d in douts))
    return max(common.rel_error(a, b) for a, b in zip((*outs, *grads), (*refs, *ref_grads), strict=True))


def run_cell(report, op, provider, shape, mode, args, dtype, peaks) -> dict | None:
    elem = torch.finfo(dtype).bits // 8

    def prepare():
        f = op_fn(op, provider, shape, args.device)
        n_sets = common.n_input_sets(set_bytes(op, shape, elem, mode), args.device)
        sets = make_inputs(op, shape, dtype, args.device, mode, n_sets)
        err = common.first_call(lambda: check(op, f, shape, *sets[0], mode))
        return step_fn(f, sets, mode), n_sets, err

    cell = common.run_cell(report, provider, f"{op} {shape} {mode}", args, prepare)
    if cell is None:
        return None
    t = cell.timing
    flops, nbytes = flops_bytes(op, shape, elem, mode)
    return {
        "op": op,
        "model": shape.model,
        "M": shape.M,
        "C": shape.C,
        "hidden": shape.hidden if op == "mlp" else 3 * shape.C,
        "heads": shape.heads,
        "mode": mode,
        "provider": provider,
        "ms": t.median_ms,
        "ms_p20": t.p20_ms,
        "ms_p80": t.p80_ms,
        "reps": t.reps,
        "input_sets": cell.n_sets,
        "tflops": flops / (t.median_ms * 1e-3) / 1e12,
        "gbps": nbytes / (t.median_ms * 1e-3) / 1e9,
        "roofline_pct": 100 * common.roofline_fraction(flops, nbytes, t.median_ms, peaks, args.dtype),
        "peak_pct": 100 * flops / (t.median_ms * 1e-3) / 1e12 / peaks.tflops(args.dtype),
        "mem_mib": cell.mem_mib,
        "rel_err": cell.err,
        "flops": flops,
        "bytes": nbytes,
    }


COLUMNS = [
    ("op", "op"), ("model", "model"), ("M", "M"), ("C", "C"), ("out/hidden", "hidden"), ("mode", "mode"),
    ("provider", "provider"), ("ms (median)", "ms"), ("TFLOP/s", "tflops"), ("% matmul peak", "peak_pct"),
    ("GB/s", "gbps"), ("% roofline", "roofline_pct"), ("peak MiB above inputs", "mem_mib"),
    ("speedup vs eager", "speedup"), ("rel err", "rel_err"),
]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--op", choices=[*OPS, "both"], default="both")
    p.add_argument(
        "--shapes", help='"B,N,C,hidden,heads;..." (default: ViT-B on GPU, ViT-S and ViT-B, 1 image, on CPU)'
    )
    p.add_argument("--mode", choices=["fwd", "fwd_bwd", "both"], default="both")
    p.add_argument("--include-interpreter", action="store_true", help="on CPU, time Triton under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    common.resolve_common_args(args)
    dtype = common.DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(args.device)
    modes = MODES if args.mode == "both" else (args.mode,)
    ops = OPS if args.op == "both" else (args.op,)

    env = common.Env.collect(args.device, args.dtype)
    peaks = common.measure_peaks(args.device, [args.dtype], args.peaks)
    report = common.Report("mlp_bench", env, peaks, args)
    runnable = report.runnable(ALL_PROVIDERS, args.providers, lambda pr: global_skip_reason(pr, args.device, args))

    report.print_header()
    cells = [(op, s, m, pr) for op in ops for s in shapes for m in modes for pr in PROVIDERS[op] if pr in runnable]
    report.run_cells(
        cells,
        lambda op, shape, mode, provider: f"{op} {provider} {shape.model} {mode}",
        lambda op, shape, mode, provider: run_cell(report, op, provider, shape, mode, args, dtype, peaks),
    )
    report.set_speedups(("op", "model", "M", "C", "hidden", "heads", "mode"), baseline="eager")
    report.finish(common.markdown_table(COLUMNS, report.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
