"""The pool's owner is SIGKILLed: no worker may outlive it (DESIGN: "workers exit within a second
of the parent's death"; we allow 5 s on a noisy machine).

A child Python creates a pool, prints its worker pids and starts a long ``map``; the test kills
it with SIGKILL and polls until every process that was below it -- the workers and, for
``forkserver``, the fork server -- is gone.  Reaping is not the test's concern: orphans are
reparented to init (or a subreaper), so a zombie counts as gone.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import wait_until

from . import helpers as h
from .helpers import START_METHODS

DEATH_GRACE_S = 5.0

pytestmark = pytest.mark.timeout(90)

SCRIPT = """
pool = procpool.Pool(2, start_method=sys.argv[1])
report_pids(pool)
pool.map(h.print_then_sleep, range(8), chunksize=1)  # long: the test kills us meanwhile
print("MAP RETURNED", flush=True)
"""

SCRIPT_IDLE = """
pool = procpool.Pool(2, start_method=sys.argv[1])
report_pids(pool)
print("IDLE", flush=True)
time.sleep(60)
"""


def kill_and_expect_gone(child: h.Child, procs: dict[int, int]) -> None:
    """SIGKILL the child Python; each of *procs* (pid -> start time) must be gone soon after."""
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    gone = wait_until(lambda: not h.still_alive(procs), DEATH_GRACE_S)
    assert gone, f"still running {DEATH_GRACE_S}s after the parent died: {h.still_alive(procs)}"


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("busy", [True, False], ids=["mid-map", "idle"])
def test_workers_exit_when_parent_is_sigkilled(method, busy, leak_check):
    child = h.Child(SCRIPT if busy else SCRIPT_IDLE, method)
    tree: dict[int, int] = {}
    try:
        workers = child.worker_pids()
        if busy:
            child.wait_line("TASK-STARTED")  # the map is running in the workers
        else:
            child.wait_line("IDLE")
        tree = h.descendants(child.pid)  # the workers, the fork server if any
        assert set(workers) <= set(tree), (workers, tree)
        assert len(workers) == 2

        kill_and_expect_gone(child, tree)
    finally:
        for pid in h.still_alive(tree):
            os.kill(pid, signal.SIGKILL)  # do not leave them to the next tests
        child.close()


SCRIPT_WITH_KEEPER = """
pool = procpool.Pool(2)
report_pids(pool)
keeper = os.fork()  # a child of the program's own, forked after the pool and never exec'd
if keeper == 0:
    time.sleep(60)
    os._exit(0)
print("KEEPER", keeper, flush=True)
pool.map(h.print_then_sleep, range(8), chunksize=1)
"""


def test_a_child_the_program_forked_does_not_keep_the_workers_alive(leak_check):
    """Forked workers die through the pool's death pipe (see procpool._start.die_with_pipe),
    whose write end must be held by the pool's process alone: a child the program forks after
    the pool (its own, a multiprocessing worker) closes it, and its life does not matter."""
    child = h.Child(SCRIPT_WITH_KEEPER)
    tree: dict[int, int] = {}
    try:
        workers = child.worker_pids()
        keeper = int(child.wait_line("KEEPER")[len("KEEPER ") :])
        child.wait_line("TASK-STARTED")
        tree = h.descendants(child.pid)
        assert set(workers) | {keeper} <= set(tree), (workers, keeper, tree)

        kill_and_expect_gone(child, {pid: tree[pid] for pid in workers})
        assert h.still_alive({keeper: tree[keeper]}), "the keeper was to outlive the parent"
    finally:
        for pid in h.still_alive(tree):
            os.kill(pid, signal.SIGKILL)
        child.close()


SCRIPT_HOSTILE = """
import signal
signal.signal(signal.SIGIO, signal.SIG_IGN)  # inherited by the workers
signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # so is the mask
pool = procpool.Pool(2)
report_pids(pool)
pool.map(h.print_then_sleep, range(8), chunksize=1)
"""


def test_forked_workers_die_with_the_pool_whatever_their_signals(leak_check):
    """The death pipe raises SIGKILL (F_SETSIG), not SIGIO: neither a signal ignored or
    blocked by the program (and inherited by its workers) nor a stopped worker survives."""
    child = h.Child(SCRIPT_HOSTILE)
    tree: dict[int, int] = {}
    try:
        workers = child.worker_pids()
        child.wait_line("TASK-STARTED")
        tree = h.descendants(child.pid)
        assert set(workers) <= set(tree), (workers, tree)
        os.kill(workers[0], signal.SIGSTOP)

        kill_and_expect_gone(child, tree)
    finally:
        for pid in h.still_alive(tree):
            os.kill(pid, signal.SIGKILL)
        child.close()
