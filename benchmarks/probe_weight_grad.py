"""Why the Triton weight-gradient GEMMs are slow: one measurement that tells the candidate causes apart.

    python benchmarks/probe_weight_grad.py            # needs a CUDA device for timings; CPU runs it tiny, untimed

The H200 profile (benchmarks/results/nvidia-h200-2026-11-26.md) ran gelu_mlp's dW1 = dhidden^T @ x at ViT-B/16
(3072 x 768 output, K = 50,432 tokens) in 2.23 ms at 14% SM throughput, 144 programs on 132 SMs, where the dX
GEMM of the same FLOPs took 0.58 ms and cuBLAS's split-K dW 0.36 ms. Candidates (benchmarks/NOTES.md has the
predictions): the fused bias row sum (ROW_SUM), wave quantization (144 tiles, 1.09 waves), and the long K
loop itself. Each variant below changes one of them, computes the same product through `linear._gemm_kernel`,
and is checked against torch before it is timed:

  shipped        the launch `mlp_bwd` makes: 128 x 128 tiles, row sum of dhidden fused
  no_row_sum     the same without the row sum
  tiles_64       no row sum, 64 x 128 tiles: 288 programs (2.2 waves)
  split_k{S}     the kernel's split-K (`linear._launch(..., split_k=S)`: grid axis 1 over K slices into fp32
                 partials, summed by torch), with the row sum, as `mlp_bwd` would run it if the measurement
                 picks it (S = 2, 4, 8)
  dx_same_flops  dX = dhidden @ W1 (the GEMM that runs at 56-64% SM throughput), for the rate a tile can reach
  cublas         torch's dhidden.t() @ x
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

from vit_kernels.ops import linear  # noqa: E402


def _launch(a, b, c, M, N, K, dtype, *, row_sum=None, block_m=None) -> None:
    """One `_gemm_kernel` launch of C (M, N) = A (M, K) @ B (K, N), the config `linear` picks for it, optionally
    with its tile rows changed."""
    args, kwargs, grid = linear._kernel_args(a, b, c, M, N, K, dtype, False, linear._arch(c.device), row_sum=row_sum)
    if block_m is not None:
        kwargs["BLOCK_M"] = block_m
        grid = (-(-M // block_m) * -(-N // kwargs["BLOCK_N"]),)
    with linear._on_device(c):
        linear._gemm_kernel[grid](*args, **kwargs)


def variants(dhidden: torch.Tensor, x: torch.Tensor, w1: torch.Tensor) -> dict:
    """name -> (fn() returning the product it computed, the reference it must match)."""
    M, Hd = dhidden.shape
    C = x.shape[1]
    dev, dt = x.device, x.dtype
    dw = torch.empty(Hd, C, device=dev, dtype=dt)
    db = torch.empty(Hd, device=dev, dtype=dt)
    dx = torch.empty(M, C, device=dev, dtype=dt)
    ref_dw = (dhidden.t().float() @ x.float()).to(dt)
    ref_dx = (dhidden.float() @ w1.float()).to(dt)
    dh_t, x_op, dh_op, w1_op = (
        linear._Operand(t, tr) for t, tr in ((dhidden, True), (x, False), (dhidden, False), (w1, False))
    )

    def shipped():
        _launch(dh_t, x_op, dw, Hd, C, M, dt, row_sum=db)
        return dw

    def no_row_sum():
        _launch(dh_t, x_op, dw, Hd, C, M, dt)
        return dw

    def tiles_64():
        _launch(dh_t, x_op, dw, Hd, C, M, dt, block_m=64)
        return dw

    def split_k(S: int):
        def run():
            linear._launch(dh_t, x_op, dw, Hd, C, M, dt, False, split_k=S, row_sum=db)
            return dw

        return run

    def dx_same_flops():
        _launch(dh_op, w1_op, dx, M, C, Hd, dt)
        return dx

    out = {"shipped": (shipped, ref_dw), "no_row_sum": (no_row_sum, ref_dw), "tiles_64": (tiles_64, ref_dw)}
    out.update({f"split_k{S}": (split_k(S), ref_dw) for S in (2, 4, 8)})
    out["dx_same_flops"] = (dx_same_flops, ref_dx)
    out["cublas"] = (lambda: dhidden.t() @ x, ref_dw)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="K: 256 x 197 on a GPU, 300 on CPU")
    parser.add_argument("--channels", type=int, default=None, help="C: 768 on a GPU, 32 on CPU")
    parser.add_argument("--hidden", type=int, default=None, help="hidden: 3072 on a GPU, 64 on CPU")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    M = args.tokens or (256 * 197 if gpu else 300)
    C = args.channels or (768 if gpu else 32)
    Hd = args.hidden or (3072 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    dhidden = torch.randn(M, Hd, device=device).to(dtype)
    x = torch.randn(M, C, device=device).to(dtype)
    w1 = (torch.randn(Hd, C, device=device) * C**-0.5).to(dtype)
    flops = 2.0 * M * C * Hd
    name = torch.cuda.get_device_name() if gpu else "cpu (untimed: the interpreter)"
    print(f"## probe_weight_grad: dW1 = dhidden^T @ x, {Hd} x {C}, K = {M}, {str(dtype)[6:]}, {name}\n")
    print("| variant | ms (median) | TFLOP/s | rel err vs fp32 product |")
    print("|---|---|---|---|")
    failed = False
    for variant, (fn, ref) in variants(dhidden, x, w1).items():
        err = common.rel_error(fn(), ref)
        ok = err <= (1e-2 if dtype == torch.bfloat16 else 1e-4)
        failed |= not ok
        if gpu and ok:
            ms = common.bench(lambda _i, fn=fn: fn(), 1, device).median_ms
            print(f"| {variant} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.2e} |", flush=True)
        else:
            print(f"| {variant} | {'n/a' if ok else 'WRONG'} | n/a | {err:.2e} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
