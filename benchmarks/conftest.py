"""Setup of the pytest-benchmark suite (benchmarks/test_bench_ops.py), which the default `pytest` run never
collects (pyproject's testpaths is tests/): `python -m pytest benchmarks/ --benchmark-only`.

The tests' own conftest is loaded (as `tests_conftest`) before any kernel module is imported: it switches
Triton's interpreter on when there is no CUDA device, and holds `rel_error` and `TOLERANCES`, the parity
definitions every timing here is checked against first.
"""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "tests_conftest", Path(__file__).resolve().parent.parent / "tests" / "conftest.py"
)
tests_conftest = importlib.util.module_from_spec(_spec)
sys.modules["tests_conftest"] = tests_conftest
_spec.loader.exec_module(tests_conftest)

_seed = tests_conftest._seed  # the tests' autouse fixture: torch.manual_seed(0) before every benchmark
