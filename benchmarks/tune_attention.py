"""Offline tuning of the Triton attention launch table: which (tile, warps, stages) is fastest per ViT shape.

    python benchmarks/tune_attention.py                     # on a GPU: compile, check and time every candidate
    python benchmarks/tune_attention.py --static-only       # any machine: registers / spills / smem per candidate
    python benchmarks/tune_attention.py --shapes "128,12,197,64;64,16,257,80" --dtype fp16
    python benchmarks/tune_attention.py --static-only --dtype fp32 --fp32-precision ieee   # or tf32

The kernels ship a fixed table (`fwd_config` / `bwd_config` in vit_kernels/triton/attention.py) so that no
call pays for autotuning. This script is how that table is chosen: it compiles each candidate for the
target GPU (dropping those that spill or do not fit in shared memory), then, on a GPU, runs each survivor
on the shape, checks its output against the float64 reference before timing it, and times it (median of
event-timed runs over rotating inputs). The table at the end gives, per shape and pass, the shipped
config's time and the fastest candidate's: a ratio above ~1.05 is a reason to change the table (and to
commit this run's files with the change: run it with --out-dir benchmarks/results, the default being the
untracked benchmarks/out/).

Without a GPU it runs the static step for sm_90 (or --arch) and says timing was skipped. With
--interpret (tests only) the timing step runs under the Triton interpreter on CPU: the numbers mean
nothing, the code path is exercised.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The Triton interpreter must be switched on before the kernel module is imported.
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attn_bench  # noqa: E402
import common  # noqa: E402

from vit_kernels import dispatch, reference  # noqa: E402
from vit_kernels import triton as vit_triton  # noqa: E402
from vit_kernels.triton import attention as triton_attention  # noqa: E402

# Forward (BLOCK_M query rows held, BLOCK_N keys streamed, num_warps, num_stages). The small 8-warp tiles are
# for exact fp32 ("ieee"), whose FMA dots hold whole operand rows per thread.
FWD_CANDIDATES = (
    (32, 32, 8, 2),
    (64, 32, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
    (128, 32, 4, 3),
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
)
# Backward (rows streamed, rows held, num_warps, num_stages): dK/dV holds keys and streams queries, dQ the reverse.
BWD_CANDIDATES = (
    (16, 32, 8, 2),
    (32, 32, 4, 2),
    (32, 32, 8, 2),
    (32, 64, 4, 1),
    (32, 64, 4, 2),
    (32, 64, 8, 2),
    (64, 64, 4, 2),
    (64, 64, 8, 2),
    (32, 128, 8, 2),
    (64, 128, 8, 1),
)
# Shared memory one block may use: sm_80 163 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def shipped(N: int, D: int, dtype: torch.dtype, allow_tf32: bool, arch: int) -> tuple[tuple, tuple]:
    """The table's (fwd, bwd) configs for sm_<arch> (0: the interpreter's)."""
    block_d = 1 << (D - 1).bit_length()
    precision = vit_triton.input_precision(dtype, allow_tf32)
    return (
        triton_attention.fwd_config(N, block_d, dtype, precision, arch),
        triton_attention.bwd_config(N, block_d, dtype, precision, arch),
    )


def candidates(pass_: str, N: int, D: int, dtype: torch.dtype, allow_tf32: bool, arch: int) -> list[tuple]:
    """The candidate list, the shipped config first (timed even if it were not in the list)."""
    mine = shipped(N, D, dtype, allow_tf32, arch)[0 if pass_ == "fwd" else 1]
    pool = FWD_CANDIDATES if pass_ == "fwd" else BWD_CANDIDATES
    return [mine, *(c for c in pool if c != mine)]


# ----------------------------------------------------------------------------------------------------
# static step: compile for the target, drop what spills or does not fit
# ----------------------------------------------------------------------------------------------------
def static_rows(arch: int, shapes, dtype: torch.dtype, allow_tf32: bool, bar) -> dict[tuple, dict]:
    """(pass, D, config) -> {regs, spills, smem, ok, why}: the worst kernel of the pass (dK/dV or dQ for bwd)."""
    out: dict[tuple, dict] = {}
    for shape in shapes:
        for pass_ in ("fwd", "bwd"):
            for cfg in candidates(pass_, shape.N, shape.D, dtype, allow_tf32, arch):
                key = (pass_, shape.D, cfg)
                if key in out:
                    bar.update(1)
                    continue
                try:
                    kw = {"fwd": cfg} if pass_ == "fwd" else {"bwd": cfg}
                    rows = triton_attention.compile_config(arch, dtype, shape.D, allow_tf32=allow_tf32, **kw)
                    rows = [r for r in rows if "preprocess" not in r["kernel"]]
                except Exception as exc:  # a config Triton cannot compile is a finding, not a crash
                    out[key] = {"ok": False, "why": common.short_reason(exc)}
                    bar.update(1)
                    continue
                regs = max(r["n_regs"] for r in rows)
                spills = sum(r["n_spills"] for r in rows)
                smem = max(r["shared"] for r in rows)
                why = "spills" if spills else ("shared memory over the limit" if smem > SMEM_LIMIT[arch] else "")
                out[key] = {"regs": regs, "spills": spills, "smem": smem, "ok": not why, "why": why}
                bar.update(1)
    return out


# ----------------------------------------------------------------------------------------------------
# timing step
# ----------------------------------------------------------------------------------------------------
def _inputs(B, H, N, D, dtype, device, n_sets):
    sets = []
    for _ in range(n_sets):
        q, k, v, dout = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))
        sets.append((q, k, v, dout))
    return sets


def time_shape(shape, dtype: torch.dtype, args, static, report, bar):
    B, H, N, D = shape.B, shape.H, shape.N, shape.D
    tf32 = args.allow_tf32
    scale = D**-0.5
    n_sets = common.n_input_sets(4 * B * H * N * D * dtype.itemsize, args.device)
    sets = _inputs(B, H, N, D, dtype, args.device, n_sets)
    q0, k0, v0, dout0 = (t[:1] for t in sets[0])  # the check runs on one batch element: float64 is slow
    ref_out = reference.attention(q0.double(), k0.double(), v0.double(), scale)
    leaves = [t.double().requires_grad_() for t in (q0, k0, v0)]
    reference.attention(*leaves, scale).backward(dout0.double())
    ref_grads = [t.grad for t in leaves]
    saved = [triton_attention.attention_fwd(q, k, v, scale, tf32) for q, k, v, _ in sets]

    def error(pass_: str, cfg: tuple) -> float:
        if pass_ == "fwd":
            out, _ = triton_attention.attention_fwd(q0, k0, v0, scale, tf32, config=cfg)
            return common.rel_error(out, ref_out)
        out, lse = triton_attention.attention_fwd(q0, k0, v0, scale, tf32)
        grads = triton_attention.attention_bwd(dout0, q0, k0, v0, out, lse, scale, tf32, config=cfg)
        return max(common.rel_error(g, r) for g, r in zip(grads, ref_grads, strict=True))

    def step(pass_: str, cfg: tuple):
        def fwd(j):
            q, k, v, _ = sets[j]
            triton_attention.attention_fwd(q, k, v, scale, tf32, config=cfg)

        def bwd(j):
            q, k, v, dout = sets[j]
            out, lse = saved[j]
            triton_attention.attention_bwd(dout, q, k, v, out, lse, scale, tf32, config=cfg)

        return fwd if pass_ == "fwd" else bwd

    def prepare(pass_: str, cfg: tuple):
        try:
            err = error(pass_, cfg)
        except Exception as exc:  # e.g. Triton's OutOfResources: the config does not fit this GPU
            raise common.Skip(common.short_reason(exc)) from None
        if not err <= common.TOLERANCE[args.dtype]:  # NaN fails too
            raise common.Skip(f"wrong result: rel err {err:.2e}")
        return step(pass_, cfg), n_sets, err

    for pass_ in ("fwd", "bwd"):
        flops = common.attention_flops(B, H, N, D, pass_)
        nbytes = common.attention_bytes(B, H, N, D, dtype.itemsize, pass_)
        for i, cfg in enumerate(candidates(pass_, N, D, dtype, tf32, args.table_arch)):
            bar.update(1)
            info = static.get((pass_, D, cfg), {"ok": True, "why": ""})
            row = {"shape": f"{shape.model} {B}x{H}x{N}x{D}", "pass": pass_, "config": "/".join(map(str, cfg)),
                   "shipped": "yes" if i == 0 else "", "regs": info.get("regs"), "smem": info.get("smem")}  # fmt: skip
            if not info["ok"]:
                report.skip(f"{pass_} {row['config']}", info["why"], row["shape"])
                continue
            cell = common.run_cell(
                report, f"{pass_} {row['config']}", row["shape"], args, lambda p=pass_, c=cfg: prepare(p, c)
            )
            if cell is None:
                continue
            ms = cell.timing.median_ms
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, gbps=nbytes / (ms * 1e-3) / 1e9, rel_err=cell.err)
            report.add(row)
            # as it goes, so that a run killed at its time limit still tells what it timed
            print(
                f"timed: {row['shape']} {pass_} {row['config']}{' (shipped)' if i == 0 else ''}: {ms:.4f} ms, "
                f"rel err {cell.err:.2e}",
                file=sys.stderr,
                flush=True,
            )


def summary(rows: list[dict]) -> list[dict]:
    """Per (shape, pass): the shipped config's time, the fastest candidate and the speedup it would bring."""
    out = []
    for key in dict.fromkeys((r["shape"], r["pass"]) for r in rows):
        group = [r for r in rows if (r["shape"], r["pass"]) == key]
        best = min(group, key=lambda r: r["ms"])
        mine = next((r for r in group if r["shipped"]), None)
        out.append({"shape": key[0], "pass": key[1], "shipped": mine["config"] if mine else "(failed)",
                    "shipped_ms": mine["ms"] if mine else None, "best": best["config"], "best_ms": best["ms"],
                    "gain": mine["ms"] / best["ms"] if mine else None})  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--shapes", help="B,H,N,D;... (default: attn_bench's GPU ViT shapes)")
    p.add_argument("--arch", type=int, choices=[80, 90], help="compile target (default: this GPU's, else 90)")
    p.add_argument("--static-only", action="store_true", help="compile and report; time nothing")
    p.add_argument(
        "--no-static",
        action="store_true",
        help="skip the static step (it compiles every candidate one after another: most of a short GPU window); "
        "spilling candidates are then timed too",
    )
    p.add_argument("--interpret", action="store_true", help="time under the Triton interpreter on CPU (tests only)")
    p.add_argument(
        "--fp32-precision",
        choices=["ieee", "tf32"],
        help="fp32's dots: exact 'ieee' or 'tf32' tensor cores (default: what the ops pick from "
        "torch.get_float32_matmul_precision(): ieee under PyTorch's default 'highest')",
    )
    args = p.parse_args(argv)
    if args.dtype is None and not args.interpret:
        args.dtype = "bf16"  # what ViTs train and serve in; the static step needs no GPU to judge it
    common.resolve_common_args(args)
    dtype = common.DTYPES[args.dtype]
    if args.fp32_precision is None:
        args.fp32_precision = "tf32" if dispatch.allow_tf32() else "ieee"
    args.allow_tf32 = args.fp32_precision == "tf32"  # ignored by 16-bit dtypes
    # The GPU shapes even on CPU: the static step depends only on D, the timing step runs on a GPU.
    shapes = attn_bench.parse_shapes(args.shapes) if args.shapes else attn_bench.default_shapes("cuda")
    env = common.Env.collect(args.device, args.dtype)
    report = common.Report("tune_attention", env, None, args)
    report.print_header()
    # the table the launchers read on this device (0: the interpreter's; no GPU: the static step's target)
    args.table_arch = vit_triton.arch(torch.device(args.device)) or (0 if args.interpret else args.arch or 90)
    # candidate configs over every shape and pass: the length of each progress bar below
    n = sum(
        len(candidates(ps, sh.N, sh.D, dtype, args.allow_tf32, args.table_arch))
        for sh in shapes
        for ps in ("fwd", "bwd")
    )

    static: dict = {}
    if args.interpret:
        report.skip("static check", "--interpret: interpreted kernels cannot be compiled for a GPU")
    elif args.no_static and not args.static_only:
        report.skip("static check", "--no-static")
    else:
        arch = args.arch
        if arch is None:
            arch = 90 if args.device != "cuda" else min(90, 10 * torch.cuda.get_device_capability()[0])
        bar = common.progress(n, f"compile sm_{arch}", args.no_progress)
        static = static_rows(arch, shapes, dtype, args.allow_tf32, bar)
        bar.close()
        what = f"{args.dtype} {args.fp32_precision}" if dtype == torch.float32 else args.dtype
        print(f"### compile for sm_{arch} ({what}): worst kernel of each pass\n")
        srows = [{"pass": ps, "D": D, "config": "/".join(map(str, c)), **v} for (ps, D, c), v in static.items()]
        cols = [("pass", "pass"), ("D", "D"), ("config M/N/warps/stages", "config"), ("regs", "regs"),
                ("spill B", "spills"), ("smem B", "smem"), ("usable", "ok"), ("why not", "why")]  # fmt: skip
        print(common.markdown_table(cols, srows) + "\n")

    if args.static_only:
        report.skip("timing", "--static-only")
    elif args.device != "cuda" and not args.interpret:
        report.skip("timing", "no CUDA device here (timing needs a GPU; --interpret exercises it on CPU)")
    else:
        bar = common.progress(n, "time", args.no_progress)
        for shape in shapes:
            time_shape(shape, dtype, args, static, report, bar)
        bar.close()
    cols = [("shape", "shape"), ("pass", "pass"), ("config M/N/warps/stages", "config"), ("shipped", "shipped"),
            ("regs", "regs"), ("ms (median)", "ms"), ("TFLOP/s", "tflops"), ("GB/s", "gbps"),
            ("rel err", "rel_err")]  # fmt: skip
    table = common.markdown_table(cols, report.rows)
    if report.rows:
        cols2 = [("shape", "shape"), ("pass", "pass"), ("shipped", "shipped"), ("shipped ms", "shipped_ms"),
                 ("fastest", "best"), ("fastest ms", "best_ms"), ("shipped / fastest", "gain")]  # fmt: skip
        table += "\n\n### shipped table vs fastest candidate\n\n" + common.markdown_table(cols2, summary(report.rows))
    report.finish(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
