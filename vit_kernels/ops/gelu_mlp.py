"""vk.gelu_mlp: Linear -> GELU -> Linear with the bias and GELU in the GEMM epilogues. The public function, its input
checks, its backend choice and its kernel op (custom ops and autograd) in one place; the kernels are
vit_kernels/triton/linear.py and vit_kernels/cuda/linear.py.

Kernel-module contract (family "linear", shared with ops/fused_qkv.py). All tensors share one dtype; inputs are
validated before they get here, never empty; `allow_tf32` only matters for fp32 inputs.

    mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, save_hidden=True)
        -> (y, hidden or None)
        x (M, C) any strides; y contiguous (M, C_out); hidden contiguous (M, C_hidden) is the
        pre-activation x @ fc1_weight^T + fc1_bias, saved for backward (GELU' needs it). None when not
        save_hidden (no gradient will be asked for), and then never written.
    mlp_bwd(dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32)
        -> (dx, dfc1_weight, dfc1_bias or None, dfc2_weight, dfc2_bias or None), all contiguous.
"""

from __future__ import annotations

import torch

from vit_kernels import dispatch, kernel_op, reference, torch_backend
from vit_kernels.kernel_op import check_approximate, check_arg, check_channels, check_dim, check_first


def gelu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    approximate: str = "none",
    backend: str = "auto",
):
    """Linear -> GELU -> Linear: x (..., C), fc1 (hidden, C), fc2 (C_out, hidden) -> (..., C_out).

    `approximate="none"` is exact erf GELU (timm and Hugging Face), `"tanh"` the tanh form.
    """
    (backend, _why), (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) = plan(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate, backend=backend
    )
    if backend == "reference":
        return reference.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    if backend == "torch":
        return torch_backend.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    rows = x.reshape(-1, x.shape[-1])
    needs_grad = kernel_op.needs_grad(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    y, _hidden = MLP(
        rows, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, dispatch.allow_tf32(), needs_grad, backend
    )
    return y.reshape(*x.shape[:-1], fc2_weight.shape[0])


def plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", backend="auto"):
    """Autocast, validation, the backend choice: (Choice, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))."""
    tensors = dispatch.autocast_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return check(*tensors, approximate, backend), tensors


def check(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, backend: str) -> dispatch.Choice:
    dispatch.check_tensor("x", x, batch_dims=-1)
    C, hidden, C_out = check_layers(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate)
    objection = dispatch.channel_objection({"C": C, "hidden": hidden, "C_out": C_out})
    choice = dispatch.select(backend, x.device, "gelu_mlp", (x.dtype, C, x.numel() // C), objection)
    return dispatch.empty_batch(choice) if x.numel() == 0 else choice


def check_layers(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, **more: torch.Tensor):
    """The public checks of the two layers' arguments (ln_gelu_mlp's too, with its other tensors in `more`, checked
    for one dtype and device with these): fc1 (hidden, C) with C = x.shape[-1], fc2 (C_out, hidden), biases or
    None, approximate "none" or "tanh". Returns (C, hidden, C_out)."""
    dispatch.check_tensor("fc1_weight", fc1_weight, ndim=2)
    dispatch.check_tensor("fc2_weight", fc2_weight, ndim=2)
    for name, t in (("fc1_bias", fc1_bias), ("fc2_bias", fc2_bias)):
        if t is not None:
            dispatch.check_tensor(name, t, ndim=1)
    dispatch.check_same({"x": x, **more, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight,
                         "fc2_bias": fc2_bias})  # fmt: skip
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    C, hidden, C_out = x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    dispatch.check_shape("fc1_weight", fc1_weight, (hidden, C), "(hidden, C) with C = x.shape[-1]")
    dispatch.check_shape("fc2_weight", fc2_weight, (C_out, hidden), "(C_out, hidden) with hidden = fc1_weight.shape[0]")
    if fc1_bias is not None:
        dispatch.check_shape("fc1_bias", fc1_bias, (hidden,), "(hidden,)")
    if fc2_bias is not None:
        dispatch.check_shape("fc2_bias", fc2_bias, (C_out,), "(C_out,)")
    return C, hidden, C_out


# ----------------------------------------------------------------------------------------------------
# the raw ops' argument checks (ops/ln_gelu_mlp.py reuses check_weights)
# ----------------------------------------------------------------------------------------------------
def check_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend: str) -> tuple[int, int]:
    """fc1_weight (Hd, C) with C = x.shape[-1], fc1_bias (Hd,) or None, fc2_weight (C_out, Hd), fc2_bias (C_out,)
    or None, like x; sizes the backend's GEMMs take. Returns (Hd, C_out)."""
    C = x.shape[-1]
    check_dim("fc1_weight", fc1_weight, "(Hd, C)")
    check_dim("fc2_weight", fc2_weight, "(C_out, Hd)")
    Hd, C_out = fc1_weight.shape[0], fc2_weight.shape[0]
    check_arg("fc1_weight", fc1_weight, (Hd, C), "(Hd, C) with C = x.shape[-1]", x)
    check_arg("fc1_bias", fc1_bias, (Hd,), "(Hd,)", x)
    check_arg("fc2_weight", fc2_weight, (C_out, Hd), "(C_out, Hd) with Hd = fc1_weight.shape[0]", x)
    check_arg("fc2_bias", fc2_bias, (C_out,), "(C_out,)", x)
    check_channels(backend, C=C, Hd=Hd, C_out=C_out)
    return Hd, C_out


def check_forward_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate: str, backend: str) -> None:
    """x (M, C) (the public op flattens x's leading dims); the weights as `check_weights` says."""
    check_first("x", x, "(M, C)", backend, "linear")
    check_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend)
    check_approximate(approximate)


def check_backward_args(dy, x, fc1_weight, fc2_weight, hidden, approximate: str, backend: str) -> None:
    """mlp_fwd's x and weights, its output's gradient dy (M, C_out) and its saved pre-activation hidden (M, Hd)."""
    check_first("x", x, "(M, C)", backend, "linear")
    Hd, C_out = check_weights(x, fc1_weight, None, fc2_weight, None, backend)
    M = x.shape[0]
    check_arg("dy", dy, (M, C_out), "(M, C_out)", x)
    check_arg("hidden", hidden, (M, Hd), "(M, Hd)", x)
    check_approximate(approximate)


# ----------------------------------------------------------------------------------------------------
# the kernel op: vit_kernels::mlp_fwd / mlp_bwd
# ----------------------------------------------------------------------------------------------------
def _forward(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str,
    allow_tf32: bool,
    needs_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_forward_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, backend)
    return _launch_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, needs_grad, backend)


def _launch_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, needs_grad, backend):
    # needs_grad False (no_grad / inference, or no input requiring grad): fc1 skips writing the pre-activation.
    y, hidden = kernel_op.kernels(backend, "linear").mlp_fwd(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, save_hidden=needs_grad
    )
    return y, kernel_op.none_to_empty(hidden, x)


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, needs_grad, backend):
    M = x.shape[0]
    hidden = x.new_empty(M, fc1_weight.shape[0]) if needs_grad else x.new_empty(0)
    return x.new_empty(M, fc2_weight.shape[0]), hidden


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    hidden: torch.Tensor,
    has_fc1_bias: bool,
    has_fc2_bias: bool,
    approximate: str,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_backward_args(dy, x, fc1_weight, fc2_weight, hidden, approximate, backend)
    dx, dw1, db1, dw2, db2 = kernel_op.kernels(backend, "linear").mlp_bwd(
        dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32
    )
    return dx, dw1, kernel_op.none_to_empty(db1, x), dw2, kernel_op.none_to_empty(db2, x)


def _backward_fake(dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32,
                   backend):  # fmt: skip
    db1 = x.new_empty(fc1_weight.shape[0]) if has_fc1_bias else x.new_empty(0)
    db2 = x.new_empty(fc2_weight.shape[0]) if has_fc2_bias else x.new_empty(0)
    dw1, dw2 = fc1_weight.new_empty(fc1_weight.shape), fc2_weight.new_empty(fc2_weight.shape)
    return x.new_empty(x.shape), dw1, db1, dw2, db2


def _setup(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, _needs_grad, backend = inputs
    _y, hidden = output
    ctx.save_for_backward(x, fc1_weight, fc2_weight, hidden)
    ctx.has_fc1_bias, ctx.has_fc2_bias = fc1_bias is not None, fc2_bias is not None
    ctx.approximate, ctx.allow_tf32, ctx.backend = approximate, allow_tf32, backend
    ctx.mark_non_differentiable(hidden)


def _gradients(ctx, dy, _dhidden):
    x, fc1_weight, fc2_weight, hidden = ctx.saved_tensors
    kernel_op.check_kept_for_backward("gelu_mlp", hidden)
    dx, dw1, db1, dw2, db2 = MLP.backward_op(
        dy, x, fc1_weight, fc2_weight, hidden,
        ctx.has_fc1_bias, ctx.has_fc2_bias, ctx.approximate, ctx.allow_tf32, ctx.backend,
    )  # fmt: skip
    return (
        dx, dw1, db1 if ctx.has_fc1_bias else None, dw2, db2 if ctx.has_fc2_bias else None, None, None, None, None,
    )  # fmt: skip


# MLP(x (M, C), fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, needs_grad, backend)
# -> (y, hidden or empty), differentiable in x and every weight and bias.
MLP = kernel_op.KernelOp(
    "mlp", forward=_forward, forward_fake=_forward_fake, backward=_backward, backward_fake=_backward_fake,
    setup=_setup, gradients=_gradients, eager_forward=_launch_forward,
)  # fmt: skip
