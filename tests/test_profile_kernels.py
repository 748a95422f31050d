"""benchmarks/profile_kernels.py's digest of an ncu CSV, on a synthetic one (ncu needs a GPU): launches split at
the marker kernels and named by case, durations converted to microseconds and summed per case."""

import csv
import importlib
import io
from pathlib import Path

import pytest

HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
          "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]  # fmt: skip


@pytest.fixture
def profile_kernels(monkeypatch):
    """benchmarks/profile_kernels.py as a module; monkeypatch restores sys.path (benchmarks has a conftest.py)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    return importlib.import_module("profile_kernels")


def _ncu_csv(launches) -> str:
    buf = io.StringIO()
    buf.write("==PROF== Connected to process 1 (python3)\n")  # ncu's own lines come first
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL)
    writer.writerow(HEADER)
    for i, (kernel, duration, unit) in enumerate(launches):
        common = [str(i), "1", "python3", "host", kernel, "1", "7", "(128, 1, 1)", "(99, 1, 1)", "0", "9.0"]
        writer.writerow([*common, "GPU Speed Of Light Throughput", "Duration", unit, duration])
        writer.writerow([*common, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "61.5"])
        writer.writerow([*common, "Launch Statistics", "Waves Per SM", "", "1.09"])
    return buf.getvalue()


def test_digest_names_each_launch_by_its_case(tmp_path, profile_kernels):
    launches = []
    for i, _case in enumerate(profile_kernels.CASES):
        launches.append(("void at::cuda::spin_kernel(long)", "1,000", "nsecond"))
        launches.append((f"kernel_{i}_a", "2,500", "ns"))  # how ncu 2025 writes it (the H200 run)
        if i == 0:
            launches.append(("kernel_0_b", "1.5", "msecond"))  # how older ncu writes it
    path = tmp_path / "ncu.csv"
    path.write_text(_ncu_csv(launches))
    text = profile_kernels.digest(path)
    first, second = profile_kernels.CASES[:2]
    assert f"### {first[0]} {first[1]}: 2 launches, 1502 us" in text  # 2.5 us + 1.5 ms
    assert f"### {second[0]} {second[1]}: 1 launches, 2 us" in text
    assert "| kernel_0_b | 1500.0 | 61.5 | n/a | n/a | 1.09 | n/a | n/a |" in text
    assert "spin_kernel" not in text


def test_digest_refuses_a_csv_that_does_not_match_the_cases(tmp_path, profile_kernels):
    path = tmp_path / "ncu.csv"
    path.write_text(_ncu_csv([("void at::cuda::spin_kernel(long)", "1", "usecond"), ("k", "1", "usecond")]))
    with pytest.raises(SystemExit, match="1 spin_kernel markers, expected one per case"):
        profile_kernels.digest(path)
    marked = [("void at::cuda::spin_kernel(long)", "1", "us"), ("k", "1", "fortnight")]
    path.write_text(_ncu_csv(marked * len(profile_kernels.CASES)))
    with pytest.raises(SystemExit, match="duration unit 'fortnight' of k is not one of"):
        profile_kernels.digest(path)
    path.write_text("not a csv\n")
    with pytest.raises(SystemExit, match="no ncu CSV header"):
        profile_kernels.digest(path)
