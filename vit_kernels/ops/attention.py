"""vk.attention: softmax(q @ k^T * scale) @ v. The public function, its input checks, its backend choice and its
kernel op (custom ops and autograd) in one place; the kernels are vit_kernels/triton/attention.py and
vit_kernels/cuda/attention.py.

Kernel-module contract (family "attention"). All tensors share one dtype unless stated; inputs are validated before
they get here, never empty; `allow_tf32` only matters for fp32 inputs.

    attention_fwd(q, k, v, scale, allow_tf32) -> (out, lse)
        q, k, v (B, H, N, D) any strides; out (B, H, N, D) whose memory is laid out (B, N, H, D),
        i.e. `torch.empty(B, N, H, D).transpose(1, 2)`; lse (B, H, N) float32, natural-log
        log-sum-exp of the scaled logits of each row (what backward needs to recompute P).
    attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32) -> (dq, dk, dv)
        dout any strides; dq, dk, dv contiguous (B, H, N, D). A module with PACKED_GRADS also takes packed=True
        (`attention_bwd_packed`): dq, dk, dv are then the slices of one (B, N, 3, H, D) buffer.
"""

from __future__ import annotations

import math
import numbers

import torch

from vit_kernels import dispatch, kernel_op, reference, torch_backend
from vit_kernels.kernel_op import check_arg, check_first
from vit_kernels.triton import packed_qkv


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"):
    """softmax(q @ k^T * scale) @ v, flash style (no N x N matrix) on the kernel backends.

    q, k, v: (B, H, N, D), any strides (views of a packed (B, N, 3, H, D) tensor work without copies).
    scale: defaults to D ** -0.5. Returns (B, H, N, D); on the kernel backends its memory is laid out
    (B, N, H, D), so `out.transpose(1, 2).reshape(B, N, H * D)` is free.
    fp32 inputs use tf32 on the kernel backends unless `torch.get_float32_matmul_precision() == "highest"`.
    """
    (backend, _why), (q, k, v), scale = plan(q, k, v, scale=scale, backend=backend)
    if backend == "reference":
        return reference.attention(q, k, v, scale)
    if backend == "torch":
        return torch_backend.attention(q, k, v, scale)
    out, _lse = ATTENTION(q, k, v, scale, dispatch.allow_tf32(), backend)
    return out


def plan(q, k, v, *, scale=None, backend="auto"):
    """What vk.attention does before its kernels (and vk.explain_backend runs): autocast, validation, the backend
    choice. Returns (Choice, (q, k, v), scale)."""
    q, k, v = dispatch.autocast_inputs(q, k, v)
    choice, scale = check(q, k, v, scale, backend)
    return choice, (q, k, v), scale


def check(q, k, v, scale, backend: str) -> tuple[dispatch.Choice, float]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        dispatch.check_tensor(name, t, ndim=4, batch_dims=1)
    dispatch.check_same({"q": q, "k": k, "v": v})
    dispatch.check_shape("k", k, q.shape, "q.shape (B, H, N, D)")
    dispatch.check_shape("v", v, q.shape, "q.shape (B, H, N, D)")
    head_dim = q.shape[-1]
    if scale is None:
        scale = head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    try:
        scale = float(scale)  # numpy scalars and Python ints too, as SDPA takes them
    except OverflowError:
        scale = math.inf
    if not -math.inf < scale < math.inf:  # not math.isfinite: a symbolic scale (dynamic=True) would break the graph
        raise ValueError(f"scale must be finite, got {scale!r}")

    def objection(b: str) -> str | None:
        dims = dispatch.SUPPORT[b].head_dims
        if dims is None or head_dim in dims:
            return None
        return f"head dim D={head_dim} is not supported (supported: {dims})"

    sizes = (q.dtype, head_dim, q.shape[2], q.shape[0] * q.shape[1])
    choice = dispatch.select(backend, q.device, "attention", sizes, objection)
    return (dispatch.empty_batch(choice) if q.shape[0] == 0 else choice), float(scale)


# ----------------------------------------------------------------------------------------------------
# the raw ops' argument checks
# ----------------------------------------------------------------------------------------------------
def check_forward_args(q, k, v, scale: float, backend: str) -> None:
    """q, k, v (B, H, N, D) of one dtype and device, D a head dim the backend has kernels for; scale finite."""
    check_first("q", q, "(B, H, N, D)", backend, "attention")
    check_arg("k", k, q.shape, "q.shape (B, H, N, D)", q)
    check_arg("v", v, q.shape, "q.shape (B, H, N, D)", q)
    head_dims = dispatch.SUPPORT[backend].head_dims
    if q.shape[3] not in head_dims:
        raise ValueError(f"head dim D={q.shape[3]} is not supported by backend={backend!r} (supported: {head_dims})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_backward_args(dout, q, k, v, out, lse, scale: float, backend: str) -> None:
    """attention_fwd's arguments, its outputs out (B, H, N, D) and lse (B, H, N) float32, and dout like out."""
    check_forward_args(q, k, v, scale, backend)
    check_arg("out", out, q.shape, "q.shape (B, H, N, D)", q)
    check_arg("dout", dout, q.shape, "q.shape (B, H, N, D)", q)
    check_arg("lse", lse, q.shape[:3], "(B, H, N)", q, torch.float32)


# ----------------------------------------------------------------------------------------------------
# the kernel op: vit_kernels::attention_fwd / attention_bwd (+ attention_bwd_packed for the eager path)
# ----------------------------------------------------------------------------------------------------
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allow_tf32: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    check_forward_args(q, k, v, scale, backend)
    return _launch_forward(q, k, v, scale, allow_tf32, backend)


def _launch_forward(q, k, v, scale, allow_tf32, backend):
    out, lse = kernel_op.kernels(backend, "attention").attention_fwd(q, k, v, scale, allow_tf32)
    return _own_tensor(out), lse


def _own_tensor(t: torch.Tensor) -> torch.Tensor:
    """t over the same memory as a tensor of its own, not a view: autograd refuses in-place edits of a view made
    inside a custom Function (`attention(...).transpose(1, 2).reshape(B, N, C) += x` raised at once), where SDPA's
    output takes them (and its backward, like this one's, then refuses the edited output it saved)."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _forward_fake(q, k, v, scale, allow_tf32, backend):
    B, H, N, D = q.shape
    out = q.new_empty(B, N, H, D).transpose(1, 2)
    lse = q.new_empty(B, H, N, dtype=torch.float32)
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_backward_args(dout, q, k, v, out, lse, scale, backend)
    return kernel_op.kernels(backend, "attention").attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32)


def _backward_fake(dout, q, k, v, out, lse, scale, allow_tf32, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("vit_kernels::attention_bwd_packed", mutates_args=())
def attention_bwd_packed(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    allow_tf32: bool,
    backend: str,
) -> torch.Tensor:
    """attention_bwd's dq, dk, dv as one packed (B, N, 3, H, D) tensor, for backends whose kernel module can write
    them so (`PACKED_GRADS`): the q / k / v slices of it are what the QKV projection's backward reads as one dQKV
    matrix, with no gather copy. One output, since a custom op's outputs may not alias each other."""
    check_backward_args(dout, q, k, v, out, lse, scale, backend)
    grads = kernel_op.kernels(backend, "attention").attention_bwd(
        dout, q, k, v, out, lse, scale, allow_tf32, packed=True
    )
    packed = packed_qkv(*grads)
    if packed is None:  # the kernel module kept them apart (a head too large for int32 offsets)
        return torch.stack(grads, 0).permute(1, 3, 0, 2, 4).contiguous()
    return packed


@attention_bwd_packed.register_fake
def _(dout, q, k, v, out, lse, scale, allow_tf32, backend):
    B, H, N, D = q.shape
    return q.new_empty(B, N, 3, H, D)


def _setup(ctx, inputs, output):
    q, k, v, scale, allow_tf32, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.allow_tf32, ctx.backend = scale, allow_tf32, backend
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ATTENTION.backward_op(dout, q, k, v, out, lse, ctx.scale, ctx.allow_tf32, ctx.backend)
    return dq, dk, dv, None, None, None


def _eager_gradients(ctx, dout, _dlse):
    """`_gradients` for the eager path: where the kernel module can, dq, dk, dv come back as slices of one packed
    buffer (`attention_bwd_packed`), which fused_qkv's backward reads in place as dQKV (B*N, 3C). Not in the
    custom-op graph that torch.compile traces, where the three stay separate tensors."""
    if not getattr(kernel_op.kernels(ctx.backend, "attention"), "PACKED_GRADS", False):
        return _gradients(ctx, dout, _dlse)
    q, k, v, out, lse = ctx.saved_tensors
    dqkv = attention_bwd_packed(dout, q, k, v, out, lse, ctx.scale, ctx.allow_tf32, ctx.backend)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    return dq, dk, dv, None, None, None


# ATTENTION(q, k, v, scale, allow_tf32, backend) -> (out, lse), differentiable in q, k, v.
ATTENTION = kernel_op.KernelOp(
    "attention", forward=_forward, forward_fake=_forward_fake, backward=_backward, backward_fake=_backward_fake,
    setup=_setup, gradients=_gradients, eager_forward=_launch_forward, eager_gradients=_eager_gradients,
)  # fmt: skip
