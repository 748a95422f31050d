"""Smoke parity: every op x kernel backend x dtype at two ViT shapes, forward and every gradient, one line per case.

    python benchmarks/smoke_parity.py                 # on a GPU: triton + cuda, bf16/fp16/fp32, B=2 at ViT shapes
    python benchmarks/smoke_parity.py --tiny          # on CPU: triton under the interpreter, tiny shapes (seconds)
    python benchmarks/smoke_parity.py --json rows.json --backends triton --dtypes bf16

The first thing a GPU window runs after the build: each case compiles its kernels (cold Triton cache) and
compares them, on fresh random inputs, against the float64 reference (`vit_kernels.reference`) with the
tests' own definitions (`tests/conftest.py`: `rel_error`, `TOLERANCES`; fp32 runs at PyTorch's default
matmul precision, "highest", so no tf32 allowance). Shapes:
  attention   (B, H, N, D) at N=197 D=64 as views of one packed (B, N, 3, H, D) tensor (what a ViT block
              hands over), and N=257 D=80 contiguous (ViT-H/14)
  fused_qkv   x (B, N, C) with C = H * D for the same two (N, D), gradients arriving as packed views
  gelu_mlp    x (B, N, C), hidden 4C, both biases, exact-erf GELU
Each line gives the largest relative error over the output and every gradient, which tensor it was, the
error of plain PyTorch in the same dtype on the same inputs (what the hardware allows), the tolerance and
the seconds the case took (the first case of each kernel includes its compile). Exit status 1 if any case
fails or errors; a backend that cannot run here is one SKIP line with the reason. `--jobs N` runs the
(op, dtype) groups in N processes at once: on a cold Triton cache the compiles, not the GPU, take the time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tests/conftest.py switches Triton's interpreter on when there is no CUDA device; it must be imported
# before any Triton kernel is defined, i.e. before vit_kernels.
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402
import torch  # noqa: E402

import vit_kernels as vk  # noqa: E402
from vit_kernels import dispatch, reference  # noqa: E402

OPS = ("attention", "fused_qkv", "gelu_mlp")
BACKENDS = ("triton", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (label, B, H, N, D, packed): the two ViT shapes on a GPU; the same layouts at a few tokens for the interpreter.
GPU_SHAPES = (("N=197 D=64 packed", 2, 12, 197, 64, True), ("N=257 D=80", 2, 16, 257, 80, False))
TINY_SHAPES = (("N=17 D=64 packed", 1, 2, 17, 64, True), ("N=9 D=80", 1, 2, 9, 80, False))


def _leaf(*shape, dtype, device, std=1.0):
    # Rounded to dtype first: the float64 reference sees exactly the values the kernel sees.
    return (torch.randn(*shape, device=device) * std).to(dtype).requires_grad_(True)


def attention_case(B, H, N, D, packed, dtype, device):
    """(leaves, run(backend) -> outputs, douts)."""
    if packed:
        qkv = _leaf(B, N, 3, H, D, dtype=dtype, device=device)
        leaves = (qkv,)

        def views():
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        leaves = tuple(_leaf(B, H, N, D, dtype=dtype, device=device) for _ in range(3))

        def views():
            return leaves

    def run(backend, cast=None):
        q, k, v = (t if cast is None else t.to(cast) for t in views())
        if backend == "reference":
            return (reference.attention(q, k, v),)
        return (vk.attention(q, k, v, backend=backend),)

    douts = (torch.randn(B, H, N, D, device=device).to(dtype),)
    return leaves, run, douts


def qkv_case(B, H, N, D, packed, dtype, device):
    C = H * D
    x = _leaf(B, N, C, dtype=dtype, device=device)
    w = _leaf(3 * C, C, dtype=dtype, device=device, std=C**-0.5)
    b = _leaf(3 * C, dtype=dtype, device=device, std=0.1)

    def run(backend, cast=None):
        args = (x, w, b) if cast is None else (x.to(cast), w.to(cast), b.to(cast))
        if backend == "reference":
            return tuple(reference.fused_qkv(*args, H))
        return tuple(vk.fused_qkv(*args, H, backend=backend))

    if packed:  # dq, dk, dv as attention's backward hands them over: views of one (B, N, 3, H, D) gradient
        douts = tuple(torch.randn(B, N, 3, H, D, device=device).to(dtype).permute(2, 0, 3, 1, 4).unbind(0))
    else:
        douts = tuple(torch.randn(B, H, N, D, device=device).to(dtype) for _ in range(3))
    return (x, w, b), run, douts


def mlp_case(B, H, N, D, packed, dtype, device):
    C = H * D
    hidden = 4 * C
    x = _leaf(B, N, C, dtype=dtype, device=device)
    w1 = _leaf(hidden, C, dtype=dtype, device=device, std=C**-0.5)
    b1 = _leaf(hidden, dtype=dtype, device=device, std=0.1)
    w2 = _leaf(C, hidden, dtype=dtype, device=device, std=hidden**-0.5)
    b2 = _leaf(C, dtype=dtype, device=device, std=0.1)

    def run(backend, cast=None):
        args = (x, w1, b1, w2, b2) if cast is None else tuple(t.to(cast) for t in (x, w1, b1, w2, b2))
        if backend == "reference":
            return (reference.gelu_mlp(*args),)
        return (vk.gelu_mlp(*args, backend=backend),)

    return (x, w1, b1, w2, b2), run, (torch.randn(B, N, C, device=device).to(dtype),)


CASES = {"attention": attention_case, "fused_qkv": qkv_case, "gelu_mlp": mlp_case}
LEAF_NAMES = {
    "attention": {True: ("qkv",), False: ("q", "k", "v")},
    "fused_qkv": {True: ("x", "w", "b"), False: ("x", "w", "b")},
    "gelu_mlp": {True: ("x", "w1", "b1", "w2", "b2"), False: ("x", "w1", "b1", "w2", "b2")},
}


def _outputs_and_grads(run, backend, leaves, douts, cast=None):
    outs = run(backend, cast)
    grads = torch.autograd.grad(outs, leaves, [d if cast is None else d.to(cast) for d in douts])
    return [o.detach() for o in outs], [g.detach() for g in grads]


def check_case(op, backend, dtype_name, shape, device) -> dict:
    """One case: the backend's outputs and gradients against float64, plus PyTorch's own error in the same dtype."""
    label, B, H, N, D, packed = shape
    dtype = DTYPES[dtype_name]
    leaves, run, douts = CASES[op](B, H, N, D, packed, dtype, device)
    out_names = ("out",) if len(douts) == 1 else ("q", "k", "v")
    names = [*out_names, *(f"d{n}" for n in LEAF_NAMES[op][packed])]

    ref = _outputs_and_grads(run, "reference", leaves, douts, cast=torch.float64)
    start = time.perf_counter()
    got = _outputs_and_grads(run, backend, leaves, douts)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    same_dtype = _outputs_and_grads(run, "reference", leaves, douts)

    flat_ref, flat_got, flat_torch = (a + b for a, b in (ref, got, same_dtype))
    errors = {n: conftest.rel_error(g, r) for n, g, r in zip(names, flat_got, flat_ref, strict=True)}
    torch_errors = [conftest.rel_error(t, r) for t, r in zip(flat_torch, flat_ref, strict=True)]
    worst = max(errors, key=errors.get)
    tol = conftest.TOLERANCES[dtype]
    return {
        "op": op,
        "backend": backend,
        "dtype": dtype_name,
        "shape": label,
        "B": B,
        "H": H,
        "N": N,
        "D": D,
        "status": "PASS" if errors[worst] <= tol else "FAIL",  # inf (NaN anywhere) never passes
        "max_err": errors[worst],
        "worst": worst,
        "torch_err": max(torch_errors),
        "tol": tol,
        "seconds": seconds,
        "errors": errors,
    }


def line(row: dict) -> str:
    where = f"{row['op']:<9} {row['backend']:<6} {row['dtype']:<4} {row['shape']:<18}"
    if row["status"] in ("SKIP", "ERROR"):
        return f"{where} {row['status']}: {row['reason']}"
    return (
        f"{where} {row['status']}  max err {row['max_err']:.2e} ({row['worst']})  torch {row['dtype']} "
        f"{row['torch_err']:.2e}  tol {row['tol']:.0e}  {row['seconds']:.1f} s"
    )


def print_row(row: dict) -> None:
    # One write call per line: --jobs' processes share our stdout, and print() writes the text and its newline in two
    # calls, so another process's line could land between them (CI saw "... 0.2 sattention triton ...").
    sys.stdout.write(line(row) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="a few tokens, batch 1 (the interpreter on CPU runs this)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--json", type=Path, help="write every case as a JSON row here")
    p.add_argument(
        "--jobs", type=int, default=1,
        help="processes, one per (op, dtype) at a time: Triton compiles one kernel at a time per process, so on a "
        "cold cache N processes compile N at once (gpu_check uses 9)",
    )  # fmt: skip
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one of --jobs' processes: cases only
    args = p.parse_args(argv)
    ops, backends, dtypes = (s.split(",") for s in (args.ops, args.backends, args.dtypes))
    for name, got, allowed in (("--ops", ops, OPS), ("--backends", backends, BACKENDS), ("--dtypes", dtypes, DTYPES)):
        if set(got) - set(allowed):
            p.error(f"{name}: {sorted(set(got) - set(allowed))} not in {list(allowed)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = TINY_SHAPES if args.tiny or device == "cpu" else GPU_SHAPES
    if not args.child:
        print(f"smoke parity on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
              f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}), matmul precision "
              f"{torch.get_float32_matmul_precision()}", flush=True)  # fmt: skip

    # Under the interpreter, bf16 is patched to behave as on the GPU: the tests' own session fixture.
    interp = contextlib.contextmanager(conftest._interpreter_bf16_like_the_gpu.__wrapped__)
    rows = []
    if args.jobs > 1:
        return run_parallel(args, ops, backends, dtypes, device)
    with interp():
        for backend in backends:
            reason = dispatch.device_unavailable_reason(backend, torch.device(device))
            if reason:
                rows.append({"op": "*", "backend": backend, "dtype": "*", "shape": "*"})
                rows[-1].update(status="SKIP", reason=reason)
                print_row(rows[-1])
                continue
            for op in ops:
                for dtype_name in dtypes:
                    for shape in shapes:
                        torch.manual_seed(len(rows))
                        try:
                            row = check_case(op, backend, dtype_name, shape, device)
                        except Exception as exc:  # one broken case must not hide the others
                            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                            row = {"op": op, "backend": backend, "dtype": dtype_name, "shape": shape[0]}
                            row.update(status="ERROR", reason=reason)
                            traceback.print_exc(file=sys.stderr)
                        rows.append(row)
                        print_row(row)
    return summarize(rows, args.json, quiet=args.child)


def summarize(rows: list[dict], json_path: Path | None, quiet: bool = False) -> int:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    if not quiet:
        print("smoke parity: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=1))
    return 1 if counts["FAIL"] or counts["ERROR"] else 0


def run_parallel(args, ops, backends, dtypes, device) -> int:
    """One child process per (op, dtype), `args.jobs` at a time, printing their case lines as they finish
    (interleaved; each line names its case); the rows are merged at the end."""
    rows, runnable = [], []
    for backend in backends:
        reason = dispatch.device_unavailable_reason(backend, torch.device(device))
        if reason:
            rows.append({"op": "*", "backend": backend, "dtype": "*", "shape": "*", "status": "SKIP"})
            rows[-1]["reason"] = reason
            print_row(rows[-1])
        else:
            runnable.append(backend)
    if not runnable:
        return summarize(rows, args.json)
    with tempfile.TemporaryDirectory() as tmp:
        todo = [(op, d) for op in ops for d in dtypes]
        running: list[tuple[subprocess.Popen, Path, str]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                op, dtype_name = todo.pop(0)
                out = Path(tmp) / f"{op}-{dtype_name}.json"
                cmd = [sys.executable, __file__, "--ops", op, "--dtypes", dtype_name, "--backends", ",".join(runnable),
                       "--json", str(out), "--child", *(["--tiny"] if args.tiny else [])]  # fmt: skip
                # Children write their case lines straight to our stdout, so a kill loses none of them.
                running.append((subprocess.Popen(cmd), out, f"{op} {dtype_name}"))
            for child, out, what in list(running):
                if child.poll() is None:
                    continue
                running.remove((child, out, what))
                if out.exists():
                    rows += json.loads(out.read_text())
                else:
                    op, dtype_name = what.split()
                    rows.append({"op": op, "backend": ",".join(runnable), "dtype": dtype_name, "shape": "*"})
                    rows[-1].update(status="ERROR", reason=f"its process exited {child.returncode} before writing rows")
                    print_row(rows[-1])
            time.sleep(0.2)
    return summarize(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
