"""Hopper (sm_90) GEMMs in Triton: one persistent TMA mainloop, and a thin entry kernel per epilogue.

    C (M, N) = epilogue(A (M, K) @ B (K, N))        fp32 accumulation, fp16 / bf16 or tf32 operands

Operands come in through tensor descriptors (TMA: `cp.async.bulk.tensor` behind mbarriers, no `cp.async` ring).
Each operand is a 2-D view whose rows or columns are unit-stride: A is stored (M, K) or (K, M) (dY^T of a weight
gradient), B (N, K) (a weight read as W^T) or (K, N); the mainloop transposes the shared-memory tile, never the
tensor. Programs are persistent: a grid of at most one program per SM walks the output tiles in grouped order
(GROUP_M row tiles sweep the N tiles together, so their B tiles stay in L2). Ragged edges need no masks in the
mainloop: TMA fills out-of-bounds elements of a load with zeros and drops those of a store. The epilogue works on
two (BLOCK_M, BLOCK_N / 2) halves of the accumulator, so its temporaries and its shared-memory store buffer are
half the tile's.

Entry kernels (each ~20 lines around `_mainloop`):
    _store_kernel      C = A @ B (+ bias)                       TMA store
    _residual_kernel   C = A @ B (+ bias) + R                   R read with pointer loads (any row strides)
    _gelu_kernel       H = A @ B + bias; ACT = GELU(H)           both stored (H only where backward needs it)
    _dgelu_kernel      dH = (A @ B) * GELU'(H), ACT = GELU(H)   H read by TMA, one erf per element; per-tile
                                                                column sums of dH (the bias gradient)
    _qkv_kernel        q, k, v (B, H, N, D) = head split of A @ B + bias (pointer stores: a scatter)
    _partial_kernel    P[s] = A[:, K_s] @ B[K_s, :] in fp32     split-K for the weight gradients (few tiles, long K)

Hopper warp specialisation (`tl.range(..., warp_specialize=True)`) is not used: on Triton 3.6, 3.8 and 3.9 it
compiles to the same kernel (no `setmaxnreg`, no producer warp) at 8 warps, and fails in the compiler at 4 warps
(benchmarks/NOTES.md, Hopper GEMMs). The pipelining that Triton gives a TMA loop on sm_90 (mbarrier ring of
`num_stages` tiles, async wgmma) is what runs.

Launch configs: named fields (`GemmConfig`), one table per arch, below the kernels. Precision: fp16 / bf16 on
tensor cores, fp32 through tf32 (`allow_tf32`); exact fp32 ("ieee") dots have no tensor-core path, so they stay on
linear.py's pointer kernel, as does sm_80 (no TMA) and any operand TMA cannot describe (`describable`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from vit_kernels import triton as vit_triton
from vit_kernels.triton.gemm_helpers import gelu_fwd, gelu_fwd_bwd, grouped_tile, split_offset, store_head_split


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # First row and column of a persistent program's tile `tile`, in the grouped order the pointer kernels use.
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _mainloop(
    a_desc,  # A stored (M, K), or (K, M) when A_T
    b_desc,  # B stored (K, N), or (N, K) when B_T
    off_m, off_n, k_lo, k_hi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if A_T:
            a = a_desc.load([k, off_m]).T
        else:
            a = a_desc.load([off_m, k])
        if B_T:
            b = b_desc.load([off_n, k]).T
        else:
            b = b_desc.load([k, off_n])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # (BLOCK_M, BLOCK_N) -> its left and right (BLOCK_M, BLOCK_N // 2) halves.
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _add_bias(acc, Bias, off_n, N, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr):
    if HAS_BIAS:
        offs = off_n + tl.arange(0, WIDTH)
        acc += tl.load(Bias + offs, mask=offs < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _store_kernel(
    a_desc, b_desc,
    c_desc,  # (M, N), block (BLOCK_M, BLOCK_N // 2)
    Bias,  # (N,) contiguous, read when HAS_BIAS
    M, N, K,
    HAS_BIAS: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        off_m, off_n = _tile_offsets(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _mainloop(a_desc, b_desc, off_m, off_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K, A_T, B_T, INPUT_PRECISION)
        acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
        c_desc.store([off_m, off_n], _add_bias(acc0, Bias, off_n, N, HAS_BIAS, HALF).to(c_desc.dtype))
        c_desc.store([off_m, off_n + HALF], _add_bias(acc1, Bias, off_n + HALF, N, HAS_BIAS, HALF).to(c_desc.dtype))


@triton.jit
def _add_residual(acc, Res, off_m, off_n, M, N, R_ROWS, stride_r_outer, stride_r_inner, stride_rn,
                  BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, WIDTH)
    rows = split_offset(offs_m, R_ROWS, stride_r_outer, stride_r_inner)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    res = tl.load(Res + rows[:, None] + (offs_n.to(tl.int64) * stride_rn)[None, :], mask=mask, other=0.0)
    return acc + res.to(tl.float32)


@triton.jit
def _residual_kernel(
    a_desc, b_desc,
    c_desc,  # (M, N), block (BLOCK_M, BLOCK_N // 2)
    Bias,  # (N,) contiguous, read when HAS_BIAS
    Res,  # (M, N), rows split as (M // R_ROWS, R_ROWS): the residual stream, any strides
    M, N, K,
    R_ROWS, stride_r_outer, stride_r_inner, stride_rn,
    HAS_BIAS: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):  # fmt: skip
    # out = acc + bias + residual in fp32, rounded once.
    HALF: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        off_m, off_n = _tile_offsets(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _mainloop(a_desc, b_desc, off_m, off_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K, A_T, B_T, INPUT_PRECISION)
        acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
        for half in tl.static_range(2):
            acc_h = acc0 if half == 0 else acc1
            off_h = off_n + half * HALF
            acc_h = _add_bias(acc_h, Bias, off_h, N, HAS_BIAS, HALF)
            acc_h = _add_residual(acc_h, Res, off_m, off_h, M, N, R_ROWS, stride_r_outer, stride_r_inner, stride_rn,
                                  BLOCK_M, HALF)  # fmt: skip
            c_desc.store([off_m, off_h], acc_h.to(c_desc.dtype))


@triton.jit
def _gelu_store(acc, h_desc, act_desc, Bias, off_m, off_n, N, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
                TANH: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    # The pre-activation is rounded to the storage dtype first, so that the activation stored here and the one
    # backward computes from the stored pre-activation are the same numbers.
    pre = _add_bias(acc, Bias, off_n, N, HAS_BIAS, WIDTH).to(act_desc.dtype)
    if STORE_PRE:
        h_desc.store([off_m, off_n], pre)
    act_desc.store([off_m, off_n], gelu_fwd(pre.to(tl.float32), TANH).to(act_desc.dtype))


@triton.jit
def _gelu_kernel(
    a_desc, b_desc,
    h_desc,  # (M, N) pre-activation, written when STORE_PRE
    act_desc,  # (M, N) GELU(pre-activation)
    Bias,  # (N,) contiguous, read when HAS_BIAS
    M, N, K,
    HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, TANH: tl.constexpr,
    A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr, QUARTERS: tl.constexpr,
):  # fmt: skip
    # QUARTERS: the epilogue in (BLOCK_M, BLOCK_N // 4) sub-tiles (erf's temporaries beside a 128 x 256 accumulator).
    HALF: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        off_m, off_n = _tile_offsets(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _mainloop(a_desc, b_desc, off_m, off_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K, A_T, B_T, INPUT_PRECISION)
        acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
        for half in tl.static_range(2):
            acc_h = acc0 if half == 0 else acc1
            off_h = off_n + half * HALF
            if QUARTERS:
                q0, q1 = _halves(acc_h, BLOCK_M, HALF)
                _gelu_store(q0, h_desc, act_desc, Bias, off_m, off_h, N, HAS_BIAS, STORE_PRE, TANH, HALF // 2)
                _gelu_store(q1, h_desc, act_desc, Bias, off_m, off_h + HALF // 2, N, HAS_BIAS, STORE_PRE, TANH,
                            HALF // 2)  # fmt: skip
            else:
                _gelu_store(acc_h, h_desc, act_desc, Bias, off_m, off_h, N, HAS_BIAS, STORE_PRE, TANH, HALF)


@triton.jit
def _dgelu_store(acc, h_desc, dh_desc, act_desc, DbPart, off_m, off_n, N, STORE_ACT: tl.constexpr,
                 TANH: tl.constexpr, DBIAS: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    act, grad = gelu_fwd_bwd(h_desc.load([off_m, off_n]).to(tl.float32), TANH)
    dh = acc * grad
    dh_desc.store([off_m, off_n], dh.to(dh_desc.dtype))
    if STORE_ACT:
        act_desc.store([off_m, off_n], act.to(act_desc.dtype))
    if DBIAS:  # this tile's column sums (rows past M are zero: TMA zero-filled their A rows and H)
        offs = off_n + tl.arange(0, WIDTH)
        tl.store(DbPart + (off_m // BLOCK_M).to(tl.int64) * N + offs, tl.sum(dh, 0), mask=offs < N)


@triton.jit
def _dgelu_kernel(
    a_desc, b_desc,
    h_desc,  # (M, N) pre-activation of the forward, read
    dh_desc,  # (M, N) dH = (A @ B) * GELU'(H)
    act_desc,  # (M, N) GELU(H), written when STORE_ACT (for the dW2 product)
    DbPart,  # (cdiv(M, BLOCK_M), N) fp32: per row tile, the column sums of dH (the bias gradient), when DBIAS
    M, N, K,
    STORE_ACT: tl.constexpr, TANH: tl.constexpr, DBIAS: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr, QUARTERS: tl.constexpr,
):  # fmt: skip
    # One erf per element: GELU and GELU' share it (gelu_fwd_bwd), on the tile TMA loaded.
    HALF: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        off_m, off_n = _tile_offsets(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _mainloop(a_desc, b_desc, off_m, off_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K, A_T, B_T, INPUT_PRECISION)
        acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
        for half in tl.static_range(2):
            acc_h = acc0 if half == 0 else acc1
            off_h = off_n + half * HALF
            if QUARTERS:
                q0, q1 = _halves(acc_h, BLOCK_M, HALF)
                _dgelu_store(q0, h_desc, dh_desc, act_desc, DbPart, off_m, off_h, N, STORE_ACT, TANH, DBIAS,
                             BLOCK_M, HALF // 2)  # fmt: skip
                _dgelu_store(q1, h_desc, dh_desc, act_desc, DbPart, off_m, off_h + HALF // 2, N, STORE_ACT, TANH,
                             DBIAS, BLOCK_M, HALF // 2)  # fmt: skip
            else:
                _dgelu_store(acc_h, h_desc, dh_desc, act_desc, DbPart, off_m, off_h, N, STORE_ACT, TANH, DBIAS,
                             BLOCK_M, HALF)  # fmt: skip


@triton.jit
def _qkv_kernel(
    a_desc, b_desc,
    Q, K_out, V,  # (B, H, N_TOK, D) each, contiguous
    Bias,  # (3C,) contiguous, read when HAS_BIAS
    M, N, K,
    N_TOK,
    HAS_BIAS: tl.constexpr, QKV_C: tl.constexpr, QKV_D: tl.constexpr,
    A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):  # fmt: skip
    # The head split is a scatter (rows of a tile cross batch boundaries of (B, H, N, D)): pointer stores.
    HALF: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        off_m, off_n = _tile_offsets(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _mainloop(a_desc, b_desc, off_m, off_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K, A_T, B_T, INPUT_PRECISION)
        acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        for half in tl.static_range(2):
            acc_h = acc0 if half == 0 else acc1
            off_h = off_n + half * HALF
            offs_n = off_h + tl.arange(0, HALF)
            mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            out = _add_bias(acc_h, Bias, off_h, N, HAS_BIAS, HALF).to(Q.dtype.element_ty)
            store_head_split(Q, K_out, V, out, offs_m, offs_n, mask, N_TOK, QKV_C, QKV_D)


@triton.jit
def _partial_kernel(
    a_desc, b_desc,
    p_desc,  # (SPLITS, M, N) fp32, block (1, BLOCK_M, BLOCK_N // 2): slice s holds A[:, K_s] @ B[K_s, :]
    M, N, K,
    K_SPLIT,  # K elements of a slice, a multiple of BLOCK_K
    SPLITS,  # slices: cdiv(K, K_SPLIT)
    A_T: tl.constexpr, B_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):  # fmt: skip
    # Work unit u = slice * tiles + tile: programs that run together share a K slice of A and B through L2.
    HALF: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for unit in tl.range(tl.program_id(0), tiles * SPLITS, tl.num_programs(0), flatten=FLATTEN):
        split = unit // tiles
        off_m, off_n = _tile_offsets(unit % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        k_lo = split * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        acc = _mainloop(a_desc, b_desc, off_m, off_n, k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K, A_T, B_T,
                        INPUT_PRECISION)  # fmt: skip
        acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
        p_desc.store([split, off_m, off_n], tl.reshape(acc0, (1, BLOCK_M, HALF)))
        p_desc.store([split, off_m, off_n + HALF], tl.reshape(acc1, (1, BLOCK_M, HALF)))


# ----------------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------------
class GemmConfig(NamedTuple):
    """A GEMM launch config: this file's kernels read every field; linear.py's and block.py's pointer kernels
    (`_gemm_kernel`, `_block_gemm_kernel`) the first six, and leave `flatten` and `quarters` at False."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    flatten: bool = False  # fuse the tile loop with the K loop: the next tile's loads overlap this tile's epilogue
    quarters: bool = False  # GELU epilogues: (BLOCK_M, BLOCK_N / 4) sub-tiles instead of halves
    per_sm: int = 1  # persistent programs per SM: 2 (where registers and shared memory fit two CTAs) lets one
    # program's epilogue run while the other's mainloop keeps the tensor cores busy


# (precision, epilogue) -> config, per arch. The sm_90 entries come from the compile report, not from timing; their
# predicted times, and benchmarks/probe_gemm.py's against the pointer kernel and cuBLAS, are in benchmarks/NOTES.md.
#  - 16-bit: 128 x 256 x 64 on 8 warps (two m64n256 wgmma warpgroups), 3 stages of 48 KB. Plain stores flatten the
#    tile loop (the next tile's TMA loads run under this tile's epilogue); the epilogues with erf or a gather do
#    not, since flattening keeps the next accumulator live beside the epilogue's temporaries (spills). The split-K
#    partial kernel cannot be flattened (its K bounds depend on the work unit: Triton leaves the loops apart).
#  - tf32: twice the bytes per element: BLOCK_K 32 keeps 128-byte rows (full swizzle), 128 x 128 tiles.
#  - 0 (the interpreter, CPU tensors): small tiles and 4 programs, so a test walks several tiles per program.
_SM90 = GemmConfig(128, 256, 64, 8, 8, 3, False)
CONFIGS = {
    90: {
        ("16bit", "store"): _SM90._replace(flatten=True),
        ("16bit", "residual"): _SM90,
        # fc1 + GELU on halves measured 3% faster on the H200 (0.646 vs 0.667 ms, 2026-12-04) but takes 255
        # registers on Triton 3.8 (227 on 3.6): quarters stay until it is measured again.
        ("16bit", "gelu"): _SM90._replace(quarters=True),
        # dGELU: 128 x 128 on 4 stages, halves, measured 1.283 vs 2.576 ms for 128 x 256 quarters (H200, 2026-12-04,
        # gemm_ab at e85b852); 0 spills (150 registers on Triton 3.6, 189 on 3.8).
        ("16bit", "dgelu"): _SM90._replace(block_n=128, num_stages=4),
        ("16bit", "qkv"): _SM90,
        ("16bit", "partial"): _SM90,
        ("tf32", "store"): GemmConfig(128, 128, 32, 8, 8, 3, True),
        ("tf32", "residual"): GemmConfig(128, 128, 32, 8, 8, 3, False),
        ("tf32", "gelu"): GemmConfig(128, 128, 32, 8, 8, 3, False),
        ("tf32", "dgelu"): GemmConfig(128, 128, 32, 8, 8, 3, False),
        ("tf32", "qkv"): GemmConfig(128, 128, 32, 8, 8, 3, False),
        ("tf32", "partial"): GemmConfig(128, 128, 32, 8, 8, 3, False),
    },
}
_INTERPRETER_CONFIG = GemmConfig(32, 64, 32, 4, 4, 1, False)
_INTERPRETER_PROGRAMS = 4
# The SMs of an H100 SXM or H200: the static report's wave tables, and tests that pass arch 90 with CPU tensors. A
# launch on a GPU fills that device's own SMs (`sm_count`): 114 on an H100 PCIe, 78 on an H20, fewer on a MIG slice,
# where a grid of 132 one-CTA-per-SM programs would leave its last programs waiting for a second round.
SM_COUNT = {90: 132}
EPILOGUES = ("store", "residual", "gelu", "dgelu", "qkv", "partial")


def config(arch: int, dtype: torch.dtype, epilogue: str) -> GemmConfig:
    if arch == 0:
        return _INTERPRETER_CONFIG
    return CONFIGS[arch][("16bit" if dtype != torch.float32 else "tf32", epilogue)]


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, arch: int) -> int:
    """The SMs a persistent grid fills on `device`: the device's own count on CUDA, SM_COUNT[arch] on a device
    without SMs (meta tensors of the static report, CPU tensors launched at arch 90 by the tests), and the
    interpreter's few programs at arch 0."""
    if arch == 0:
        return _INTERPRETER_PROGRAMS
    if device.type == "cuda":
        return _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    return SM_COUNT[arch]


def programs(slots: int, work_units: int) -> int:
    """Persistent grid: one program per slot (SMs x the config's per_sm; one 8-warp CTA fills an SM: ~180 KB of
    shared memory), never more than there is work."""
    return max(1, min(work_units, slots))


def split_k_slices(arch: int, tiles: int, K: int, block_k: int, sms: int) -> int:
    """K slices for a weight gradient: the fewest slices whose work units (tiles x slices) fill the SMs to within
    90% in their last wave on `sms` SMs, each slice at least 8 BLOCK_K steps; 1 where the tiles alone already do (or K
    is short). ViT-B/16, B=256, 16-bit, 132 SMs: dW1 (3072 x 768, 72 tiles of 128 x 256) takes 11 slices: 792 units
    = 6 full waves."""
    if arch == 0:
        return 2 if K >= 4 * block_k else 1  # the interpreter: exercise the split path on test shapes
    k_steps = triton.cdiv(K, block_k)
    best, best_eff = 1, tiles / (triton.cdiv(tiles, sms) * sms)
    for s in range(1, 17):
        if k_steps < 8 * s:
            break
        units = tiles * s
        eff = units / (triton.cdiv(units, sms) * sms)
        if eff >= 0.9:
            return s
        if eff > best_eff + 0.05:
            best, best_eff = s, eff
    return best


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
_TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _stored(t: torch.Tensor) -> str | None:
    """How TMA can read a 2-D view: "rows" (stored as it is: unit-stride rows), "cols" (stored transposed:
    unit-stride columns), or None (no unit stride, an outer stride that is not a multiple of 16 bytes, a base
    that is not 16-byte aligned, or lines that overlap: an expanded dy of y.sum(0), strides (0, 1), has one row
    for all, which no descriptor on a GPU has been shown to take)."""
    if t.dim() != 2 or t.dtype not in _TMA_DTYPES or t.data_ptr() % 16:
        return None
    size, (rows, cols) = t.element_size(), t.shape
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and (rows == 1 or t.stride(0) >= cols):
        return "rows"
    if t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0 and (cols == 1 or t.stride(1) >= rows):
        return "cols"
    return None


def describable(*views: torch.Tensor, rows: tuple[torch.Tensor, ...] = ()) -> bool:
    """Whether every 2-D view can be a TMA operand (`_stored`), and every view in `rows` (what the kernels store
    or read through `_out`: outputs, the dGELU's hidden) is stored by rows. The launchers send anything else to
    linear.py's pointer kernel."""
    return all(_stored(t) is not None for t in views) and all(_stored(t) == "rows" for t in rows)


def _operand(t: torch.Tensor, block: tuple[int, int]) -> tuple[TensorDescriptor, bool]:
    """(descriptor, transposed) of a logical (R, S) operand with an (R-block, S-block) tile: over t itself when it
    is stored by rows, else over t^T (stored (S, R)) with the block swapped."""
    if _stored(t) == "rows":
        return TensorDescriptor.from_tensor(t, list(block)), False
    return TensorDescriptor.from_tensor(t.t(), [block[1], block[0]]), True


def _out(t: torch.Tensor, block: tuple[int, ...]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, list(block))


def _common(a, b, M, N, K, dtype, allow_tf32, arch, epilogue, work_units=None):
    cfg = config(arch, dtype, epilogue)
    a_desc, a_t = _operand(a, (cfg.block_m, cfg.block_k))
    b_desc, b_t = _operand(b.t(), (cfg.block_n, cfg.block_k))  # B (K, N) described as rows of N
    b_t = not b_t  # stored (N, K) is the mainloop's B_T
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    n_prog = programs(sm_count(a.device, arch) * cfg.per_sm, tiles if work_units is None else work_units)
    kwargs = dict(
        A_T=a_t, B_T=b_t, INPUT_PRECISION=vit_triton.input_precision(dtype, allow_tf32),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FLATTEN=cfg.flatten,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return cfg, a_desc, b_desc, kwargs, (n_prog,)


def _half(cfg: GemmConfig) -> tuple[int, int]:
    return cfg.block_m, cfg.block_n // 2


def _sub(cfg: GemmConfig) -> tuple[int, int]:
    """The epilogue's sub-tile: the descriptor block of the outputs (and of H) of the GELU entries."""
    return cfg.block_m, cfg.block_n // (4 if cfg.quarters else 2)


def store_args(a, b, c, bias, allow_tf32, arch):
    """(kernel, args, kwargs, grid) of c (M, N) = a (M, K) @ b (K, N) (+ bias (N,)); a, b, c 2-D views that
    `describable` accepts."""
    (M, K), N = a.shape, b.shape[1]
    cfg, a_desc, b_desc, kwargs, grid = _common(a, b, M, N, K, a.dtype, allow_tf32, arch, "store")
    args = (a_desc, b_desc, _out(c, _half(cfg)), bias if bias is not None else c, M, N, K)
    return _store_kernel, args, dict(kwargs, HAS_BIAS=bias is not None), grid


def residual_args(a, b, c, bias, residual_rows: tuple, allow_tf32, arch):
    """c = a @ b (+ bias) + residual; residual_rows = (tensor, ROWS, stride_outer, stride_inner, stride_col)."""
    (M, K), N = a.shape, b.shape[1]
    cfg, a_desc, b_desc, kwargs, grid = _common(a, b, M, N, K, a.dtype, allow_tf32, arch, "residual")
    res, *res_strides = residual_rows
    args = (a_desc, b_desc, _out(c, _half(cfg)), bias if bias is not None else c, res, M, N, K, *res_strides)
    return _residual_kernel, args, dict(kwargs, HAS_BIAS=bias is not None), grid


def gelu_args(a, b, hidden, act, bias, tanh: bool, allow_tf32, arch):
    """hidden = a @ b + bias (stored unless None), act = GELU(hidden)."""
    (M, K), N = a.shape, b.shape[1]
    cfg, a_desc, b_desc, kwargs, grid = _common(a, b, M, N, K, a.dtype, allow_tf32, arch, "gelu")
    act_desc = _out(act, _sub(cfg))
    h_desc = _out(hidden, _sub(cfg)) if hidden is not None else act_desc
    args = (a_desc, b_desc, h_desc, act_desc, bias if bias is not None else act, M, N, K)
    kw = dict(kwargs, HAS_BIAS=bias is not None, STORE_PRE=hidden is not None, TANH=tanh, QUARTERS=cfg.quarters)
    return _gelu_kernel, args, kw, grid


def dbias_rows(arch: int, dtype: torch.dtype, M: int) -> int:
    """Rows of the dGELU kernel's partial bias-gradient buffer: one per BLOCK_M row tile of M."""
    return triton.cdiv(M, config(arch, dtype, "dgelu").block_m)


def dgelu_args(a, b, hidden, dhidden, act, tanh: bool, allow_tf32, arch, dbias_part=None):
    """dhidden = (a @ b) * GELU'(hidden); act = GELU(hidden) where act is not None; dbias_part (`dbias_rows`, N)
    fp32, where given, gets each row tile's column sums of dhidden (fp32, before rounding), for the caller to add
    in row-tile order (deterministic): the bias gradient without a second pass over dhidden."""
    (M, K), N = a.shape, b.shape[1]
    cfg, a_desc, b_desc, kwargs, grid = _common(a, b, M, N, K, a.dtype, allow_tf32, arch, "dgelu")
    dh_desc = _out(dhidden, _sub(cfg))
    args = (a_desc, b_desc, _out(hidden, _sub(cfg)), dh_desc, _out(act, _sub(cfg)) if act is not None else dh_desc,
            dbias_part if dbias_part is not None else hidden, M, N, K)  # fmt: skip
    kw = dict(kwargs, STORE_ACT=act is not None, TANH=tanh, DBIAS=dbias_part is not None, QUARTERS=cfg.quarters)
    return _dgelu_kernel, args, kw, grid


def qkv_args(a, b, q, k, v, bias, n_tok: int, allow_tf32, arch):
    """q, k, v (B, H, n_tok, D) contiguous = head split of a (M, C) @ b (C, 3C) + bias."""
    (M, K), N = a.shape, b.shape[1]
    cfg, a_desc, b_desc, kwargs, grid = _common(a, b, M, N, K, a.dtype, allow_tf32, arch, "qkv")
    C, D = N // 3, q.shape[-1]
    args = (a_desc, b_desc, q, k, v, bias if bias is not None else q, M, N, K, n_tok)
    return _qkv_kernel, args, dict(kwargs, HAS_BIAS=bias is not None, QKV_C=C, QKV_D=D), grid


def slice_length(K: int, splits: int, block_k: int) -> int:
    """K elements of each of `splits` slices, rounded up to whole BLOCK_K steps (so the last may be shorter, and
    cdiv(K, slice_length) may be fewer than `splits`)."""
    return triton.cdiv(triton.cdiv(K, splits), block_k) * block_k


def partial_args(a, b, partial, k_split: int, allow_tf32, arch):
    """partial (splits, M, N) fp32: slice s = a[:, s * k_split : (s + 1) * k_split] @ b[that range, :], k_split a
    multiple of BLOCK_K and splits = cdiv(K, k_split)."""
    (M, K), N = a.shape, b.shape[1]
    cfg = config(arch, a.dtype, "partial")
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    splits = partial.shape[0]
    assert k_split % cfg.block_k == 0 and triton.cdiv(K, k_split) == splits, (K, k_split, splits)
    _cfg, a_desc, b_desc, kwargs, grid = _common(
        a, b, M, N, K, a.dtype, allow_tf32, arch, "partial", work_units=tiles * splits
    )
    args = (a_desc, b_desc, _out(partial, (1, *_half(cfg))), M, N, K, k_split, splits)
    return _partial_kernel, args, kwargs, grid


def launch(kernel, args, kwargs, grid) -> None:
    kernel[grid](*args, **kwargs)


def weight_grad(a, b, c, allow_tf32, arch) -> None:
    """c (M, N) = a (M, K) @ b (K, N) for a weight gradient (K = tokens, M x N = features x features): split along
    K (`split_k_slices`) into fp32 partials that torch adds in slice order (deterministic), rounded once. The
    partials' buffer comes from `vit_kernels.triton.alloc` (which the tests NaN-fill)."""
    (M, K), N = a.shape, b.shape[1]
    cfg = config(arch, a.dtype, "partial")
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    splits = split_k_slices(arch, tiles, K, cfg.block_k, sm_count(a.device, arch))
    if splits == 1:
        launch(*store_args(a, b, c, None, allow_tf32, arch))
        return
    k_split = slice_length(K, splits, cfg.block_k)
    splits = triton.cdiv(K, k_split)  # rounding slices up to whole BLOCK_K steps can leave fewer of them
    partial = vit_triton.alloc(splits, M, N, like=c, dtype=torch.float32)
    launch(*partial_args(a, b, partial, k_split, allow_tf32, arch))
    c.copy_(partial.sum(0))


# ----------------------------------------------------------------------------------------------------
# static check: compile the shipped configs for sm_90 without a GPU, with a wave table per product
# ----------------------------------------------------------------------------------------------------
def block_products(B: int, N: int, C: int, H: int, mlp_ratio: int, dtype: torch.dtype, allow_tf32: bool, arch: int):
    """(name, kernel, args, kwargs, work units) of every GEMM of one ViT block, forward and backward, as linear.py
    and block.py launch them on this path, on meta tensors (contiguous activations, the packed dQKV)."""
    D, M, Hd = C // H, B * N, mlp_ratio * C

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta")

    x, w_qkv, w_proj, w1, w2 = t(M, C), t(3 * C, C), t(C, C), t(Hd, C), t(C, Hd)
    hid, dqkv, q = t(M, Hd), t(M, 3 * C), t(B, H, N, D)
    launches = [
        ("qkv_fwd", qkv_args(x, w_qkv.t(), q, q, q, t(3 * C), N, allow_tf32, arch)),
        ("proj_residual_fwd", residual_args(x, w_proj.t(), t(M, C), t(C), (x, 1, C, 0, 1), allow_tf32, arch)),
        ("mlp_fc1", gelu_args(x, w1.t(), hid, hid, t(Hd), False, allow_tf32, arch)),
        ("mlp_fc2", store_args(hid, w2.t(), t(M, C), t(C), allow_tf32, arch)),
        ("mlp_fc2_residual", residual_args(hid, w2.t(), t(M, C), t(C), (x, 1, C, 0, 1), allow_tf32, arch)),
        ("qkv_bwd_dx", store_args(dqkv, w_qkv, t(M, C), None, allow_tf32, arch)),
        (
            "mlp_bwd_dhidden",
            dgelu_args(
                x,
                w2,
                hid,
                hid,
                hid,
                False,
                allow_tf32,
                arch,
                dbias_part=t(dbias_rows(arch, dtype, M), Hd, dt=torch.float32),
            ),
        ),
        ("mlp_bwd_dx", store_args(hid, w1, t(M, C), None, allow_tf32, arch)),
    ]
    for name, a, b in (("qkv_bwd_dw", dqkv.t(), x), ("mlp_bwd_dw2", x.t(), hid), ("mlp_bwd_dw1", hid.t(), x)):
        (M_, K_), N_ = a.shape, b.shape[1]
        cfg = config(arch, dtype, "partial")
        tiles = triton.cdiv(M_, cfg.block_m) * triton.cdiv(N_, cfg.block_n)
        k_split = slice_length(K_, split_k_slices(arch, tiles, K_, cfg.block_k, SM_COUNT[arch]), cfg.block_k)
        partial = t(triton.cdiv(K_, k_split), M_, N_, dt=torch.float32)
        launches.append((name, partial_args(a, b, partial, k_split, allow_tf32, arch)))
    rows = []
    for name, (kernel, args, kwargs, grid) in launches:
        cfg = config(arch, dtype, _EPILOGUE_OF[kernel])
        M_, N_ = _mn(kernel, args)
        tiles = triton.cdiv(M_, cfg.block_m) * triton.cdiv(N_, cfg.block_n)
        splits = args[-1] if kernel is _partial_kernel else 1
        rows.append((name, kernel, args, kwargs, {"tiles": tiles, "splits": splits, "units": tiles * splits,
                                                  "programs": grid[0]}))  # fmt: skip
    return rows


_EPILOGUE_OF = {
    _store_kernel: "store", _residual_kernel: "residual", _gelu_kernel: "gelu", _dgelu_kernel: "dgelu",
    _qkv_kernel: "qkv", _partial_kernel: "partial",
}  # fmt: skip


def _mn(kernel, args) -> tuple[int, int]:
    """The M and N an entry kernel's positional arguments hold."""
    return args[kernel.arg_names.index("M")], args[kernel.arg_names.index("N")]


# ViT-B/16 at 224 px, batch 256 (the benchmark shape: its weight gradients are the wave-limited products).
REPORT_SHAPES = ((256, 197, 768, 12),)
_REGS_PER_SM, _SMEM_PER_SM = 65536, 232448  # sm_90: registers and shared memory (227 KB + 1 KB reserved) per SM


def waves(usage: dict, num_warps: int, units: int, arch: int = 90) -> dict:
    """CTAs per SM from registers and shared memory, and the waves `units` work units take on SM_COUNT SMs."""
    by_regs = _REGS_PER_SM // max(1, usage["n_regs"] * 32 * num_warps)
    by_smem = _SMEM_PER_SM // max(1, usage["shared"])
    per_sm = max(0, min(by_regs, by_smem))
    return {"ctas_per_sm": per_sm, "waves": units / (SM_COUNT[arch] * per_sm) if per_sm else float("inf")}


def compile_report(arch: int = 90, shapes=REPORT_SHAPES, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                   kernels=None) -> list[dict]:  # fmt: skip
    """Compile every GEMM product of a ViT block on this path for sm_<arch> (90: the only arch with TMA), without
    a GPU and outside TRITON_INTERPRET. fp32 is compiled as tf32 (exact fp32 stays on the pointer kernel). One dict
    per product: kernel, entry (the @triton.jit entry kernel), dtype, config, the `static_check.usage` fields
    (registers, spills, shared memory, TMA loads, cp.async, mbarrier, setmaxnreg, wgmma N, serialisation warnings)
    and the wave table (tiles, splits, work units, programs, CTAs per SM, waves)."""
    from vit_kernels.triton import static_check

    if arch not in CONFIGS:  # sm_80 has no TMA: its GEMMs are linear.py's, reported there
        return []
    rows, cache = [], {}
    for B, N, C, H in shapes:
        for dtype in dtypes:
            for name, kernel, args, kwargs, work in block_products(B, N, C, H, 4, dtype, True, arch):
                if kernels is not None and name not in kernels:
                    continue
                key = (kernel.fn.__name__, tuple(str(a.block_shape) if isinstance(a, TensorDescriptor) else
                                                 (a.dtype if isinstance(a, torch.Tensor) else a) for a in args),
                       tuple(kwargs.items()))  # fmt: skip
                if key not in cache:
                    cache[key] = static_check.compile_launch(kernel, args, kwargs, arch)
                usage = cache[key]
                config_fields = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "FLATTEN")}
                config_fields.update(num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"])
                rows.append({"kernel": name, "entry": kernel.fn.__name__, "dtype": static_check.TL_DTYPES[dtype],
                             "M": _mn(kernel, args)[0], "N": _mn(kernel, args)[1], "config": config_fields,
                             **usage, **work, **waves(usage, kwargs["num_warps"], work["units"], arch)})  # fmt: skip
    return rows
