"""One op on the kernel backends (`triton`, `cuda`): its `torch.library` custom ops and autograd, built from a spec.

Each fused op runs on the kernel backends as a forward and a backward custom op (`vit_kernels::<name>_fwd` and
`vit_kernels::<name>_bwd`), both with fake (meta) implementations, joined by `register_autograd`. `torch.compile`
therefore sees one opaque node per call, with no graph break, and AOTAutograd traces the backward too. In eager mode
`KernelOp.__call__` runs the same kernels and the same autograd through a plain `autograd.Function` instead,
skipping the dispatcher's host cost; the backward always goes through the checked backward op. The op modules
(`vit_kernels/ops/*.py`) each build one `KernelOp` from their pieces: the two op bodies (argument checks, then the
kernel module's launcher), their fakes, what forward saves, and how backward maps output gradients to inputs.

The raw ops (`torch.ops.vit_kernels.*`) are public: a direct caller can pass what autograd never would (a
wrong-shaped lse or hidden, a gradient of another dtype), and the kernels trust every size they are given. So each
op body first checks its arguments with the helpers below (shapes, dtypes and devices of every tensor, the backend,
the sizes the kernels support), raising ValueError / TypeError that name the argument. The eager forward does not:
the public ops have validated already, and that path exists to save host time.

Kernel modules: `KERNEL_MODULES` maps (backend, family) to the module implementing a family's launchers (the
kernel-module contract is in each family's op modules: ops/attention.py, ops/fused_qkv.py and ops/gelu_mlp.py for
"attention" and "linear", ops/pre_ln_block.py for "block"). They are imported on first use, so that
`import vit_kernels` defines no Triton kernel (the interpreter switch must be set before they are defined) and works
without the CUDA extension. (Triton itself is imported by torch._dynamo: set TRITON_INTERPRET before importing.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from vit_kernels import dispatch

KERNEL_MODULES = {
    ("triton", "attention"): "vit_kernels.triton.attention",
    ("triton", "linear"): "vit_kernels.triton.linear",
    ("triton", "block"): "vit_kernels.triton.block",
    ("cuda", "attention"): "vit_kernels.cuda.attention",
    ("cuda", "linear"): "vit_kernels.cuda.linear",
    ("cuda", "block"): "vit_kernels.cuda.block",
}


def kernels(backend: str, family: str):
    """The kernel module of `backend` for `family` ("attention", "linear", "block"), imported on first use."""
    return importlib.import_module(KERNEL_MODULES[(backend, family)])


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of `tensors` (None: an absent bias): a forward that knows it
    will not (no_grad, inference) skips what only backward reads."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an empty tensor stands in for an absent output (no bias gradient)."""
    return like.new_empty(0) if t is None else t


# ----------------------------------------------------------------------------------------------------
# the custom ops and autograd of one op
# ----------------------------------------------------------------------------------------------------
def _eager(first: torch.Tensor) -> bool:
    """Whether a forward may skip the custom-op dispatcher: not being traced (torch.compile, export), no
    dispatch mode active (make_fx, FakeTensorMode), a plain tensor. The dispatcher's Python layers cost
    ~20 us a call on the host, ~50 us with autograd (2-core CPU): more than a ViT-S kernel at batch 8 takes on
    a GPU."""
    return (
        not torch.compiler.is_compiling()
        and type(first) in (torch.Tensor, torch.nn.Parameter)
        and _get_current_dispatch_mode() is None
        and _peek_functorch() is None  # vmap / torch.func: their tensors look plain; the custom op takes them
    )


# torch.func's transform stack (vmap, grad, jvp): a private torch API, absent from some builds.
_FUNCTORCH = getattr(torch._C, "_functorch", None)
_peek_functorch = getattr(_FUNCTORCH, "peek_interpreter_stack", lambda: None)
_functorch_stack = getattr(_FUNCTORCH, "get_interpreter_stack", lambda: None)


class KernelOp:
    """An op's forward and backward custom ops with autograd, and the eager path around the dispatcher.

    name: the custom ops are `vit_kernels::<name>_fwd` and `vit_kernels::<name>_bwd`.
    forward / backward: the op bodies, annotated (torch infers the schemas from them): check the arguments, then
        call the kernel module's launcher. forward_fake / backward_fake: their output shapes for tracing.
    setup(ctx, inputs, output): what backward needs (save_for_backward, flags); gradients(ctx, *grad_outputs): the
        inputs' gradients, by calling `backward_op`.
    eager_forward(*inputs): the forward's kernel call without the checks (the public ops validated already);
        eager_gradients: the eager path's backward, if it differs (a layout only the eager path may return).
    Call the op with the forward's arguments: eager where `_eager` allows, else the forward custom op.
    """

    def __init__(
        self,
        name: str,
        *,
        forward: Callable,
        forward_fake: Callable,
        backward: Callable,
        backward_fake: Callable,
        setup: Callable,
        gradients: Callable,
        eager_forward: Callable,
        eager_gradients: Callable | None = None,
    ):
        self.name = name
        self.forward_op = torch.library.custom_op(f"vit_kernels::{name}_fwd", forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(f"vit_kernels::{name}_bwd", backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.forward_op.register_autograd(gradients, setup_context=setup)

        # ctx-style forward (setup inside): apply() binds the arguments of a setup_context-style forward through
        # inspect.signature on every call, which would cost more than the dispatcher it replaces.
        def eager(ctx, *inputs):
            output = eager_forward(*inputs)
            setup(ctx, inputs, output)
            return output

        self._eager_function = type(
            f"{name}_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(eager), "backward": staticmethod(eager_gradients or gradients)},
        )

    def __call__(self, *inputs):
        if _eager(inputs[0]):
            return self._eager_function.apply(*inputs)
        if not torch.compiler.is_compiling():
            _refuse_differentiating_transforms(self.name)
        return self.forward_op(*inputs)


def _refuse_differentiating_transforms(name: str) -> None:
    """torch.func's grad and jvp transforms (grad, vjp, jacrev, jacfwd, hessian) cannot run a custom op whose
    autograd is registered with register_autograd: torch's own error asks for a setup_context the user never wrote.
    vmap runs (the custom op batches by a loop)."""
    stack = _functorch_stack() or ()
    differentiating = [i.key().name for i in stack if i.key().name in ("Grad", "Jvp")]
    if differentiating:
        raise NotImplementedError(
            f"the kernel backends' op vit_kernels::{name}_fwd has no torch.func {differentiating[0].lower()} rule "
            "(torch.func.grad, vjp, jacrev, jacfwd, hessian); vmap works. Use backend='torch' (or 'reference') "
            "under these transforms, or torch.autograd for gradients"
        )


def check_kept_for_backward(op: str, hidden: torch.Tensor) -> None:
    """A forward keeps the pre-activation only when autograd will ask for gradients (`needs_grad`, fixed when the
    call is traced): an empty one in backward means the graph was traced with gradients off and is differentiated
    now (a torch.export made under no_grad, then trained), which the raw op's shape check reported obscurely."""
    if hidden.numel() == 0:
        raise RuntimeError(
            f"{op}: backward needs the forward's pre-activation, which the forward did not keep: the call was traced "
            "with gradients disabled (torch.no_grad / inference_mode while exporting or tracing). Trace it with "
            "gradients enabled to train the traced module"
        )


# ----------------------------------------------------------------------------------------------------
# argument checks of the raw ops
# ----------------------------------------------------------------------------------------------------
def check_first(name: str, t: torch.Tensor, meaning: str, backend: str, family: str) -> None:
    """The tensor that sets the dtype and device of a raw op's call: `meaning` gives its dims, e.g. "(B, N, C)";
    supported dtype, non-empty (empty batches never reach a kernel: the public ops answer them with torch, and a
    zero-size grid is a CUDA launch error), and a `backend` with `family` kernels that can run on its device."""
    if (backend, family) not in KERNEL_MODULES:
        names = " or ".join(repr(b) for b, f in KERNEL_MODULES if f == family)
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
