"""The Hopper GEMMs side by side with the GEMMs they replace and cuBLAS: the one A/B comparison, for each backend.

    python benchmarks/probe_gemm.py                   # a CUDA device times it; the CPU runs it tiny, untimed
    python benchmarks/probe_gemm.py --variants        # also the config variants of the TMA kernels
    python benchmarks/probe_gemm.py --peaks FILE      # the matmul peak from `common.py --json` (else measured)

Every product of one ViT-B/16 block (B=256, 224 px, bf16: M = 50,432 tokens, C = 768, Hd = 3072), forward and
backward, with its TFLOP/s and % of the measured matmul peak (`common.measure_peaks`: cuBLAS on large squares).

triton (vit_kernels/triton): each product (qkv_fwd twice: the head-split scatter of the custom-op graph, and the
packed store of the eager path) three ways, each checked against an fp32 torch product before it is timed:
  pointer   `_gemm_kernel` (sm_80's kernel; what sm_90 ran up to e99f76e): linear.TMA_ARCHS = ()
  tma       tma_gemm.py's persistent TMA kernels (what sm_90 runs now)
  cublas    torch's product of the same shapes (F.linear / matmul; its epilogues unfused)
then the ops end to end (gelu_mlp, fused_qkv and the three block ops, fwd and fwd+bwd) on both paths against
eager torch. `--variants` times the TMA kernels at other configs (flatten on / off, 256 x 128 tiles; for dGELU
128 x 128 on 4 stages) for the products where the choice is open, and the cuda backend's linear_bias on its
configuration variants (`cuda_variants_table`).

cuda (vit_kernels/cuda/linear.py, `_C`): each launcher (qkv_fwd, packed or not, linear_fwd, mlp_fwd, mlp_bwd,
linear_bwd, qkv_bwd) on csrc/gemm.cu's mma.sync GEMMs (`linear._sm90` replaced by `lambda t: False`) and on the
sm_90a CUTLASS GEMMs, checked against fp32 torch, timed whole, then profiled (torch.profiler): a launcher runs
several kernels (linear_bwd: dX GEMM, dW GEMM, two column-sum passes), so each kernel's device time is a row,
named by its position in the call (`attribute`, `label_kernels`), beside cuBLAS's time for the same product;
then the ops end to end on both paths against eager. Skipped, with the reason, without the sm_90a GEMMs.

Order: triton's products, cuda's kernels (and its variants), then the ops end to end, triton's and cuda's: the
per-kernel rows no GPU has timed come before what the mlp and block tables also measure, so that a run cut at
its time slice loses the latter.

Predictions are in benchmarks/NOTES.md (2026-12-03), written first. gpu_check stage `gemm_ab`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import unittest.mock
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU: the interpreter runs the kernels (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vit_kernels as vk  # noqa: E402
from vit_kernels import triton as vit_triton  # noqa: E402
from vit_kernels.cuda import linear as cuda_linear  # noqa: E402
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
    "store": [("flatten off", {"flatten": False}), ("256x128", {"block_m": 256, "block_n": 128})],
    "gelu": [
        ("halves", {"quarters": False}),
        ("256x128", {"block_m": 256, "block_n": 128}),
        ("64x128 4 warps 2 per SM", {"block_m": 64, "block_n": 128, "num_warps": 4, "per_sm": 2}),
    ],
    # two 4-warp programs per SM (82 KB of shared memory and ~145 registers each on sm_90): one's erf epilogue under
    # the other's mainloop (benchmarks/NOTES.md, "two programs per SM for the dGELU product")
    "dgelu": [
        ("64x128 4 warps 2 per SM", {"block_m": 64, "num_warps": 4, "num_stages": 3, "per_sm": 2}),
        ("128x64 4 warps 2 per SM", {"block_n": 64, "num_warps": 4, "num_stages": 3, "per_sm": 2}),
    ],
}


# ----------------------------------------------------------------------------------------------------
# the cuda backend: its launchers on each GEMM path, per kernel
# ----------------------------------------------------------------------------------------------------
CUDA_PATHS = ("mma.sync", "sm_90a")  # (old, new): csrc/gemm.cu's kernels, the CUTLASS ones of gemm_sm90_impl.cuh
PROFILED_CALLS = 10  # calls of each launcher under the profiler: each kernel's time is the median over them
NOT_KERNELS = ("gpu_memset", "gpu_memcpy", "gpu_user_annotation")  # device activity that is not a kernel launch


@contextlib.contextmanager
def cuda_gemm_path(path: str):
    """Run vit_kernels/cuda/linear.py's launchers on one GEMM path: "sm_90a" (Hopper's default where built, as
    `cuda_linear.gemm_path` says) or "mma.sync" (its `_sm90` test answers False for the duration)."""
    old = cuda_linear._sm90
    if path == "mma.sync":
        cuda_linear._sm90 = lambda t: False
    try:
        yield
    finally:
        cuda_linear._sm90 = old


def dgelu_epilogue_shipped() -> tuple[bool, bool]:
    """What the sm_90a mlp_bwd ships: (act, dfc1_bias's partial sums) from the d-GELU epilogue, each True or False
    (cuda_linear.SM90_ACT_IN_EPILOGUE, SM90_DFC1_BIAS_IN_EPILOGUE)."""
    return bool(cuda_linear.SM90_ACT_IN_EPILOGUE), bool(cuda_linear.SM90_DFC1_BIAS_IN_EPILOGUE)


def dgelu_epilogue_ab() -> tuple[str, bool]:
    """The launcher name and setting of the A / B beside the shipped sm_90a mlp_bwd: the other way of writing act
    and dfc1_bias (both from the d-GELU epilogue, or both by their own passes)."""
    on = not all(dgelu_epilogue_shipped())
    return f"mlp_bwd (act and dfc1_bias {'in the d-GELU epilogue' if on else 'by separate passes'})", on


def with_dgelu_epilogue(on: bool, fn: Callable[[], tuple]) -> Callable[[], tuple]:
    """fn with the sm_90a mlp_bwd's act and dfc1_bias both from the d-GELU epilogue (on) or both by their own
    passes, a row pass and the two-pass column sum of dhidden (off)."""
    return unittest.mock.patch.multiple(cuda_linear, SM90_ACT_IN_EPILOGUE=on, SM90_DFC1_BIAS_IN_EPILOGUE=on)(fn)


class Launch(NamedTuple):
    """One kernel a cuda launcher call launches, in csrc/gemm.cu's order."""

    label: (
        str  # the product ("dX = dout @ W (matmul_nn)") or the pass ("dbias colsum: finish"); no commas (table cells)
    )
    name_has: str  # a piece of the kernel's name, checked before the label is trusted
    flops: float = 0.0  # 0: an element-wise pass (no TFLOP/s)
    cublas: str | None = None  # the cuBLAS product it is compared with
    outputs: tuple[int, ...] = ()  # the launcher outputs it writes: its row shows their rel err


class CudaCall(NamedTuple):
    fn: Callable[[], tuple]  # one launcher call -> its outputs
    refs: tuple  # fp32 torch reference of each output
    launches: dict  # path -> [Launch]


def cuda_calls(B: int, N: int, C: int, H: int, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """The cuda launchers at one ViT block's shapes: name -> CudaCall; and the cuBLAS products the triton table
    lacks (the projection's backward): name -> (FLOPs, fn() -> output, reference (fp32))."""
    M, Hd, D = B * N, 4 * C, C // H
    f_qkv, f_proj, f_mlp = 2.0 * M * C * 3 * C, 2.0 * M * C * C, 2.0 * M * C * Hd

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    x, o, dy, hid = r(M, C), r(M, C), r(M, C), r(M, Hd)
    w_qkv, b_qkv = r(3 * C, C, scale=C**-0.5), r(3 * C)
    w_proj, b_proj = r(C, C, scale=C**-0.5), r(C)
    w1, b1, w2, b2 = r(Hd, C, scale=C**-0.5), r(Hd), r(C, Hd, scale=Hd**-0.5), r(C)
    dqkv = r(B, N, 3, H, D)  # what attention's backward gets from the eager fused_qkv: dq, dk, dv views of one buffer
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D), read in place on both paths
    x3 = x.view(B, N, C)
    xf, of, dyf, hidf, dqkvf = (t.float() for t in (x, o, dy, hid, dqkv.view(M, 3 * C)))
    wqf, bqf, wpf, bpf = w_qkv.float(), b_qkv.float(), w_proj.float(), b_proj.float()
    w1f, b1f, w2f, b2f = w1.float(), b1.float(), w2.float(), b2.float()

    ab_name, ab_on = dgelu_epilogue_ab()
    qkv_ref = tuple((xf @ wqf.t() + bqf).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0))
    h_ref = xf @ w1f.t() + b1f
    dh_ref = torch.ops.aten.gelu_backward(dyf @ w2f, hidf)
    mlp_bwd_ref = (dh_ref @ w1f, dh_ref.t() @ xf, dh_ref.sum(0), dyf.t() @ F.gelu(hidf), dyf.sum(0))
    calls = {
        "qkv_fwd": (lambda: cuda_linear.qkv_fwd(x3, w_qkv, b_qkv, H, False), qkv_ref),
        "qkv_fwd packed": (lambda: cuda_linear.qkv_fwd(x3, w_qkv, b_qkv, H, False, packed=True), qkv_ref),
        "linear_fwd": (lambda: (cuda_linear.linear_fwd(o, w_proj, b_proj),), (of @ wpf.t() + bpf,)),
        "mlp_fwd": (lambda: cuda_linear.mlp_fwd(x, w1, b1, w2, b2, "none", False),
                    (F.gelu(h_ref) @ w2f.t() + b2f, h_ref)),
        # without autograd: fc1 stores act alone (on sm_90a the product without the aux store)
        "mlp_fwd without hidden": (lambda: cuda_linear.mlp_fwd(x, w1, b1, w2, b2, "none", False, save_hidden=False)[:1],
                                   (F.gelu(h_ref) @ w2f.t() + b2f,)),
        "mlp_bwd": (lambda: cuda_linear.mlp_bwd(dy, x, w1, w2, hid, True, True, "none", False), mlp_bwd_ref),
        # sm_90a only: the A / B of what the d-GELU epilogue writes beside dhidden (act, dfc1_bias's partial sums)
        ab_name: (
            with_dgelu_epilogue(ab_on, lambda: cuda_linear.mlp_bwd(dy, x, w1, w2, hid, True, True, "none", False)),
            mlp_bwd_ref,
        ),
        "linear_bwd": (lambda: cuda_linear.linear_bwd(dy, o, w_proj, True), (dyf @ wpf, dyf.t() @ of, dyf.sum(0))),
        "qkv_bwd": (lambda: cuda_linear.qkv_bwd(dq, dk, dv, x3, w_qkv, True, False),
                    ((dqkvf @ wqf).view(B, N, C), dqkvf.t() @ xf, dqkvf.sum(0))),
    }  # fmt: skip

    def launches(path: str) -> dict:
        """What csrc/gemm.cu's launchers launch on `path` (gemm_<op> and gemm_<op>_sm90), in order."""
        old = path == "mma.sync"
        g = "gemm_tc_kernel" if old else "GemmUniversal"  # CUTLASS's kernels: cutlass::device_kernel<GemmUniversal<
        nn, wg = ("", "") if old else (" (matmul_nn)", " (stream-K)")

        def colsum(what: str, out: int) -> list[Launch]:  # run_colsum: row-split partial sums, then their sum
            return [Launch(f"{what} colsum: partial sums", "colsum_partial"),
                    Launch(f"{what} colsum: finish", "colsum_finish", outputs=(out,))]  # fmt: skip

        mlp_bwd_tail = [  # after dhidden and act (and on sm_90a dfc1_bias's sum of the epilogue's partial sums)
            Launch(f"dW2 = dy^T @ act{wg}", g, f_mlp, "mlp_dw2", (3,)),
            Launch(f"dW1 = dhidden^T @ x{wg}", g, f_mlp, "mlp_dw1", (1,)),
            Launch(f"dX = dhidden @ W1{nn}", g, f_mlp, "mlp_dx", (0,)),
            *colsum("dfc2_bias", 4),
        ]
        dgelu = "dhidden = dy @ W2 * GELU'(hidden)"

        def sm90_mlp_bwd(act_in: bool, dfc1_bias_in: bool) -> list[Launch]:  # what the d-GELU epilogue writes
            writes = (" + act" if act_in else "") + (" + dfc1_bias partial sums" if dfc1_bias_in else "")
            finish = Launch("dfc1_bias: sum of the partial sums", "colsum_finish", outputs=(2,))
            return [
                Launch(f"{dgelu}{writes}", g, f_mlp, "dhidden_dgelu"),
                *([finish] if dfc1_bias_in else []),
                *([] if act_in else [Launch("act = gelu(hidden): row pass", "gelu_rows")]),
                *mlp_bwd_tail,
                *([] if dfc1_bias_in else colsum("dfc1_bias", 2)),
            ]

        if old:
            mlp_bwd = [Launch(f"{dgelu} (and act)", g, f_mlp, "dhidden_dgelu"), *mlp_bwd_tail, *colsum("dfc1_bias", 2)]
        else:
            mlp_bwd = sm90_mlp_bwd(*dgelu_epilogue_shipped())
        qkv_fwd = [Launch("QKV + bias + head split", g, f_qkv, "qkv_fwd", (0, 1, 2))] if old else [
            Launch("QKV + bias (linear_bias) into the qkv scratch", g, f_qkv, "qkv_fwd"),
            Launch("q / k / v split pass", "qkv_split", outputs=(0, 1, 2))]  # fmt: skip
        return {
            "qkv_fwd": qkv_fwd,
            "qkv_fwd packed": [Launch("QKV + bias into the packed qkv buffer", g, f_qkv, "qkv_fwd_packed", (0, 1, 2))],
            "linear_fwd": [Launch("proj + bias", g, f_proj, "proj", (0,))],
            "mlp_fwd": [Launch("fc1 + bias + GELU (and hidden)", g, f_mlp, "fc1_gelu", (1,)),
                        Launch("fc2 + bias", g, f_mlp, "fc2", (0,))],
            "mlp_fwd without hidden": [Launch("fc1 + bias + GELU (act only)", g, f_mlp, "fc1_gelu"),
                                       Launch("fc2 + bias", g, f_mlp, "fc2", (0,))],
            "mlp_bwd": mlp_bwd,
            **({} if old else {ab_name: sm90_mlp_bwd(ab_on, ab_on)}),
            "linear_bwd": [Launch(f"dX = dout @ W{nn}", g, f_proj, "proj_dx", (0,)),
                           Launch(f"dW = dout^T @ a{wg}", g, f_proj, "proj_dw", (1,)), *colsum("dbias", 2)],
            "qkv_bwd": [Launch(f"dX = dQKV @ W{nn}", g, f_qkv, "qkv_dx", (0,)),
                        Launch(f"dW = dQKV^T @ x{wg}", g, f_qkv, "qkv_dw", (1,)), *colsum("dbias", 2)],
        }  # fmt: skip

    per_path = {path: launches(path) for path in CUDA_PATHS}
    table = {
        name: CudaCall(fn, ref, {p: per_path[p][name] for p in CUDA_PATHS if name in per_path[p]})
        for name, (fn, ref) in calls.items()
    }
    extra_cublas = {
        "proj_dx": (f_proj, lambda: dy @ w_proj, dyf @ wpf),
        "proj_dw": (f_proj, lambda: dy.t() @ o, dyf.t() @ of),
    }
    return table, extra_cublas


def attribute(events: Sequence[tuple[str, float]], calls: int) -> list[tuple[str, float]]:
    """The kernels of one call, each with its median time: `events` are (name, device us) in launch order over
    `calls` calls, each of which must launch the same kernels in the same order; ValueError (why) where not."""
    if calls < 1 or not events or len(events) % calls:
        raise ValueError(f"{len(events)} kernels recorded over {calls} calls: not the same number per call")
    per_call = len(events) // calls
    names = [name for name, _ in events[:per_call]]
    for c in range(1, calls):
        got = [name for name, _ in events[c * per_call : (c + 1) * per_call]]
        if got != names:
            i = next(i for i, (a, b) in enumerate(zip(got, names, strict=True)) if a != b)
            raise ValueError(
                f"call {c} launched {short_kernel_name(got[i])} where call 0 launched {short_kernel_name(names[i])}"
                f" (kernel {i} of {per_call})"
            )
    return [(names[i], statistics.median(events[c * per_call + i][1] for c in range(calls))) for i in range(per_call)]


def short_kernel_name(name: str) -> str:
    """A demangled kernel name without return type, template arguments and parameters ("void vk::gemm::
    colsum_partial_kernel<...>(...)" -> "vk::gemm::colsum_partial_kernel"); CUTLASS's stream-K ones say so."""
    base = name.removeprefix("void ").split("<")[0].split("(")[0].strip() or name[:60]
    return (base + (" (stream-K)" if "StreamK" in name else "")).replace("|", "/")


def label_kernels(names: Sequence[str], launches: Sequence[Launch]) -> tuple[list[Launch], str | None]:
    """Each kernel of one call as a Launch, and why the labels were given up (None: they fit). The expected
    launches are matched in order by a piece of their name; a kernel between them (a launch gemm.cu does not make,
    say a workspace fill) is shown by its name. Where an expected launch is not found, every kernel is."""
    out, j = [], 0
    for name in names:
        if j < len(launches) and launches[j].name_has in name:
            out.append(launches[j])
            j += 1
        else:
            out.append(Launch(f"(unexpected) {short_kernel_name(name)}", ""))
    if j == len(launches):
        return out, None
    missing = launches[j]
    why = (
        f"expected {len(launches)} kernels but found {len(names)}: none named *{missing.name_has}* for {missing.label}"
    )
    return [Launch(short_kernel_name(name), "") for name in names], why


def kernel_times(fn: Callable[[], object], calls: int, device: str = "cuda") -> list[tuple[str, float]]:
    """(name, device us) of every kernel `calls` calls of fn launch, in launch order, from torch.profiler (memsets,
    such as CUTLASS clearing its stream-K workspace, and copies left out). device "cpu": the CPU ops instead (a
    test of this function where there is no GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if gpu:
            torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == (DeviceType.CUDA if gpu else DeviceType.CPU)
        and not getattr(e, "is_user_annotation", False)
        and getattr(e, "activity_type", None) not in NOT_KERNELS
        and not e.name.startswith(("Memset", "Memcpy"))
    ]
    kernels.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in kernels]


def cuda_skip_reason(device: str, dtype: torch.dtype) -> str | None:
    """Why the cuda section cannot run here (no CUDA device, no `_C`, no sm_90a GEMMs), or None."""
    reason = common.kernel_skip_reason("cuda", device, False)
    if reason is None:
        try:
            path = cuda_linear.gemm_path(torch.device(device), dtype)
        except Exception as exc:  # an older _C without build_info, say: the reason, not a crash
            return common.short_reason(exc)
        if not path.startswith("sm_90a"):
            reason = f"no sm_90a GEMMs to compare with: the cuda backend runs {path}"
    return None if reason is None else " ".join(reason.split())


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms == ms else "untimed"


def ratio_cell(base: float | None, ms: float) -> str:
    """base / ms ("x cuBLAS", "x shipped"), "n/a" where either was not timed."""
    return f"{base / ms:.2f}" if base and base == base and ms == ms else "n/a"


def rate_cells(flops: float, ms: float, peak: float | None) -> tuple[str, str]:
    """TFLOP/s and % of the matmul peak, "n/a" where untimed, no peak, or not a GEMM."""
    if not flops or ms != ms:
        return "n/a", "n/a"
    tflops = flops / ms / 1e9
    return f"{tflops:.0f}", (f"{100 * tflops / peak:.0f}" if peak else "n/a")


def cuda_products_table(calls: dict, extra_cublas: dict, cublas: dict, timed, profile, peak, tol) -> bool:
    """The cuda launchers on each path, whole and per kernel, and cuBLAS's time for each product. `cublas`:
    product -> (FLOPs, ms, rel err), from the triton table, completed here with `extra_cublas`; `timed(fn)` -> ms;
    `profile(fn, calls)` -> kernel_times' list. True if a row failed (an error, or a result off by more than tol)."""
    failed = False

    def row(name, path, product, ms="", rate=("", ""), ratio="", err=""):
        print(f"| {name} | {path} | {product} | {ms} | {rate[0]} | {rate[1]} | {ratio} | {err} |", flush=True)

    print("| launcher | path | product | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for key, (flops, fn, ref) in extra_cublas.items():
        try:
            err = common.rel_error(fn(), ref)
            cublas[key] = (flops, timed(fn) if err <= tol else float("nan"), err)
            failed |= err > tol
        except Exception as exc:
            row("(torch)", "cublas", key, f"FAILED: {common.short_reason(exc)}")
            failed = True
    for name, call in calls.items():
        for path in CUDA_PATHS:
            if path not in call.launches:  # a call for one path only
                continue
            launches = call.launches[path]
            try:
                with cuda_gemm_path(path):
                    errs = [common.rel_error(o, r) for o, r in zip(call.fn(), call.refs, strict=True)]
                    if max(errs) > tol:
                        worst = max(range(len(errs)), key=errs.__getitem__)
                        row(name, path, f"whole call: output {worst} wrong", "WRONG", err=f"{errs[worst]:.1e}")
                        failed = True
                        continue
                    ms = timed(call.fn)
                    events = profile(call.fn, PROFILED_CALLS)
            except Exception as exc:  # one launcher's failure is a row, not the end of the probe
                row(name, path, f"FAILED: {common.short_reason(exc)}")
                failed = True
                continue
            try:
                kernels = attribute(events, PROFILED_CALLS)
            except ValueError as exc:
                kernels, labels, why = [], [], f"attribution failed: {exc}"
            else:
                labels, why = label_kernels([k for k, _ in kernels], launches)
            gemm_flops = sum(launch.flops for launch in launches)
            whole = "whole call" + (f" ({len(kernels)} kernels)" if kernels else "")
            row(name, path, whole, fmt_ms(ms), rate_cells(gemm_flops, ms, peak), err=f"{max(errs):.1e}")
            if why:
                row(name, path, why.replace("|", "/"))
            for (_, us), launch in zip(kernels, labels, strict=True):
                k_ms = us / 1e3
                cub = cublas.get(launch.cublas, (0, float("nan"), 0))[1]
                ratio = f"{cub / k_ms:.2f}" if cub == cub and k_ms > 0 else ""
                err = f"{max(errs[i] for i in launch.outputs):.1e}" if launch.outputs else ""
                row(name, path, launch.label, fmt_ms(k_ms), rate_cells(launch.flops, k_ms, peak), ratio, err)
        keys = dict.fromkeys(
            launch.cublas for launches in call.launches.values() for launch in launches if launch.cublas
        )
        for key in keys:
            if key in cublas:
                flops, ms, err = cublas[key]
                shown = "WRONG" if err > tol else fmt_ms(ms)
                row(name, "cublas", key, shown, rate_cells(flops, ms, peak), "1.00" if ms == ms else "", f"{err:.1e}")
    return failed


# linear_bias at a ViT block's forward shapes, as (product, N / C, K / C, the triton table's cuBLAS key).
VARIANT_PRODUCTS = (("qkv", 3, 1, "qkv_fwd_packed"), ("proj", 1, 1, "proj"), ("fc2", 1, 4, "fc2"))
SHIPPED = "shipped: cooperative 128x256x64 cluster 2x1"


def cuda_variants_table(M: int, C: int, device: str, dtype: torch.dtype, timed, peak, tol, cublas: dict) -> bool:
    """The sm_90a linear_bias at each forward shape of VARIANT_PRODUCTS on its shipped configuration and on each
    variant `_C` was built with (gemm_sm90_variants.cu), checked against fp32 torch, timed, beside cuBLAS's time
    from the triton table (`cublas`: key -> (FLOPs, ms, rel err)). True if a row failed."""
    failed = False
    print("| product | kernel | ms (median) | TFLOP/s | % peak | x shipped | x cuBLAS | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for product, n_of_c, k_of_c, key in VARIANT_PRODUCTS:
        N, K = n_of_c * C, k_of_c * C
        a = torch.randn(M, K, device=device).to(dtype)
        w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
        b = torch.randn(N, device=device).to(dtype)
        ref = a.float() @ w.float().t() + b.float()
        runs = [(SHIPPED, lambda a=a, w=w, b=b: cuda_linear.linear_fwd(a, w, b))]
        runs += [(v, lambda v=v, a=a, w=w, b=b: cuda_linear.linear_fwd_variant(a, w, b, v))
                 for v in cuda_linear.sm90_variants()]  # fmt: skip
        shipped_ms = float("nan")
        cub_ms = cublas.get(key, (0, float("nan"), 0))[1]
        for label, fn in runs:
            try:
                err = common.rel_error(fn(), ref)
                ms = timed(fn) if err <= tol else float("nan")
            except Exception as exc:  # a variant that fails is a row, not the end of the probe
                print(f"| {product} | {label} | FAILED: {common.short_reason(exc)} | | | | | |", flush=True)
                failed = True
                continue
            failed |= err > tol
            if label == SHIPPED:
                shipped_ms = ms
            rate, pct = rate_cells(2.0 * M * N * K, ms, peak)
            x_shipped, x_cublas = ratio_cell(shipped_ms, ms), ratio_cell(cub_ms, ms)
            shown = "WRONG" if err > tol else fmt_ms(ms)
            print(f"| {product} | {label} | {shown} | {rate} | {pct} | {x_shipped} | {x_cublas} | {err:.1e} |",
                  flush=True)  # fmt: skip
    return failed


def run_op(fn, leaves, backend: str, mode: str):
    """One call of an op of `ops` on `backend`, "fwd" or "fwd+bwd", with the gradient mode to match; fwd+bwd
    returns the gradients instead of accumulating them into .grad (no extra adds timed)."""
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        outs = fn(backend)
        if mode == "fwd+bwd":
            torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return outs


def ops_table(op_fns: dict, backend: str, paths: tuple[str, str], path_ctx, timed, torch_ms: dict) -> bool:
    """fwd and fwd+bwd of each op in torch and on `backend` on its (old, new) GEMM `paths`, entered with
    `path_ctx(path)`. torch's times are measured once and kept in torch_ms, (op, mode) -> ms. True if a row failed."""
    old, new = paths
    print(f"| op | mode | torch ms | {old} ms | {new} ms | {new} x torch | {new} x {old} |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for op, (fn, leaves) in op_fns.items():
        for mode in ("fwd", "fwd+bwd"):

            def run(backend, fn=fn, mode=mode, leaves=leaves):
                return run_op(fn, leaves, backend, mode)

            ms = {}
            try:
                if (op, mode) not in torch_ms:
                    run("torch")
                    torch_ms[op, mode] = timed(lambda run=run: run("torch"))
                ms["torch"] = torch_ms[op, mode]
                for path in paths:
                    with path_ctx(path):
                        run(backend)
                        ms[path] = timed(lambda run=run: run(backend))
            except Exception as exc:
                print(f"| {op} | {mode} | FAILED: {common.short_reason(exc)} | | | | |", flush=True)
                failed = True
                continue
            cells = [fmt_ms(ms[k]) for k in ("torch", old, new)]
            ratios = [ratio_cell(ms[a], ms[b]) for a, b in (("torch", new), (old, new))]
            print(f"| {op} | {mode} | {' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="images: 256 on a GPU, 2 on CPU")
    parser.add_argument("--variants", action="store_true", help="also time the TMA kernels at other configs")
    parser.add_argument("--peaks", type=Path, help="JSON from `python benchmarks/common.py --json`: skip measuring")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    B = args.batch or (256 if gpu else 2)
    N, C, H = (197, 768, 12) if gpu else (45, 64, 2)
    dtype = torch.bfloat16 if gpu else torch.float16  # the CPU interpreter has no native bf16
    dname = next(k for k, v in common.DTYPES.items() if v == dtype)
    torch.manual_seed(0)
    arch = vit_triton.arch(torch.device(device))
    name = torch.cuda.get_device_name() if gpu else "cpu (untimed: the interpreter)"
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    failed = False
    # Nothing on CPU is timed, so its peak is not measured there (--peaks still reads one).
    peaks = common.measure_peaks(device, [dname], args.peaks) if gpu or args.peaks else None
    peak = peaks.tflops(dname) if peaks else None

    def timed(fn):
        return common.bench(lambda _i: fn(), 1, device).median_ms if gpu else float("nan")

    print(f"## probe_gemm: ViT block GEMMs, B={B} N={N} C={C}, {str(dtype)[6:]}, {name}\n")
    where = f"from {args.peaks}" if args.peaks else "measured here"
    print(f"matmul peak ({dname}): " + (f"{peak:.0f} TFLOP/s ({where})" if peak else "not measured (untimed)") + "\n")
    print("| product | way | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |")
    print("|---|---|---|---|---|---|---|")
    cublas = {}  # product -> (FLOPs, ms, rel err): cuBLAS's row, reused by the cuda table
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
                    print(f"| {product} | {way} | FAILED: {common.short_reason(exc)} | | | | |", flush=True)
                    failed |= fields is None
                    continue
                ok = err <= tol
                failed |= not ok and fields is None
                results[way] = timed(fn) if ok else float("nan")
            ms, cub = results[way], results.get("cublas")
            rate, pct = rate_cells(flops, ms, peak)
            ratio = ratio_cell(cub, ms)
            shown = "WRONG" if not ok else fmt_ms(ms)
            print(f"| {product} | {way} | {shown} | {rate} | {pct} | {ratio} | {err:.1e} |", flush=True)
            if way == "cublas":
                cublas[product] = (flops, ms, err)

    # The per-kernel tables first, the ops end to end last: no GPU has timed the cuda kernels yet, while the ops'
    # new paths are also in the mlp and block tables, so a stage cut at its slice keeps what is measured nowhere else.
    reason = cuda_skip_reason(device, dtype)
    if reason is None:
        failed |= cuda_kernel_tables(B, N, C, H, device, dtype, timed, peak, tol, cublas, args.variants)
    else:
        print(f"\n## cuda: skipped: {reason}")

    op_fns = ops(B, N, C, H, device, dtype)
    torch_ms = {}
    print("\n## ops end to end: triton on each GEMM path against eager torch\n")
    failed |= ops_table(op_fns, "triton", ("pointer", "tma"), gemm_path, timed, torch_ms)
    if reason is None:
        print("\n## ops end to end: cuda on each GEMM path against eager torch\n")
        failed |= ops_table(op_fns, "cuda", CUDA_PATHS, cuda_gemm_path, timed, torch_ms)
    return 1 if failed else 0


def cuda_kernel_tables(B, N, C, H, device, dtype, timed, peak, tol, cublas: dict, variants: bool) -> bool:
    """The cuda launchers per kernel on both GEMM paths, then (--variants, bf16) linear_bias's configuration
    variants. True if a row failed."""
    print("\n## cuda: mma.sync vs sm_90a (CUTLASS) vs cuBLAS\n")
    print(f"GEMM path here: {cuda_linear.gemm_path(torch.device(device), dtype)}; mma.sync: csrc/gemm.cu's kernels,")
    print('forced by replacing vit_kernels.cuda.linear._sm90. "whole call": the launcher timed by CUDA events;')
    print(f"below it each kernel it launched, device time from torch.profiler, median over {PROFILED_CALLS} calls;")
    print("x cuBLAS: cuBLAS's time for the same product / this kernel's; rel err: of the outputs the kernel writes.\n")
    table, extra_cublas = cuda_calls(B, N, C, H, device, dtype)
    failed = cuda_products_table(table, extra_cublas, cublas, timed, kernel_times, peak, tol)
    del table, extra_cublas
    if variants and dtype == torch.bfloat16:
        print("\n## cuda: linear_bias configuration variants (sm_90a, bf16; csrc/gemm_sm90_variants.cu)\n")
        print("x shipped: the shipped configuration's time / this one's; x cuBLAS: cuBLAS's time (the table above)")
        print("/ this one's. Each checked against fp32 torch first.\n")
        failed |= cuda_variants_table(B * N, C, device, dtype, timed, peak, tol, cublas)
    return failed


if __name__ == "__main__":
    sys.exit(main())
