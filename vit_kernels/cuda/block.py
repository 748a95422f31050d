"""CUDA backend of the whole-block ops: the kernel-module contract of `vit_kernels.triton.block`, on csrc's GEMMs.

    ln_qkv:         q, k, v = split_heads(LN(x) @ W^T + b)                 x (B, N, C), W (3C, C)
    proj_residual:  out = residual + o @ W^T + b                           o, residual (B, N, C), W (C, C)
    ln_mlp:         out = x + gelu(LN(x) @ W1^T + b1) @ W2^T + b2         x (B, N, C), W1 (Hd, C), W2 (C, Hd)

Every GEMM is cuda/linear.py's (CUTLASS sm_90a on Hopper fp16 / bf16, mma.sync or SIMT elsewhere; `gemm_path`),
with the residual added in the epilogue of proj and fc2 (fp32, rounded once, as the Triton kernels do).
LayerNorm stays on the Triton row kernels of vit_kernels/triton/block.py (`ln_rows`: statistics and LN(x) in one
pass; `ln_apply` recomputes LN(x) in backward from the saved statistics; `ln_backward` takes dy through the
normalisation, adds the residual's gradient and sums dgamma / dbeta deterministically): the GEMMs read LN(x) as a
plain matrix, as the Triton backend's Hopper path does, and one LayerNorm implementation serves both backends.
`vk.explain_backend` says so; the backend therefore needs Triton on the GPU too (`ops/pre_ln_block.select` checks).
"""

from __future__ import annotations

from vit_kernels.cuda import linear
from vit_kernels.triton.block import ln_apply, ln_backward, ln_rows

# What explain_backend adds for these ops (dispatch.select says where LayerNorm runs).
LAYER_NORM = "LayerNorm on the Triton row kernels (vit_kernels/triton/block.py)"


def ln_qkv_fwd(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32):
    """x (B, N, C) any strides -> q, k, v contiguous (B, H, N, D), mean, rstd (B*N,) fp32."""
    y, mean, rstd = ln_rows(x, eps, ln_weight, ln_bias)
    q, k, v = linear.qkv_fwd(y.view(x.shape), weight, bias, num_heads, allow_tf32)
    return q, k, v, mean, rstd


def ln_qkv_bwd(dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, has_bias, allow_tf32):
    """-> dx (B, N, C) contiguous, dln_weight (C,), dln_bias (C,), dweight (3C, C), dbias (3C,) or None."""
    y = ln_apply(x, mean, rstd, ln_weight, ln_bias).view(x.shape)
    dy, dweight, dbias = linear.qkv_bwd(dq, dk, dv, y, weight, has_bias, allow_tf32)
    dx, dln_w, dln_b = ln_backward(dy.view(-1, x.shape[-1]), x, mean, rstd, ln_weight, None)
    return dx, dln_w, dln_b, dweight, dbias


def proj_residual_fwd(o, weight, bias, residual, allow_tf32):
    """o (B, N, C_in), residual (B, N, C), any strides -> residual + o @ weight^T + bias, contiguous (B, N, C)."""
    B, N, C_in = o.shape
    out = linear.linear_fwd(o.reshape(B * N, C_in), weight, bias, residual)
    return out.view(B, N, weight.shape[0])


def proj_residual_bwd(dout, o, weight, has_bias, allow_tf32):
    """dout (B, N, C) any strides -> do (B, N, C_in), dweight (C, C_in), dbias (C,) or None (dresidual is dout)."""
    B, N, C_in = o.shape
    do, dweight, dbias = linear.linear_bwd(
        dout.reshape(B * N, weight.shape[0]), o.reshape(B * N, C_in), weight, has_bias
    )
    return do.view(B, N, C_in), dweight, dbias


def ln_mlp_fwd(
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
    save_hidden=True,
):  # fmt: skip
    """x (B, N, C) any strides -> out (B, N, C_out) contiguous = [x +] fc2(GELU(fc1(LN(x)))), hidden (B*N, Hd) (None
    when not save_hidden, and then never written), mean, rstd (B*N,) fp32."""
    B, N, C = x.shape
    y, mean, rstd = ln_rows(x, eps, ln_weight, ln_bias)
    out, hidden = linear.mlp_fwd(
        y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, residual=x if residual else None,
        save_hidden=save_hidden,
    )  # fmt: skip
    return out.view(B, N, fc2_weight.shape[0]), hidden, mean, rstd


def ln_mlp_bwd(
    dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate,
    residual, allow_tf32,
):  # fmt: skip
    """dout (B, N, C_out) any strides -> dx (B, N, C), dln_weight, dln_bias, dfc1_weight, dfc1_bias or None,
    dfc2_weight, dfc2_bias or None. dx includes the residual's dout when `residual` (added by the LN kernel)."""
    C = x.shape[-1]
    dout2 = dout.reshape(-1, dout.shape[-1])
    y = ln_apply(x, mean, rstd, ln_weight, ln_bias)
    dy, dw1, db1, dw2, db2 = linear.mlp_bwd(
        dout2, y, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32
    )
    dx, dln_w, dln_b = ln_backward(dy.view(-1, C), x, mean, rstd, ln_weight, dout if residual else None)
    return dx, dln_w, dln_b, dw1, db1, dw2, db2
