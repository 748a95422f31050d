"""The benchmark scripts run end to end on CPU at tiny sizes and report real numbers.

Each script runs in a subprocess (as a user runs it), without TRITON_INTERPRET, writing its files to
a temporary directory. The FLOP formulas and the cuobjdump parsers are checked on known inputs.
"""

import csv
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# Appended, not prepended: benchmarks/ has a conftest.py of its own, and a process spawned from this suite
# (the DDP test) must still find tests/conftest.py first when it imports `conftest`.
sys.path.append(str(BENCH))

import common  # noqa: E402
import kernel_report  # noqa: E402


def run_script(name: str, *args: str, env_extra: dict | None = None, timeout: int = 120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    res = subprocess.run(
        [sys.executable, str(BENCH / name), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )
    assert res.returncode == 0, f"{name} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr[-3000:]}"
    return res.stdout


def table_rows(stdout: str) -> list[dict]:
    """The Markdown table's rows as dicts keyed by header (thousands separators dropped, so numbers parse)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    if not lines:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = (line.strip("|").split("|") for line in lines[2:])
    return [dict(zip(header, (c.strip().replace(",", "") for c in row), strict=True)) for row in cells]


def test_attn_bench_cpu(tmp_path):
    out = run_script(
        "attn_bench.py", "--device", "cpu", "--shapes", "1,2,64,32;1,3,97,80", "--rep-ms", "10", "--no-progress",
        "--providers", "eager,sdpa_flash,sdpa_efficient,sdpa_cudnn,sdpa_math,triton,cuda", "--out-dir", str(tmp_path),
    )  # fmt: skip
    rows = table_rows(out)
    eager = [r for r in rows if r["provider"] == "eager"]
    assert len(eager) == 4, out  # 2 shapes x (fwd, fwd_bwd)
    for r in eager:
        assert float(r["TFLOP/s"]) > 0 and float(r["ms (median)"]) > 0 and float(r["speedup vs eager"]) == 1.0
        assert float(r["rel err"]) < 1e-5
    assert any(r["provider"] == "sdpa_math" and float(r["TFLOP/s"]) > 0 for r in rows)
    for provider in ("triton", "cuda", "sdpa_efficient", "sdpa_cudnn", "compile"):
        assert re.search(rf"^- skipped {provider} \(.+\): \S", out, re.M), f"no skip reason for {provider}:\n{out}"
    data = json.loads(next(tmp_path.glob("attn_bench-*.json")).read_text())
    assert data["peaks"]["copy_gbps"] > 0 and data["peaks"]["matmul_tflops"]["fp32"] > 0
    row = data["rows"][0]
    for key in (
        "device_name",
        "dtype",
        "torch",
        "triton",
        "commit",
        "tflops",
        "gbps",
        "roofline_pct",
        "flops",
        "bytes",
    ):
        assert key in row, key
    with open(next(tmp_path.glob("attn_bench-*.csv"))) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_mlp_bench_cpu(tmp_path):
    out = run_script(
        "mlp_bench.py", "--device", "cpu", "--shapes", "1,16,64,256,4", "--rep-ms", "10", "--no-progress",
        "--providers", "eager,reference,views,triton,cuda", "--out-dir", str(tmp_path),
    )  # fmt: skip
    rows = table_rows(out)
    for op in ("mlp", "qkv"):
        eager = [r for r in rows if r["op"] == op and r["provider"] == "eager"]
        assert len(eager) == 2, out
        assert all(float(r["TFLOP/s"]) > 0 and float(r["rel err"]) < 1e-5 for r in eager)
    assert any(r["provider"] == "views" for r in rows) and any(r["provider"] == "reference" for r in rows)
    for provider in ("triton", "cuda", "compile"):
        assert re.search(rf"^- skipped {provider} \(.+\): \S", out, re.M), f"no skip reason for {provider}:\n{out}"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_benchmarks_write_outside_the_committed_results_by_default():
    """benchmarks/results/ holds the measurements that measured_backends.json and the NOTES cite: a plain run must
    not write there (only --out-dir benchmarks/results does)."""
    import argparse

    parser = argparse.ArgumentParser()
    common.add_common_args(parser)
    out_dir = parser.parse_args([]).out_dir
    assert out_dir.resolve() != common.RESULTS_DIR.resolve()
    assert _git("check-ignore", "-q", str(out_dir / "attn_bench-x.json")).returncode == 0, f"{out_dir} is tracked"


def test_a_rerun_never_replaces_an_earlier_result(tmp_path, capsys):
    """Files are named by bench, device, dtype and date: a second run on the same day gets -2, -3, ... instead of
    replacing the first (which may be the evidence a committed table cites)."""
    import argparse

    env = common.Env.collect("cpu", "fp32")
    args = argparse.Namespace(out_dir=tmp_path, no_save=False)
    written = []
    for ms in (1.0, 2.0, 3.0):
        report = common.Report("attn_bench", env, None, args)
        report.add({"provider": "eager", "ms": ms})
        written.append(report.write())
    stem = f"attn_bench-{env.slug}-fp32-{env.date}"
    assert [[p.name for p in files] for files in written] == [
        [f"{stem}{n}.csv", f"{stem}{n}.json"] for n in ("", "-2", "-3")
    ]
    assert [json.loads(files[1].read_text())["rows"][0]["ms"] for files in written] == [1.0, 2.0, 3.0]
    assert f"{stem}.csv exists already: not replaced" in capsys.readouterr().err


def test_the_readme_benchmark_command_leaves_git_status_clean():
    """`python benchmarks/attn_bench.py` as the README runs it (tiny shapes here, for time): whatever it writes is
    ignored by git, and nothing under benchmarks/results/ changes."""
    committed = _git("status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results").stdout
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(BENCH / "attn_bench.py"), "--shapes", "1,2,17,32", "--rep-ms", "1", "--providers",
         "eager", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    written = [ROOT / p for p in re.findall(r"^wrote (.+)$", res.stderr, re.M)]
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert len(written) == 2 and all(p.is_file() for p in written), res.stderr
        for path in written:
            assert _git("check-ignore", "-q", str(path)).returncode == 0, f"{path} is not ignored by git"
        assert _git("status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results").stdout == committed
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def test_env_records_what_auto_table_reads():
    """auto_table keys results by the GPU's arch and fp32's matmul precision: every result's env carries both."""
    env = common.Env.collect("cpu", "fp32")
    assert env.capability is None  # CPU results are skipped by auto_table
    assert env.float32_matmul_precision == torch.get_float32_matmul_precision()


def test_block_bench_cpu(tmp_path):
    """benchmarks/block_bench.py runs on CPU: eager rows checked against the reference, predicted bytes printed,
    the Triton providers skipped with their reason (the interpreter is far too slow to time), the cuda backend's
    unfused and fused block with the cuda backend's own reason."""
    out = run_script(
        "block_bench.py", "--device", "cpu", "--shapes", "1,17,64,128,2", "--rep-ms", "5", "--no-progress",
        "--threads", "1", "--providers", "eager,unfused,fused,unfused_cuda,fused_cuda", "--out-dir", str(tmp_path),
        timeout=300,
    )  # fmt: skip
    rows = table_rows(out)
    assert [(r["provider"], r["mode"]) for r in rows] == [("eager", "fwd"), ("eager", "fwd_bwd")]
    assert all(float(r["rel err"]) < 1e-5 and float(r["ms (median)"]) > 0 for r in rows)
    assert float(rows[0]["pred fwd GB"]) > 0
    for provider in ("unfused", "fused"):
        assert f"- skipped {provider} (all cells): on CPU tensors Triton runs only under its interpreter" in out
    from vit_kernels import dispatch

    cuda_reason = dispatch.device_unavailable_reason("cuda", torch.device("cpu"))
    assert cuda_reason
    for provider in ("unfused_cuda", "fused_cuda"):
        assert f"- skipped {provider} (all cells): {cuda_reason}" in out, out
    assert list(tmp_path.glob("block_bench-*.json"))


@pytest.fixture
def bench_module(monkeypatch):
    """A benchmark script imported as a module. monkeypatch restores sys.path afterwards (the scripts put
    benchmarks/ first, which would shadow tests/conftest.py for processes spawned later in this session)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def test_block_bench_lists_the_cuda_block_and_its_bytes(bench_module, monkeypatch):
    """block_bench times the cuda backend's block (fused path and unfused ops) beside triton's; the fused one also
    needs Triton on the device for its LayerNorm row kernels, and its predicted forward traffic is 18MC + 3MHd."""
    import argparse

    block_bench = bench_module("block_bench")
    assert {"unfused_cuda", "fused_cuda"} <= set(block_bench.PROVIDERS)
    assert set(block_bench.FUSED) == {"fused", "fused_cuda"}
    assert {block_bench.BACKEND[p] for p in ("unfused_cuda", "fused_cuda")} == {"cuda"}
    # A GPU where the cuda extension runs but Triton does not.
    reasons = {"cuda": None, "triton": "triton is not installed"}
    monkeypatch.setattr(block_bench.common, "kernel_skip_reason", lambda backend, device, interp: reasons[backend])
    args = argparse.Namespace(include_interpreter=False)
    assert block_bench.skip_reason("unfused_cuda", "cuda", args) is None
    assert block_bench.skip_reason("fused_cuda", "cuda", args) == (
        "its LayerNorm runs on the Triton row kernels, and triton is not installed"
    )
    assert block_bench.skip_reason("fused", "cuda", args) == "triton is not installed"
    assert block_bench.skip_reason("eager", "cuda", args) is None
    s = block_bench.Shape("ViT-B/16", 256, 197, 768, 3072, 12)
    mc, mh, weights = s.M * s.C, s.M * s.hidden, 4 * s.C**2 + 2 * s.C * s.hidden
    assert block_bench.predicted_fwd_bytes("fused_cuda", s, 2) == (18 * mc + 2 * mh + weights) * 2
    assert block_bench.predicted_fwd_bytes("unfused_cuda", s, 2) == (22 * mc + 2 * mh + weights) * 2


def _block_rows(B, mode, times, errors=None):
    shape = {"bench": "block_bench", "model": "ViT-B/16", "B": B, "N": 197, "C": 768, "hidden": 3072, "heads": 12}
    errors = errors or {}
    return [{**shape, "mode": mode, "provider": p, "ms": ms, "rel_err": errors.get(p, 1e-3)} for p, ms in times.items()]


def test_auto_table_picks_the_fastest_correct_fused_block_backend(bench_module, tmp_path, capsys):
    """A block cell goes to the faster of block_bench's two fused blocks (`fused`: triton, `fused_cuda`: cuda) that
    passed parity and beat eager in every case, as three entries (one per block op) that dispatch accepts."""
    from vit_kernels import dispatch

    auto_table = bench_module("auto_table")
    rows = [
        # B=256 (B*N = 50432): both beat eager in both modes; fused_cuda is the faster -> cuda
        *_block_rows(256, "fwd", {"eager": 2.0, "unfused": 1.9, "fused": 1.6, "unfused_cuda": 1.8, "fused_cuda": 1.4}),
        *_block_rows(256, "fwd_bwd", {"eager": 6.0, "fused": 5.0, "unfused_cuda": 5.5, "fused_cuda": 4.5}),
        # B=64 (B*N = 12608): both beat eager, triton is the faster -> triton
        *_block_rows(64, "fwd", {"eager": 0.5, "fused": 0.35, "fused_cuda": 0.4}),
        *_block_rows(64, "fwd_bwd", {"eager": 1.5, "fused": 1.1, "fused_cuda": 1.2}),
        # B=16 (B*N = 3152): fused_cuda is the fastest but fails parity forward+backward -> triton
        *_block_rows(16, "fwd", {"eager": 0.2, "fused": 0.18, "fused_cuda": 0.1}),
        *_block_rows(16, "fwd_bwd", {"eager": 0.6, "fused": 0.5, "fused_cuda": 0.3}, {"fused_cuda": 0.5}),
        # B=1: fused_cuda is slower than eager, fused not measured: no entry
        *_block_rows(1, "fwd", {"eager": 0.05, "fused_cuda": 0.06}),
    ]
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "dtype": "bf16"}
    results = tmp_path / "gpu.json"
    results.write_text(json.dumps({"env": env, "rows": [{"dtype": "bf16", "commit": "abc", **r} for r in rows]}))
    out = tmp_path / "table.json"
    assert auto_table.main([str(results), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    table = dispatch.parse_table(data, str(out))
    expected = {"B*N<=65536": "cuda", "B*N<=16384": "triton", "B*N<=4096": "triton"}
    assert {str(key): entry["backend"] for key, entry in table.items()} == {
        f"sm_90 {op} bf16 C<=1024 {tokens}": backend
        for tokens, backend in expected.items()
        for op in dispatch.BLOCK_OPS
    }
    evidence = table[dispatch.TableKey("sm_90", "proj_residual", "bf16", 1024, 65536)]["evidence"]
    assert evidence.startswith("NVIDIA H100 80GB HBM3: 2 cases, 1.33-1.43x faster than torch")
    report = capsys.readouterr().out
    assert "sm_90 block bf16 C<=1024 B*N<=65536: cuda for ln_fused_qkv, proj_residual, ln_gelu_mlp" in report
    assert "sm_90 block bf16 C<=1024 B*N<=16384: triton for ln_fused_qkv, proj_residual, ln_gelu_mlp" in report
    assert "sm_90 block bf16 C<=1024 B*N<=4096: triton for" in report
    assert "sm_90 block bf16 C<=1024 B*N<=256: torch (no entry): triton: not measured at" in report
    assert "cuda: slower than torch at" in report
    assert "gpu.json: 3 rows of other benchmarks or providers ignored" in report  # unfused and unfused_cuda


STUB_VIT = '''
"""Stand-in for the vit package (benchmark plumbing only): the factory signature, a few real ops."""
import torch
import vit_kernels as vk


class Stub(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.patch = torch.nn.Conv2d(3, 32, 16, 16)
        self.qkv = torch.nn.Linear(32, 96)
        self.head = torch.nn.Linear(32, 1000)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = vk.fused_qkv(t, self.qkv.weight, self.qkv.bias, 2, backend=self.backend)
        return self.head(vk.attention(q, k, v, backend=self.backend).transpose(1, 2).flatten(2).mean(1))


def vit_tiny_patch16_224(backend="auto"):
    return Stub(backend)
'''


def test_vit_bench_cpu_plumbing(tmp_path):
    """images/s and MFU columns come out real for a stand-in model with the `vit` factory signature."""
    (tmp_path / "stub" / "vit").mkdir(parents=True)
    (tmp_path / "stub" / "vit" / "__init__.py").write_text(STUB_VIT)
    out = run_script(
        "vit_bench.py", "--device", "cpu", "--batch", "1", "--rep-ms", "10", "--no-progress",
        "--out-dir", str(tmp_path), env_extra={"PYTHONPATH": str(tmp_path / "stub")},
    )  # fmt: skip
    rows = table_rows(out)
    torch_rows = [r for r in rows if r["provider"] == "vit:torch"]
    assert {r["mode"] for r in torch_rows} == {"infer", "train"}, out
    assert all(float(r["images/s"]) > 0 and float(r["MFU %"]) > 0 for r in torch_rows)
    for provider in ("vit:triton", "vit:cuda", "vit:torch+compile"):
        assert re.search(rf"^- skipped {re.escape(provider)} \(.+\): \S", out, re.M), (
            f"no reason for {provider}:\n{out}"
        )
    assert re.search(r"^- skipped vit:torch\+graphs \(.+\): CUDA graphs need a CUDA device", out, re.M), out


def test_vit_bench_cpu_real_package(tmp_path):
    """With this repository's own vit package (skipped with its reason while it is missing)."""
    probe = [sys.executable, "-c", "import vit; vit.vit_tiny_patch16_224"]
    res = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT, timeout=120)
    out = run_script(
        "vit_bench.py", "--device", "cpu", "--batch", "1", "--rep-ms", "10", "--no-progress", "--mode", "infer",
        "--providers", "vit:torch,vit:triton,vit:cuda,timm", "--out-dir", str(tmp_path),
    )  # fmt: skip
    if res.returncode != 0:
        assert re.search(r"^- skipped vit:torch \(.+\): \S", out, re.M), out
        pytest.skip(f"vit.vit_tiny_patch16_224 is not available yet: {res.stderr.strip().splitlines()[-1]}")
    rows = table_rows(out)
    assert any(r["provider"] == "vit:torch" and float(r["images/s"]) > 0 for r in rows), out


def test_tune_attention_static_step_flags_spills():
    """Without a GPU the tuner compiles every candidate for the target and marks what spills or overflows
    shared memory; the shipped config must be usable (its row comes first per pass)."""
    out = run_script("tune_attention.py", "--arch", "80", "--shapes", "1,2,257,80", "--no-save", "--no-progress")
    rows = table_rows(out)
    assert {r["pass"] for r in rows} == {"fwd", "bwd"} and all(r["D"] == "80" for r in rows), out
    for r in rows:
        assert int(r["regs"]) > 0 and int(r["smem B"]) > 0, r
        assert (r["usable"] == "True") == (int(r["spill B"]) == 0 and int(r["smem B"]) <= 163 * 1024), r
    for pass_ in ("fwd", "bwd"):
        shipped = next(r for r in rows if r["pass"] == pass_)
        assert shipped["usable"] == "True", f"the shipped {pass_} config is not usable on sm_80: {shipped}"
    assert re.search(r"^- skipped timing \(all cells\): no CUDA device", out, re.M), out


def test_tune_attention_timing_path_under_interpreter():
    """--interpret runs the timing step on CPU (numbers meaningless): every candidate is checked, then timed."""
    out = run_script(
        "tune_attention.py", "--interpret", "--shapes", "1,1,9,32", "--dtype", "fp32", "--rep-ms", "1",
        "--no-save", "--no-progress",
    )  # fmt: skip
    lines = out.split("### shipped table vs fastest candidate")
    assert len(lines) == 2, out
    timed = table_rows(lines[0])
    assert {r["pass"] for r in timed} == {"fwd", "bwd"}
    assert [r["shipped"] for r in timed].count("yes") == 2
    for r in timed:
        assert float(r["ms (median)"]) > 0 and float(r["rel err"]) < 1e-5, r
    summary = table_rows(lines[1])
    assert len(summary) == 2 and all(float(r["shipped / fastest"]) >= 1.0 for r in summary), out


def test_probe_weight_grad_checks_every_variant_on_cpu():
    """The split-K measurement: on CPU (interpreter, tiny shape) every variant computes the product it claims to, so
    a GPU run can only differ in its timings."""
    rows = table_rows(run_script("probe_weight_grad.py"))
    split = ["gemm", "split_k2", "split_k4", "split_k8"]
    names = [*split, "tiles_64", "bias_sum", "dx_same_flops", "cublas", *split, "bias_sum", "cublas"]
    assert [r["variant"] for r in rows] == names
    assert [r["product"].split()[0] for r in rows] == ["mlp_dw1"] * 8 + ["qkv_dw"] * 6
    for r in rows:
        assert float(r["rel err vs fp32"]) < 1e-5, r


def test_probe_gemm_checks_every_product_and_way_on_cpu(tmp_path):
    """The Hopper GEMM A/B (gpu_check stage gemm_ab): on CPU (interpreter, tiny shapes) every product computes what
    it claims on every way (pointer kernel, TMA kernels, cuBLAS), every op runs on both paths, the matmul peak
    comes from --peaks, and the cuda section says in one line why it cannot run here."""
    peaks = tmp_path / "peaks.json"
    peaks.write_text(json.dumps({"copy_gbps": 10.0, "matmul_tflops": {"fp16": 123.0}}))
    out = run_script("probe_gemm.py", "--peaks", str(peaks), timeout=300)
    assert f"matmul peak (fp16): 123 TFLOP/s (from {peaks})" in out, out
    products, rest = out.split("\n## cuda: ")
    cuda, op_rows = rest.split("## ops end to end: triton on each GEMM path against eager torch")
    assert "## ops end to end: cuda" not in op_rows  # the cuda section is skipped whole here
    rows = table_rows(products)
    names = ["qkv_fwd", "qkv_fwd_packed", "proj", "fc1_gelu", "fc2", "dhidden_dgelu", "mlp_dx", "qkv_dx", "mlp_dw1",
             "mlp_dw2", "qkv_dw"]  # fmt: skip
    assert sorted({r["product"] for r in rows}) == sorted(names)
    for name in names:
        extra = ["tma + dbias"] if name == "dhidden_dgelu" else []
        assert sorted(r["way"] for r in rows if r["product"] == name) == ["cublas", "pointer", "tma", *extra], name
    for r in rows:
        assert r["ms (median)"] == "untimed" and r["% peak"] == "n/a" and float(r["rel err"]) < 4e-3, r
    ops = table_rows(op_rows)
    assert {(r["op"], r["mode"]) for r in ops} == {
        (op, mode)
        for op in ("fused_qkv", "gelu_mlp", "ln_fused_qkv", "proj_residual", "ln_gelu_mlp")
        for mode in ("fwd", "fwd+bwd")
    }
    assert re.fullmatch(r"skipped: \S.*\n\n", cuda), cuda


def test_probe_gemm_kernel_attribution(bench_module):
    """Per-kernel times of a launcher (probe_gemm's cuda section): the profiler's kernels over several calls are
    split per call, each position's median taken, and labelled by the launches gemm.cu makes; anything that does
    not repeat or does not fit is said, never silently mislabelled."""
    pg = bench_module("probe_gemm")
    gemm, part, fin = "void vk::gemm::gemm_tc_kernel<Cfg>(A, B)", "void colsum_partial_kernel<T>(s)", "colsum_finish"
    events = [(gemm, 10.0), (part, 1.0), (fin, 0.5), (gemm, 30.0), (part, 3.0), (fin, 0.5), (gemm, 20.0), (part, 2.0),
              (fin, 0.7)]  # fmt: skip
    assert pg.attribute(events, 3) == [(gemm, 20.0), (part, 2.0), (fin, 0.5)]
    assert pg.attribute(events[:3], 1) == events[:3]
    with pytest.raises(ValueError, match="8 kernels recorded over 3 calls"):
        pg.attribute(events[:-1], 3)
    with pytest.raises(ValueError, match="0 kernels recorded"):
        pg.attribute([], 3)
    swapped = events[:3] + [(part, 3.0), (gemm, 30.0), (fin, 0.5)]
    with pytest.raises(ValueError, match=r"call 1 launched colsum_partial_kernel where call 0 launched vk::gemm::"):
        pg.attribute(swapped, 2)

    launches = [pg.Launch("dX", "gemm_tc", 2e9, "qkv_dx", (0,)), pg.Launch("sum", "colsum_partial"),
                pg.Launch("sum, finish", "colsum_finish", outputs=(2,))]  # fmt: skip
    names = [gemm, part, fin]
    assert pg.label_kernels(names, launches) == (launches, None)
    fill = "void cutlass::fill_kernel<int>(int*)"  # a launch between the expected ones keeps its name
    labels, why = pg.label_kernels([gemm, fill, part, fin], launches)
    assert why is None
    assert [k.label for k in labels] == ["dX", "(unexpected) cutlass::fill_kernel", "sum", "sum, finish"]
    labels, why = pg.label_kernels([gemm, fin], launches)  # one missing: no labels at all
    assert [k.label for k in labels] == ["vk::gemm::gemm_tc_kernel", "colsum_finish"]
    assert not any(k.flops or k.cublas or k.outputs for k in labels)
    assert why == "expected 3 kernels but found 2: none named *colsum_partial* for sum"
    a = torch.randn(8, 8)  # the profiler's side, on CPU ops: the same ops per call, in order
    ops = pg.attribute(pg.kernel_times(lambda: torch.relu(a @ a), 3, "cpu"), 3)
    assert [n for n, _ in ops if n in ("aten::mm", "aten::relu")] == ["aten::mm", "aten::relu"], ops
    assert all(us >= 0 for _, us in ops), ops
    stream_k = "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<P, cutlass::gemm::StreamKScheduler>>()"
    assert pg.short_kernel_name(stream_k) == "cutlass::device_kernel (stream-K)"


def _bound_to(real, fn):
    """fn called through `real`'s signature, its defaults applied: a call that would be a TypeError on the GPU is
    one here."""
    sig = inspect.signature(real)

    def call(*args, **kwargs):
        arguments = sig.bind(*args, **kwargs)
        arguments.apply_defaults()
        return fn(**arguments.arguments)

    return call


def _cuda_launcher_stand_ins(linear, log: list) -> dict:
    """Torch versions of vit_kernels/cuda/linear.py's launchers, each called through the real one's signature
    (`_bound_to`), logging the kernels csrc/gemm.cu launches on the path `linear._sm90` picks (gemm_<op> or
    gemm_<op>_sm90)."""
    import torch.nn.functional as F

    def gemm(sm90):
        return "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<>>()" if sm90 else "gemm_tc_kernel<>"

    colsum = ["vk::gemm::colsum_partial_kernel<>", "vk::gemm::colsum_finish_kernel<>"]

    def linear_fwd(a, weight, bias, residual):
        log.append(gemm(linear._sm90(a)))
        return F.linear(a, weight, bias) + (0 if residual is None else residual)

    def linear_bwd(dout, a, weight, has_bias):
        log.extend([gemm(linear._sm90(a)), gemm(linear._sm90(a)), *(colsum if has_bias else [])])
        return dout @ weight, dout.t() @ a, dout.sum(0) if has_bias else None

    def qkv_fwd(x, weight, bias, num_heads, allow_tf32, packed):
        sm90 = linear._sm90(x)
        log.extend([gemm(sm90), *(["vk::gemm::qkv_split_kernel<>"] if sm90 and not packed else [])])
        B, N, C = x.shape
        return F.linear(x, weight, bias).view(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def qkv_bwd(dq, dk, dv, x, weight, has_bias, allow_tf32):
        log.extend([gemm(linear._sm90(x)), gemm(linear._sm90(x)), *(colsum if has_bias else [])])
        B, H, N, D = dq.shape
        dqkv = torch.stack([dq, dk, dv], 2).transpose(1, 3).reshape(B * N, 3 * H * D)  # (B, N, 3, H, D) rows
        return (dqkv @ weight).view(B, N, H * D), dqkv.t() @ x.reshape(B * N, H * D), dqkv.sum(0)

    def mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, allow_tf32, residual, save_hidden):
        log.extend([gemm(linear._sm90(x))] * 2)
        hidden = F.linear(x, fc1_weight, fc1_bias)
        y = F.linear(F.gelu(hidden, approximate=approximate), fc2_weight, fc2_bias)
        return y + (0 if residual is None else residual.reshape(y.shape)), hidden if save_hidden else None

    def mlp_bwd(dy, x, fc1_weight, fc2_weight, hidden, has_fc1_bias, has_fc2_bias, approximate, allow_tf32):
        sm90 = linear._sm90(x)
        partials = sm90 and has_fc1_bias and linear.SM90_DFC1_BIAS_IN_EPILOGUE  # dfc1_bias: the epilogue's sums
        row_pass = sm90 and not linear.SM90_ACT_IN_EPILOGUE  # act: else the d-GELU epilogue writes it
        log.extend([gemm(sm90), *(colsum[1:] if partials else [])])
        log.extend([*(["vk::gemm::gelu_rows_kernel<>"] if row_pass else []), *[gemm(sm90)] * 3])
        log.extend(colsum * (has_fc1_bias + has_fc2_bias - partials))
        dh = torch.ops.aten.gelu_backward(dy @ fc2_weight, hidden, approximate=approximate)
        act = F.gelu(hidden, approximate=approximate)
        return dh @ fc1_weight, dh.t() @ x, dh.sum(0), dy.t() @ act, dy.sum(0)

    fns = [linear_fwd, linear_bwd, qkv_fwd, qkv_bwd, mlp_fwd, mlp_bwd]
    return {fn.__name__: _bound_to(getattr(linear, fn.__name__), fn) for fn in fns}


def _stand_in_cuda_launchers(pg, monkeypatch):
    """probe_gemm (`pg`) on the Hopper path with `_cuda_launcher_stand_ins` for the launchers; returns a stand-in
    for its profiler, profile(fn, calls): the kernels the calls logged, each 100 us."""
    log = []
    monkeypatch.setattr(pg.cuda_linear, "_sm90", lambda t: True)  # what a Hopper build answers
    for name, fn in _cuda_launcher_stand_ins(pg.cuda_linear, log).items():
        monkeypatch.setattr(pg.cuda_linear, name, fn)

    def profile(fn, calls):
        log.clear()
        for _ in range(calls):
            fn()
        return [(name, 100.0) for name in log]

    return profile


def test_probe_gemm_cuda_section_runs_on_cpu_stand_ins(bench_module, monkeypatch, capsys):
    """probe_gemm's cuda table, which only a Hopper GPU runs for real, end to end on CPU: the launchers replaced by
    torch stand-ins bound to their real signatures, the profiler by their kernel log. Every launcher on both paths
    is checked, timed and split per kernel, each GEMM with its FLOPs, % of the peak and cuBLAS's time; a launcher
    that raises is a FAILED row (and a failed run), one whose kernels do not repeat says so."""
    pg = bench_module("probe_gemm")
    profile = _stand_in_cuda_launchers(pg, monkeypatch)  # every kernel 100 us

    def timed(fn):
        fn()
        return 0.2

    calls, extra = pg.cuda_calls(2, 5, 16, 2, "cpu", torch.float32)
    keys = ["qkv_fwd", "qkv_fwd_packed", "proj", "fc1_gelu", "fc2", "dhidden_dgelu", "mlp_dx", "qkv_dx", "mlp_dw1",
            "mlp_dw2", "qkv_dw"]  # fmt: skip
    cublas = {key: (1e9, 0.2, 1e-6) for key in keys}  # from the triton table
    peak = 1e-4  # TFLOP/s: tiny shapes, tiny peak
    assert not pg.cuda_products_table(calls, extra, cublas, timed, profile, peak, 1e-4)
    rows = table_rows(capsys.readouterr().out)
    ab, _ = pg.dgelu_epilogue_ab()  # the way of the d-GELU epilogue not shipped
    assert set(calls) == {"qkv_fwd", "qkv_fwd packed", "linear_fwd", "mlp_fwd", "mlp_fwd without hidden", "mlp_bwd",
                          ab, "linear_bwd", "qkv_bwd"}  # fmt: skip
    assert set(calls[ab].launches) == {"sm_90a"}  # the A / B of one path
    for name in calls:
        for path in calls[name].launches:
            mine = [r for r in rows if r["launcher"] == name and r["path"] == path]
            expected = calls[name].launches[path]
            assert [r["product"] for r in mine] == [f"whole call ({len(expected)} kernels)"] + [
                k.label for k in expected
            ]
            assert mine[0]["ms (median)"] == "0.200" and float(mine[0]["rel err"]) < 1e-5, mine[0]
            for r, k in zip(mine[1:], expected):
                assert r["ms (median)"] == "0.100", r
                if k.flops:
                    assert (r["TFLOP/s"], r["x cuBLAS"]) == (f"{k.flops / 1e8:.0f}", "2.00"), r
                    assert r["% peak"] == f"{100 * k.flops / 1e8 / peak:.0f}" != "0", r
                else:
                    assert (r["TFLOP/s"], r["% peak"], r["x cuBLAS"]) == ("n/a", "n/a", ""), r
                assert (r["rel err"] != "") == bool(k.outputs), r
                assert not k.outputs or float(r["rel err"]) < 1e-5, r
        assert {r["product"] for r in rows if r["launcher"] == name and r["path"] == "cublas"} == {
            k.cublas for k in calls[name].launches["sm_90a"] if k.flops
        }
    proj = [r for r in rows if r["launcher"] == "linear_bwd" and r["path"] == "cublas"]
    assert all(r["ms (median)"] == "0.200" and float(r["rel err"]) < 1e-5 for r in proj), proj

    def broken(*args, **kwargs):
        raise RuntimeError("linear_bwd_sm90: CUTLASS refuses the problem")

    def shaky(fn, calls):  # a different kernel each call
        return [(f"kernel {i}", 1.0) for i in range(calls)]

    monkeypatch.setattr(pg.cuda_linear, "linear_bwd", broken)
    subset = {k: calls[k] for k in ("linear_bwd", "mlp_fwd")}
    assert pg.cuda_products_table(subset, {}, cublas, timed, shaky, peak, 1e-4)
    rows = table_rows(capsys.readouterr().out)
    assert [r["product"] for r in rows if r["launcher"] == "linear_bwd" and r["path"] != "cublas"] == [
        "FAILED: RuntimeError: linear_bwd_sm90: CUTLASS refuses the problem"
    ] * 2
    why = "attribution failed: call 1 launched kernel 1 where call 0 launched kernel 0 (kernel 0 of 1)"
    assert [r["product"] for r in rows if r["launcher"] == "mlp_fwd" and r["path"] == "sm_90a"] == ["whole call", why]


def test_probe_gemm_cuda_variants_table_runs_on_cpu_stand_ins(bench_module, monkeypatch, capsys):
    """probe_gemm's table of the sm_90a linear_bias configuration variants, on CPU with torch stand-ins for the two
    launchers (bound to their real signatures): every forward shape on the shipped kernel and each variant _C lists,
    with TFLOP/s, x shipped and x cuBLAS; a wrong result is WRONG and a raising variant FAILED, each failing the run."""
    pg = bench_module("probe_gemm")
    lin = pg.cuda_linear

    variants = ["cooperative_cluster1x1", "pingpong_128x128"]
    ran = []  # which launcher ran last: the shipped kernel is timed at 0.2 ms, each variant at 0.1 ms

    def shipped(a, weight, bias, residual):
        assert residual is None  # the table times linear_bias, not linear_bias_residual
        ran.append(0.2)
        return torch.nn.functional.linear(a, weight, bias)

    def variant(a, weight, bias, variant):
        ran.append(0.1)
        return torch.nn.functional.linear(a, weight, bias)

    real_variant = lin.linear_fwd_variant
    monkeypatch.setattr(lin, "sm90_variants", lambda: variants)
    monkeypatch.setattr(lin, "linear_fwd", _bound_to(lin.linear_fwd, shipped))
    monkeypatch.setattr(lin, "linear_fwd_variant", _bound_to(real_variant, variant))

    def timed(fn):
        fn()
        return ran[-1]

    cublas = {"qkv_fwd_packed": (0, 0.3, 0), "proj": (0, 0.3, 0), "fc2": (0, 0.3, 0)}
    assert not pg.cuda_variants_table(10, 16, "cpu", torch.float32, timed, 1e-4, 1e-4, cublas)
    rows = table_rows(capsys.readouterr().out)
    assert [(r["product"], r["kernel"]) for r in rows] == [
        (p, k) for p in ("qkv", "proj", "fc2") for k in (pg.SHIPPED, *variants)
    ]
    for r in rows:
        shipped = r["kernel"] == pg.SHIPPED
        assert r["ms (median)"] == ("0.200" if shipped else "0.100"), r
        assert (r["x shipped"], r["x cuBLAS"]) == (("1.00", "1.50") if shipped else ("2.00", "3.00")), r
        assert float(r["rel err"]) < 1e-5 and r["TFLOP/s"] != "n/a", r

    def wrong(a, weight, bias, variant):
        if variant == "pingpong_128x128":
            raise RuntimeError("sm90 linear_bias pingpong_128x128: CUTLASS refuses the problem")
        return torch.nn.functional.linear(a, weight, bias) + 1

    monkeypatch.setattr(lin, "linear_fwd_variant", _bound_to(real_variant, wrong))
    assert pg.cuda_variants_table(10, 16, "cpu", torch.float32, timed, 1e-4, 1e-4, cublas)
    rows = table_rows(capsys.readouterr().out)
    assert {r["ms (median)"] for r in rows if r["kernel"] == "cooperative_cluster1x1"} == {"WRONG"}
    assert {r["ms (median)"] for r in rows if r["kernel"] == "pingpong_128x128"} == {
        "FAILED: RuntimeError: sm90 linear_bias pingpong_128x128: CUTLASS refuses the problem"
    }


def test_goals_reads_every_ratio_of_a_gpu_check_run(bench_module, monkeypatch, capsys, tmp_path):
    """benchmarks/goals.py on a made-up gpu_check run: probe_gemm's triton table and its real cuda table (the CPU
    stand-ins above, so every label the cuda section prints must map to a K), and the mlp, block and vit JSON.
    Each ratio lands beside its goal; CPU results are ignored; a missing provider says "not measured"."""
    pg, goals = bench_module("probe_gemm"), bench_module("goals")
    profile = _stand_in_cuda_launchers(pg, monkeypatch)

    calls, extra = pg.cuda_calls(2, 5, 16, 2, "cpu", torch.float32)
    cublas = {key: (1e9, 0.2, 1e-6) for key in goals.TRITON_K}  # every kernel 0.1 ms: 2.00x cuBLAS
    assert not pg.cuda_products_table(calls, extra, cublas, lambda fn: 0.2, profile, 1e-4, 1e-4)
    cuda_table = capsys.readouterr().out
    triton_rows = "".join(
        f"| {p} | {way} | 0.1 | 1 | 1 | {x} | 1e-3 |\n"
        for p in goals.TRITON_K
        for way, x in (("pointer", "0.50"), ("tma", "0.97"), ("cublas", "1.00"))
    )
    (tmp_path / "gemm_ab.log").write_text(
        "## probe_gemm: ViT block GEMMs\n\n| product | way | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |\n"
        f"|---|---|---|---|---|---|---|\n{triton_rows}\n## ops end to end: triton\n\n| op | mode |\n|---|---|\n"
        f"| gelu_mlp | fwd |\n\n## cuda: mma.sync vs sm_90a (CUTLASS) vs cuBLAS\n\n{cuda_table}"
    )

    def bench_json(bench, device, rows):
        folder = tmp_path / "results" / bench
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{bench}-{device}.json").write_text(json.dumps({"env": {"device": device}, "rows": rows}))

    def mlp(op, mode, ms):
        return [{"op": op, "C": 768, "mode": mode, "provider": p, "ms": t} for p, t in ms.items()]

    bench_json("mlp_bench", "cuda", mlp("mlp", "fwd_bwd", {"eager": 2.4, "triton": 2.0, "cuda": 2.2})
               + mlp("qkv", "fwd_bwd", {"eager": 1.0, "triton": 0.8}))  # fmt: skip
    bench_json("mlp_bench", "cpu", mlp("mlp", "fwd_bwd", {"eager": 100.0, "triton": 1.0}))  # ignored: CPU
    bench_json("block_bench", "cuda", [{"C": 768, "mode": "fwd", "provider": p, "ms": t}
                                       for p, t in (("eager", 1.8), ("fused", 1.5), ("fused_cuda", 1.4))])  # fmt: skip
    vit = [("timm", 100.0), ("timm+compile", 80.0), ("vit:auto", 80.0), ("vit:triton", 90.0), ("vit:cuda", 85.0)]
    bench_json("vit_bench", "cuda", [{"model": "vit_base_patch16_224", "mode": m, "provider": p, "ms": t}
                                     for m in ("train", "infer") for p, t in vit])  # fmt: skip

    table = goals.goal_table(tmp_path)
    by = {(goal, what): (measured, target, verdict) for goal, what, measured, target, verdict in table}
    for product, k in goals.TRITON_K.items():
        target, verdict = ("1.00x", "missed by 3%") if k == "768" else ("0.95x", "met")
        assert by[(f"GEMM vs cuBLAS, K = {k}", f"triton {product}")] == ("0.97x", target, verdict), product
    cuda = [(goal, what) for goal, what in by if what.startswith("cuda ")]
    n_gemms = sum(1 for c in calls.values() for launch in c.launches["sm_90a"] if launch.flops)
    assert len(cuda) == n_gemms and not [g for g, _ in cuda if g.endswith("= ?")], cuda
    assert all(by[key][0] == "2.00x" and by[key][2] == "met" for key in cuda)
    assert by[("gelu_mlp fwd+bwd vs eager", "triton")] == ("1.20x", "1.15x", "met")
    assert by[("gelu_mlp fwd+bwd vs eager", "cuda")] == ("1.09x", "1.15x", "missed by 5%")
    assert by[("fused_qkv fwd+bwd vs eager", "triton")] == ("1.25x", "1.10x", "met")
    assert by[("fused_qkv fwd+bwd vs eager", "cuda")] == ("n/a", "1.10x", "not measured")
    assert by[("block fwd vs eager", "fused")] == ("1.20x", "1.25x", "missed by 4%")
    assert by[("block fwd+bwd vs eager", "fused_cuda")][2] == "not measured"
    for mode in ("train", "infer"):
        assert by[(f"ViT-B/16 {mode} vs timm", "vit:auto")] == ("1.25x", "1.15x", "met")
        assert by[(f"ViT-B/16 {mode} vs timm (per backend)", "vit:triton")] == ("1.11x", "1.15x", "missed by 3%")
        assert by[(f"ViT-B/16 {mode} vs timm + torch.compile", "vit:auto")][0] == "1.00x"
    lines = run_script("goals.py", str(tmp_path)).splitlines()  # the script end to end: the goals' table first
    assert lines[0] == "| goal | what | measured | target | verdict |" and lines.index("") == len(table) + 2
    assert "## The rules written before the run (benchmarks/NOTES.md)" in lines
    # the real cuda table's labels are the ones the d-GELU epilogue rule sums
    measured, verdict = goals.dgelu_epilogue_rule((tmp_path / "gemm_ab.log").read_text())
    assert "n/a" not in measured, measured
    assert verdict.startswith(("both switches on", "SM90_ACT_IN_EPILOGUE")), verdict


def test_goals_reads_a_log_as_gpu_check_writes_it(bench_module):
    """The H200 log's shape: the tma rows say "n/a" against cuBLAS (the ratio comes from the cublas row of the same
    product), and a warning on stderr falls between a table's header and its rows (the rows still count)."""
    goals = bench_module("goals")
    log = (
        "## probe_gemm: ViT block GEMMs\n\n| product | way | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |\n"
        "|---|---|---|---|---|---|---|\n| proj | tma | 0.2 | 1 | 1 | n/a | 1e-3 |\n"
        "| proj | cublas | 0.1 | 1 | 1 | 1.00 | 1e-3 |\n| fc2 | tma | 0.4 | 1 | 1 | n/a | 1e-3 |\n\n"
        "## cuda: mma.sync vs sm_90a (CUTLASS) vs cuBLAS\n\n"
        "| launcher | path | product | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "/x/torch/profiler/profiler.py:224: UserWarning: Warning: Profiler clears events\n  _warn_once(\n"
        "| linear_fwd | sm_90a | proj + bias | 0.11 | 1 | 1 | 0.96 | 1e-3 |\n"
    )
    rows = {(backend, product): (ratio, goal) for backend, product, _, ratio, goal in goals.gemm_rows(log)}
    assert rows[("triton", "proj")] == (0.5, 1.0)
    assert rows[("triton", "fc2")] == (None, goals.GEMM_GOAL)  # no cublas row: not measured, not a made-up ratio
    assert rows[("cuda", "linear_fwd: proj + bias")] == (0.96, 1.0)


def test_goals_applies_the_rules_written_before_the_run(bench_module):
    """The variant rule (switch only if faster at every product the variant would change, by 3% at one; a row
    that is WRONG or FAILED keeps the shipped config) and the d-GELU epilogue rule, on a made-up gemm_ab log."""
    goals = bench_module("goals")

    def row(*cells):
        return "| " + " | ".join(map(str, cells)) + " |\n"

    store = {"qkv_fwd_packed": (0.33, 0.32), "proj": (0.12, 0.118), "fc2": (0.40, 0.38), "mlp_dx": (0.40, 0.39),
             "qkv_dx": (0.30, 0.29)}  # fmt: skip
    triton = "".join(row(p, "tma", a, 1, 1, 1, "1e-3") + row(p, "tma 256x128", b, 1, 1, 1, "1e-3")
                     for p, (a, b) in store.items())  # fmt: skip
    triton += row("fc1_gelu", "tma", 0.50, 1, 1, 1, "1e-3") + row("fc1_gelu", "tma 256x128", 0.49, 1, 1, 1, "1e-3")
    triton += row("fc1_gelu", "tma halves", "WRONG", 1, 1, 1, "0.5")
    triton += row("fc2", "tma flatten off", 0.41, 1, 1, 1, "1e-3")
    shipped = "shipped: cooperative 128x256x64 cluster 2x1"
    cuda_variants = "".join(row(p, shipped, t, 1, 1, 1, 1, "1e-3") for p, t in (("qkv", 0.35), ("proj", 0.12),
                                                                               ("fc2", 0.38)))  # fmt: skip
    cuda_variants += row("qkv", "pingpong_128x128", 0.33, 1, 1, 1, 1, "1e-3")
    cuda_variants += "| proj | pingpong_128x128 | FAILED: RuntimeError: refused | | | | | |\n"
    cuda_variants += row("fc2", "pingpong_128x128", 0.37, 1, 1, 1, 1, "1e-3")
    for p, t in (("qkv", 0.34), ("proj", 0.115), ("fc2", 0.37)):
        cuda_variants += row(p, "cooperative_256x128_cluster1x2", t, 1, 1, 1, 1, "1e-3")
    ab = "mlp_bwd (act and dfc1_bias by separate passes)"
    fused = "dhidden = dy @ W2 * GELU'(hidden) + act + dfc1_bias partial sums"
    cuda = (row("mlp_bwd", "sm_90a", fused, 0.56, 1, 1, 1, 1)
            + row("mlp_bwd", "sm_90a", "dfc1_bias: sum of the partial sums", 0.01, 1, 1, 1, 1)
            + row("mlp_bwd", "sm_90a", "dW2 = dy^T @ act (stream-K)", 0.4, 1, 1, 1, 1)
            + row(ab, "sm_90a", "dhidden = dy @ W2 * GELU'(hidden)", 0.50, 1, 1, 1, 1)
            + row(ab, "sm_90a", "act = gelu(hidden): row pass", 0.15, 1, 1, 1, 1)
            + row(ab, "sm_90a", "dfc1_bias colsum: partial sums", 0.09, 1, 1, 1, 1)
            + row(ab, "sm_90a", "dfc1_bias colsum: finish", 0.01, 1, 1, 1, 1)
            + row(ab, "sm_90a", "dW2 = dy^T @ act (stream-K)", 0.4, 1, 1, 1, 1))  # fmt: skip
    log = (
        "## probe_gemm: ViT block GEMMs\n\n| product | way | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |\n"
        f"|---|---|---|---|---|---|---|\n{triton}\n"
        "## cuda: mma.sync vs sm_90a (CUTLASS) vs cuBLAS\n\n"
        "| launcher | path | product | ms (median) | TFLOP/s | % peak | x cuBLAS | rel err |\n"
        f"|---|---|---|---|---|---|---|---|\n{cuda}\n"
        "## cuda: linear_bias configuration variants (sm_90a, bf16; csrc/gemm_sm90_variants.cu)\n\n"
        "| product | kernel | ms (median) | TFLOP/s | % peak | x shipped | x cuBLAS | rel err |\n"
        f"|---|---|---|---|---|---|---|---|\n{cuda_variants}"
    )
    verdicts = {(backend, variant): verdict for backend, variant, _, verdict in goals.variant_rows(log)}
    assert verdicts == {
        ("triton", "256x128 (store epilogue)"): "switch",  # faster at all five, by 5% at fc2
        ("triton", "256x128 (gelu epilogue)"): "keep shipped: under 3% faster everywhere",
        ("triton", "halves (gelu epilogue)"): "keep shipped: not measured or not correct at fc1_gelu",
        ("triton", "flatten off (store epilogue)"): "keep shipped: not measured or not correct at qkv_fwd_packed, "
        "proj, mlp_dx, qkv_dx",
        ("cuda", "linear_bias pingpong_128x128"): "keep shipped: not measured or not correct at proj",
        ("cuda", "linear_bias cooperative_256x128_cluster1x2"): "switch",
    }
    measured, verdict = goals.dgelu_epilogue_rule(log)
    assert measured == "epilogue 0.570 ms, separate passes 0.750 ms"
    assert verdict == "both switches on: the epilogue is 1.32x faster"
    slower = log.replace("| 0.56 |", "| 0.80 |")
    assert goals.dgelu_epilogue_rule(slower)[1] == (
        "SM90_ACT_IN_EPILOGUE and SM90_DFC1_BIAS_IN_EPILOGUE off: the epilogue is 8% slower"
    )
    # shipped the other way round (the switches off): "mlp_bwd" runs the separate passes, the A / B the epilogue
    other = "mlp_bwd (act and dfc1_bias in the d-GELU epilogue)"
    swapped = log.replace("| mlp_bwd |", f"| {other} |").replace(f"| {ab} |", "| mlp_bwd |")
    assert goals.dgelu_epilogue_rule(swapped) == (measured, verdict)
    assert goals.dgelu_epilogue_rule("no tables") is None


def test_kernel_report_lists_every_cuda_kernel():
    so, why = kernel_report.find_extension()
    if so is None:
        pytest.skip(why)
    tool, why = kernel_report.find_cuobjdump()
    if tool is None:
        pytest.skip(why)
    usage = subprocess.run([tool, "--dump-resource-usage", str(so)], capture_output=True, text=True, check=True).stdout
    # Functions per arch in the ELF sections (PTX sections list none).
    n_functions = len(re.findall(r"^\s*Function \S+:\s*$", usage, re.M))
    out = run_script("kernel_report.py", "--no-triton")
    cuda_rows = [line for line in out.splitlines() if line.startswith("| cuda |")]
    assert n_functions > 0 and len(cuda_rows) == n_functions, out
    assert {"sm_80", "sm_90a"} <= {c.split("|")[3].strip() for c in cuda_rows}


# ----------------------------------------------------------------------------------------------------
# formulas and parsers on known inputs
# ----------------------------------------------------------------------------------------------------
def test_flop_and_byte_formulas():
    assert common.attention_flops(2, 3, 197, 64, "fwd") == 4 * 2 * 3 * 197**2 * 64
    assert common.attention_flops(2, 3, 197, 64, "fwd_bwd") == 3.5 * common.attention_flops(2, 3, 197, 64, "fwd")
    assert common.attention_bytes(1, 1, 10, 8, 2, "fwd") == 4 * 10 * 8 * 2
    assert common.attention_bytes(1, 1, 10, 8, 2, "bwd") == 8 * 10 * 8 * 2 + 4 * 10
    assert common.linear_flops(5, 7, 11, "fwd_bwd") == 3 * 2 * 5 * 7 * 11
    # ViT-B/16 at 224: timm lists 17.6 GMACs per image, i.e. ~35.2 GFLOP.
    assert 34.9e9 < common.vit_flops_per_image(224, 16, 768, 12, 12, 4.0, 1000) < 35.4e9
    peaks = common.Peaks(copy_gbps=1000.0, matmul_tflops={"bf16": 100.0})
    # 1 TFLOP at 100 TFLOP/s: 10 ms floor; measured 20 ms -> 50 %.
    assert common.roofline_fraction(1e12, 1e6, 20.0, peaks, "bf16") == pytest.approx(0.5)


RESOURCE_SNIPPET = """
Fatbin ptx code:
================
arch = sm_80

Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4gemmI13__nv_bfloat16EvPT_:
  REG:128 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6colsumIfEvPT_:
  REG:26 STACK:0 SHARED:2176 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS_SNIPPET = """
Fatbin elf code:
================
arch = sm_90a
	code for sm_90
		Function : _Z4gemmI13__nv_bfloat16EvPT_
        /*0010*/                   HMMA.16816.F32.BF16 R56, R4, R8, R56 ;
        /*0020*/              @!P0 STL [R1+0x4], R2 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/                   UTMALDG.2D [UR8], [UR4] ;
		Function : _Z6colsumIfEvPT_
        /*0010*/                   FADD R1, R2, R3 ;
"""


def test_cuobjdump_parsers_and_spill_gate():
    usage = kernel_report.parse_resource_usage(RESOURCE_SNIPPET)
    assert usage[("sm_80", "_Z4gemmI13__nv_bfloat16EvPT_")]["REG"] == 128
    assert usage[("sm_80", "_Z6colsumIfEvPT_")]["SHARED"] == 2176
    sass = kernel_report.parse_sass(SASS_SNIPPET)
    tma = {"utmaldg": 0, "utmastg": 0}
    assert sass[("sm_90a", "_Z4gemmI13__nv_bfloat16EvPT_")] == {
        "hmma": 1, "hgmma": 1, "local_ld_st": 1, **tma, "utmaldg": 1
    }  # fmt: skip
    assert sass[("sm_90a", "_Z6colsumIfEvPT_")] == {"hmma": 0, "hgmma": 0, "local_ld_st": 0, **tma}
    hot = {
        "source": "cuda",
        "kernel": "gemm_tc_kernel<bf16>",
        "arch": "sm_80",
        "dtype": "bf16",
        "hot": True,
        "local": 8,
    }
    cold = {**hot, "kernel": "colsum_kernel<float>", "dtype": "fp32", "hot": False}
    assert kernel_report.is_hot("gemm_tc_kernel<bf16>", "bf16") and not kernel_report.is_hot("colsum<bf16>", "bf16")
    assert len(kernel_report.violations([hot, cold])) == 1
    assert kernel_report.violations([{**hot, "local": 0}]) == []


def test_host_overhead_says_it_needs_a_gpu_and_its_parts_run(bench_module, monkeypatch, capsys):
    """benchmarks/host_overhead.py: without CUDA it says so and exits 2 (no table of nothing); its timing and
    cProfile parts run on any callable (the device syncs stubbed where there is no GPU)."""
    ho = bench_module("host_overhead")
    if not torch.cuda.is_available():
        assert ho.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().out
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def work():
        calls.append(sum(range(1000)))

    assert ho.host_ms(work, calls=3) > 0 and len(calls) == 3
    text = ho.host_profile(work, calls=4, lines=5)
    assert "work" in text and len(calls) == 7


def test_host_overhead_cpu_stubs_times_our_python_layers():
    """--cpu-stubs: the triton backend's Python on CPU with every Triton launch a no-op, beside torch; one row per
    op and mode with both times, and with --cprofile where the triton call's host time goes."""
    out = run_script("host_overhead.py", "--cpu-stubs", "--ops", "proj_residual", "--cprofile",
                     env_extra={"TRITON_INTERPRET": "1"})  # fmt: skip
    rows = table_rows(out)
    assert [(r["op"], r["mode"]) for r in rows] == [("proj_residual", "fwd"), ("proj_residual", "fwd+bwd")], out
    assert all(float(r["torch us"]) > 0 and float(r["triton (launches stubbed) us"]) > 0 for r in rows), out
    assert "proj_residual, triton (launches stubbed), fwd+bwd: host time by function" in out
