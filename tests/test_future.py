"""procpool's Future: a concurrent.futures.Future that makes its condition only when someone
waits or registers a callback.  Every stdlib way of using a future must behave as with the
stdlib's own, whether the condition was made before or after the result came in."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import threading
import time

import pytest
from conftest import held_by_another_thread, run_python, wait_until
from tasks import count_lines, record, sleep_then, square

import procpool
from procpool.results import Future

pytestmark = pytest.mark.timeout(60)


def finish_later(future, value, delay=0.05, error=False):
    def run():
        time.sleep(delay)
        if error:
            future.set_exception(value)
        else:
            future.set_result(value)

    threading.Thread(target=run).start()


@pytest.mark.parametrize("cls", [Future, cf.Future])  # ours against the stdlib's
def test_the_lifecycle_matches_the_stdlib(cls):
    f = cls()
    assert not f.done() and not f.running() and not f.cancelled()
    assert f.set_running_or_notify_cancel() is True and f.running()
    assert not f.cancel()  # running: too late
    f.set_result(5)
    assert f.done() and f.result() == 5 and f.exception() is None
    with pytest.raises(cf.InvalidStateError):
        f.set_result(6)

    g = cls()
    assert g.cancel() and g.cancel() and g.cancelled() and g.done()
    assert g.set_running_or_notify_cancel() is False
    with pytest.raises(cf.CancelledError):
        g.result()
    with pytest.raises(cf.CancelledError):
        g.exception()

    h = cls()
    h.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        h.result()
    assert isinstance(h.exception(), KeyError)
    with pytest.raises(cf.TimeoutError):
        cls().result(timeout=0.01)


def test_waiting_before_and_after_the_result():
    f = Future()
    finish_later(f, "late")
    assert f.result(timeout=10) == "late"  # waits: the condition is made, then notified
    e = Future()
    finish_later(e, ValueError("x"), error=True)
    assert isinstance(e.exception(timeout=10), ValueError)


def test_callbacks_before_and_after_completion():
    seen = []
    f = Future()
    f.add_done_callback(lambda fut: seen.append(("before", fut.result())))
    f.set_result(1)
    f.add_done_callback(lambda fut: seen.append(("after", fut.result())))
    c = Future()
    c.add_done_callback(lambda fut: seen.append(("cancelled", fut.cancelled())))
    c.cancel()
    assert seen == [("before", 1), ("after", 1), ("cancelled", True)]


def test_wait_and_as_completed_with_futures_finished_before_during_and_never():
    done_early = Future()
    done_early.set_result(0)
    later = [Future() for _ in range(20)]
    for i, f in enumerate(later):
        finish_later(f, i + 1, delay=0.01 * (i % 5))
    never = Future()
    got = sorted(f.result() for f in cf.as_completed([done_early, *later], timeout=10))
    assert got == list(range(21))
    done, pending = cf.wait([done_early, never], timeout=0.05)
    assert done == {done_early} and pending == {never}
    finish_later(never, "x")
    done, pending = cf.wait([never], timeout=10, return_when=cf.FIRST_COMPLETED)
    assert done == {never} and not pending


def test_many_threads_waiting_on_one_future():
    f = Future()
    results = []
    threads = [threading.Thread(target=lambda: results.append(f.result(10))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    f.set_result("all")
    for t in threads:
        t.join(10)
    assert results == ["all"] * 8


def test_pool_futures_with_the_stdlib_helpers_and_asyncio():
    with procpool.Pool(2) as pool:
        futures = [pool.submit(square, i) for i in range(200)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == sorted(
            i * i for i in range(200)
        )
        slow = pool.submit(sleep_then, 0.3, "slow")
        done, pending = cf.wait([slow], timeout=0.01)
        assert not done and pending == {slow}
        assert slow.result(10) == "slow"

        async def main():
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                asyncio.wrap_future(pool.submit(square, 7)),
                loop.run_in_executor(pool, square, 8),
            )

        assert asyncio.run(main()) == [49, 64]


def test_a_finalizer_using_a_future_inside_a_garbage_collection_does_not_deadlock():
    # making a condition allocates, which can start a collection, which runs finalizers --
    # in this thread, maybe while it holds the futures' module lock
    code = """
import gc, concurrent.futures as cf
from procpool.results import Future
class Holder:  # cancels its future when collected; kept in a cycle so only gc frees it
    def __init__(self): self.fut = Future(); self.me = self
    def __del__(self):
        self.fut.cancel()
        Holder()
gc.disable(); Holder(); gc.set_threshold(1); gc.enable()
for i in range(200):
    try:
        Future().result(timeout=0)
    except cf.TimeoutError:
        pass
gc.disable()
print("ok")
"""
    out = run_python(code, 30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def lock_is_free(_):
    from procpool import results

    if results._FUTURE_LOCK.acquire(blocking=False):
        results._FUTURE_LOCK.release()
        return True
    return False


def test_a_worker_forked_while_a_thread_holds_the_futures_lock_gets_it_free():
    from procpool import results

    with held_by_another_thread(results._FUTURE_LOCK):
        with procpool.Pool(1) as pool:  # forked now, while the lock is held
            assert pool.apply(lock_is_free, (0,)) is True


def test_a_pool_future_read_by_its_own_thread_keeps_the_stdlib_semantics(tmp_path):
    """result() may read the reply in the caller's thread (Scheduler.drive): deadlines, other
    threads waiting, callbacks and a worker's death still behave as with any future."""
    with procpool.Pool(1) as pool:
        assert pool.submit(square, 2).result(10) == 4  # the function is known to the worker
        slow = pool.submit(sleep_then, 0.3, "x")
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.01)  # gives up at its deadline, while driving
        called = []
        slow.add_done_callback(lambda f: called.append(f.result()))
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(slow.result(10))) for _ in range(4)
        ]
        for t in threads:
            t.start()
        assert slow.result(10) == "x"
        for t in threads:
            t.join(10)
        assert results == ["x"] * 4 and called == ["x"]
        assert slow._sched is None and slow._task is None  # no cycle with its task once in
        started = str(tmp_path / "started")
        lost = pool.submit(record, started, 1, 30)
        assert wait_until(lambda: count_lines(started) == 1, 10)  # running in the worker
        os.kill(pool.pids()[0], signal.SIGKILL)
        with pytest.raises(procpool.WorkerLostError):
            lost.result(10)
        assert pool.submit(square, 3).result(10) == 9


def test_a_futures_condition_is_taken_by_c_code_so_a_ctrl_c_cannot_leave_it_held():
    """The standard library's Future methods (cancel, add_done_callback, set_result...) take
    the future's condition with `with`: a threading.Condition's __enter__ is Python code, and
    a Ctrl-C raised as its inner acquire returned left the lock held for good -- the I/O
    thread, starting the task, then waited for it forever holding the pool's lock (a review).
    procpool's condition is an RLock whose __enter__ and __exit__ are the RLock's C code."""
    import types

    with procpool.Pool(1) as pool:
        f = pool.submit(square, 3)
        cond = f._condition
        for name in ("__enter__", "__exit__"):
            assert not isinstance(getattr(type(cond), name), types.FunctionType), name
        f.add_done_callback(lambda fut: None)
        assert cf.wait([f], timeout=10).done == {f}
        assert next(cf.as_completed([f], timeout=10)) is f
        assert f.result(10) == 9 and not cond._is_owned()
        g = pool.submit(sleep_then, 0.3)
        h = pool.submit(square, 4)  # (maybe sent already, behind g: then not cancelled)
        assert h.cancelled() if h.cancel() else h.result(10) == 16
        assert g.result(10) is None and not h._condition._is_owned()


def test_a_ctrl_c_while_result_waits_leaves_no_lock_held(monkeypatch):
    """result() sleeps on a private lock, with the future's condition released: a Ctrl-C
    during the sleep is a KeyboardInterrupt (through Condition.wait, one landing between its
    release and its `try` was a RuntimeError: 'cannot release un-acquired lock'), and the
    future is then delivered as usual."""
    from procpool.results import _FutureCondition

    class Interrupted:
        def acquire(self, *args):
            raise KeyboardInterrupt  # (as a Ctrl-C's, in the sleep)

    real_prepare = _FutureCondition.prepare
    calls = []

    def prepare(self):
        waiter = real_prepare(self)
        if not calls and threading.current_thread() is threading.main_thread():
            calls.append(waiter)
            return Interrupted()
        return waiter

    with procpool.Pool(1) as pool:
        pool.submit(sleep_then, 1.0)  # holds the worker: the next one waits (a while)
        f = pool.submit(square, 3)
        monkeypatch.setattr(_FutureCondition, "prepare", prepare)
        with pytest.raises(KeyboardInterrupt):
            f.result(10)
        monkeypatch.undo()
        assert calls and not f._condition._is_owned()
        assert f.result(10) == 9
