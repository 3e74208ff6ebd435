"""The tutorial's programs, run for real: the process pool as the tutorial teaches it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tasks import pid, sleep_then, square

import procpool as multiprocessing  # the tutorial's own import, pointed at procpool

ROOT = Path(__file__).resolve().parents[1]


def test_pool_apply_async_get_close_join():
    # 1. create a pool with a few processes; 2. queue events; 3. the processes handle them;
    # 4. once every event is handled, close and reclaim the pool
    pool = multiprocessing.Pool(4)
    results = [pool.apply_async(sleep_then, (0.05, n)) for n in range(10)]
    pool.close()
    pool.join()
    assert [r.get() for r in results] == list(range(10))


def test_close_means_no_new_events():
    pool = multiprocessing.Pool(2)
    pool.close()
    try:
        pool.apply_async(square, (1,))
    except ValueError:
        pass
    else:
        raise AssertionError("apply_async after close() must raise ValueError")
    pool.join()


def test_apply_runs_events_one_after_another():
    with multiprocessing.Pool(2) as pool:
        assert [pool.apply(square, (i,)) for i in range(5)] == [0, 1, 4, 9, 16]


def test_map_equals_apply_async_get_per_item():
    # the tutorial: r = pool.map(fun, test)  ==  [pool.apply_async(fun, (i,)).get() for i in test]
    with multiprocessing.Pool(3) as pool:
        test = range(20)
        r = pool.map(square, test)
        r2 = []
        for i in test:
            res = pool.apply_async(square, (i,))
            r2.append(res.get())
        assert r == r2 == [i * i for i in test]


def test_the_pools_processes_are_reused_not_recreated():
    with multiprocessing.Pool(2) as pool:
        pids = set(pool.map(pid, range(200), chunksize=1))
        assert pids <= set(pool.pids()) and len(pids) <= 2


def test_the_readme_example_runs_as_a_script(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum("handled by process" in line for line in lines) == 10
    assert "[1, 2, 3]" in lines


def test_procpool_demo_runs_and_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "procpool", "demo", "-n", "3", "-e", "6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "pool closed and joined" in out.stdout
    assert "WorkerLost" not in out.stderr
