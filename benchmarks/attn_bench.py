"""How fast is each attention implementation on this machine, side by side.

    python benchmarks/attn_bench.py                       # ViT shapes, fwd and fwd+bwd, every provider here
    python benchmarks/attn_bench.py --mode fwd --dtype fp16 --shapes "8,12,197,64;4,16,257,80" --plot

Providers (each checked against `vit_kernels.reference.attention` before it is timed):
  eager           vit_kernels.reference.attention: the naive path, forms the N x N matrix (the baseline)
  sdpa_flash      F.scaled_dot_product_attention restricted to one backend with
  sdpa_efficient    torch.nn.attention.sdpa_kernel; a backend that cannot run the inputs here is
  sdpa_cudnn        skipped with its reason
  sdpa_math
  triton          vk.attention(backend="triton")  (on CPU only with --include-interpreter: far too slow)
  cuda            vk.attention(backend="cuda")    (the vit_kernels._C extension)
  compile         torch.compile(vit_kernels.reference.attention)

FLOPs: forward 4 B H N^2 D, backward 2.5x forward (see common.attention_flops); bytes: the minimum of a
fused kernel (common.attention_bytes). "% roofline" is the time floor from the measured copy bandwidth
and matmul peak over the measured time. Results: Markdown on stdout, CSV and JSON in benchmarks/out/ (untracked;
--out-dir benchmarks/results to commit them).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# The Triton interpreter must be switched on before any Triton kernel is defined (i.e. before the
# kernel modules are imported), so this flag is read ahead of the imports.
if "--include-interpreter" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vit_kernels as vk  # noqa: E402
from vit_kernels import reference  # noqa: E402

PROVIDERS = ("eager", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "triton", "cuda", "compile")
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class Shape:
    model: str
    B: int
    H: int
    N: int
    D: int

    def __str__(self) -> str:
        return f"{self.model} B={self.B} H={self.H} N={self.N} D={self.D}"


# (name, heads, head dim, patch): timm's ViT-S/B/L/16, the /14 models of CLIP and DINOv2 (B/14, L/14) and
# ViT-H/14 (D=80).
MODELS = (
    ("ViT-S/16", 6, 64, 16),
    ("ViT-B/16", 12, 64, 16),
    ("ViT-L/16", 16, 64, 16),
    ("ViT-B/14", 12, 64, 14),
    ("ViT-L/14", 16, 64, 14),
    ("ViT-H/14", 16, 80, 14),
)
# The long-sequence resolution: 384 px for /16 (N=577); /14 models go to 336 px (CLIP's ViT-L/14-336, N=577),
# since 384 is not a multiple of 14.
RESOLUTIONS = {16: (224, 384), 14: (224, 336)}
# On GPU the batch fills the device the way a ViT-B training batch of 256 images at 224 does: ~50k tokens.
GPU_TOKENS = 256 * 197


def default_shapes(device: str) -> list[Shape]:
    if device == "cpu":
        # Seconds, not minutes: one image each, covering N = 197, 257, 577 and D = 64, 80.
        return [Shape("ViT-S/16@224", 1, 6, 197, 64), Shape("ViT-B/16@224", 1, 12, 197, 64),
                Shape("ViT-H/14@224", 1, 16, 257, 80), Shape("ViT-B/16@384", 1, 12, 577, 64)]  # fmt: skip
    shapes: dict[tuple[int, int, int, int], Shape] = {}
    for name, H, D, patch in MODELS:
        for res in RESOLUTIONS[patch]:
            N = (res // patch) ** 2 + 1
            B = max(1, round(GPU_TOKENS / N))
            # B/14 and L/14 at 336 px are B/16 and L/16 at 384 to the kernel: measured once, under the first name.
            shapes.setdefault((B, H, N, D), Shape(f"{name}@{res}", B, H, N, D))
    return list(shapes.values())


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for part in text.split(";"):
        if part.strip():
            B, H, N, D = (int(x) for x in part.split(","))
            shapes.append(Shape("custom", B, H, N, D))
    return shapes


# ----------------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------------
def global_skip_reason(provider: str, device: str, args) -> str | None:
    """Why `provider` cannot run at all on this device, or None."""
    if provider in ("triton", "cuda"):
        return common.kernel_skip_reason(provider, device, args.include_interpreter)
    if provider in SDPA_BACKENDS and device == "cpu" and provider in ("sdpa_efficient", "sdpa_cudnn"):
        return f"SDPBackend.{SDPA_BACKENDS[provider]} has no CPU kernel in PyTorch (CUDA only)"
    return None


_compiled = {}


def attention_fn(provider: str, device: str):
    """q, k, v -> out for one provider."""
    if provider == "eager":
        return reference.attention
    if provider in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[provider])

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return sdpa
    if provider in ("triton", "cuda"):
        return lambda q, k, v: vk.attention(q, k, v, backend=provider)
    if provider == "compile":
        if "compile" not in _compiled:
            # Static shapes on GPU (the fastest code per shape); on CPU one dynamic-shape graph, so the
            # benchmark pays for compilation once instead of once per shape.
            _compiled["compile"] = torch.compile(reference.attention, dynamic=device == "cpu")
        return _compiled["compile"]
    raise ValueError(provider)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, mode: str, packed: bool, n_sets: int):
    """`n_sets` independent (q, k, v, dout) sets; `packed`: q, k, v are views of one (B, N, 3, H, D) tensor."""
    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    grad = mode == "fwd_bwd"
    sets = []
    for _ in range(n_sets):
        if packed:
            qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype).requires_grad_(grad)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3))
        dout = torch.randn(B, H, N, D, device=device, dtype=dtype) if grad else None
        sets.append((q, k, v, dout))
    return sets


def step_fn(attn, sets, mode: str):
    if mode == "fwd":

        def run(i):
            q, k, v, _ = sets[i]
            with torch.no_grad():
                return attn(q, k, v)

    else:

        def run(i):
            q, k, v, dout = sets[i]
            return torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    return run


def check(attn, q, k, v, dout, mode: str) -> float:
    """Largest relative error, over out (and dq, dk, dv for fwd_bwd), against the reference in float64
    (float32 on GPU) on the first batch element."""
    ref_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    if mode == "fwd":
        with torch.no_grad():
            out = attn(q, k, v)
        with torch.no_grad():
            ref = reference.attention(*(t[:1].to(ref_dtype) for t in (q, k, v)))
        return common.rel_error(out[:1], ref)
    out = attn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t[:1].detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout[:1].to(ref_dtype))
    errs = [common.rel_error(out[:1], ref)] + [
        common.rel_error(g[:1], r) for g, r in zip(grads, ref_grads, strict=True)
    ]
    return max(errs)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def run_cell(report, provider, shape, mode, args, dtype, peaks) -> dict | None:
    elem = torch.finfo(dtype).bits // 8

    def prepare():
        attn = attention_fn(provider, args.device)
        set_bytes = (3 if mode == "fwd" else 7) * shape.B * shape.H * shape.N * shape.D * elem
        n_sets = common.n_input_sets(set_bytes, args.device)
        sets = make_inputs(shape, dtype, args.device, mode, args.packed, n_sets)
        err = common.first_call(lambda: check(attn, *sets[0], mode))
        return step_fn(attn, sets, mode), n_sets, err

    cell = common.run_cell(report, provider, f"{shape} {mode}", args, prepare)
    if cell is None:
        return None
    t = cell.timing
    flops = common.attention_flops(shape.B, shape.H, shape.N, shape.D, mode)
    nbytes = common.attention_bytes(shape.B, shape.H, shape.N, shape.D, elem, mode)
    return {
        "model": shape.model,
        "B": shape.B,
        "H": shape.H,
        "N": shape.N,
        "D": shape.D,
        "mode": mode,
        "layout": "packed" if args.packed else "contiguous",
        "provider": provider,
        "ms": t.median_ms,
        "ms_p20": t.p20_ms,
        "ms_p80": t.p80_ms,
        "reps": t.reps,
        "input_sets": cell.n_sets,
        "tflops": flops / (t.median_ms * 1e-3) / 1e12,
        "gbps": nbytes / (t.median_ms * 1e-3) / 1e9,
        "roofline_pct": 100 * common.roofline_fraction(flops, nbytes, t.median_ms, peaks, args.dtype),
        "mem_mib": cell.mem_mib,
        "rel_err": cell.err,
        "flops": flops,
        "bytes": nbytes,
    }


def plot(rows, peaks, env, args) -> list[Path]:
    plt, why = common.try_plot()
    if plt is None:
        print(f"--plot: {why}", file=sys.stderr)
        return []
    files = []
    for mode in sorted({r["mode"] for r in rows}):
        mrows = [r for r in rows if r["mode"] == mode]
        groups = sorted({(r["H"], r["D"], r["model"].split("@")[0]) for r in mrows})
        fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
        for ax, (H, D, model) in zip(axes[0], groups, strict=True):
            grows = [r for r in mrows if (r["H"], r["D"], r["model"].split("@")[0]) == (H, D, model)]
            for provider in PROVIDERS:
                pts = sorted((r["N"], r["tflops"]) for r in grows if r["provider"] == provider)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=provider)
            ax.axhline(peaks.tflops(args.dtype), color="k", ls="--", label=f"measured {args.dtype} matmul peak")
            ax.set(title=f"{model} H={H} D={D}", xlabel="N (tokens)", ylabel="TFLOP/s", yscale="log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"attention {mode}, {args.dtype}, {env.device_name}", fontsize=10)
        fig.tight_layout()
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        stem = common.unused_stem(args.out_dir, f"attn_bench-{env.slug}-{args.dtype}-{mode}-{env.date}", (".png",))
        path = Path(f"{stem}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


COLUMNS = [
    ("model", "model"), ("B", "B"), ("H", "H"), ("N", "N"), ("D", "D"), ("mode", "mode"), ("provider", "provider"),
    ("ms (median)", "ms"), ("TFLOP/s", "tflops"), ("GB/s", "gbps"), ("% roofline", "roofline_pct"),
    ("peak MiB above inputs", "mem_mib"), ("speedup vs eager", "speedup"), ("rel err", "rel_err"),
]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--shapes", help='"B,H,N,D;B,H,N,D" (default: ViT shapes; small ones on CPU)')
    p.add_argument("--mode", choices=["fwd", "fwd_bwd", "both"], default="both")
    p.add_argument("--packed", action="store_true", help="q, k, v as views of one (B, N, 3, H, D) tensor (as in a ViT)")
    p.add_argument("--include-interpreter", action="store_true", help="on CPU, time Triton under TRITON_INTERPRET=1")
    p.add_argument("--plot", action="store_true", help="PNG of TFLOP/s vs N per provider (needs matplotlib)")
    args = p.parse_args(argv)
    common.resolve_common_args(args)
    dtype = common.DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(args.device)
    modes = MODES if args.mode == "both" else (args.mode,)
    if hasattr(torch, "_dynamo"):
        # One compiled graph per (shape, mode) on GPU: more than dynamo's default of 8 recompiles.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(shapes) * len(modes))

    env = common.Env.collect(args.device, args.dtype)
    peaks = common.measure_peaks(args.device, [args.dtype], args.peaks)
    report = common.Report("attn_bench", env, peaks, args)
    runnable = report.runnable(PROVIDERS, args.providers, lambda pr: global_skip_reason(pr, args.device, args))

    report.print_header()
    report.run_cells(
        [(shape, mode, provider) for shape in shapes for mode in modes for provider in runnable],
        lambda shape, mode, provider: f"{provider} {shape.model} N={shape.N} {mode}",
        lambda shape, mode, provider: run_cell(report, provider, shape, mode, args, dtype, peaks),
    )
    report.set_speedups(("model", "B", "H", "N", "D", "mode"), baseline="eager")
    extra = plot(report.rows, peaks, env, args) if args.plot and report.rows and not args.no_save else []
    report.finish(common.markdown_table(COLUMNS, report.rows), extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
