"""The CUDA extension: built for sm_80 and sm_90a where nvcc exists, importable without a GPU, clear errors."""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vit_kernels as vk
from vit_kernels.triton.static_check import exp2_args_with_fma

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
NVCC_HERE = NVCC is not None


def _extension():
    try:
        from vit_kernels import _C
    except ImportError as exc:
        if NVCC_HERE and os.environ.get("VIT_KERNELS_BUILD_CUDA") == "1":
            raise AssertionError(f"nvcc is here and VIT_KERNELS_BUILD_CUDA=1, but _C did not import: {exc}") from exc
        pytest.skip(f"vit_kernels._C not built here ({exc})")
    return _C


def test_build_info_reports_archs_and_versions():
    _C = _extension()
    info = _C.build_info()
    assert info["archs"] == "80 90a"
    assert info["cuda_version"] >= 12000
    assert "-O3" in info["cuda_flags"]
    assert vk.build_info()["cuda_extension"] == info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path, on a machine without a GPU")
def test_runtime_without_driver_raises_clear_error():
    _C = _extension()
    with pytest.raises(RuntimeError, match=r"cudaGetDeviceCount failed: CUDA error \d+"):
        _C.device_count()


def test_build_info_lists_what_runs_here():
    info = vk.build_info()
    assert info["available_backends"] == vk.available_backends()
    assert info["torch"] == torch.__version__


@pytest.mark.skipif(not NVCC_HERE, reason="needs nvcc: compiles csrc/attention_{fwd,bwd}.cu to PTX")
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_cuda_attention_exp2_arguments_are_rounded_products(tmp_path, arch):
    """No exp2 argument in csrc/attention_fwd.cu or attention_bwd.cu is, or may be contracted into, an FMA
    (static_check.exp2_args_with_fma): the backward must round each logit as the forward does. The H100 measured fp32
    dq at 4.4e-4 instead of ~1e-5 at logits ~ -144 while S * scale - lse could fuse."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    gencode = f"-gencode=arch=compute_{arch},code=compute_{arch}"
    kernels = []  # (body, name) per kernel
    for unit in ("attention_fwd", "attention_bwd"):
        ptx = tmp_path / f"{unit}.ptx"
        cmd = [NVCC, "-O3", "--expt-relaxed-constexpr", gencode, "-ptx", str(csrc / f"{unit}.cu"), "-o", str(ptx)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        found = re.findall(r"(\.entry (\w+)\(.*?\n\}\n)", ptx.read_text(), re.S)
        assert found, f"no kernel in the PTX of csrc/{unit}.cu"
        kernels += found
    assert len(kernels) > 20, "expected every attention kernel instantiation in the PTX"
    fused = {name: n for body, name in kernels if (n := exp2_args_with_fma(body))}
    assert not fused, f"exp2 arguments an FMA computes or may compute: {fused}"


# ----------------------------------------------------------------------------------------------------
# the Hopper GEMMs (csrc/gemm_sm90_*.cu, CUTLASS 3 collectives): built for sm_90a where CUTLASS's headers were found
# ----------------------------------------------------------------------------------------------------
# the products of gemm_sm90.h
SM90_PRODUCTS = {"linear_bias", "linear_bias_residual", "linear_bias_gelu", "linear_bias_gelu_act", "dgelu",
                 "dgelu_act", "matmul_nn", "matmul_tn_wgrad"}  # fmt: skip
SM90_DTYPES = 2  # fp16, bf16
# linear_bias in bf16 (gemm_sm90_variants.cu)
SM90_VARIANTS = {"cooperative_cluster1x1", "pingpong_128x128", "cooperative_256x128_cluster1x2"}
SM90_KERNELS = len(SM90_PRODUCTS) * SM90_DTYPES + len(SM90_VARIANTS)


def _sm90_extension():
    _C = _extension()
    info = _C.build_info()
    if not info.get("sm90_gemm_built"):
        pytest.skip(f"this _C has no sm_90a GEMMs: {info.get('sm90_gemm')}")
    return _C


def _kernel_report():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_info_says_whether_the_sm90_gemms_were_built():
    info = _extension().build_info()
    assert isinstance(info["sm90_gemm_built"], bool)
    if info["sm90_gemm_built"]:
        assert info["sm90_gemm"].startswith("CUTLASS 4.2.0 ("), info["sm90_gemm"]
    else:
        assert info["sm90_gemm"].startswith("not built: "), info["sm90_gemm"]


def _cuobjdump(*args: str):
    """(benchmarks/kernel_report.py as a module, cuobjdump's output with `args` on the _C of a build with the sm_90a
    GEMMs); skips where there is no such build or no cuobjdump."""
    _sm90_extension()
    report = _kernel_report()
    tool, why = report.find_cuobjdump()
    if tool is None:
        pytest.skip(why)
    so, _ = report.find_extension()
    res = subprocess.run([tool, *args, str(so)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[:400]
    return report, res.stdout


def test_sm90_gemm_sass_has_wgmma_and_tma():
    """Every CUTLASS GEMM in _C's sm_90a cubin issues HGMMA (wgmma) and UTMALDG (TMA loads), and touches no local
    memory: the design holds in the shipped binary, not only in the source."""
    report, sass = _cuobjdump("-sass", "-arch", "sm_90a")
    counts = {name: c for (arch, name), c in report.parse_sass(sass).items() if report.is_cutlass_gemm(name)}
    assert len(counts) == SM90_KERNELS, f"expected every sm_90a GEMM instantiation, got {len(counts)}"
    lacking = {name[:120]: c for name, c in counts.items() if not (c["hgmma"] and c["utmaldg"]) or c["local_ld_st"]}
    assert not lacking, f"sm_90a GEMMs without HGMMA or UTMALDG, or with local memory: {lacking}"


def test_sm90_gemm_build_log_has_no_wgmma_serialisation_or_spills():
    """ptxas's own report of the build (setup.py keeps it in vit_kernels/_C.build.log; the sm_90a units are compiled
    with -Xptxas=-v): no C7509 / C7510 warning (wgmma serialised, e.g. by CUTLASS asserts without -DNDEBUG) and
    0 bytes of spill stores and loads in every sm_90a GEMM."""
    _C = _sm90_extension()
    log = Path(_C.__file__).with_name("_C.build.log")
    if not log.is_file():
        pytest.skip(f"{log} is absent (_C was not built by this setup.py)")
    text = log.read_text(errors="replace")
    serialised = [line for line in text.splitlines() if "C7509" in line or "C7510" in line]
    assert not serialised, f"ptxas serialised wgmma: {serialised[:3]}"
    # ptxas -v: "Compiling entry function '<name>' for 'sm_90a'", then "... N bytes spill stores, N bytes spill loads".
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n(?:.*\n){0,2}?.*?(\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", text)  # fmt: skip
    gemms = [(name, int(st), int(ld)) for name, st, ld in entries if "GemmUniversal" in name]
    assert len(gemms) >= SM90_KERNELS, f"ptxas reported {len(gemms)} sm_90a GEMMs in {log}"
    spilled = [(name[:120], st, ld) for name, st, ld in gemms if st or ld]
    assert not spilled, f"sm_90a GEMMs that spill: {spilled}"


def test_sm90_gemm_configs_fit_one_cta_per_sm():
    """_C.sm90_gemm_kernels(), read from the CUTLASS types: every product in both dtypes, one producer warpgroup and
    two consumer warpgroups (384 threads), at least 3 mainloop stages, and shared memory within the 227 KB an H100 /
    H200 CTA may have; the ops' kernels all cooperative 128 x 256 x 64 in 2 x 1 clusters, beside linear_bias's
    probe-only variants in bf16."""
    _C = _sm90_extension()
    kernels = _C.sm90_gemm_kernels()
    shipped = [k for k in kernels if not k["variant"]]
    assert len(kernels) == SM90_KERNELS
    assert {(k["product"], k["dtype"]) for k in shipped} == {(p, d) for p in SM90_PRODUCTS for d in ("bf16", "fp16")}
    for k in kernels:
        assert k["threads"] == 384 and k["stages"] >= 3 and k["smem_bytes"] <= 227 * 1024, k
    for k in shipped:
        assert (k["tile"], k["cluster"], k["schedule"]) == ("128x256x64", "2x1", "cooperative"), k
    assert all(k["scheduler"].startswith("stream-K") == (k["product"] == "matmul_tn_wgrad") for k in kernels)
    variants = {k["variant"]: (k["product"], k["dtype"], k["tile"], k["cluster"], k["schedule"])
                for k in kernels if k["variant"]}  # fmt: skip
    assert variants == {
        "cooperative_cluster1x1": ("linear_bias", "bf16", "128x256x64", "1x1", "cooperative"),
        "pingpong_128x128": ("linear_bias", "bf16", "128x128x64", "2x1", "pingpong"),
        "cooperative_256x128_cluster1x2": ("linear_bias", "bf16", "256x128x64", "1x2", "cooperative"),
    }


def test_kernel_report_names_each_sm90_gemm_as_its_description_does():
    """benchmarks/kernel_report.py reads product, tile, cluster and schedule back from each CUTLASS kernel's mangled
    name; every name it gives must be one _C.sm90_gemm_kernels() describes, and no two kernels may share one."""
    report, usage = _cuobjdump("--dump-resource-usage")
    names = sorted({name for _, name in report.parse_resource_usage(usage) if report.is_cutlass_gemm(name)})
    described = report.sm90_facts()
    named = [report.cutlass_name(name) for name in names]
    assert sorted(named) == sorted(described), (named, sorted(described))


def _sm90_products(M: int, C: int, Hd: int) -> list[tuple[str, int, int, int]]:
    """(product, M, N, K) of every sm_90a GEMM that gelu_mlp, fused_qkv and the block ops run for M tokens
    (csrc/gemm.cu)."""
    return [
        ("linear_bias", M, 3 * C, C), ("linear_bias_gelu", M, Hd, C), ("linear_bias_gelu_act", M, Hd, C),
        ("linear_bias", M, C, Hd),
        ("linear_bias_residual", M, C, Hd), ("linear_bias_residual", M, C, C), ("matmul_nn", M, C, C),
        ("matmul_tn_wgrad", C, C, M),
        ("dgelu", M, Hd, C), ("dgelu_act", M, Hd, C), ("matmul_nn", M, C, Hd), ("matmul_nn", M, C, 3 * C),
        ("matmul_tn_wgrad", Hd, C, M), ("matmul_tn_wgrad", C, Hd, M), ("matmul_tn_wgrad", 3 * C, C, M),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [1, 2])  # fp16, bf16 (DType codes)
@pytest.mark.parametrize("M, C, Hd", [(256 * 197, 768, 3072), (296, 72, 288), (1, 8, 16), (296, 768, 3072)])
def test_sm90_gemms_accept_every_product_they_are_given(dtype, M, C, Hd):
    """CUTLASS's own can_implement (host logic, no GPU) accepts every product at ViT-B/16 batch 256 and at the GPU
    tests' shapes: the operand layouts and alignments the launchers pass are ones its TMA collectives take."""
    _C = _sm90_extension()
    refused = {p: why for p in _sm90_products(M, C, Hd) if (why := _C.sm90_can_implement(*p[:1], dtype, *p[1:]))}
    assert not refused, refused
    # The check reads the shapes: an M-major A of one row (not 16-byte aligned along M) is refused.
    assert _C.sm90_can_implement("matmul_tn_wgrad", dtype, 1, 8, 16).startswith("not implementable: an operand's")
