"""A pool among the rest of the program: odd inputs (empty and huge ranges), user code on the
pool's threads (callbacks, imap input generators) starting processes and pools, modules
registered with cloudpickle, tasks that fork.  Each was a bug found in review (fixed since).

Real processes, bounded in time (pytest-timeout and explicit timeouts on every wait).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from _pool_helpers import interrupt_on_entering, io_thread_held, traced
from conftest import run_python, wait_until
from tasks import count_lines, identity, record, sleep_then
from tasks import fail_on as fail_on_three

import procpool
from procpool.errors import TaskTimeoutError

pytestmark = pytest.mark.timeout(60)

N = 64 * 1024  # float64 items: 512 KiB, above the out-of-band threshold


def ident(x):
    return x


def nap(x):
    time.sleep(x)
    return x


def first(a):
    return float(a[0])


def _sigblk(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                return line.split()[1]
    return "?"


# ---------------------------------------------------------------- 1. imap over ranges
def test_imap_over_an_empty_range_ends():
    """imap(f, range(0)): the feeder's window loop has want == got == 0 and never leaves
    (`got < want` is False), spinning at 100% CPU; the iterator never ends."""
    with procpool.Pool(2) as pool:
        it = pool.imap(ident, range(0))
        with pytest.raises(StopIteration):
            it.next(timeout=5)


def close_and_join(pool, within: float, what: str) -> None:
    """close(), then join() must return within *within* seconds (else it waited for *what*)."""
    pool.close()
    t = time.monotonic()
    pool.join(timeout=within + 1)
    assert time.monotonic() - t < within, f"join() waited for {what}"


def test_close_join_after_imap_over_an_empty_range_returns():
    pool = procpool.Pool(2)
    try:
        pool.imap_unordered(ident, range(0))
        close_and_join(pool, 4.5, "a feeder that never ends")
    finally:
        pool.terminate()


def test_imap_over_a_range_longer_than_ssize_t():
    """len(range(10**20)) raises OverflowError in the feeder thread: the thread dies, the
    input never ends, the iterator hangs (before d9de07b..HEAD: 0, 1, 4...)."""
    with procpool.Pool(2) as pool:
        it = pool.imap(ident, range(10**20))
        assert [it.next(timeout=5) for _ in range(3)] == [0, 1, 2]


# ---------------------------------------------------------------- 2. signal masks
def assert_terminates(p: subprocess.Popen, where: str = "") -> None:
    """SIGTERM (``Popen.terminate``) ends *p*: its signal mask is the program's."""
    try:
        blk = _sigblk(p.pid)
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        assert p.returncode == -15, f"SIGTERM ignored: child SigBlk={blk}{where}"
    finally:
        p.kill()
        p.wait()


def test_subprocess_started_by_a_callback_can_be_terminated():
    """Callbacks run in the I/O thread, whose catchable signals are blocked; a child it
    starts inherits the blocked mask: SIGTERM (Popen.terminate) is ignored."""
    out: dict = {}
    done = threading.Event()

    def cb(_):
        out["p"] = subprocess.Popen(["sleep", "30"])
        out["thread"] = threading.current_thread().name
        done.set()

    with procpool.Pool(1) as pool:
        pool.apply_async(nap, (0.3,), callback=cb)  # not waited on: the I/O thread delivers
        assert done.wait(10)
    assert_terminates(out["p"], f" ({out['thread']})")


def test_subprocess_started_by_an_imap_input_generator_can_be_terminated():
    procs = []

    def lines():
        procs.append(subprocess.Popen(["sleep", "30"]))
        yield 1

    with procpool.Pool(1) as pool:
        assert list(pool.imap(ident, lines())) == [1]
    assert_terminates(procs[0])


def test_a_pool_started_from_a_callback_thread_keeps_soft_timeouts():
    """start_thread takes the *current* mask as the program's: a pool created in a thread that
    inherited a pool thread's blocked mask gives its workers SIGALRM blocked, and the soft
    timeout never fires (here the task simply runs to the end and returns)."""
    res: dict = {}

    def inner():
        with procpool.Pool(1, timeout=0.3, grace=10) as p2:
            try:
                res["value"] = p2.apply(nap, (2.0,))
            except BaseException as exc:  # noqa: BLE001
                res["error"] = exc

    def cb(_):
        th = threading.Thread(target=inner)
        th.start()
        res["thread"] = th

    with procpool.Pool(1) as pool:
        pool.apply_async(nap, (0.2,), callback=cb)
        deadline = time.monotonic() + 10
        while "thread" not in res and time.monotonic() < deadline:
            time.sleep(0.05)
        res["thread"].join(20)
    assert isinstance(res.get("error"), TaskTimeoutError), res


# ---------------------------------------------------------------- 3. functions by reference
def test_register_pickle_by_value_is_honoured(tmp_path):
    """dumps_function now pickles module-level functions by reference with plain pickle,
    bypassing cloudpickle.register_pickle_by_value: a spawn worker cannot import the module."""
    import cloudpickle

    (tmp_path / "rv_mod_review.py").write_text("def quad(x):\n    return 4 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import rv_mod_review
    finally:
        sys.path.remove(str(tmp_path))
    cloudpickle.register_pickle_by_value(rv_mod_review)
    try:
        with procpool.Pool(1, start_method="spawn") as pool:
            assert pool.apply(rv_mod_review.quad, (2,)) == 8
    finally:
        cloudpickle.unregister_pickle_by_value(rv_mod_review)
        sys.modules.pop("rv_mod_review", None)


# ---------------------------------------------------------------- 4. reused segments
def hand_to_child(a, path):
    """Hand the argument to a forked helper that reads it after the task has returned."""
    if os.fork() == 0:
        try:
            time.sleep(1.0)
            with open(path + ".tmp", "w") as f:
                f.write(f"{a[0]} {a[-1]}")
            os.rename(path + ".tmp", path)
        finally:
            os._exit(0)
    return os.getpid()


def test_a_process_forked_by_a_task_keeps_seeing_its_argument(tmp_path):
    """The worker's unmap finalizer reports RELEASED although a child it forked still maps the
    segment: the parent rewrites it with the next same-sized argument under the child's eyes."""
    path = str(tmp_path / "seen")
    with procpool.Pool(1) as pool:
        pool.apply(hand_to_child, (np.full(N, 1.0), path))
        time.sleep(0.2)  # the RELEASED frame has come back with the result
        assert pool.apply(first, (np.full(N, 2.0),)) == 2.0
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    with open(path) as f:
        assert f.read() == "1.0 1.0"


def test_a_callback_holding_the_io_thread_does_not_stall_a_burst_of_submissions():
    # Bursts of long tasks hand the GIL to the I/O thread early (so the workers are refilled),
    # waiting for its turn to end: with that turn held up by a slow callback, a submitter must
    # make one such wait, not one every 64 tasks (~15 here, each up to the full hand-off wait).
    from procpool import _bursts

    with procpool.Pool(2) as pool:
        pool.map(sleep_then, [0.002] * 8, chunksize=1)  # measured cost: ~2 ms a task
        sched = pool._sched
        waits: list[tuple] = []
        real = sched._handoff
        sched._handoff = lambda *wait: (waits.append(wait), real(*wait))[1]
        with io_thread_held(pool):  # a slow callback
            time.sleep(0.01)  # the I/O thread's last turn is now well over 1 ms old
            results = [pool.apply_async(identity, (i,)) for i in range(1000)]
        assert [r.get(30) for r in results] == list(range(1000))
        assert waits == [(_bursts.HANDOFF_AFTER,)]  # (1000 < HANDOFF_EVERY: no other)


def test_a_dropped_imap_iterator_still_runs_all_its_input(tmp_path, monkeypatch):
    # multiprocessing runs every item of an imap whose iterator is dropped unread; ours reads
    # its input lazily, holding at most IMAP_HELD items nobody has consumed -- a dropped
    # iterator must not leave the rest unread while the pool stays open
    import functools

    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    path = str(tmp_path / "ran")
    with procpool.Pool(2) as pool:
        it = pool.imap(functools.partial(record, path), range(200))
        assert next(it) == 0
        del it
        gc.collect()
        deadline = time.monotonic() + 30
        while count_lines(path) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count_lines(path) == 200
        assert pool.apply(identity, (5,)) == 5


def _take_through_ctrl_c(it, tracer, got, n):
    """Take results from *it* into *got* until it holds *n*, with *tracer* set (it raises a
    KeyboardInterrupt somewhere): the caller goes on after its Ctrl-C."""
    sys.settrace(tracer)
    try:
        while len(got) < n:
            try:
                got.append(it.next(timeout=5))
            except KeyboardInterrupt:
                pass
    finally:
        sys.settrace(None)


def _starved(pool, job):
    """*job*'s window is full and no worker holds anything: only a consumer moves it now."""
    return job.starved and not any(w.inflight for w in pool._sched._workers.values())


@pytest.mark.parametrize("source", ["list", "range"])
def test_an_in_memory_imap_input_is_read_within_its_window_by_the_dispatcher(monkeypatch, source):
    # a list or a range has no feeder thread: the dispatcher reads it as the window has room,
    # and the consumer's release queues the job again once the window was full
    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    items = list(range(300)) if source == "list" else range(300)
    with procpool.Pool(2) as pool:
        it = pool.imap(identity, items)
        job = it._job
        assert job.source is not None  # (no feeder thread: see the last line)
        got = []
        for value in it:
            got.append(value)
            assert job.fed - job.released <= job.limit
            if value % 50 == 0:  # now and then, let the window fill up and the job starve
                assert wait_until(lambda: _starved(pool, job), 10)
        assert got == list(range(300))
        assert not any(t.name == "procpool-feeder" for t in threading.enumerate())


def test_a_dropped_imap_iterator_whose_window_is_full_and_idle_still_runs_its_input(
    tmp_path, monkeypatch
):
    # nothing in flight: no result wakes the I/O thread, so the dropped iterator's finalizer
    # must, or the job's input (read by the dispatcher) waits for a consumer forever
    import functools

    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    path = str(tmp_path / "ran")
    with procpool.Pool(2) as pool:
        it = pool.imap(functools.partial(record, path), list(range(100)))
        assert next(it) == 0
        job = it._job
        assert wait_until(lambda: _starved(pool, job), 10)
        del it
        gc.collect()
        assert wait_until(lambda: count_lines(path) == 100, 30), count_lines(path)


def test_close_lets_a_starved_in_memory_imap_read_the_rest_so_join_returns(monkeypatch):
    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    pool = procpool.Pool(2)
    try:
        it = pool.imap(identity, list(range(200)))
        assert next(it) == 0
        assert wait_until(lambda: _starved(pool, it._job), 10)
        pool.close()
        pool.join(30)  # every item runs, with nobody consuming (as close() promises)
        assert pool.pids() == []  # (joined: not timed out)
        assert list(it) == list(range(1, 200))
    finally:
        pool.terminate()


def test_a_dict_changed_during_its_imap_fails_the_input_after_the_items_read_before(
    monkeypatch,
):
    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    d = dict.fromkeys(range(100))
    with procpool.Pool(2) as pool:
        it = pool.imap(identity, d)
        got = [next(it) for _ in range(4)]
        d[1000] = None  # (the dispatcher has read at most a window of it)
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            for value in it:
                got.append(value)
        assert got == list(range(len(got))) and 4 <= len(got) < 100


def test_an_empty_in_memory_imap_ends_while_every_worker_is_busy():
    # its input is read at once, not when a worker is free to take a chunk (found by a
    # review: the end waited for the 6 s task)
    with procpool.Pool(1) as pool:
        pool.apply_async(time.sleep, (6,))
        workers = pool._sched._workers.values()
        assert wait_until(lambda: any(w.read_progress()[0] for w in workers), 10)  # running
        it = pool.imap(abs, [])
        with pytest.raises(StopIteration):
            it.next(timeout=3)
        pool.terminate()


def test_an_in_memory_imap_filling_its_window_exactly_ends_while_its_worker_is_held(
    monkeypatch,
):
    # a list of exactly one window: its end was found only by one more read, which waited for
    # a worker free to take a chunk (here one running a timed task, which runs alone)
    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    with procpool.Pool(1) as pool:
        it = pool.imap(identity, list(range(16)))
        workers = pool._sched._workers
        assert wait_until(lambda: not any(w.inflight for w in workers.values()), 10)
        pool.apply_async(time.sleep, (8,), timeout=30)
        assert wait_until(lambda: any(w.exclusive for w in workers.values()), 10)
        assert [it.next(timeout=5) for _ in range(16)] == list(range(16))
        with pytest.raises(StopIteration):
            it.next(timeout=3)
        pool.terminate()


def test_a_ctrl_c_in_the_consumers_release_does_not_wedge_an_in_memory_imap(monkeypatch):
    # the release that queues a starved job again, cut short by a Ctrl-C: the consumer's
    # next wait reads on (before: the job was never queued again)
    import inspect

    from procpool import _scheduler, _tasks

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    code = _tasks.MapJob.release.__code__
    lines, first = inspect.getsourcelines(_tasks.MapJob.release)
    at = first + next(i for i, line in enumerate(lines) if "self.on_room()" in line)
    fired = []

    def local(frame, event, arg):
        if event == "line" and not fired and frame.f_lineno == at:
            fired.append(at)
            raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None

    with procpool.Pool(2) as pool:
        it = pool.imap(identity, list(range(200)))
        got = [it.next(timeout=10)]
        assert wait_until(lambda: _starved(pool, it._job), 10)
        _take_through_ctrl_c(it, tracer, got, 200)
        assert fired and got == list(range(200))


@pytest.mark.parametrize("source", ["list", "generator"])
def test_a_ctrl_c_as_an_imap_consumer_takes_the_pools_lock_leaves_the_lock_free(
    monkeypatch, source
):
    """A Ctrl-C raised just as the consumer's report (MapJob.release) has taken the pool's
    lock: it went through a Condition, whose __enter__ is Python code, so the exception left
    the lock held by the caller for good -- the I/O thread waited for it forever, and
    terminate() then join() hung (a flaky Ctrl-C test: 1 run in 5-30 beside two CPU hogs)."""
    with procpool.Pool(1) as pool:
        items = [0.02] * 6
        it = pool.imap(sleep_then, items if source == "list" else iter(items))
        assert next(it) is None
        space = it._job.space
        real_enter = threading.Condition.__enter__

        def interrupted(self):
            got = real_enter(self)
            if self is space and threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt  # (as a Ctrl-C's, once the lock is taken)
            return got

        monkeypatch.setattr(threading.Condition, "__enter__", interrupted)
        try:
            for _ in it:
                pass
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        lock = pool._sched._lock
        held = lock._is_owned()
        while lock._is_owned():  # (so that the pool can stop when this fails)
            lock.release()
        assert not held, "the pool's lock is still held after the Ctrl-C"
        pool.terminate()
        pool.join(10)


@pytest.mark.parametrize("source", ["list", "generator"])
def test_a_ctrl_c_as_the_consumer_reports_what_it_took_loses_none_of_its_window(
    monkeypatch, source
):
    # the consumer counted what it had taken out, then was cut short before the job added
    # it: those results were never counted as consumed, and the window shrank by them for
    # good -- here to nothing, and the imap waited forever (its reports are totals now)
    from procpool import _scheduler, _tasks

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 16)
    code = _tasks.MapJob.release.__code__
    fired = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is code and not fired:
            fired.append(1)
            raise KeyboardInterrupt  # (and Python stops tracing: once)
        return None

    items = list(range(200)) if source == "list" else (x for x in range(200))
    with procpool.Pool(2) as pool:
        it = pool.imap(identity, items)
        # a whole window of results waits: 16 taken without a wait, then one report of 16
        assert wait_until(lambda: sum(len(v) for v, _ in it._chunks.values()) >= 16, 10)
        got: list = []
        _take_through_ctrl_c(it, tracer, got, 200)
        assert fired and got == list(range(200))


def test_an_in_memory_imap_returns_at_once_while_a_callback_holds_the_deliveries():
    # imap() delivered its input's end itself (a short list ends at its first read), and so
    # waited for another task's callback to return (found by a review: a deadlock if the
    # callback waits for what the caller does after imap())
    with procpool.Pool(2) as pool:
        go, inside = threading.Event(), threading.Event()
        pool.apply_async(identity, (0,), callback=lambda _v: (inside.set(), go.wait(5)))
        assert inside.wait(10)
        started = time.monotonic()
        it = pool.imap(identity, [1, 2, 3])
        took = time.monotonic() - started
        go.set()
        assert list(it) == [1, 2, 3]
        assert took < 2, took


def _hold_the_io_thread(pool):
    """Run a callback on the I/O thread that waits: return the event that lets it go."""
    inside, release = threading.Event(), threading.Event()
    pool.apply_async(identity, (1,), callback=lambda _v: (inside.set(), release.wait(10)))
    assert inside.wait(10)
    time.sleep(0.01)  # its last turn is now well over 1 ms old
    return release


def test_a_long_burst_hands_off_once_per_1024_tasks_while_the_io_thread_is_held():
    # past 1024 queued tasks the 50 ms hand-off came every 64 tasks (48 waits for 4096)
    from procpool import _bursts

    with procpool.Pool(2) as pool:
        sched = pool._sched
        waits: list[tuple] = []
        real = sched._handoff
        sched._handoff = lambda *wait: (waits.append(wait), real(*wait))[1]
        release = _hold_the_io_thread(pool)
        try:
            results = [pool.apply_async(identity, (i,)) for i in range(4096)]
        finally:
            release.set()
        assert [r.get(60) for r in results] == list(range(4096))
        assert 1 <= waits.count((_bursts.HANDOFF_WAIT,)) <= 4096 // 1024, waits
        assert waits.count((_bursts.HANDOFF_AFTER,)) <= 1, waits  # (once per turn)


def test_a_hand_off_that_times_out_leaves_no_token_behind():
    # a token written for a waiter that had given up let every later hand-off return at once
    import select

    from procpool import _bursts

    with procpool.Pool(2) as pool:
        pool.map(sleep_then, [0.002] * 8, chunksize=1)  # ~2 ms a task: early hand-offs
        sched = pool._sched
        release = _hold_the_io_thread(pool)
        try:  # one early hand-off, which times out (1 ms) while the I/O thread is held
            results = [pool.apply_async(identity, (i,)) for i in range(200)]
        finally:
            release.set()
        assert [r.get(30) for r in results] == list(range(200))
        turn = sched._turn_at
        sched._wake()
        deadline = time.monotonic() + 10
        while (
            sched._handoffs or sched._handoff_waiting or sched._turn_at == turn
        ) and time.monotonic() < deadline:
            time.sleep(0.01)  # until nobody waits and the I/O thread has been through a turn
        assert not select.select([sched._handofffd], [], [], 0)[0], "a token was left behind"
        release = _hold_the_io_thread(pool)
        try:
            started = time.monotonic()
            sched._handoff(_bursts.HANDOFF_WAIT)  # no turn can come: it must wait it out
            waited = time.monotonic() - started
        finally:
            release.set()
        assert waited >= _bursts.HANDOFF_WAIT * 0.9


def test_a_dropped_imap_iterator_keeps_reading_its_input_within_the_bound(tmp_path, monkeypatch):
    # all of a dropped iterator's input runs, but it is never read faster than it runs
    import functools
    import itertools

    from procpool import _scheduler

    monkeypatch.setattr(_scheduler, "IMAP_HELD", 64)
    path = str(tmp_path / "ran")
    pool = procpool.Pool(2)
    try:
        it = pool.imap(functools.partial(record, path, seconds=0.001), itertools.count())
        assert next(it) == 0
        job = it._job
        del it
        gc.collect()
        ran = count_lines(path)
        peak = 0
        deadline = time.monotonic() + 30
        while count_lines(path) < ran + 4 * 64 and time.monotonic() < deadline:
            time.sleep(0.02)  # until it has run well past the bound it held when dropped
            peak = max(peak, job.available())
        assert count_lines(path) > ran  # still running
        assert peak <= 64  # read but not sent: what its input costs in memory
    finally:
        pool.terminate()


def test_an_imap_iterator_dropped_after_an_item_raised_is_freed_at_once():
    # the raised item's traceback held next()'s frame, and so the iterator, in a cycle: freed
    # only by a later garbage collection (its dropped input waited for it)
    import weakref

    with procpool.Pool(2) as pool:
        it = pool.imap(fail_on_three, range(10))
        with pytest.raises(ValueError):
            for _ in it:
                pass
        ref = weakref.ref(it)
        gc.disable()
        try:
            del it
            assert ref() is None
        finally:
            gc.enable()


def test_a_hand_off_eventfd_whose_waiter_count_was_lost_is_closed_with_its_pool():
    # a Ctrl-C landing in a hand-off's bookkeeping can leave the waiter count above 0; the
    # eventfd, which the last waiter would close, must not outlive the pool
    pool = procpool.Pool(1)
    sched = pool._sched
    with sched._lock:
        sched._handoff_waiting += 1  # as a waiter interrupted before its count went down
    fd = sched._handofffd
    pool.close()
    pool.join()
    assert sched._handofffd == fd  # left open for the (lost) waiter
    del pool, sched
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("where", ["drive", "_set_mask"])
def test_a_ctrl_c_while_apply_holds_a_claim_on_its_worker_does_not_wedge_the_pool(where):
    # apply claims an idle worker's channel for its own thread (the I/O thread stops reading
    # it) before drive's try/finally; a Ctrl-C in between left it claimed: nobody read that
    # worker again and the next task waited forever
    with procpool.Pool(1) as pool:
        assert pool.apply(identity, (2,)) == 2
        sys.settrace(interrupt_on_entering(where))
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.apply(identity, (3,))
        finally:
            sys.settrace(None)
        assert pool.apply_async(identity, (4,)).get(timeout=10) == 4
        assert pool.apply(identity, (5,)) == 5


@pytest.mark.parametrize(
    ("call", "where"),
    [
        ("apply", "write"),  # apply's quick send: its task assigned, the frame not written
        ("submit", "_send"),  # a call sent from the caller's thread to an idle worker
        ("map", "_send"),  # a small map's chunks sent from the caller's thread
        ("map", "_input_end"),  # a map registered, its input not ended: close() waited
        ("map_timeout", "_add_timer"),  # a chunk assigned (in inflight), not counted as sent
        ("imap", "start_thread"),  # an imap registered, its feeder never started: the same
        ("apply", "read_single"),  # about to read its reply
        ("get", "fill"),  # reading a reply from the socket, as get() reads a result itself
        ("get", "_on_results"),  # an error reply taken off the socket, not settled yet
    ],
)
def test_a_ctrl_c_inside_a_callers_channel_section_does_not_wedge_the_pool(call, where):
    # the caller's own thread writes a task to an idle worker, or reads its reply (the low-
    # latency paths); a Ctrl-C in the middle left a task with a worker that never got it, or
    # a reply that nobody settled, or a channel nobody watched: the next tasks, or join(),
    # waited forever.  Now that worker is killed and replaced, and the pool goes on.
    pool = procpool.Pool(1)
    try:
        assert pool.apply(identity, (2,)) == 2
        sys.settrace(interrupt_on_entering(where))
        try:
            with pytest.raises(KeyboardInterrupt):
                if call == "apply":
                    pool.apply(identity, (3,))
                elif call == "submit":
                    pool.submit(identity, 3).result(10)
                elif call == "map":
                    pool.map(identity, range(3))
                elif call == "map_timeout":
                    pool.map(identity, range(3), timeout=5)
                elif call == "imap":  # (a generator: a range or a list has no feeder)
                    pool.imap(identity, (x for x in range(3)))
                else:
                    bad = where == "_on_results"  # (a plain value is read without it)
                    pool.apply_async(fail_on_three, (3 if bad else 1,)).get(10)
        finally:
            sys.settrace(None)
        assert pool.apply_async(identity, (4,)).get(timeout=10) == 4
        assert pool.apply(identity, (5,)) == 5
        assert pool.map(identity, range(5)) == list(range(5))
        close_and_join(pool, 9, "a task that never ends")
        assert pool.pids() == []
    finally:
        pool.terminate()


def test_a_ctrl_c_after_get_settled_its_own_reply_costs_no_other_task():
    # get() reads its reply itself (drive); a Ctrl-C once the reply was settled needs no
    # abandon: the worker -- and another thread's task queued for it -- live on.  (Before,
    # that task had been sent to the worker being driven, and the abandon killed it.)
    with procpool.Pool(1) as pool:
        for i in range(20):
            assert pool.apply(identity, (i,)) == i  # the pool learns: tasks are short
        before = pool.pids()
        first = pool.apply_async(sleep_then, (0.3, 1))
        other: dict = {}
        queue_other = threading.Timer(
            0.1, lambda: other.update(r=pool.apply_async(sleep_then, (0.3, 2)))
        )
        queue_other.start()
        state = {"read": False, "armed": True}

        def after_the_read(frame, event, arg):  # a Ctrl-C once get() has read its reply
            code = frame.f_code
            if event != "call" or "procpool" not in code.co_filename or not state["armed"]:
                return None
            if code.co_name == "read_single":
                state["read"] = True
            elif state["read"] and code.co_name in ("_maybe_exit", "_set_mask"):
                state["armed"] = False
                raise KeyboardInterrupt
            return None

        sys.settrace(after_the_read)
        try:
            with pytest.raises(KeyboardInterrupt):
                first.get(10)
        finally:
            sys.settrace(None)
        queue_other.join(10)
        assert first.get(10) == 1
        assert other["r"].get(10) == 2
        assert pool.pids() == before


def test_a_task_queued_while_a_caller_reads_its_worker_itself_is_sent_when_it_lets_go():
    # get() reads its worker's channel itself (drive) and the dispatcher skips that worker
    # meanwhile; a task queued then (here by the error callback get() runs) waited for good
    # once get() let go, nothing waking the I/O thread (Pool(1): no other worker)
    queued: list = []
    with procpool.Pool(1) as pool:
        pool.apply(identity, (0,))

        def on_error(exc):
            queued.append(pool.apply_async(identity, (7,)))
            time.sleep(0.1)  # the I/O thread turns meanwhile: the worker is still claimed

        failing = pool.apply_async(fail_on_three, (3,), error_callback=on_error)
        with pytest.raises(ValueError):
            failing.get(10)
        assert queued[0].get(timeout=10) == 7


def test_a_map_async_failing_at_submission_runs_its_error_callback_on_the_pools_thread():
    # on an idle pool the first chunks are cut and sent from the caller's thread; one that
    # cannot be pickled fails there, but its error callback must still run on the pool's
    # thread (as multiprocessing's): the caller may hold a lock the callback takes
    lock = threading.Lock()
    seen: list = []

    def on_error(exc):
        with lock:
            seen.append((type(exc).__name__, threading.current_thread().name))

    with procpool.Pool(1) as pool:
        pool.apply(identity, (0,))
        with lock:
            result = pool.map_async(identity, [threading.Lock()], error_callback=on_error)
            assert not seen
        with pytest.raises(procpool.SerializationError):
            result.get(10)
        assert wait_until(lambda: seen, timeout=10)
        assert seen[0][0] == "SerializationError" and seen[0][1] != "MainThread"


def _note_outcome(wait, seen: list, done: threading.Event) -> None:
    """Run *wait* (inside a callback): note "returned" or its RuntimeError's text, then *done*."""
    try:
        wait()
        seen.append("returned")
    except RuntimeError as exc:
        seen.append(str(exc))
    finally:
        done.set()


@pytest.mark.parametrize("wait", ["map", "imap", "map_async"])
@pytest.mark.parametrize("caller_reads", [False, True])
def test_a_callback_waiting_for_more_results_of_its_pool_gets_an_error_not_a_hang(
    wait, caller_reads
):
    # A callback runs in the thread delivering the pool's results -- the I/O thread, or a
    # caller's reading its own reply in get() -- and no other thread can deliver meanwhile:
    # a map there, waiting with no timeout, hung for good (with it the caller's
    # get(timeout=...) that ran the callback, then terminate() 10 s and join() for ever)
    seen: list = []
    done = threading.Event()

    def on_result(_value):
        waits = {
            "map": lambda: pool.map(identity, [1, 2, 3]),
            "imap": lambda: list(pool.imap(identity, range(3))),
            "map_async": lambda: pool.map_async(identity, [1, 2, 3]).get(),
        }
        _note_outcome(waits[wait], seen, done)

    pool = procpool.Pool(2)
    try:
        result = pool.apply_async(identity, (5,), callback=on_result)
        if caller_reads:
            started = time.monotonic()
            assert result.get(timeout=10) == 5
            assert time.monotonic() - started < 10
        assert done.wait(10)
        assert len(seen) == 1 and "inside a callback of this pool" in seen[0], seen
        assert pool.map(identity, range(10)) == list(range(10))  # the pool goes on
    finally:
        started = time.monotonic()
        pool.terminate()
        pool.join(10)
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("which", ["callback", "error_callback"])
def test_a_callback_waiting_for_its_own_result_gets_an_error_not_a_hang(which):
    # the result is made ready once its callback returns: its get() inside the callback
    # waited for good (its pool was then left out of the check: done with it already), and
    # terminate() and join() after it
    box: dict = {}
    seen: list = []
    done = threading.Event()

    def wait_for_own(_value):
        _note_outcome(lambda: box["result"].get(), seen, done)

    pool = procpool.Pool(2)
    try:
        if which == "callback":
            box["result"] = pool.apply_async(identity, (1,), callback=wait_for_own)
        else:
            box["result"] = pool.map_async(int, ["x"], error_callback=wait_for_own)
        assert done.wait(10)
        assert len(seen) == 1 and "inside its own callback" in seen[0], seen
    finally:
        started = time.monotonic()
        pool.terminate()
        pool.join(10)
        assert time.monotonic() - started < 5


def test_apply_inside_a_callback_reads_its_own_reply_and_returns():
    # apply reads its reply in its own thread (Scheduler.drive): no delivery to wait for
    seen: list = []
    done = threading.Event()

    def on_result(value):
        seen.append(pool.apply(identity, (value + 1,)))
        done.set()

    with procpool.Pool(2) as pool:
        pool.apply_async(identity, (1,), callback=on_result)
        assert done.wait(10)
        assert seen == [2]


def test_a_ctrl_c_while_a_feeder_thread_starts_leaves_the_callers_signals_unblocked():
    # start_thread blocks the program's signals while it starts a quiet thread; a Ctrl-C
    # before its try (building the Thread) left SIGINT blocked in the caller for good
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    armed = [True]

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "call" and armed[0] and code.co_filename.endswith("threading.py"):
            if code.co_name == "__init__" and "self" in frame.f_locals:
                if type(frame.f_locals["self"]).__name__ == "Thread":
                    armed[0] = False
                    raise KeyboardInterrupt
        return None

    with procpool.Pool(1) as pool:
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):  # (a range too long for len(): read by a
                pool.imap(identity, range(2**64))  # quiet feeder thread, a shorter one has none)
        finally:
            sys.settrace(None)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        assert list(pool.imap(identity, range(3))) == [0, 1, 2]


@pytest.mark.parametrize("method", ["imap", "imap_unordered", "map", "map_async"])
def test_a_map_over_something_not_iterable_raises_and_leaves_nothing_open(method):
    # imap(f, 5) raised TypeError after registering its job: close() then waited forever
    pool = procpool.Pool(1)
    try:
        with pytest.raises(TypeError):
            getattr(pool, method)(identity, 5)
        assert pool.map(identity, range(3)) == [0, 1, 2]
        close_and_join(pool, 9, "a job that never ends")
    finally:
        pool.terminate()


@pytest.mark.parametrize("how", ["get", "result"])
def test_a_ctrl_c_as_a_waiting_caller_claims_the_worker_does_not_wedge_the_pool(how):
    # get() / result() claim the worker's channel for their own thread (drive) under the lock,
    # before drive's try/finally; a Ctrl-C right there left the claim behind
    with procpool.Pool(1) as pool:
        assert pool.apply(identity, (2,)) == 2
        slow = (
            pool.apply_async(sleep_then, (0.3, 3))
            if how == "get"
            else pool.submit(sleep_then, 0.3, 3)
        )
        wait = slow.get if how == "get" else slow.result
        sys.settrace(interrupt_on_entering("_set_mask"))
        try:
            with pytest.raises(KeyboardInterrupt):
                wait(10)
        finally:
            sys.settrace(None)
        assert pool.apply_async(identity, (4,)).get(timeout=10) == 4  # not waiting on slow
        assert wait(10) == 3


def test_a_pool_collected_while_a_thread_holds_the_fork_lock_does_not_deadlock_its_end():
    # The I/O thread ends holding its pool's lock (closing the death pipe); a thread holding
    # _FORK_LOCK (importing cloudpickle or ctypes) may run that pool's finalizer in a garbage
    # collection, which takes the pool's lock: the end must not wait for _FORK_LOCK.
    import textwrap

    code = textwrap.dedent(
        """
        import gc, os, time, procpool
        from procpool import _start
        pool = procpool.Pool(1)
        pool.apply(os.getpid)
        class Holder: pass
        holder = Holder(); holder.pool = pool; holder.me = holder  # only a collection frees it
        with _start._FORK_LOCK:
            pool.close()
            del pool, holder
            time.sleep(0.5)
            gc.collect()
        print("ended")
        """
    )
    out = run_python(code, 60)
    assert out.stdout.strip() == "ended", out.stderr


def test_an_imap_loop_collected_inside_its_iterators_own_lock_does_not_deadlock():
    # A for loop over an imap, left inside a reference cycle, is closed by whichever garbage
    # collection finds it: maybe in a thread inside that iterator's own lock (the I/O thread
    # delivering a chunk, a consumer in next()).  Its close gives back what it had not
    # yielded, under that lock: it must neither deadlock nor lose them.
    import textwrap

    code = textwrap.dedent(
        """
        import gc, procpool
        with procpool.Pool(2) as pool:
            it = pool.imap(abs, range(100), chunksize=10)
            class Box: pass
            box = Box(); box.me = box
            box.loop = iter(it)
            first = next(box.loop)  # the loop holds the first chunk
            del box  # left inside a cycle: only a collection closes it
            with it._lock:
                gc.collect()
            print(first, list(it) == list(range(1, 100)))
        """
    )
    out = run_python(code, 30)
    assert out.stdout.strip() == "0 True", out.stderr


def _children() -> list[int]:
    me = os.getpid()
    kids = []
    for task in os.listdir(f"/proc/{me}/task"):
        try:  # (a thread of an earlier test's pool may end between the listing and here)
            with open(f"/proc/{me}/task/{task}/children") as f:
                kids.extend(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            pass
    return kids


def test_a_ctrl_c_that_cuts_terminate_short_lets_it_be_called_again():
    # terminate() was the pool's finalizer, spent once called: a Ctrl-C inside it (waiting
    # for the I/O thread's lock, say) left the pool running for good, unterminable
    armed = [True]

    def tracer(frame, event, arg):  # a KeyboardInterrupt on entering Scheduler.terminate
        code = frame.f_code
        if event == "call" and armed[0] and code.co_name == "terminate":
            if code.co_filename.endswith("_scheduler.py"):
                armed[0] = False
                raise KeyboardInterrupt
        return None

    pool = procpool.Pool(1)
    pool.apply(identity, (1,))
    with pytest.raises(KeyboardInterrupt), traced(tracer):
        pool.terminate()
    assert not armed[0] and pool._sched.state == "RUNNING"
    pool.terminate()
    pool.join(10)
    assert pool._sched.state != "RUNNING" and pool.pids() == []


def test_a_ctrl_c_raised_once_the_io_thread_has_started_leaves_nothing_running():
    # A Ctrl-C arriving while Pool() starts its I/O thread (SIGINT blocked) is raised when the
    # mask comes back: it left the thread and its workers running, with no pool to end them
    raised = []

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "return" and code.co_name == "start_thread" and "procpool" in code.co_filename:
            raised.append(True)  # the next call of the caller's gets the interrupt
        elif event == "call" and raised == [True]:
            raised.append(False)
            raise KeyboardInterrupt
        return tracer

    before, kids = set(threading.enumerate()), set(_children())
    with pytest.raises(KeyboardInterrupt), traced(tracer):
        procpool.Pool(2)
    gc.collect()
    assert raised == [True, False]
    assert wait_until(lambda: not (set(threading.enumerate()) - before), 10)
    assert wait_until(lambda: not (set(_children()) - kids), 10)


def test_a_socket_default_timeout_in_the_program_leaves_pipes_queues_and_pools_blocking():
    """socket.setdefaulttimeout() applied to procpool's own sockets: a blocking recv/get
    raised TimeoutError after it, and a forkserver pool could not start (review, against
    CPython's TestTimeouts; multiprocessing's connections ignore it, bpo-6056)."""
    code = """if True:
        import socket, threading, time
        import procpool
        socket.setdefaulttimeout(0.05)
        a, b = procpool.Pipe()
        threading.Timer(0.3, b.send, ("pipe",)).start()
        assert a.recv() == "pipe"
        for q in (procpool.Queue(), procpool.Queue(3), procpool.SimpleQueue()):
            threading.Timer(0.3, q.put, ("queue",)).start()
            assert q.get() == "queue", q
        with procpool.Pool(1, start_method="forkserver") as pool:
            assert pool.apply(pow, (2, 5)) == 32
        print("ok")
    """
    proc = run_python(code, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("maxsize", [0, 3])
def test_a_worker_with_a_socket_default_timeout_leaves_the_callers_queue_and_pipe_blocking(maxsize):
    """A process that rebuilt a Queue or a Pipe end under a socket default timeout set
    O_NONBLOCK on the descriptions it shares with the caller: the caller's blocking get and
    recv then failed at once with BlockingIOError (review)."""
    import fcntl

    from tasks import hold_ipc_ends, set_socket_default_timeout

    q = procpool.Queue(maxsize)
    a, b = procpool.Pipe()
    timers = [threading.Timer(0.3, q.put, ("late",)), threading.Timer(0.3, b.send, ("late",))]
    try:
        with procpool.Pool(1, initializer=set_socket_default_timeout) as pool:
            assert pool.apply(hold_ipc_ends, (q, a, b)) == 3
            for fd in (q._r.fileno(), a.fileno()):
                assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            timers[0].start()
            assert q.get() == "late"
            timers[1].start()
            assert a.recv() == "late"
    finally:
        _cancel_then_close(timers, q, a, b)


def test_a_blocking_get_or_recv_waits_on_a_socket_another_process_made_non_blocking():
    """Until a process that rebuilds an end under a default timeout clears O_NONBLOCK again
    (see _ipc_wire.own_socket), the flag holds for everyone: a blocking read must wait."""
    import fcntl

    q = procpool.Queue()
    a, b = procpool.Pipe()
    timers = [
        threading.Timer(0.3, q.put, ("late",)),
        threading.Timer(0.3, b.send, ("late",)),
        threading.Timer(0.3, b.send_bytes, (b"raw",)),
    ]
    try:
        for fd in (q._r.fileno(), a.fileno()):  # as that other process leaves them meanwhile
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        timers[0].start()
        assert q.get() == "late"
        timers[1].start()
        assert a.recv() == "late"
        timers[2].start()
        assert a.recv_bytes() == b"raw"
    finally:
        _cancel_then_close(timers, q, a, b)


def _cancel_then_close(timers: list[threading.Timer], *ends: object) -> None:
    """A test's timers stopped first (a failure leaves none to write to closed ends), then
    its queues and pipe ends closed."""
    for timer in timers:
        timer.cancel()
        if timer.is_alive():
            timer.join(5)
    for end in ends:
        end.close()  # type: ignore[attr-defined]
