"""Per-task timeouts (soft: TaskTimeout inside the task; hard: the worker is replaced),
cancellation of pending and running tasks, and retries of tasks lost to a dead worker."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from concurrent.futures import CancelledError

import pytest
from _pool_helpers import io_thread_held
from conftest import wait_until
from tasks import record, recorded, sleep_then, square

import procpool


def catch_timeout_and_report():
    try:
        time.sleep(30)
    except procpool.TaskTimeout:
        return "cleaned up"
    return "not interrupted"


def ignore_alarm_and_spin():
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pass


def die_first_time(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "second attempt"


def always_die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_soft_timeout_raises_inside_the_task_and_the_worker_survives():
    with procpool.Pool(1) as pool:
        before = pool.pids()
        r = pool.apply_async(sleep_then, (30,), timeout=0.3)
        with pytest.raises(procpool.TaskTimeoutError) as info:
            r.get(10)
        assert not info.value.hard
        assert isinstance(info.value, procpool.TimeoutError)
        assert pool.apply_async(catch_timeout_and_report, timeout=0.3).get(10) == "cleaned up"
        assert pool.pids() == before  # same worker: the soft timeout did not kill it


def test_hard_timeout_kills_a_task_that_ignores_the_signal():
    with procpool.Pool(1, grace=0.3) as pool:
        before = pool.pids()
        r = pool.apply_async(ignore_alarm_and_spin, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(procpool.TaskTimeoutError) as info:
            r.get(10)
        assert info.value.hard
        assert time.monotonic() - started < 5
        assert pool.apply(square, (3,)) == 9
        assert pool.pids() != before


def test_pool_default_timeout_and_map_completes_the_other_items():
    with procpool.Pool(2, timeout=0.5) as pool:
        with pytest.raises(procpool.TaskTimeoutError, match="item 2"):
            pool.map(sleep_then, [0.01, 0.01, 30, 0.01])
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        # in a chunk, a soft timeout names its item, not the chunk ("items 0-10 of ...")
        with pytest.raises(procpool.TaskTimeoutError, match=r"^item 5 of map\(sleep_then\)"):
            pool.map(sleep_then, [0.01] * 5 + [30] + [0.01] * 5, chunksize=11)


def users_alarm_handler(signum, frame):
    pass


def install_alarm_handler(_=None):
    signal.signal(signal.SIGALRM, users_alarm_handler)


def alarm_handler_is_users(_=None):
    return signal.getsignal(signal.SIGALRM) is users_alarm_handler


def test_timeouts_restore_the_users_sigalrm_handler():
    with procpool.Pool(1) as pool:
        pool.apply(install_alarm_handler)
        assert pool.apply_async(sleep_then, (0.01, 1), timeout=5).get(10) == 1
        with pytest.raises(procpool.TaskTimeoutError):
            pool.apply_async(sleep_then, (30,), timeout=0.2).get(10)
        assert pool.apply(alarm_handler_is_users)  # no timeout: procpool leaves SIGALRM alone


def test_cancel_pending_and_running_tasks():
    with procpool.Pool(1) as pool:
        running = pool.apply_async(sleep_then, (30,))
        pending = pool.apply_async(square, (2,))
        assert pending.cancel()
        deadline = time.monotonic() + 5
        while not running.cancel(force=True):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        import concurrent.futures

        with pytest.raises(concurrent.futures.CancelledError):
            running.get(5)
        with pytest.raises(concurrent.futures.CancelledError):
            pending.get(5)
        assert pool.apply(square, (4,)) == 16


def reply_waiting(task) -> bool:
    """Whether the worker holding *task* has written something the pool has not read."""
    return bool(select.select([task.worker.proc.sock], [], [], 0)[0])


def worker_pids(pool) -> list[int]:
    return sorted(w.proc.pid for w in pool._sched._workers.values())


@pytest.mark.parametrize("progress_says", ["finished", "running (a race)"])
def test_force_cancel_of_a_task_whose_reply_is_unread(tmp_path, progress_says):
    """The task has finished and its reply waits unread (the I/O thread is busy in a
    callback).  By its progress slot the task is no longer running: cancel(force=True) says
    False and kills nothing.  Should the slot still say running (a cancel racing the task's
    last microseconds), the cancel says True and its promise holds: CancelledError, even
    though the reply is read before the worker's death."""
    path = str(tmp_path / "ran")
    with procpool.Pool(2) as pool:
        r = pool.apply_async(record, (path, 1, 1.5))  # (it finishes once the I/O thread is held)
        assert wait_until(lambda: recorded(path) == [1], 10)
        task = r._task
        with io_thread_held(pool):
            assert task.worker is not None  # (still running)
            assert wait_until(lambda: reply_waiting(task), 10)
            pids = worker_pids(pool)
            if progress_says == "finished":
                assert not r.cancel(force=True)
                assert worker_pids(pool) == pids
            else:
                pool._sched._finished_on = lambda w, tid: False
                assert r.cancel(force=True)
        if progress_says == "finished":
            assert r.get(10) == 1
        else:
            with pytest.raises(CancelledError):
                r.get(10)
        assert pool.apply(square, (3,)) == 9


def test_retries_rerun_a_task_lost_to_a_dead_worker(tmp_path):
    marker = str(tmp_path / "marker")
    with procpool.Pool(1, retries=1) as pool:
        assert pool.apply_async(die_first_time, (marker,)).get(20) == "second attempt"
        r = pool.apply_async(always_die)
        with pytest.raises(procpool.WorkerLostError, match="after 2 attempts") as info:
            r.get(20)
        assert info.value.attempts == 2


def test_retry_on_listed_exception_types(tmp_path):
    def flaky(marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ConnectionError("transient")
        return "ok"

    with procpool.Pool(1, retries=2, retry_on=(ConnectionError,)) as pool:
        assert pool.apply_async(flaky, (str(tmp_path / "m"),)).get(20) == "ok"


def test_schedule_gives_one_future_its_own_time_limit():
    with procpool.Pool(1) as pool:
        slow = pool.schedule(sleep_then, (30,), timeout=0.3)
        with pytest.raises(procpool.TaskTimeoutError):
            slow.result(10)
        assert pool.schedule(square, (4,)).result(10) == 16
        assert pool.submit(square, 5).result(10) == 25


@pytest.mark.parametrize("limit", [30 * 86400.0, 1e12, float("inf")])
def test_a_huge_or_infinite_timeout_is_no_limit(limit):
    # 30 days overflowed epoll's milliseconds and killed the I/O thread (the pool was dead);
    # inf (or 1e12) overflowed setitimer in the worker, which exited
    with procpool.Pool(2, timeout=limit) as pool:
        assert pool.starmap(sleep_then, [(0.05, i) for i in range(3)], timeout=limit) == [0, 1, 2]
        assert pool.apply_async(square, (4,), timeout=limit).get(20) == 16
        assert pool.schedule(square, (5,), timeout=limit).result(20) == 25
        assert pool.apply(square, (6,)) == 36


def hang_on_five(x):
    if x == 5:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # TaskTimeout never comes: a hard kill
        time.sleep(30)
    return x


def imap_outcomes(pool, func, n, **kwargs):
    """Each item's value, or ``(hard|soft, "item i")`` for the items that timed out."""
    out = []
    it = pool.imap(func, range(n), **kwargs)
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except procpool.TaskTimeoutError as exc:
            out.append(("hard" if exc.hard else "soft", str(exc).split(" of ")[0]))


def test_a_hard_timeout_inside_a_chunk_fails_only_its_item():
    # the worker is killed in the middle of a chunk [4, 5, 6, 7]: item 4 had run (its result
    # died with the worker), 6 and 7 had not started -- they run again; only 5 fails
    with procpool.Pool(2, grace=0.2) as pool:
        out = imap_outcomes(pool, hang_on_five, 12, chunksize=4, timeout=0.3)
        assert out == [0, 1, 2, 3, 4, ("hard", "item 5"), 6, 7, 8, 9, 10, 11]
        result = pool.map_async(hang_on_five, range(12), chunksize=4, timeout=0.3)
        with pytest.raises(procpool.TaskTimeoutError, match="item 5"):
            result.get(20)


def overrun_first(x):
    if x == 0:  # overruns with SIGALRM blocked (as C code can), then stops by itself
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(1.5)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    else:
        time.sleep(0.3)  # within its limit of 0.5 s
    return x


def test_the_hard_limit_follows_each_item_of_a_chunk_and_blames_the_one_that_overran():
    # the limit was the chunk's total (4 x 0.5 s + grace): the kill came while item 3 ran,
    # within its own limit, and it was blamed; now the kill comes grace seconds after item 0's
    # limit, and the others run again
    with procpool.Pool(1, grace=0.3) as pool:
        out = imap_outcomes(pool, overrun_first, 4, chunksize=4, timeout=0.5)
        assert out == [("hard", "item 0"), 1, 2, 3]


def leave_a_gil_hog():
    def hog():
        time.sleep(0.2)  # after this task's result is out
        sum(range(10**12))  # a C loop holding the GIL: the worker reads nothing more

    threading.Thread(target=hog, daemon=True).start()
    return "left"


def test_a_timed_task_sent_to_a_stalled_worker_is_still_killed_and_sent_again():
    with procpool.Pool(1, grace=0.3) as pool:
        assert pool.apply(leave_a_gil_hog) == "left"
        time.sleep(0.5)
        started = time.monotonic()
        assert pool.apply_async(square, (4,), timeout=0.5).get(20) == 16
        assert time.monotonic() - started < 10  # killed at ~0.8 s, then run on a new worker


class SlowToUnpickle:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_slow_rebuild, (self.value,))


def _slow_rebuild(value):
    if os.environ.get("PROCPOOL_TEST_IN_WORKER"):
        time.sleep(0.2)
    return SlowToUnpickle(value)


def mark_worker():
    os.environ["PROCPOOL_TEST_IN_WORKER"] = "1"


def value_of(item):
    return item.value


def test_a_chunk_slow_to_unpickle_has_the_whole_chunks_time():
    # 6 items x 0.2 s to unpickle before the first item starts: within the chunk's budget
    # (6 x 0.5 s + grace), not one item's (0.5 s + grace), and no item is blamed
    with procpool.Pool(1, grace=0.2, initializer=mark_worker) as pool:
        items = [SlowToUnpickle(i) for i in range(6)]
        assert pool.map(value_of, items, chunksize=6, timeout=0.5) == list(range(6))


def slow_initializer():
    time.sleep(1.0)  # loading a model, say: longer than a task's limit and grace


def test_timed_tasks_wait_for_a_worker_still_running_its_initializer():
    # tasks are sent before a worker is ready; their hard limit must not kill it mid-start
    # (every replacement was killed the same way until the tasks failed)
    with procpool.Pool(2, initializer=slow_initializer, timeout=0.3, grace=0.3) as pool:
        assert pool.map(square, range(4)) == [0, 1, 4, 9]
        assert pool.apply_async(square, (5,), timeout=0.3).get(20) == 25


def test_an_error_raised_just_before_the_time_limit_is_the_tasks_own():
    # the worker formatted the task's exception with the soft timeout still armed: the alarm
    # landed in the formatting and killed the worker (WorkerLostError, 10 runs in 10)
    from tasks import raise_long_chain_just_before

    with procpool.Pool(1) as pool:
        for _ in range(3):
            r = pool.apply_async(raise_long_chain_just_before, (0.3,), timeout=0.3)
            with pytest.raises((ValueError, procpool.TaskTimeoutError)) as info:
                r.get(30)
            assert not isinstance(info.value, procpool.WorkerLostError)


def test_a_timed_call_is_sent_alone_not_with_untimed_calls_behind_it(monkeypatch):
    # untimed calls to the same function went in the timed call's batch: its result could
    # wait in the worker's buffer while the follower ran, and the hard limit then killed
    # the worker of a task that had finished in time.  A worker that flushes its results
    # every 5 ms (a slower parent) made it happen every time
    from tasks import flush_late_then

    from procpool import _worker

    monkeypatch.setattr(_worker, "FLUSH_INTERVAL", 5e-3)  # (forked workers inherit it)
    with procpool.Pool(1, grace=0.2) as pool:
        for _ in range(200):
            pool.apply(flush_late_then, (0,))  # cheap: the pool's estimate is known
        for _ in range(2):
            pool.apply_async(flush_late_then, (0.005,))  # the worker busy: the next two queue
            timed = pool.apply_async(flush_late_then, (0,), timeout=0.3)
            follower = pool.apply_async(flush_late_then, (0.8,))
            assert timed.get(30) == 0 and follower.get(30) == 0.8


def test_grace_must_be_a_number_of_seconds():
    for bad in (None, -1, "1", float("nan"), True):
        with pytest.raises(ValueError, match="grace"):
            procpool.Pool(1, grace=bad)


def overrun_hard_the_first_time(marker):
    """The first call ignores the soft timeout and spins (C code that never returns, as it
    were); the next returns at once."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        ignore_alarm_and_spin()
    return "second attempt"


def test_retry_on_task_timeout_retries_a_hard_timeout_too(tmp_path):
    # a worker killed for its time limit failed the task at once, retry_on ignored
    marker = str(tmp_path / "ran")
    with procpool.Pool(1, retries=1, retry_on=(procpool.TaskTimeoutError,), grace=0.2) as pool:
        r = pool.apply_async(overrun_hard_the_first_time, (marker,), timeout=0.3)
        assert r.get(30) == "second attempt"
    with procpool.Pool(1, grace=0.2) as pool:  # without retry_on: the hard timeout, as before
        os.remove(marker)
        r = pool.apply_async(overrun_hard_the_first_time, (marker,), timeout=0.3)
        with pytest.raises(procpool.TaskTimeoutError) as info:
            r.get(30)
        assert info.value.hard


def test_get_with_a_timeout_does_not_wait_behind_another_tasks_slow_callback():
    # get() read its own reply in time, then waited for the I/O thread, busy in another
    # task's 3 s callback, to let it deliver: 3 s for a 1 s timeout
    from tasks import flush_late_then

    gate = threading.Event()
    with procpool.Pool(2) as pool:
        pool.map(flush_late_then, [0] * 4)
        pool.apply_async(flush_late_then, (0.1,), callback=lambda _: gate.wait(10))
        r = pool.apply_async(flush_late_then, (0.3,))
        assert wait_until(lambda: r._task is not None and r._task.worker is not None, 10)
        t0 = time.monotonic()
        with pytest.raises(procpool.TimeoutError):
            r.get(timeout=1.0)
        assert time.monotonic() - t0 < 5  # (not the callback's 10 s)
        gate.set()
        assert r.get(10) == 0.3


def test_a_retry_decided_while_another_thread_closes_the_pool_still_runs(tmp_path):
    # get() read its task's error itself and was rebuilding it (0.5 s) when close() came from
    # another thread: the I/O thread saw no work left and ended, and the retry was refused
    # with PoolTerminated although the pool was only closed
    from tasks import SlowToRebuild, fail_once_slowly

    pool = procpool.Pool(2, retries=1, retry_on=(SlowToRebuild,))
    try:
        r = pool.apply_async(fail_once_slowly, (str(tmp_path / "ran"),))
        threading.Timer(0.3, pool.close).start()  # while get() rebuilds the error
        assert r.get(10) == "ok on retry"
        pool.join(10)
    finally:
        pool.terminate()
