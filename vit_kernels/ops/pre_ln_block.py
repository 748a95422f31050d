"""What the three whole-block ops of a pre-LN ViT block share (ops/ln_fused_qkv.py, ops/proj_residual.py,
ops/ln_gelu_mlp.py): their backends, the backend choice, the LayerNorm argument checks, and `fuses_block`, the one
place that says whether a pre-LN block (vit/model.py, vit/convert.py) takes these ops.

    ln_fused_qkv(x, ln_weight, ln_bias, eps, qkv_weight, qkv_bias, num_heads)   -> q, k, v   fused_qkv(LN(x))
    proj_residual(o, proj_weight, proj_bias, residual)                           -> residual + o @ W^T + b
    ln_gelu_mlp(x, ln_weight, ln_bias, eps, fc1_w, fc1_b, fc2_w, fc2_b)          -> x + gelu_mlp(LN(x))

Backends: "triton" (vit_kernels/triton/block.py) and "cuda" (vit_kernels/cuda/block.py: csrc's GEMMs, LayerNorm on
the Triton row kernels, so it needs Triton too), forward and backward as custom ops taking the backend; "torch" (the
unfused composition F.layer_norm -> the torch backend's op -> add) and "reference" (the same from
vit_kernels.reference). "auto" follows dispatch's rule: a kernel backend only where the committed measured table
(ops dispatch.BLOCK_OPS, keyed by the block's width C and rows B * N) names it, "torch" everywhere else;
`vk.explain_backend` says which and why. Under `torch.autocast` the tensor inputs are cast to the autocast dtype
first (`dispatch.autocast_inputs`), as the other ops do; LayerNorm then sees x in that dtype (eager autocast would
run it in fp32).

Kernel-module contract (family "block"): x (B, N, C), o and residual (B, N, C_in / C) any strides; outputs
contiguous; mean, rstd (B * N,) float32, saved for backward; `allow_tf32` only matters for fp32 inputs.

    ln_qkv_fwd(x, ln_weight, ln_bias, eps, weight, bias, num_heads, allow_tf32) -> (q, k, v, mean, rstd)
    ln_qkv_bwd(dq, dk, dv, x, mean, rstd, ln_weight, ln_bias, weight, has_bias, allow_tf32)
        -> (dx, dln_weight, dln_bias, dweight, dbias or None)
    proj_residual_fwd(o, weight, bias, residual, allow_tf32) -> out
    proj_residual_bwd(dout, o, weight, has_bias, allow_tf32) -> (do, dweight, dbias or None)  (dresidual is dout)
    ln_mlp_fwd(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
               allow_tf32, save_hidden) -> (out, hidden or None, mean, rstd)
    ln_mlp_bwd(dout, x, mean, rstd, ln_weight, ln_bias, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias,
               approximate, residual, allow_tf32) -> (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias or None,
               dfc2_weight, dfc2_bias or None)   (dx includes the residual's dout when `residual`)
"""

from __future__ import annotations

import math

import torch

from vit_kernels import dispatch
from vit_kernels.kernel_op import check_arg

BLOCK_BACKENDS = ("reference", "torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")


def fuses_block(backend: str, x: torch.Tensor) -> bool:
    """Whether a pre-LN block with this `backend` should run as ln_fused_qkv -> attention -> proj_residual ->
    ln_gelu_mlp: on "triton" and "cuda", and on "auto" where the measured table names a kernel backend for all
    three ops at x's (arch, dtype, C, B * N) (then each op's own "auto" picks it too); never under autocast, where
    the unfused block keeps its residual stream in fp32 and the fused epilogues would round it to the autocast
    dtype at every add."""
    # torch.is_autocast_enabled raises for a device type autocast does not know (meta: a model traced for shapes).
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return False
    if backend != "auto":
        return backend in KERNEL_BACKENDS
    if x.device.type != "cuda" or x.dim() != 3 or x.dtype not in dispatch.DTYPES:
        return False
    sizes = (x.dtype, x.shape[-1], x.shape[0] * x.shape[1])
    # dispatch's own rule, so this says yes where each op's auto would pick a kernel backend. Channel sizes are left
    # to each op (x does not give the MLP width): where the backend cannot take them, that op's auto runs torch.
    return all(
        dispatch.select("auto", x.device, op, sizes, _no_objection).backend in KERNEL_BACKENDS
        for op in dispatch.BLOCK_OPS
    )


def _no_objection(backend: str) -> None:
    return None


def select(backend: str, device: torch.device, op: str, sizes: tuple, channels: dict[str, int]) -> dispatch.Choice:
    """Resolve `backend` for block op `op` by dispatch's rule, but for the backends these ops have; `sizes` =
    (dtype, C, B * N), the measured table's key (TableKey). The cuda backend's LayerNorm is Triton's, so Triton's
    reason not to run here is cuda's too."""
    if backend != "auto" and backend not in BLOCK_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BLOCK_BACKENDS}, got {backend!r}")
    channel_objection = dispatch.channel_objection(channels)

    def objection(b: str) -> str | None:
        if b == "cuda":
            why = dispatch.device_unavailable_reason("triton", device)
            if why is not None:
                return f"its LayerNorm runs on the Triton row kernels, and {why}"
        return channel_objection(b)

    return dispatch.select(backend, device, op, sizes, objection)


def check_layer_norm(x, ln_weight, ln_bias, eps) -> None:
    """The public ops' LayerNorm arguments: ln_weight, ln_bias (C,) with C = x.shape[-1]; eps positive, finite."""
    C = x.shape[-1]
    dispatch.check_tensor("ln_weight", ln_weight, ndim=1)
    dispatch.check_tensor("ln_bias", ln_bias, ndim=1)
    dispatch.check_shape("ln_weight", ln_weight, (C,), "(C,) with C = x.shape[-1]")
    dispatch.check_shape("ln_bias", ln_bias, (C,), "(C,) with C = x.shape[-1]")
    # A comparison, not math.isfinite, which breaks the graph on a symbolic eps (torch.compile(dynamic=True)).
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


# ----------------------------------------------------------------------------------------------------
# the raw ops' argument checks shared by the three
# ----------------------------------------------------------------------------------------------------
def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def check_layer_norm_args(x, ln_weight, ln_bias, mean=None, rstd=None) -> None:
    """ln_weight, ln_bias (C,) like x (B, N, C); the saved statistics mean, rstd (B * N,) float32 when given."""
    C = x.shape[-1]
    check_arg("ln_weight", ln_weight, (C,), "(C,) with C = x.shape[-1]", x)
    check_arg("ln_bias", ln_bias, (C,), "(C,) with C = x.shape[-1]", x)
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_arg(name, t, (rows_of(x),), "(B * N,)", x, torch.float32)


def check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be positive and finite, got {eps}")
