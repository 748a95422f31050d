"""vk.proj_residual: residual + o @ W^T + b, the add in the GEMM's epilogue. The public function, its input checks,
its backend choice and its kernel op (custom ops and autograd) in one place; what the three block ops share is
ops/pre_ln_block.py; the kernels are vit_kernels/triton/block.py and vit_kernels/cuda/block.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_kernels import dispatch, kernel_op, reference
from vit_kernels.kernel_op import check_arg, check_channels, check_dim, check_first
from vit_kernels.ops import pre_ln_block


def proj_residual(o, proj_weight, proj_bias, residual, *, backend="auto"):
    """residual + o @ proj_weight^T + proj_bias: o (B, N, C_in) (e.g. attention's output as (B, N, H * D), a free
    view), proj_weight (C, C_in), residual (B, N, C) -> (B, N, C). On triton and cuda the add is in the GEMM
    epilogue."""
    (backend, _why), (o, proj_weight, proj_bias, residual) = plan(o, proj_weight, proj_bias, residual, backend=backend)
    if backend == "reference":
        return reference.proj_residual(o, proj_weight, proj_bias, residual)
    if backend == "torch":
        return residual + F.linear(o, proj_weight, proj_bias)
    return PROJ_RESIDUAL(o, proj_weight, proj_bias, residual, dispatch.allow_tf32(), backend)


def plan(o, proj_weight, proj_bias, residual, *, backend="auto"):
    """Autocast, validation, the backend choice: (Choice, (o, proj_weight, proj_bias, residual))."""
    tensors = dispatch.autocast_inputs(o, proj_weight, proj_bias, residual)
    return check(*tensors, backend), tensors


def check(o, weight, bias, residual, backend: str) -> dispatch.Choice:
    dispatch.check_tensor("o", o, ndim=3, batch_dims=1)
    dispatch.check_tensor("proj_weight", weight, ndim=2)
    dispatch.check_tensor("residual", residual, ndim=3, batch_dims=1)
    if bias is not None:
        dispatch.check_tensor("proj_bias", bias, ndim=1)
    dispatch.check_same({"o": o, "proj_weight": weight, "proj_bias": bias, "residual": residual})
    B, N, C_in = o.shape
    C = weight.shape[0]
    dispatch.check_shape("proj_weight", weight, (C, C_in), "(C, C_in) with C_in = o.shape[-1]")
    if bias is not None:
        dispatch.check_shape("proj_bias", bias, (C,), "(C,) with C = proj_weight.shape[0]")
    dispatch.check_shape("residual", residual, (B, N, C), "(B, N, C) with C = proj_weight.shape[0]")
    choice = pre_ln_block.select(backend, o.device, "proj_residual", (o.dtype, C, B * N), {"C_in": C_in, "C": C})
    return dispatch.empty_batch(choice) if B == 0 else choice


# ----------------------------------------------------------------------------------------------------
# the raw ops' argument checks
# ----------------------------------------------------------------------------------------------------
def _check_projection_args(o, weight, bias, backend: str) -> tuple[int, int, int]:
    """o (B, N, C_in), weight (C, C_in), bias (C,) or None; returns (B, N, C)."""
    check_first("o", o, "(B, N, C_in)", backend, "block")
    check_dim("weight", weight, "(C, C_in)")
    B, N, C_in = o.shape
    C = weight.shape[0]
    check_arg("weight", weight, (C, C_in), "(C, C_in) with C_in = o.shape[-1]", o)
    check_arg("bias", bias, (C,), "(C,) with C = weight.shape[0]", o)
    check_channels(backend, C_in=C_in, C=C)
    return B, N, C


# ----------------------------------------------------------------------------------------------------
# the kernel op: vit_kernels::proj_residual_fwd / proj_residual_bwd
# ----------------------------------------------------------------------------------------------------
def _forward(
    o: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    allow_tf32: bool,
    backend: str,
) -> torch.Tensor:
    check_arg("residual", residual, _check_projection_args(o, weight, bias, backend), "(B, N, C)", o)
    return _launch_forward(o, weight, bias, residual, allow_tf32, backend)


def _launch_forward(o, weight, bias, residual, allow_tf32, backend):
    return kernel_op.kernels(backend, "block").proj_residual_fwd(o, weight, bias, residual, allow_tf32)


def _forward_fake(o, weight, bias, residual, allow_tf32, backend):
    return o.new_empty(*o.shape[:-1], weight.shape[0])


def _backward(
    dout: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, has_bias: bool, allow_tf32: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_arg("dout", dout, _check_projection_args(o, weight, None, backend), "(B, N, C)", o)
    do, dweight, dbias = kernel_op.kernels(backend, "block").proj_residual_bwd(dout, o, weight, has_bias, allow_tf32)
    return do, dweight, kernel_op.none_to_empty(dbias, o)


def _backward_fake(dout, o, weight, has_bias, allow_tf32, backend):
    dbias = o.new_empty(weight.shape[0]) if has_bias else o.new_empty(0)
    return o.new_empty(o.shape), weight.new_empty(weight.shape), dbias


def _setup(ctx, inputs, output):
    o, weight, bias, residual, allow_tf32, backend = inputs
    ctx.save_for_backward(o, weight)
    ctx.has_bias, ctx.allow_tf32, ctx.backend = bias is not None, allow_tf32, backend


def _gradients(ctx, dout):
    o, weight = ctx.saved_tensors
    do, dweight, dbias = PROJ_RESIDUAL.backward_op(dout, o, weight, ctx.has_bias, ctx.allow_tf32, ctx.backend)
    return do, dweight, (dbias if ctx.has_bias else None), dout, None, None  # the residual's gradient is dout


# PROJ_RESIDUAL(o, weight, bias, residual, allow_tf32, backend) -> out, differentiable in all four tensors.
PROJ_RESIDUAL = kernel_op.KernelOp(
    "proj_residual", forward=_forward, forward_fake=_forward_fake, backward=_backward, backward_fake=_backward_fake,
    setup=_setup, gradients=_gradients, eager_forward=_launch_forward,
)  # fmt: skip
