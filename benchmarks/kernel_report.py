"""Static resource report of every shipped kernel, without a GPU: registers, shared memory, spills/local
memory and tensor-core instructions, for sm_80 and sm_90a.

    python benchmarks/kernel_report.py            # table on stdout; exit 1 if a hot kernel spills
    python benchmarks/kernel_report.py --json out.json

CUDA C++: every kernel in the built extension vit_kernels/_C*.so, read with `cuobjdump
--dump-resource-usage` (REG, STACK, SHARED, LOCAL per function per arch) and `cuobjdump -sass`
(HMMA / HGMMA tensor-core instructions, UTMALDG / UTMASTG TMA loads and stores, LDL / STL local-memory accesses).
The sm_90a CUTLASS GEMMs (csrc/gemm_sm90_impl.cuh) get readable names, their dynamic shared memory and stages from
_C.sm90_gemm_kernels(), and a tiles-and-waves table per ViT-B/16 product; one without HGMMA or UTMALDG fails.
Triton: `compile_report(arch)` of vit_kernels.triton.attention, .linear, .block and .tma_gemm (the Hopper GEMMs:
sm_90 only), which compile every shipped config for sm_80 / sm_90; run in a subprocess without TRITON_INTERPRET
(interpreted kernels cannot be compiled). For the Hopper GEMMs the report adds what proves their design (TMA loads,
no cp.async ring, wgmma N, ptxas wgmma-serialisation warnings, setmaxnreg) and a wave table per product: output
tiles, K slices, work units, persistent programs, CTAs per SM from registers and shared memory, waves.

Triton's fp32 kernels are compiled once per dot precision, "ieee" (exact fp32 on FMA units: what PyTorch's
default matmul precision "highest" gives) and "tf32" (tensor cores); the dtype column says which.

A hot kernel is a CUDA fp16/bf16 attention or GEMM kernel, or any shipped Triton kernel (the static tests
require 0 spills of every one, fp32 of both precisions included); if one spills or touches local memory the
report exits 1. Anything that cannot be inspected here (no extension, no cuobjdump, no
compile_report yet) is listed as skipped with the reason, and does not fail the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = {"sm_80": 80, "sm_90a": 90}
TRITON_MODULES = (
    "vit_kernels.triton.attention", "vit_kernels.triton.linear", "vit_kernels.triton.block",
    "vit_kernels.triton.tma_gemm",
)  # fmt: skip
# The Hopper facts of a compile_report row (static_check.hopper_features and tma_gemm's wave table), when it has them.
HOPPER_FIELDS = ("tma_loads", "cp_async", "wgmma_n", "wgmma_serialized", "setmaxnreg")
WAVE_FIELDS = ("tiles", "splits", "units", "programs", "ctas_per_sm", "waves")
TRITON_TIMEOUT_S = 300  # cold cache: fp32 compiles twice (ieee and tf32)


# ----------------------------------------------------------------------------------------------------
# CUDA C++: cuobjdump on the built extension
# ----------------------------------------------------------------------------------------------------
def find_extension() -> tuple[Path | None, str | None]:
    spec = importlib.util.find_spec("vit_kernels")
    pkg_dir = Path(spec.origin).parent if spec and spec.origin else ROOT / "vit_kernels"
    found = sorted(pkg_dir.glob("_C*.so"))
    if not found:
        return None, f"vit_kernels/_C*.so is not built in {pkg_dir} (pip install -e . with nvcc present)"
    return found[0], None


def find_cuobjdump() -> tuple[str | None, str | None]:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in candidates:
        if home and (Path(home) / "bin" / "cuobjdump").is_file():
            return str(Path(home) / "bin" / "cuobjdump"), None
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump"), None
    # Triton wheels bundle one (CUDA 12.8 as of triton 3.6); it reads sm_80 / sm_90 cubins fine.
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled), None
    return None, "cuobjdump not found (CUDA_HOME, /usr/local/cuda/bin, PATH, triton's bundled copy)"


def _arch_blocks(text: str):
    """Yield (arch, lines) for each 'Fatbin elf code' block of cuobjdump output (PTX blocks skipped)."""
    arch, kind, lines = None, None, []
    for line in text.splitlines():
        if line.startswith("Fatbin "):
            if kind == "elf" and arch:
                yield arch, lines
            kind, arch, lines = ("elf" if "elf" in line else "ptx"), None, []
        elif line.startswith("arch = ") and arch is None:
            arch = line.split("=", 1)[1].strip()
        else:
            lines.append(line)
    if kind == "elf" and arch:
        yield arch, lines


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict]:
    """{(arch, mangled name): {REG, STACK, SHARED, LOCAL, ...}} from --dump-resource-usage."""
    out = {}
    for arch, lines in _arch_blocks(text):
        name = None
        for line in lines:
            m = re.match(r"\s*Function (\S+):\s*$", line)
            if m:
                name = m.group(1)
            elif name and "REG:" in line:
                out[(arch, name)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
                name = None
    return out


def parse_sass(text: str) -> dict[tuple[str, str], dict]:
    """{(arch, mangled name): {hmma, hgmma, utmaldg, utmastg, local_ld_st}} instruction counts from -sass
    (UTMALDG / UTMASTG: TMA loads and stores)."""
    out = {}
    for arch, lines in _arch_blocks(text):
        current = None
        for line in lines:
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                zero = {"hmma": 0, "hgmma": 0, "utmaldg": 0, "utmastg": 0, "local_ld_st": 0}
                current = out.setdefault((arch, m.group(1)), zero)
            elif current is not None and "/*" in line:
                op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
                if not op:
                    continue
                mnemonic = op.group(1).split(".")[0]
                if mnemonic == "HMMA":
                    current["hmma"] += 1
                elif mnemonic == "HGMMA":
                    current["hgmma"] += 1
                elif mnemonic in ("UTMALDG", "UTMASTG"):
                    current[mnemonic.lower()] += 1
                elif mnemonic in ("LDL", "STL"):
                    current["local_ld_st"] += 1
    return out


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=30)
    pretty = res.stdout.splitlines()
    if res.returncode or len(pretty) != len(names):
        return {n: n for n in names}
    return dict(zip(names, pretty, strict=True))


# The CUTLASS kernels of csrc/gemm_sm90_impl.cuh are all cutlass::device_kernel<GemmUniversal<...>>; their fusion
# operation and scheduler (in the mangled name) say which product each is: the first entry whose pieces all appear.
SM90_PRODUCTS = (
    (("LinCombPerColBiasEltActAux",), "linear_bias_gelu"), (("DGeluActColSums",), "dgelu_act"),
    (("LinCombDeEltAct",), "dgelu"),
    (("LinCombPerColBiasEltAct", "4sm904GeluE"), "linear_bias_gelu_act"),
    (("LinCombPerColBiasEltAct",), "linear_bias_residual"), (("LinCombPerColBias",), "linear_bias"),
    (("StreamKScheduler",), "matmul_tn_wgrad"), (("LinearCombination",), "matmul_nn"),
)  # fmt: skip
# In the mangled name the mainloop's dispatch policy is MainloopSm90TmaGmmaWarpSpecialized<stages, cluster shape,
# kernel schedule> and the tile shape follows it; each shape mode is a new cute::C<n> or a back-reference (S..._) to
# one already seen, which in these shapes is always the value just before it.
_SM90_SHAPES = re.compile(
    r"MainloopSm90TmaGmmaWarpSpecialized\w*?ILi\d+EN?S[0-9A-Z]*_IJ(?P<cluster>\w*?)N?S[0-9A-Z]*_\d+"
    r"(?P<schedule>KernelTmaWarpSpecialized(?:Pingpong|Cooperative))EEEN?S[0-9A-Z]*_IJ(?P<tile>\w*?)"
    r"(?:NS_10bfloat16_t|NS_6half_t)"
)
# A mode: cute::C<n> spelt out in full (N4cute1CILi<n>EE), or with its template abbreviated (NS.._ILi<n>EE), or
# a back-reference (S.._ not followed by a template argument list or a name).
_SHAPE_MODE = re.compile(r"1CILi(\d+)EE|N?S[0-9A-Z]*_ILi(\d+)EE|S[0-9A-Z]*_(?![I\d])")


def _shape_modes(mangled_part: str) -> list[int]:
    values: list[int] = []
    for full, short in _SHAPE_MODE.findall(mangled_part):
        values.append(int(full or short) if (full or short) else values[-1])
    return values


def sm90_kernel_name(product: str, dtype: str, tile: str, cluster: str, schedule: str) -> str:
    """'sm90_gemm linear_bias_gelu<bf16> 128x256x64 cluster 2x1' (a ping-pong kernel ends in ' pingpong')."""
    return f"sm90_gemm {product}<{dtype}> {tile} cluster {cluster}" + (" pingpong" if schedule == "pingpong" else "")


def is_cutlass_gemm(mangled: str) -> bool:
    return "GemmUniversal" in mangled and "cutlass" in mangled


def cutlass_name(mangled: str) -> str:
    """`sm90_kernel_name` of a CUTLASS GemmUniversal kernel, read from its mangled name: the string `sm90_facts`
    keys _C's description of that kernel by."""
    product = next((label for keys, label in SM90_PRODUCTS if all(k in mangled for k in keys)), "?")
    dtype = "bf16" if "bfloat16_t" in mangled else "fp16" if "half_t" in mangled else "?"
    shapes = _SM90_SHAPES.search(mangled)
    if shapes is None:
        return f"sm90_gemm {product}<{dtype}> ?"
    tile = "x".join(map(str, _shape_modes(shapes["tile"])))
    cluster = "x".join(map(str, _shape_modes(shapes["cluster"])[:2]))
    schedule = "pingpong" if shapes["schedule"].endswith("Pingpong") else "cooperative"
    return sm90_kernel_name(product, dtype, tile, cluster, schedule)


def sm90_facts() -> dict[str, dict]:
    """{cutlass_name: _C.sm90_gemm_kernels() entry}: stages, dynamic shared memory and threads of each sm_90a GEMM."""
    try:
        from vit_kernels import _C
    except ImportError:
        return {}
    kernels = getattr(_C, "sm90_gemm_kernels", lambda: [])()
    return {
        sm90_kernel_name(k["product"], k["dtype"], k["tile"], k["cluster"], k.get("schedule", "")): k for k in kernels
    }


# Every GEMM of a ViT-B/16 block at 224 px, batch 256 (M = 256 * 197 tokens), as (what, sm90 product, M, N, K).
VIT_B_M = 256 * 197
VIT_B_PRODUCTS = (
    ("qkv fwd", "linear_bias", VIT_B_M, 2304, 768), ("fc1 fwd", "linear_bias_gelu", VIT_B_M, 3072, 768),
    ("fc2 fwd", "linear_bias", VIT_B_M, 768, 3072), ("fc2 + residual", "linear_bias_residual", VIT_B_M, 768, 3072),
    ("proj + residual", "linear_bias_residual", VIT_B_M, 768, 768),
    ("dhidden + act + dfc1_bias partial sums", "dgelu_act", VIT_B_M, 3072, 768),
    ("fc1 dx", "matmul_nn", VIT_B_M, 768, 3072), ("qkv dx", "matmul_nn", VIT_B_M, 768, 2304),
    ("dfc1_weight", "matmul_tn_wgrad", 3072, 768, VIT_B_M), ("dfc2_weight", "matmul_tn_wgrad", 768, 3072, VIT_B_M),
    ("dqkv_weight", "matmul_tn_wgrad", 2304, 768, VIT_B_M),
)  # fmt: skip


def sm90_wave_table(sms: int = 132, tile_m: int = 128, tile_n: int = 256) -> str:
    """Output tiles and waves of the sm_90a GEMMs (one persistent CTA per SM, 2 x 1 clusters) per ViT-B/16 product.
    The weight gradients' few tiles are why they run on stream-K: CUTLASS splits their K = tokens over the SMs."""
    lines = ["| product | sm90 kernel | M | N | K | tiles | waves at 1 tile / SM |", "|---|---|---|---|---|---|---|"]
    for what, kernel, m, n, k in VIT_B_PRODUCTS:
        tiles = -(-m // tile_m) * -(-n // tile_n)
        waves = tiles / sms
        note = " (stream-K splits K)" if kernel == "matmul_tn_wgrad" else ""
        lines.append(f"| {what} | {kernel} | {m} | {n} | {k} | {tiles} | {waves:.2f}{note} |")
    return "\n".join(lines)


def short_name(pretty: str) -> str:
    """'void vk::gemm::gemm_tc_kernel<vk::gemm::TileConfig128x128, __nv_bfloat16, ...>(...)' ->
    'gemm_tc_kernel<TileConfig128x128, bf16, ...>'."""
    s = re.sub(r"^void ", "", pretty)
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    s = s[:cut]
    s = re.sub(r"\b\w+::", "", s)
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def kernel_dtype(name: str) -> str:
    if "bf16" in name or "bfloat16" in name:
        return "bf16"
    if "fp16" in name or "__half" in name:
        return "fp16"
    if re.search(r"\bfloat\b|<f|If", name):
        return "fp32"
    return "?"


def is_hot(kernel: str, dtype: str) -> bool:
    return dtype in ("fp16", "bf16") and bool(re.search(r"gemm|attn|attention|flash|matmul|linear", kernel, re.I))


def cuda_rows(skips: list[str]) -> list[dict]:
    so, why = find_extension()
    if so is None:
        skips.append(f"CUDA kernels: {why}")
        return []
    tool, why = find_cuobjdump()
    if tool is None:
        skips.append(f"CUDA kernels: {why}")
        return []
    usage = subprocess.run([tool, "--dump-resource-usage", str(so)], capture_output=True, text=True, timeout=60)
    if usage.returncode:
        skips.append(f"CUDA kernels: {tool} --dump-resource-usage failed: {usage.stderr.strip()[:200]}")
        return []
    resources = parse_resource_usage(usage.stdout)
    sass = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True, timeout=120)
    instr = parse_sass(sass.stdout) if sass.returncode == 0 else {}
    if sass.returncode:
        skips.append(f"CUDA tensor-core counts: {tool} -sass failed: {sass.stderr.strip()[:200]}")
    pretty = demangle(sorted({name for _, name in resources}))
    facts = sm90_facts()
    rows = []
    for (arch, name), r in sorted(resources.items(), key=lambda kv: (kv[0][0], pretty[kv[0][1]])):
        # cuobjdump names the sm_90a cubin's arch 'sm_90a' in the resource dump; keep what it says.
        kernel = cutlass_name(name) if is_cutlass_gemm(name) else short_name(pretty[name])
        ins = instr.get((arch, name), {})
        dtype = kernel_dtype(kernel)
        tc = [f"{k.upper()} x{v}" for k, v in ins.items() if k in ("hmma", "hgmma") and v]
        tma = [f"{k.upper()} x{v}" for k, v in ins.items() if k in ("utmaldg", "utmastg") and v]
        rows.append({
            "source": "cuda", "kernel": kernel, "arch": arch, "dtype": dtype, "config": "",
            "regs": r.get("REG"), "smem": r.get("SHARED"), "stack": r.get("STACK", 0), "local": r.get("LOCAL", 0),
            "spill_bytes": None, "local_ld_st": ins.get("local_ld_st"),
            "tensor_core": ", ".join(tc) if tc else ("none" if ins else "?"),
            "tma": ", ".join(tma) if tma else ("none" if ins else "?"),
            "hot": is_hot(kernel, dtype), "mangled": name,
        })  # fmt: skip
        fact = facts.get(kernel)
        if fact:  # CUTLASS kernels take their shared memory dynamically: the size comes from their types
            rows[-1]["smem"] = fact["smem_bytes"]
            rows[-1]["config"] = f"stages={fact['stages']} threads={fact['threads']} {fact['scheduler']}"
    return rows


# ----------------------------------------------------------------------------------------------------
# Triton: compile_report(arch) of the kernel modules, in a clean subprocess
# ----------------------------------------------------------------------------------------------------
_CHILD = r"""
import importlib, json, sys
mod_name, arch = sys.argv[1], int(sys.argv[2])
try:
    mod = importlib.import_module(mod_name)
except ImportError as exc:
    print(json.dumps({"skip": f"{mod_name} is not importable ({exc})"})); sys.exit(0)
fn = getattr(mod, "compile_report", None)
if fn is None:
    print(json.dumps({"skip": f"{mod_name} has no compile_report(arch) (yet)"})); sys.exit(0)
print(json.dumps({"rows": fn(arch)}, default=str))
"""


def _compile_report(mod: str, arch_name: str, env: dict) -> tuple[list[dict], str | None]:
    """Rows of `mod.compile_report(arch)` in a fresh interpreter, or ([], why not)."""
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, mod, str(ARCHS[arch_name])],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=TRITON_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return [], f"Triton {mod} {arch_name}: compile_report took over {TRITON_TIMEOUT_S} s"
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    try:
        payload = json.loads(last)
    except json.JSONDecodeError:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return [], f"Triton {mod} {arch_name}: compile_report failed (exit {res.returncode}): {tail[:240]}"
    if "skip" in payload:
        return [], f"Triton {mod}: {payload['skip']}"
    return [triton_row(r, arch_name) for r in payload["rows"]], None


def triton_rows(skips: list[str], archs: list[str], also=None, modules=TRITON_MODULES) -> list[dict]:
    """Rows of every module's compile_report for every arch; `also()` runs meanwhile (the cuobjdump part)."""
    if importlib.util.find_spec("triton") is None:
        skips.append("Triton kernels: triton is not installed")
        return also() if also else []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [(mod, arch) for mod in modules for arch in archs]
    # Compiling is CPU-bound and each (module, arch) is independent: one subprocess per core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = [pool.submit(_compile_report, mod, arch, env) for mod, arch in jobs]
        rows = also() if also else []
        results = [f.result() for f in futures]
    for got, why in results:
        rows += got
        if why and why not in skips:
            skips.append(why)
    return rows


def triton_row(r: dict, arch_name: str) -> dict:
    """Normalise one compile_report dict (keys: kernel, config, n_regs, n_spills, shared, and either
    tensor_core or the booleans wgmma / mma) into a report row."""
    kernel = str(r.get("kernel") or r.get("name"))
    shape = ", ".join(f"{k}={r[k]}" for k in ("M", "N", "K", "D") if k in r)
    dtype = str(r.get("dtype", "?")).replace("torch.", "").replace("float16", "fp16").replace("bfloat16", "bf16")
    dtype = dtype.replace("float32", "fp32")
    # fp32 is compiled once per dot precision: "ieee" (exact, FMA; PyTorch's default matmul precision) and "tf32".
    if r.get("precision"):
        dtype = f"{dtype} {r['precision']}"
    if "tensor_core" in r:
        tc = str(r["tensor_core"])
    else:
        tc = ", ".join(k for k, label in (("wgmma", "wgmma"), ("mma", "mma.sync")) if r.get(k)) or "none"
        tc = tc.replace("mma", "mma.sync") if tc == "mma" else tc
    config = r.get("config", "")
    if isinstance(config, dict):
        config = " ".join(f"{k}={v}" for k, v in config.items())
    spills = r.get("n_spills")
    if r.get("entry"):
        kernel = f"{kernel} [{r['entry']}]"
    row = {
        "source": "triton", "kernel": f"{kernel} ({shape})" if shape else kernel, "arch": arch_name, "dtype": dtype,
        "config": config, "regs": r.get("n_regs"), "smem": r.get("shared"), "stack": None, "local": None,
        "spill_bytes": spills, "local_ld_st": None, "tensor_core": tc, "hot": True,
    }  # fmt: skip
    row.update({k: r[k] for k in (*HOPPER_FIELDS, *WAVE_FIELDS) if k in r and r.get("entry")})
    return row


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
def violations(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        if "tma_loads" in r:  # a Hopper GEMM: TMA-fed, no cp.async ring, wgmma not serialised
            missing = [what for what, ok in (("no TMA loads", r["tma_loads"] > 0), ("cp.async", r["cp_async"] == 0),
                                             ("wgmma serialised", r["wgmma_serialized"] == 0)) if not ok]  # fmt: skip
            if missing:
                bad.append(f"{r['source']} {r['kernel']} [{r['arch']}, {r['dtype']}]: {', '.join(missing)}")
        if r["source"] == "cuda" and is_cutlass_gemm(r.get("mangled", "")):  # the sm_90a GEMMs: wgmma fed by TMA
            checks = (("no HGMMA", "tensor_core", "HGMMA"), ("no TMA loads", "tma", "UTMALDG"))
            missing = [what for what, key, tag in checks if tag not in str(r.get(key))]
            if missing:
                bad.append(f"cuda {r['kernel']} [{r['arch']}]: {', '.join(missing)}")
        if not r["hot"]:
            continue
        spilled = [f"{k}={r[k]}" for k in ("spill_bytes", "local", "stack", "local_ld_st") if r.get(k)]
        if spilled:
            bad.append(f"{r['source']} {r['kernel']} [{r['arch']}, {r['dtype']}]: {', '.join(spilled)}")
    return bad


def table(rows: list[dict]) -> str:
    cols = [("src", "source"), ("kernel", "kernel"), ("arch", "arch"), ("dtype", "dtype"), ("config", "config"),
            ("regs", "regs"), ("smem B", "smem"), ("spill B", "spill_bytes"), ("local B", "local"),
            ("stack B", "stack"), ("LDL/STL", "local_ld_st"), ("tensor-core instr", "tensor_core"),
            ("TMA", "tma"), ("hot", "hot")]  # fmt: skip

    def cell(v):
        return "-" if v is None or v == "" else ("yes" if v is True else "" if v is False else str(v))

    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for _, k in cols) + " |" for r in rows]
    return "\n".join(lines)


def wave_table(rows: list[dict]) -> str:
    """The Hopper GEMMs' design facts and waves, one line per product (rows from tma_gemm's compile_report)."""
    cols = [("kernel", "kernel"), ("dtype", "dtype"), ("TMA loads", "tma_loads"), ("cp.async", "cp_async"),
            ("wgmma N", "wgmma_n"), ("serialised", "wgmma_serialized"), ("setmaxnreg", "setmaxnreg"),
            ("tiles", "tiles"), ("K slices", "splits"), ("units", "units"), ("programs", "programs"),
            ("CTAs/SM", "ctas_per_sm"), ("waves", "waves")]  # fmt: skip

    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else ("yes" if v is True else "no" if v is False else str(v))

    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for _, k in cols) + " |" for r in rows if "waves" in r]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", type=Path, help="also write the rows, skips and violations here")
    p.add_argument("--no-triton", action="store_true", help="CUDA kernels only (the Triton compile takes longest)")
    p.add_argument("--arch", choices=list(ARCHS), action="append", help="Triton archs to compile (default: all)")
    args = p.parse_args(argv)
    skips: list[str] = []
    if args.no_triton:
        skips.append("Triton kernels: not requested (--no-triton)")
        rows = cuda_rows(skips)
    else:
        # Triton compiles first in the final order, but the CUDA rows are gathered while it runs.
        cuda: list[dict] = []
        triton = triton_rows(skips, args.arch or list(ARCHS), also=lambda: cuda.extend(cuda_rows(skips)) or [])
        rows = cuda + triton
    bad = violations(rows)
    print("## kernel_report: static resource usage per kernel (no GPU needed)\n")
    print(table(rows) if rows else "(no kernels could be inspected here, reasons below)")
    if any("waves" in r for r in rows):
        print("\n### Hopper GEMMs (tma_gemm.py): design and waves, ViT-B/16 224 px, batch 256, 132 SMs\n")
        print(wave_table(rows))
    if any(r["source"] == "cuda" and is_cutlass_gemm(r.get("mangled", "")) for r in rows):
        print("\n### sm_90a GEMMs (CUTLASS, csrc/gemm_sm90_impl.cuh): tiles and waves, ViT-B/16 224 px, batch 256\n")
        print(sm90_wave_table())
    n_cuda = sum(r["source"] == "cuda" for r in rows)
    print(
        f"\n{n_cuda} CUDA kernel rows, {len(rows) - n_cuda} Triton kernel rows. smem B: for CUDA, static shared memory "
        "only (dynamic shared memory is sized at launch, invisible to cuobjdump), except the sm_90a CUTLASS GEMMs, "
        "whose size _C.sm90_gemm_kernels() reads from their types; for Triton, what the config needs."
    )
    for s in skips:
        print(f"- skipped {s}")
    for b in bad:
        print(f"- FAIL hot kernel spills or uses local memory: {b}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "skipped": skips, "violations": bad}, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
