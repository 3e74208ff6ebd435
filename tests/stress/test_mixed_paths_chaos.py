"""Every submission path at once under a SIGKILL storm: ``apply`` (its quick path), bursts of
``apply_async`` and ``submit`` whose plain calls and scalar results travel batched (CALLS and
VALUES records) among strings, lists and errors, and ``map`` -- from four threads, while a fifth
kills a random worker every 200 ms.  Each result is its own task's, or a ``WorkerLostError``
(none with retries), and nothing hangs.

Brief by default; ``PROCPOOL_STRESS=1`` runs it for a minute per case.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from tasks import mixed, square

import procpool

FULL = os.environ.get("PROCPOOL_STRESS") == "1"
SECONDS = 60.0 if FULL else 4.0


def expected(i: int):
    return [i, i / 2, str(i), None, [i], None, i % 3 == 0, complex(i, 1)][i % 8]


@pytest.mark.stress
@pytest.mark.timeout(SECONDS + 120)
@pytest.mark.parametrize("retries", [0, 2])
def test_every_path_under_a_sigkill_storm_gives_each_task_its_own_result(retries):
    wrong: list = []
    lost = [0]
    seen = [0]

    def check(i, get):
        try:
            value = get()
        except procpool.WorkerLostError:
            lost[0] += 1
            return
        except ValueError as exc:
            if not (i % 8 == 5 and str(exc) == f"bad {i}"):
                wrong.append((i, repr(exc)))
            seen[0] += 1
            return
        want = expected(i)
        if i % 8 == 5 or value != want or type(value) is not type(want):
            wrong.append((i, value))
        seen[0] += 1

    stop = time.monotonic() + SECONDS
    with procpool.Pool(2, retries=retries) as pool:

        def applies():
            i = 0
            while time.monotonic() < stop:
                check(i, lambda i=i: pool.apply(mixed, (i,)))
                i += 1

        def apply_asyncs():
            while time.monotonic() < stop:
                results = [(i, pool.apply_async(mixed, (i,))) for i in range(2000)]
                for i, r in results:
                    check(i, lambda r=r: r.get(30))

        def submits():
            while time.monotonic() < stop:
                futures = [(i, pool.submit(mixed, i)) for i in range(2000)]
                for i, f in futures:
                    check(i, lambda f=f: f.result(30))

        def maps():
            while time.monotonic() < stop:
                try:
                    if pool.map(square, range(5000)) != [x * x for x in range(5000)]:
                        wrong.append(("map", None))
                except procpool.WorkerLostError:
                    lost[0] += 1

        def killer():
            while time.monotonic() < stop:
                time.sleep(0.2)
                pids = pool.pids()
                if pids:
                    try:
                        os.kill(random.choice(pids), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        threads = [
            threading.Thread(target=f) for f in (applies, apply_asyncs, submits, maps, killer)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 60)
        assert not any(t.is_alive() for t in threads), "a submitting thread hung"
    assert wrong == []
    assert seen[0] > 1000
    if retries >= 2:
        assert lost[0] == 0
