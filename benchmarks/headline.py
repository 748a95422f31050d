"""The headline numbers of a GPU window, in one ratio table: is each kernel faster than what a user has today?

    python benchmarks/headline.py --out-dir /tmp/headline      # needs a CUDA device

Runs the existing benchmarks (their own checks, timing and files) at ViT-B/16 224, bf16:
  attention  B=256 H=12 N=197 D=64, q/k/v as views of one packed tensor, fwd and fwd+bwd:
             eager, each SDPA backend, triton, cuda                          (attn_bench)
  fused_qkv  and gelu_mlp at M = 256 x 197, C = 768, hidden 3072, fwd and fwd+bwd:
             eager cuBLAS (F.linear chain), triton, cuda                      (mlp_bench)
  ViT-B/16   inference images/s at batch 256: vit:<backend> and timm's model  (vit_bench)
then prints one Markdown table: each row's time and its speedup over the baseline of its group (eager
for the ops, vit:torch for the model) and over the best PyTorch option (the fastest SDPA backend for
attention). The three benchmarks' CSV/JSON land in --out-dir; --peaks-json saves the measured peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attn_bench  # noqa: E402
import common  # noqa: E402
import mlp_bench  # noqa: E402
import vit_bench  # noqa: E402

ATTN_SHAPE = "256,12,197,64"  # ViT-B/16 at 224: 256 images x 12 heads x 197 tokens x 64
MLP_SHAPE = "256,197,768,3072,12"  # B, N, C, hidden, heads
SDPA = tuple(attn_bench.SDPA_BACKENDS)


def run(main, argv: list[str]) -> list[dict]:
    """One benchmark's main(argv): its Markdown goes to our stdout, its rows come back from the JSON it wrote."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    print(buf.getvalue(), flush=True)
    out_dir = Path(argv[argv.index("--out-dir") + 1])
    name = main.__module__
    newest = max(out_dir.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())["rows"]


def ratio_rows(attn: list[dict], mlp: list[dict], vit: list[dict]) -> list[dict]:
    rows = []
    for mode in ("fwd", "fwd_bwd"):
        group = [r for r in attn if r["mode"] == mode]
        eager = next((r["ms"] for r in group if r["provider"] == "eager"), None)
        best_sdpa = min((r for r in group if r["provider"] in SDPA), key=lambda r: r["ms"], default=None)
        for r in group:
            rows.append({
                "what": f"attention {mode}", "provider": r["provider"], "ms": r["ms"], "rate": r["gbps"],
                "unit": "GB/s", "vs_base": eager / r["ms"] if eager else None,
                "vs_torch": best_sdpa["ms"] / r["ms"] if best_sdpa else None,
                "torch_best": best_sdpa["provider"] if best_sdpa else None, "rel_err": r.get("rel_err"),
            })  # fmt: skip
    for op in ("qkv", "mlp"):
        for mode in ("fwd", "fwd_bwd"):
            group = [r for r in mlp if r["op"] == op and r["mode"] == mode]
            eager = next((r["ms"] for r in group if r["provider"] == "eager"), None)
            name = "fused_qkv" if op == "qkv" else "gelu_mlp"
            for r in group:
                speedup = eager / r["ms"] if eager else None
                rows.append({
                    "what": f"{name} {mode}", "provider": r["provider"], "ms": r["ms"], "rate": r["tflops"],
                    "unit": "TFLOP/s", "vs_base": speedup, "vs_torch": speedup, "torch_best": "eager",
                    "rel_err": r.get("rel_err"),
                })  # fmt: skip
    base = next((r["ms"] for r in vit if r["provider"] == "vit:torch"), None)
    timm_ms = next((r["ms"] for r in vit if r["provider"] == "timm"), None)
    for r in vit:
        rows.append({
            "what": "ViT-B/16 infer", "provider": r["provider"], "ms": r["ms"], "rate": r["images_per_s"],
            "unit": "images/s", "vs_base": base / r["ms"] if base else None,
            "vs_torch": timm_ms / r["ms"] if timm_ms else None, "torch_best": "timm", "rel_err": None,
        })  # fmt: skip
    return rows


COLUMNS = [
    ("what", "what"), ("provider", "provider"), ("ms (median)", "ms"), ("rate", "rate"), ("unit", "unit"),
    ("x eager / vit:torch", "vs_base"), ("x best torch", "vs_torch"), ("best torch is", "torch_best"),
    ("rel err", "rel_err"),
]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=common.OUT_DIR, help="default benchmarks/out/ (untracked)")
    p.add_argument("--peaks-json", type=Path, help="save the measured peaks here (the later tables reuse them)")
    p.add_argument("--rep-ms", default="100", help="time budget per cell, ms")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("headline.py measures GPU speed: no CUDA device here")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shared = ["--no-progress", "--out-dir", str(args.out_dir), "--rep-ms", args.rep_ms, "--dtype", "bf16"]
    attn = run(attn_bench.main, [*shared, "--shapes", ATTN_SHAPE, "--packed", "--providers",
                                 ",".join(["eager", *SDPA, "triton", "cuda"])])  # fmt: skip
    if args.peaks_json:
        peaks = common.measure_peaks("cuda", ["bf16"])  # cached: the peaks attn_bench just measured
        common.write_peaks(args.peaks_json, common.Env.collect("cuda", "bf16"), peaks)
    mlp = run(mlp_bench.main, [*shared, "--shapes", MLP_SHAPE, "--providers", "eager,triton,cuda"])
    vit = run(vit_bench.main, [*shared, "--models", "vit_base_patch16_224", "--batch", "256", "--mode", "infer",
                               "--compile", "no", "--providers", "vit:torch,vit:triton,vit:cuda,timm"])  # fmt: skip
    print("## headline: ViT-B/16 224, bf16 (speedup = baseline ms / this ms; > 1 is faster)\n")
    print(common.markdown_table(COLUMNS, ratio_rows(attn, mlp, vit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
