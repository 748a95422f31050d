"""Triton helpers shared by the GEMM kernel files (linear.py, block.py, tma_gemm.py): GELU and its derivative, the
row index map of operands whose (B, N) token dims do not merge, the grouped tile order, and the head-split store."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu_fwd(h, TANH: tl.constexpr):
    # h: fp32 tile. tanh(u) = 1 - 2 / (exp(2u) + 1) saturates to +-1 without inf / inf (exp overflow gives 1).
    if TANH:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        act = 0.5 * h * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    else:
        act = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    return act


@triton.jit
def gelu_fwd_bwd(h, TANH: tl.constexpr):
    # (GELU(h), GELU'(h)) for an fp32 tile, sharing the erf / tanh between the two.
    if TANH:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        act = 0.5 * h * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    else:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        act = h * cdf
        grad = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327  # Phi(h) + h * phi(h)
    return act, grad


@triton.jit
def split_offset(r, ROWS, stride_outer, stride_inner):
    # Offset of row r of an operand whose rows are (r // ROWS, r % ROWS), e.g. the (B, N) token dims of x.
    # ROWS == 1 is a compile-time constant (Triton specialises integer arguments equal to 1): just r * stride_outer.
    return (r // ROWS).to(tl.int64) * stride_outer + (r % ROWS).to(tl.int64) * stride_inner


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (row tile, column tile) of output tile `pid` in grouped order: GROUP_M row-tiles sweep the N-tiles together,
    # so the B tiles they share stay in L2. pid: the program id, or a persistent program's tile index.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def store_head_split(Q, K, V, out, offs_m, offs_n, mask, N_TOK, QKV_C: tl.constexpr, QKV_D: tl.constexpr):
    # Head split: row m = (b, t), column n = (which, h, d) of (B*N, 3C) goes to [q, k, v][which][b, h, t, d],
    # each contiguous (B, H, N_TOK, D); C, D constexpr keep runs of d contiguous for vector stores. Three
    # buffers, not one (3, B, H, N, D): outputs of a torch.library custom op may not alias each other.
    b_idx = (offs_m // N_TOK).to(tl.int64)
    t_idx = (offs_m % N_TOK).to(tl.int64)
    row_off = b_idx * N_TOK * QKV_C + t_idx * QKV_D  # int64 from the left: N_TOK * C alone may not fit
    which = (offs_n // QKV_C)[None, :]
    h_idx = (offs_n % QKV_C) // QKV_D
    col_off = (h_idx * QKV_D).to(tl.int64) * N_TOK + offs_n % QKV_D
    offs = row_off[:, None] + col_off[None, :]
    ptrs = tl.where(which == 0, Q + offs, tl.where(which == 1, K + offs, V + offs))
    tl.store(ptrs, out, mask=mask)
