"""Where an op's wall time goes when it is more than its kernels: for each op of probe_gemm's end-to-end table
(ViT-B/16 block shapes, B=256, bf16) and each backend, fwd and fwd+bwd:

    wall ms     event-timed median of back-to-back calls (what the benchmarks report)
    kernels ms  the sum of the device time of every kernel one call launches (torch.profiler)
    host ms     the CPU time to issue one call, the GPU never waited for (perf_counter over back-to-back calls)
    syncs       the first call that made the host wait for the device (torch.cuda.set_sync_debug_mode), if any

wall well above kernels means the GPU sits idle: host-bound (host ms near wall) or a synchronising call. Then the
kernels of each non-torch fwd+bwd call, by device time; with `--cprofile`, where the host's time goes in each
triton and cuda fwd+bwd call (cProfile, by cumulative time). Needs a GPU; `python benchmarks/host_overhead.py`.

`--cpu-stubs` (no GPU needed): our own Python's share alone. The triton backend runs on CPU tensors with the
Hopper path's arguments (arch 90: TMA descriptors, persistent grids, split-K) and every Triton launch replaced by
a no-op, beside the torch backend on the same tiny tensors (B=1, N=8: torch's CPU kernels cost ~nothing there),
so that a change to the Python layers (checks, dispatch, custom ops, autograd, launch arguments) is measured here
in microseconds per call; cProfile's top functions follow. The GPU machine's slower CPU scales them up.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import probe_gemm  # noqa: E402

BACKENDS = ("torch", "triton", "cuda")


def first_sync(run) -> str:
    """'' if run() never makes the host wait for the device, else the first line of what says it did."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return ""
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:100]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def kernels_per_call(run, calls: int = 5) -> list[tuple[str, float]]:
    """(kernel name, device us per call) of each kernel run() launches, by time, from torch.profiler."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / calls) for e in prof.key_averages()
            if e.self_device_time_total > 0 and str(e.device_type).endswith("CUDA")]  # fmt: skip
    return sorted(rows, key=lambda r: -r[1])


def host_ms(run, calls: int = 20, sync: bool = True) -> float:
    """CPU ms to issue one call (back to back, no sync inside; the GPU queue is long enough not to block)."""
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    elapsed = time.perf_counter() - start
    if sync:
        torch.cuda.synchronize()
    return 1e3 * elapsed / calls


def host_profile(run, calls: int = 20, lines: int = 25, sync: bool = True) -> str:
    """cProfile of `calls` back-to-back calls: the functions with the most cumulative host time."""
    if sync:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    prof.disable()
    if sync:
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(lines)
    return text.getvalue()


def wall_ms(run, calls: int = 20) -> float:
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def stub_triton_launches() -> None:
    """Every Triton launch a no-op, the triton backend on CPU tensors taking sm_90's path (`--cpu-stubs`)."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    from vit_kernels import triton as vit_triton

    def no_launch(self, grid):
        return lambda *args, **kwargs: None

    for cls in (jit.JITFunction, getattr(interpreter, "InterpretedFunction", None)):
        if cls is not None:
            cls.__getitem__ = no_launch
    vit_triton.arch = lambda device: 90


def cpu_stubs(args) -> int:
    """Our Python layers' host time per call on CPU, launches stubbed (the module docstring)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":  # probe_gemm sets it where there is no GPU; on a GPU machine:
        print("host_overhead --cpu-stubs: set TRITON_INTERPRET=1 before the run (CPU tensors on the triton backend)")
        return 2
    stub_triton_launches()
    ops = probe_gemm.ops(1, 8, 64, 2, "cpu", torch.bfloat16)  # 16-bit: the TMA path, as on the GPU
    wanted = [o for o in args.ops.split(",") if o] or list(ops)
    print(f"## host_overhead --cpu-stubs: {common.Env.collect('cpu', 'bf16').header()}\n")
    print("| op | mode | torch us | triton (launches stubbed) us | triton - torch us |")
    print("|---|---|---|---|---|")
    profiles = {}
    for op in wanted:
        fn, leaves = ops[op]
        for mode in ("fwd", "fwd+bwd"):
            us = {}
            for backend in ("torch", "triton"):
                run = functools.partial(probe_gemm.run_op, fn, leaves, backend, mode)
                for _ in range(3):
                    run()
                us[backend] = 1e3 * statistics.median(host_ms(run, 50, sync=False) for _ in range(7))
                if backend == "triton" and mode == "fwd+bwd" and args.cprofile:
                    profiles[op] = host_profile(run, sync=False)
            print(f"| {op} | {mode} | {us['torch']:.0f} | {us['triton']:.0f} | {us['triton'] - us['torch']:.0f} |")
    for op, text in profiles.items():
        print(f"\n### {op}, triton (launches stubbed), fwd+bwd: host time by function\n\n```\n{text}```")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ops", default="", help="comma-separated subset of probe_gemm's ops (default: all)")
    parser.add_argument("--cprofile", action="store_true", help="also cProfile each triton and cuda fwd+bwd call")
    parser.add_argument("--cpu-stubs", action="store_true", help="our Python's share alone, on CPU (docstring)")
    args = parser.parse_args(argv)
    if args.cpu_stubs:
        return cpu_stubs(args)
    if not torch.cuda.is_available():
        print("host_overhead: needs a CUDA GPU (or --cpu-stubs: our Python layers alone, on CPU)")
        return 2
    ops = probe_gemm.ops(args.batch, 197, 768, 12, "cuda", torch.bfloat16)
    wanted = [o for o in args.ops.split(",") if o] or list(ops)
    print(f"## host_overhead: B={args.batch}, {common.Env.collect('cuda', 'bf16').header()}\n")
    print("| op | backend | mode | wall ms | kernels ms | host ms | kernels | syncs |")
    print("|---|---|---|---|---|---|---|---|")
    detail, profiles = {}, {}
    for op in wanted:
        fn, leaves = ops[op]
        for backend in BACKENDS:
            for mode in ("fwd", "fwd+bwd"):
                run = functools.partial(probe_gemm.run_op, fn, leaves, backend, mode)
                try:
                    run()
                    run()
                    sync = first_sync(run)
                    kernels = kernels_per_call(run)
                    wall, host = wall_ms(run), host_ms(run)
                except Exception as exc:  # one failing cell must not hide the others
                    print(f"| {op} | {backend} | {mode} | FAILED: {common.short_reason(exc)} | | | | |", flush=True)
                    continue
                device = sum(us for _, us in kernels) / 1e3
                print(f"| {op} | {backend} | {mode} | {wall:.3f} | {device:.3f} | {host:.3f} | {len(kernels)} | "
                      f"{sync or 'none'} |", flush=True)  # fmt: skip
                if backend != "torch" and mode == "fwd+bwd":
                    detail[op, backend] = kernels
                    if args.cprofile:
                        profiles[op, backend] = host_profile(run)
    for (op, backend), kernels in detail.items():
        print(f"\n### {op}, {backend}, fwd+bwd: kernels by device time\n")
        print("| kernel | us per call |\n|---|---|")
        for name, us in kernels[:14]:
            print(f"| {name[:90].replace('|', '/')} | {us:.1f} |")
    for (op, backend), text in profiles.items():
        print(f"\n### {op}, {backend}, fwd+bwd: host time by function (cProfile, 20 calls)\n\n```\n{text}```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
