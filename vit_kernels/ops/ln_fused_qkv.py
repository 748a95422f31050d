"""vk.ln_fused_qkv: fused_qkv(layer_norm(x)). The public function, its input checks, its backend choice and its
kernel op (custom ops and autograd) in one place; what the three block ops share (backends, the kernel-module
contract, fuses_block) is ops/pre_ln_block.py; the kernels are vit_kernels/triton/block.py and
vit_kernels/cuda/block.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_kernels import dispatch, kernel_op, reference, torch_backend
from vit_kernels.ops import fused_qkv, pre_ln_block


def ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, *, backend="auto"):
    """fused_qkv(layer_norm(x)): x (B, N, C); ln_weight, ln_bias (C,); eps (timm 1e-6, HF 1e-12); qkv_weight
    (3C, C), qkv_bias (3C,) or None -> q, k, v each (B, H, N, C // H). LayerNorm runs in the GEMM's A-tile prologue
    (triton's pointer kernels) or as one row kernel writing LN(x) for TMA-fed GEMMs (triton on Hopper, cuda)."""
    (backend, _why), (x, ln_weight, ln_bias, qkv_weight, qkv_bias) = plan(
        x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, backend=backend
    )
    if backend == "reference":
        return reference.ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads)
    if backend == "torch":
        y = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
        return torch_backend.fused_qkv(y, qkv_weight, qkv_bias, num_heads)
    q, k, v, _mean, _rstd = LN_QKV(
        x, ln_weight, ln_bias, float(eps), qkv_weight, qkv_bias, num_heads, dispatch.allow_tf32(), backend
    )
    return q, k, v


def plan(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, *, backend="auto"):
    """Autocast, validation, the backend choice: (Choice, (x, ln_weight, ln_bias, qkv_weight, qkv_bias))."""
    tensors = dispatch.autocast_inputs(x, ln_weight, ln_bias, qkv_weight, qkv_bias)
    x, ln_weight, ln_bias, qkv_weight, qkv_bias = tensors
    return check(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, backend), tensors


def check(x, ln_weight, ln_bias, eps, weight, bias, num_heads, backend: str) -> dispatch.Choice:
    dispatch.check_tensor("x", x, ndim=3, batch_dims=1)
    pre_ln_block.check_layer_norm(x, ln_weight, ln_bias, eps)
    names = ("qkv_weight", "qkv_bias")
    C = fused_qkv.check_projection(x, weight, bias, num_heads, names, ln_weight=ln_weight, ln_bias=ln_bias)
    sizes = (x.dtype, C, x.shape[0] * x.shape[1])
    channels = {"C": C, "head dim C // num_heads": C // num_heads}
    choice = pre_ln_block.select(backend, x.device, "ln_fused_qkv", sizes, channels)
    return dispatch.empty_batch(choice) if x.shape[0] == 0 else choice


# ----------------------------------------------------------------------------------------------------
# the kernel op: vit_kernels::ln_qkv_fwd / ln_qkv_bwd
# ----------------------------------------------------------------------------------------------------
def _forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fused_qkv.check_forward_args(x, weight, bias, num_heads, backend)
    pre_ln_block.check_layer_norm_args(x, ln_weight, ln_bias)
    pre_ln_block.check_eps(eps)
    return _launch_forward(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend)


def _launch_forward(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend):
    return kernel_op.kernels(backend, "block").ln_qkv_fwd(
        x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32
    )


def _forward_fake(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend):
    B, N, C = x.shape
    shape = (B, num_heads, N, C // num_heads)
    stats = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape), stats, stats.new_empty(B * N)


def _backward(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fused_qkv.check_backward_args(dq, dk, dv, x, weight, backend)
    pre_ln_block.check_layer_norm_args(x, ln_weight, ln_bias, mean, rstd)
    dx, dln_w, dln_b, dweight, dbias = kernel_op.kernels(backend, "block").ln_qkv_bwd(
        dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, has_bias, allow_tf32
    )
    return dx, dln_w, dln_b, dweight, kernel_op.none_to_empty(dbias, x)


def _backward_fake(dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, has_bias, allow_tf32, backend):
    dbias = x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape), \
        weight.new_empty(weight.shape), dbias  # fmt: skip


def _setup(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend = inputs
    *_qkv, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd)
    ctx.has_bias, ctx.allow_tf32, ctx.backend = bias is not None, allow_tf32, backend
    ctx.mark_non_differentiable(mean, rstd)


def _gradients(ctx, dq, dk, dv, _dmean, _drstd):
    x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
    dx, dln_w, dln_b, dweight, dbias = LN_QKV.backward_op(
        dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, ctx.has_bias, ctx.allow_tf32, ctx.backend
    )
    return dx, dln_w, dln_b, None, dweight, (dbias if ctx.has_bias else None), None, None, None


# LN_QKV(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend) -> (q, k, v, mean, rstd),
# differentiable in x, ln_weight, ln_bias, weight, bias.
LN_QKV = kernel_op.KernelOp(
    "ln_qkv", forward=_forward, forward_fake=_forward_fake, backward=_backward, backward_fake=_backward_fake,
    setup=_setup, gradients=_gradients, eager_forward=_launch_forward,
)  # fmt: skip
