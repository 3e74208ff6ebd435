"""User code owns its signals: the tutorial's ``os.kill`` / ``signal.alarm`` / ``signal.pause``
work inside tasks, and procpool's own use of SIGALRM (soft timeouts) does not get in the way --
nor does the pool's I/O thread in the caller's process.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import wait_until

import procpool

from . import helpers as h
from .helpers import START_METHODS

GET_TIMEOUT = 15.0

pytestmark = pytest.mark.timeout(90)


def test_task_handles_sigusr1_sent_by_another_process(pool, tmp_path):
    """A task installs a SIGUSR1 handler; the test (another process) signals that worker; the
    handler runs and the task returns normally; the worker lives on."""
    flag = tmp_path / "pid"
    result = pool.apply_async(h.wait_for_sigusr1, (str(flag),))
    assert wait_until(flag.exists, 10.0), "the task did not start"
    worker = int(flag.read_text())
    os.kill(worker, signal.SIGUSR1)
    assert result.get(timeout=GET_TIMEOUT) == ("got", signal.SIGUSR1)
    assert worker in pool.pids()
    assert pool.map(h.square, range(10)) == [x * x for x in range(10)]


def test_task_alarm_and_pause(pool):
    """``signal.alarm(1)`` then ``signal.pause()`` in a task: the task's handler runs after about
    a second and ``pause`` returns."""
    fired, elapsed = pool.apply_async(h.alarm_and_pause).get(timeout=GET_TIMEOUT)
    assert fired == [signal.SIGALRM]
    assert 0.9 <= elapsed < GET_TIMEOUT
    assert pool.apply(h.square, (5,)) == 25


def test_task_setitimer_periodic_handler(pool):
    assert pool.apply_async(h.setitimer_handler, (0.02, 3)).get(timeout=GET_TIMEOUT) == 3
    assert pool.apply(h.square, (5,)) == 25


def test_user_sigalrm_handler_does_not_break_soft_timeouts(leak_check):
    """A task leaves its own SIGALRM handler installed; a later task with ``timeout`` on the
    same worker still gets a *soft* timeout (TaskTimeout raised inside it, worker kept), and
    the user's handler is back afterwards (alarm/pause works again)."""
    with procpool.Pool(1) as pool:
        pid = pool.apply(h.leave_sigalrm_handler)
        result = pool.apply_async(h.sleep_return, ("late", 30.0), timeout=0.5)
        with pytest.raises(procpool.TaskTimeoutError) as info:
            result.get(timeout=GET_TIMEOUT)
        assert info.value.hard is False  # raised inside the task; the worker was not killed
        assert pool.pids() == [pid]
        fired, _ = pool.apply_async(h.alarm_and_pause).get(timeout=GET_TIMEOUT)
        assert fired == [signal.SIGALRM]
        assert pool.pids() == [pid]


def test_workers_ignore_sigint_but_tasks_may_handle_it(pool, tmp_path):
    """Workers ignore SIGINT (Ctrl-C is the caller's), yet a task can install its own handler:
    SIGINT is then delivered to it like any other signal."""
    assert pool.apply(h.sigint_disposition) == (int(signal.SIG_IGN), False)
    flag = tmp_path / "pid"
    result = pool.apply_async(h.wait_for_signal, (str(flag), int(signal.SIGINT)))
    assert wait_until(flag.exists, 10.0), "the task did not start"
    os.kill(int(flag.read_text()), signal.SIGINT)
    assert result.get(timeout=GET_TIMEOUT) == ("got", signal.SIGINT)
    assert pool.apply(h.sigint_disposition) == (int(signal.SIG_IGN), False)  # restored


CALLER_SCRIPT = """
import signal
pool = procpool.Pool(2, start_method=sys.argv[1])
report_pids(pool)
busy = pool.starmap_async(h.sleep_return, [(i, 0.3) for i in range(4)], chunksize=1)
fired = []
signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
signal.alarm(1)
signal.pause()
print("FIRED", fired, flush=True)
pool.terminate()
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_caller_alarm_and_pause_with_a_busy_pool(method, leak_check):
    """The pool's I/O thread must not swallow the caller's signals: ``alarm`` + ``pause`` in the
    main thread of a process with a running pool (run in a child: pytest-timeout owns SIGALRM
    here)."""
    child = h.Child(CALLER_SCRIPT, method)
    try:
        child.worker_pids()
        assert child.wait_line("FIRED", 20.0) == f"FIRED [{int(signal.SIGALRM)}]"
        assert child.wait(10.0) == 0, child.stderr_text()
    finally:
        child.close()
