"""Where the time goes, per kernel launch: one forward + backward of each op and backend at ViT-B/16 224 (B=256,
bf16) under Nsight Compute, and a digest of its CSV.

    ncu --profile-from-start off --csv --page details --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --log-file ncu.csv python benchmarks/profile_kernels.py
    python benchmarks/profile_kernels.py --digest ncu.csv

The benchmarks say how far each kernel is from the floors of issue 13; this says why, launch by launch: time,
DRAM and SM throughput (% of peak), achieved occupancy, waves per SM (wave quantization of the weight-gradient
GEMMs), registers and grid. Each case runs twice unprofiled first (Triton compiles, cuBLAS and cuDNN pick their
kernels), then once between cudaProfilerStart and cudaProfilerStop after a `torch.cuda._sleep` marker launch
(`spin_kernel`): the digest splits the profiled launches at the markers and names each group by CASES, whose
order is fixed. The inputs are attn_bench's and mlp_bench's own.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attn_bench  # noqa: E402
import common  # noqa: E402
import mlp_bench  # noqa: E402

ATTN_SHAPE = "256,12,197,64"
MLP_SHAPE = "256,197,768,3072,12"
CASES = (
    *(("attention", p) for p in ("triton", "cuda", "sdpa_cudnn", "sdpa_flash")),
    *(("qkv", p) for p in ("triton", "cuda", "views")),
    *(("mlp", p) for p in ("triton", "cuda", "eager")),
)
MARKER = "spin_kernel"  # the kernel torch.cuda._sleep launches
# (column, section metric name) of the digest; ncu names them in its "details" page
METRICS = (
    ("us", "Duration"),
    ("DRAM %", "DRAM Throughput"),
    ("SM %", "Compute (SM) Throughput"),
    ("occupancy %", "Achieved Occupancy"),
    ("waves/SM", "Waves Per SM"),
    ("regs", "Registers Per Thread"),
    ("grid", "Grid Size"),
)
# ncu writes a duration's unit as "ns" / "us" / "ms" (2025 releases; seen on the H200) or "nsecond" / "usecond" /
# "msecond" (older ones). An unknown unit is refused: reading "ns" as microseconds made every time 1000x too long.
_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def case_step(op: str, provider: str):
    """A no-argument function running one forward + backward of `op` on `provider` (bf16, CUDA)."""
    dtype = torch.bfloat16
    if op == "attention":
        shape = attn_bench.parse_shapes(ATTN_SHAPE)[0]
        sets = attn_bench.make_inputs(shape, dtype, "cuda", "fwd_bwd", packed=True, n_sets=1)
        run = attn_bench.step_fn(attn_bench.attention_fn(provider, "cuda"), sets, "fwd_bwd")
    else:
        shape = mlp_bench.parse_shapes(MLP_SHAPE)[0]
        sets = mlp_bench.make_inputs(op, shape, dtype, "cuda", "fwd_bwd", n_sets=1)
        run = mlp_bench.step_fn(mlp_bench.op_fn(op, provider, shape, "cuda"), sets, "fwd_bwd")
    return lambda: run(0)


def run_cases() -> int:
    if not torch.cuda.is_available():
        print("profile_kernels: needs a CUDA device (run under ncu on a GPU)")
        return 1
    steps = []
    for op, provider in CASES:
        reason = common.kernel_skip_reason(provider, "cuda", False) if provider in ("triton", "cuda") else None
        if reason:
            sys.exit(f"profile_kernels: {op} {provider} cannot run here: {reason}")
        step = case_step(op, provider)
        for _ in range(2):  # compiles, autotuning, cuDNN plans: outside the profiled range
            step()
        steps.append(step)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for (op, provider), step in zip(CASES, steps, strict=True):
        torch.cuda._sleep(1000)
        step()
        torch.cuda.synchronize()
        print(f"profiled {op} {provider}", flush=True)
    torch.cuda.profiler.stop()
    return 0


def read_launches(csv_path: Path) -> list[dict]:
    """ncu's --csv --page details output: one dict per launch, in launch order: id, kernel, and
    {metric name: (value, unit)}. Lines before the CSV header (ncu's own messages) are skipped."""
    lines = csv_path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f'{csv_path}: no ncu CSV header (a line starting with "ID"): not ncu --csv output?')
    launches: dict[str, dict] = {}
    for row in csv.DictReader(lines[start:]):
        launch = launches.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"], "metrics": {}})
        launch["metrics"][row["Metric Name"]] = (row["Metric Value"], row.get("Metric Unit", ""))
    return sorted(launches.values(), key=lambda launch: launch["id"])


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return None


def digest(csv_path: Path) -> str:
    """A Markdown table per case: every launch the case made, its metrics, and the case's total time."""
    launches = read_launches(csv_path)
    groups: list[list[dict]] = []
    for launch in launches:
        if MARKER in launch["kernel"]:
            groups.append([])
        elif groups:
            groups[-1].append(launch)
    if len(groups) != len(CASES):
        raise SystemExit(f"{csv_path}: {len(groups)} {MARKER} markers, expected one per case ({len(CASES)})")
    duration = dict(METRICS)["us"]
    columns = [("kernel", "kernel"), *((column, column) for column, _ in METRICS)]
    out = []
    for (op, provider), group in zip(CASES, groups, strict=True):
        rows, total = [], 0.0
        for launch in group:
            row = {"kernel": launch["kernel"][:70]}
            row.update((column, launch["metrics"].get(name, (None, ""))[0]) for column, name in METRICS)
            value, unit = launch["metrics"].get(duration, ("", ""))
            us = _number(value)
            if us is not None:
                if unit not in _TO_US:
                    name, known = launch["kernel"][:70], sorted(_TO_US)
                    raise SystemExit(f"{csv_path}: duration unit {unit!r} of {name} is not one of {known}")
                us *= _TO_US[unit]
                total += us
                row["us"] = f"{us:.1f}"
            rows.append(row)
        out.append(f"### {op} {provider}: {len(group)} launches, {total:.0f} us of kernel time (fwd + bwd)\n")
        out += [common.markdown_table(columns, rows), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digest", type=Path, help="summarise this ncu CSV instead of running the cases")
    args = parser.parse_args(argv)
    if args.digest:
        print(digest(args.digest))
        return 0
    return run_cases()


if __name__ == "__main__":
    sys.exit(main())
