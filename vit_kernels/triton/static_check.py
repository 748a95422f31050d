"""What a compiled Triton kernel costs on a GPU, read without one: registers, spills, shared memory, tensor cores.

Shared by the `compile_report` functions of the Triton op files (and through them benchmarks/kernel_report.py
and the static tests). Compile with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
outside TRITON_INTERPRET, then pass the result to `usage`.

fp32 has two kernels per config: exact "ieee" dots (what PyTorch's default matmul precision, "highest", gives)
and "tf32" tensor-core dots (precision "high" / "medium"). Their registers differ, so both are compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

# Triton's pointer element type of each torch dtype, as a compile signature names it.
TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# fp32's two dot precisions, in the order the reports list them: ieee first, it is PyTorch's default.
FP32_PRECISIONS = ("ieee", "tf32")


def dtype_precisions(dtypes, fp32_precisions=FP32_PRECISIONS):
    """(dtype, allow_tf32) pairs to compile: 16-bit dtypes once, fp32 once per precision in `fp32_precisions`."""
    unknown = set(fp32_precisions) - set(FP32_PRECISIONS)
    if unknown:
        raise ValueError(f"fp32_precisions: {sorted(unknown)} not in {FP32_PRECISIONS}")
    for dtype in dtypes:
        if dtype == torch.float32:
            yield from ((dtype, precision == "tf32") for precision in fp32_precisions)
        else:
            yield dtype, True


def ptxas_path(arch: int) -> str:
    """The ptxas that Triton itself uses for sm_<arch> (bundled with triton's NVIDIA backend)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except ImportError:  # where the helper moved (newer Triton), the knob it read is still there
        from triton import knobs

        return knobs.nvidia.ptxas.path


# ptxas's "wgmma.mma_async instructions are serialized" performance warnings (C7509 / C7510 and their kin): the
# async wgmma pipeline is broken up, e.g. by a register operand that needs a wait or by a call in the loop.
_WGMMA_SERIALIZED = re.compile(r"wgmma\.mma_async instructions are serialized")


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from `ptxas -v` on the PTX (Triton learns n_regs only when loading on a device),
    and how many wgmma-serialisation warnings it printed."""
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas_path(arch), "-v", f"--gpu-name={gpu_name}", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return {
        "n_regs": int(regs.group(1)) if regs else -1,
        "n_spills": spills,
        "wgmma_serialized": len(_WGMMA_SERIALIZED.findall(log)),
    }


_PTX_DEF = re.compile(r"\s*([a-z][\w.]*)\s+(%\w+),\s*([^;]*);")
_PTX_EX2 = re.compile(r"\s*ex2\.approx[\w.]*\s+%\w+,\s*(%\w+);")


def exp2_args_with_fma(ptx: str) -> int:
    """How many `ex2.approx` instructions take an argument that an FMA computes or may compute: an `fma`, or a
    `sub` / `add` of a plain `mul` (ptxas contracts those into one FFMA; `mul.rn` it leaves alone), looking back
    through selp and mov. Attention's backward must round S * scale as its forward did: `S * scale - lse` fused
    into one FMA skips the rounding of the product that the forward keeps, so P disagrees key by key with the
    forward's in the last bits, and dq = sum_j dS_j k_j amplifies that past fp32 tolerance at very negative logits
    (both backends; benchmarks/NOTES.md, attention)."""
    lines = ptx.splitlines()
    defs = {
        m.group(2): (m.group(1), [a.strip() for a in m.group(3).split(",")]) for m in map(_PTX_DEF.match, lines) if m
    }

    def plain_mul(reg: str) -> bool:
        op = defs.get(reg, ("",))[0]
        return op.startswith("mul.") and ".rn" not in op and op.endswith("f32")

    count = 0
    for m in filter(None, map(_PTX_EX2.match, lines)):
        todo, seen = [m.group(1)], set()
        while todo:
            reg = todo.pop()
            if reg in seen or reg not in defs:
                continue
            seen.add(reg)
            op, operands = defs[reg]
            registers = [a for a in operands if a.startswith("%") and not a.startswith("%p")]
            if op.startswith(("selp", "mov")):
                todo += registers
            elif op.startswith("fma") or (op.startswith(("sub.", "add.")) and any(map(plain_mul, registers))):
                count += 1
                break
    return count


def hopper_features(ptx: str) -> dict:
    """What a kernel's PTX says of its sm_90 design: TMA loads (`cp.async.bulk.tensor` global -> shared), the
    Ampere `cp.async` ring (`cp.async.ca` / `.cg`), mbarriers, `setmaxnreg` (warp specialisation that rebalances
    registers between producer and consumer warps) and the N sizes of its wgmma instructions."""
    return {
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::(?:cta|cluster)\.global", ptx)),
        "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::(?:cta|cluster)", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.c[ag]\.", ptx)),
        "mbarrier": "mbarrier." in ptx,
        "setmaxnreg": "setmaxnreg" in ptx,
        "wgmma_n": sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)}),
    }


def usage(compiled, arch: int) -> dict:
    """n_regs, n_spills, wgmma_serialized (ptxas warnings), shared bytes, whether the PTX holds Hopper
    `wgmma.mma_async` or `mma.sync`, `exp2_fma` (`exp2_args_with_fma`) and the `hopper_features`."""
    ptx = compiled.asm["ptx"]
    return {
        **ptxas_usage(ptx, arch),
        "shared": compiled.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma": "mma.sync" in ptx,
        "exp2_fma": exp2_args_with_fma(ptx),
        **hopper_features(ptx),
    }


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int) -> dict:
    """Compile `kernel` for sm_<arch> with the specialisation a launch `kernel[grid](*args, **kwargs)` would get
    (tensors may be meta, TMA descriptors too), and return its `usage`: integer arguments equal to 1 become
    constants, multiples of 16 are marked divisible by 16, pointers 16-byte aligned; kwargs are the constexprs plus
    num_warps and num_stages (3 when absent, Triton's default)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.tensor_descriptor import TensorDescriptor

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages", 3)}
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, (*args, *([None] * len(kwargs))), strict=True)):
        if name in kwargs:
            signature[name] = "constexpr"
        elif isinstance(value, TensorDescriptor):  # a host-built TMA descriptor: typed by dtype and block
            block = ", ".join(map(str, value.block_shape))
            signature[name] = f"tensordesc<{TL_DTYPES[value.base.dtype]}[{block}]>"
        elif isinstance(value, torch.Tensor):
            signature[name] = f"*{TL_DTYPES[value.dtype]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return usage(triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), arch)
