"""vk.fused_qkv: x @ W^T + b split into per-head q, k, v. The public function, its input checks, its backend choice
and its kernel op (custom ops and autograd) in one place; the kernels are vit_kernels/triton/linear.py and
vit_kernels/cuda/linear.py.

Kernel-module contract (family "linear", shared with ops/gelu_mlp.py). All tensors share one dtype; inputs are
validated before they get here, never empty; `allow_tf32` only matters for fp32 inputs.

    qkv_fwd(x, weight, bias, num_heads, allow_tf32) -> (q, k, v)
        x (B, N, C) any strides; weight (3C, C); bias (3C,) or None; q, k, v contiguous (B, H, N, C // H).
        A module with PACKED_QKV also takes packed=True (the eager path): q, k, v are then the slices of one
        (B, N, 3, H, D) buffer.
    qkv_bwd(dq, dk, dv, x, weight, has_bias, allow_tf32) -> (dx, dweight, dbias or None)
        dq, dk, dv (B, H, N, D) any strides; dx contiguous (B, N, C); dweight (3C, C); dbias (3C,).
"""

from __future__ import annotations

import torch

from vit_kernels import dispatch, kernel_op, reference, torch_backend
from vit_kernels.kernel_op import check_arg, check_channels, check_dim, check_first, check_num_heads


def fused_qkv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, *, backend: str = "auto"
):
    """x (B, N, C) @ weight (3C, C)^T + bias (3C,) -> q, k, v each (B, H, N, C // H), split in the GEMM epilogue."""
    (backend, _why), (x, weight, bias) = plan(x, weight, bias, num_heads, backend=backend)
    if backend == "reference":
        return reference.fused_qkv(x, weight, bias, num_heads)
    if backend == "torch":
        return torch_backend.fused_qkv(x, weight, bias, num_heads)
    return QKV(x, weight, bias, num_heads, dispatch.allow_tf32(), backend)


def plan(x, weight, bias, num_heads, *, backend="auto"):
    """Autocast, validation, the backend choice: (Choice, (x, weight, bias))."""
    x, weight, bias = dispatch.autocast_inputs(x, weight, bias)
    return check(x, weight, bias, num_heads, backend), (x, weight, bias)


def check(x, weight, bias, num_heads, backend: str) -> dispatch.Choice:
    dispatch.check_tensor("x", x, ndim=3, batch_dims=1)
    C = check_projection(x, weight, bias, num_heads)
    # The head-split epilogue stores 16-byte vectors per head, so the head dim is aligned like a channel count.
    objection = dispatch.channel_objection({"C": C, "head dim C // num_heads": C // num_heads})
    choice = dispatch.select(backend, x.device, "fused_qkv", (x.dtype, C, x.shape[0] * x.shape[1]), objection)
    return dispatch.empty_batch(choice) if x.shape[0] == 0 else choice


def check_projection(x, weight, bias, num_heads, names=("weight", "bias"), **more: torch.Tensor) -> int:
    """The public checks of the projection's arguments (ln_fused_qkv's too, with its own `names` for weight and bias
    and its other tensors in `more`, checked for one dtype and device with these): weight (3C, C), bias (3C,) or
    None, num_heads a positive int dividing C = x.shape[-1]. Returns C."""
    weight_name, bias_name = names
    dispatch.check_tensor(weight_name, weight, ndim=2)
    if bias is not None:
        dispatch.check_tensor(bias_name, bias, ndim=1)
    dispatch.check_same({"x": x, **more, weight_name: weight, bias_name: bias})
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
    C = x.shape[-1]
    if C % num_heads:
        raise ValueError(f"x's channel count C={C} must be divisible by num_heads={num_heads}")
    dispatch.check_shape(weight_name, weight, (3 * C, C), "(3C, C)")
    if bias is not None:
        dispatch.check_shape(bias_name, bias, (3 * C,), "(3C,)")
    return C


# ----------------------------------------------------------------------------------------------------
# the raw ops' argument checks (ops/ln_fused_qkv.py reuses them)
# ----------------------------------------------------------------------------------------------------
def check_forward_args(x, weight, bias, num_heads: int, backend: str) -> None:
    """x (B, N, C); weight (3C, C); bias (3C,) or None; num_heads dividing C into a supported head dim."""
    check_first("x", x, "(B, N, C)", backend, "linear")
    C = x.shape[2]
    check_arg("weight", weight, (3 * C, C), "(3C, C)", x)
    check_arg("bias", bias, (3 * C,), "(3C,)", x)
    check_num_heads(num_heads, C, backend)


def check_backward_args(dq, dk, dv, x, weight, backend: str) -> None:
    """x (B, N, C); weight (3C, C); dq, dk, dv (B, H, N, D) with H * D = C (q, k, v as qkv_fwd returned them)."""
    check_first("x", x, "(B, N, C)", backend, "linear")
    B, N, C = x.shape
    check_arg("weight", weight, (3 * C, C), "(3C, C)", x)
    check_dim("dq", dq, "(B, H, N, D)")
    H = dq.shape[1]
    if H < 1 or C % H:
        raise ValueError(f"dq must have shape (B, H, N, D) with H * D = x's C = {C}, got {tuple(dq.shape)}")
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        check_arg(name, t, (B, H, N, C // H), "(B, H, N, D) with (B, N, H * D) = x.shape", x)
    check_channels(backend, C=C, **{"head dim D": C // H})


# ----------------------------------------------------------------------------------------------------
# the kernel op: vit_kernels::qkv_fwd / qkv_bwd
# ----------------------------------------------------------------------------------------------------
def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_forward_args(x, weight, bias, num_heads, backend)
    return kernel_op.kernels(backend, "linear").qkv_fwd(x, weight, bias, num_heads, allow_tf32)


def _forward_fake(x, weight, bias, num_heads, allow_tf32, backend):
    B, N, C = x.shape
    shape = (B, num_heads, N, C // num_heads)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _eager_forward(x, weight, bias, num_heads, allow_tf32, backend):
    # Where the kernel module can (PACKED_QKV), q, k, v are the slices of one (B, N, 3, H, D) buffer, as the
    # reference's unbind returns them: one plain GEMM writes it (no head-split scatter), attention reads the
    # slices in place. Not in the custom-op graph, whose outputs may not alias each other.
    kernels = kernel_op.kernels(backend, "linear")
    if getattr(kernels, "PACKED_QKV", False):
        return kernels.qkv_fwd(x, weight, bias, num_heads, allow_tf32, packed=True)
    return kernels.qkv_fwd(x, weight, bias, num_heads, allow_tf32)


def _backward(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_backward_args(dq, dk, dv, x, weight, backend)
    dx, dweight, dbias = kernel_op.kernels(backend, "linear").qkv_bwd(dq, dk, dv, x, weight, has_bias, allow_tf32)
    return dx, dweight, kernel_op.none_to_empty(dbias, x)


def _backward_fake(dq, dk, dv, x, weight, has_bias, allow_tf32, backend):
    dbias = x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias


def _setup(ctx, inputs, output):
    x, weight, bias, num_heads, allow_tf32, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.allow_tf32, ctx.backend = bias is not None, allow_tf32, backend


def _gradients(ctx, dq, dk, dv):
    x, weight = ctx.saved_tensors
    dx, dweight, dbias = QKV.backward_op(dq, dk, dv, x, weight, ctx.has_bias, ctx.allow_tf32, ctx.backend)
    return dx, dweight, (dbias if ctx.has_bias else None), None, None, None


# QKV(x, weight, bias, num_heads, allow_tf32, backend) -> (q, k, v), differentiable in x, weight, bias.
QKV = kernel_op.KernelOp(
    "qkv", forward=_forward, forward_fake=_forward_fake, backward=_backward, backward_fake=_backward_fake,
    setup=_setup, gradients=_gradients, eager_forward=_eager_forward,
)  # fmt: skip
