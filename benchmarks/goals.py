"""The Hopper GEMM issues' goals, read off one gpu_check run: each measured ratio beside its goal, met or missed.

    python benchmarks/goals.py gpu_check-nvidia-h200-2026-12-04.tar.gz    # or the folder it was unpacked into

Reads what the GPU stages wrote: gemm_ab's log (probe_gemm.py's tables: each GEMM product on the new kernels
against cuBLAS, per backend) and the JSON of mlp_tables, block_tables and vit_tables. Prints one Markdown table
for the closing note; a goal whose rows are missing (a stage that did not run, a provider that was skipped) says so
instead of a ratio. Ratios are time(baseline) / time(ours): above 1 is faster. A second table applies the rules
NOTES wrote before the run: each config variant against the shipped config (switch only if faster at every
product it would change, by 3% at one), and the sm_90a d-GELU epilogue against its separate passes.

The goals (ViT-B/16 224, B = 256, bf16):
  each GEMM            >= 0.95x cuBLAS, >= 1.0x where K = 768 (the new kernels: triton's TMA, cuda's sm_90a)
  gelu_mlp fwd+bwd     >= 1.15x eager        fused_qkv fwd+bwd  >= 1.1x eager
  block fwd            >= 1.25x eager        block fwd+bwd      >= 1.15x eager
  ViT-B/16 with auto   >= 1.15x timm, training and inference
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path

GEMM_GOAL, GEMM_GOAL_K768 = 0.95, 1.0
# K of each product of probe_gemm's triton table (C = 768, hidden = 3072, 3C = 2304; a weight gradient's K is the
# token count, "M").
TRITON_K = {
    "qkv_fwd": "768", "qkv_fwd_packed": "768", "proj": "768", "fc1_gelu": "768", "fc2": "3072",
    "dhidden_dgelu": "768", "mlp_dx": "3072", "qkv_dx": "2304", "mlp_dw1": "M", "mlp_dw2": "M", "qkv_dw": "M",
}  # fmt: skip
# K of the cuda table's kernels: (launcher, the product label's first word) -> K.
CUDA_K = {
    ("qkv_fwd", "QKV"): "768", ("qkv_fwd packed", "QKV"): "768", ("linear_fwd", "proj"): "768",
    ("mlp_fwd", "fc1"): "768", ("mlp_fwd", "fc2"): "3072", ("mlp_fwd without hidden", "fc1"): "768",
    ("mlp_fwd without hidden", "fc2"): "3072", ("mlp_bwd", "dhidden"): "768", ("mlp_bwd", "dX"): "3072",
    ("mlp_bwd", "dW2"): "M", ("mlp_bwd", "dW1"): "M", ("linear_bwd", "dX"): "768", ("linear_bwd", "dW"): "M",
    ("qkv_bwd", "dX"): "2304", ("qkv_bwd", "dW"): "M",
}  # fmt: skip
# The tma_gemm epilogue each product of probe_gemm's triton table runs: a config variant is chosen per epilogue.
TRITON_EPILOGUE = {
    "qkv_fwd": "qkv", "qkv_fwd_packed": "store", "proj": "store", "fc1_gelu": "gelu", "fc2": "store",
    "dhidden_dgelu": "dgelu", "mlp_dx": "store", "qkv_dx": "store", "mlp_dw1": "partial", "mlp_dw2": "partial",
    "qkv_dw": "partial",
}  # fmt: skip
VARIANT_GAIN = 1.03  # benchmarks/NOTES.md's rule: a variant replaces the shipped config only if faster at every
# product it would change, and by at least 3% at one
# The sm_90a mlp_bwd A / B (NOTES, "act and dfc1_bias from the sm_90a d-GELU epilogue"): probe_gemm times the
# shipped way as "mlp_bwd" and the other as "mlp_bwd (...)". way -> (what one of its product labels holds, which
# tells its launcher: the d-GELU product writing "+ act", or act's row pass; the starts of the labels of the
# kernels it runs in place of the other, summed).
DGELU_EPILOGUE_WAYS = {
    "epilogue": ("+ act", ("dhidden = ", "dfc1_bias: sum of the partial sums")),
    "separate passes": ("act = gelu(hidden): row pass",
                        ("dhidden = ", "act = gelu(hidden): row pass", "dfc1_bias colsum")),
}  # fmt: skip
OP_GOALS = (  # (bench, op or None, provider baseline, mode, goal, what)
    ("mlp_bench", "mlp", "eager", "fwd_bwd", 1.15, "gelu_mlp fwd+bwd"),
    ("mlp_bench", "qkv", "eager", "fwd_bwd", 1.10, "fused_qkv fwd+bwd"),
    ("block_bench", None, "eager", "fwd", 1.25, "block fwd"),
    ("block_bench", None, "eager", "fwd_bwd", 1.15, "block fwd+bwd"),
)
OURS = {"mlp_bench": ("triton", "cuda"), "block_bench": ("fused", "fused_cuda")}
VIT_GOAL = 1.15


def markdown_tables(text: str) -> dict[str, list[dict]]:
    """Each Markdown table of `text` as rows keyed by header, under the `## ` heading it follows."""
    tables: dict[str, list[dict]] = {}
    headers: dict[str, list[str]] = {}  # heading -> the header of its last table
    heading, lines = "", []

    def cells_of(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    def flush():
        # rows without a header of their own continue the heading's last table: a warning on stderr, in the same
        # log, can fall between two rows
        if len(lines) >= 2 and set(lines[1].replace("|", "").strip()) <= set("-: "):
            headers[heading], rows = cells_of(lines[0]), lines[2:]
        else:
            rows = lines if heading in headers else []
        for line in rows:  # a short row (a FAILED one) keeps the cells it has
            tables.setdefault(heading, []).append(dict(zip(headers[heading], cells_of(line), strict=False)))
        lines.clear()

    for line in text.splitlines():
        if line.startswith("## "):
            flush()
            heading = line[3:].strip()
        elif line.startswith("|"):
            lines.append(line)
        else:
            flush()
    flush()
    return tables


def number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "", "n/a") else None
    except ValueError:
        return None


def verdict(ratio: float | None, goal: float) -> str:
    if ratio is None:
        return "not measured"
    return "met" if ratio >= goal else f"missed by {100 * (goal - ratio) / goal:.0f}%"


def gemm_rows(log: str) -> list[tuple[str, str, str, float | None, float]]:
    """(backend, product, K, x cuBLAS, goal) for every product on the new kernels in probe_gemm's log."""
    out = []
    for heading, rows in markdown_tables(log).items():
        if heading.startswith("probe_gemm"):
            # the tma rows say "n/a" against cuBLAS (its row is under the same product): the ratio is taken here
            cublas = {r["product"]: number(r.get("ms (median)")) for r in rows if r.get("way") == "cublas"}
            for r in rows:
                if r.get("way") == "tma":
                    k = TRITON_K.get(r["product"], "?")
                    ratio = number(r.get("x cuBLAS"))
                    ms, base = number(r.get("ms (median)")), cublas.get(r["product"])
                    if ratio is None and ms and base:
                        ratio = base / ms
                    out.append(("triton", r["product"], k, ratio, goal_for(k)))
        elif heading.startswith("cuda: mma.sync"):
            for r in rows:
                ratio = number(r.get("x cuBLAS"))
                if r.get("path") != "sm_90a" or ratio is None:
                    continue
                launcher = r["launcher"].split(" (")[0]  # "mlp_bwd (...)": the A / B runs mlp_bwd's GEMMs
                k = CUDA_K.get((launcher, r["product"].split()[0]), "?")
                out.append(("cuda", f"{r['launcher']}: {r['product']}", k, ratio, goal_for(k)))
    return out


def shown(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "n/a"


def goal_for(k: str) -> float:
    return GEMM_GOAL_K768 if k == "768" else GEMM_GOAL


def bench_rows(folder: Path, bench: str) -> list[dict]:
    """The rows of every `<bench>-*.json` under folder (the GPU's only: CPU results are not the goals')."""
    rows = []
    for path in sorted(folder.rglob(f"{bench}-*.json")):
        data = json.loads(path.read_text())
        if data.get("env", {}).get("device", "cuda") == "cuda":
            rows += data.get("rows", [])
    return rows


def ratio_of(rows: list[dict], baseline: str, ours: str, **match) -> float | None:
    """time(baseline) / time(ours) over the rows equal on `match`; None if either is missing."""
    ms = {r["provider"]: r["ms"] for r in rows if all(r.get(k) == v for k, v in match.items())}
    return ms[baseline] / ms[ours] if ms.get(baseline) and ms.get(ours) else None


def goal_table(folder: Path) -> list[tuple[str, str, str, str, str]]:
    """(goal, what, measured, target, verdict) rows."""
    table = []
    log = folder / "gemm_ab.log"
    gemms = gemm_rows(log.read_text()) if log.is_file() else []
    if not gemms:
        table.append(("each GEMM vs cuBLAS", "gemm_ab", "no rows (did the stage run?)", "0.95x / 1.0x", "not measured"))
    for backend, product, k, ratio, goal in gemms:
        table.append(
            (f"GEMM vs cuBLAS, K = {k}", f"{backend} {product}", shown(ratio), f"{goal:.2f}x", verdict(ratio, goal))
        )
    for bench, op, baseline, mode, goal, what in OP_GOALS:
        rows = [r for r in bench_rows(folder, bench) if (op is None or r.get("op") == op) and r.get("C") == 768]
        for ours in OURS[bench]:
            ratio = ratio_of(rows, baseline, ours, mode=mode)
            table.append((f"{what} vs {baseline}", ours, shown(ratio), f"{goal:.2f}x", verdict(ratio, goal)))
    vit = [r for r in bench_rows(folder, "vit_bench") if r.get("model") == "vit_base_patch16_224"]
    for mode in ("train", "infer"):
        for ours in ("vit:auto", "vit:triton", "vit:cuda"):
            ratio = ratio_of(vit, "timm", ours, mode=mode)
            goal_name = f"ViT-B/16 {mode} vs timm" + ("" if ours == "vit:auto" else " (per backend)")
            table.append((goal_name, ours, shown(ratio), f"{VIT_GOAL:.2f}x", verdict(ratio, VIT_GOAL)))
        compiled = ratio_of(vit, "timm+compile", "vit:auto", mode=mode)
        table.append((f"ViT-B/16 {mode} vs timm + torch.compile", "vit:auto", shown(compiled), "(no goal)", ""))
    return table


def switch_verdict(speedups: dict[str, float | None]) -> str:
    """The variant rule on a variant's speed-up over the shipped config at each product it would change."""
    missing = [p for p, x in speedups.items() if x is None]
    if missing:
        return f"keep shipped: not measured or not correct at {', '.join(missing)}"
    slower = [p for p, x in speedups.items() if x <= 1.0]
    if slower:
        return f"keep shipped: not faster at {', '.join(slower)}"
    if max(speedups.values()) < VARIANT_GAIN:
        return f"keep shipped: under {100 * (VARIANT_GAIN - 1):.0f}% faster everywhere"
    return "switch"


def variant_rows(log: str) -> list[tuple[str, str, str, str]]:
    """(backend, variant, its speed-up at each product as text, verdict) for every config variant in probe_gemm's
    log: triton's per epilogue (the "tma <label>" rows against "tma"), cuda's linear_bias variants against the
    shipped configuration."""
    out = []
    for heading, rows in markdown_tables(log).items():
        if heading.startswith("probe_gemm"):
            ms = {(r["product"], r.get("way", "")): number(r.get("ms (median)")) for r in rows if "product" in r}
            labels = sorted({way for _, way in ms if way.startswith("tma ")})
            for label in labels:
                for epilogue in sorted({TRITON_EPILOGUE.get(p, "?") for p, way in ms if way == label}):
                    speedups = {}
                    for product in [p for p, e in TRITON_EPILOGUE.items() if e == epilogue and (p, "tma") in ms]:
                        shipped, variant = ms.get((product, "tma")), ms.get((product, label))
                        speedups[product] = shipped / variant if shipped and variant else None
                    name = f"{label[4:]} ({epilogue} epilogue)"
                    out.append(("triton", name, _speedups_text(speedups), switch_verdict(speedups)))
        elif heading.startswith("cuda: linear_bias configuration variants"):
            ms = {(r["product"], r.get("kernel", "")): number(r.get("ms (median)")) for r in rows if "product" in r}
            products = list(dict.fromkeys(p for p, _ in ms))
            shipped = {p: t for (p, k), t in ms.items() if k.startswith("shipped")}
            for variant in dict.fromkeys(k for _, k in ms if not k.startswith("shipped")):
                speedups = {
                    p: shipped[p] / ms[(p, variant)] if shipped.get(p) and ms.get((p, variant)) else None
                    for p in products
                }
                out.append(("cuda", f"linear_bias {variant}", _speedups_text(speedups), switch_verdict(speedups)))
    return out


def _speedups_text(speedups: dict[str, float | None]) -> str:
    return ", ".join(f"{p} {shown(x)}" for p, x in speedups.items())


def dgelu_epilogue_rule(log: str) -> tuple[str, str] | None:
    """(measured, verdict) of the d-GELU epilogue rule from probe_gemm's cuda table: the kernels each way of the
    sm_90a mlp_bwd runs in place of the other, summed; None if the table is not there."""
    totals = {}
    for heading, rows in markdown_tables(log).items():
        if not heading.startswith("cuda: mma.sync"):
            continue
        sm90 = [r for r in rows if r.get("path") == "sm_90a" and r.get("launcher", "").startswith("mlp_bwd")]
        for way, (mark, starts) in DGELU_EPILOGUE_WAYS.items():
            launchers = {r["launcher"] for r in sm90 if mark in r.get("product", "")}
            times = [number(r.get("ms (median)")) for r in sm90
                     if r["launcher"] in launchers and r.get("product", "").startswith(starts)]  # fmt: skip
            totals[way] = sum(times) if len(launchers) == 1 and times and None not in times else None
    if not totals:
        return None
    new, old = totals.get("epilogue"), totals.get("separate passes")
    measured = f"epilogue {_ms(new)} ms, separate passes {_ms(old)} ms"
    if new is None or old is None:
        return measured, "not measured: leave the switches as they are until it is"
    if new <= old:
        return measured, f"both switches on: the epilogue is {old / new:.2f}x faster"
    slower = f"{100 * (new / old - 1):.0f}% slower"
    return measured, f"SM90_ACT_IN_EPILOGUE and SM90_DFC1_BIAS_IN_EPILOGUE off: the epilogue is {slower}"


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="gpu_check's .tar.gz, or the folder holding its <stage>.log and results/")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.run
        if args.run.is_file():
            with tarfile.open(args.run) as tar:
                tar.extractall(tmp, filter="data")
            folder = Path(tmp)
        rows = goal_table(folder)
        log = folder / "gemm_ab.log"
        log_text = log.read_text() if log.is_file() else ""
    print_table(("goal", "what", "measured", "target", "verdict"), rows)
    rules = [("variant", f"{backend} {variant}", measured, verdict)
             for backend, variant, measured, verdict in variant_rows(log_text)]  # fmt: skip
    dgelu = dgelu_epilogue_rule(log_text)
    if dgelu is not None:
        rules.append(("d-GELU epilogue", "cuda sm_90a mlp_bwd", *dgelu))
    print("\n## The rules written before the run (benchmarks/NOTES.md)\n")
    print_table(
        ("rule", "what", "measured (x shipped)", "verdict"),
        rules or [("all", "gemm_ab", "no variant or A / B rows (did the stage run with --variants?)", "")],
    )
    return 0


def print_table(header: tuple[str, ...], rows) -> None:
    """A Markdown table, each cell on one line."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(re.sub(r"\s+", " ", c) for c in row) + " |")


if __name__ == "__main__":
    sys.exit(main())
