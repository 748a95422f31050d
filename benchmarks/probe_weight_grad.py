"""The Triton weight-gradient GEMMs, split along K or not: the measurement that sets `linear.WEIGHT_GRAD_SPLIT_K`.

    python benchmarks/probe_weight_grad.py            # needs a CUDA device for timings; CPU runs it tiny, untimed

History: on an H200 (benchmarks/results/nvidia-h200-2026-11-27.md) gelu_mlp's dW1 = dhidden^T @ x at ViT-B/16
(3072 x 768 output, K = 50,432 tokens) took 1.65 ms with the bias row sum fused in, 0.72 ms without it; the row
sum has since moved to a torch reduction. What is left to decide is split-K, for two products:
  mlp_dw1   dW1 = dhidden^T @ x (Hd x C), as `mlp_bwd` launches it
  qkv_dw    dW = dQKV^T @ x (3C x C), dQKV read in place from packed dq, dk, dv (A_DQKV_T), as `qkv_bwd` does
Variants of each, every one checked against torch before it is timed:
  gemm           the GEMM as the ops launch it with split-K off (`linear.launch`, split_k=1)
  split_k{S}     the kernel's split-K: grid axis 1 over S slices of K into fp32 partials, summed by torch
  tiles_64       (mlp_dw1) no split, 64 x 128 tiles: 288 programs instead of 144
  bias_sum       the bias gradient beside it (`linear.bias_grad` / `qkv_bias_grad`: torch's fp32 column sums)
  dx_same_flops  (mlp_dw1) dX = dhidden @ W1, the GEMM of the same FLOPs with many tiles, for the rate a tile reaches
  cublas         torch's product (qkv_dw: from a materialised dQKV)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU: the interpreter runs the kernels (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vit_kernels import triton as vit_triton  # noqa: E402
from vit_kernels.triton import linear  # noqa: E402

SPLITS = (2, 4, 8)


def _tiles_64(a, b, c, M, N, K, dtype) -> None:
    """One `_gemm_kernel` launch of C = A @ B with the config `linear` picks, but 64-row tiles."""
    tiles = linear.config(M, N, dtype, False, vit_triton.arch(c.device))._replace(block_m=64)
    linear.launch(a, b, c, M, N, K, dtype, False, launch_config=tiles)


def mlp_variants(M: int, C: int, Hd: int, device: str, dtype: torch.dtype) -> dict:
    """name -> (fn() returning what it computed, the reference it must match, FLOPs)."""
    dhidden = torch.randn(M, Hd, device=device).to(dtype)
    x = torch.randn(M, C, device=device).to(dtype)
    w1 = (torch.randn(Hd, C, device=device) * C**-0.5).to(dtype)
    dw = torch.empty(Hd, C, device=device, dtype=dtype)
    db = torch.empty(Hd, device=device, dtype=dtype)
    dx = torch.empty(M, C, device=device, dtype=dtype)
    ref_dw = (dhidden.t().float() @ x.float()).to(dtype)
    dh_t, x_op = linear.Operand(dhidden, transpose=True), linear.Operand(x)
    flops = 2.0 * M * C * Hd

    def gemm(split_k: int = 1):
        def run():
            linear.launch(dh_t, x_op, dw, Hd, C, M, dtype, False, split_k=split_k)
            return dw

        return run

    def tiles_64():
        _tiles_64(dh_t, x_op, dw, Hd, C, M, dtype)
        return dw

    def dx_same_flops():
        linear.launch(linear.Operand(dhidden), linear.Operand(w1), dx, M, C, Hd, dtype, False)
        return dx

    out = {"gemm": (gemm(), ref_dw, flops)}
    out.update({f"split_k{S}": (gemm(S), ref_dw, flops) for S in SPLITS})
    out["tiles_64"] = (tiles_64, ref_dw, flops)
    out["bias_sum"] = (lambda: linear.bias_grad(dhidden, db), dhidden.float().sum(0), None)
    out["dx_same_flops"] = (dx_same_flops, (dhidden.float() @ w1.float()).to(dtype), flops)
    out["cublas"] = (lambda: dhidden.t() @ x, ref_dw, flops)
    return out


def qkv_variants(B: int, N: int, C: int, H: int, device: str, dtype: torch.dtype) -> dict:
    D = C // H
    # packed (B, N, 3, H, D) storage viewed as three (B, H, N, D) tensors: the layout attention's backward writes
    dq, dk, dv = torch.randn(B, N, 3, H, D, device=device).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    x = torch.randn(B * N, C, device=device).to(dtype)
    dw = torch.empty(3 * C, C, device=device, dtype=dtype)
    db = torch.empty(3 * C, device=device, dtype=dtype)
    dqkv = torch.cat([g.transpose(1, 2).reshape(B * N, C) for g in (dq, dk, dv)], 1)
    ref_dw = (dqkv.t().float() @ x.float()).to(dtype)
    x_op = linear.Operand(x)
    heads = dict(a_mode=linear.A_DQKV_T, dqkv=(dq, dk, dv), n_tok=N, qkv_c=C, qkv_d=D)
    flops = 2.0 * B * N * C * 3 * C

    def gemm(split_k: int = 1):
        def run():
            linear.launch(None, x_op, dw, 3 * C, C, B * N, dtype, False, split_k=split_k, **heads)
            return dw

        return run

    out = {"gemm": (gemm(), ref_dw, flops)}
    out.update({f"split_k{S}": (gemm(S), ref_dw, flops) for S in SPLITS})
    out["bias_sum"] = (lambda: linear.qkv_bias_grad((dq, dk, dv), db), dqkv.float().sum(0), None)
    out["cublas"] = (lambda: dqkv.t() @ x, ref_dw, flops)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="images: 256 on a GPU, 2 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="per image: 197 on a GPU, 45 on CPU")
    parser.add_argument("--channels", type=int, default=None, help="C: 768 on a GPU, 32 on CPU")
    parser.add_argument("--heads", type=int, default=None, help="12 on a GPU, 2 on CPU")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    B = args.batch or (256 if gpu else 2)
    N = args.tokens or (197 if gpu else 45)
    C = args.channels or (768 if gpu else 32)
    H = args.heads or (12 if gpu else 2)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if gpu else "cpu (untimed: the interpreter)"
    products = {
        f"mlp_dw1 ({4 * C} x {C})": mlp_variants(B * N, C, 4 * C, device, dtype),
        f"qkv_dw ({3 * C} x {C})": qkv_variants(B, N, C, H, device, dtype),
    }
    print(f"## probe_weight_grad: weight gradients, K = {B} x {N} tokens, {str(dtype)[6:]}, {name}\n")
    print("| product | variant | ms (median) | TFLOP/s | rel err vs fp32 |")
    print("|---|---|---|---|---|")
    failed = False
    for product, variants in products.items():
        for variant, (fn, ref, flops) in variants.items():
            err = common.rel_error(fn(), ref)
            ok = err <= (1e-2 if dtype == torch.bfloat16 else 1e-4)
            failed |= not ok
            if gpu and ok:
                ms = common.bench(lambda _i, fn=fn: fn(), 1, device).median_ms
                rate = f"{flops / ms / 1e9:.0f}" if flops else "n/a"
                print(f"| {product} | {variant} | {ms:.3f} | {rate} | {err:.2e} |", flush=True)
            else:
                print(f"| {product} | {variant} | {'n/a' if ok else 'WRONG'} | n/a | {err:.2e} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
