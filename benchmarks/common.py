"""Shared benchmark plumbing: environment info, timing, measured peaks, FLOP/byte formulas, writers.

Every benchmark script does the same four things, in this order:
  1. `Env.collect()`: device name, dtype, versions, git commit (carried by every machine-readable row);
  2. `measure_peaks()`: copy bandwidth and matmul throughput measured on this machine, once per run;
  3. per cell: check the provider against the reference, then `bench()` (medians over rotating inputs);
  4. `Report`: a Markdown table on stdout, CSV + JSON under --out-dir, the skip list.

Where files go. By default to benchmarks/out/, which git ignores, so that a run never dirties the tree;
benchmarks/results/ holds the committed measurements (cited by vit_kernels/measured_backends.json and NOTES.md)
and is written only when asked: `--out-dir benchmarks/results`. Files are named by bench, device, dtype and date,
so an existing file is never replaced: a rerun's files get -2, -3, ... (`unused_stem`).

Timing. On CUDA each call is bracketed by CUDA events and the median over calls is reported; on CPU,
`time.perf_counter` around each call. Each call takes the next of several input sets (`n_sets`), so a
provider never re-reads inputs that are still hot in L2 from the previous call.

Run `python benchmarks/common.py` to print this machine's measured peaks (`--json FILE` saves them so
that the benchmarks can reuse them with `--peaks FILE`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"  # committed measurements: written only with --out-dir
OUT_DIR = ROOT / "benchmarks" / "out"  # the default --out-dir: in .gitignore
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MiB = 1 << 20
# When this module was first imported: `Report.finish` says how long the benchmark took, so that a run killed
# at its slice (gpu_check.sh) shows whether the work or the exit after it ran out of time.
_STARTED = time.monotonic()
TRITON_ON_CPU = (
    "on CPU tensors Triton runs only under its interpreter, far too slow to benchmark"
    " (--include-interpreter to time it anyway)"
)


def kernel_skip_reason(backend: str, device: str, include_interpreter: bool) -> str | None:
    """Why vit_kernels' kernel `backend` ("triton" or "cuda") cannot be timed on `device`, or None: Triton on CPU
    only with --include-interpreter (TRITON_ON_CPU), else dispatch.device_unavailable_reason's answer."""
    if backend == "triton" and device == "cpu" and not include_interpreter:
        return TRITON_ON_CPU
    from vit_kernels import dispatch  # here: the scripts set TRITON_INTERPRET before any kernel module is imported

    return dispatch.device_unavailable_reason(backend, torch.device(device))


# ----------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Env:
    device: str  # "cuda" | "cpu"
    device_name: str  # "NVIDIA H100 80GB HBM3" | "AMD EPYC (2 threads)"
    dtype: str
    torch: str
    triton: str | None
    cuda: str | None
    commit: str | None
    date: str
    load_avg: float | None = None  # 1-minute load average at start: a busy shared CPU makes timings noisy
    capability: str | None = None  # "sm_90" (CUDA compute capability, auto_table's arch); None on CPU
    float32_matmul_precision: str | None = None  # torch's at start: "highest" (exact fp32), "high"/"medium" (tf32)

    @classmethod
    def collect(cls, device: str, dtype: str) -> Env:
        capability = None
        if device == "cuda":
            name = torch.cuda.get_device_name()
            major, minor = torch.cuda.get_device_capability()
            capability = f"sm_{major}{minor}"
        else:
            name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        commit = _git("rev-parse", "--short=12", "HEAD")
        if commit and _git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
        return cls(
            device=device,
            device_name=name,
            dtype=dtype,
            torch=torch.__version__,
            triton=triton_version,
            cuda=torch.version.cuda,
            commit=commit,
            date=_dt.datetime.now().strftime("%Y-%m-%d"),
            load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            capability=capability,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )

    @property
    def slug(self) -> str:
        """File-name-safe device name: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
        name = self.device_name if self.device == "cuda" else "cpu-" + self.device_name.split("(")[0]
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")

    def header(self) -> str:
        return (
            f"device: {self.device_name} | dtype: {self.dtype} | torch {self.torch} | triton {self.triton} | "
            f"CUDA {self.cuda} | commit {self.commit} | {self.date} | load avg {fmt(self.load_avg)}"
        )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser: argparse.ArgumentParser, default_dtype_gpu: str = "bf16") -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"default: {default_dtype_gpu} on GPU, fp32 on CPU")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--providers", help="comma-separated subset of providers to run (default: all)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=OUT_DIR,
        help="where the CSV/JSON/PNG files go (default benchmarks/out/, untracked; benchmarks/results/ to commit "
        "them); an existing file is never replaced: this run's get -2, -3, ...",
    )
    parser.add_argument("--no-save", action="store_true", help="print the table only, write no files")
    parser.add_argument("--peaks", type=Path, help="JSON from `python benchmarks/common.py --json`: skip measuring")
    parser.add_argument("--rep-ms", type=float, default=None, help="time budget per cell (default 200 GPU, 100 CPU)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a shared CPU, 1 gives steadier medians)")


def resolve_common_args(args: argparse.Namespace, default_dtype_gpu: str = "bf16") -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or default_device()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or (default_dtype_gpu if args.device == "cuda" else "fp32")
    if args.rep_ms is None:
        args.rep_ms = 200.0 if args.device == "cuda" else 100.0


def selected(providers: Sequence[str], arg: str | None) -> tuple[list[str], list[tuple[str, str]]]:
    """Providers to run and (provider, reason) for those left out by --providers."""
    if not arg:
        return list(providers), []
    wanted = [p.strip() for p in arg.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in providers]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {list(providers)}")
    return [p for p in providers if p in wanted], [
        (p, "not requested (--providers)") for p in providers if p not in wanted
    ]


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(
    fn: Callable[[int], object],
    n_sets: int,
    device: str,
    *,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> Timing:
    """Median time of `fn(i)`, i cycling over `n_sets` input sets, after warm-up.

    The number of timed calls is chosen so that they take about `rep_ms` (at least `min_reps`);
    warm-up is a quarter of that (at least two calls per input set, which also triggers any lazy
    compilation or autotuning before timing starts).
    """
    _sync(device)
    t0 = time.perf_counter()
    for i in range(2 * n_sets):
        fn(i % n_sets)
    _sync(device)
    est_ms = (time.perf_counter() - t0) * 1e3 / (2 * n_sets)
    for i in range(int(min(max_reps, rep_ms / 4 / max(est_ms, 1e-3)))):
        fn(i % n_sets)
    reps = int(max(min_reps, min(max_reps, rep_ms / max(est_ms, 1e-3))))
    times = []
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        _sync(device)
        for i in range(reps):
            starts[i].record()
            fn(i % n_sets)
            ends[i].record()
        _sync(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for i in range(reps):
            t = time.perf_counter()
            fn(i % n_sets)
            times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], reps)


def n_input_sets(set_bytes: int, device: str, budget_bytes: int | None = None) -> int:
    """How many input sets to rotate through: enough that they together overflow the last-level cache
    (L2 on GPU, at most ~60 MB on H100/H200; L3 on CPU, assumed <= 64 MB) twice over, at least 2, at most 8."""
    cache = 128 * MiB
    n = max(2, min(8, math.ceil(cache / max(set_bytes, 1))))
    if budget_bytes is not None:
        n = max(1, min(n, budget_bytes // max(set_bytes, 1)))
    return n


class PeakMemory:
    """Peak bytes allocated above what was allocated on entry (CUDA only; None on CPU: no allocator stats)."""

    def __init__(self, device: str):
        self.device, self.peak_mib = device, None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / MiB


# ----------------------------------------------------------------------------------------------------
# measured peaks (the roofline's two ceilings)
# ----------------------------------------------------------------------------------------------------
@dataclass
class Peaks:
    copy_gbps: float  # device-memory (or DRAM) copy bandwidth, GB/s, counting read + write
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # per dtype name

    def tflops(self, dtype: str) -> float:
        return self.matmul_tflops[dtype]


def _measure_copy_gbps(device: str) -> float:
    # Four times the last-level cache so the copy streams from memory.
    n = (256 if device == "cuda" else 128) * MiB
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = bench(lambda i: dst.copy_(src), 1, device, rep_ms=100 if device == "cuda" else 150, min_reps=3)
    return 2 * n / (t.median_ms * 1e-3) / 1e9


def _measure_matmul_tflops(device: str, dtype: str) -> float:
    # Large square GEMMs on GPU (the best case for cuBLAS); on CPU one size that takes tens of ms, so
    # the whole measurement stays well under a second.
    if device == "cuda":
        sizes = (4096, 8192)
    else:
        sizes = (1024,) if dtype == "fp32" else (512,)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        t = bench(lambda i, a=a, b=b: a @ b, 1, device, rep_ms=150, min_reps=3)
        best = max(best, 2 * n**3 / (t.median_ms * 1e-3) / 1e12)
    return best


@functools.cache
def _measured(device: str, dtypes: tuple[str, ...]) -> Peaks:
    return Peaks(_measure_copy_gbps(device), {d: _measure_matmul_tflops(device, d) for d in dtypes})


def measure_peaks(device: str, dtypes: Sequence[str], peaks_file: Path | None = None) -> Peaks:
    """Measured once per run (cached); from `peaks_file` if given and it holds what is asked."""
    if peaks_file is not None:
        data = json.loads(Path(peaks_file).read_text())
        if all(d in data["matmul_tflops"] for d in dtypes):
            return Peaks(data["copy_gbps"], data["matmul_tflops"])
        print(f"{peaks_file} lacks matmul peaks for {list(dtypes)}: measuring", file=sys.stderr)
    return _measured(device, tuple(dtypes))


# ----------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """One ViT layer's sizes (mlp_bench, block_bench): B images of N tokens, width C, MLP hidden width, heads."""

    model: str
    B: int
    N: int
    C: int
    hidden: int
    heads: int

    @property
    def M(self) -> int:
        return self.B * self.N

    def __str__(self) -> str:
        return f"{self.model} B={self.B} N={self.N} C={self.C} hidden={self.hidden} heads={self.heads}"


def parse_layer_shapes(text: str, cls: type[LayerShape] = LayerShape) -> list[LayerShape]:
    """--shapes "B,N,C,hidden,heads;...": one `cls` named "custom" per part."""
    shapes = []
    for part in text.split(";"):
        if part.strip():
            B, N, C, hidden, heads = (int(x) for x in part.split(","))
            shapes.append(cls("custom", B, N, C, hidden, heads))
    return shapes


# ----------------------------------------------------------------------------------------------------
# FLOP and byte formulas (written out, one function per op)
# ----------------------------------------------------------------------------------------------------
def attention_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    """Forward: Q K^T and P V, 2 * N^2 * D each per head: 4 B H N^2 D (softmax not counted).
    Backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, plus recomputing S = Q K^T: 5 matmuls,
    i.e. 2.5x forward (FlashAttention's convention). fwd_bwd = 3.5x forward."""
    fwd = 4.0 * B * H * N * N * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def attention_bytes(B: int, H: int, N: int, D: int, elem: int, mode: str) -> float:
    """Minimum device-memory traffic of a fused (flash) attention.
    Forward: read q, k, v, write out: 4 B H N D elements.
    Backward: read q, k, v, out, dout and the fp32 row log-sum-exp (B H N), write dq, dk, dv:
    8 B H N D elements + 4 B H N bytes. The naive path moves far more (its N x N matrices); its
    bandwidth column still uses this minimum, so it reads as 'useful bytes per second'."""
    x = B * H * N * D * elem
    fwd = 4 * x
    bwd = 8 * x + 4 * B * H * N
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def linear_flops(M: int, K: int, N: int, mode: str) -> float:
    """y (M, N) = x (M, K) @ W (N, K)^T: 2 M N K forward; backward dx and dW: 2x forward."""
    fwd = 2.0 * M * N * K
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode]


def qkv_bytes(M: int, C: int, elem: int, mode: str) -> float:
    """Fused QKV (3C outputs). Forward: read x (M, C), W (3C, C), bias; write q, k, v (3 M C).
    Backward: read dq, dk, dv (3 M C), x, W; write dx (M C), dW (3C C), dbias."""
    fwd = (M * C + 3 * C * C + 3 * C + 3 * M * C) * elem
    bwd = (3 * M * C + M * C + 3 * C * C + M * C + 3 * C * C + 3 * C) * elem
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def mlp_flops(M: int, C: int, hidden: int, mode: str) -> float:
    """fc1 (C -> hidden) and fc2 (hidden -> C); GELU's elementwise work is not counted."""
    return linear_flops(M, C, hidden, mode) + linear_flops(M, hidden, C, mode)


def mlp_bytes(M: int, C: int, hidden: int, elem: int, mode: str) -> float:
    """Fused MLP, inference forward: read x, W1, b1, W2, b2; write y (the hidden activation stays on chip
    in the ideal, but every GEMM-epilogue fusion writes it once: counted, M * hidden). Training also
    keeps it for backward, which reads dy, x, W1, W2, hidden and writes dx, dW1, db1, dW2, db2, plus
    one M * hidden intermediate (dhidden) written and read."""
    w = 2 * C * hidden + hidden + C
    fwd = (2 * M * C + w + M * hidden) * elem
    bwd = (2 * M * C + 2 * C * hidden + M * hidden + M * C + w + 2 * M * hidden) * elem
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def vit_flops_per_image(
    img: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float, classes: int
) -> float:
    """Forward matmul FLOPs of one image through a ViT (LayerNorm, softmax, GELU, adds not counted).
    Per block, N tokens, C = dim: QKV 6 N C^2, attention 4 N^2 C, proj 2 N C^2, MLP 4 r N C^2."""
    n_patches = (img // patch) ** 2
    N = n_patches + 1
    C = dim
    block = 6 * N * C * C + 4 * N * N * C + 2 * N * C * C + 4 * mlp_ratio * N * C * C
    embed = 2 * n_patches * C * 3 * patch * patch
    head = 2 * C * classes
    return depth * block + embed + head


def roofline_fraction(flops: float, nbytes: float, ms: float, peaks: Peaks, dtype: str) -> float:
    """Achieved fraction of the roofline: the time floor (compute floor or memory floor, whichever
    is larger, from the measured peaks) divided by the measured time."""
    floor_s = max(flops / (peaks.tflops(dtype) * 1e12), nbytes / (peaks.copy_gbps * 1e9))
    return floor_s / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------------
# checking a provider before timing it
# ----------------------------------------------------------------------------------------------------
TOLERANCE = {"fp32": 2e-3, "fp16": 5e-3, "bf16": 3e-2}  # fp32 allows tf32 on GPU


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def short_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:220]}" + ("..." if len(text) > 220 else "")


# ----------------------------------------------------------------------------------------------------
# one benchmark cell: check, then time (the skeleton every script shares)
# ----------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A provider cannot run a cell here; the message says why and goes into the report's skip list."""


# What a provider that cannot run some inputs raises; anything else is a bug in the benchmark and propagates.
PROVIDER_ERRORS = (RuntimeError, ValueError, TypeError, ImportError, NotImplementedError, AssertionError)


def first_call(fn: Callable[[], object]):
    """fn() (a provider's correctness check or first step), turning a provider error into Skip. Warnings raised
    meanwhile join the reason: SDPA explains through warnings why one of its backends cannot run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn()
        except PROVIDER_ERRORS as exc:
            hint = " | ".join(dict.fromkeys(" ".join(str(w.message).split())[:160] for w in caught))
            raise Skip(short_reason(exc) + (f" [{hint}]" if hint else "")) from None


@dataclass
class Cell:
    timing: Timing
    mem_mib: float | None
    err: float | None
    n_sets: int


def run_cell(
    report, provider: str, where: str, args, prepare: Callable[[], tuple[Callable[[int], object], int, float | None]],
    *, oom_reason: str = "out of memory at this shape", min_reps: int = 5,
) -> Cell | None:  # fmt: skip
    """prepare() builds the inputs, checks the provider (raising Skip when it cannot run here) and returns
    (step(i), n_sets, rel err or None); the step is then timed with its peak memory. Returns the Cell, or None
    after recording why it was skipped. The inputs are released and the CUDA cache emptied before returning,
    so the next cell starts from a clean device."""
    step = None
    try:
        step, n_sets, err = prepare()
        if err is not None and err > TOLERANCE[args.dtype]:
            print(f"WARNING: {provider} {where}: relative error {err:.2e} > {TOLERANCE[args.dtype]}", file=sys.stderr)
        with PeakMemory(args.device) as mem:
            t = bench(step, n_sets, args.device, rep_ms=args.rep_ms, min_reps=min_reps)
    except Skip as exc:
        report.skip(provider, str(exc), where)
        return None
    except torch.OutOfMemoryError:
        report.skip(provider, oom_reason, where)
        return None
    finally:
        step = None  # the step's closure holds the input sets
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return Cell(t, mem.peak_mib, err, n_sets)


# ----------------------------------------------------------------------------------------------------
# progress, tables, files
# ----------------------------------------------------------------------------------------------------
def progress(total: int, desc: str, disable: bool = False):
    """tqdm on stderr when installed; otherwise a plain counter line per step."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False)
    except ImportError:

        class _Plain:
            n = 0

            def update(self, k=1):
                self.n += k
                if not disable:
                    print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                if not disable:
                    print(file=sys.stderr)

        return _Plain()


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if x == 0 or not math.isfinite(x):
        return str(x)
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def unused_stem(out_dir: Path, name: str, suffixes: Sequence[str]) -> Path:
    """out_dir/name, else out_dir/name-2, name-3, ...: the first for which no `stem + suffix` file exists. Results
    are named by bench, device, dtype and date, so a rerun on the same day would otherwise replace the file that
    a committed table cites as evidence."""
    first = Path(out_dir) / name
    stem, n = first, 1
    while taken := [Path(f"{stem}{suffix}") for suffix in suffixes if Path(f"{stem}{suffix}").exists()]:
        if n == 1:
            print(f"{taken[0]} exists already: not replaced; this run's files get a suffix", file=sys.stderr)
        n += 1
        stem = first.with_name(f"{name}-{n}")
    return stem


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict]) -> str:
    """columns: (header, row key); values are formatted with `fmt`."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


class Report:
    """Collects rows and skips of one benchmark run and writes them out."""

    def __init__(self, name: str, env: Env, peaks: Peaks | None, args: argparse.Namespace):
        self.name, self.env, self.peaks, self.args = name, env, peaks, args
        self.rows: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def skip(self, provider: str, reason: str, where: str = "all") -> None:
        self.skipped.append({"provider": provider, "where": where, "reason": reason})

    def run_cells(self, cells: Sequence[tuple], label: Callable[..., str], run: Callable[..., dict | None]) -> None:
        """run(*cell) for every cell in order, under a progress bar showing label(*cell); adds each row it returns."""
        bar = progress(len(cells), self.name, disable=self.args.no_progress)
        for cell in cells:
            bar.set_postfix_str(label(*cell))
            row = run(*cell)
            bar.update()
            if row:
                self.add(row)
        bar.close()

    def runnable(self, providers: Sequence[str], requested: str | None, unavailable: Callable[[str], str | None]):
        """The providers to time: those --providers asks for (all by default) that can run here at all;
        every other one is recorded as skipped with its reason (`unavailable(provider)` gives it, or None)."""
        wanted, not_requested = selected(providers, requested)
        for provider, reason in not_requested:
            self.skip(provider, reason)
        runnable = []
        for provider in wanted:
            reason = unavailable(provider)
            if reason:
                self.skip(provider, reason)
            else:
                runnable.append(provider)
        return runnable

    def set_speedups(self, group_keys: Sequence[str], baseline: str, key: str = "speedup") -> None:
        """row[key] = the baseline provider's time / this row's, among rows equal on `group_keys`
        (None where the baseline did not run)."""
        base = {tuple(r[k] for k in group_keys): r["ms"] for r in self.rows if r["provider"] == baseline}
        for r in self.rows:
            b = base.get(tuple(r[k] for k in group_keys))
            r[key] = b / r["ms"] if b else None

    def skip_text(self) -> str:
        """One line per (provider, reason), listing where it applied."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for s in self.skipped:
            grouped.setdefault((s["provider"], s["reason"]), []).append(s["where"])
        lines = []
        for (provider, reason), wheres in grouped.items():
            where = "all cells" if "all" in wheres else ", ".join(dict.fromkeys(wheres))
            lines.append(f"- skipped {provider} ({where}): {reason}")
        return "\n".join(lines)

    def machine_rows(self) -> list[dict]:
        meta = {
            "bench": self.name,
            "device_name": self.env.device_name,
            "dtype": self.env.dtype,
            "torch": self.env.torch,
            "triton": self.env.triton,
            "cuda": self.env.cuda,
            "commit": self.env.commit,
            "date": self.env.date,
            "load_avg": self.env.load_avg,
        }
        return [{**meta, **r} for r in self.rows]

    def write(self) -> list[Path]:
        if self.args.no_save:
            return []
        out_dir = Path(self.args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = unused_stem(out_dir, f"{self.name}-{self.env.slug}-{self.env.dtype}-{self.env.date}", (".csv", ".json"))
        rows = self.machine_rows()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        # "x": a file that appeared since unused_stem looked (a concurrent run) raises instead of being replaced
        with open(f"{stem}.csv", "x", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        payload = {
            "env": asdict(self.env),
            "peaks": asdict(self.peaks) if self.peaks else None,
            "argv": sys.argv[1:],
            "skipped": self.skipped,
            "rows": rows,
        }
        with open(f"{stem}.json", "x") as f:
            f.write(json.dumps(payload, indent=1, default=str))
        return [Path(f"{stem}.csv"), Path(f"{stem}.json")]

    def print_header(self) -> None:
        print(f"## {self.name}\n")
        print(self.env.header())
        if self.peaks:
            mm = ", ".join(f"{d} {fmt(v)} TFLOP/s" for d, v in self.peaks.matmul_tflops.items())
            print(f"measured peaks: copy {fmt(self.peaks.copy_gbps)} GB/s, matmul {mm}")
        print()

    def finish(self, table: str, extra_files: Sequence[Path] = ()) -> None:
        print(table if self.rows else "(no measurements: every provider was skipped, reasons below)")
        if self.skipped:
            print("\n" + self.skip_text())
        files = [*self.write(), *extra_files]
        for p in files:
            try:
                shown = p.resolve().relative_to(Path.cwd())
            except ValueError:
                shown = p
            print(f"wrote {shown}", file=sys.stderr)
        print(f"{self.name}: finished {time.monotonic() - _STARTED:.0f} s after start", file=sys.stderr, flush=True)


def write_peaks(path: Path, env: Env, peaks: Peaks) -> None:
    """The peaks JSON that --peaks reads back (`measure_peaks`): the environment and the measured peaks."""
    Path(path).write_text(json.dumps({"env": asdict(env), **asdict(peaks)}, indent=1))


def try_plot():
    """matplotlib's pyplot with the file-only backend, or None (and the reason) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"matplotlib is not installed ({exc}); pip install matplotlib"
    return plt, None


def main() -> None:
    p = argparse.ArgumentParser(description="Measure this machine's copy bandwidth and matmul peaks")
    p.add_argument("--device", choices=["cuda", "cpu"], default=default_device())
    p.add_argument("--dtypes", default=None, help="comma-separated (default: bf16,fp16,fp32 on GPU, fp32 on CPU)")
    p.add_argument("--json", type=Path, help="write the peaks here (for the benchmarks' --peaks)")
    args = p.parse_args()
    dtypes = (
        args.dtypes.split(",") if args.dtypes else (["bf16", "fp16", "fp32"] if args.device == "cuda" else ["fp32"])
    )
    env = Env.collect(args.device, ",".join(dtypes))
    peaks = measure_peaks(args.device, dtypes)
    print(env.header())
    print(f"copy bandwidth: {fmt(peaks.copy_gbps)} GB/s (read + write)")
    for d, v in peaks.matmul_tflops.items():
        print(f"matmul peak {d}: {fmt(v)} TFLOP/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_peaks(args.json, env, peaks)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
