"""vk.ln_gelu_mlp: x + gelu_mlp(layer_norm(x)) (the second half of a pre-LN block). The public function, its input
checks, its backend choice and its kernel op (custom ops and autograd) in one place; what the three block ops share
is ops/pre_ln_block.py; the kernels are vit_kernels/triton/block.py and vit_kernels/cuda/block.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_kernels import dispatch, kernel_op, reference, torch_backend
from vit_kernels.kernel_op import check_approximate, check_arg, check_first
from vit_kernels.ops import gelu_mlp, pre_ln_block


def ln_gelu_mlp(
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=True,
    backend="auto",
):  # fmt: skip
    """x + gelu_mlp(layer_norm(x)) (just gelu_mlp(layer_norm(x)) when residual=False): x (B, N, C) -> (B, N, C_out).

    The residual is always x, the LayerNorm's input (a pre-LN block's second half), which lets backward add the
    residual's gradient inside the LayerNorm backward pass."""
    (backend, _why), (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias) = plan(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate,
        residual=residual, backend=backend,
    )  # fmt: skip
    if backend == "reference":
        return reference.ln_gelu_mlp(
            x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual
        )
    if backend == "torch":
        y = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
        out = torch_backend.gelu_mlp(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
        return x + out if residual else out
    needs_grad = kernel_op.needs_grad(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    out, _hidden, _mean, _rstd = LN_MLP(
        x, ln_weight, ln_bias, float(eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
        dispatch.allow_tf32(), needs_grad, backend,
    )  # fmt: skip
    return out


def plan(
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=True,
    backend="auto",
):  # fmt: skip
    """Autocast, validation, the backend choice: (Choice, the seven tensors)."""
    tensors = dispatch.autocast_inputs(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = tensors
    choice = check(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, backend
    )
    return choice, tensors


def check(x, ln_weight, ln_bias, eps, fc1_w, fc1_b, fc2_w, fc2_b, approximate, residual, backend) -> dispatch.Choice:
    dispatch.check_tensor("x", x, ndim=3, batch_dims=1)
    pre_ln_block.check_layer_norm(x, ln_weight, ln_bias, eps)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool (True adds x, the LayerNorm's input), got {residual!r}")
    C, hidden, C_out = gelu_mlp.check_layers(x, fc1_w, fc1_b, fc2_w, fc2_b, approximate, ln_weight=ln_weight,
                                             ln_bias=ln_bias)  # fmt: skip
    if residual and C_out != C:
        raise ValueError(f"residual=True adds x, so fc2_weight must map back to C={C} channels, got C_out={C_out}")
    sizes = (x.dtype, C, x.shape[0] * x.shape[1])
    channels = {"C": C, "hidden": hidden, "C_out": C_out}
    choice = pre_ln_block.select(backend, x.device, "ln_gelu_mlp", sizes, channels)
    return dispatch.empty_batch(choice) if x.shape[0] == 0 else choice


# ----------------------------------------------------------------------------------------------------
# the raw ops' argument checks
# ----------------------------------------------------------------------------------------------------
def _check_residual(x, fc2_weight, residual: bool) -> None:
    if residual and fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"residual=True adds x, so fc2_weight must map back to C={x.shape[-1]} channels, got "
            f"C_out={fc2_weight.shape[0]}"
        )


# ----------------------------------------------------------------------------------------------------
# the kernel op: vit_kernels::ln_mlp_fwd / ln_mlp_bwd
# ----------------------------------------------------------------------------------------------------
def _forward(
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
    needs_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_first("x", x, "(B, N, C)", backend, "block")
    gelu_mlp.check_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend)
    pre_ln_block.check_layer_norm_args(x, ln_weight, ln_bias)
    pre_ln_block.check_eps(eps)
    check_approximate(approximate)
    _check_residual(x, fc2_weight, residual)
    return _launch_forward(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
        needs_grad, backend,
    )  # fmt: skip


def _launch_forward(
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
    needs_grad, backend,
):  # fmt: skip
    # needs_grad False (no_grad / inference, or no input requiring grad): fc1 skips writing the pre-activation.
    out, hidden, mean, rstd = kernel_op.kernels(backend, "block").ln_mlp_fwd(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
        needs_grad,
    )  # fmt: skip
    return out, kernel_op.none_to_empty(hidden, x), mean, rstd


def _forward_fake(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                  allow_tf32, needs_grad, backend):  # fmt: skip
    M = pre_ln_block.rows_of(x)
    hidden = x.new_empty(M, fc1_weight.shape[0]) if needs_grad else x.new_empty(0)
    stats = x.new_empty(M, dtype=torch.float32)
    return x.new_empty(*x.shape[:-1], fc2_weight.shape[0]), hidden, stats, stats.new_empty(M)


def _backward(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_first("x", x, "(B, N, C)", backend, "block")
    Hd, C_out = gelu_mlp.check_weights(x, fc1_weight, None, fc2_weight, None, backend)
    pre_ln_block.check_layer_norm_args(x, ln_weight, ln_bias, mean, rstd)
    check_arg("dout", dout, (*x.shape[:2], C_out), "(B, N, C_out)", x)
    check_arg("hidden", hidden, (pre_ln_block.rows_of(x), Hd), "(B * N, Hd)", x)
    check_approximate(approximate)
    _check_residual(x, fc2_weight, residual)
    dx, dln_w, dln_b, dw1, db1, dw2, db2 = kernel_op.kernels(backend, "block").ln_mlp_bwd(
        dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden,
        has_fc1_bias, has_fc2_bias, approximate, residual, allow_tf32,
    )  # fmt: skip
    return dx, dln_w, dln_b, dw1, kernel_op.none_to_empty(db1, x), dw2, kernel_op.none_to_empty(db2, x)


def _backward_fake(dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden, has_fc1_bias,
                   has_fc2_bias, approximate, residual, allow_tf32, backend):  # fmt: skip
    db1 = x.new_empty(fc1_weight.shape[0]) if has_fc1_bias else x.new_empty(0)
    db2 = x.new_empty(fc2_weight.shape[0]) if has_fc2_bias else x.new_empty(0)
    return (
        x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape),
        fc1_weight.new_empty(fc1_weight.shape), db1, fc2_weight.new_empty(fc2_weight.shape), db2,
    )  # fmt: skip


def _setup(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, fc1_w, fc1_b, fc2_w, fc2_b, approximate, residual, allow_tf32, needs_grad, backend = (
        inputs
    )
    _out, hidden, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, fc1_w, fc2_w, hidden, mean, rstd)
    ctx.has_b1, ctx.has_b2 = fc1_b is not None, fc2_b is not None
    ctx.approximate, ctx.residual, ctx.allow_tf32, ctx.backend = approximate, residual, allow_tf32, backend
    ctx.mark_non_differentiable(hidden, mean, rstd)


def _gradients(ctx, dout, _dhidden, _dmean, _drstd):
    x, ln_weight, ln_bias, fc1_w, fc2_w, hidden, mean, rstd = ctx.saved_tensors
    kernel_op.check_kept_for_backward("ln_gelu_mlp", hidden)
    dx, dln_w, dln_b, dw1, db1, dw2, db2 = LN_MLP.backward_op(
        dout, x, mean, rstd, ln_weight, ln_bias, fc1_w, fc2_w, hidden,
        ctx.has_b1, ctx.has_b2, ctx.approximate, ctx.residual, ctx.allow_tf32, ctx.backend,
    )  # fmt: skip
    return (
        dx, dln_w, dln_b, None, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
        None, None, None, None, None,
    )  # fmt: skip


# LN_MLP(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
# needs_grad, backend) -> (out, hidden or empty, mean, rstd), differentiable in the seven tensors.
LN_MLP = kernel_op.KernelOp(
    "ln_mlp", forward=_forward, forward_fake=_forward_fake, backward=_backward, backward_fake=_backward_fake,
    setup=_setup, gradients=_gradients, eager_forward=_launch_forward,
)  # fmt: skip
