"""The chaos/soak run of benchmarks/chaos.py, briefly: tasks under a SIGKILL every 100 ms end
exactly once (zero lost, zero duplicated, no hang), and pool lifecycles leak nothing.

The full run (1,000,000 tasks, 1,000 lifecycles) is for machines with time to spare:
``PROCPOOL_STRESS=1 pytest tests/stress``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"
FULL = os.environ.get("PROCPOOL_STRESS") == "1"


@pytest.mark.stress
@pytest.mark.timeout(3000 if FULL else 240)
@pytest.mark.parametrize("retries", [0, 1])
def test_tasks_under_sigkill_storm_end_exactly_once_and_lifecycles_leak_nothing(retries):
    args = ["--retries", str(retries)]
    if not FULL:
        args += ["--tasks", "30000", "--lifecycles", "30"]
    out = subprocess.run(
        [sys.executable, str(CHAOS), *args],
        capture_output=True,
        text=True,
        timeout=2900 if FULL else 200,
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lost 0, duplicated 0" in out.stdout
    assert "leaked processes 0, fds 0, /dev/shm entries 0" in out.stdout
