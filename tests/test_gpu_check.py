"""benchmarks/gpu_check.sh keeps its promises on a machine without a GPU: it ends within its budget, every
stage of the report is `ran`, `skipped: <reason>` or `timed out`, at most 4 files land in OUT, and a stage that
overruns its slice is killed (its whole process group) and reported while the stages after it still run."""

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("build", "info", "smoke", "headline", "tests", "attn_tables", "mlp_tables", "vit_tables", "block_tables",
          "profile", "gemm_ab", "pytest_bench", "memcheck", "racecheck", "tune", "compile_tables",
          "auto_table", "vit_auto")  # fmt: skip
GPU_STAGES = set(STAGES) - {"info", "auto_table"}

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the check builds and runs every stage for real: run it by hand"
)


def run_check(tmp_path, *args, timeout=150):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=os.environ.get("PYTHON", __import__("sys").executable))
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(SCRIPT), "--results-dir", str(tmp_path / "results"), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    reports = list(out.glob("*.md"))
    assert len(reports) == 1, f"OUT holds {sorted(p.name for p in out.iterdir())}\n{res.stdout}\n{res.stderr}"
    return res, seconds, out, reports[0].read_text()


def stage_lines(report: str) -> dict[str, str]:
    """The report's stage list: {stage: status}."""
    section = report.split("## Stages", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^- (\w+): (.+)$", section, re.M))


def test_cpu_run_ends_within_budget_with_every_stage_reported(tmp_path):
    res, seconds, out, report = run_check(tmp_path, "--budget", "60")
    assert res.returncode == 0, res.stdout + res.stderr
    assert seconds < 90, f"took {seconds:.0f} s"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 4 and any(f.endswith(".tar.gz") for f in files), files
    lines = stage_lines(report)
    assert list(lines) == list(STAGES), lines
    for stage, status in lines.items():
        assert re.match(r"(ran\b|skipped: \S|timed out)", status), f"{stage}: {status}"
        if stage in GPU_STAGES:
            assert status == "skipped: no CUDA device", f"{stage}: {status}"
    # info imports vit_kernels: seconds, unless the machine is so loaded that its slice runs out (then it says so)
    assert lines["info"].startswith(("ran, exit 0", "timed out")), lines["info"]
    if lines["info"].startswith("ran"):
        assert '"available_backends"' in report  # info's output made it into the report
    # the same report is kept for committing, and the tarball holds every stage's log
    assert (tmp_path / "results" / next(out.glob("*.md")).name).read_text() == report
    with tarfile.open(next(out.glob("*.tar.gz"))) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"info.log", "report.md"} <= names, names


def test_a_stage_past_its_slice_is_killed_and_later_stages_still_run(tmp_path):
    # smoke sleeps for ten minutes in a child process; headline (sleep 0) must still run after it.
    fakes = ["--fake-stage", "smoke=600", "--fake-stage", "headline=0"]
    res, seconds, out, report = run_check(tmp_path, "--budget", "30", "--only", "smoke,headline", *fakes)
    assert seconds < 40, f"took {seconds:.0f} s: the sleeping stage was not killed at its slice"
    assert res.returncode == 1, "a timed-out stage must make the exit status non-zero"
    lines = stage_lines(report)
    assert lines["smoke"].startswith("timed out"), lines
    assert lines["headline"].startswith("ran, exit 0"), lines
    assert lines["tests"] == "skipped: not in --only", lines
    assert "## smoke (timed out" in report
    # the sleeping grandchild went with its stage: timeout signalled the whole process group
    child = re.search(r"fake smoke: child (\d+)", res.stdout)
    assert child, res.stdout
    proc = Path(f"/proc/{child.group(1)}")
    assert not proc.exists() or "sleep" not in (proc / "cmdline").read_text(), "the stage's child outlived the kill"


# ----------------------------------------------------------------------------------------------------
# a result never faked or lost: a check that did not run says so in its exit status, nothing is overwritten
# ----------------------------------------------------------------------------------------------------
def run_raw(tmp_path, *args, env_extra=None, timeout=120):
    """The script as run_check runs it, without assuming a report was written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "out"), PYTHON=os.environ.get("PYTHON", sys.executable))
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("only", ["smok,test", "smoke,,info", ""])
def test_unknown_stage_in_only_is_an_error_before_anything_runs(tmp_path, only):
    res = run_raw(tmp_path, "--results-dir", str(tmp_path / "results"), "--only", only)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--only" in res.stderr and "build info smoke headline tests" in res.stderr, res.stderr
    if only == "smok,test":
        assert "smok, test" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()  # nothing ran
    assert "===" not in res.stdout, res.stdout


def test_an_unknown_fake_stage_is_an_error(tmp_path):
    res = run_raw(tmp_path, "--results-dir", str(tmp_path / "results"), "--fake-stage", "smok=1")
    assert res.returncode == 2 and "smok" in res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize("python", ["false", "no_torch"])
def test_a_failed_device_probe_is_an_error_not_an_absent_gpu(tmp_path, python):
    """PYTHON that cannot run, or a Python without a working torch: the GPU stages did not run because the check
    could not look, not because there is no GPU. The report and the exit status say so."""
    env_extra = {"PYTHON": "/bin/false"}
    if python == "no_torch":
        (tmp_path / "shadow").mkdir()
        (tmp_path / "shadow" / "torch.py").write_text('raise ImportError("no torch in this interpreter")')
        env_extra = {"PYTHONPATH": str(tmp_path / "shadow")}
    res, _, _, report = run_check_env(tmp_path, env_extra, "--budget", "40", "--only", "smoke,auto_table")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = stage_lines(report)
    assert lines["smoke"].startswith("not run: the device probe failed"), lines
    assert lines["auto_table"].startswith("not run: the device probe failed"), lines
    assert "no CUDA device" not in report, report
    assert "device probe: FAILED" in report, report
    if python == "no_torch":
        assert "no torch in this interpreter" in report, report


def run_check_env(tmp_path, env_extra, *args):
    """run_check with extra environment: (result, seconds, OUT, the report's text)."""
    t0 = time.monotonic()
    res = run_raw(tmp_path, "--results-dir", str(tmp_path / "results"), *args, env_extra=env_extra, timeout=150)
    reports = list((tmp_path / "out").glob("*.md"))
    assert len(reports) == 1, f"{res.stdout}\n{res.stderr}"
    return res, time.monotonic() - t0, tmp_path / "out", reports[0].read_text()


def test_paths_with_quotes_and_spaces_work_and_the_work_folder_is_removed(tmp_path):
    tmpdir = tmp_path / 'it\'s a "tmp" $dir'
    tmpdir.mkdir()
    res, _, out, report = run_check_env(tmp_path, {"TMPDIR": str(tmpdir)}, "--budget", "60", "--only", "info")
    assert res.returncode == 0, res.stdout + res.stderr
    python_line = next(line for line in report.splitlines() if line.startswith("- python:"))
    assert "torch " in python_line, python_line  # the probe ran and wrote the versions
    assert stage_lines(report)["smoke"] == "skipped: not in --only"
    assert "device probe: FAILED" not in report, report
    assert not list(tmpdir.glob("gpu_check.*")), "the work folder was left behind"  # (torch leaves a cache there)
    with tarfile.open(next(out.glob("*.tar.gz"))) as tar:
        assert "info.log" in {Path(n).name for n in tar.getnames()}  # what OUT got is kept


def test_an_asked_for_stage_that_could_not_run_makes_the_exit_status_non_zero(tmp_path):
    # a 5 s budget leaves nothing after the 6 s kept in reserve: info is asked for and cannot run
    res, _, _, report = run_check_env(tmp_path, {}, "--budget", "5", "--only", "info")
    assert res.returncode == 1, res.stdout + res.stderr
    assert stage_lines(report)["info"].startswith("not run: budget spent"), report


def _has_c_for_this_python() -> bool:
    """Whether the checkout holds a _C for this interpreter (CI's Triton-only environments have none)."""
    import sysconfig

    return (ROOT / "vit_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").is_file()


def test_a_second_call_skips_the_build_only_for_the_same_sources_and_settings(tmp_path):
    """A lease's second call finds _C built by the first (or carried in, built with --record-build): the build
    stage is skipped when the recorded key (sources, settings, the interpreter's extension suffix, the CUTLASS
    version and the module itself) still matches and the module imports, and runs when anything in it changed.
    With no _C for this interpreter (CI's Triton-only environments) there is nothing to record: every call builds."""
    key = tmp_path / "build.key"
    has_c = _has_c_for_this_python()
    cutlass = {}
    for version in ("4.2.0", "4.3.0"):  # two CUTLASS folders, told apart by their version.h only
        folder = tmp_path / f"cutlass-{version}"
        (folder / "include" / "cutlass").mkdir(parents=True)
        major, minor, patch = version.split(".")
        (folder / "include" / "cutlass" / "version.h").write_text(
            f"#define CUTLASS_MAJOR {major}\n#define CUTLASS_MINOR {minor}\n#define CUTLASS_PATCH {patch}\n"
        )
        cutlass[version] = str(folder)

    def build_status(run, version):
        env = {"GPU_CHECK_BUILD_KEY": str(key), "VIT_KERNELS_CUTLASS_DIR": cutlass[version]}
        res, _, _, report = run_check_env(tmp_path / run, env, "--budget", "30", "--only", "build",
                                          "--fake-stage", "build=0")  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        return stage_lines(report)["build"]

    assert build_status("first", "4.2.0").startswith("ran, exit 0")
    assert key.is_file() == has_c
    second = build_status("second", "4.2.0")
    if has_c:
        assert second.startswith("skipped: vit_kernels/_C") and "built from these sources already" in second, second
        assert build_status("other CUTLASS", "4.3.0").startswith("ran, exit 0")
        key.write_text("a key from other sources\n")
        assert build_status("other sources", "4.3.0").startswith("ran, exit 0")
    else:
        assert second.startswith("ran, exit 0"), second


def test_record_build_keys_the_module_to_its_arch(tmp_path):
    """--record-build ARCH builds _C here for a GPU machine and records its key with ARCH in it (nothing else runs):
    a call that builds for another arch (here: none, no --arch-only on a CPU) does not take it for its own."""
    key = tmp_path / "build.key"
    has_c = _has_c_for_this_python()
    env = {"GPU_CHECK_BUILD_KEY": str(key)}
    res = run_raw(tmp_path / "record", "--record-build", "90a", "--fake-stage", "build=0", env_extra=env)
    if not has_c:
        assert res.returncode == 1 and "the build wrote no" in res.stderr, res.stdout + res.stderr
        return
    assert res.returncode == 0 and "recorded" in res.stdout and "===" not in res.stdout, res.stdout + res.stderr
    assert key.is_file() and not (tmp_path / "record" / "out").exists()  # no stage ran, no report
    res, _, _, report = run_check_env(tmp_path / "call", env, "--budget", "30", "--only", "build",
                                      "--fake-stage", "build=0")  # fmt: skip
    assert stage_lines(report)["build"].startswith("ran, exit 0"), report


def test_record_build_records_no_key_when_a_source_changed_during_the_build(tmp_path):
    """The key names the sources the module was built from; they are hashed before the build, and if one changed
    while it ran (an edit during the ~5-minute build) the module may hold either version: no key is recorded, so a
    GPU machine handed the module builds it again instead of trusting it. Runs on a copy of the build inputs."""
    import shutil
    import sysconfig

    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "benchmarks" / "gpu_check.sh")
    for name in ("setup.py", "CMakeLists.txt"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / "vit_kernels").mkdir()
    (tree / "vit_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"a module")
    key = tree / "build" / "gpu_check-build.key"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=os.environ.get("PYTHON", sys.executable), OUT=str(tmp_path / "out"))
    cmd = ["bash", str(tree / "benchmarks" / "gpu_check.sh"), "--record-build", "90a", "--fake-stage", "build=4"]

    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=120)
    assert quiet.returncode == 0 and "recorded" in quiet.stdout, quiet.stdout + quiet.stderr
    assert key.is_file()
    key.unlink()
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
    deadline = time.monotonic() + 60
    while "sleep" not in subprocess.run(["ps", "-o", "args=", "--ppid", str(run.pid)], capture_output=True,
                                        text=True).stdout and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.1)  # the (fake) build has started
    with open(tree / "csrc" / "gemm.cu", "a") as f:
        f.write("// an edit made while the build ran\n")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "changed during the build; no key recorded" in err, out + err
    assert not key.exists()


def test_a_rerun_never_replaces_an_earlier_report(tmp_path):
    first = run_raw(tmp_path, "--results-dir", str(tmp_path / "results"), "--budget", "30", "--only", "auto_table")
    assert first.returncode == 0, first.stdout + first.stderr
    (report,) = (tmp_path / "results").glob("*.md")
    text = report.read_text()
    second = run_raw(tmp_path, "--results-dir", str(tmp_path / "results"), "--budget", "30", "--only", "auto_table")
    assert second.returncode == 0, second.stdout + second.stderr
    reports = {p.name for p in (tmp_path / "results").glob("*.md")}
    assert reports == {report.name, report.name.replace(".md", "-2.md")}, reports
    assert report.read_text() == text
    assert {p.name for p in (tmp_path / "out").iterdir()} >= reports  # OUT gets both too


def test_by_default_the_report_goes_to_an_untracked_folder(tmp_path):
    """Without --results-dir nothing lands in the committed benchmarks/results/: the report and the logs go to
    benchmarks/out/, which git ignores."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = os.environ.get("PYTHON", sys.executable)
    committed = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout  # fmt: skip
    res = subprocess.run(["bash", str(SCRIPT), "--budget", "30", "--only", "auto_table"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    written = [ROOT / m for m in re.findall(r"^gpu_check: (?:report|logs) (\S+)$", res.stdout, re.M)]
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert len(written) == 2 and all(p.is_file() for p in written), res.stdout
        for path in written:
            assert path.parent == ROOT / "benchmarks" / "out", path
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
            assert ignored.returncode == 0, f"{path} is not ignored by git"
        after = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout  # fmt: skip
        assert after == committed
    finally:
        for path in written:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# benchmarks/smoke_parity.py, the check's second stage: on CPU with Triton under the interpreter, tiny shapes
# ----------------------------------------------------------------------------------------------------
def test_smoke_parity_prints_one_line_per_case_and_skips_cuda_with_its_reason(tmp_path):
    # --jobs 2: the (op, dtype) groups in two processes, as gpu_check runs it; the rows merged at the end
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [os.environ.get("PYTHON", __import__("sys").executable), str(ROOT / "benchmarks" / "smoke_parity.py"),
         "--tiny", "--ops", "attention", "--dtypes", "bf16,fp32", "--jobs", "2", "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    cases = [line for line in res.stdout.splitlines() if line.startswith("attention triton")]
    assert len(cases) == 4 and all(" PASS " in c for c in cases), res.stdout  # 2 dtypes (a process each) x 2 shapes
    assert res.stdout.count("smoke parity:") == 1, res.stdout  # one merged summary
    assert re.search(r"^\*\s+cuda .* SKIP: \S", res.stdout, re.M), res.stdout
    rows = __import__("json").loads((tmp_path / "rows.json").read_text())
    assert {(r["dtype"], r["shape"]) for r in rows if r["status"] == "PASS"} == {
        (d, s) for d in ("bf16", "fp32") for s in ("N=17 D=64 packed", "N=9 D=80")
    }
    assert all(0 < r["max_err"] <= r["tol"] for r in rows if r["status"] == "PASS")


@pytest.mark.parametrize("wrong", ["scaled", "nan"])
def test_smoke_parity_fails_a_wrong_kernel(monkeypatch, capsys, wrong):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # undone after the test (benchmarks/ has a conftest.py)
    import smoke_parity

    right = smoke_parity.vk.attention

    def broken(q, k, v, **kw):
        out = right(q, k, v, **kw)
        return out * 1.01 if wrong == "scaled" else out + float("nan")

    monkeypatch.setattr(smoke_parity.vk, "attention", broken)
    assert smoke_parity.main(["--tiny", "--ops", "attention", "--backends", "triton", "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    assert out.count(" FAIL ") == 2 and "2 FAIL" in out, out


def test_smoke_parity_writes_each_case_line_in_one_call(monkeypatch):
    """--jobs' children share one stdout: a line written in two calls (text, then newline, as print() does) can have
    another child's line land between them. CI once merged two case lines that way."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import smoke_parity

    writes = []
    monkeypatch.setattr(sys, "stdout", type("Recorder", (), {"write": writes.append, "flush": lambda self: None})())
    row = dict(op="attention", backend="triton", dtype="bf16", shape="N=9 D=80", status="SKIP", reason="why")
    smoke_parity.print_row(row)
    assert writes == [smoke_parity.line(row) + "\n"]


def test_failures_are_logged_as_they_happen(tmp_path, monkeypatch):
    """The tests stage sets VIT_KERNELS_FAILURES_LOG: tests/conftest.py appends each failure's traceback there at
    once (pytest prints them only at the end, lost when the stage's slice runs out), from the main process only."""
    import types

    import conftest

    log = tmp_path / "failures.log"
    monkeypatch.setenv("VIT_KERNELS_FAILURES_LOG", str(log))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    report = types.SimpleNamespace(nodeid="tests/x.py::test_y", when="call", failed=True, longreprtext="E   boom")
    conftest.pytest_runtest_logreport(report)
    conftest.pytest_runtest_logreport(types.SimpleNamespace(**{**vars(report), "failed": False, "nodeid": "ok"}))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a worker: its report reaches the main process too
    conftest.pytest_runtest_logreport(report)
    assert log.read_text() == "=== tests/x.py::test_y (call)\nE   boom\n"


def test_the_readme_lease_plan_fits_a_lease():
    """README's two gpu_check calls name real stages, and fit the device's limits: each call's budget plus ~30 s
    of slack under the 600 s a command may run, and both plus the machine's start (~30 s) under the 900 s a lease
    has in all."""
    readme = (ROOT / "README.md").read_text()
    plan = readme.split("a lease runs two calls", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    calls = [c for c in plan.replace("\\\n", " ").splitlines() if "gpu_check.sh" in c]
    assert len(calls) == 2, calls
    budgets = []
    for call in calls:
        budget = int(re.search(r"--budget (\d+)", call).group(1))
        only = re.search(r"--only (\S+)", call).group(1).split(",")
        assert set(only) <= set(STAGES), only
        assert budget + 30 <= 600, call
        budgets.append(budget)
    assert sum(budgets) + 2 * 30 <= 900, budgets
