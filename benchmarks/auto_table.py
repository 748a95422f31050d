"""Propose the entries of `auto`'s measured table from GPU benchmark results.

    python benchmarks/auto_table.py benchmarks/results/attn_bench-nvidia-h100-*.json \\
        benchmarks/results/mlp_bench-nvidia-h100-*.json benchmarks/results/block_bench-nvidia-h100-*.json \\
        --out proposed_backends.json
    python benchmarks/auto_table.py RESULTS_JSON... --out vit_kernels/measured_backends.json --arch sm_90

Reads the JSON files that attn_bench.py, mlp_bench.py and block_bench.py write (`env` + `rows`, see common.Report.write)
and writes a table in the format of vit_kernels/measured_backends.json (keys: dispatch.TableKey). A cell
of the table is (arch, op, dtype, head dim D or channel bucket, sequence-length or row bucket, and for attention
the B * H bucket); a kernel
backend (triton, cuda) goes in for a cell only if, in EVERY measured row of that cell (each shape, mode and
layout), it passed parity (rel err finite and within common.TOLERANCE) and its median time beat what
`torch` runs there:
  attention  the fastest of the SDPA backends measured (sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math)
  fused_qkv  `views`  (vit_kernels.torch_backend.fused_qkv)
  gelu_mlp   `eager`  (vit_kernels.torch_backend.gelu_mlp)
  block      `eager`  (block_bench: the block on backend "torch", which is what `auto` runs without an entry); the
             kernels are block_bench's fused providers, `fused` (triton) and `fused_cuda` (cuda). A block cell
             (C bucket, B*N bucket) that one of them wins becomes three entries for its backend, one per
             dispatch.BLOCK_OPS, so the ViT block on `auto` fuses there
             (vit_kernels.ops.pre_ln_block.fuses_block needs all three). torch.compile is not something `auto` can
             pick, so the `compile` rows are not a baseline; the `unfused` and `unfused_cuda` rows are not one
             backend of the block ops and are ignored.
Where both kernel backends qualify, the one with the smaller total time wins. Every other cell stays out,
so `auto` runs `torch` there. Stdout lists each cell's decision and why. CPU results and other benchmarks'
rows are ignored (and said so).

The arch comes from the results' `env.capability` when present, else from the GPU's name (H100/H200 ->
sm_90, A100 -> sm_80), else from --arch. fp32 rows are exact fp32 (the benchmarks run at PyTorch's default
matmul precision, "highest") unless a row or env says `float32_matmul_precision` is "high"/"medium" (tf32).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attn_bench  # noqa: E402
import common  # noqa: E402

from vit_kernels import dispatch  # noqa: E402

KERNEL_BACKENDS = ("triton", "cuda")
SDPA_PROVIDERS = tuple(attn_bench.SDPA_BACKENDS)
# Known GPU names -> arch, for results written before the benchmarks recorded the capability.
ARCH_BY_NAME = (
    ("GH200", "sm_90"),
    ("H200", "sm_90"),
    ("H100", "sm_90"),
    ("H800", "sm_90"),
    ("A100", "sm_80"),
    ("A800", "sm_80"),
)
# Row fields that describe one measured case (everything but the provider and its measurements).
CASE_FIELDS = ("model", "B", "H", "N", "D", "M", "C", "hidden", "heads", "mode", "layout")
# block_bench providers under the backend name they measure (its `unfused` and `unfused_cuda` are not one backend of
# the block ops: they run the unfused ops, which have their own entries).
BLOCK_PROVIDERS = {"fused": "triton", "fused_cuda": "cuda", "eager": "eager"}


def arch_of(env: dict, override: str | None) -> str:
    if override:
        return override
    capability = str(env.get("capability") or "")
    if re.fullmatch(r"sm_\d+", capability):  # as common.Env writes it
        return capability
    if capability:  # "9.0"
        major, minor = (int(x) for x in capability.replace("sm_", "").replace(",", ".").split(".")[:2])
        return f"sm_{major}{minor}"
    name = env.get("device_name", "")
    for marker, arch in ARCH_BY_NAME:
        if marker in name:
            return arch
    raise SystemExit(f"cannot tell the compute capability of {name!r} from the results; pass --arch sm_XY")


def dtype_of(row: dict, env: dict) -> str:
    dtype = row.get("dtype") or env["dtype"]
    precision = row.get("float32_matmul_precision") or env.get("float32_matmul_precision") or "highest"
    return "tf32" if dtype == "fp32" and precision != "highest" else dtype


def cell_of(row: dict, arch: str, dtype: str) -> tuple[dispatch.TableKey, str] | None:
    """(table key, baseline provider family) of one benchmark row, or None for rows of other benchmarks (and
    block_bench's `compile`, `unfused` and `unfused_cuda` rows)."""
    bench, op = row.get("bench"), row.get("op")
    if bench == "attn_bench":
        batch = dispatch.bucket(int(row["B"]) * int(row["H"]))
        return dispatch.TableKey(arch, "attention", dtype, int(row["D"]), dispatch.bucket(int(row["N"])), batch), "sdpa"
    if bench == "mlp_bench" and op in ("qkv", "mlp"):
        name, baseline = ("fused_qkv", "views") if op == "qkv" else ("gelu_mlp", "eager")
        key = dispatch.TableKey(arch, name, dtype, dispatch.bucket(int(row["C"])), dispatch.bucket(int(row["M"])))
        return key, baseline
    if bench == "block_bench" and row.get("provider") in BLOCK_PROVIDERS:
        tokens = int(row["B"]) * int(row["N"])
        key = dispatch.TableKey(arch, "block", dtype, dispatch.bucket(int(row["C"])), dispatch.bucket(tokens))
        return key, "eager"
    return None


def passed(row: dict, dtype: str) -> bool:
    err = row.get("rel_err")
    tolerance = common.TOLERANCE["fp32" if dtype == "tf32" else dtype]
    return isinstance(err, (int, float)) and math.isfinite(err) and err <= tolerance


def propose(paths: list[Path], arch_override: str | None = None) -> tuple[list[dict], list[str]]:
    """(table entries, one line per cell saying what was decided and why)."""
    # cell -> case -> provider -> row
    cells: dict[dispatch.TableKey, dict[tuple, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    baselines: dict[dispatch.TableKey, str] = {}
    sources: dict[dispatch.TableKey, set[str]] = defaultdict(set)
    devices: dict[dispatch.TableKey, str] = {}
    notes = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        env = data["env"]
        if env.get("device") != "cuda":
            notes.append(f"{path}: skipped, measured on {env.get('device')} ({env.get('device_name')}), not a GPU")
            continue
        arch = arch_of(env, arch_override)
        ignored = 0
        for row in data["rows"]:
            dtype = dtype_of(row, env)
            found = cell_of(row, arch, dtype)
            if found is None:
                ignored += 1
                continue
            key, baseline = found
            baselines[key] = baseline
            case = tuple(row.get(f) for f in CASE_FIELDS)
            provider = BLOCK_PROVIDERS[row["provider"]] if key.op == "block" else row["provider"]
            cells[key][case][provider] = row
            sources[key].add(f"{Path(path).name} @ {row.get('commit') or env.get('commit')}")
            devices[key] = row.get("device_name") or env.get("device_name")
        if ignored:
            notes.append(f"{path}: {ignored} rows of other benchmarks or providers ignored")

    entries = []
    for key in sorted(cells):
        cases = cells[key]
        verdicts = {}
        for backend in KERNEL_BACKENDS:
            verdicts[backend] = _verdict(backend, cases, baselines[key], key.dtype)
        winners = [(total, b) for b, (total, _) in verdicts.items() if total is not None]
        if not winners:
            why = "; ".join(f"{b}: {reason}" for b, (_, reason) in verdicts.items())
            notes.append(f"{key}: torch (no entry): {why}")
            continue
        total, backend = min(winners)
        _, evidence = verdicts[backend]
        evidence = f"{devices[key]}: {evidence}; {', '.join(sorted(sources[key]))}"
        ops = dispatch.BLOCK_OPS if key.op == "block" else (key.op,)
        sizes = {"dim": key.dim, "tokens": key.tokens, **({"batch": key.batch} if key.op == "attention" else {})}
        entries += [
            {"arch": key.arch, "op": op, "dtype": key.dtype, **sizes, "backend": backend, "evidence": evidence}
            for op in ops
        ]
        notes.append(f"{key}: {backend}{' for ' + ', '.join(ops) if key.op == 'block' else ''} ({evidence})")
    return entries, notes


def _verdict(backend: str, cases: dict[tuple, dict[str, dict]], baseline: str, dtype: str):
    """(total median ms over the cell's cases, evidence) if `backend` passed and beat torch in every case,
    else (None, why not)."""
    total, speedups, errors = 0.0, [], []
    for case, rows in cases.items():
        where = ", ".join(f"{f}={v}" for f, v in zip(CASE_FIELDS, case, strict=True) if v is not None)
        row = rows.get(backend)
        if row is None:
            return None, f"not measured at {where}"
        if not passed(row, dtype):
            return None, f"failed parity at {where} (rel err {row.get('rel_err')})"
        if baseline == "sdpa":
            torch_rows = [rows[p] for p in SDPA_PROVIDERS if p in rows]
        else:
            torch_rows = [rows[baseline]] if baseline in rows else []
        if not torch_rows:
            return None, f"no torch baseline measured at {where}"
        torch_ms = min(r["ms"] for r in torch_rows)
        if not row["ms"] < torch_ms:
            return None, f"slower than torch at {where} ({row['ms']:.4g} ms vs {torch_ms:.4g} ms)"
        total += row["ms"]
        speedups.append(torch_ms / row["ms"])
        errors.append(row["rel_err"])
    evidence = (
        f"{len(cases)} cases, {min(speedups):.2f}-{max(speedups):.2f}x faster than torch, max rel err {max(errors):.1e}"
    )
    return total, evidence


def committed_about() -> str:
    """The committed table's "about" text, or a default: this script is how a broken committed table gets
    rewritten, so it must not depend on reading it."""
    try:
        about = json.loads(dispatch.MEASURED_TABLE.read_text())["about"]
    except (OSError, ValueError, KeyError, TypeError):
        about = None
    default = "What backend='auto' runs on CUDA (see vit_kernels/dispatch.py TableKey)."
    return about if isinstance(about, str) else default


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "results", nargs="+", type=Path, help="benchmark result JSON files (attn_bench, mlp_bench, block_bench)"
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the proposed table (JSON)")
    p.add_argument("--arch", help="sm_XY of the GPU that produced the results, when they do not say")
    args = p.parse_args(argv)
    entries, notes = propose(args.results, args.arch)
    table = {"about": committed_about(), "entries": entries}
    dispatch.parse_table(table, str(args.out))  # what we write must load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print("\n".join(f"- {n}" for n in notes))
    print(f"wrote {args.out}: {len(entries)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
