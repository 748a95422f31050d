"""Whole-block fused ops: LayerNorm inside the QKV and fc1 GEMMs, the residual add inside the proj and fc2 GEMMs.

    ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads)   -> q, k, v   fused_qkv(LN(x))
    proj_residual(o, proj_weight, proj_bias, residual)                           -> residual + o @ W^T + b
    ln_gelu_mlp(x, ln_weight, ln_bias, eps, fc1_w, fc1_b, fc2_w, fc2_b)          -> x + gelu_mlp(LN(x))

Backends: "triton" (vit_kernels/triton/block.py) and "cuda" (vit_kernels/cuda/block.py: csrc's GEMMs, LayerNorm on the
Triton row kernels, so it needs Triton too), forward and backward as torch.library custom ops taking the backend;
"torch" (the unfused composition F.layer_norm -> the torch backend's op -> add) and "reference" (the same from
vit_kernels.reference). "auto" follows dispatch's rule: a kernel backend only where the committed measured table
(dispatch.TableKey, ops dispatch.BLOCK_OPS, keyed by the block's width C and rows B * N) names it, "torch"
everywhere else (the table has no block entry yet: the fused block ran slower than torch's on an H200; NOTES.md);
`vk.explain_backend` says which and why. Validation names the bad argument (ValueError / TypeError), as
dispatch.py does.
Under `torch.autocast` the tensor inputs are cast to the autocast dtype first (`dispatch.autocast_inputs`), as
the other ops do; LayerNorm then sees x in that dtype (eager autocast would run it in fp32).

`fuses_block(backend, x)` is the one place that says whether a pre-LN block (vit/model.py) takes these ops.
`plan_<op>` (autocast, validation, backend choice) is what each op and `vk.explain_backend` run first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vit_kernels import dispatch, library, reference, torch_backend
from vit_kernels.library import _kernels, _none_to_empty

BLOCK_BACKENDS = ("reference", "torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")


def _ops(backend: str):
    # The one lazy kernel-module loader (library._kernels: (backend, "block") -> vit_kernels.triton.block or
    # vit_kernels.cuda.block).
    return _kernels(backend, "block")


def fuses_block(backend: str, x: torch.Tensor) -> bool:
    """Whether a pre-LN block with this `backend` should run as ln_fused_qkv -> attention -> proj_residual ->
    ln_gelu_mlp: on "triton" and "cuda", and on "auto" where the measured table names a kernel backend for all
    three ops at x's (arch, dtype, C, B * N) (then each op's own "auto" picks it too); never under autocast, where
    the unfused block keeps its residual stream in fp32 and the fused epilogues would round it to the autocast
    dtype at every add."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    if backend != "auto":
        return backend in KERNEL_BACKENDS
    if x.device.type != "cuda" or x.dim() != 3 or x.dtype not in dispatch.DTYPES:
        return False
    sizes = (x.dtype, x.shape[-1], x.shape[0] * x.shape[1])
    # dispatch's own rule, so this says yes where each op's auto would pick a kernel backend. Channel sizes are left
    # to each op (x does not give the MLP width): where the backend cannot take them, that op's auto runs torch.
    return all(
        dispatch._select("auto", x.device, op, sizes, _no_objection).backend in KERNEL_BACKENDS
        for op in dispatch.BLOCK_OPS
    )


def _no_objection(backend: str) -> None:
    return None


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
def _select(backend: str, device: torch.device, op: str, sizes: tuple, channels: dict[str, int]) -> dispatch.Choice:
    """Resolve `backend` for block op `op` by dispatch's rule, but for the backends these ops have; `sizes` =
    (dtype, C, B * N), the measured table's key (TableKey). The cuda backend's LayerNorm is Triton's, so Triton's
    reason not to run here is cuda's too."""
    if backend != "auto" and backend not in BLOCK_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BLOCK_BACKENDS}, got {backend!r}")
    channel_objection = dispatch._channel_objection(channels)

    def objection(b: str) -> str | None:
        if b == "cuda":
            why = dispatch.device_unavailable_reason("triton", device)
            if why is not None:
                return f"its LayerNorm runs on the Triton row kernels, and {why}"
        return channel_objection(b)

    return dispatch._select(backend, device, op, sizes, objection)


def _check_ln(x, ln_weight, ln_bias, eps) -> None:
    C = x.shape[-1]
    dispatch._check_tensor("ln_weight", ln_weight, ndim=1)
    dispatch._check_tensor("ln_bias", ln_bias, ndim=1)
    dispatch._check_shape("ln_weight", ln_weight, (C,), "(C,) with C = x.shape[-1]")
    dispatch._check_shape("ln_bias", ln_bias, (C,), "(C,) with C = x.shape[-1]")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def check_ln_fused_qkv(x, ln_weight, ln_bias, eps, weight, bias, num_heads, backend: str) -> dispatch.Choice:
    dispatch._check_tensor("x", x, ndim=3, batch_dims=1)
    _check_ln(x, ln_weight, ln_bias, eps)
    dispatch._check_tensor("qkv_weight", weight, ndim=2)
    if bias is not None:
        dispatch._check_tensor("qkv_bias", bias, ndim=1)
    dispatch._check_same({"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "qkv_weight": weight, "qkv_bias": bias})
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
    C = x.shape[-1]
    if C % num_heads:
        raise ValueError(f"x's channel count C={C} must be divisible by num_heads={num_heads}")
    dispatch._check_shape("qkv_weight", weight, (3 * C, C), "(3C, C)")
    if bias is not None:
        dispatch._check_shape("qkv_bias", bias, (3 * C,), "(3C,)")
    sizes = (x.dtype, C, x.shape[0] * x.shape[1])
    choice = _select(backend, x.device, "ln_fused_qkv", sizes, {"C": C, "head dim C // num_heads": C // num_heads})
    return dispatch.empty_batch(choice) if x.shape[0] == 0 else choice


def check_proj_residual(o, weight, bias, residual, backend: str) -> dispatch.Choice:
    dispatch._check_tensor("o", o, ndim=3, batch_dims=1)
    dispatch._check_tensor("proj_weight", weight, ndim=2)
    dispatch._check_tensor("residual", residual, ndim=3, batch_dims=1)
    if bias is not None:
        dispatch._check_tensor("proj_bias", bias, ndim=1)
    dispatch._check_same({"o": o, "proj_weight": weight, "proj_bias": bias, "residual": residual})
    B, N, C_in = o.shape
    C = weight.shape[0]
    dispatch._check_shape("proj_weight", weight, (C, C_in), "(C, C_in) with C_in = o.shape[-1]")
    if bias is not None:
        dispatch._check_shape("proj_bias", bias, (C,), "(C,) with C = proj_weight.shape[0]")
    dispatch._check_shape("residual", residual, (B, N, C), "(B, N, C) with C = proj_weight.shape[0]")
    choice = _select(backend, o.device, "proj_residual", (o.dtype, C, B * N), {"C_in": C_in, "C": C})
    return dispatch.empty_batch(choice) if B == 0 else choice


def check_ln_gelu_mlp(
    x, ln_weight, ln_bias, eps, fc1_w, fc1_b, fc2_w, fc2_b, approximate, residual, backend
) -> dispatch.Choice:
    dispatch._check_tensor("x", x, ndim=3, batch_dims=1)
    _check_ln(x, ln_weight, ln_bias, eps)
    dispatch._check_tensor("fc1_weight", fc1_w, ndim=2)
    dispatch._check_tensor("fc2_weight", fc2_w, ndim=2)
    for name, t in (("fc1_bias", fc1_b), ("fc2_bias", fc2_b)):
        if t is not None:
            dispatch._check_tensor(name, t, ndim=1)
    dispatch._check_same({"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "fc1_weight": fc1_w,
                          "fc1_bias": fc1_b, "fc2_weight": fc2_w, "fc2_bias": fc2_b})  # fmt: skip
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool (True adds x, the LayerNorm's input), got {residual!r}")
    C, hidden, C_out = x.shape[-1], fc1_w.shape[0], fc2_w.shape[0]
    dispatch._check_shape("fc1_weight", fc1_w, (hidden, C), "(hidden, C) with C = x.shape[-1]")
    dispatch._check_shape("fc2_weight", fc2_w, (C_out, hidden), "(C_out, hidden) with hidden = fc1_weight.shape[0]")
    if fc1_b is not None:
        dispatch._check_shape("fc1_bias", fc1_b, (hidden,), "(hidden,)")
    if fc2_b is not None:
        dispatch._check_shape("fc2_bias", fc2_b, (C_out,), "(C_out,)")
    if residual and C_out != C:
        raise ValueError(f"residual=True adds x, so fc2_weight must map back to C={C} channels, got C_out={C_out}")
    sizes = (x.dtype, C, x.shape[0] * x.shape[1])
    choice = _select(backend, x.device, "ln_gelu_mlp", sizes, {"C": C, "hidden": hidden, "C_out": C_out})
    return dispatch.empty_batch(choice) if x.shape[0] == 0 else choice


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops with autograd (glue, as in library.py: the launchers in triton/block.py do the work)
# ----------------------------------------------------------------------------------------------------
# Custom ops rather than autograd Functions so that torch.compile sees one opaque node per call (it cannot trace
# a Triton launch); fake implementations give it the output shapes. Custom ops cannot return None, so absent
# bias gradients and the skipped pre-activation travel as empty tensors (library._none_to_empty).
# The raw ops (torch.ops.vit_kernels.*) are public, so each body first checks every tensor argument, as library.py's
# ops do (`_check_<op>_args`, built from library's checks); the public functions above validated already.
def _rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _check_ln_args(x, ln_weight, ln_bias, mean=None, rstd=None) -> None:
    """ln_weight, ln_bias (C,) like x (B, N, C); the saved statistics mean, rstd (B * N,) float32 when given."""
    C = x.shape[-1]
    library.check_arg("ln_weight", ln_weight, (C,), "(C,) with C = x.shape[-1]", x)
    library.check_arg("ln_bias", ln_bias, (C,), "(C,) with C = x.shape[-1]", x)
    for name, t in (("mean", mean), ("rstd", rstd)):
        library.check_arg(name, t, (_rows_of(x),), "(B * N,)", x, torch.float32)


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be positive and finite, got {eps}")


def _check_mlp_residual(x, fc2_weight, residual: bool) -> None:
    if residual and fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"residual=True adds x, so fc2_weight must map back to C={x.shape[-1]} channels, got "
            f"C_out={fc2_weight.shape[0]}"
        )


def _check_ln_qkv_fwd_args(x, ln_weight, ln_bias, eps, weight, bias, num_heads, backend: str) -> None:
    library.check_qkv_fwd_args(x, weight, bias, num_heads, backend)
    _check_ln_args(x, ln_weight, ln_bias)
    _check_eps(eps)


def _check_ln_qkv_bwd_args(dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, backend: str) -> None:
    library.check_qkv_bwd_args(dq, dk, dv, x, weight, backend)
    _check_ln_args(x, ln_weight, ln_bias, mean, rstd)


def _check_proj_args(o, weight, bias, backend: str) -> tuple[int, int, int]:
    """o (B, N, C_in), weight (C, C_in), bias (C,) or None; returns (B, N, C)."""
    library.check_first("o", o, "(B, N, C_in)", backend, "block")
    library.check_dim("weight", weight, "(C, C_in)")
    B, N, C_in = o.shape
    C = weight.shape[0]
    library.check_arg("weight", weight, (C, C_in), "(C, C_in) with C_in = o.shape[-1]", o)
    library.check_arg("bias", bias, (C,), "(C,) with C = weight.shape[0]", o)
    library.check_channels(backend, C_in=C_in, C=C)
    return B, N, C


def _check_proj_residual_fwd_args(o, weight, bias, residual, backend: str) -> None:
    library.check_arg("residual", residual, _check_proj_args(o, weight, bias, backend), "(B, N, C)", o)


def _check_proj_residual_bwd_args(dout, o, weight, backend: str) -> None:
    library.check_arg("dout", dout, _check_proj_args(o, weight, None, backend), "(B, N, C)", o)


def _check_ln_mlp_fwd_args(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                           residual, backend: str) -> None:  # fmt: skip
    library.check_first("x", x, "(B, N, C)", backend, "block")
    library.check_mlp_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend)
    _check_ln_args(x, ln_weight, ln_bias)
    _check_eps(eps)
    library.check_approximate(approximate)
    _check_mlp_residual(x, fc2_weight, residual)


def _check_ln_mlp_bwd_args(dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden, approximate,
                           residual, backend: str) -> None:  # fmt: skip
    library.check_first("x", x, "(B, N, C)", backend, "block")
    Hd, C_out = library.check_mlp_weights(x, fc1_weight, None, fc2_weight, None, backend)
    _check_ln_args(x, ln_weight, ln_bias, mean, rstd)
    library.check_arg("dout", dout, (*x.shape[:2], C_out), "(B, N, C_out)", x)
    library.check_arg("hidden", hidden, (_rows_of(x), Hd), "(B * N, Hd)", x)
    library.check_approximate(approximate)
    _check_mlp_residual(x, fc2_weight, residual)


@torch.library.custom_op("vit_kernels::ln_qkv_fwd", mutates_args=())
def ln_qkv_fwd(
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
    _check_ln_qkv_fwd_args(x, ln_weight, ln_bias, eps, weight, bias, num_heads, backend)
    return _ops(backend).ln_qkv_fwd(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32)


@ln_qkv_fwd.register_fake
def _(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend):
    B, N, C = x.shape
    shape = (B, num_heads, N, C // num_heads)
    stats = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape), stats, stats.new_empty(B * N)


@torch.library.custom_op("vit_kernels::ln_qkv_bwd", mutates_args=())
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_ln_qkv_bwd_args(dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, backend)
    dx, dln_w, dln_b, dweight, dbias = _ops(backend).ln_qkv_bwd(
        dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, has_bias, allow_tf32
    )
    return dx, dln_w, dln_b, dweight, _none_to_empty(dbias, x)


@ln_qkv_bwd.register_fake
def _(dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, has_bias, allow_tf32, backend):
    dbias = x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape), \
        weight.new_empty(weight.shape), dbias  # fmt: skip


def _ln_qkv_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32, backend = inputs
    *_qkv, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd)
    ctx.has_bias, ctx.allow_tf32, ctx.backend = bias is not None, allow_tf32, backend
    ctx.mark_non_differentiable(mean, rstd)


def _ln_qkv_backward(ctx, dq, dk, dv, _dmean, _drstd):
    x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
    dx, dln_w, dln_b, dweight, dbias = ln_qkv_bwd(
        dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, ctx.has_bias, ctx.allow_tf32, ctx.backend
    )
    return dx, dln_w, dln_b, None, dweight, (dbias if ctx.has_bias else None), None, None, None


ln_qkv_fwd.register_autograd(_ln_qkv_backward, setup_context=_ln_qkv_setup)


@torch.library.custom_op("vit_kernels::proj_residual_fwd", mutates_args=())
def proj_residual_fwd(
    o: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    allow_tf32: bool,
    backend: str,
) -> torch.Tensor:
    _check_proj_residual_fwd_args(o, weight, bias, residual, backend)
    return _ops(backend).proj_residual_fwd(o, weight, bias, residual, allow_tf32)


@proj_residual_fwd.register_fake
def _(o, weight, bias, residual, allow_tf32, backend):
    return o.new_empty(*o.shape[:-1], weight.shape[0])


@torch.library.custom_op("vit_kernels::proj_residual_bwd", mutates_args=())
def proj_residual_bwd(
    dout: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, has_bias: bool, allow_tf32: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_proj_residual_bwd_args(dout, o, weight, backend)
    do, dweight, dbias = _ops(backend).proj_residual_bwd(dout, o, weight, has_bias, allow_tf32)
    return do, dweight, _none_to_empty(dbias, o)


@proj_residual_bwd.register_fake
def _(dout, o, weight, has_bias, allow_tf32, backend):
    dbias = o.new_empty(weight.shape[0]) if has_bias else o.new_empty(0)
    return o.new_empty(o.shape), weight.new_empty(weight.shape), dbias


def _proj_residual_setup(ctx, inputs, output):
    o, weight, bias, residual, allow_tf32, backend = inputs
    ctx.save_for_backward(o, weight)
    ctx.has_bias, ctx.allow_tf32, ctx.backend = bias is not None, allow_tf32, backend


def _proj_residual_backward(ctx, dout):
    o, weight = ctx.saved_tensors
    do, dweight, dbias = proj_residual_bwd(dout, o, weight, ctx.has_bias, ctx.allow_tf32, ctx.backend)
    return do, dweight, (dbias if ctx.has_bias else None), dout, None, None  # the residual's gradient is dout


proj_residual_fwd.register_autograd(_proj_residual_backward, setup_context=_proj_residual_setup)


@torch.library.custom_op("vit_kernels::ln_mlp_fwd", mutates_args=())
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
    needs_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_ln_mlp_fwd_args(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, backend
    )
    # needs_grad False (no_grad / inference, or no input requiring grad): fc1 skips writing the pre-activation.
    out, hidden, mean, rstd = _ops(backend).ln_mlp_fwd(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
        needs_grad,
    )  # fmt: skip
    return out, _none_to_empty(hidden, x), mean, rstd


@ln_mlp_fwd.register_fake
def _(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, allow_tf32,
      needs_grad, backend):  # fmt: skip
    M = _rows_of(x)
    hidden = x.new_empty(M, fc1_weight.shape[0]) if needs_grad else x.new_empty(0)
    stats = x.new_empty(M, dtype=torch.float32)
    return x.new_empty(*x.shape[:-1], fc2_weight.shape[0]), hidden, stats, stats.new_empty(M)


@torch.library.custom_op("vit_kernels::ln_mlp_bwd", mutates_args=())
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_ln_mlp_bwd_args(
        dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden, approximate, residual, backend
    )
    dx, dln_w, dln_b, dw1, db1, dw2, db2 = _ops(backend).ln_mlp_bwd(
        dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden,
        has_fc1_bias, has_fc2_bias, approximate, residual, allow_tf32,
    )  # fmt: skip
    return dx, dln_w, dln_b, dw1, _none_to_empty(db1, x), dw2, _none_to_empty(db2, x)


@ln_mlp_bwd.register_fake
def _(dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias,
      approximate, residual, allow_tf32, backend):  # fmt: skip
    db1 = x.new_empty(fc1_weight.shape[0]) if has_fc1_bias else x.new_empty(0)
    db2 = x.new_empty(fc2_weight.shape[0]) if has_fc2_bias else x.new_empty(0)
    return (
        x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape),
        fc1_weight.new_empty(fc1_weight.shape), db1, fc2_weight.new_empty(fc2_weight.shape), db2,
    )  # fmt: skip


def _ln_mlp_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, fc1_w, fc1_b, fc2_w, fc2_b, approximate, residual, allow_tf32, needs_grad, backend = (
        inputs
    )
    _out, hidden, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, fc1_w, fc2_w, hidden, mean, rstd)
    ctx.has_b1, ctx.has_b2 = fc1_b is not None, fc2_b is not None
    ctx.approximate, ctx.residual, ctx.allow_tf32, ctx.backend = approximate, residual, allow_tf32, backend
    ctx.mark_non_differentiable(hidden, mean, rstd)


def _ln_mlp_backward(ctx, dout, _dhidden, _dmean, _drstd):
    x, ln_weight, ln_bias, fc1_w, fc2_w, hidden, mean, rstd = ctx.saved_tensors
    dx, dln_w, dln_b, dw1, db1, dw2, db2 = ln_mlp_bwd(
        dout, x, mean, rstd, ln_weight, ln_bias, fc1_w, fc2_w, hidden,
        ctx.has_b1, ctx.has_b2, ctx.approximate, ctx.residual, ctx.allow_tf32, ctx.backend,
    )  # fmt: skip
    return (
        dx, dln_w, dln_b, None, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
        None, None, None, None, None,
    )  # fmt: skip


ln_mlp_fwd.register_autograd(_ln_mlp_backward, setup_context=_ln_mlp_setup)


# ----------------------------------------------------------------------------------------------------
# what each op does before its kernel: autocast, validation, backend choice (shared with vk.explain_backend)
# ----------------------------------------------------------------------------------------------------
def plan_ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, *, backend="auto"):
    tensors = dispatch.autocast_inputs(x, ln_weight, ln_bias, qkv_weight, qkv_bias)
    x, ln_weight, ln_bias, qkv_weight, qkv_bias = tensors
    return check_ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, backend), tensors


def plan_proj_residual(o, proj_weight, proj_bias, residual, *, backend="auto"):
    tensors = dispatch.autocast_inputs(o, proj_weight, proj_bias, residual)
    return check_proj_residual(*tensors, backend), tensors


def plan_ln_gelu_mlp(
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=True,
    backend="auto",
):  # fmt: skip
    tensors = dispatch.autocast_inputs(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = tensors
    choice = check_ln_gelu_mlp(
        x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, backend
    )
    return choice, tensors


# ----------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------
def ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, *, backend="auto"):
    """fused_qkv(layer_norm(x)): x (B, N, C); ln_weight, ln_bias (C,); eps (timm 1e-6, HF 1e-12); qkv_weight
    (3C, C), qkv_bias (3C,) or None -> q, k, v each (B, H, N, C // H). LayerNorm runs in the GEMM's A-tile prologue
    (triton's pointer kernels) or as one row kernel writing LN(x) for TMA-fed GEMMs (triton on Hopper, cuda)."""
    (backend, _why), (x, ln_weight, ln_bias, qkv_weight, qkv_bias) = plan_ln_fused_qkv(
        x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads, backend=backend
    )
    if backend == "reference":
        return reference.ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads)
    if backend == "torch":
        y = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
        return torch_backend.fused_qkv(y, qkv_weight, qkv_bias, num_heads)
    q, k, v, _mean, _rstd = ln_qkv_fwd(
        x, ln_weight, ln_bias, float(eps), qkv_weight, qkv_bias, num_heads, dispatch.allow_tf32(), backend
    )
    return q, k, v


def proj_residual(o, proj_weight, proj_bias, residual, *, backend="auto"):
    """residual + o @ proj_weight^T + proj_bias: o (B, N, C_in) (e.g. attention's output as (B, N, H * D), a free
    view), proj_weight (C, C_in), residual (B, N, C) -> (B, N, C). On triton and cuda the add is in the GEMM
    epilogue."""
    (backend, _why), (o, proj_weight, proj_bias, residual) = plan_proj_residual(
        o, proj_weight, proj_bias, residual, backend=backend
    )
    if backend == "reference":
        return reference.proj_residual(o, proj_weight, proj_bias, residual)
    if backend == "torch":
        return residual + F.linear(o, proj_weight, proj_bias)
    return proj_residual_fwd(o, proj_weight, proj_bias, residual, dispatch.allow_tf32(), backend)


def ln_gelu_mlp(
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=True,
    backend="auto",
):  # fmt: skip
    """x + gelu_mlp(layer_norm(x)) (just gelu_mlp(layer_norm(x)) when residual=False): x (B, N, C) -> (B, N, C_out).

    The residual is always x, the LayerNorm's input (a pre-LN block's second half), which lets backward add the
    residual's gradient inside the LayerNorm backward pass."""
    (backend, _why), (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias) = plan_ln_gelu_mlp(
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
    tensors = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, _hidden, _mean, _rstd = ln_mlp_fwd(
        x, ln_weight, ln_bias, float(eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
        dispatch.allow_tf32(), needs_grad, backend,
    )  # fmt: skip
    return out
