"""End to end: images/s of whole ViTs, inference and one training step, per backend, with and without
torch.compile, and timm's ViT (when timm is installed) as the outside baseline.

    python benchmarks/vit_bench.py                                  # ViT-S/B/L on GPU, ViT-Ti on CPU
    python benchmarks/vit_bench.py --models vit_base_patch16_224 --batch 128 --compile no

Providers: `vit:<backend>` is `vit.<model>(backend=<backend>)` from this repository's `vit` package
(imported lazily; skipped with the reason when it is missing; `vit:auto` is what a user gets: the measured table's
choice per op), `timm` is `timm.create_model(<model>)`;
each also as `...+compile` (torch.compile of the model) and as `...+graphs` (the whole step captured once in a CUDA
graph and replayed: what is left when the host's cost of issuing the step is gone; AdamW with capturable=True, as
torch's whole-network capture recipe has it). The model runs in the benchmark dtype (no
autocast): inference under torch.inference_mode; a training step is forward, cross-entropy, backward
and AdamW. MFU: the model's matmul FLOPs (common.vit_flops_per_image; training 3x) per second over the
measured matmul peak.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

if "--include-interpreter" in sys.argv and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's own `vit` package, when it is not installed (appended: an installed one comes first).
sys.path.append(str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

# name: (img, patch, dim, depth, heads, mlp_ratio, classes): the FLOP count's inputs, as in timm.
MODELS = {
    "vit_tiny_patch16_224": (224, 16, 192, 12, 3, 4.0, 1000),
    "vit_small_patch16_224": (224, 16, 384, 12, 6, 4.0, 1000),
    "vit_base_patch16_224": (224, 16, 768, 12, 12, 4.0, 1000),
    "vit_large_patch16_224": (224, 16, 1024, 24, 16, 4.0, 1000),
}
GPU_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
GPU_BATCH = {
    "vit_tiny_patch16_224": 256,
    "vit_small_patch16_224": 256,
    "vit_base_patch16_224": 256,
    "vit_large_patch16_224": 64,
}
COMPILE_AUTO_MODEL = "vit_base_patch16_224"
BACKENDS = ("reference", "torch", "triton", "cuda", "auto")
MODES = ("infer", "train")


def build(provider: str, name: str, device: str, dtype):
    """The model for one provider, or raise Skip with the reason."""
    family, _, backend = provider.partition(":")
    if family == "timm":
        if importlib.util.find_spec("timm") is None:
            raise Skip("timm is not installed (pip install timm)")
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        try:
            vit = importlib.import_module("vit")
        except ImportError as exc:
            raise Skip(f"the vit package is not importable ({exc})") from None
        factory = getattr(vit, name, None)
        if factory is None:
            raise Skip(f"vit.{name} does not exist (yet)")
        try:
            model = factory(backend=backend)
        except (TypeError, ValueError) as exc:
            raise Skip(f"vit.{name}(backend={backend!r}) failed: {common.short_reason(exc)}") from None
    return model.to(device=device, dtype=dtype)


Skip = common.Skip


VARIANTS = ("compile", "graphs")  # provider suffixes: "+compile", "+graphs"


def provider_list(args) -> list[str]:
    base = [f"vit:{b}" for b in BACKENDS] + ["timm"]
    return base + [f"{p}+{v}" for v in VARIANTS for p in base]


def global_skip_reason(provider: str, args) -> str | None:
    if provider.endswith("+compile") and not args.compile_on:
        return "torch.compile of a whole ViT takes minutes on this CPU (--compile yes to include it)"
    if provider.endswith("+graphs") and args.device != "cuda":
        return "CUDA graphs need a CUDA device"
    backend = provider.split("+")[0].partition(":")[2]
    if backend in ("triton", "cuda"):
        return common.kernel_skip_reason(backend, args.device, args.include_interpreter)
    return None


def train_step(fwd, opt, images, labels):
    """Forward, cross-entropy, backward and the optimizer's step on one batch -> the loss (gradients left set)."""
    loss = F.cross_entropy(fwd(images).float(), labels)
    loss.backward()
    opt.step()
    return loss


def eager_step(model, mode: str, images, labels, compiled: bool):
    """step(i) -> output: one inference forward or one training step (forward, loss, backward, AdamW) on set i."""
    fwd = torch.compile(model) if compiled else model
    if mode == "infer":
        model.eval()

        def step(i):
            with torch.inference_mode():
                return fwd(images[i])

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i):
        loss = train_step(fwd, opt, images[i], labels[i])
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def graphed_step(model, mode: str, images, labels):
    """step(i): the same step captured once in a CUDA graph (torch's whole-network capture: warm up on a side
    stream, gradients None before capture so backward allocates them in the graph's pool, AdamW capturable), then
    replayed on set i copied into the captured inputs."""
    static_images, static_labels = images[0].clone(), labels[0].clone()
    model.train(mode == "train")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True) if mode == "train" else None

    def body():
        if opt is None:
            with torch.inference_mode():
                return model(static_images)
        return train_step(model, opt, static_images, static_labels)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
            if opt is not None:
                opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = body()

    def step(i):
        static_images.copy_(images[i])
        static_labels.copy_(labels[i])
        graph.replay()
        return static_out

    return step


def run_cell(report, provider, name, mode, args, dtype, peaks, models_cache) -> dict | None:
    base_provider, _, variant = provider.partition("+")
    B = args.batch or (GPU_BATCH[name] if args.device == "cuda" else 2)

    def prepare():
        key = (base_provider, name)
        if key not in models_cache or variant == "graphs":
            models_cache.clear()  # one model resident at a time; a captured model's weights belong to its graph
            models_cache[key] = build(base_provider, name, args.device, dtype)
        model = models_cache[key]
        img, classes = MODELS[name][0], MODELS[name][6]
        n_sets = 2
        images = [torch.randn(B, 3, img, img, device=args.device, dtype=dtype) for _ in range(n_sets)]
        labels = [torch.randint(0, classes, (B,), device=args.device) for _ in range(n_sets)]
        if variant == "graphs":
            step = graphed_step(model, mode, images, labels)
        else:
            step = eager_step(model, mode, images, labels, compiled=variant == "compile")
        common.first_call(lambda: step(0))
        return step, n_sets, None

    where = f"{name} {mode}"
    cell = common.run_cell(report, provider, where, args, prepare, oom_reason=f"out of memory at batch {B}", min_reps=3)
    if cell is None:
        return None
    t = cell.timing
    flops = common.vit_flops_per_image(*MODELS[name]) * B * (1 if mode == "infer" else 3)
    tflops = flops / (t.median_ms * 1e-3) / 1e12
    return {
        "model": name,
        "batch": B,
        "mode": mode,
        "provider": provider,
        "ms": t.median_ms,
        "ms_p20": t.p20_ms,
        "ms_p80": t.p80_ms,
        "reps": t.reps,
        "images_per_s": B / (t.median_ms * 1e-3),
        "tflops": tflops,
        "mfu_pct": 100 * tflops / peaks.tflops(args.dtype),
        "mem_mib": cell.mem_mib,
        "flops": flops,
    }


COLUMNS = [
    ("model", "model"), ("batch", "batch"), ("mode", "mode"), ("provider", "provider"), ("ms (median)", "ms"),
    ("images/s", "images_per_s"), ("TFLOP/s", "tflops"), ("MFU %", "mfu_pct"), ("peak MiB", "mem_mib"),
    ("speedup vs vit:torch", "speedup"), ("x timm", "x_timm"),
]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--models", help=f"comma-separated from {list(MODELS)} (default: S/B/L on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, help="images per step (default: 256, 64 for ViT-L, on GPU; 2 on CPU)")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="both")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="auto: on GPU, for ViT-B only")
    p.add_argument("--include-interpreter", action="store_true", help="on CPU, time Triton under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    common.resolve_common_args(args)
    args.compile_on = args.compile == "yes" or (args.compile == "auto" and args.device == "cuda")
    dtype = common.DTYPES[args.dtype]
    names = (
        args.models.split(",") if args.models else (GPU_MODELS if args.device == "cuda" else ("vit_tiny_patch16_224",))
    )
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    modes = MODES if args.mode == "both" else (args.mode,)

    env = common.Env.collect(args.device, args.dtype)
    peaks = common.measure_peaks(args.device, [args.dtype], args.peaks)
    report = common.Report("vit_bench", env, peaks, args)
    runnable = report.runnable(provider_list(args), args.providers, lambda pr: global_skip_reason(pr, args))

    report.print_header()
    cache: dict = {}
    bar = common.progress(len(names) * len(runnable) * len(modes), "vit_bench", disable=args.no_progress)
    for name in names:
        for provider in runnable:
            if provider.endswith("+compile") and args.compile == "auto" and name != COMPILE_AUTO_MODEL:
                # Each compiled model costs ~a minute of compilation per mode; one model shows the effect.
                why = f"--compile auto compiles {COMPILE_AUTO_MODEL} only (--compile yes for all)"
                report.skip(provider, why, name)
                bar.update(len(modes))
                continue
            for mode in modes:
                bar.set_postfix_str(f"{provider} {name} {mode}")
                row = run_cell(report, provider, name, mode, args, dtype, peaks, cache)
                bar.update()
                if row:
                    report.add(row)
    bar.close()
    cache.clear()
    report.set_speedups(("model", "mode"), baseline="vit:torch")
    report.set_speedups(("model", "mode"), baseline="timm", key="x_timm")  # the goal's ratio: >= 1.15x timm
    report.finish(common.markdown_table(COLUMNS, report.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
