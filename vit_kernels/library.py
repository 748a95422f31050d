"""The kernel backends (`triton`, `cuda`) as `torch.library` custom ops with autograd.

Each fused op is a forward custom op and a backward custom op, both with fake (meta) implementations,
joined by `register_autograd`. `torch.compile` therefore sees one opaque op per call, with no graph
break, and AOTAutograd can trace the backward too. In eager mode `run_attention` / `run_qkv` / `run_mlp`
call the same kernels through a plain autograd.Function with the same setup and backward, skipping the
dispatcher's per-call host cost. The `backend` string argument picks the kernel
module; the module implements the functions below (its launchers), and nothing here does math.

The raw ops (`torch.ops.vit_kernels.*`) are public: a direct caller can pass what autograd never would (a
wrong-shaped lse or hidden, a gradient of another dtype), and the kernels trust every size they are given.
So each op's body first runs its `check_<op>_args` (shapes, dtypes and devices of every tensor argument, the
backend, the sizes the kernels support), raising ValueError / TypeError naming the argument. The eager
forward (`run_*`) does not: the public ops have validated in `dispatch.py` already, and that path exists to
save host time. The backward always goes through the checked backward op.

Kernel-module contract (implemented by `vit_kernels.triton.attention` / `vit_kernels.triton.linear` for
Triton and `vit_kernels.cuda.attention` / `vit_kernels.cuda.linear` for CUDA C++). All tensors share
one dtype unless stated; inputs are validated before they get here (by `dispatch.py` on the public path,
by the `check_*_args` below on the raw ops), never empty; `allow_tf32` only matters for fp32 inputs.

    attention_fwd(q, k, v, scale, allow_tf32) -> (out, lse)
        q, k, v (B, H, N, D) any strides; out (B, H, N, D) whose memory is laid out (B, N, H, D),
        i.e. `torch.empty(B, N, H, D).transpose(1, 2)`; lse (B, H, N) float32, natural-log
        log-sum-exp of the scaled logits of each row (what backward needs to recompute P).
    attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32) -> (dq, dk, dv)
        dout any strides; dq, dk, dv contiguous (B, H, N, D). A module with PACKED_GRADS also takes packed=True
        (`attention_bwd_packed`): dq, dk, dv are then the slices of one (B, N, 3, H, D) buffer.
    qkv_fwd(x, weight, bias, num_heads, allow_tf32) -> (q, k, v)
        x (B, N, C) any strides; weight (3C, C);
        bias (3C,) or None; q, k, v contiguous (B, H, N, C // H). A module with PACKED_QKV also takes packed=True
        (the eager path): q, k, v are then the slices of one (B, N, 3, H, D) buffer.
    qkv_bwd(dq, dk, dv, x, weight, has_bias, allow_tf32) -> (dx, dweight, dbias or None)
        dq, dk, dv (B, H, N, D) any strides; dx contiguous (B, N, C); dweight (3C, C); dbias (3C,).
    mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32) -> (y, hidden)
        x (M, C) any strides; y contiguous (M, C_out); hidden contiguous (M, C_hidden) is the
        pre-activation x @ fc1_weight^T + fc1_bias, saved for backward (GELU' needs it).
    mlp_bwd(dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32)
        -> (dx, dfc1_weight, dfc1_bias or None, dfc2_weight, dfc2_bias or None), all contiguous.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vit_kernels import dispatch
from vit_kernels.triton import packed_qkv

_KERNEL_MODULES = {
    ("triton", "attention"): "vit_kernels.triton.attention",
    ("triton", "linear"): "vit_kernels.triton.linear",
    ("triton", "block"): "vit_kernels.triton.block",
    ("cuda", "attention"): "vit_kernels.cuda.attention",
    ("cuda", "linear"): "vit_kernels.cuda.linear",
    ("cuda", "block"): "vit_kernels.cuda.block",
}


def _kernels(backend: str, family: str):
    # Imported on first use so that `import vit_kernels` never imports Triton (the interpreter switch
    # must be set before Triton kernels are defined) and works without the CUDA extension.
    return importlib.import_module(_KERNEL_MODULES[(backend, family)])


def _none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Custom ops cannot return None; an empty tensor stands in for "no bias gradient".
    return like.new_empty(0) if t is None else t


# ----------------------------------------------------------------------------------------------------
# argument checks of the raw ops (shared with the whole-block ops in vit_kernels/block.py)
# ----------------------------------------------------------------------------------------------------
def check_first(name: str, t: torch.Tensor, meaning: str, backend: str, family: str) -> None:
    """The tensor that sets the dtype and device of a raw op's call: `meaning` gives its dims, e.g. "(B, N, C)";
    supported dtype, non-empty (empty batches never reach a kernel: the public ops answer them with torch, and a
    zero-size grid is a CUDA launch error), and a `backend` with `family` kernels that can run on its device."""
    if (backend, family) not in _KERNEL_MODULES:
        names = " or ".join(repr(b) for b, f in _KERNEL_MODULES if f == family)
        raise ValueError(f"backend must be {names} (the backends with {family} kernels), got {backend!r}")
    check_dim(name, t, meaning)
    if t.dtype not in dispatch.DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)} (the public ops take empty batches)")
    why = dispatch.device_unavailable_reason(backend, t.device)
    if why is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {why}")


def check_arg(name: str, t: torch.Tensor | None, shape: tuple[int, ...], meaning: str, like: torch.Tensor,
              dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """t (skipped if None) has `shape`, spelled `meaning` (e.g. "(B, H, N)"), `dtype` (default: like's) and like's
    device."""
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {meaning} = {tuple(shape)}, got {tuple(t.shape)}")
    dtype = dtype or like.dtype
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but must be on {like.device}, with the other tensors")


def check_dim(name: str, t: torch.Tensor, meaning: str) -> None:
    """t has as many dims as `meaning` names, e.g. "(B, N, C)" three (read its sizes only after this)."""
    ndim = meaning.count(",") + 1
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {meaning}, got shape {tuple(t.shape)}")


def check_channels(backend: str, **channels: int) -> None:
    """The channel sizes (name=size) are multiples of the backend's GEMM alignment (dispatch.SUPPORT)."""
    multiple = dispatch.SUPPORT[backend].channel_multiple
    bad = [f"{name}={size}" for name, size in channels.items() if size % multiple]
    if bad:
        raise ValueError(
            f"backend={backend!r} needs channel sizes that are multiples of {multiple}, got {', '.join(bad)}"
        )


def check_num_heads(num_heads: int, C: int, backend: str) -> int:
    """num_heads splits C into heads of a head dim the backend's epilogue can store; returns the head dim."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if C % num_heads:
        raise ValueError(f"x's channel count C={C} must be divisible by num_heads={num_heads}")
    check_channels(backend, C=C, **{"head dim C // num_heads": C // num_heads})
    return C // num_heads


def check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def check_attention_fwd_args(q, k, v, scale: float, backend: str) -> None:
    """q, k, v (B, H, N, D) of one dtype and device, D a head dim the backend has kernels for; scale finite."""
    check_first("q", q, "(B, H, N, D)", backend, "attention")
    check_arg("k", k, q.shape, "q.shape (B, H, N, D)", q)
    check_arg("v", v, q.shape, "q.shape (B, H, N, D)", q)
    head_dims = dispatch.SUPPORT[backend].head_dims
    if q.shape[3] not in head_dims:
        raise ValueError(f"head dim D={q.shape[3]} is not supported by backend={backend!r} (supported: {head_dims})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_attention_bwd_args(dout, q, k, v, out, lse, scale: float, backend: str) -> None:
    """attention_fwd's arguments, its outputs out (B, H, N, D) and lse (B, H, N) float32, and dout like out."""
    check_attention_fwd_args(q, k, v, scale, backend)
    check_arg("out", out, q.shape, "q.shape (B, H, N, D)", q)
    check_arg("dout", dout, q.shape, "q.shape (B, H, N, D)", q)
    check_arg("lse", lse, q.shape[:3], "(B, H, N)", q, torch.float32)


def check_qkv_fwd_args(x, weight, bias, num_heads: int, backend: str) -> None:
    """x (B, N, C); weight (3C, C); bias (3C,) or None; num_heads dividing C into a supported head dim."""
    check_first("x", x, "(B, N, C)", backend, "linear")
    C = x.shape[2]
    check_arg("weight", weight, (3 * C, C), "(3C, C)", x)
    check_arg("bias", bias, (3 * C,), "(3C,)", x)
    check_num_heads(num_heads, C, backend)


def check_qkv_bwd_args(dq, dk, dv, x, weight, backend: str) -> None:
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


def check_mlp_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend: str) -> tuple[int, int]:
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


def check_mlp_fwd_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate: str, backend: str) -> None:
    """x (M, C) (the public op flattens x's leading dims); the weights as `check_mlp_weights` says."""
    check_first("x", x, "(M, C)", backend, "linear")
    check_mlp_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, backend)
    check_approximate(approximate)


def check_mlp_bwd_args(dy, x, fc1_weight, fc2_weight, hidden, approximate: str, backend: str) -> None:
    """mlp_fwd's x and weights, its output's gradient dy (M, C_out) and its saved pre-activation hidden (M, Hd)."""
    check_first("x", x, "(M, C)", backend, "linear")
    Hd, C_out = check_mlp_weights(x, fc1_weight, None, fc2_weight, None, backend)
    M = x.shape[0]
    check_arg("dy", dy, (M, C_out), "(M, C_out)", x)
    check_arg("hidden", hidden, (M, Hd), "(M, Hd)", x)
    check_approximate(approximate)


# ----------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("vit_kernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allow_tf32: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_fwd_args(q, k, v, scale, backend)
    return _kernels(backend, "attention").attention_fwd(q, k, v, scale, allow_tf32)


@attention_fwd.register_fake
def _(q, k, v, scale, allow_tf32, backend):
    B, H, N, D = q.shape
    out = q.new_empty(B, N, H, D).transpose(1, 2)
    lse = q.new_empty(B, H, N, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("vit_kernels::attention_bwd", mutates_args=())
def attention_bwd(
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
    check_attention_bwd_args(dout, q, k, v, out, lse, scale, backend)
    return _kernels(backend, "attention").attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, allow_tf32, backend):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


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
    check_attention_bwd_args(dout, q, k, v, out, lse, scale, backend)
    grads = _kernels(backend, "attention").attention_bwd(dout, q, k, v, out, lse, scale, allow_tf32, packed=True)
    packed = packed_qkv(*grads)
    if packed is None:  # the kernel module kept them apart (a head too large for int32 offsets)
        return torch.stack(grads, 0).permute(1, 3, 0, 2, 4).contiguous()
    return packed


@attention_bwd_packed.register_fake
def _(dout, q, k, v, out, lse, scale, allow_tf32, backend):
    B, H, N, D = q.shape
    return q.new_empty(B, N, 3, H, D)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, allow_tf32, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.allow_tf32, ctx.backend = scale, allow_tf32, backend
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.allow_tf32, ctx.backend)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def _attention_backward_eager(ctx, dout, _dlse):
    """`_attention_backward` for the eager path: where the kernel module can, dq, dk, dv come back as slices of one
    packed buffer (`attention_bwd_packed`), which fused_qkv's backward reads in place as dQKV (B*N, 3C). Not in
    the custom-op graph that torch.compile traces, where the three stay separate tensors."""
    if not getattr(_kernels(ctx.backend, "attention"), "PACKED_GRADS", False):
        return _attention_backward(ctx, dout, _dlse)
    q, k, v, out, lse = ctx.saved_tensors
    dqkv = attention_bwd_packed(dout, q, k, v, out, lse, ctx.scale, ctx.allow_tf32, ctx.backend)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------------
# fused QKV projection
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("vit_kernels::qkv_fwd", mutates_args=())
def qkv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_qkv_fwd_args(x, weight, bias, num_heads, backend)
    return _kernels(backend, "linear").qkv_fwd(x, weight, bias, num_heads, allow_tf32)


@qkv_fwd.register_fake
def _(x, weight, bias, num_heads, allow_tf32, backend):
    B, N, C = x.shape
    shape = (B, num_heads, N, C // num_heads)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("vit_kernels::qkv_bwd", mutates_args=())
def qkv_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_qkv_bwd_args(dq, dk, dv, x, weight, backend)
    dx, dweight, dbias = _kernels(backend, "linear").qkv_bwd(dq, dk, dv, x, weight, has_bias, allow_tf32)
    return dx, dweight, _none_to_empty(dbias, x)


@qkv_bwd.register_fake
def _(dq, dk, dv, x, weight, has_bias, allow_tf32, backend):
    dbias = x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias


def _qkv_setup(ctx, inputs, output):
    x, weight, bias, num_heads, allow_tf32, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.allow_tf32, ctx.backend = bias is not None, allow_tf32, backend


def _qkv_backward(ctx, dq, dk, dv):
    x, weight = ctx.saved_tensors
    dx, dweight, dbias = qkv_bwd(dq, dk, dv, x, weight, ctx.has_bias, ctx.allow_tf32, ctx.backend)
    return dx, dweight, (dbias if ctx.has_bias else None), None, None, None


qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup)


# ----------------------------------------------------------------------------------------------------
# fused GELU-MLP
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("vit_kernels::mlp_fwd", mutates_args=())
def mlp_fwd(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str,
    allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_mlp_fwd_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, backend)
    return _kernels(backend, "linear").mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32)


@mlp_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, backend):
    M = x.shape[0]
    return x.new_empty(M, fc2_weight.shape[0]), x.new_empty(M, fc1_weight.shape[0])


@torch.library.custom_op("vit_kernels::mlp_bwd", mutates_args=())
def mlp_bwd(
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
    check_mlp_bwd_args(dy, x, fc1_weight, fc2_weight, hidden, approximate, backend)
    dx, dw1, db1, dw2, db2 = _kernels(backend, "linear").mlp_bwd(
        dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32
    )
    return dx, dw1, _none_to_empty(db1, x), dw2, _none_to_empty(db2, x)


@mlp_bwd.register_fake
def _(dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32, backend):
    db1 = x.new_empty(fc1_weight.shape[0]) if has_fc1_bias else x.new_empty(0)
    db2 = x.new_empty(fc2_weight.shape[0]) if has_fc2_bias else x.new_empty(0)
    return (
        x.new_empty(x.shape),
        fc1_weight.new_empty(fc1_weight.shape),
        db1,
        fc2_weight.new_empty(fc2_weight.shape),
        db2,
    )


def _mlp_setup(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, backend = inputs
    _y, hidden = output
    ctx.save_for_backward(x, fc1_weight, fc2_weight, hidden)
    ctx.has_fc1_bias, ctx.has_fc2_bias = fc1_bias is not None, fc2_bias is not None
    ctx.approximate, ctx.allow_tf32, ctx.backend = approximate, allow_tf32, backend
    ctx.mark_non_differentiable(hidden)


def _mlp_backward(ctx, dy, _dhidden):
    x, fc1_weight, fc2_weight, hidden = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = mlp_bwd(
        dy, x, fc1_weight, fc2_weight, hidden,
        ctx.has_fc1_bias, ctx.has_fc2_bias, ctx.approximate, ctx.allow_tf32, ctx.backend,
    )  # fmt: skip
    return (
        dx, dw1, db1 if ctx.has_fc1_bias else None, dw2, db2 if ctx.has_fc2_bias else None, None, None, None,
    )  # fmt: skip


mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ----------------------------------------------------------------------------------------------------
# calling the ops: the custom ops under tracing, the same kernels and autograd called directly in eager
# ----------------------------------------------------------------------------------------------------
def _eager(first: torch.Tensor) -> bool:
    """Whether a forward may skip the custom-op dispatcher: not being traced (torch.compile, export), no
    dispatch mode active (make_fx, FakeTensorMode), a plain tensor. The dispatcher's Python layers cost
    ~20 us a call on the host, ~50 us with autograd (measured on a 2-core CPU): more than a ViT-S kernel at
    batch 8 takes on a GPU. The backward always goes through the backward custom op."""
    return (
        not torch.compiler.is_compiling()
        and type(first) in (torch.Tensor, torch.nn.Parameter)
        and _get_current_dispatch_mode() is None
    )


# ctx-style forwards (setup inside): autograd.Function.apply binds the arguments of a setup_context-style
# forward through inspect.signature on every call, which would cost more than the dispatcher it replaces.
class _AttentionEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, allow_tf32, backend):
        output = _kernels(backend, "attention").attention_fwd(q, k, v, scale, allow_tf32)
        _attention_setup(ctx, (q, k, v, scale, allow_tf32, backend), output)
        return output

    backward = staticmethod(_attention_backward_eager)


class _QkvEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, allow_tf32, backend):
        # Where the kernel module can (PACKED_QKV), q, k, v are the slices of one (B, N, 3, H, D) buffer, as the
        # reference's unbind returns them: one plain GEMM writes it (no head-split scatter), attention reads the
        # slices in place. Not in the custom-op graph, whose outputs may not alias each other.
        kernels = _kernels(backend, "linear")
        if getattr(kernels, "PACKED_QKV", False):
            output = kernels.qkv_fwd(x, weight, bias, num_heads, allow_tf32, packed=True)
        else:
            output = kernels.qkv_fwd(x, weight, bias, num_heads, allow_tf32)
        _qkv_setup(ctx, (x, weight, bias, num_heads, allow_tf32, backend), output)
        return output

    backward = staticmethod(_qkv_backward)


class _MlpEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, backend):
        inputs = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, backend)
        output = _kernels(backend, "linear").mlp_fwd(*inputs[:-1])
        _mlp_setup(ctx, inputs, output)
        return output

    backward = staticmethod(_mlp_backward)


def run_attention(q, k, v, scale: float, allow_tf32: bool, backend: str):
    """attention_fwd's (out, lse), differentiable in q, k, v."""
    return (_AttentionEager.apply if _eager(q) else attention_fwd)(q, k, v, scale, allow_tf32, backend)


def run_qkv(x, weight, bias, num_heads: int, allow_tf32: bool, backend: str):
    """qkv_fwd's (q, k, v), differentiable in x, weight, bias."""
    return (_QkvEager.apply if _eager(x) else qkv_fwd)(x, weight, bias, num_heads, allow_tf32, backend)


def run_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate: str, allow_tf32: bool, backend: str):
    """mlp_fwd's (y, hidden), differentiable in x and every weight and bias."""
    op = _MlpEager.apply if _eager(x) else mlp_fwd
    return op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, backend)
