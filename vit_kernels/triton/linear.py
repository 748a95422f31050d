"""Fused QKV projection and GELU-MLP in Triton: one tiled tensor-core GEMM with fused prologues and epilogues.

    qkv:  q, k, v = split_heads(x @ W^T + b)                       x (B, N, C), W (3C, C)
    mlp:  y = gelu(x @ W1^T + b1) @ W2^T + b2                      x (M, C), W1 (Hd, C), W2 (C_out, Hd)

Layout of this file: `@triton.jit` kernels, then the config table, then the plain launchers `qkv_fwd`, `qkv_bwd`,
`mlp_fwd`, `mlp_bwd` (the kernel-module contract of `vit_kernels/ops/fused_qkv.py` and `ops/gelu_mlp.py`), then
`compile_report`, a static check that compiles the shipped configs for sm_80 / sm_90 without a GPU.

Every product is one launch of `_gemm_kernel`: C (M, N) = epilogue(A (M, K) @ B (K, N)), fp32 accumulation,
A and B read through their strides, so x @ W^T, dY @ W and dY^T @ X need no transposed copies. Each operand's
row index r is read as (r // ROWS, r % ROWS) with two strides, which lets a (B, N, C) x that cannot be viewed as
(B * N, C) be read in place; ROWS = 1 (the usual case) is specialised by Triton to a constant and costs nothing.
Constexpr switches pick
  A_MODE     0: A from memory; 1: A = dQKV (M, 3C); 2: A = dQKV^T (3C, M), both virtual: element (token, j) is read
             from dq / dk / dv (B, H, N, D) with their own strides (j -> which = j // C, head = j % C // D, d = j % D),
             so qkv_bwd never gathers the three gradients into one tensor.
  EPILOGUE   0: store (+ bias); 1: + bias, store GELU of it and, when STORE_PRE, the pre-activation itself;
             2: + bias, scatter column n to three (B, H, N, D) buffers q / k / v (the head split); 3: dGELU: store
             acc * GELU'(hidden) and GELU(hidden).

Bias gradients are column sums of dY, never in a GEMM's mainloop (a fused row sum slows every program of the dW GEMM,
benchmarks/NOTES.md, gelu_mlp): a torch reduction beside the GEMMs, except dfc1_bias on the Hopper path, which the
dGELU epilogue sums per row tile (fp32 partials added in row-tile order: deterministic, no second pass).

Precision: fp16 / bf16 operands on tensor cores with fp32 accumulation, each output rounded once to the input
dtype; fp32 operands through tf32 tensor cores when `allow_tf32`, else exact fp32 ("ieee") dots. GELU and its
derivative are evaluated in fp32: exact (erf) or the tanh form.

Saved for backward (by the `_setup` of those op modules): qkv: x and W only (dQKV arrives as dq, dk, dv; nothing else is
needed). mlp: x, W1, W2 and hidden = x @ W1^T + b1 (M, Hd) in x's dtype, returned only when a gradient will be
asked for (mlp_fwd's save_hidden): GELU' needs the pre-activation, and the activation GELU(hidden) is recomputed
from it in backward by the dGELU epilogue rather than kept alive between forward and backward (that would be a
second (M, Hd) tensor per block).
Forward stores the activation too, into a scratch (M, Hd) buffer freed when fc2 returns, instead of applying
GELU while fc2 loads its A tiles: fc2 reloads every A tile once per N-tile (C_out / BLOCK_N = 3 to 6 times for
ViT), and erf on the CUDA cores at that rate would compete with the tensor cores; the store is one write in
fc1's epilogue. Backward likewise writes GELU(hidden) once (dGELU epilogue) for dW2 = dY^T @ GELU(hidden).

Launch configs: a deterministic table (no autotuning, so a call never pays for a benchmark sweep) keyed on the
GPU generation (capability major: sm_90 or sm_80 and newer non-Hopper), the operand precision (16-bit, tf32,
ieee fp32) and a shape class from the number of 128 x 128 output tiles versus the SM count. See `config`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vit_kernels import triton as vit_triton
from vit_kernels.triton import packed_qkv, static_check, tma_gemm
from vit_kernels.triton.gemm_helpers import gelu_fwd, gelu_fwd_bwd, grouped_tile, split_offset, store_head_split
from vit_kernels.triton.tma_gemm import GemmConfig

EPI_STORE, EPI_GELU, EPI_QKV, EPI_DGELU = 0, 1, 2, 3
A_MEMORY, A_DQKV, A_DQKV_T = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dqkv_ptrs(
    DQ, DK, DV,  # (B, H, N_TOK, D) each, any strides
    tok, j,  # token index and column of dQKV (M, 3C), broadcastable against each other
    N_TOK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    QKV_C: tl.constexpr, QKV_D: tl.constexpr,
):  # fmt: skip
    # The index map dQKV[tok, j] -> d{q,k,v}[b, h, t, d]. C and D are constexprs so that d = j % D keeps the
    # contiguity of j (vectorised loads along the head dim) and which / h cost shifts or multiplies.
    # 64-bit: with "any strides" each of b, t, h, d times its stride can pass 2^31 elements on its own.
    b = (tok // N_TOK).to(tl.int64)
    t = (tok % N_TOK).to(tl.int64)
    which = j // QKV_C
    h = ((j % QKV_C) // QKV_D).to(tl.int64)
    d = (j % QKV_D).to(tl.int64)
    pq = DQ + (b * stride_qb + t * stride_qt) + (h * stride_qh + d * stride_qd)
    pk = DK + (b * stride_kb + t * stride_kt) + (h * stride_kh + d * stride_kd)
    pv = DV + (b * stride_vb + t * stride_vt) + (h * stride_vh + d * stride_vd)
    return tl.where(which == 0, pq, tl.where(which == 1, pk, pv))


@triton.jit
def _gemm_kernel(
    A,  # (M, K), rows split as (M // A_ROWS, A_ROWS); unused for A_MODE 1 / 2
    B,  # (K, N), rows split as (K // B_ROWS, B_ROWS)
    C,  # (M, N); EPILOGUE 1: the pre-activation, written when STORE_PRE; EPILOGUE 2: q (B, H, N_TOK, D) contiguous
    C2,  # (M, N) with C's strides: GELU(pre-activation) for EPILOGUE 1 / 3; EPILOGUE 2: k like q
    C3,  # EPILOGUE 2: v like q
    Bias,  # (N,) contiguous, read when HAS_BIAS
    Hid,  # (M, N) pre-activation, read by EPILOGUE 3
    DQ, DK, DV,  # (B, H, N_TOK, D) each, any strides: the virtual A of A_MODE 1 / 2
    M, N, K,
    A_ROWS, stride_a_outer, stride_a_inner, stride_ak,
    B_ROWS, stride_b_outer, stride_b_inner, stride_bn,
    stride_cm, stride_cn, stride_hm, stride_hn,
    N_TOK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    K_SPLIT,  # SPLIT_K: the K elements of one slice (a multiple of BLOCK_K)
    A_MODE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr, TANH: tl.constexpr, QKV_C: tl.constexpr, QKV_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    # SPLIT_K: grid axis 1 cuts K into slices of K_SPLIT; each program writes its fp32 partial product into slice
    # program_id(1) of C (SPLIT_K, M, N), which the launcher adds up.
    # Only plain stores (EPILOGUE 0, no bias).
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT_K:
        k_lo = tl.program_id(1) * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
    else:
        k_lo = 0
        k_hi = K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Masked (zero-filled) edges rather than wrapped indices: M = B * 197 never fills a tile.
    # Every index is widened to 64 bits before it meets a stride: an index below 2^31 times a stride below 2^31
    # can still pass 2^31 elements (the dfc1 weight gradient reads dhidden^T, k up to B*N tokens times stride
    # Hd: 590,848 x 4096 for ViT-L/16 at 384 px, batch 1024). Unit strides are constants, so those cost nothing.
    a_rows = split_offset(offs_m, A_ROWS, stride_a_outer, stride_a_inner)  # (BLOCK_M,) used by A_MODE 0
    b_cols = offs_n.to(tl.int64) * stride_bn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K  # slices start at multiples of BLOCK_K, so only K itself cuts a tile
        if A_MODE == 0:
            a_ptrs = A + a_rows[:, None] + (offs_k.to(tl.int64) * stride_ak)[None, :]
        elif A_MODE == 1:  # dQKV (M, 3C): rows are tokens, K runs over the 3C columns
            a_ptrs = _dqkv_ptrs(
                DQ, DK, DV, offs_m[:, None], offs_k[None, :], N_TOK,
                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd, QKV_C, QKV_D,
            )  # fmt: skip
        else:  # dQKV^T (3C, M): rows are the 3C columns, K runs over tokens
            a_ptrs = _dqkv_ptrs(
                DQ, DK, DV, offs_k[None, :], offs_m[:, None], N_TOK,
                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd, QKV_C, QKV_D,
            )  # fmt: skip
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b_rows = split_offset(offs_k, B_ROWS, stride_b_outer, stride_b_inner)
        b = tl.load(B + b_rows[:, None] + b_cols[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    out_ty = C.dtype.element_ty
    if EPILOGUE == 2:
        store_head_split(C, C2, C3, acc.to(out_ty), offs_m, offs_n, c_mask, N_TOK, QKV_C, QKV_D)
    else:
        c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + (offs_n.to(tl.int64) * stride_cn)[None, :]
        if SPLIT_K:
            c_offs += tl.program_id(1).to(tl.int64) * M * N
        if EPILOGUE == 0:
            tl.store(C + c_offs, acc.to(out_ty), mask=c_mask)
        elif EPILOGUE == 1:
            # The pre-activation is rounded to the storage dtype first, so that the activation stored here and
            # the one backward recomputes from `hidden` are the same numbers.
            pre = acc.to(out_ty)
            if STORE_PRE:  # only backward needs it: inference skips this (M, N) write
                tl.store(C + c_offs, pre, mask=c_mask)
            tl.store(C2 + c_offs, gelu_fwd(pre.to(tl.float32), TANH).to(out_ty), mask=c_mask)
        else:
            h_offs = offs_m.to(tl.int64)[:, None] * stride_hm + (offs_n.to(tl.int64) * stride_hn)[None, :]
            hid = tl.load(Hid + h_offs, mask=c_mask, other=0.0).to(tl.float32)
            act, grad = gelu_fwd_bwd(hid, TANH)
            tl.store(C + c_offs, (acc * grad).to(out_ty), mask=c_mask)
            tl.store(C2 + c_offs, act.to(out_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------------
# A GemmConfig (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; tma_gemm.py's type, whose `flatten` and
# `quarters` the pointer kernel does not have) per (arch, precision, shape class).
# Deterministic: no autotuning, so the first call of a shape costs one compile and nothing else.
#  - Shape class from the 128 x 128 tile count versus the SM count (132 on H100, 108 on A100): "small" (under one
#    wave, e.g. ViT at batch 1 or the dW products of small batches, whose M x N is only features x features) takes
#    64-row tiles for twice the programs; "large" (N >= 2048 and >= 4 waves) takes 128 x 256 on Hopper, where one
#    8-warp program keeps two m64 wgmma warpgroups busy on a 256-wide B tile; else 128 x 128. Not for the GELU
#    epilogues: erf / exp temporaries on top of a 128 x 256 fp32 accumulator spill on sm_90 (400 bytes for GELU,
#    5 KB for dGELU at 255 registers), so those stay at 128 x 128 (medium). dGELU also caps BLOCK_N at 64: it
#    holds the hidden tile, GELU and GELU' besides the accumulator, and Triton evaluates erf once in the mma layout
#    (for GELU') and once in the store layout (for GELU), which spilled 1-1.6 KB at 128 x 128.
#  - sm_90 16-bit: BLOCK_K = 64 (128-byte rows: full-width swizzled smem for wgmma), 3-4 stages (<= 147 KB smem).
#  - sm_80 16-bit: the classic Ampere 128 x 128 x 32, 4 stages (64 KB smem), 8 warps for headroom in the GELU
#    epilogues; 4 warps at 64 rows.
#  - fp32: twice the bytes per tile: BLOCK_K = 32 and 3 stages (tf32); exact "ieee" fp32 dots (PyTorch's default
#    matmul precision "highest") are FMA loops that hold operand rows in registers, so they get 64 x 64 tiles on 8
#    warps: 4 warps spilled 16 bytes in mlp_bwd_dx on Triton 3.9 sm_90 (96 registers); 8 warps need <= 80.
#  - Every config compiles with 0 spills for sm_80 and sm_90 on Triton 3.6, 3.8 and 3.9 (tests/test_static_kernels.py).
#    The tiles come from this static step, not from a timed sweep (GPU runs: benchmarks/NOTES.md).
#  - The interpreter (CPU tensors) runs every program in numpy: one mid-size tile keeps the tests quick.
_SM_COUNT = {90: 132, 80: 108}
_CONFIGS = {
    (90, "16bit", "large"): GemmConfig(128, 256, 64, 8, 8, 3),
    (90, "16bit", "medium"): GemmConfig(128, 128, 64, 8, 8, 4),
    (90, "16bit", "small"): GemmConfig(64, 128, 64, 8, 4, 4),
    (90, "tf32", "large"): GemmConfig(128, 128, 32, 8, 8, 3),
    (90, "tf32", "medium"): GemmConfig(128, 128, 32, 8, 8, 3),
    (90, "tf32", "small"): GemmConfig(64, 128, 32, 8, 4, 3),
    (80, "16bit", "large"): GemmConfig(128, 128, 32, 8, 8, 4),
    (80, "16bit", "medium"): GemmConfig(128, 128, 32, 8, 8, 4),
    (80, "16bit", "small"): GemmConfig(64, 128, 32, 8, 4, 4),
    (80, "tf32", "large"): GemmConfig(128, 128, 32, 8, 8, 3),
    (80, "tf32", "medium"): GemmConfig(128, 128, 32, 8, 8, 3),
    (80, "tf32", "small"): GemmConfig(64, 128, 32, 8, 4, 3),
}
_IEEE_CONFIG = GemmConfig(64, 64, 32, 8, 8, 2)
_INTERPRETER_CONFIG = GemmConfig(32, 64, 32, 4, 4, 1)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if allow_tf32 else "ieee"


def config(M: int, N: int, dtype: torch.dtype, allow_tf32: bool, arch: int, epilogue: int = EPI_STORE) -> GemmConfig:
    """The GemmConfig of an (M, N) output (see the table)."""
    if arch == 0:
        return _INTERPRETER_CONFIG
    precision = _precision(dtype, allow_tf32)
    if precision == "ieee":
        return _IEEE_CONFIG
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    if tiles < _SM_COUNT[arch]:
        shape_class = "small"
    elif N >= 2048 and tiles >= 4 * _SM_COUNT[arch] and epilogue in (EPI_STORE, EPI_QKV):
        shape_class = "large"
    else:
        shape_class = "medium"
    cfg = _CONFIGS[(arch, precision, shape_class)]
    if epilogue == EPI_DGELU:
        cfg = cfg._replace(block_n=min(cfg.block_n, 64))
    return cfg


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
class Operand:
    """A 2-D GEMM operand (R, S) as (pointer, ROWS, stride_outer, stride_inner, stride_col): row r lives at
    (r // ROWS) * stride_outer + (r % ROWS) * stride_inner. Built from a 2-D tensor, or from a 3-D (B, N, C)
    tensor read as (B * N, C), or transposed, all without copies."""

    def __init__(self, t: torch.Tensor, transpose: bool = False):
        if t.dim() == 3:
            assert not transpose
            B_, N_, _ = t.shape
            if N_ == 1:
                self.args = (t, 1, t.stride(0), 0, t.stride(2))
            elif B_ == 1 or t.stride(0) == N_ * t.stride(1):  # (B, N) merge into one stride
                self.args = (t, 1, t.stride(1), 0, t.stride(2))
            else:
                self.args = (t, N_, t.stride(0), t.stride(1), t.stride(2))
        else:
            s_r, s_c = (t.stride(1), t.stride(0)) if transpose else t.stride()
            self.args = (t, 1, s_r, 0, s_c)


def kernel_args(
    a: Operand | None,
    b: Operand,
    c: torch.Tensor,
    M: int,
    N: int,
    K: int,
    dtype: torch.dtype,
    allow_tf32: bool,
    arch: int,
    *,
    epilogue: int = EPI_STORE,
    bias: torch.Tensor | None = None,
    c2: torch.Tensor | None = None,
    c3: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    store_pre: bool = True,
    tanh: bool = False,
    a_mode: int = A_MEMORY,
    dqkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    n_tok: int = 1,
    qkv_c: int = 1,
    qkv_d: int = 1,
    split_k: int = 1,
    launch_config: GemmConfig | None = None,
) -> tuple[tuple, dict, tuple[int, ...]]:
    """(positional args, constexpr and launch kwargs, grid) of one `_gemm_kernel` launch computing
    C (M, N) = epilogue(A (M, K) @ B (K, N)). Pointers a product does not read are passed as `c`.
    split_k > 1: K in that many slices (fewer where K is short), each program's fp32 partial into slice
    program_id(1) of c (slices, M, N), contiguous; the grid's second axis says how many.
    launch_config replaces the table's `config` (benchmarks/probe_weight_grad.py's other tiles)."""
    cfg = launch_config or config(M, N, dtype, allow_tf32, arch, epilogue)
    k_split = triton.cdiv(triton.cdiv(K, split_k), cfg.block_k) * cfg.block_k
    slices = triton.cdiv(K, k_split)
    a_args = a.args if a is not None else (c, 1, 0, 0, 0)
    dq, dk, dv = dqkv if dqkv is not None else (c, c, c)
    qkv_strides = (*dq.stride(), *dk.stride(), *dv.stride()) if dqkv is not None else (0,) * 12
    c_strides = c.stride() if c.dim() == 2 else (0, 0)
    h_strides = hidden.stride() if hidden is not None else (0, 0)
    args = (
        a_args[0], b.args[0], c, c2 if c2 is not None else c, c3 if c3 is not None else c,
        bias if bias is not None else c,
        hidden if hidden is not None else c, dq, dk, dv,
        M, N, K, *a_args[1:], *b.args[1:], *c_strides, *h_strides, n_tok, *qkv_strides,
        k_split if split_k > 1 else K,  # K when unused: the same integer specialisation as K, no extra compile
    )  # fmt: skip
    kwargs = dict(
        A_MODE=a_mode, EPILOGUE=epilogue, HAS_BIAS=bias is not None, STORE_PRE=store_pre, TANH=tanh,
        QKV_C=qkv_c, QKV_D=qkv_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INPUT_PRECISION=vit_triton.input_precision(dtype, allow_tf32), SPLIT_K=split_k > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    grid = (tiles, slices) if split_k > 1 else (tiles,)
    return args, kwargs, grid


_MAX_INT32 = 2**31 - 1  # also CUDA's limit on grid axis 0, the only axis the GEMM uses


def check_gemm_size(M: int, N: int, K: int, grid: tuple[int]) -> None:
    """ValueError where a GEMM launch (this file's or block.py's) would pass its kernel's 32-bit limits."""
    # Tile row / column / k indices are int32 in the kernel (addresses are not): past this they would wrap.
    if max(M, N, K) > _MAX_INT32 - 1024 or grid[0] > _MAX_INT32:
        raise ValueError(f"GEMM ({M} x {K}) @ ({K} x {N}) is too large for 32-bit tile indices; split the batch")


def launch(a, b, c, M, N, K, dtype, allow_tf32, split_k: int = 1, **epilogue) -> None:
    if split_k > 1:
        _launch_split_k(a, b, c, M, N, K, dtype, allow_tf32, split_k, **epilogue)
        return
    args, kwargs, grid = kernel_args(a, b, c, M, N, K, dtype, allow_tf32, vit_triton.arch(c.device), **epilogue)
    check_gemm_size(M, N, K, grid)
    with vit_triton.on_device(c):
        _gemm_kernel[grid](*args, **kwargs)


def _launch_split_k(a, b, c, M, N, K, dtype, allow_tf32, split_k: int, **epilogue) -> None:
    """C (M, N) = A @ B with K cut into `split_k` slices, for products whose M x N tiles are too few to fill the
    GPU while K is long (the weight gradients: K = tokens). fp32 partials (slices, M, N), added up in slice order
    by torch (deterministic) and rounded once. Plain stores only. The ops use it where `WEIGHT_GRAD_SPLIT_K` says
    (benchmarks/probe_weight_grad.py measures it)."""
    assert not epilogue.get("bias") and epilogue.get("epilogue", EPI_STORE) == EPI_STORE, "split-K stores only"
    partial = vit_triton.alloc(split_k, M, N, like=c, dtype=torch.float32)
    arch = vit_triton.arch(c.device)
    args, kwargs, grid = kernel_args(a, b, partial[0], M, N, K, dtype, allow_tf32, arch, split_k=split_k, **epilogue)
    check_gemm_size(M, N, K, grid)
    with vit_triton.on_device(c):
        _gemm_kernel[grid](*args, **kwargs)
        slices = grid[1]
        c.copy_(partial[:slices].sum(0))


# K slices of the weight-gradient GEMMs (dW = dY^T @ X, K = tokens), which have few output tiles (features x
# features) over a long K. 1: no split, until benchmarks/probe_weight_grad.py times a split 1.3x faster
# (benchmarks/NOTES.md, gelu_mlp).
WEIGHT_GRAD_SPLIT_K = 1


def _weight_grad(a: Operand, b: Operand, c: torch.Tensor, M: int, N: int, K: int, dtype, allow_tf32, **kw) -> None:
    """c (M, N) = a @ b for a weight gradient (K = tokens)."""
    launch(a, b, c, M, N, K, dtype, allow_tf32, split_k=WEIGHT_GRAD_SPLIT_K, **kw)


def bias_grad(dy: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N,) = column sums of dy (M, N), any strides, accumulated in fp32 and rounded once. A torch reduction
    (deterministic): see the module docstring for why it is not fused into the weight-gradient GEMM."""
    out.copy_(dy.sum(0, dtype=torch.float32))
    return out


def qkv_bias_grad(dqkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out (3C,) = column sums of the virtual dQKV (B*N, 3C): each of dq, dk, dv (B, H, N, D), any strides, summed
    over batch and tokens into bias columns i*C + h*D + d; fp32 accumulation, rounded once (as `bias_grad`)."""
    C = out.numel() // 3
    for i, g in enumerate(dqkv):
        out[i * C : (i + 1) * C].copy_(g.sum((0, 2), dtype=torch.float32).view(C))
    return out


# ----------------------------------------------------------------------------------------------------
# the Hopper path: tma_gemm's persistent TMA kernels
# ----------------------------------------------------------------------------------------------------
# qkv_fwd(..., packed=True) returns q, k, v as slices of one (B, N, 3, H, D) buffer (ops/fused_qkv.py's eager path).
PACKED_QKV = True

# Archs whose GEMMs run on tma_gemm.py where the operands allow it (16-bit or tf32 dots, views TMA can describe);
# everything else runs `_gemm_kernel`. 0 is the interpreter (CPU tensors): the CPU tests run the Hopper path, and
# set this to () to run the pointer kernel that sm_80 runs.
TMA_ARCHS = (90, 0)


def tma_path(
    arch: int, dtype: torch.dtype, allow_tf32: bool, *views: torch.Tensor | None, rows: tuple[torch.Tensor, ...] = ()
) -> bool:
    """Whether a GEMM runs on tma_gemm.py: views its operands (any layout TMA can read), rows the tensors it must
    find stored by rows (outputs, and inputs read through an output's descriptor)."""
    return (
        arch in TMA_ARCHS
        and vit_triton.input_precision(dtype, allow_tf32) == "tf32"
        and all(v is not None for v in views)
        and tma_gemm.describable(*views, rows=rows)
    )


def matrix_view(t: torch.Tensor) -> torch.Tensor | None:
    """t (B, N, C) or (M, C) as an (M, C) view, or None where its batch and token dims do not merge into one
    stride (that layout runs the pointer kernel, which reads split rows in place)."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def tma_launch(kernel, args, kwargs, grid, M: int, N: int, K: int, out: torch.Tensor) -> None:
    check_gemm_size(M, N, K, grid)
    with vit_triton.on_device(out):
        tma_gemm.launch(kernel, args, kwargs, grid)


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, allow_tf32: bool, bias: torch.Tensor | None = None):
    """c (M, N) = a (M, K) @ b (K, N) (+ bias (N,)): 2-D views, any strides, c contiguous. TMA on Hopper where the
    views allow it, else `_gemm_kernel` (block.py's products go through here too)."""
    (M, K), N = a.shape, b.shape[1]
    arch = vit_triton.arch(c.device)
    if tma_path(arch, a.dtype, allow_tf32, a, b, rows=(c,)):
        tma_launch(*tma_gemm.store_args(a, b, c, vit_triton.contiguous_vector(bias), allow_tf32, arch), M, N, K, c)
    else:
        launch(Operand(a), Operand(b), c, M, N, K, a.dtype, allow_tf32, bias=vit_triton.contiguous_vector(bias))


def weight_grad(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, allow_tf32: bool) -> None:
    """c (M, N) = a (M, K) @ b (K, N) for a weight gradient (K = tokens): on Hopper, split along K until the work
    units fill the SMs (`tma_gemm.split_k_slices`); else `_weight_grad`. b may be a (B, T, N) activation whose
    token dims do not merge (the pointer kernel reads its rows in place)."""
    (M, K), N = a.shape, b.shape[-1]
    arch = vit_triton.arch(c.device)
    b2 = matrix_view(b)
    if tma_path(arch, a.dtype, allow_tf32, a, b2, rows=(c,)):
        check_gemm_size(M, N, K, (1,))
        with vit_triton.on_device(c):
            tma_gemm.weight_grad(a, b2, c, allow_tf32, arch)
    else:
        _weight_grad(Operand(a), Operand(b), c, M, N, K, a.dtype, allow_tf32)


def _packed_dqkv(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """dQKV (B*N, 3C) as one matrix: a view where dq, dk, dv are the q / k / v slices of one (B, N, 3, H, D) buffer,
    else a gather copy into one (what TMA needs: the pointer kernel reads the three in place instead)."""
    B, H, N, D = dq.shape
    C = H * D
    packed = packed_qkv(dq, dk, dv)
    if packed is not None:
        return packed.view(B * N, 3 * C)
    packed = vit_triton.alloc(B, N, 3, H, D, like=dq)
    for i, g in enumerate((dq, dk, dv)):
        packed[:, :, i].copy_(g.transpose(1, 2))
    return packed.view(B * N, 3 * C)


def qkv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    allow_tf32: bool,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, N, C) any strides, weight (3C, C), bias (3C,) or None -> q, k, v (B, H, N, C // H): contiguous, or with
    `packed` the q / k / v slices of one (B, N, 3, H, D) buffer (what `reference.fused_qkv`'s unbind returns; only
    outside custom ops, whose outputs may not alias: ops/fused_qkv.py's eager path asks for it).

    One GEMM, (B*N, C) @ (C, 3C). Packed, it is a plain GEMM (TMA-stored on Hopper) into the (B*N, 3C) buffer;
    else its epilogue adds the bias and scatters column n to (which = n // C, head = n % C // D, d = n % D) of q,
    k, v. No (B, N, 3C) intermediate either way, and nothing extra is saved for backward beyond x and weight.
    """
    B, N, C = x.shape
    D = C // num_heads
    x2 = matrix_view(x)
    if packed and x2 is not None:
        qkv = vit_triton.alloc(B, N, 3, num_heads, D, like=x)
        gemm(x2, weight.t(), qkv.view(B * N, 3 * C), allow_tf32, bias=bias)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    q, k, v = (vit_triton.alloc(B, num_heads, N, D, like=x) for _ in range(3))
    arch = vit_triton.arch(x.device)
    if tma_path(arch, x.dtype, allow_tf32, x2, weight):
        tma_args = tma_gemm.qkv_args(x2, weight.t(), q, k, v, vit_triton.contiguous_vector(bias), N, allow_tf32, arch)
        tma_launch(*tma_args, B * N, 3 * C, C, q)
        return q, k, v
    launch(
        Operand(x), Operand(weight, transpose=True), q, B * N, 3 * C, C, x.dtype, allow_tf32,
        epilogue=EPI_QKV, c2=k, c3=v, bias=vit_triton.contiguous_vector(bias), n_tok=N, qkv_c=C, qkv_d=D,
    )  # fmt: skip
    return q, k, v


def qkv_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dq, dk, dv (B, H, N, D) any strides; x (B, N, C); weight (3C, C) -> dx (B, N, C), dweight (3C, C), dbias.

    dx = dQKV @ weight and dweight = dQKV^T @ x, where dQKV (B*N, 3C) is virtual: both GEMMs read it in place from
    dq, dk, dv through an index map in the A load (no gather copy, no torch.cat). dbias (3C,) = column sums of
    dQKV, i.e. each of dq, dk, dv summed over batch and tokens; None when has_bias is False.
    """
    B, H, N, D = dq.shape
    C = H * D
    M = B * N
    dqkv = (dq, dk, dv)
    dx = vit_triton.alloc(B, N, C, like=x)
    dweight = vit_triton.alloc(3 * C, C, like=weight)
    dbias = vit_triton.alloc(3 * C, like=x) if has_bias else None
    arch, x2 = vit_triton.arch(x.device), matrix_view(x)
    if tma_path(arch, x.dtype, allow_tf32, x2, weight):
        # Hopper: dQKV as one (M, 3C) matrix (TMA cannot gather), then two plain GEMMs and a column sum.
        packed = _packed_dqkv(dq, dk, dv)
        gemm(packed, weight, dx.view(M, C), allow_tf32)
        weight_grad(packed.t(), x2, dweight, allow_tf32)
        if dbias is not None:
            bias_grad(packed, dbias)
        return dx, dweight, dbias
    launch(
        None, Operand(weight), dx.view(M, C), M, C, 3 * C, x.dtype, allow_tf32,
        a_mode=A_DQKV, dqkv=dqkv, n_tok=N, qkv_c=C, qkv_d=D,
    )  # fmt: skip
    x_op = Operand(x)  # (B*N, C): rows are the K index of this product
    _weight_grad(
        None, x_op, dweight, 3 * C, C, M, x.dtype, allow_tf32, a_mode=A_DQKV_T, dqkv=dqkv, n_tok=N, qkv_c=C, qkv_d=D
    )
    if dbias is not None:
        qkv_bias_grad(dqkv, dbias)
    return dx, dweight, dbias


def mlp_fwd(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str,
    allow_tf32: bool,
    save_hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (M, C) any strides; fc1 (Hd, C), (Hd,); fc2 (C_out, Hd), (C_out,) -> y (M, C_out), hidden (M, Hd) or None.

    fc1: hidden = x @ fc1_weight^T + fc1_bias with a GELU epilogue that also writes act = GELU(hidden) into a
    scratch buffer; fc2: y = act @ fc2_weight^T + fc2_bias. hidden (the pre-activation, x's dtype) is returned
    to be saved for backward; act is freed on return (see the module docstring for why it is stored at all).
    Without `save_hidden` (no gradient will be asked for) hidden is None and never written: both fc1 kernels
    (the Hopper TMA one and `_gemm_kernel`) run their GELU epilogue with STORE_PRE off, one (M, Hd) store less.
    """
    M, C = x.shape
    Hd, C_out = fc1_weight.shape[0], fc2_weight.shape[0]
    hidden = vit_triton.alloc(M, Hd, like=x) if save_hidden else None
    act = vit_triton.alloc(M, Hd, like=x)
    y = vit_triton.alloc(M, C_out, like=x)
    arch = vit_triton.arch(x.device)
    stored = tuple(t for t in (hidden, act) if t is not None)
    if tma_path(arch, x.dtype, allow_tf32, x, fc1_weight, fc2_weight, rows=stored):
        tma_args = tma_gemm.gelu_args(x, fc1_weight.t(), hidden, act, vit_triton.contiguous_vector(fc1_bias),
                                      approximate == "tanh", allow_tf32, arch)  # fmt: skip
        tma_launch(*tma_args, M, Hd, C, act)
        gemm(act, fc2_weight.t(), y, allow_tf32, bias=fc2_bias)
        return y, hidden
    launch(
        Operand(x), Operand(fc1_weight, transpose=True), hidden if save_hidden else act, M, Hd, C, x.dtype,
        allow_tf32, epilogue=EPI_GELU, bias=vit_triton.contiguous_vector(fc1_bias), c2=act,
        store_pre=save_hidden, tanh=approximate == "tanh",
    )  # fmt: skip
    launch(
        Operand(act), Operand(fc2_weight, transpose=True), y, M, C_out, Hd, x.dtype, allow_tf32,
        bias=vit_triton.contiguous_vector(fc2_bias),
    )  # fmt: skip
    return y, hidden


def mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    hidden: torch.Tensor,
    has_fc1_bias: bool,
    has_fc2_bias: bool,
    approximate: str,
    allow_tf32: bool,
):
    """dy (M, C_out), x (M, C), hidden (M, Hd), any strides -> dx (M, C), dfc1_weight (Hd, C), dfc1_bias (Hd,)
    or None, dfc2_weight (C_out, Hd), dfc2_bias (C_out,) or None.

    Four GEMMs: dhidden = (dy @ fc2_weight) * GELU'(hidden) (dGELU epilogue, which also writes act = GELU(hidden));
    dfc2_weight = dy^T @ act; dfc1_weight = dhidden^T @ x; dx = dhidden @ fc1_weight; the biases' gradients are
    the column sums of dy and dhidden (`bias_grad`). Scratch: dhidden and act, (M, Hd) each, in x's dtype.
    """
    M, C = x.shape
    Hd, C_out = fc1_weight.shape[0], fc2_weight.shape[0]
    tanh = approximate == "tanh"
    dhidden = vit_triton.alloc(M, Hd, like=x)
    act = vit_triton.alloc(M, Hd, like=x)
    dx = vit_triton.alloc(M, C, like=x)
    dw1 = vit_triton.alloc(Hd, C, like=fc1_weight)
    dw2 = vit_triton.alloc(C_out, Hd, like=fc2_weight)
    db1 = vit_triton.alloc(Hd, like=x) if has_fc1_bias else None
    db2 = vit_triton.alloc(C_out, like=x) if has_fc2_bias else None
    arch = vit_triton.arch(x.device)
    if tma_path(arch, x.dtype, allow_tf32, dy, x, fc1_weight, fc2_weight, rows=(hidden, dhidden, act)):
        # dfc1_bias from the dGELU epilogue's per-tile column sums: no second pass over dhidden
        db1_part = (
            vit_triton.alloc(tma_gemm.dbias_rows(arch, x.dtype, M), Hd, like=x, dtype=torch.float32)
            if db1 is not None
            else None
        )
        tma_args = tma_gemm.dgelu_args(
            dy, fc2_weight, hidden, dhidden, act, tanh, allow_tf32, arch, dbias_part=db1_part
        )
        tma_launch(*tma_args, M, Hd, C_out, dhidden)
        weight_grad(dy.t(), act, dw2, allow_tf32)
        weight_grad(dhidden.t(), x, dw1, allow_tf32)
        gemm(dhidden, fc1_weight, dx, allow_tf32)
        if db1 is not None:
            db1.copy_(db1_part.sum(0))
    else:
        _pointer_mlp_bwd(dy, x, fc1_weight, fc2_weight, hidden, dhidden, act, dx, dw1, dw2, tanh, allow_tf32)
        if db1 is not None:
            bias_grad(dhidden, db1)
    if db2 is not None:
        bias_grad(dy, db2)
    return dx, dw1, db1, dw2, db2


def _pointer_mlp_bwd(dy, x, fc1_weight, fc2_weight, hidden, dhidden, act, dx, dw1, dw2, tanh, allow_tf32) -> None:
    M, C = x.shape
    Hd, C_out = fc1_weight.shape[0], fc2_weight.shape[0]
    launch(
        Operand(dy), Operand(fc2_weight), dhidden, M, Hd, C_out, x.dtype, allow_tf32,
        epilogue=EPI_DGELU, hidden=hidden, c2=act, tanh=tanh,
    )  # fmt: skip
    _weight_grad(Operand(dy, transpose=True), Operand(act), dw2, C_out, Hd, M, x.dtype, allow_tf32)
    _weight_grad(Operand(dhidden, transpose=True), Operand(x), dw1, Hd, C, M, x.dtype, allow_tf32)
    launch(Operand(dhidden), Operand(fc1_weight), dx, M, C, Hd, x.dtype, allow_tf32)


# ----------------------------------------------------------------------------------------------------
# static check: compile the shipped configs for a GPU target without a GPU
# ----------------------------------------------------------------------------------------------------
def _block_gemms(B: int, N: int, C: int, H: int, mlp_ratio: int, dtype: torch.dtype) -> list[tuple[str, tuple, dict]]:
    """The nine products of one ViT block (forward and backward) as `kernel_args` calls on meta tensors laid out
    as the launchers lay them out (contiguous inputs, the (B, N, 3, H, D) packed view for dq / dk / dv)."""
    D, M, Hd = C // H, B * N, mlp_ratio * C

    def t(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    x, w, bias = t(B, N, C), t(3 * C, C), t(3 * C)
    qkv = t(B, H, N, D)
    dqkv = tuple(t(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0))
    x2, w1, b1, w2, b2, hid = t(M, C), t(Hd, C), t(Hd), t(C, Hd), t(C), t(M, Hd)
    heads = dict(n_tok=N, qkv_c=C, qkv_d=D)
    return [
        ("qkv_fwd", (Operand(x), Operand(w, transpose=True), qkv, M, 3 * C, C),
         dict(epilogue=EPI_QKV, bias=bias, c2=qkv, c3=qkv, **heads)),
        ("qkv_bwd_dx", (None, Operand(w), t(M, C), M, C, 3 * C), dict(a_mode=A_DQKV, dqkv=dqkv, **heads)),
        ("qkv_bwd_dw", (None, Operand(x), t(3 * C, C), 3 * C, C, M),
         dict(a_mode=A_DQKV_T, dqkv=dqkv, **heads)),
        ("mlp_fc1", (Operand(x2), Operand(w1, transpose=True), hid, M, Hd, C),
         dict(epilogue=EPI_GELU, bias=b1, c2=hid)),
        ("mlp_fc2", (Operand(hid), Operand(w2, transpose=True), t(M, C), M, C, Hd), dict(bias=b2)),
        ("mlp_bwd_dhidden", (Operand(x2), Operand(w2), hid, M, Hd, C), dict(epilogue=EPI_DGELU, hidden=hid, c2=hid)),
        ("mlp_bwd_dw2", (Operand(x2, transpose=True), Operand(hid), t(C, Hd), C, Hd, M), {}),
        ("mlp_bwd_dw1", (Operand(hid, transpose=True), Operand(x2), t(Hd, C), Hd, C, M), {}),
        ("mlp_bwd_dx", (Operand(hid), Operand(w1), t(M, C), M, C, Hd), {}),
    ]  # fmt: skip


# The products `_launch_split_k` is for: weight gradients, M x N = features x features, K = tokens.
SPLIT_K_PRODUCTS = ("qkv_bwd_dw", "mlp_bwd_dw2", "mlp_bwd_dw1")

# ViT-B/16 at 224 px, batch 64: on sm_90 its products already use all three shape classes (qkv_fwd "large",
# qkv_bwd_dw "small") and both GELU caps. Pass (1, 197, 768, 12) too for the "small" tiles everywhere; one shape
# keeps a cold-cache report (27 compiles per arch) well inside benchmarks/kernel_report.py's time limit.
REPORT_SHAPES = ((64, 197, 768, 12),)


def compile_report(
    arch: int,
    shapes=REPORT_SHAPES,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    kernels=None,
    fp32_precisions=static_check.FP32_PRECISIONS,
    split_k: int = 1,
) -> list[dict]:
    """Compile every product of a ViT block (forward and backward) with the config the table ships, for sm_<arch>.
    split_k > 1: the weight-gradient products (`SPLIT_K_PRODUCTS`) only, split along K into fp32 partials, named
    "<product>_split_k".

    shapes: (B, N, C, H) tuples; kernels: names from `_block_gemms` to keep (all when None); fp32 is compiled once
    per precision in `fp32_precisions` ("ieee": matmul precision "highest", PyTorch's default; "tf32"). Runs
    without a GPU, but not under TRITON_INTERPRET (interpreted kernels cannot be compiled). Identical compilations
    are done once. Returns one dict per product: kernel, M, N, K, dtype, precision ("ieee" / "tf32" for fp32, None
    for 16-bit), config, n_regs, n_spills (bytes of spill stores + loads), shared (bytes), and whether the PTX
    holds Hopper `wgmma.mma_async` or `mma.sync` instructions.
    """
    rows, cache = [], {}
    for B, N, C, H in shapes:
        for dtype, allow_tf32 in static_check.dtype_precisions(dtypes, fp32_precisions):
            precision = vit_triton.input_precision(dtype, allow_tf32) if dtype == torch.float32 else None
            for name, (a, b, c, M, N_, K), extra in _block_gemms(B, N, C, H, 4, dtype):
                if kernels is not None and name not in kernels:
                    continue
                if split_k > 1:
                    if name not in SPLIT_K_PRODUCTS:
                        continue
                    # the launcher's fp32 partials (slices, M, N), slice 0 passed
                    c = torch.empty(c.shape, dtype=torch.float32, device="meta")
                    extra = dict(extra, split_k=split_k)
                    name = f"{name}_split_k"
                args, kwargs, _grid = kernel_args(a, b, c, M, N_, K, dtype, allow_tf32, arch, **extra)
                key = (tuple(v if not isinstance(v, torch.Tensor) else v.dtype for v in args), tuple(kwargs.items()))
                if key not in cache:
                    cache[key] = static_check.compile_launch(_gemm_kernel, args, kwargs, arch)
                launch_config = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps",
                                                        "num_stages")}  # fmt: skip
                rows.append({"kernel": name, "M": M, "N": N_, "K": K, "dtype": static_check.TL_DTYPES[dtype],
                             "precision": precision, "config": launch_config, **cache[key]})  # fmt: skip
    return rows
