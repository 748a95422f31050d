"""Whole-block fusion in Triton: LayerNorm inside the QKV and fc1 GEMMs, the residual add inside the proj and fc2 GEMMs.

    ln_qkv:         q, k, v = split_heads(LN(x) @ W^T + b)                 x (B, N, C), W (3C, C)
    proj_residual:  out = residual + o @ W^T + b                           o, residual (B, N, C), W (C, C)
    ln_mlp:         out = x + gelu(LN(x) @ W1^T + b1) @ W2^T + b2         x (B, N, C), W1 (Hd, C), W2 (C, Hd)

Layout of this file, as in linear.py: `@triton.jit` kernels, then the plain launchers (`ln_qkv_fwd` / `_bwd`,
`proj_residual_fwd` / `_bwd`, `ln_mlp_fwd` / `_bwd`), then `compile_report` (static sm_80 / sm_90 check).

LayerNorm in the GEMM prologue: a tiny row kernel (`_ln_rows_kernel`) first reads x once and writes each row's
mean and rstd (fp32, 8 bytes per row), two-pass in registers (mean, then the mean of (x - mean)^2), so a row
whose mean is large against its spread loses nothing to cancellation (E[x^2] - E[x]^2 would). The GEMM
(`_block_gemm_kernel`) then normalises every A tile as it loads it: y = ((x - mean) * rstd) * gamma + beta in
fp32, rounded once to x's dtype (what eager `F.layer_norm` stores), and feeds that to the dot. The normalised
x is never written in forward. Why not fold gamma / beta into W and LN into the epilogue
(rstd * (x @ W'^T - mean * colsum(W'))): that is exactly the cancellation the two-pass stats avoid, in the
GEMM's accumulator, where mean >> std rows would lose every bit of the signal.

Residual in the epilogue: out = acc + bias + residual in fp32, rounded once (eager rounds the projection and then
the sum; the fused form is the more accurate one), so the projection output is never written and read back.

Saved for backward (by the block ops, vit_kernels/ops/): x (the block's residual stream, alive anyway), mean and rstd
((M,) fp32 each: 8 bytes per token instead of recomputing two reductions). Backward recomputes y = LN(x) once
into an (M, C) scratch buffer (`_ln_rows_kernel`, WRITE_Y) and hands it to linear.py's own backward launchers
(`qkv_bwd`, `mlp_bwd`), which produce dy = dL/dy and the weight and bias gradients; `_ln_bwd_kernel` then takes
dy through the normalisation (dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma), adds the
residual's gradient in the same pass where the residual is x itself, and reduces dgamma = sum(dy * xhat),
dbeta = sum(dy) into per-program fp32 partials that torch sums (deterministic, no atomics). Recomputing y costs
one (M, C) write + read in backward; a B-operand LN prologue in the dW GEMM would remove it (not done yet).
proj_residual keeps nothing but o and W: the residual's gradient is dout itself. Without autograd (no_grad,
inference) ln_mlp's fc1 does not write the pre-activation at all (STORE_PRE), only GELU of it for fc2.

Launch configs: linear.py's table (`linear.config`) for the same epilogue. The LN prologue holds the A tile in
registers for the normalisation; `compile_report` checks that this still compiles without spills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vit_kernels import triton as vit_triton
from vit_kernels.triton import linear, static_check, tma_gemm
from vit_kernels.triton.gemm_helpers import gelu_fwd, grouped_tile, split_offset, store_head_split
from vit_kernels.triton.linear import EPI_GELU, EPI_QKV, EPI_STORE


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _ln_rows_kernel(
    X,  # (M, C), rows split as (M // X_ROWS, X_ROWS)
    Y,  # (M, C) contiguous: LN(x) in x's dtype, written when WRITE_Y
    Mean, Rstd,  # (M,) fp32: written when STATS, read otherwise
    LnW, LnB,  # (C,) contiguous
    M, C,
    X_ROWS, stride_x_outer, stride_x_inner, stride_xc,
    eps,
    STATS: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_mask = rows < M
    mask = r_mask[:, None] & (cols < C)[None, :]
    x_rows = split_offset(rows, X_ROWS, stride_x_outer, stride_x_inner)
    x = tl.load(X + x_rows[:, None] + (cols * stride_xc)[None, :], mask=mask, other=0.0).to(tl.float32)
    if STATS:
        # Two passes over the row held in registers: the variance is a sum of squares of centred values.
        mean = tl.sum(x, 1) / C
        diff = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(diff * diff, 1) / C + eps)
        tl.store(Mean + rows, mean, mask=r_mask)
        tl.store(Rstd + rows, rstd, mask=r_mask)
    else:
        mean = tl.load(Mean + rows, mask=r_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=r_mask, other=0.0)
    if WRITE_Y:
        w = tl.load(LnW + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(LnB + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        y_offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _block_gemm_kernel(
    A,  # (M, K), rows split as (M // A_ROWS, A_ROWS): x when LN, else the GEMM input
    W,  # (N, K) weight, read as B = W^T in place
    C,  # (M, N); EPILOGUE 1: the pre-activation, written when STORE_PRE; EPILOGUE 2: q (B, H, N_TOK, D) contiguous
    C2,  # EPILOGUE 1: GELU(pre-activation) (M, N) with C's strides; EPILOGUE 2: k like q
    C3,  # EPILOGUE 2: v like q
    Bias,  # (N,) contiguous, read when HAS_BIAS
    Res,  # (M, N), rows split as (M // R_ROWS, R_ROWS): added in the epilogue when RESIDUAL
    Mean, Rstd,  # (M,) fp32 row statistics of A, read when LN
    LnW, LnB,  # (K,) contiguous LayerNorm affine, read when LN
    M, N, K,
    A_ROWS, stride_a_outer, stride_a_inner, stride_ak,
    stride_wn, stride_wk,
    stride_cm, stride_cn,
    R_ROWS, stride_r_outer, stride_r_inner, stride_rn,
    N_TOK,
    LN: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
    STORE_PRE: tl.constexpr, TANH: tl.constexpr, QKV_C: tl.constexpr, QKV_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = split_offset(offs_m, A_ROWS, stride_a_outer, stride_a_inner)
    w_rows = offs_n.to(tl.int64) * stride_wn
    if LN:
        mean = tl.load(Mean + offs_m, mask=m_mask, other=0.0)
        rstd = tl.load(Rstd + offs_m, mask=m_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(A + a_rows[:, None] + (offs_k * stride_ak)[None, :], mask=a_mask, other=0.0)
        if LN:
            # The prologue: normalise in fp32, round once to the operand dtype (eager LayerNorm's output), and
            # keep masked elements zero (beta would otherwise leak into the padded K columns).
            g = tl.load(LnW + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            be = tl.load(LnB + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            y = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + be[None, :]
            a = tl.where(a_mask, y, 0.0).to(W.dtype.element_ty)
        b = tl.load(W + w_rows[None, :] + (offs_k * stride_wk)[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    if RESIDUAL:
        r_rows = split_offset(offs_m, R_ROWS, stride_r_outer, stride_r_inner)
        res = tl.load(Res + r_rows[:, None] + (offs_n * stride_rn)[None, :], mask=c_mask, other=0.0)
        acc += res.to(tl.float32)
    out_ty = C.dtype.element_ty
    if EPILOGUE == 2:
        store_head_split(C, C2, C3, acc.to(out_ty), offs_m, offs_n, c_mask, N_TOK, QKV_C, QKV_D)
    else:
        c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + (offs_n * stride_cn)[None, :]
        if EPILOGUE == 0:
            tl.store(C + c_offs, acc.to(out_ty), mask=c_mask)
        else:
            # Pre-activation rounded first, so that backward's GELU recomputed from `hidden` sees the same numbers.
            pre = acc.to(out_ty)
            if STORE_PRE:  # only backward needs it: inference skips this (M, N) write
                tl.store(C + c_offs, pre, mask=c_mask)
            tl.store(C2 + c_offs, gelu_fwd(pre.to(tl.float32), TANH).to(out_ty), mask=c_mask)


@triton.jit
def _ln_bwd_kernel(
    X,  # (M, C), rows split as (M // X_ROWS, X_ROWS): LayerNorm's input
    DY,  # (M, C) any strides: gradient of LN's output y
    DRes,  # (M, C), rows split as (M // R_ROWS, R_ROWS): added to dx when ADD_DRES (the residual is x)
    DX,  # (M, C) contiguous
    Mean, Rstd,  # (M,) fp32
    LnW,  # (C,) contiguous
    DW_part, DB_part,  # (num_programs, C) fp32: this program's partial dgamma and dbeta
    M, C,
    X_ROWS, stride_x_outer, stride_x_inner, stride_xc,
    stride_dym, stride_dyc,
    R_ROWS, stride_r_outer, stride_r_inner, stride_rc,
    ADD_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Each program walks row blocks pid, pid + G, ... and keeps its dgamma / dbeta partials in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    w = tl.load(LnW + cols, mask=c_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(pid * BLOCK_R, M, tl.num_programs(0) * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < M
        mask = r_mask[:, None] & c_mask[None, :]
        x_rows = split_offset(rows, X_ROWS, stride_x_outer, stride_x_inner)
        x = tl.load(X + x_rows[:, None] + (cols * stride_xc)[None, :], mask=mask, other=0.0).to(tl.float32)
        dy_offs = rows.to(tl.int64)[:, None] * stride_dym + (cols * stride_dyc)[None, :]
        dy = tl.load(DY + dy_offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=r_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=r_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(xhat * g, 1) / C
        c2 = tl.sum(g, 1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if ADD_DRES:
            r_rows = split_offset(rows, R_ROWS, stride_r_outer, stride_r_inner)
            dx += tl.load(DRes + r_rows[:, None] + (cols * stride_rc)[None, :], mask=mask, other=0.0).to(tl.float32)
        dx_offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, 0)
        db_acc += tl.sum(dy, 0)
    tl.store(DW_part + pid * C + cols, dw_acc, mask=c_mask)
    tl.store(DB_part + pid * C + cols, db_acc, mask=c_mask)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _row_block(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the row kernels: a whole row in registers, ~4K fp32 elements a program
    (ViT-H's C = 1280 -> 2 rows of 2048; ViT-B 768 -> 4 of 1024)."""
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(16, 4096 // block_c))
    return block_r, block_c, 4 if block_c <= 1024 else 8


def _rows(t: torch.Tensor) -> tuple:
    """(ROWS, stride_outer, stride_inner, stride_col) of a (B, N, C) or (M, C) tensor read as (M, C)."""
    if t.dim() == 2:
        return (1, t.stride(0), 0, t.stride(1))
    return linear.Operand(t).args[1:]


def ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C) or (M, C), any strides -> mean, rstd, (M,) fp32 each."""
    C = x.shape[-1]
    M = x.numel() // C
    mean = vit_triton.alloc(M, like=x, dtype=torch.float32)
    rstd = vit_triton.alloc(M, like=x, dtype=torch.float32)
    block_r, block_c, num_warps = _row_block(C)
    with vit_triton.on_device(x):
        _ln_rows_kernel[(triton.cdiv(M, block_r),)](
            x, x, mean, rstd, x, x, M, C, *_rows(x), float(eps),
            STATS=True, WRITE_Y=False, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    return mean, rstd


def ln_rows(
    x: torch.Tensor, eps: float, ln_weight: torch.Tensor, ln_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, N, C) or (M, C), any strides -> y = LN(x) (M, C) contiguous in x's dtype, mean, rstd (M,) fp32: one
    pass of `_ln_rows_kernel` (statistics and normalisation), for the GEMMs of the Hopper path, which read y by
    TMA instead of normalising A tiles in registers."""
    C = x.shape[-1]
    M = x.numel() // C
    y = vit_triton.alloc(M, C, like=x)
    mean = vit_triton.alloc(M, like=x, dtype=torch.float32)
    rstd = vit_triton.alloc(M, like=x, dtype=torch.float32)
    block_r, block_c, num_warps = _row_block(C)
    with vit_triton.on_device(x):
        _ln_rows_kernel[(triton.cdiv(M, block_r),)](
            x, y, mean, rstd, ln_weight.contiguous(), ln_bias.contiguous(), M, C, *_rows(x), float(eps),
            STATS=True, WRITE_Y=True, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    return y, mean, rstd


def ln_apply(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor
) -> torch.Tensor:
    """y = LN(x) (M, C) contiguous in x's dtype, from saved statistics: the same formula as the GEMM prologue."""
    C = x.shape[-1]
    M = x.numel() // C
    y = vit_triton.alloc(M, C, like=x)
    block_r, block_c, num_warps = _row_block(C)
    with vit_triton.on_device(x):
        _ln_rows_kernel[(triton.cdiv(M, block_r),)](
            x, y, mean, rstd, ln_weight.contiguous(), ln_bias.contiguous(), M, C, *_rows(x), 0.0,
            STATS=False, WRITE_Y=True, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    return y


def ln_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_weight: torch.Tensor,
    dresidual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (M, C) any strides, x (B, N, C) or (M, C) -> dx shaped like x (contiguous), dgamma (C,), dbeta (C,).

    dresidual (shaped like x, any strides) is added to dx in the same pass: the residual stream's own gradient
    where the residual is x itself."""
    C = x.shape[-1]
    M = x.numel() // C
    dx = vit_triton.alloc(*x.shape, like=x)
    block_r, block_c, num_warps = _row_block(C)
    # Enough programs to fill the GPU a few times over; each then reduces its share of dgamma / dbeta.
    programs = min(triton.cdiv(M, block_r), 8 * 132 if x.is_cuda else 8)
    dw_part = vit_triton.alloc(programs, C, like=x, dtype=torch.float32)
    db_part = vit_triton.alloc(programs, C, like=x, dtype=torch.float32)
    dres = dresidual if dresidual is not None else x
    with vit_triton.on_device(x):
        _ln_bwd_kernel[(programs,)](
            x, dy, dres, dx, mean, rstd, ln_weight.contiguous(), dw_part, db_part, M, C,
            *_rows(x), dy.stride(0), dy.stride(1), *_rows(dres),
            ADD_DRES=dresidual is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        )  # fmt: skip
    return dx, dw_part.sum(0).to(ln_weight.dtype), db_part.sum(0).to(ln_weight.dtype)


def _gemm_args(
    a: torch.Tensor,
    weight: torch.Tensor,
    c: torch.Tensor,
    M: int,
    N: int,
    K: int,
    allow_tf32: bool,
    arch: int,
    *,
    epilogue: int = EPI_STORE,
    bias: torch.Tensor | None = None,
    c2: torch.Tensor | None = None,
    c3: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    store_pre: bool = True,
    tanh: bool = False,
    n_tok: int = 1,
    qkv_c: int = 1,
    qkv_d: int = 1,
) -> tuple[tuple, dict, tuple[int]]:
    """(positional args, constexpr and launch kwargs, grid) of one `_block_gemm_kernel` launch:
    C (M, N) = epilogue(prologue(a) (M, K) @ weight (N, K)^T). ln = (mean, rstd, ln_weight, ln_bias)."""
    dtype = a.dtype
    cfg = linear.config(M, N, dtype, allow_tf32, arch, epilogue)
    if ln is not None and arch and vit_triton.input_precision(dtype, allow_tf32) == "ieee":
        # Exact fp32 with the LN prologue: linear.py's 64 x 64 ieee tile on 8 warps spilled 16 bytes on sm_80
        # (Triton 3.8, 3.9; capped at 80 registers); 32 x 64 on 4 warps holds 96 with 0 spills on sm_80 and sm_90,
        # Triton 3.6 / 3.8 / 3.9 (static step only: not timed on a GPU).
        cfg = cfg._replace(block_m=32, num_warps=4)
    mean, rstd, ln_w, ln_b = ln if ln is not None else (c, c, c, c)
    res_rows = _rows(residual) if residual is not None else (1, 0, 0, 0)
    c_strides = c.stride() if c.dim() == 2 else (0, 0)
    args = (
        a, weight, c, c2 if c2 is not None else c, c3 if c3 is not None else c, bias if bias is not None else c,
        residual if residual is not None else c, mean, rstd, ln_w, ln_b,
        M, N, K, *_rows(a), weight.stride(0), weight.stride(1), *c_strides, *res_rows, n_tok,
    )  # fmt: skip
    kwargs = dict(
        LN=ln is not None, EPILOGUE=epilogue, HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
        STORE_PRE=store_pre, TANH=tanh,
        QKV_C=qkv_c, QKV_D=qkv_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INPUT_PRECISION=vit_triton.input_precision(dtype, allow_tf32),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return args, kwargs, (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)


def _tma_path(x: torch.Tensor, allow_tf32: bool, *views: torch.Tensor | None, rows=()) -> bool:
    """Whether this op's GEMMs run on tma_gemm.py (linear.TMA_ARCHS) with these operand views (and these outputs,
    `rows`): LayerNorm then runs as a row kernel writing LN(x), and the residual is read in the GEMM's epilogue."""
    return linear.tma_path(vit_triton.arch(x.device), x.dtype, allow_tf32, *views, rows=rows)


def _launch(a, weight, c, M, N, K, allow_tf32, **extra) -> None:
    args, kwargs, grid = _gemm_args(a, weight, c, M, N, K, allow_tf32, vit_triton.arch(c.device), **extra)
    linear.check_gemm_size(M, N, K, grid)
    with vit_triton.on_device(c):
        _block_gemm_kernel[grid](*args, **kwargs)


def ln_qkv_fwd(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    allow_tf32: bool,
) -> tuple[torch.Tensor, ...]:
    """x (B, N, C) any strides; ln (C,); weight (3C, C), bias (3C,) or None -> q, k, v contiguous (B, H, N, D),
    mean, rstd (B*N,) fp32 (for backward). Two launches: row statistics, then the LN-prologue / head-split GEMM."""
    B, N, C = x.shape
    D = C // num_heads
    if _tma_path(x, allow_tf32, weight):
        y, mean, rstd = ln_rows(x, eps, ln_weight, ln_bias)
        q, k, v = linear.qkv_fwd(y.view(B, N, C), weight, bias, num_heads, allow_tf32)
        return q, k, v, mean, rstd
    mean, rstd = ln_stats(x, eps)
    q, k, v = (vit_triton.alloc(B, num_heads, N, D, like=x) for _ in range(3))
    _launch(
        x, weight, q, B * N, 3 * C, C, allow_tf32, epilogue=EPI_QKV, c2=k, c3=v,
        bias=vit_triton.contiguous_vector(bias), ln=(mean, rstd, ln_weight.contiguous(), ln_bias.contiguous()),
        n_tok=N, qkv_c=C, qkv_d=D,
    )  # fmt: skip
    return q, k, v, mean, rstd


def ln_qkv_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, ...]:
    """-> dx (B, N, C) contiguous, dln_weight (C,), dln_bias (C,), dweight (3C, C), dbias (3C,) or None.

    y = LN(x) is recomputed once from the saved statistics; linear.qkv_bwd gives dy, dweight and dbias (dQKV read
    in place from dq, dk, dv); `_ln_bwd_kernel` takes dy through the normalisation."""
    y = ln_apply(x, mean, rstd, ln_weight, ln_bias).view(x.shape)
    dy, dweight, dbias = linear.qkv_bwd(dq, dk, dv, y, weight, has_bias, allow_tf32)
    dx, dln_w, dln_b = ln_backward(dy.view(-1, x.shape[-1]), x, mean, rstd, ln_weight, None)
    return dx, dln_w, dln_b, dweight, dbias


def proj_residual_fwd(
    o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, allow_tf32: bool
) -> torch.Tensor:
    """o (B, N, C_in), residual (B, N, C), any strides; weight (C, C_in) -> residual + o @ weight^T + bias,
    contiguous (B, N, C). One GEMM; the residual is read in its epilogue."""
    B, N, C_in = o.shape
    C = weight.shape[0]
    out = vit_triton.alloc(B, N, C, like=o)
    o2 = linear.matrix_view(o)
    if _tma_path(o, allow_tf32, weight, o2, rows=(out.view(B * N, C),)):
        arch = vit_triton.arch(o.device)
        launch = tma_gemm.residual_args(o2, weight.t(), out.view(B * N, C), vit_triton.contiguous_vector(bias),
                                        (residual, *_rows(residual)), allow_tf32, arch)  # fmt: skip
        linear.tma_launch(*launch, B * N, C, C_in, out)
        return out
    _launch(
        o, weight, out.view(B * N, C), B * N, C, C_in, allow_tf32, bias=vit_triton.contiguous_vector(bias),
        residual=residual,
    )  # fmt: skip
    return out


def proj_residual_bwd(
    dout: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, has_bias: bool, allow_tf32: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dout (B, N, C) any strides -> do (B, N, C_in), dweight (C, C_in), dbias (C,) or None (dresidual is dout).

    Two plain GEMMs of linear.py, do = dout @ weight and dweight = dout^T @ o; dbias = column sums of dout."""
    B, N, C_in = o.shape
    C = weight.shape[0]
    M = B * N
    do = vit_triton.alloc(B, N, C_in, like=o)
    dweight = vit_triton.alloc(C, C_in, like=weight)
    dbias = vit_triton.alloc(C, like=o) if has_bias else None
    dout2 = dout.reshape(M, C)  # a view for every layout autograd hands over in practice; a copy otherwise
    linear.gemm(dout2, weight, do.view(M, C_in), allow_tf32)
    linear.weight_grad(dout2.t(), o, dweight, allow_tf32)
    if dbias is not None:
        linear.bias_grad(dout2, dbias)
    return do, dweight, dbias


def ln_mlp_fwd(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str,
    residual: bool,
    allow_tf32: bool,
    save_hidden: bool = True,
) -> tuple[torch.Tensor, ...]:
    """x (B, N, C) any strides -> out (B, N, C_out) contiguous = [x +] fc2(GELU(fc1(LN(x)))), hidden (B*N, Hd)
    (the pre-activation, saved for backward; None when not save_hidden, i.e. no gradient will be asked for, and
    then never written), mean, rstd (B*N,) fp32.

    Three launches: row statistics; fc1 with the LN prologue and the GELU epilogue (which also writes the
    activation into a scratch buffer, as linear.mlp_fwd does, for the reason given there); fc2 with the bias and
    residual epilogue."""
    B, N, C = x.shape
    M, Hd, C_out = B * N, fc1_weight.shape[0], fc2_weight.shape[0]
    hidden = vit_triton.alloc(M, Hd, like=x) if save_hidden else None
    act = vit_triton.alloc(M, Hd, like=x)
    out = vit_triton.alloc(B, N, C_out, like=x)
    stored = tuple(t for t in (hidden, act, out.view(M, C_out)) if t is not None)
    if _tma_path(x, allow_tf32, fc1_weight, fc2_weight, rows=stored):
        arch = vit_triton.arch(x.device)
        y, mean, rstd = ln_rows(x, eps, ln_weight, ln_bias)
        fc1 = tma_gemm.gelu_args(y, fc1_weight.t(), hidden, act, vit_triton.contiguous_vector(fc1_bias),
                                 approximate == "tanh", allow_tf32, arch)  # fmt: skip
        linear.tma_launch(*fc1, M, Hd, C, act)
        if residual:
            fc2 = tma_gemm.residual_args(
                act, fc2_weight.t(), out.view(M, C_out), vit_triton.contiguous_vector(fc2_bias), (x, *_rows(x)),
                allow_tf32, arch,
            )  # fmt: skip
            linear.tma_launch(*fc2, M, C_out, Hd, out)
        else:
            linear.gemm(act, fc2_weight.t(), out.view(M, C_out), allow_tf32, bias=fc2_bias)
        return out, hidden, mean, rstd
    mean, rstd = ln_stats(x, eps)
    _launch(
        x, fc1_weight, hidden if save_hidden else act, M, Hd, C, allow_tf32, epilogue=EPI_GELU,
        bias=vit_triton.contiguous_vector(fc1_bias), c2=act, tanh=approximate == "tanh", store_pre=save_hidden,
        ln=(mean, rstd, ln_weight.contiguous(), ln_bias.contiguous()),
    )  # fmt: skip
    _launch(
        act, fc2_weight, out.view(M, C_out), M, C_out, Hd, allow_tf32, bias=vit_triton.contiguous_vector(fc2_bias),
        residual=x if residual else None,
    )  # fmt: skip
    return out, hidden, mean, rstd


def ln_mlp_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    hidden: torch.Tensor,
    has_fc1_bias: bool,
    has_fc2_bias: bool,
    approximate: str,
    residual: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, ...]:
    """dout (B, N, C_out) any strides -> dx (B, N, C), dln_weight, dln_bias, dfc1_weight, dfc1_bias or None,
    dfc2_weight, dfc2_bias or None. dx includes the residual's dout when `residual` (added by the LN kernel)."""
    C = x.shape[-1]
    dout2 = dout.reshape(-1, dout.shape[-1])
    y = ln_apply(x, mean, rstd, ln_weight, ln_bias)
    dy, dw1, db1, dw2, db2 = linear.mlp_bwd(
        dout2, y, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32
    )
    dres = dout if residual else None
    dx, dln_w, dln_b = ln_backward(dy.view(-1, C), x, mean, rstd, ln_weight, dres)
    return dx, dln_w, dln_b, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------------
# static check: compile the shipped configs for a GPU target without a GPU
# ----------------------------------------------------------------------------------------------------
def _block_kernels(
    B: int, N: int, C: int, H: int, mlp_ratio: int, dtype: torch.dtype, arch: int, allow_tf32: bool = True
):
    """(name, kernel, args, kwargs) of every launch this file adds to a ViT block, on meta tensors laid out as
    the launchers lay them out."""
    D, M, Hd = C // H, B * N, mlp_ratio * C

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta")

    x, qkv = t(B, N, C), t(B, H, N, D)
    stats = (t(M, dt=torch.float32), t(M, dt=torch.float32), t(C), t(C))
    hid = t(M, Hd)
    gemms = [
        ("ln_qkv_fwd", (x, t(3 * C, C), qkv, M, 3 * C, C),
         dict(epilogue=EPI_QKV, bias=t(3 * C), c2=qkv, c3=qkv, ln=stats, n_tok=N, qkv_c=C, qkv_d=D)),
        ("proj_residual_fwd", (x, t(C, C), t(M, C), M, C, C), dict(bias=t(C), residual=x)),
        ("ln_mlp_fc1", (x, t(Hd, C), hid, M, Hd, C), dict(epilogue=EPI_GELU, bias=t(Hd), c2=hid, ln=stats)),
        ("mlp_fc2_residual", (hid, t(C, Hd), t(M, C), M, C, Hd), dict(bias=t(C), residual=x)),
    ]  # fmt: skip
    rows = []
    for name, (a, w, c, M_, N_, K_), extra in gemms:
        args, kwargs, _grid = _gemm_args(a, w, c, M_, N_, K_, allow_tf32, arch, **extra)
        rows.append((name, _block_gemm_kernel, args, kwargs))
    block_r, block_c, num_warps = _row_block(C)
    f32 = t(M, dt=torch.float32)
    row_args = (x, t(M, C), f32, f32, t(C), t(C), M, C, *_rows(x), 1e-6)
    rows.append(("ln_stats", _ln_rows_kernel, row_args,
                 dict(STATS=True, WRITE_Y=False, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)))  # fmt: skip
    rows.append(("ln_apply", _ln_rows_kernel, row_args,
                 dict(STATS=False, WRITE_Y=True, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)))  # fmt: skip
    part = t(8, C, dt=torch.float32)
    bwd_args = (x, t(M, C), x, t(M, C), f32, f32, t(C), part, part, M, C, *_rows(x), C, 1, *_rows(x))
    rows.append(("ln_bwd", _ln_bwd_kernel, bwd_args,
                 dict(ADD_DRES=True, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)))  # fmt: skip
    return rows


# ViT-B/16 at 224 px, batch 64 (as linear.REPORT_SHAPES).
REPORT_SHAPES = ((64, 197, 768, 12),)


def compile_report(
    arch: int,
    shapes=REPORT_SHAPES,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    kernels=None,
    fp32_precisions=static_check.FP32_PRECISIONS,
) -> list[dict]:
    """Compile every kernel launch this file adds to a ViT block, with the shipped config, for sm_<arch>; no GPU
    needed, but not under TRITON_INTERPRET. One dict per launch: kernel, dtype, precision ("ieee" / "tf32" for
    fp32, None for 16-bit), config, n_regs, n_spills, shared, wgmma, mma (see linear.compile_report); kernels:
    names to keep (all when None); fp32 is compiled once per precision in `fp32_precisions`, as linear.py's.
    Identical compilations (the row kernels, which have no dot) are done once."""
    rows, cache = [], {}
    for B, N, C, H in shapes:
        for dtype, allow_tf32 in static_check.dtype_precisions(dtypes, fp32_precisions):
            precision = vit_triton.input_precision(dtype, allow_tf32) if dtype == torch.float32 else None
            for name, kernel, args, kwargs in _block_kernels(B, N, C, H, 4, dtype, arch, allow_tf32):
                if kernels is not None and name not in kernels:
                    continue
                key = (name, tuple(v.dtype if isinstance(v, torch.Tensor) else v for v in args), tuple(kwargs.items()))
                if key not in cache:
                    cache[key] = static_check.compile_launch(kernel, args, kwargs, arch)
                config = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k.startswith("num_")}
                rows.append({"kernel": name, "dtype": static_check.TL_DTYPES[dtype], "precision": precision,
                             "config": config, **cache[key]})  # fmt: skip
    return rows
