"""The Hopper GEMMs (tma_gemm.py) side by side with linear.py's pointer kernel and cuBLAS: the one A/B comparison.

    python benchmarks/probe_gemm.py                   # a CUDA device times it; the CPU runs it tiny, untimed
    python benchmarks/probe_gemm.py --variants        # also the config variants of the TMA kernels

Every product of one ViT-B/16 block (B=256, 224 px, bf16: M = 50,432 tokens, C = 768, Hd = 3072), forward and
backward (qkv_fwd twice: the head-split scatter of the custom-op graph, and the packed store of the eager path),
three ways, each checked against an fp32 torch product before it is timed:
  pointer   `_gemm_kernel` (sm_80's kernel; what sm_90 ran up to e99f76e): linear.TMA_ARCHS = ()
  tma       tma_gemm.py's persistent TMA kernels (what sm_90 runs now)
  cublas    torch's product of the same shapes (F.linear / matmul; its epilogues unfused)
then the ops end to end (gelu_mlp, fused_qkv and the three block ops, fwd and fwd+bwd) on both paths against
eager torch. `--variants` times the TMA kernels at other configs (flatten on / off, 128 x 128 tiles, 4 stages)
for the products where the choice is open. Predictions are in benchmarks/NOTES.md (2026-12-03), written first.
gpu_check stage `gemm_ab`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU: the interpreter runs the kernels (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vit_kernels as vk  # noqa: E402
from vit_kernels import triton as vit_triton  # noqa: E402
from vit_kernels.triton import linear, tma_gemm  # noqa: E402


@contextlib.contextmanager
def gemm_path(path: str):
    """Run linear.py's launchers on one GEMM path: "tma" (Hopper's default) or "pointer"."""
    old = linear.TMA_ARCHS
    linear.TMA_ARCHS = old if path == "tma" else ()
    try:
        yield
    finally:
        linear.TMA_ARCHS = old


@contextlib.contextmanager
def tma_config(arch: int, epilogue: str, **fields):
    """tma_gemm's config for (precision, epilogue) with some fields replaced, for the duration."""
    table = tma_gemm.CONFIGS.get(arch, {})
    keys = [k for k in table if k[1] == epilogue]
    old = {k: table[k] for k in keys}
    for k in keys:
        table[k] = table[k]._replace(**fields)
    try:
        yield
    finally:
        table.update(old)


def products(B: int, N: int, C: int, H: int, device: str, dtype: torch.dtype) -> dict:
    """name -> (epilogue of tma_gemm, FLOPs, {way: fn() -> output}, reference (fp32))."""
    M, Hd, D = B * N, 4 * C, C // H

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    x, o = r(M, C), r(M, C)
    w_qkv, b_qkv = r(3 * C, C, scale=C**-0.5), r(3 * C)
    w_proj, b_proj = r(C, C, scale=C**-0.5), r(C)
    w1, b1, w2, b2 = r(Hd, C, scale=C**-0.5), r(Hd), r(C, Hd, scale=Hd**-0.5), r(C)
    hid, act = r(M, Hd), r(M, Hd)
    dy, dqkv = r(M, C), r(M, 3 * C)
    out_c, out_h, out_h2 = (torch.empty(M, n, device=device, dtype=dtype) for n in (C, Hd, Hd))
    x3 = x.view(B, N, C)
    # what mlp_bwd adds on the Hopper path: the dGELU epilogue's per-row-tile column sums (dfc1_bias)
    db_part = torch.empty(tma_gemm.dbias_rows(vit_triton.arch(x.device), dtype, M), Hd, device=device)
    arch = vit_triton.arch(x.device)

    def plain(a, b, c, bias=None):
        return {"gemm": lambda: (linear.gemm(a, b, c, True, bias=bias), c)[1]}

    def pointer_epilogue(a, b, c, n, k_, result, **epi):
        return lambda: (
            linear.launch(linear.Operand(a), linear.Operand(b), c, a.shape[0], n, k_, dtype, True, **epi),
            result,
        )[1]

    def q_of(qkv):  # the q part of (M, 3C) as (B, H, N, D): a view
        return qkv.view(B, N, 3, H, D)[:, :, 0].transpose(1, 2)

    table = {
        "qkv_fwd": ("qkv", 2.0 * M * C * 3 * C, {
            "gemm": lambda: linear.qkv_fwd(x3, w_qkv, b_qkv, H, True)[0],
            "cublas": lambda: q_of(F.linear(x, w_qkv, b_qkv))}, q_of(x.float() @ w_qkv.float().t() + b_qkv.float())),
        "qkv_fwd_packed": ("store", 2.0 * M * C * 3 * C, {
            "gemm": lambda: linear.qkv_fwd(x3, w_qkv, b_qkv, H, True, packed=True)[0],
            "cublas": lambda: q_of(F.linear(x, w_qkv, b_qkv))}, q_of(x.float() @ w_qkv.float().t() + b_qkv.float())),
        "proj": ("store", 2.0 * M * C * C, {**plain(o, w_proj.t(), out_c, b_proj),
                                            "cublas": lambda: F.linear(o, w_proj, b_proj)},
                 o.float() @ w_proj.float().t() + b_proj.float()),
        "fc1_gelu": ("gelu", 2.0 * M * C * Hd, {
            "tma": lambda: (tma_gemm.launch(*tma_gemm.gelu_args(x, w1.t(), out_h, out_h2, b1, False, True, arch)),
                            out_h2)[1],
            "pointer": pointer_epilogue(x, w1.t(), out_h, Hd, C, out_h2, epilogue=linear.EPI_GELU, bias=b1, c2=out_h2),
            "cublas": lambda: F.gelu(F.linear(x, w1, b1))}, F.gelu(x.float() @ w1.float().t() + b1.float())),
        "fc2": ("store", 2.0 * M * Hd * C, {**plain(act, w2.t(), out_c, b2), "cublas": lambda: F.linear(act, w2, b2)},
                act.float() @ w2.float().t() + b2.float()),
        "dhidden_dgelu": ("dgelu", 2.0 * M * C * Hd, {
            "tma": lambda: (tma_gemm.launch(*tma_gemm.dgelu_args(dy, w2, hid, out_h, out_h2, False, True, arch)),
                            out_h)[1],
            "tma + dbias": lambda: (tma_gemm.launch(*tma_gemm.dgelu_args(dy, w2, hid, out_h, out_h2, False, True, arch,
                                                                         dbias_part=db_part)), out_h)[1],
            "pointer": pointer_epilogue(dy, w2, out_h, Hd, C, out_h, epilogue=linear.EPI_DGELU, hidden=hid, c2=out_h2),
            "cublas": lambda: torch.ops.aten.gelu_backward(dy @ w2, hid)},
            torch.ops.aten.gelu_backward(dy.float() @ w2.float(), hid.float())),
        "mlp_dx": ("store", 2.0 * M * Hd * C, {**plain(hid, w1, out_c), "cublas": lambda: hid @ w1},
                   hid.float() @ w1.float()),
        "qkv_dx": ("store", 2.0 * M * 3 * C * C, {**plain(dqkv, w_qkv, out_c), "cublas": lambda: dqkv @ w_qkv},
                   dqkv.float() @ w_qkv.float()),
    }  # fmt: skip
    for name, a, b in (("mlp_dw1", hid.t(), x), ("mlp_dw2", dy.t(), act), ("qkv_dw", dqkv.t(), x)):
        c = torch.empty(a.shape[0], b.shape[1], device=device, dtype=dtype)
        table[name] = (
            "partial",
            2.0 * a.shape[0] * a.shape[1] * b.shape[1],
            {"gemm": lambda a=a, b=b, c=c: (linear.weight_grad(a, b, c, True), c)[1], "cublas": lambda a=a, b=b: a @ b},
            a.float() @ b.float(),
        )
    return table


def ops(B: int, N: int, C: int, H: int, device: str, dtype: torch.dtype) -> dict:
    """name -> (fn(backend) -> output tensors, the inputs that take gradients)."""
    M, Hd = B * N, 4 * C

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)

    x = p(B, N, C)
    w_qkv, b_qkv, w_proj, b_proj = p(3 * C, C, scale=C**-0.5), p(3 * C), p(C, C, scale=C**-0.5), p(C)
    w1, b1, w2, b2 = p(Hd, C, scale=C**-0.5), p(Hd), p(C, Hd, scale=Hd**-0.5), p(C)
    ln_w, ln_b = p(C), p(C)
    x2 = p(M, C)
    return {
        "fused_qkv": (lambda be: vk.fused_qkv(x, w_qkv, b_qkv, H, backend=be), (x, w_qkv, b_qkv)),
        "gelu_mlp": (lambda be: (vk.gelu_mlp(x2, w1, b1, w2, b2, backend=be),), (x2, w1, b1, w2, b2)),
        "ln_fused_qkv": (lambda be: vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w_qkv, b_qkv, H, backend=be),
                         (x, ln_w, ln_b, w_qkv, b_qkv)),
        "proj_residual": (lambda be: (vk.proj_residual(x, w_proj, b_proj, x, backend=be),), (x, w_proj, b_proj)),
        "ln_gelu_mlp": (lambda be: (vk.ln_gelu_mlp(x, ln_w, ln_b, 1e-6, w1, b1, w2, b2, backend=be),),
                        (x, ln_w, ln_b, w1, b1, w2, b2)),
    }  # fmt: skip


VARIANTS = {  # (epilogue, label, config fields) timed with --variants; "shipped" is the table as it is
    "store": [("flatten off", {"flatten": False}), ("128x128 4 stages", {"block_n": 128, "num_stages": 4})],
    "gelu": [("halves", {"quarters": False}), ("128x128 4 stages", {"block_n": 128, "num_stages": 4})],
    "dgelu": [("128x128 4 stages", {"block_n": 128, "num_stages": 4, "quarters": False})],
    "partial": [("flatten off", {"flatten": False})],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="images: 256 on a GPU, 2 on CPU")
    parser.add_argument("--variants", action="store_true", help="also time the TMA kernels at other configs")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    B = args.batch or (256 if gpu else 2)
    N, C, H = (197, 768, 12) if gpu else (45, 64, 2)
    dtype = torch.bfloat16 if gpu else torch.float16  # the CPU interpreter has no native bf16
    torch.manual_seed(0)
    arch = vit_triton.arch(torch.device(device))
    name = torch.cuda.get_device_name() if gpu else "cpu (untimed: the interpreter)"
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    failed = False

    def timed(fn):
        return common.bench(lambda _i: fn(), 1, device).median_ms if gpu else float("nan")

    print(f"## probe_gemm: ViT block GEMMs, B={B} N={N} C={C}, {str(dtype)[6:]}, {name}\n")
    print("| product | way | ms (median) | TFLOP/s | x cuBLAS | rel err |")
    print("|---|---|---|---|---|---|")
    for product, (epilogue, flops, ways, ref) in products(B, N, C, H, device, dtype).items():
        runs = []
        for way, fn in ways.items():
            if way == "gemm":  # linear.py's launcher on each path
                runs += [("pointer", fn, "pointer"), ("tma", fn, "tma")]
            else:
                runs.append((way, fn, "tma"))
        if args.variants and gpu:
            tma_fn = ways.get("tma") or ways["gemm"]
            runs += [(f"tma {label}", (tma_fn, fields), "tma") for label, fields in VARIANTS.get(epilogue, [])]
        results = {}
        for way, fn, path in runs:
            fields = None
            if isinstance(fn, tuple):
                fn, fields = fn
            with gemm_path(path), tma_config(arch, epilogue, **(fields or {})):
                try:
                    err = common.rel_error(fn(), ref)
                except Exception as exc:  # a variant that does not compile is a row, not the end of the probe
                    print(f"| {product} | {way} | FAILED: {common.short_reason(exc)} | | | |", flush=True)
                    failed |= fields is None
                    continue
                ok = err <= tol
                failed |= not ok and fields is None
                results[way] = timed(fn) if ok else float("nan")
            ms, cub = results[way], results.get("cublas")
            rate = f"{flops / ms / 1e9:.0f}" if ms == ms else "n/a"
            ratio = f"{cub / ms:.2f}" if cub and ms == ms and cub == cub else "n/a"
            shown = "WRONG" if not ok else (f"{ms:.3f}" if gpu else "untimed")
            print(f"| {product} | {way} | {shown} | {rate} | {ratio} | {err:.1e} |", flush=True)

    print("\n## ops end to end: triton on each GEMM path against eager torch\n")
    print("| op | mode | torch ms | pointer ms | tma ms | tma x torch | tma x pointer |")
    print("|---|---|---|---|---|---|---|")
    for op, (fn, leaves) in ops(B, N, C, H, device, dtype).items():
        for mode in ("fwd", "fwd+bwd"):
            ms = {}
            for label, backend, path in (("torch", "torch", "tma"), ("pointer", "triton", "pointer"),
                                         ("tma", "triton", "tma")):  # fmt: skip

                def run(fn=fn, backend=backend, mode=mode, leaves=leaves):
                    outs = fn(backend)
                    if mode == "fwd+bwd":  # gradients returned, not accumulated into .grad (no extra adds timed)
                        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
                    return outs

                with gemm_path(path), torch.set_grad_enabled(mode == "fwd+bwd"):
                    run()
                    ms[label] = timed(run)

            cells = [f"{ms[k]:.3f}" if gpu else "untimed" for k in ("torch", "pointer", "tma")]
            ratios = [f"{ms[a] / ms[b]:.2f}" if gpu else "n/a" for a, b in (("torch", "tma"), ("pointer", "tma"))]
            print(f"| {op} | {mode} | {' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
