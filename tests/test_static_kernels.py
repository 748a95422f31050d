"""Static check, no GPU needed: every shipped Triton config compiles for sm_80 and sm_90 with no register
spills, within the shared-memory limit, and on tensor cores (wgmma on sm_90, mma.sync on sm_80), for fp16 and
for fp32 with both of its dot precisions: "tf32" (tensor cores) and "ieee" (exact fp32 FMA loops, no tensor
cores: what PyTorch's default matmul precision "highest" gives). CI runs this once per Triton version it tests.

Interpreted @jit functions cannot be compiled, so each op's `compile_report` runs in a fresh process
without TRITON_INTERPRET.
"""

import pytest
from conftest import SMEM_LIMIT, compile_report_rows, ptxas_available

# What each op's report compiles: ViT shapes chosen to cover every config class of its table.
REPORTS = {
    "attention": """
import json, sys, torch, triton
from vit_kernels.triton.attention import compile_report
rows = compile_report(int(sys.argv[1]), dtypes=(torch.float16, torch.float32))  # every cell of the table
print(json.dumps([dict(row, triton=triton.__version__) for row in rows]))
""",
    "linear": """
import json, sys, torch, triton
from vit_kernels.triton.linear import compile_report
arch = int(sys.argv[1])
rows = compile_report(arch, dtypes=(torch.float16, torch.float32))
rows += compile_report(arch, shapes=((1, 197, 768, 12),), dtypes=(torch.float16,))  # the 64-row "small" tiles
rows += compile_report(arch, dtypes=(torch.float16, torch.float32), split_k=4)  # the weight gradients, split-K
print(json.dumps([dict(row, triton=triton.__version__) for row in rows]))
""",
}
KERNELS = {
    "attention": {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"},
    "linear": {
        "qkv_fwd", "qkv_bwd_dx", "qkv_bwd_dw", "mlp_fc1", "mlp_fc2",
        "mlp_bwd_dhidden", "mlp_bwd_dw2", "mlp_bwd_dw1", "mlp_bwd_dx",
        "qkv_bwd_dw_split_k", "mlp_bwd_dw2_split_k", "mlp_bwd_dw1_split_k",
    },
}  # fmt: skip
NO_DOT = {"attn_bwd_preprocess"}  # a row reduction: no tensor-core instruction expected
# What each report must hold besides fp16: fp32 compiled once per dot precision.
VARIANTS = {("fp16", None), ("fp32", "ieee"), ("fp32", "tf32")}


@pytest.mark.skipif(not ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available here")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("op", sorted(REPORTS))
def test_shipped_configs_compile_without_spills_on_tensor_cores(op, arch):
    rows = compile_report_rows(REPORTS[op], arch)
    assert {row["kernel"] for row in rows} == KERNELS[op]
    for variant in VARIANTS:
        assert {row["kernel"] for row in rows if (row["dtype"], row["precision"]) == variant} == KERNELS[op], variant
    spilled = []
    for row in rows:
        what = f"{row} on sm_{arch} (triton {row['triton']})"
        if row["n_spills"]:
            spilled.append(f"{what}: {row['n_spills']} bytes of register spills")
        assert 0 < row["n_regs"] <= 255, f"{what}: {row['n_regs']} registers"
        assert row["shared"] <= SMEM_LIMIT[arch], f"{what}: {row['shared']} bytes of shared memory"
        if op == "attention":
            # The backward must round S * scale as the forward does (static_check.exp2_args_with_fma: the H100 showed
            # fp32 dq at 4e-4 instead of 1e-5 while the backward fused S * scale - lse into one FMA).
            assert row["exp2_fma"] == 0, f"{what}: {row['exp2_fma']} exp2 arguments computed by an FMA"
        if row["kernel"] in NO_DOT:
            continue
        if row["precision"] == "ieee":
            # Exact fp32 dots are FMA loops: a tensor-core instruction here would mean tf32 was compiled instead.
            assert not (row["wgmma"] or row["mma"]), f"{what}: tensor-core instruction in an ieee kernel"
        else:
            # Measured: every 16-bit and tf32 dot becomes wgmma on sm_90, mma.sync on sm_80.
            assert row["wgmma"] if arch == 90 else row["mma"], f"{what}: no tensor-core instruction in the PTX"
    assert not spilled, "\n".join(spilled)


TMA_GEMM_REPORT = """
import json, torch, triton
from vit_kernels.triton.tma_gemm import compile_report
rows = compile_report(90, dtypes=(torch.bfloat16, torch.float32))
print(json.dumps([dict(row, triton=triton.__version__) for row in rows]))
"""
TMA_GEMM_PRODUCTS = {
    "qkv_fwd", "proj_residual_fwd", "mlp_fc1", "mlp_fc2", "mlp_fc2_residual",
    "qkv_bwd_dx", "mlp_bwd_dhidden", "mlp_bwd_dx", "qkv_bwd_dw", "mlp_bwd_dw2", "mlp_bwd_dw1",
}  # fmt: skip


@pytest.mark.skipif(not ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available here")
def test_hopper_gemms_are_tma_fed_wgmma_without_spills():
    """Every product of a ViT block on the sm_90 path (tma_gemm.py), bf16 and tf32: operands loaded by TMA
    (`cp.async.bulk.tensor`, behind mbarriers), no Ampere `cp.async` ring, wgmma of N >= 128 with no ptxas
    serialisation warning, no spills, within shared memory, and work that fills the SMs (weight gradients split
    along K to >= 90% of their last wave)."""
    rows = compile_report_rows(TMA_GEMM_REPORT, 90)
    assert {row["kernel"] for row in rows} == TMA_GEMM_PRODUCTS
    assert {row["dtype"] for row in rows} == {"bf16", "fp32"}
    bad = []
    for row in rows:
        what = f"{row['kernel']} {row['dtype']} ({row['entry']}, triton {row['triton']})"
        checks = {
            "TMA loads": row["tma_loads"] > 0,
            "no cp.async": row["cp_async"] == 0,
            "mbarrier": row["mbarrier"],
            "wgmma N >= 128": bool(row["wgmma_n"]) and min(row["wgmma_n"]) >= 128,
            "no wgmma serialisation": row["wgmma_serialized"] == 0,
            "no spills": row["n_spills"] == 0,
            "shared memory": row["shared"] <= SMEM_LIMIT[90],
            "fits one CTA per SM": row["ctas_per_sm"] >= 1,
        }
        bad += [f"{what}: {name} failed ({row})" for name, ok in checks.items() if not ok]
        if row["splits"] > 1:
            units = row["units"]
            fill = units / (-(-units // 132) * 132)
            if fill < 0.9:
                bad.append(f"{what}: {units} work units fill the last wave to {fill:.0%}")
    assert not bad, "\n".join(bad)


def test_dtype_precisions_compiles_fp32_once_per_precision():
    import torch

    from vit_kernels.triton.static_check import dtype_precisions

    pairs = list(dtype_precisions((torch.float16, torch.float32)))
    assert pairs == [(torch.float16, True), (torch.float32, False), (torch.float32, True)]
    assert list(dtype_precisions((torch.float32,), ("tf32",))) == [(torch.float32, True)]
    with pytest.raises(ValueError, match="fp32_precisions"):
        list(dtype_precisions((torch.float32,), ("fp64",)))


PER_SM_VARIANTS_REPORT = """
import ast, json, torch, triton
from vit_kernels.triton import tma_gemm
# probe_gemm's VARIANTS literal, read without importing the script (on CPU it switches Triton to the interpreter)
tree = ast.parse(open("benchmarks/probe_gemm.py").read())
VARIANTS = next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "VARIANTS")
PRODUCT = {"gelu": "mlp_fc1", "dgelu": "mlp_bwd_dhidden"}  # the product each GELU epilogue runs
rows, shipped = [], dict(tma_gemm.CONFIGS[90])
for epilogue, variants in VARIANTS.items():
    for label, fields in variants:
        if fields.get("per_sm", 1) == 1:
            continue
        tma_gemm.CONFIGS[90].update(shipped)
        tma_gemm.CONFIGS[90].update({k: v._replace(**fields) for k, v in shipped.items() if k[1] == epilogue})
        for row in tma_gemm.compile_report(90, dtypes=(torch.bfloat16,), kernels=(PRODUCT[epilogue],)):
            rows.append(dict(row, label=f"{epilogue} {label}", per_sm=fields["per_sm"], triton=triton.__version__))
print(json.dumps(rows))
"""


@pytest.mark.skipif(not ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available here")
def test_gemm_ab_variants_fit_the_programs_per_sm_they_ask_for():
    """probe_gemm's GELU and dGELU variants that run two programs per SM (one's epilogue under the other's
    mainloop) must fit two CTAs in an SM's registers and shared memory, TMA-fed and without spills: else the second
    program of each SM waits for the first and the A / B measures nothing."""
    rows = compile_report_rows(PER_SM_VARIANTS_REPORT, 90)
    assert rows and any(row["per_sm"] > 1 for row in rows)
    for row in rows:
        what = f"{row['label']} (triton {row['triton']}): {row}"
        assert row["n_spills"] == 0 and row["tma_loads"] > 0, what
        assert row["ctas_per_sm"] >= row["per_sm"], what
