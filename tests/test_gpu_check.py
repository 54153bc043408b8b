"""bench/gpu_check.py, the prepared GPU check, dry-run on the CPU kernel so it cannot rot before a GPU runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_engine import EXT


@pytest.mark.skipif(not EXT.available, reason=f"copylora._C not built ({EXT.error})")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--log", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    table = done.stdout[done.stdout.index("copylora GPU check on cpu") :]
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in table.splitlines() if line.startswith("| ") and "| check" not in line]
    checks = [row.split("|")[1].strip() for row in rows]
    assert checks[:2] == ["build", "tests/test_cuda.py tests/test_torch_backend_cuda.py"]
    assert sum(check.startswith("accuracy") for check in checks) == 3
    assert sum(check.startswith("routes") for check in checks) == 2
    assert sum(check.startswith("timing") for check in checks) == 2
    assert all("| ok " in row for row in rows)
    # --log keeps each step's whole output (one GPU call is all a session may get)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["accuracy.log", "routes.log", "tests.log", "timing.log"]
