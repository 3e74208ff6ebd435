"""A child the *program* forks (``os.fork()``) while its pool is busy.

The child's copy of the pool is not running (``_scheduler._after_fork_in_child``): calls
raise, shutdowns return, and nothing it does reaches the parent's workers, channels or
results.  A thread of the parent may hold one of procpool's locks at the fork -- the child's
copy of that lock then stays held for good, so no entry point may take it there.  Each child
here runs under ``alarm(5)`` with SIGALRM's default action: a hang kills it, and says where.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
from conftest import held_by_another_thread
from tasks import sleep_then, square

import procpool
from procpool import _ipc_mem

OK = 0  # the child's exit codes
RAISED_OTHER = 2


def in_child(body, *, ok=()) -> int:
    """Fork; run ``body()`` in the child (under alarm(5)); return the child's exit code:
    0 if it returned or raised one of *ok*, 2 for another exception, -SIGALRM if it hung."""
    pid = os.fork()
    if pid == 0:
        code = RAISED_OTHER
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(5)
            body()
            code = OK
        except ok:
            code = OK
        except BaseException:  # noqa: BLE001 - any other: the test fails
            code = RAISED_OTHER
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def forked_holding(lock, body, *, ok=()) -> int:
    """``in_child(body)``, forked while another thread of this process holds *lock*."""
    with held_by_another_thread(lock):
        return in_child(body, ok=ok)


NOT_RUNNING = (ValueError, RuntimeError)
TIMED_OUT = (procpool.TimeoutError, concurrent.futures.TimeoutError)


@pytest.mark.parametrize(
    "call",
    [
        "apply",
        "apply_async",
        "map",
        "imap",
        "submit",
        "close_join",
        "terminate",
        "shutdown_cancel",
        "pids",
        "signal_workers",
        "get",
        "cancel",
        "force_cancel",
        "result",
        "imap_next",
    ],
)
def test_a_child_forked_while_a_thread_holds_the_pools_lock_never_waits_for_it(leak_check, call):
    with procpool.Pool(1) as pool:
        pool.apply(square, (1,))
        r = pool.apply_async(sleep_then, (0.5, 11))
        f = pool.submit(sleep_then, 0.5, 12)
        it = pool.imap(sleep_then, [0.2] * 3, chunksize=1)
        time.sleep(0.05)
        body = {
            "apply": lambda: pool.apply(square, (2,)),
            "apply_async": lambda: pool.apply_async(square, (2,)),
            "map": lambda: pool.map(square, range(9)),
            "imap": lambda: list(pool.imap(square, iter(range(9)))),
            "submit": lambda: pool.submit(square, 2),
            "close_join": lambda: (pool.close(), pool.join()),
            "terminate": pool.terminate,
            "shutdown_cancel": lambda: pool.shutdown(cancel_futures=True),
            "pids": pool.pids,
            "signal_workers": lambda: pool.signal_workers(0),
            "get": lambda: r.get(0.3),
            "cancel": r.cancel,
            "force_cancel": lambda: r.cancel(force=True),
            "result": lambda: f.result(0.3),
            "imap_next": lambda: [it.next(0.3) for _ in range(3)],
        }[call]
        code = forked_holding(pool._sched._lock, body, ok=NOT_RUNNING + TIMED_OUT)
        assert code != -signal.SIGALRM, f"the child hung in {call}"
        assert code == OK
        assert r.get(10) == 11 and f.result(10) == 12, "the parent's results are its own"


def test_a_child_waiting_on_a_parents_result_takes_nothing_from_the_parent(leak_check):
    """The child's get(t) on a result of the parent's pool times out; it took the reply off
    the parent's channel before (the parent's get then timed out, and its pool was stuck:
    the worker's channel out of the epoll set they share)."""
    with procpool.Pool(1) as pool:
        pool.apply(square, (1,))
        for _ in range(3):
            r = pool.apply_async(sleep_then, (0.3, 11))
            f = pool.submit(sleep_then, 0.3, 12)
            time.sleep(0.05)
            assert in_child(lambda r=r: r.get(1), ok=TIMED_OUT) == OK
            assert in_child(lambda f=f: f.result(1), ok=TIMED_OUT) == OK
            assert r.get(10) == 11
            assert f.result(10) == 12
            assert pool.apply_async(square, (3,)).get(10) == 9, "the parent's pool works"


def test_a_child_cannot_cancel_or_signal_the_parents_tasks_and_workers(leak_check):
    with procpool.Pool(1) as pool:
        pool.apply(square, (1,))
        pids = pool.pids()
        r = pool.apply_async(sleep_then, (0.3, 11))
        time.sleep(0.05)

        def child():
            assert r.cancel(force=True) is False
            assert pool.signal_workers(signal.SIGKILL) == []
            assert pool.pids() == []

        assert in_child(child) == OK
        assert r.get(10) == 11, "the task ran on: its worker was not killed"
        assert pool.pids() == pids


def test_an_untimed_wait_in_a_child_for_a_parents_result_raises(leak_check):
    """A wait with no time limit would never end there (multiprocessing's does not): it
    raises, saying why."""
    with procpool.Pool(1) as pool:
        r = pool.apply_async(sleep_then, (0.3, 11))
        time.sleep(0.05)

        def child():
            with pytest.raises(RuntimeError, match="forked child"):
                r.get()

        assert in_child(child) == OK
        assert r.get(10) == 11


@pytest.mark.parametrize("make", ["Lock", "Event", "Queue", "Value"])
def test_a_child_forked_while_a_thread_registers_a_semaphore_can_make_its_own(make):
    factory = {
        "Lock": procpool.Lock,
        "Event": procpool.Event,
        "Queue": procpool.Queue,
        "Value": lambda: procpool.Value("i"),
    }[make]
    code = forked_holding(_ipc_mem._live_lock, factory)
    assert code != -signal.SIGALRM, f"the child hung making a {make}"
    assert code == OK
