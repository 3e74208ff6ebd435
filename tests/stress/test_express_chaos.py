"""A Ctrl-C storm over a tight ``apply`` loop (the express lane, see procpool._express): a
``KeyboardInterrupt`` raised wherever the caller happens to be, thousands of times, leaves
no lock held and no reply stranded -- the pool still answers, ``terminate()`` returns.

A review's storm (SIGALRM every 0.7 ms raising ``KeyboardInterrupt``) hung the pool in one
run in five: a delivery lock taken with ``acquire()`` was left held when the interrupt came
as the call returned.  Short by default; ``PROCPOOL_STRESS=1`` runs it for a minute.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import importing_tests, run_python

FULL = os.environ.get("PROCPOOL_STRESS") == "1"
STORM_S = 60.0 if FULL else 6.0

CODE = textwrap.dedent(
    """
    import signal, threading, time
    import procpool
    from tasks import square

    armed = [False]

    def handler(signum, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    pool = procpool.Pool(1)
    for i in range(500):
        pool.apply(square, (i,))
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
    interrupts, start = 0, time.monotonic()
    while time.monotonic() - start < {storm}:
        armed[0] = True
        try:
            while True:
                pool.apply(square, (3,))
        except KeyboardInterrupt:
            interrupts += 1
        except procpool.SerializationError:  # (an interrupt as the reply was unpickled)
            interrupts += 1
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    armed[0] = False

    def after():
        print("answers", [pool.apply(square, (i,)) for i in range(300)][-1], flush=True)
        pool.terminate()
        pool.join()
        print("terminated", flush=True)

    t = threading.Thread(target=after, daemon=True)
    t.start()
    t.join(30)
    print("interrupts", interrupts, "hung" if t.is_alive() else "ok", flush=True)
    """
)


@pytest.mark.stress
@pytest.mark.timeout(STORM_S + 120)
def test_a_ctrl_c_storm_over_an_apply_loop_leaves_the_pool_working():
    out = run_python(importing_tests(CODE.format(storm=STORM_S)), timeout=STORM_S + 90)
    assert "answers 89401" in out.stdout, out.stdout + out.stderr
    assert "terminated" in out.stdout, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("ok"), out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
