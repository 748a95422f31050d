"""Test setup: one device for every Triton test (CUDA when present, else Triton's interpreter on CPU), a seed
per test, the float64 references' helpers and the tf32 model.

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before the kernel modules are
imported; conftest.py is imported by pytest before any test module, so setting it here is early enough.
"""

import copy
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the Triton tests put their tensors: the GPU when there is one (compiled kernels), else the CPU, where the
# interpreter runs them. Tests take it through the `device` fixture; helpers that build tensors take it as an
# argument, so that no tensor of a Triton test is made without it.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Per-dtype relative-error tolerances (||out - ref|| / ||ref|| against a float64 reference).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# fp32 through tf32 tensor cores: the kernel's error may be this many times that of the same computation with
# every GEMM operand rounded to tf32 (see `tf32_tolerance`); FlashAttention's parity rule uses 2.
TF32_FACTOR = 2.0


@pytest.fixture
def device() -> torch.device:
    """The device of every Triton test: CUDA when present, else CPU under TRITON_INTERPRET=1."""
    return DEVICE


@pytest.fixture
def highest_precision():
    """fp32 matmuls in true fp32 for the test (torch.set_float32_matmul_precision("highest")), the previous setting
    restored afterwards: fp32 on the kernel backends uses tf32 unless asked not to; parity in fp32 means true fp32."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the tests marked slow under the Triton interpreter too")


def pytest_runtest_logreport(report):
    """With VIT_KERNELS_FAILURES_LOG set (benchmarks/gpu_check.sh sets it), each failure's traceback is appended to
    that file as it happens: pytest prints them only at the end, so a run killed at its time limit lost them
    (the first H100 run). Written by the main process only (xdist workers forward their reports to it)."""
    path = os.environ.get("VIT_KERNELS_FAILURES_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


def pytest_collection_modifyitems(config, items):
    # On a GPU the slow crosses take seconds and always run; under the interpreter they take minutes, so they are
    # deselected there (pytest's summary counts them as "deselected") unless --slow is given.
    if not INTERPRETING or config.getoption("--slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in `out` gives inf, so it never passes.

    The denominator is floored at 1e-6 * sqrt(numel): where the true value is zero (dq and dk at N=1,
    where softmax is constant) a reference holds rounding dust, and the kernel must then be ~zero too.
    """
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    floor = 1e-6 * max(ref.numel(), 1) ** 0.5
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def randn(*shape, dtype, device, scale=1.0, shift=None) -> torch.Tensor:
    """torch.randn(*shape) * scale (+ shift), drawn on the CPU (the same numbers on every machine), then rounded to
    dtype on `device`: the float64 reference sees exactly the values the kernel sees."""
    t = torch.randn(*shape) * scale
    if shift is not None:
        t = t + shift
    return t.to(device=device, dtype=dtype)


class LowRankAdapter(torch.nn.Module):
    """A LoRA-like layer put in place of a Linear after a model is built or patched: base(x) + up(down(x)), exposing
    the base's weight and bias as peft's layers do (fused ops reading that weight would miss the update); seeded,
    on the base's device and dtype. `merged()` is the one Linear that computes the same."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False, **like)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False, **like)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=g))
            self.up.weight.copy_(0.1 * torch.randn(self.up.weight.shape, generator=g))

    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))

    def merged(self) -> torch.nn.Linear:
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight += self.up.weight @ self.down.weight
        return linear


def nan_alloc(*shape, like, dtype=None) -> torch.Tensor:
    """`vit_kernels.triton.alloc(*shape, like, dtype=None)` that fills the buffer with NaN instead of leaving it
    empty: monkeypatched in (there, the one allocator of every Triton launcher), it makes an element a kernel forgets
    to write (a tail row, a masked column) fail the test."""
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def attention_reference(q, k, v, dout, scale):
    """float64 out, lse and (dq, dk, dv) of attention, on exactly the values the kernel sees (any backend)."""
    from vit_kernels import reference

    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = reference.attention(qd, kd, vd, scale)
    out.backward(dout.double())
    lse = torch.logsumexp(qd.detach() @ kd.detach().transpose(-2, -1) * scale, dim=-1)
    return out.detach(), lse, (qd.grad, kd.grad, vd.grad)


def flash_order_grads(q, k, v, dout, scale, round_to=None):
    """(dq, dk) of attention in float64, in a flash kernel's order: delta = rowsum(dO * O) beside dP = dO V^T, then
    dS = P (dP - delta); P and dS rounded to `round_to` before their GEMMs, as 16-bit kernels feed them to the
    tensor cores. A model of the kernel's own rounding, for tolerances where the autograd reference (which takes
    delta = sum(P dP), exact at N=1) has none: run under `tf32_model`, it leaves the tf32 rounding of dO and V in
    dP - delta that a tf32 kernel leaves in dq and dk at N=1, where their exact value is 0."""
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    rounded = (lambda t: t.to(round_to).double()) if round_to is not None else (lambda t: t)
    p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    delta = (dout * (rounded(p) @ v)).sum(-1, keepdim=True)
    ds = rounded(p * (dout @ v.transpose(-2, -1) - delta))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale


# ----------------------------------------------------------------------------------------------------
# tf32: what the tensor cores do with fp32 operands, and the tolerance that follows from it
# ----------------------------------------------------------------------------------------------------
def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to tf32 (1 + 8 + 10 bits) the way a tensor core reads an fp32 register: the 13 low mantissa bits
    dropped (truncation toward zero). Triton 3.6 hands fp32 registers to `mma.sync ... .tf32` (sm_80) and
    `wgmma ... .tf32` (sm_90) as they are, with no `cvt.rna.tf32.f32` before them (checked by compiling a
    tl.dot(input_precision="tf32") for both targets), so the mma reads the raw bits. Truncation is the worse of
    the two possible readings (round-to-nearest halves the error), so a GPU that rounds passes a tolerance set
    from this model too. Returns t's dtype (float64 stays float64, holding tf32 values)."""
    bits = t.detach().float().contiguous().view(torch.int32) & ~0x1FFF
    return bits.view(torch.float32).to(t.dtype).reshape(t.shape)


class _Tf32Gemms(TorchDispatchMode):
    """Every GEMM aten runs (forward and autograd's backward) sees its operands rounded to tf32; products and sums
    stay in the inputs' dtype (float64 here): the model of a tf32 tensor core with an exact accumulator."""

    _GEMMS = {"mm", "bmm", "matmul", "dot", "mv"}
    _ADD_GEMMS = {"addmm", "baddbmm", "addbmm", "addmv"}  # their first argument is added, not multiplied

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self._GEMMS or name in self._ADD_GEMMS:
            first = 1 if name in self._ADD_GEMMS else 0
            args = tuple(
                tf32_round(a) if (i >= first and isinstance(a, torch.Tensor) and a.is_floating_point()) else a
                for i, a in enumerate(args)
            )
        return func(*args, **kwargs)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def tf32_model(fn, *args, **kwargs):
    """fn(*args, **kwargs), autograd included, with every GEMM operand rounded to tf32 (see `_Tf32Gemms`).

    Runs on CPU copies of the tensor arguments (results on CPU): the dispatch mode is thread-local, and on CPU the
    backward GEMMs run on this thread too, so they are rounded whatever device the test uses."""
    with _Tf32Gemms():
        return fn(*_to_cpu(args), **{k: _to_cpu(v) for k, v in kwargs.items()})


def tf32_tolerance(model: torch.Tensor, ref: torch.Tensor) -> float:
    """Tolerance of a tf32 kernel output whose float64 reference is `ref`: TF32_FACTOR times the error of the
    tf32-modelled computation `model` (`tf32_model`) against `ref`, floored at the fp32 tolerance.

    A fixed number would be wrong both ways: the interpreter used to compute tf32 dots in full fp32 (~1e-7, where
    any bug below 1e-3 hid), and a GPU truncating to tf32 reaches 1.5-2e-3 on the MLP gradients and attention's
    dq / dk (errors grow with the reduction length and with cancellation in dS = P (dP - delta))."""
    return max(TOLERANCES[torch.float32], TF32_FACTOR * rel_error(model.to(ref.device), ref))


def import_timm():
    """(timm, None), or (None, why) where timm cannot be imported here."""
    try:
        import timm

        return timm, None
    except Exception as exc:  # not installed, or a torchvision that does not import beside this torch
        return None, f"needs timm and torchvision (the timm CI environment): {type(exc).__name__}: {exc}"


def skip_unless_runs(backend: str, device: torch.device | str = DEVICE) -> None:
    """Skip, with the reason, where `backend` cannot run on `device` here (a CUDA device needs a real one)."""
    from vit_kernels import dispatch  # here, not at the top: TRITON_INTERPRET must be set first

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    why = dispatch.device_unavailable_reason(backend, device)
    if why:
        pytest.skip(f"{backend} cannot run on {device} here: {why}")


@contextmanager
def counting_fused_ops(monkeypatch, names=("fused_qkv", "attention", "gelu_mlp")):
    """The vit_kernels ops `names` (default vk.fused_qkv / vk.attention / vk.gelu_mlp) wrapped to count their calls
    (the patched forwards look them up on the vit_kernels module at call time): with backend="torch" equal outputs
    cannot show that a patch is in use, the counts can. Yields the counts dict, by op name."""
    import vit_kernels as vk  # here, not at the top: TRITON_INTERPRET must be set before the kernels are defined

    counts = dict.fromkeys(names, 0)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        for name in counts:
            m.setattr(vk, name, counted(name, getattr(vk, name)))
        yield counts


class TritonLaunchSpy:
    """Stands in for a `@triton.jit` kernel launched from Python: `kernel[grid](*args, **kwargs)` appends
    `record(name, grid, args, kwargs)` to `log`, then launches the real kernel (with `kernel=None` it only records).
    Any other attribute is the kernel's."""

    def __init__(self, name, kernel, log, record):
        self.name, self.kernel, self.log, self.record = name, kernel, log, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.record(self.name, grid, args, kwargs))
            if self.kernel is not None:
                return self.kernel[grid](*args, **kwargs)

        return launch

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


def spy_triton_launches(monkeypatch, modules, record, *, names=None, launch=True) -> list:
    """Swap a TritonLaunchSpy, sharing one log (returned, empty), for each kernel of `modules` that Python launches:
    the module-level JITFunctions named *_kernel (`@triton.jit` helpers are looked up in the module namespace
    when a kernel compiles and must stay JITFunctions), or the `names` given. `launch=False`: record only."""
    log, found = [], set()
    for module in modules:
        spied = [
            name
            for name, value in vars(module).items()
            if (name in names if names is not None else name.endswith("_kernel") and hasattr(value, "arg_names"))
        ]
        assert spied, f"no kernel to spy on in {module.__name__}"  # a renamed kernel must not empty the test
        for name in spied:
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, TritonLaunchSpy(name, kernel if launch else None, log, record))
        found.update(spied)
    assert names is None or found == set(names), f"not found: {set(names) - found}"
    return log


# ----------------------------------------------------------------------------------------------------
# static checks: a kernel file's compile_report, compiled for a GPU target without a GPU
# ----------------------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Largest shared memory per block: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}


def ptxas_available() -> bool:
    """Whether Triton's NVIDIA backend (its bundled ptxas) is here to compile for sm_80 / sm_90."""
    try:
        from vit_kernels.triton import static_check

        return os.path.exists(static_check.ptxas_path(80))
    except Exception:
        return False


def compile_report_rows(script: str, arch: int) -> list:
    """The JSON list `script` prints last, run as `python -c script <arch>` in a fresh process without
    TRITON_INTERPRET: interpreted @jit functions cannot be compiled."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(arch)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# the interpreter, made to compute like the GPU
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="session")
def _interpreter_bf16_like_the_gpu():
    """Make Triton 3.6's interpreter treat bf16 and tf32 as the GPU does (numpy has no bf16, and it shows):
    - dot: it multiplies bf16 operands as their raw uint16 bit patterns; upcast them to fp32 first, which is
      what the tensor cores do (exact products, fp32 accumulation);
    - dot with input_precision="tf32": it ignores the precision and multiplies fp32 exactly; round fp32
      operands to tf32 first (`tf32_round`), so that tf32 tests see a tensor core's error here too, and a launch
      given "tf32" where "ieee" was asked for fails an fp32 tolerance;
    - fp32 -> bf16 casts: it truncates where compiled kernels round to nearest even, a bias that adds up
      coherently over sums (bias gradients, dW).
    Only the interpreter is patched; compiled kernels never see this."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        original_dot, original_cast = builder.create_dot, builder.cast_impl
        convert = interpreter._convert_float
        tf32 = interpreter._ir.INPUT_PRECISION.TF32
    except (ImportError, AttributeError):  # no triton, or an interpreter without these code paths
        yield
        return

    def create_dot(self, a, b, d, input_precision, *args, **kwargs):
        def up(x):
            if x.dtype.scalar == tl.float32 and input_precision == tf32:
                truncated = np.array(x.data, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
                return interpreter.TensorHandle(truncated.view(np.float32), tl.float32)
            if x.dtype.scalar != tl.bfloat16:
                return x
            return interpreter.TensorHandle(convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

        return original_dot(self, up(a), up(b), d, input_precision, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.array(src.data, dtype=np.float32))  # a copy; keeps 0-d scalars 0-d
            return interpreter.TensorHandle(
                values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16
            )
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    yield
    builder.create_dot, builder.cast_impl = original_dot, original_cast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
