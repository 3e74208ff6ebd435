"""Large arguments under a SIGKILL storm: the reused memfd segments (``procpool._buffers``)
never show a task another task's bytes, whatever dies when, and nothing is left behind.

Each task gets an array filled with its own index and checks it (and returns it): a segment
rewritten while a worker still maps it, or a retry sent someone else's segment, would show as a
wrong value.  ``PROCPOOL_STRESS=1`` runs it longer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import pytest
from conftest import open_fds, wait_until

import procpool

FULL = os.environ.get("PROCPOOL_STRESS") == "1"
N = 64 * 1024  # float64 items: 512 KiB, above the out-of-band threshold


def check(a):
    first, last = float(a[0]), float(a[-1])
    if first != last or float(a[N // 2]) != first:
        raise AssertionError(f"torn argument: {first} {float(a[N // 2])} {last}")
    return first


def _mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "procpool-arg" in line]


@pytest.mark.stress
@pytest.mark.timeout(900 if FULL else 120)
def test_reused_argument_segments_under_a_sigkill_storm():
    seconds = 120 if FULL else 5
    before = open_fds()
    stop = threading.Event()
    kills = 0
    checked = 0
    with procpool.Pool(2, retries=8) as pool:

        def killer():
            nonlocal kills
            while not stop.wait(0.1):
                pids = pool.pids()
                if pids:
                    try:
                        os.kill(random.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + seconds
            r = 0
            while time.monotonic() < deadline:
                base = r * 1000
                arrays = [np.full(N, float(base + i)) for i in range(50)]
                results = pool.map_async(check, arrays, chunksize=1).get(60)
                assert results == [float(base + i) for i in range(50)]
                for i in range(0, 50, 10):  # single calls too (the idle fast path)
                    assert pool.apply_async(check, (arrays[i],)).get(60) == float(base + i)
                checked += 55
                r += 1
        finally:
            stop.set()
            thread.join(5)
    print(f"{checked} large arguments checked, {kills} workers killed")
    assert kills >= 10 and checked >= 500
    assert wait_until(lambda: not _mappings(), 5.0), _mappings()
    assert wait_until(lambda: set(open_fds()) <= set(before), 5.0), set(open_fds()) - set(before)
