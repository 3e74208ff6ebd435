"""Bursts of ``apply_async``: the calls travel as runs (``_tasks.CallRun``), each still a task of
its own for the caller -- its value, its error, its cancel(), its fate when a worker dies."""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import CancelledError

import pytest
from _pool_helpers import interrupt_on_entering, io_thread_held
from conftest import wait_until
from faults.helpers import exit_on_tens, tiny
from tasks import identity, record, record_twice, recorded, sleep_then

import procpool
from procpool import _protocol as P
from procpool._scheduler import Scheduler

N = 20  # calls in a burst


def in_a_thread(call):
    """Run *call* in a thread of its own (it may wait for the held I/O thread); its outcome."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


@pytest.fixture
def pool1():
    with procpool.Pool(1) as p:
        p.map(identity, range(500))  # the pool learns its calls are tiny: bursts make runs
        yield p


def test_a_burst_goes_as_runs_and_each_call_gets_its_own_value(pool1):
    with io_thread_held(pool1):
        rs = [pool1.apply_async(identity, (i,)) for i in range(N)]
        assert all(r._task is None for r in rs[2:])  # queued as they are (see call_async)
    assert wait_until(lambda: all(r.ready() for r in rs), 10)
    assert [r.get() for r in rs] == list(range(N))


def test_cancel_of_a_queued_call_keeps_it_from_running(pool1, tmp_path):
    path = str(tmp_path / "ran")
    with io_thread_held(pool1):
        rs = [pool1.apply_async(record, (path, i)) for i in range(N)]
        # rs[0] went to the idle worker at once, rs[1] is a Task; the rest wait with none
        assert rs[5]._task is None
        thread, out = in_a_thread(rs[5].cancel)  # (its delivery waits for the held thread)
        assert wait_until(lambda: rs[5]._entry is None, 10)  # marked: the I/O thread skips it
    thread.join(10)
    assert out == [True]
    assert not rs[5].cancel()  # (once)
    with pytest.raises(CancelledError):
        rs[5].get(10)
    want = [i for i in range(N) if i != 5]
    assert [rs[i].get(10) for i in want] == want
    assert sorted(recorded(path)) == want


def test_cancel_of_a_call_in_a_pending_run_takes_it_out_of_the_run(pool1, tmp_path):
    path = str(tmp_path / "ran")
    with io_thread_held(pool1):  # (the calls then go as one run, however the threads run)
        blocker = pool1.apply_async(sleep_then, (0.5, "done"), timeout=10)  # runs alone
        rs = [pool1.apply_async(record, (path, i)) for i in range(N)]
    run = wait_until(lambda: rs[7]._task, 10)
    assert run.kind == P.CALLS and run.state == 0  # a run, waiting (_PENDING)
    assert rs[7].cancel() and rs[9].cancel()
    assert rs[7] not in run.sink.members and rs[9] not in run.sink.members
    for r in (rs[7], rs[9]):
        with pytest.raises(CancelledError):
            r.get(10)
    assert blocker.get(10) == "done"
    want = [i for i in range(N) if i not in (7, 9)]
    assert [rs[i].get(10) for i in want] == want
    assert sorted(recorded(path)) == want


def test_force_cancel_of_a_running_call_in_a_run_spares_the_others(pool1, tmp_path):
    path = str(tmp_path / "ran")
    with io_thread_held(pool1):
        rs = [pool1.apply_async(record, (path, i, 30.0 if i == 6 else 0.001)) for i in range(N)]
    assert wait_until(lambda: 6 in recorded(path), 10)
    run = rs[6]._task
    assert run.kind == P.CALLS and run.state == 1  # (_SENT)
    assert not rs[6].cancel()  # running: only force stops it
    assert rs[6].cancel(force=True)
    with pytest.raises(CancelledError):
        rs[6].get(10)
    # those before it finished and said so (each took over a flush interval); those after it
    # never started: sent again, to the replacement worker
    assert [rs[i].get(20) for i in range(N) if i != 6] == [i for i in range(N) if i != 6]
    assert sorted(recorded(path)) == list(range(N))


@pytest.mark.parametrize("progress_says", ["finished", "running (a race)"])
def test_force_cancel_of_a_call_in_a_run_whose_reply_is_unread(pool1, tmp_path, progress_says):
    """Call 6 of a run has finished and its reply waits unread (call 5's callback holds the
    I/O thread); call 7 runs.  By the progress slot call 6 is done: cancel(force=True) says
    False and its value comes.  Should the slot still say running (a race), the cancel says
    True and the value, read before the worker's death, is not delivered: CancelledError."""
    path = str(tmp_path / "ran")
    inside, gate = threading.Event(), threading.Event()

    def hold(_):
        inside.set()
        gate.wait(30)

    seconds = {5: 0.2, 6: 0.5, 7: 30.0}  # (5 and 6: each flushed on its own)
    with io_thread_held(pool1):
        rs = [
            pool1.apply_async(
                record, (path, i, seconds.get(i, 0)), callback=hold if i == 5 else None
            )
            for i in range(N)
        ]
    try:
        assert inside.wait(10)  # call 5 delivered: the I/O thread is held
        run = rs[6]._task
        assert run.kind == P.CALLS and rs[5]._task is None and rs[7]._task is run
        assert wait_until(lambda: 7 in recorded(path), 10)  # call 6 has finished
        pids = [w.proc.pid for w in pool1._sched._workers.values()]
        if progress_says == "finished":
            assert not rs[6].cancel(force=True)
            assert [w.proc.pid for w in pool1._sched._workers.values()] == pids
        else:
            pool1._sched._finished_on = lambda w, tid: False
            assert rs[6].cancel(force=True)
        assert rs[7].cancel(force=True)  # running: its worker goes
    finally:
        gate.set()
    if progress_says == "finished":
        assert rs[6].get(10) == 6
    else:
        with pytest.raises(CancelledError):
            rs[6].get(10)
    with pytest.raises(CancelledError):
        rs[7].get(10)
    assert [r.get(20) for r in rs[8:]] == list(range(8, N))  # sent again
    assert [r.get(1) for r in rs[:6]] == list(range(6))


@pytest.mark.parametrize("api", ["apply_async", "submit"])
def test_a_worker_dying_in_a_run_fails_the_call_that_killed_it_and_sends_the_rest_again(api):
    with procpool.Pool(2) as pool:
        pool.map(tiny, range(2000))  # tiny calls: bursts make runs
        if api == "submit":
            rs = [(i, pool.submit(exit_on_tens, i)) for i in range(1, 400)]
        else:
            rs = [(i, pool.apply_async(exit_on_tens, (i,))) for i in range(1, 400)]
        ok, lost, killed = 0, 0, []
        for i, r in rs:
            try:
                assert (r.result(60) if api == "submit" else r.get(60)) == i
                ok += 1
            except procpool.WorkerLostError as exc:
                message = str(exc)
                assert "before it could start" not in message
                if i % 10 == 0:
                    assert "while running" in message and exc.exitcode == 3, message
                    killed.append(message)
                else:  # finished, but its result was still buffered in the dying worker
                    assert exc.result_lost and "after running" in message, message
                    lost += 1
        assert len(killed) == 39 and ok + lost == 360
        assert ok  # (those between a death and the next flush of results are lost with it)
        assert any("a call of exit_on_tens" in m for m in killed), killed[:3]
        assert pool.apply(tiny, (5,)) == 5


def test_terminate_in_a_burst_settles_every_call():
    pool = procpool.Pool(2)
    try:
        pool.map(identity, range(500))
        rs = [pool.apply_async(sleep_then, (0.001, i)) for i in range(3000)]
        pool.terminate()
        for i, r in enumerate(rs):
            try:
                assert r.get(30) == i
            except procpool.PoolTerminated:
                pass
    finally:
        pool.terminate()
        pool.join(10)


def test_shutdown_cancelling_a_burst_cancels_exactly_what_did_not_run(tmp_path):
    for attempt in range(3):  # (until some were still queued: see below)
        path = str(tmp_path / f"ran{attempt}")
        with procpool.Pool(1) as pool:
            pool.map(identity, range(500))
            rs = [pool.apply_async(record, (path, i, 0.002)) for i in range(300)]
            pool.shutdown(wait=True, cancel_futures=True)
        ran, cancelled = [], []
        for i, r in enumerate(rs):
            try:
                ran.append(r.get(10))
            except CancelledError:
                cancelled.append(i)
        assert sorted(recorded(path)) == ran
        assert sorted(ran + cancelled) == list(range(300))
        if cancelled:
            break
    # 300 calls of 2 ms each: most had not started -- unless the pool, estimating them by
    # identity's cost, sent every one ahead before the shutdown (then none can be cancelled;
    # seen once in a loaded CI run)
    assert cancelled


def test_a_burst_of_submits_goes_as_runs_and_a_cancelled_future_never_runs(pool1, tmp_path):
    path = str(tmp_path / "ran")
    with io_thread_held(pool1):
        fs = [pool1.submit(record, path, i) for i in range(N)]
        assert all(f._task is None for f in fs[2:])  # queued as they are (see call_async)
        assert fs[5].cancel() and fs[9].cancel()  # queued: a Future's cancel() needs no one
    assert wait_until(lambda: all(f.done() for f in fs), 10)
    assert fs[5].cancelled() and fs[9].cancelled()
    want = [i for i in range(N) if i not in (5, 9)]
    assert [fs[i].result(10) for i in want] == want
    assert sorted(recorded(path)) == want


def test_apply_async_and_submit_calls_mixed_in_one_burst_each_get_their_own(pool1):
    with io_thread_held(pool1):
        hs = [pool1.submit(identity, i) if i % 3 else pool1.apply_async(identity, (i,))
              for i in range(N)]  # fmt: skip
    assert [h.result(10) if i % 3 else h.get(10) for i, h in enumerate(hs)] == list(range(N))


def test_a_run_failed_whole_fails_each_call_apart_even_if_an_error_callback_raises(capsys):
    def bad_callback(exc):
        raise RuntimeError("a bug in the error callback")

    pool = procpool.Pool(1)
    try:
        pool.map(identity, range(500))
        with io_thread_held(pool):
            rs = [pool.apply_async(identity, (i,), error_callback=bad_callback) for i in range(N)]
            # the calls are still queued: shutdown gathers them into a run and cancels it (its
            # deliveries wait for the held thread)
            thread, _ = in_a_thread(lambda: pool.shutdown(wait=False, cancel_futures=True))
            assert wait_until(lambda: rs[-1]._task is not None, 10)
        thread.join(10)
        errors = []
        for r in rs[2:]:  # (rs[0] went at once, rs[1] as a task: they may have run)
            with pytest.raises(CancelledError) as info:
                r.get(10)
            errors.append(info.value)
        assert len({id(e) for e in errors}) == len(errors)  # each its own exception
    finally:
        pool.terminate()
        pool.join(10)
    assert "a bug in the error callback" in capsys.readouterr().err


class _Big:
    pass


def _closure_over_a_big_object():
    big = _Big()

    def closure(i):  # pickled by value, with what it captures
        return i + (big is not None)

    return closure, weakref.ref(big)


def test_finished_calls_keep_neither_their_function_nor_its_arguments():
    closure, ref = _closure_over_a_big_object()
    with procpool.Pool(1) as pool:
        pool.map(identity, range(500))
        rs = [pool.apply_async(closure, (i,)) for i in range(200)]
        assert [r.get(10) for r in rs] == [i + 1 for i in range(200)]
    del closure, pool
    gc.collect()
    assert ref() is None  # the results (still held) keep nothing of the call
    assert all(getattr(r, "_entry", None) is None and getattr(r, "_args", None) is None for r in rs)


def test_a_ctrl_c_while_shutdown_gathers_queued_calls_into_a_run_loses_none(pool1):
    # shutdown(cancel_futures=True) takes the inbox in the caller's thread; a Ctrl-C there
    # lost the calls taken so far (in neither the inbox nor the queue: nothing ever settled
    # them, not even terminate()).  They now go back to the inbox.
    with io_thread_held(pool1):
        rs = [pool1.apply_async(identity, (i,)) for i in range(N)]
        sys.settrace(interrupt_on_entering("_make_run"))
        try:
            with pytest.raises(KeyboardInterrupt):
                pool1.shutdown(wait=False, cancel_futures=True)
        finally:
            sys.settrace(None)
    assert [r.get(10) for r in rs] == list(range(N))  # still running: they ran


class _Sink:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def _on_result(self, task, value):
        self.log.append(self.name)


class _Deliverer:  # the part of a Scheduler that delivers (see Scheduler._deliver_all)
    _deliver_all = Scheduler._deliver_all
    _deliver_members = Scheduler._deliver_members

    def __init__(self):
        self._lock = threading.RLock()
        self._deliveries = []

    def _wake(self):
        pass


@pytest.mark.parametrize("function", ["_deliver_all", "_deliver_members"])
def test_a_ctrl_c_in_a_delivering_caller_loses_at_most_the_result_begun_and_repeats_none(function):
    # A KeyboardInterrupt at each line of the delivery loop (a trace hook: where a Ctrl-C's
    # handler may run, and more), at each of its passes: the rest is given back, in order, for
    # the next delivery (the I/O thread's); a result whose delivery had begun counts as
    # delivered.  (It lost the rest of the batch, then -- briefly -- delivered some twice.)
    code = getattr(Scheduler, function).__code__
    lines, first = inspect.getsourcelines(getattr(Scheduler, function))
    want = [0, 1, 2, "cb", 10, 11]
    for lineno in range(first, first + len(lines)):
        if lines[lineno - first].strip() == "try:":
            continue  # (3.11 leaves a try's NOP outside every handler; no signal lands there)
        for hit in range(1, 7):
            log, fired = [], []
            d = _Deliverer()
            d._deliveries = [
                ("members", [_Sink(k, log) for k in range(3)], [None] * 3),
                ("cb", log.append, ("cb",)),
                ("members", [_Sink(k, log) for k in (10, 11)], [None] * 2),
            ]

            def tracer(frame, event, arg, lineno=lineno, hit=hit, fired=fired):
                if frame.f_code is not code:
                    return None

                def line(frame, event, arg):
                    if event == "line" and frame.f_lineno == lineno:
                        fired.append(1)
                        if len(fired) == hit:
                            raise KeyboardInterrupt
                    return line

                return line

            sys.settrace(tracer)
            try:
                d._deliver_all()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            d._deliver_all()  # what was given back
            assert len(log) == len(set(log)), (lineno, hit, log)
            assert log == [x for x in want if x in log], (lineno, hit, log)
            assert len(log) >= len(want) - 1, (lineno, hit, log)


def test_a_real_ctrl_c_while_shutdown_cancels_queued_calls_waits_until_they_are_cancelled(pool1):
    # shutdown(cancel_futures=True) moves the queued calls in the caller's thread with SIGINT
    # held back (interrupts_held): a Ctrl-C that comes meanwhile is raised once they are all
    # cancelled, instead of cutting the moving in the middle.
    sched = pool1._sched
    make_run = sched._make_run

    def make_run_with_a_ctrl_c(entry, members):
        if not sent:
            sent.append(1)
            signal.raise_signal(signal.SIGINT)  # a real one, to this (the main) thread
        return make_run(entry, members)

    sent: list = []
    with io_thread_held(pool1):
        rs = [pool1.apply_async(identity, (i,)) for i in range(N)]
        sched._make_run = make_run_with_a_ctrl_c
        try:
            with pytest.raises(KeyboardInterrupt):
                pool1.shutdown(wait=False, cancel_futures=True)
        finally:
            del sched._make_run
    assert sent
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, ())  # (not left held)
    for r in rs[1:]:  # (rs[0] went to the idle worker at once)
        with pytest.raises(CancelledError):
            r.get(10)


def test_futures_of_a_run_waited_on_or_not_each_settle_once(pool1):
    # a run's Futures are marked running, and settled, together under one lock; those with a
    # condition (a done callback, a waiter) one by one, so that their callbacks run
    calls: list = []
    with io_thread_held(pool1):
        fs = [pool1.submit(identity, i) for i in range(N)]
        for f in fs[::3]:
            f.add_done_callback(lambda f: calls.append(f.result()))
    done = list(concurrent.futures.as_completed(fs, timeout=10))
    assert sorted(f.result() for f in done) == list(range(N))
    assert wait_until(lambda: len(calls) == len(range(0, N, 3)), 10)
    assert sorted(calls) == list(range(0, N, 3))
    assert all(f.done() and not f.running() for f in fs)


def _a_call_sent_behind_a_running_one(pool, path, other):
    """Submit a 1 s ``record`` and a call of *other* right behind it until the pool has sent
    the second ahead to the busy worker (the dispatcher decides: up to 5 tries); return both
    results and the numbers they record (the running one's, the queued one's)."""
    for attempt in range(5):
        for _ in range(200):  # cheap calls: the pool sends work ahead
            pool.apply(record, (path, -5))
        first, second = 10 * attempt + 1, 10 * attempt + 2
        with io_thread_held(pool):  # (one batch: both are sent at once)
            running = pool.apply_async(record, (path, first, 1.0))
            queued = pool.apply_async(other, (path, second))
        assert wait_until(lambda first=first: first in recorded(path), 10)
        task = queued._task
        if task is not None and task.worker is not None:  # sent ahead, behind the running one
            return running, queued, first, second
        assert running.get(10) == first and queued.get(10) == second
    pytest.fail("the second call was never sent ahead")


@pytest.mark.parametrize("queued_calls", ["the same function (a run)", "another function"])
def test_force_cancel_of_a_call_not_started_spares_the_one_running(pool1, tmp_path, queued_calls):
    # a call sent ahead to a busy worker, not started: the worker was killed for it, failing
    # the call running there (WorkerLostError) and losing the results it had not sent; now
    # the worker skips it (the progress slot's SKIP) and the others go on
    path = str(tmp_path / "ran")
    other = record if queued_calls.startswith("the same") else record_twice
    running, queued, first, second = _a_call_sent_behind_a_running_one(pool1, path, other)
    assert queued.cancel(force=True)
    with pytest.raises(CancelledError):
        queued.get(10)
    assert running.get(10) == first  # not killed
    assert pool1.apply_async(other, (path, 3)).get(10) == 3
    assert second not in recorded(path)  # never ran


def test_a_force_cancelled_call_stays_cancelled_through_terminate(tmp_path):
    # terminate() failed it with PoolTerminated after cancel(force=True) said True
    pool = procpool.Pool(1)
    try:
        r = pool.apply_async(sleep_then, (30.0, 1))
        assert wait_until(lambda: r._task is not None and r._task.worker is not None, 10)
        time.sleep(0.2)
        assert r.cancel(force=True)
        pool.terminate()
        with pytest.raises(CancelledError):
            r.get(10)
    finally:
        pool.terminate()


def test_a_force_cancelled_member_of_a_run_stays_cancelled_through_terminate(tmp_path):
    # a run's members cancel(force=True) stopped are listed in the run (sink.cancelled), and
    # terminate() failed every unanswered member with PoolTerminated
    path = str(tmp_path / "ran")
    pool = procpool.Pool(1)
    try:
        pool.map(identity, range(500))  # tiny calls: a burst goes as runs
        inside, gate = threading.Event(), threading.Event()
        pool.apply_async(identity, (0,), callback=lambda _: (inside.set(), gate.wait(30)))
        assert inside.wait(10)
        rs = [pool.apply_async(record, (path, i, 30.0 if i == 6 else 0.001)) for i in range(N)]
        gate.set()
        assert wait_until(lambda: 6 in recorded(path), 10)
        run = rs[10]._task
        assert run is not None and run.kind == P.CALLS and run.state == 1  # (_SENT)
        assert rs[10].cancel(force=True)
        pool.terminate()
        with pytest.raises(CancelledError):
            rs[10].get(10)
        with pytest.raises(procpool.PoolTerminated):
            rs[11].get(10)
    finally:
        pool.terminate()


def test_force_cancel_says_true_for_a_call_the_worker_skipped_while_it_looked(
    pool1, tmp_path, monkeypatch
):
    # cancel(force=True) read the SKIP flag (still set), lost the CPU while the worker reached
    # the call and skipped it, then read the slot (finished): it said False, and get() raised
    # the worker's own "skipped" error.  The pause stands for that lost CPU
    from procpool._supervise import WorkerSupervision

    path = str(tmp_path / "ran")
    original = WorkerSupervision._finished_on
    calls: list[int] = []

    def finished_on_after_a_pause(self, w, tid):
        calls.append(tid)
        if len(calls) == 2:  # (the look after the skip was asked)
            time.sleep(1.5)  # the running call (1 s) ends, the worker skips ours
        return original(self, w, tid)

    running, queued, first, second = _a_call_sent_behind_a_running_one(pool1, path, record_twice)
    monkeypatch.setattr(WorkerSupervision, "_finished_on", finished_on_after_a_pause)
    assert queued.cancel(force=True)
    with pytest.raises(CancelledError) as info:
        queued.get(10)
    assert "skipped" not in str(info.value)  # the cancel's own, not the worker's reply
    assert running.get(10) == first
    assert second not in recorded(path)
