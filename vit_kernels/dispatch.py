"""The one place that picks a backend (`select`), and the input checks every op module (vit_kernels/ops/) shares.

Each backend declares what it supports (devices, dtypes, head dims, channel alignment, compute
capability, whether it is built/importable here); a backend named explicitly either accepts the inputs
or raises with its reasons. Nothing ever falls back silently. An empty batch (B = 0) is validated like any
other, then runs no kernel: the torch composition returns its empty outputs (`empty_batch`, whose reason says so).

`auto` runs a kernel backend only where a GPU measurement showed it correct and faster than `torch`: the committed table
`measured_backends.json` (written by `benchmarks/auto_table.py` from GPU benchmark results) maps (arch, op, dtype, head
dim or channel bucket, token bucket, and for attention the B * H bucket) to a backend; everything it does not cover, and
every CPU input, runs on `torch`. `vk.explain_backend` says which backend a call gets and why.

Under `torch.autocast` the public ops first cast their floating inputs to the autocast dtype
(`autocast_inputs`), as `F.linear` and SDPA do, so validation, the table and the kernels all see the
dtype that will run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
# GEMM tiles load 16-byte vectors along the reduction dim, so channels come in multiples of 8.
KERNEL_CHANNEL_MULTIPLE = 8
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The whole-block fused ops (vit_kernels/ops/pre_ln_block.py); a pre-LN block on `auto` fuses only where the table
# names a kernel backend for all three (pre_ln_block.fuses_block).
BLOCK_OPS = ("ln_fused_qkv", "proj_residual", "ln_gelu_mlp")
OPS = ("attention", "fused_qkv", "gelu_mlp", *BLOCK_OPS)
MEASURED_TABLE = Path(__file__).with_name("measured_backends.json")
# A table `auto` reads instead of the committed one, when this variable names a file: gpu_check times `vit:auto`
# with the table auto_table has just proposed, before anyone commits it.
TABLE_OVERRIDE = "VIT_KERNELS_MEASURED_TABLE"


@dataclass(frozen=True)
class BackendSupport:
    name: str
    head_dims: tuple[int, ...] | None  # None: any head dim
    channel_multiple: int  # 1: any channel count


SUPPORT = {
    "reference": BackendSupport("reference", None, 1),
    "torch": BackendSupport("torch", None, 1),
    "triton": BackendSupport("triton", KERNEL_HEAD_DIMS, KERNEL_CHANNEL_MULTIPLE),
    "cuda": BackendSupport("cuda", KERNEL_HEAD_DIMS, KERNEL_CHANNEL_MULTIPLE),
}


# ----------------------------------------------------------------------------------------------------
# what can run here
# ----------------------------------------------------------------------------------------------------
def _triton_interpreting() -> bool:
    # Triton's own switch: CPU tensors can run Triton kernels only under its interpreter.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETER_READY: dict[str, bool] = {}
_INTERPRET_TOO_LATE = (
    "TRITON_INTERPRET=1 was set after triton was imported (`import vit_kernels` imports it, through torch._dynamo), "
    "so Triton's own @jit helpers were built for the GPU and its interpreter cannot run them: set TRITON_INTERPRET=1 "
    "before importing vit_kernels, torch._dynamo or triton (e.g. `TRITON_INTERPRET=1 python script.py`)"
)


# Triton turns each @jit function into an interpreted one only if TRITON_INTERPRET=1 when it is defined, its
# standard library's (tl.zeros, tl.sum, ...) included, at `import triton`. Set later, every kernel failed inside
# the interpreter ("Cannot call @triton.jit'd outside of the scope of a kernel"). Fixed for the process once
# known, as it cannot change without re-importing triton; a constant for dynamo, like _module_found.
@torch._dynamo.assume_constant_result
def _triton_interpreter_ready() -> bool:
    ready = _INTERPRETER_READY.get("ready")
    if ready is None:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        ready = _INTERPRETER_READY["ready"] = isinstance(tl.zeros, InterpretedFunction)
    return ready


def cuda_extension():
    try:
        from vit_kernels import _C
    except ImportError as exc:  # built without nvcc, or a broken build
        return None, f"the CUDA extension vit_kernels._C is not built ({exc})"
    return _C, None


# Per-process caches of what cannot change while the process runs: whether a module can be imported
# and each device's compute capability. Looked up on every op call, they were most of the host time of
# a small call (`importlib.util.find_spec` of a module not yet imported costs ~13 us).
_MODULE_FOUND: dict[str, bool] = {}
_CAPABILITY: dict[int, tuple[int, int]] = {}


# Under torch.compile the first lookup would reach find_spec, which dynamo will not trace (a graph break, or an
# error with fullgraph=True, when a model is compiled before any eager call): dynamo calls it and keeps the result.
@torch._dynamo.assume_constant_result
def _module_found(name: str) -> bool:
    found = _MODULE_FOUND.get(name)
    if found is None:
        found = _MODULE_FOUND[name] = importlib.util.find_spec(name) is not None
    return found


# As _module_found: under torch.compile a cold cache would otherwise trace the CUDA device queries.
@torch._dynamo.assume_constant_result
def _capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, or None where this process has no such device (no CUDA at all, as
    for fake CUDA tensors traced on a CPU machine, or an index past the device count): `_no_device`'s reason."""
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    capability = _CAPABILITY.get(index)
    if capability is None:
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return None
        capability = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return capability


def _no_device(device: torch.device) -> str:
    if not torch.cuda.is_available():
        return f"{device} is not a device of this process: no CUDA device here (torch.cuda.is_available() is False)"
    return f"{device} is not a device of this process: it has {torch.cuda.device_count()} CUDA device(s)"


def device_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` here, or None if it can."""
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        if not _module_found("triton"):
            return "triton is not installed"
        if device.type == "cpu":
            if not _triton_interpreting():
                return "CPU tensors run Triton kernels only with TRITON_INTERPRET=1"
            return None if _triton_interpreter_ready() else _INTERPRET_TOO_LATE
        if device.type != "cuda":
            return f"triton kernels need a CUDA device, got {device.type}"
        capability = _capability(device)
        if capability is None:
            return _no_device(device)
        return None if capability[0] >= 8 else "triton kernels need compute capability >= 8.0"
    if backend == "cuda":
        _C, reason = cuda_extension()
        if reason:
            return reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        capability = _capability(device)
        if capability is None:
            return _no_device(device)
        return None if capability[0] >= 8 else "the CUDA kernels are built for compute capability >= 8.0"
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b for b in BACKENDS if device_unavailable_reason(b, device) is None]


# ----------------------------------------------------------------------------------------------------
# input checks shared by the ops
# ----------------------------------------------------------------------------------------------------
def check_tensor(name: str, t, ndim: int | None = None, batch_dims: int = 0) -> None:
    """`batch_dims`: how many leading dims of t may be 0 (an empty batch, answered by `empty_batch`); -1: all but
    the last (x (..., C)). Any other empty dim (channels, heads, tokens, a weight's) is an error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if batch_dims == -1 and t.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dim (..., C), got a 0-D tensor")
    if t.numel() == 0 and 0 in t.shape[batch_dims:]:
        only = {0: "", 1: " (only its first dim, the batch, may be 0)"}.get(batch_dims, " (only batch dims may be 0)")
        raise ValueError(f"{name} must be non-empty{only}, got shape {tuple(t.shape)}")


def check_same(named: dict[str, torch.Tensor | None]) -> None:
    present = {n: t for n, t in named.items() if t is not None}
    (first_name, first), *rest = present.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; all must match")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must match")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def _missing_kernels(backend: str, family: str) -> str | None:
    """Why this package has no `family` kernels for `backend` (a partial build), or None."""
    from vit_kernels.kernel_op import KERNEL_MODULES

    module = KERNEL_MODULES.get((backend, family))
    if module is None or _module_found(module):
        return None
    return f"this build of vit_kernels has no {backend} {family} kernels ({module} is missing)"


# ----------------------------------------------------------------------------------------------------
# auto: the committed table of GPU measurements
# ----------------------------------------------------------------------------------------------------
class Choice(NamedTuple):
    """The backend an op call runs on, and why (what `vk.explain_backend` returns)."""

    backend: str
    reason: str


class TableKey(NamedTuple):
    """One cell of the measured table. Sizes are rounded up to a power of two (`bucket`), so N = 197
    falls in N<=256 and N = 257 in N<=512."""

    arch: str  # "sm_90": the device's compute capability (an A100's measurements say nothing of an sm_86 card)
    op: str  # "attention" | "fused_qkv" | "gelu_mlp" | one of BLOCK_OPS
    dtype: str  # "fp16" | "bf16" | "fp32" (exact) | "tf32" (fp32 inputs where the matmul precision allows tf32)
    dim: int  # attention: the head dim D; the others: the channel count C (the block's width), bucketed
    tokens: int  # attention: the sequence length N; the others: the GEMM's rows B * N; bucketed
    # attention: B * H, its independent (batch, head) problems, bucketed (a measurement at a large batch says
    # nothing of one that fills a fraction of the SMs); the others: 1, their tokens B * N hold the batch
    batch: int = 1

    def __str__(self) -> str:
        if self.op == "attention":
            return f"{self.arch} attention {self.dtype} D={self.dim} N<={self.tokens} B*H<={self.batch}"
        return f"{self.arch} {self.op} {self.dtype} C<={self.dim} B*N<={self.tokens}"


def bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


# What `_table_key` builds from torch's compute capability: f"sm_{major}{minor}", the minor one digit. An arch
# of another form ("sm_9", "sm_90a") could never be looked up, so its entry would be dead without a word.
_TABLE_ARCH = re.compile(r"sm_[1-9][0-9]*[0-9]")
# Each entry's fields and their JSON types; "evidence" (where the measurement is) may be left out, and "batch" is
# attention's alone (required there).
_TABLE_FIELDS = {"arch": str, "op": str, "dtype": str, "dim": int, "tokens": int, "backend": str}


def _type_problem(name: str, value, kind: type) -> str | None:
    # bool is an int to Python, and int() would make 64.9 a D=64: a table's sizes must be written as integers.
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name} {value!r} is not an integer"
    if kind is str and not isinstance(value, str):
        return f"{name} {value!r} is not a string"
    return None


def parse_table(data, source: str = "measured table") -> dict[TableKey, dict]:
    """The entries of a measured table (the JSON of `measured_backends.json`), keyed; ValueError naming `source`
    (the file) and the first bad entry."""
    if not isinstance(data, dict):
        raise ValueError(f'{source}: expected a JSON object with an "entries" list, got a {type(data).__name__}')
    if "entries" not in data:
        raise ValueError(f'{source}: no "entries" (expected a JSON object with an "entries" list)')
    entries = data["entries"]
    if not isinstance(entries, list):
        what = "null" if entries is None else f"a {type(entries).__name__}"
        raise ValueError(f'{source}: "entries" is {what}, expected a list of entries')
    table = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} ({entry!r}) is not an object with the fields {list(_TABLE_FIELDS)}")
        attention = entry.get("op") == "attention"
        missing = [name for name in (*_TABLE_FIELDS, *(["batch"] if attention else [])) if name not in entry]
        problems = [f"missing {', '.join(missing)}"] if missing else []
        if "batch" in entry and not attention:
            problems.append("batch is attention's field (the others' tokens, B * N, hold the batch)")
        kinds = {**_TABLE_FIELDS, "batch": int, "evidence": str}
        problems += filter(None, (_type_problem(n, entry[n], kind) for n, kind in kinds.items() if n in entry))
        if problems:
            raise ValueError(f"{source}: entry {i} ({entry!r}) is malformed: {'; '.join(problems)}")
        key = TableKey(entry["arch"], entry["op"], entry["dtype"], entry["dim"], entry["tokens"], entry.get("batch", 1))
        backend = entry["backend"]
        checks = (
            (
                _TABLE_ARCH.fullmatch(key.arch) is not None,
                f"arch {key.arch!r} is not sm_<major><minor> as the dispatcher builds it (sm_80, sm_90, sm_100)",
            ),
            (key.op in OPS, f"op {key.op!r} is not one of {OPS}"),
            (key.dtype in ("fp32", "tf32", "fp16", "bf16"), f"dtype {key.dtype!r} is not fp32, tf32, fp16 or bf16"),
            (key.dim > 0, f"dim {key.dim} is not positive"),
            (key.tokens == bucket(key.tokens), f"tokens {key.tokens} is not a power of two"),
            (key.batch == bucket(key.batch), f"batch {key.batch} is not a power of two"),
            (key.op == "attention" or key.dim == bucket(key.dim), f"dim {key.dim} is not a power of two"),
            (backend in ("torch", "triton", "cuda"), f"backend {backend!r} is not torch, triton or cuda"),
            (key not in table, f"it repeats the key {key}"),
        )
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError(f"{source}: entry {i} ({entry!r}): {'; '.join(problems)}")
        table[key] = entry
    return table


def load_table(path: Path) -> dict[TableKey, dict]:
    """The measured table at `path`; empty if the file is missing (then `auto` is `torch` everywhere). ValueError
    naming the file when it is not valid JSON or not a valid table."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return parse_table(data, str(path))


def _load_committed_table(path: Path, override: str = "") -> tuple[dict[TableKey, dict], str]:
    """(load_table(path), ""), except that a broken committed table warns instead of raising: it must not break
    `import vit_kernels` for users who never reach it (every CPU user). It gives ({}, the problem): `auto` is
    then `torch` everywhere, and says why. `override`: the TABLE_OVERRIDE value that named `path`, whose file
    must exist."""
    try:
        if override and not Path(path).is_file():
            raise ValueError(f"{TABLE_OVERRIDE}={override} names no file")
        return load_table(path), ""
    except (OSError, ValueError) as exc:
        warnings.warn(f"{exc}; backend='auto' runs torch everywhere until it is fixed", RuntimeWarning, stacklevel=2)
        return {}, str(exc)


# Read once at import: a lookup per op call must cost a dict access, and a file read could not be traced
# by torch.compile. Tests swap in their own table with monkeypatch.
_OVERRIDE = os.environ.get(TABLE_OVERRIDE, "")
_TABLE, _TABLE_PROBLEM = _load_committed_table(Path(_OVERRIDE) if _OVERRIDE else MEASURED_TABLE, _OVERRIDE)


def measured_table_size() -> int:
    """How many (arch, op, dtype, size) cells of `auto`'s measured table name a backend (0: auto is torch on CUDA)."""
    return len(_TABLE)


_REQUESTED = {b: f"backend={b!r} was requested" for b in BACKENDS}


def _table_key(
    device: torch.device, op: str, dtype: torch.dtype, dim: int, tokens: int, batch: int = 1
) -> TableKey | None:
    """The table's key of these inputs; None where `device` is not a CUDA device of this process."""
    capability = _capability(device)
    if capability is None:
        return None
    major, minor = capability
    name = DTYPE_NAMES[dtype]
    if name == "fp32" and allow_tf32():
        name = "tf32"
    if op != "attention":
        dim = bucket(dim)
    return TableKey(f"sm_{major}{minor}", op, name, dim, bucket(tokens), bucket(batch))


def select(
    backend: str,
    device: torch.device,
    op: str,
    sizes: tuple,
    objection,
) -> Choice:
    """Resolve `backend` for `op` on `device`. `sizes` is (dtype, dim, tokens) of these inputs, and B * H for
    attention: the table's key (see TableKey); `objection(b)` is backend b's objection to these particular inputs,
    or None (called only for the backends considered: building every backend's reasons on every call cost
    microseconds)."""
    family = "attention" if op == "attention" else "block" if op in BLOCK_OPS else "linear"

    def reason(b: str) -> str | None:
        return device_unavailable_reason(b, device) or _missing_kernels(b, family) or objection(b)

    if backend == "auto":
        if device.type != "cuda":
            return Choice(
                "torch", f"auto on {device.type} is torch: kernel backends are picked only from GPU measurements"
            )
        key = _table_key(device, op, *sizes)
        if key is None:
            return Choice("torch", f"auto: {_no_device(device)}: torch")
        entry = _TABLE.get(key)
        if entry is None:
            unread = f" (the committed table was not read: {_TABLE_PROBLEM})" if _TABLE_PROBLEM else ""
            return Choice("torch", f"no committed GPU measurement for {key}: torch{unread}")
        chosen = entry["backend"]
        why = reason(chosen)
        if why is not None:
            return Choice("torch", f"measured fastest for {key} is {chosen}, which cannot run here ({why}): torch")
        evidence = entry.get("evidence")
        return Choice(
            chosen,
            f"measured correct and fastest for {key}: {chosen}"
            + (f" ({evidence})" if evidence else "")
            + _gemm_detail(chosen, family, device, sizes[0]),
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    why = reason(backend)
    if why is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {why}")
    return Choice(backend, _REQUESTED[backend] + _gemm_detail(backend, family, device, sizes[0]))


def _gemm_detail(backend: str, family: str, device: torch.device, dtype: torch.dtype) -> str:
    """For the cuda backend's GEMM ops: which GEMMs run (CUTLASS sm_90a or mma.sync) and why; for its block ops also
    where LayerNorm runs."""
    # Under torch.compile the reason is never read, and the build query is a pybind call dynamo cannot trace (a
    # graph break under autocast on the H200, 2026-12-04).
    if backend != "cuda" or family == "attention" or torch.compiler.is_compiling():
        return ""
    from vit_kernels.cuda.linear import gemm_path

    if family == "block":
        from vit_kernels.cuda.block import LAYER_NORM

        return f"; {LAYER_NORM}; {gemm_path(device, dtype)}"
    return f"; {gemm_path(device, dtype)}"


def empty_batch(choice: Choice) -> Choice:
    """`choice` for inputs whose batch is empty (B = 0, or x with no rows), made after the inputs were validated for
    it: no kernel is launched (there is nothing to compute, and a zero-size grid is a CUDA launch error), and the
    torch composition returns the empty outputs, and in backward input gradients of the inputs' shapes and zero
    weight gradients, as F.linear and SDPA do. Not a fallback of real work, and the reason says so."""
    if choice.backend in ("torch", "reference"):
        return choice
    reason = f"{choice.reason}; the batch is empty, so no kernel is launched: torch's composition returns the empties"
    return Choice("torch", reason)


def channel_objection(dims: dict[str, int]):
    """objection(b) for channel counts `dims` (name -> size): which are not multiples of b's alignment."""

    def objection(b: str) -> str | None:
        multiple = SUPPORT[b].channel_multiple
        bad = [f"{n}={d}" for n, d in dims.items() if d % multiple]
        return f"needs channel sizes that are multiples of {multiple}, got {', '.join(bad)}" if bad else None

    return objection


# ----------------------------------------------------------------------------------------------------
# autocast and the precision setting, read by every op before its kernels
# ----------------------------------------------------------------------------------------------------
def autocast_inputs(*tensors):
    """`tensors` as an op under `torch.autocast` runs them, the way F.linear and SDPA do: with autocast on for
    the first tensor's device type, every fp32/fp16/bf16 tensor is cast to the autocast dtype (fp64 and
    non-tensors are left for validation to reject); otherwise all are returned as they are. The cast is
    differentiable, so each gradient comes back in its input's own dtype (fp32 master weights get fp32)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in DTYPES else t for t in tensors)


# A constant to torch.compile (the precision setting is read at trace time, like a Python global), so it
# costs no graph break; changing the precision after compiling needs a recompile, as with any global.
@torch.compiler.assume_constant_result
def allow_tf32() -> bool:
    """fp32 inputs use tf32 tensor cores when PyTorch's own matmul precision allows it."""
    return torch.get_float32_matmul_precision() != "highest"
