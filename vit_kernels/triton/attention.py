"""Flash attention for ViT in Triton: forward, and a deterministic backward without atomics.

    out = softmax(q @ k^T * scale) @ v        q, k, v: (B, H, N, D), any strides

Layout of this file: `@triton.jit` kernels, then the config table, then the plain launchers
`attention_fwd` / `attention_bwd` (the kernel-module contract of `vit_kernels/ops/attention.py`), then
`compile_report`, a static check that compiles the shipped configs for sm_80 / sm_90 without a GPU.

Forward: one program per (BLOCK_M query rows, one (batch, head)); K/V stream through in BLOCK_N tiles
with an online softmax in fp32 (exp2, with log2(e) * scale folded into one multiplier), so no N x N
matrix ever exists in memory. It saves the natural-log log-sum-exp of every row, lse (B, H, N) fp32:
with it the backward recomputes P = exp(S - lse) tile by tile instead of storing it.

Backward (FlashAttention-2): delta = rowsum(dO * O) in its own small kernel, then one kernel per K/V
tile that loops over all Q tiles (dK, dV) and one per Q tile that loops over all K/V tiles (dQ). Every
output element has exactly one writer, so the result is deterministic; the price is computing
S and P twice, which at ViT lengths (N <= ~1k) is cheaper than atomics or a split reduction.

Any N >= 1 (tails masked), head dim D up to 128 through a power-of-two tile BLOCK_D = next_pow2(D)
with masked columns (D = 48, 80, 96). fp16 / bf16 go through tensor cores with fp32 accumulation;
fp32 uses tf32 only when `allow_tf32`, else exact fp32 ("ieee") dots.

Static check (`compile_report`, Triton 3.6, 3.8 and 3.9, ptxas -v; no GPU needed): every shipped config compiles
with 0 spills; on sm_90 every 16-bit and tf32 dot becomes Hopper `wgmma.mma_async`, on sm_80 `mma.sync`; exact fp32
("ieee") dots are FMA loops. sm_90 fp16, N = 197, D = 64: forward 127 registers / 56 KB shared, dK/dV 142 / 32 KB,
dQ 92 / 32 KB. GPU times are in benchmarks/NOTES.md (attention).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vit_kernels import triton as vit_triton
from vit_kernels.triton import static_check

LOG2E = 1.4426950408889634  # the kernels spell it (and ln 2) as literals: a Python global is not a constexpr


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile_and_head(HEADS_FIRST: tl.constexpr):
    # (row tile, (batch, head)) of this program. Tiles go on grid axis 0, which launches first, so the programs
    # of one head run together and the K / V (or Q / dO) they all stream come from DRAM once, then from L2. With
    # B * H first, the tiles of a head are B * H programs apart and each re-reads them from DRAM (benchmarks/NOTES.md).
    # Axes 1 and 2 stop at 65,535, which B * H passes at ViT-B batch 5,462: then HEADS_FIRST puts B * H on axis 0
    # (up to 2^31 - 1). A flat axis 0 of tiles * B * H would serve both, but its runtime division made the fp32
    # dK/dV kernels spill (sm_80, sm_90).
    if HEADS_FIRST:
        tile = tl.program_id(1)
        head = tl.program_id(0)
    else:
        tile = tl.program_id(0)
        head = tl.program_id(1)
    return tile, head


@triton.jit
def _head(base, pid_bh, H, stride_z, stride_h):
    # The start of the (batch, head) `pid_bh`; 64-bit, since B*H*N*D can pass 2^31.
    return base + (pid_bh // H).to(tl.int64) * stride_z + (pid_bh % H).to(tl.int64) * stride_h


@triton.jit
def _tile_ptrs(base, rows, cols, stride_r, stride_c):
    # Pointers of the (rows, cols) tile of one head at base (its 64-bit start, `_head`). The offsets within a head
    # are int32: the launchers copy any operand whose head spans 2^31 elements or more (`_in_head_int32`), and
    # int64 here costs the fp32 dK/dV kernels their last registers (9 more on sm_90 at D = 80: 40 bytes of spills).
    return base + rows[:, None] * stride_r + cols[None, :] * stride_c


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # (BLOCK_M, BLOCK_D) fp32, (BLOCK_M,), (BLOCK_M,), (BLOCK_M, BLOCK_D) input dtype
    k_base, v_base,  # K, V of this (batch, head)
    stride_kn, stride_kk, stride_vn, stride_vk,
    N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # constant-folds to all-true when D is a power of two
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(_tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kk), mask=kv_mask, other=0.0)
        v = tl.load(_tile_ptrs(v_base, offs_n, offs_d, stride_vn, stride_vk), mask=kv_mask, other=0.0)
        # Scores in the log2 domain: exp2 is the native instruction, exp would cost an extra multiply.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        # Key columns past N must weigh exactly zero. Every tile holds at least one real key (start_n < N),
        # so m_new below is finite for every row, padding rows included (their q is 0, s is 0): no inf - inf.
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # exp2(-inf) = 0 on the first tile
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, N, D) each, any strides
    Out,  # (B, H, N, D), memory (B, N, H, D)
    Lse,  # (B, H, N) fp32, contiguous
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_oz, stride_oh, stride_om, stride_ok,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = _tile_and_head(HEADS_FIRST)
    # int64 offsets: B * H * N * D passes 2^31 for large batches of ViT-H at 518 px.
    q_base = _head(Q, pid_bh, H, stride_qz, stride_qh)
    k_base = _head(K, pid_bh, H, stride_kz, stride_kh)
    v_base = _head(V, pid_bh, H, stride_vz, stride_vh)
    o_base = _head(Out, pid_bh, H, stride_oz, stride_oh)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    q_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(_tile_ptrs(q_base, offs_m, offs_d, stride_qm, stride_qk), mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kk, stride_vn, stride_vk, N, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
    )  # fmt: skip

    # l_i >= 1 (the row maximum contributes exp2(0)), so the division is safe for every row.
    acc = acc / l_i[:, None]
    tl.store(_tile_ptrs(o_base, offs_m, offs_d, stride_om, stride_ok), acc.to(Out.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 domain -> natural log
    tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut,  # (B, H, N, D) each, any strides
    Delta,  # (B, H, N) fp32, contiguous
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_dz, stride_dh, stride_dm, stride_dk,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEADS_FIRST: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax-backward correction, computed once per row
    # here rather than once per K/V tile inside the dK/dV kernel.
    pid_m, pid_bh = _tile_and_head(HEADS_FIRST)
    o_base = _head(Out, pid_bh, H, stride_oz, stride_oh)
    do_base = _head(DOut, pid_bh, H, stride_dz, stride_dh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_tile_ptrs(o_base, offs_m, offs_d, stride_om, stride_ok), mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(do_base, offs_m, offs_d, stride_dm, stride_dk), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, delta, mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut,  # (B, H, N, D) each, any strides
    DK, DV,  # (B, H, N, D) with the strides stride_g*, unit stride along D
    Lse, Delta,  # (B, H, N) fp32, contiguous
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_dz, stride_dh, stride_dm, stride_dk,
    stride_gz, stride_gh, stride_gm,  # of the gradients written: contiguous, or slices of one (B, N, 3, H, D)
    H, N, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
):  # fmt: skip
    # One program owns BLOCK_N keys and streams every query tile past them: dK and dV are finished in
    # registers and written once, so no atomics and a deterministic result.
    pid_n, pid_bh = _tile_and_head(HEADS_FIRST)
    q_base = _head(Q, pid_bh, H, stride_qz, stride_qh)
    k_base = _head(K, pid_bh, H, stride_kz, stride_kh)
    v_base = _head(V, pid_bh, H, stride_vz, stride_vh)
    do_base = _head(DOut, pid_bh, H, stride_dz, stride_dh)
    row_base = pid_bh.to(tl.int64) * N  # Lse, Delta: (B, H, N) contiguous

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < N
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(_tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kk), mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(v_base, offs_n, offs_d, stride_vn, stride_vk), mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(_tile_ptrs(q_base, offs_m, offs_d, stride_qm, stride_qk), mask=q_mask, other=0.0)
        do = tl.load(_tile_ptrs(do_base, offs_m, offs_d, stride_dm, stride_dk), mask=q_mask, other=0.0)
        # lse in base-2 units, rounded here (the select keeps the product out of an FMA with the subtraction below)
        lse = tl.where(m_mask, tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634, 0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
        # Transposed scores S^T (BLOCK_N, BLOCK_M), so that dV += P^T dO and dK += dS^T Q need no transposes
        # of the large accumulators.
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        # Padding query rows (q = 0, lse = 0) would give P = 1 without the mask; padding key rows (k = 0) would
        # give exp2(-lse), inf once lse < -88, then NaN in dS (never stored, but it hides real NaNs when
        # debugging). Masking before exp2 makes both exactly 0. The mask sits between the scaling and the
        # subtraction, as in the forward, so that no FMA fuses them and S * scale is rounded as there (see dQ).
        s_t = tl.where(m_mask[None, :] & n_mask[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    dk = dk * scale

    out_offs = offs_n[:, None] * stride_gm + offs_d[None, :]
    tl.store(_head(DK, pid_bh, H, stride_gz, stride_gh) + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_head(DV, pid_bh, H, stride_gz, stride_gh) + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut,  # (B, H, N, D) each, any strides
    DQ,  # (B, H, N, D) with the strides stride_g*, unit stride along D
    Lse, Delta,  # (B, H, N) fp32, contiguous
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_dz, stride_dh, stride_dm, stride_dk,
    stride_gz, stride_gh, stride_gm,  # of the gradient written (as the dK/dV kernel's)
    H, N, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
):  # fmt: skip
    # One program owns BLOCK_M queries and streams every K/V tile: dQ has a single writer (no atomics).
    pid_m, pid_bh = _tile_and_head(HEADS_FIRST)
    q_base = _head(Q, pid_bh, H, stride_qz, stride_qh)
    k_base = _head(K, pid_bh, H, stride_kz, stride_kh)
    v_base = _head(V, pid_bh, H, stride_vz, stride_vh)
    do_base = _head(DOut, pid_bh, H, stride_dz, stride_dh)
    row_base = pid_bh.to(tl.int64) * N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile_ptrs(q_base, offs_m, offs_d, stride_qm, stride_qk), mask=q_mask, other=0.0)
    do = tl.load(_tile_ptrs(do_base, offs_m, offs_d, stride_dm, stride_dk), mask=q_mask, other=0.0)
    lse = tl.where(m_mask, tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634, 0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(_tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kk), mask=kv_mask, other=0.0)
        v = tl.load(_tile_ptrs(v_base, offs_n, offs_d, stride_vn, stride_vk), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        # Key columns past N (k = 0, so s = 0) must not leak P = exp(-lse) into dQ, nor overflow to inf on the
        # way: masked before exp2. Masked before the subtraction, as in the forward: fused into one FMA, S * scale
        # - lse skips the rounding of the product that the forward keeps, so P disagrees key by key with the
        # forward's P behind out (so delta), and dq = sum_j dS_j k_j, which cancels, amplifies that into an fp32
        # dq error far past tolerance at very negative logits (static_check.exp2_args_with_fma checks the PTX).
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    dq = dq * scale

    out_offs = offs_m[:, None] * stride_gm + offs_d[None, :]
    tl.store(_head(DQ, pid_bh, H, stride_gz, stride_gh) + out_offs, dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------------
class FwdConfig(NamedTuple):
    """The forward's launch config: BLOCK_M query rows held, BLOCK_N keys streamed."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class BwdConfig(NamedTuple):
    """The backward's launch config, one for both of its kernels: dK/dV runs BLOCK_M = `streamed` queries past
    BLOCK_N = `held` keys, dQ BLOCK_M = `held` queries past BLOCK_N = `streamed` keys."""

    streamed: int
    held: int
    num_warps: int
    num_stages: int


# FwdConfig / BwdConfig, fixed per (operands, BLOCK_D, N bucket) so that a call costs no autotuning;
# benchmarks/tune_attention.py compiles and (on a GPU) times the alternatives. The choices below rest on the static
# step (registers / spills / shared memory from compiling for sm_80 and sm_90 with Triton 3.6, 3.8 and 3.9);
# `_FWD_CONFIGS_SM90` / `_BWD_CONFIGS_SM90` replace the sm_90 16-bit entries that a timed tune beat
# (benchmarks/NOTES.md, attention). Operands: "16bit" (fp16 / bf16), "tf32" (fp32 on tensor cores) and "ieee" (exact
# fp32: FMA loops, the default under PyTorch's matmul precision "highest").
# ViT sequences are short (50, 197, 257, 577, 1025 tokens) and B * H is large (e.g. 64 x 12), so the grid
# (cdiv(N, BLOCK_M) * B * H) already fills 132 SMs; tiles are picked for occupancy and for 0 spills on every
# Triton, since ptxas's choices move between versions (e.g. tf32 dK/dV at BLOCK_D 128, 32 x 64 / 8 warps /
# 2 stages: 255 registers with 0 spills on 3.6, 12 bytes (sm_80) / 48 bytes (sm_90) of spills on 3.9).
#
# forward: BLOCK_M query rows held, BLOCK_N keys streamed.
#  - N <= 256: BLOCK_M = 64. 197 tokens pad to 256 rows with either 64 or 128, and 64 gives 2x the programs
#    and half the registers per program; with 4 warps a 64-row tile is exactly one Hopper warpgroup (m64).
#  - N > 256: BLOCK_M = 128 halves the number of K/V passes over memory, 8 warps from BLOCK_D = 64.
#  - BLOCK_N = 64, or 32 where 64 reaches 255 registers and spills on sm_80: BLOCK_D = 128 (16-bit), and tf32
#    at BLOCK_D = 128 or BLOCK_M = 128. 16-bit takes 3 stages everywhere (2 spilled 28 bytes at N <= 64,
#    BLOCK_D = 32 on 3.6 sm_80); fp32 2 (twice the bytes per staged tile).
#  - ieee: small tiles on 8 warps for every N: an FMA dot holds whole operand rows per thread. 64 x 32 on 4 warps
#    spilled 0.9-36 KB; 32 x 32 on 8 warps needs <= 160 registers at BLOCK_D <= 64, but at BLOCK_D = 128 ptxas
#    capped it at 80 and spilled 24 bytes (3.6 sm_80), so there BLOCK_N = 16 (<= 73 registers everywhere).
# backward: dK/dV holds `held` keys (two fp32 accumulators) and streams `streamed` queries; dQ the reverse.
#  - 16-bit: 64 held x 32 streamed, 8 warps at BLOCK_D = 128 (64 accumulator registers each), else 4.
#  - tf32: fragments twice the registers of 16-bit. BLOCK_D 32: as 16-bit. From BLOCK_D 64: 16 streamed x 64 held
#    on 8 warps (32 x 64 reached 255 registers and spilled 12-48 bytes on sm_80 / sm_90 with 4 or 8 warps, 1 or 2
#    stages, by version; 16 x 64 needs <= 236). The held side stays 64: one Hopper warpgroup (m64) for wgmma,
#    where 32 held rows fall back to mma.sync.
#  - ieee: 16 streamed x 64 held on 8 warps (32 x 32 on 4 warps spilled 1-32 KB; 16 x 32 on 8 warps 16 bytes at
#    BLOCK_D = 128 on 3.8 sm_90; 16 x 64 needs <= 182 registers).
_FWD_CONFIGS = {  # (operands, BLOCK_D): (N <= 64, N <= 256, N > 256)
    ("16bit", 32): (FwdConfig(64, 32, 4, 3), FwdConfig(64, 64, 4, 3), FwdConfig(128, 64, 4, 3)),
    ("16bit", 64): (FwdConfig(64, 32, 4, 3), FwdConfig(64, 64, 4, 3), FwdConfig(128, 64, 8, 3)),
    ("16bit", 128): (FwdConfig(64, 32, 4, 3), FwdConfig(64, 32, 4, 3), FwdConfig(128, 64, 8, 3)),
    ("tf32", 32): (FwdConfig(64, 64, 4, 2), FwdConfig(64, 64, 4, 2), FwdConfig(128, 32, 8, 2)),
    ("tf32", 64): (FwdConfig(64, 64, 4, 2), FwdConfig(64, 64, 4, 2), FwdConfig(128, 32, 8, 2)),
    ("tf32", 128): (FwdConfig(64, 32, 4, 2), FwdConfig(64, 32, 4, 2), FwdConfig(128, 32, 8, 2)),
    ("ieee", 32): (FwdConfig(32, 32, 8, 2),) * 3,
    ("ieee", 64): (FwdConfig(32, 32, 8, 2),) * 3,
    ("ieee", 128): (FwdConfig(32, 16, 8, 2),) * 3,
}
_BWD_CONFIGS = {  # (operands, BLOCK_D): (streamed, held, num_warps, num_stages)
    ("16bit", 32): BwdConfig(32, 64, 4, 2),
    ("16bit", 64): BwdConfig(32, 64, 4, 2),
    ("16bit", 128): BwdConfig(32, 64, 8, 2),
    ("tf32", 32): BwdConfig(32, 64, 4, 2),
    ("tf32", 64): BwdConfig(16, 64, 8, 2),
    ("tf32", 128): BwdConfig(16, 64, 8, 2),
    **{("ieee", block_d): BwdConfig(16, 64, 8, 2) for block_d in (32, 64, 128)},
}
# sm_90 entries that replace the ones above: where benchmarks/tune_attention.py (bf16) timed a candidate faster
# than the table by more than noise (the times: benchmarks/NOTES.md, attention). sm_80 keeps the table: 4 warps at
# BLOCK_D = 128 spill 12 bytes in dK/dV on sm_80 (D = 80), 0 on sm_90 (254 registers).
#  - 16-bit fwd, BLOCK_D 64, N <= 256: 128 x 32 on 4 warps (two m64 wgmma per warpgroup), from ViT-B/16.
#  - 16-bit fwd, BLOCK_D 128, N > 256: 64 x 64 on 4 warps, from ViT-H/14.
#  - 16-bit bwd, BLOCK_D 128: 4 warps, from ViT-H/14.
_FWD_CONFIGS_SM90 = {
    ("16bit", 64): (FwdConfig(64, 32, 4, 3), FwdConfig(128, 32, 4, 3), FwdConfig(128, 64, 8, 3)),
    ("16bit", 128): (FwdConfig(64, 32, 4, 3), FwdConfig(64, 32, 4, 3), FwdConfig(64, 64, 4, 3)),
}
_BWD_CONFIGS_SM90 = {("16bit", 128): BwdConfig(32, 64, 4, 2)}


def _operands(dtype: torch.dtype, precision: str) -> str:
    return "16bit" if dtype != torch.float32 else precision


def fwd_config(N: int, block_d: int, dtype: torch.dtype, precision: str, arch: int) -> FwdConfig:
    """The forward's config; precision as `vit_kernels.triton.input_precision` gives it, arch as
    `vit_kernels.triton.arch` (90: the sm_90 entries first)."""
    key = (_operands(dtype, precision), block_d)
    small, medium, large = _FWD_CONFIGS_SM90[key] if arch == 90 and key in _FWD_CONFIGS_SM90 else _FWD_CONFIGS[key]
    return small if N <= 64 else (medium if N <= 256 else large)


def bwd_config(N: int, block_d: int, dtype: torch.dtype, precision: str, arch: int) -> BwdConfig:
    """The backward's config (one entry serves both of its kernels, see `BwdConfig`). Any N."""
    key = (_operands(dtype, precision), block_d)
    return _BWD_CONFIGS_SM90[key] if arch == 90 and key in _BWD_CONFIGS_SM90 else _BWD_CONFIGS[key]


_PREPROCESS_BLOCK_M = 64  # a pure row reduction: memory bound, any reasonable tile is fine


_INT32_LIMIT = 2**31  # CUDA grid axis 0 holds up to 2^31 - 1 programs, axes 1 and 2 up to 65,535
_AXIS_1_MAX = 65535


def _grid(N: int, block: int, BH: int) -> tuple[tuple[int, int], bool]:
    """The grid `_tile_and_head` reads, and its HEADS_FIRST: (row tiles, B * H), or (B * H, row tiles) when
    B * H is past what axis 1 holds."""
    tiles = triton.cdiv(N, block)
    if BH >= _INT32_LIMIT or tiles > _AXIS_1_MAX:
        raise ValueError(
            f"attention: B*H={BH} heads x {tiles} tiles of {block} rows (N={N}) exceed the CUDA grid "
            f"(2^31 - 1 x 65,535); split the batch or the sequence"
        )
    if BH > _AXIS_1_MAX:
        return (BH, tiles), True
    return (tiles, BH), False


def _in_head_int32(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, D) as the kernels can address it: in place when every element of a (batch, head) lies within
    2^31 elements of the head's start (int32 offsets, `_tile_ptrs`), else a contiguous copy, whose heads span
    N * D. Only giant strides need the copy, e.g. sequence-first (N, B, H, D) memory with B * H * D * N >= 2^31."""
    _B, _H, N, D = t.shape
    if (N - 1) * abs(t.stride(2)) + (D - 1) * abs(t.stride(3)) < _INT32_LIMIT:
        return t
    return t.contiguous()


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    config: FwdConfig | tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward.

    q, k, v: (B, H, N, D), any strides (views of a packed (B, N, 3, H, D) qkv are read in place).
    Returns out (B, H, N, D), a view of (B, N, H, D) memory so that `out.transpose(1, 2).reshape(B, N, H * D)`
    is free, and lse (B, H, N) fp32, the natural-log log-sum-exp of each row of q @ k^T * scale. Saved for
    backward (by the autograd op): q, k, v, out and lse. lse (4 bytes per row) lets backward recompute
    P = exp(q k^T * scale - lse) tile by tile instead of storing the N x N matrix; out gives delta = rowsum(dO * O).
    `config`, a FwdConfig or a tuple of its fields, replaces the table's choice (benchmarks/tune_attention.py).
    Arguments are checked before they get here (ops/attention.py: check_forward_args on the raw op, check on
    the public op's eager path), not again on every launch.
    """
    B, H, N, D = q.shape
    if N * H * D >= _INT32_LIMIT:  # out is (B, N, H, D) memory: one head's rows span N * H * D elements
        raise ValueError(f"attention: N * H * D = {N * H * D} elements per image must stay below 2^31")
    q, k, v = _in_head_int32(q), _in_head_int32(k), _in_head_int32(v)
    block_d = triton.next_power_of_2(D)
    precision = vit_triton.input_precision(q.dtype, allow_tf32)
    cfg = FwdConfig(*config) if config else fwd_config(N, block_d, q.dtype, precision, vit_triton.arch(q.device))
    out = vit_triton.alloc(B, N, H, D, like=q).transpose(1, 2)
    lse = vit_triton.alloc(B, H, N, like=q, dtype=torch.float32)
    grid, heads_first = _grid(N, cfg.block_m, B * H)
    with vit_triton.on_device(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, N, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            INPUT_PRECISION=precision, HEADS_FIRST=heads_first,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out, lse


# attention_bwd(..., packed=True) writes dq, dk, dv into one (B, N, 3, H, D) buffer (library.attention_bwd_packed).
PACKED_GRADS = True


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    config: BwdConfig | tuple[int, int, int, int] | None = None,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward.

    dout, q, k, v, out: (B, H, N, D), any strides; lse (B, H, N) fp32 from `attention_fwd`.
    Returns dq, dk, dv: (B, H, N, D) contiguous; with `packed`, the q / k / v slices of one (B, N, 3, H, D) buffer
    instead, i.e. one dQKV (B*N, 3H*D) matrix that the QKV projection's backward GEMMs read in place (only outside
    custom ops, whose outputs may not alias each other: `library`'s eager path asks for it). Scratch: delta (B, H,
    N) fp32 = rowsum(dout * out). `config`, a BwdConfig or a tuple of its fields, replaces the table's
    choice.
    Arguments, lse included, are checked by the raw op before they get here (library.check_attention_bwd_args).
    """
    B, H, N, D = q.shape
    dout, q, k, v, out = (_in_head_int32(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    block_d = triton.next_power_of_2(D)
    precision = vit_triton.input_precision(q.dtype, allow_tf32)

    delta = vit_triton.alloc(B, H, N, like=q, dtype=torch.float32)
    if packed and (N - 1) * 3 * H * D + D < _INT32_LIMIT:  # within-head offsets stay int32 (`_tile_ptrs`)
        dq, dk, dv = vit_triton.alloc(B, N, 3, H, D, like=q).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        dq, dk, dv = (vit_triton.alloc(B, H, N, D, like=q) for _ in range(3))
    cfg = BwdConfig(*config) if config else bwd_config(N, block_d, q.dtype, precision, vit_triton.arch(q.device))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride()[:3])
    pre_grid, pre_heads_first = _grid(N, _PREPROCESS_BLOCK_M, B * H)
    grid, heads_first = _grid(N, cfg.held, B * H)  # the dK/dV and dQ kernels both hold `held` rows
    with vit_triton.on_device(q):
        _attn_bwd_preprocess_kernel[pre_grid](
            out, dout, delta, *out.stride(), *dout.stride(), H, N,
            HEAD_DIM=D, BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=block_d, HEADS_FIRST=pre_heads_first,
        )  # fmt: skip
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, dout, dk, dv, lse, delta, *strides, H, N, scale, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=cfg.streamed, BLOCK_N=cfg.held, BLOCK_D=block_d, INPUT_PRECISION=precision,
            HEADS_FIRST=heads_first, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        # dQ holds the query side, so the (streamed, held) sizes swap.
        _attn_bwd_dq_kernel[grid](
            q, k, v, dout, dq, lse, delta, *strides, H, N, scale, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=cfg.held, BLOCK_N=cfg.streamed, BLOCK_D=block_d, INPUT_PRECISION=precision,
            HEADS_FIRST=heads_first, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# static check: compile the shipped configs for a GPU target without a GPU
# ----------------------------------------------------------------------------------------------------
# One (N, D) per cell of the config table (N <= 64 / <= 256 / > 256, BLOCK_D 32 / 64 / 128), ViT shapes where there
# is one: ViT-B/16 at 112, 224 and 384 px (N = 50, 197, 577; D = 64), ViT-H/14 at 224 px (N = 257, D = 80).
REPORT_SHAPES = tuple((N, D) for D in (32, 64, 80) for N in (50, 197, 257 if D == 80 else 577))
_INNER_STRIDES = ("stride_qk", "stride_kk", "stride_vk", "stride_ok", "stride_dk")


def _compile(kernel, arch: int, dtype: torch.dtype, D: int, constexprs: dict, num_warps: int, num_stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ty = static_check.TL_DTYPES[dtype]
    # Mirror the launch-time specialisation of a typical call: 16-byte aligned pointers, unit innermost strides
    # (specialised to the constant 1), other strides multiples of 16 elements (H * D and D are, for ViT).
    constexprs = dict(constexprs, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), HEADS_FIRST=False)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in _INNER_STRIDES:
            constexprs[name] = 1
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride"):
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("H", "N"):
            signature[name] = "i32"
        elif name in ("scale", "qk_scale"):
            signature[name] = "fp32"
        else:  # pointers
            signature[name] = "*fp32" if name in ("Lse", "Delta") else f"*{ty}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return static_check.usage(compiled, arch)


def compile_config(
    arch: int, dtype: torch.dtype, D: int, fwd: tuple | None = None, bwd: tuple | None = None, allow_tf32: bool = True
) -> list[dict]:
    """Compile the kernels of one launch config for sm_<arch> (80 or 90): `fwd` a FwdConfig (or a tuple of its
    fields) as `fwd_config` returns it, `bwd` a BwdConfig as `bwd_config` does (its dK/dV and dQ kernels, and the
    preprocess). Without a GPU, not under TRITON_INTERPRET. fp32 compiles its tf32 dots when `allow_tf32`, else its
    exact ("ieee") ones, as the launchers do. One dict per kernel: name, config, dtype, precision ("tf32" / "ieee"
    for fp32, None for 16-bit), n_regs, n_spills (bytes of spill stores + loads), shared (bytes), and whether the PTX
    holds Hopper `wgmma.mma_async` or Ampere-style `mma.sync`."""
    precision = vit_triton.input_precision(dtype, allow_tf32)
    jobs = []  # (name, kernel, BLOCK_M / BLOCK_N constexprs, num_warps, num_stages), as the launchers launch them
    if fwd is not None:
        f = FwdConfig(*fwd)
        jobs.append(("attn_fwd", _attn_fwd_kernel, dict(BLOCK_M=f.block_m, BLOCK_N=f.block_n), f.num_warps,
                     f.num_stages))  # fmt: skip
    if bwd is not None:
        b = BwdConfig(*bwd)
        jobs += [
            ("attn_bwd_preprocess", _attn_bwd_preprocess_kernel, dict(BLOCK_M=_PREPROCESS_BLOCK_M), 4, 1),
            ("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, dict(BLOCK_M=b.streamed, BLOCK_N=b.held), b.num_warps,
             b.num_stages),
            ("attn_bwd_dq", _attn_bwd_dq_kernel, dict(BLOCK_M=b.held, BLOCK_N=b.streamed), b.num_warps, b.num_stages),
        ]  # fmt: skip
    rows = []
    for name, kernel, constexprs, num_warps, num_stages in jobs:
        config = {"BLOCK_M": constexprs["BLOCK_M"], "BLOCK_N": constexprs.get("BLOCK_N", 0), "num_warps": num_warps,
                  "num_stages": num_stages}  # fmt: skip
        if name != "attn_bwd_preprocess":
            constexprs["INPUT_PRECISION"] = precision
        info = _compile(kernel, arch, dtype, D, constexprs, num_warps, num_stages)
        rows.append({
            "kernel": name, "D": D, "dtype": static_check.TL_DTYPES[dtype],
            "precision": precision if dtype == torch.float32 else None, "config": config, **info,
        })  # fmt: skip
    return rows


def compile_report(
    arch: int,
    shapes=REPORT_SHAPES,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    fp32_precisions=static_check.FP32_PRECISIONS,
) -> list[dict]:
    """`compile_config` of the config the table ships for each (N, D, dtype) in `shapes`, fp32 once per precision
    in `fp32_precisions` ("ieee": matmul precision "highest", PyTorch's default; "tf32"); rows also carry N."""
    rows, done = [], {}
    for N, D in shapes:
        block_d = triton.next_power_of_2(D)
        for dtype, allow_tf32 in static_check.dtype_precisions(dtypes, fp32_precisions):
            precision = vit_triton.input_precision(dtype, allow_tf32)
            for pass_, config in (("fwd", fwd_config(N, block_d, dtype, precision, arch)),
                                  ("bwd", bwd_config(N, block_d, dtype, precision, arch))):  # fmt: skip
                key = (pass_, config, D, dtype, allow_tf32)  # shapes that share a config compile it once
                if key not in done:
                    done[key] = compile_config(arch, dtype, D, allow_tf32=allow_tf32, **{pass_: config})
                rows += [{"N": N, **r} for r in done[key]]
    return rows
