"""The concurrent.futures surface: Pool.submit and the drop-in ProcessPoolExecutor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import threading
import time

import pytest
from conftest import run_python
from tasks import (
    box,
    count_lines,
    fail,
    fail_on,
    record,
    record_die_once,
    recorded,
    sleep_then,
    square,
)

import procpool


def test_pool_submit_returns_a_future():
    with procpool.Pool(2) as pool:
        f = pool.submit(square, 7)
        assert isinstance(f, concurrent.futures.Future)
        assert f.result(10) == 49
        g = pool.submit(fail, "nope")
        with pytest.raises(ValueError, match="nope"):
            g.result(10)
        assert isinstance(pool, concurrent.futures.Executor)


def test_executor_submit_map_shutdown():
    with procpool.ProcessPoolExecutor(max_workers=2) as ex:
        assert ex.submit(square, 3).result(10) == 9
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
        assert list(ex.map(pow, [2, 3], [3, 2], chunksize=4)) == [8, 9]
        futures = [ex.submit(square, i) for i in range(20)]
        done, _ = concurrent.futures.wait(futures, timeout=10)
        assert len(done) == 20


def test_executor_map_raises_an_items_error_at_its_position():
    with procpool.ProcessPoolExecutor(2) as ex:
        it = ex.map(fail_on, range(6))
        assert [next(it), next(it), next(it)] == [0, 10, 20]
        with pytest.raises(ValueError):
            next(it)


@pytest.mark.parametrize("chunksize", [1, 50])
def test_executor_map_keeps_no_result_it_has_yielded(chunksize):
    # as the standard library's (CPython #14406, its test_free_reference): the iterator held
    # every result of the chunk it was in, 50 results handed out still alive (review)
    import weakref

    with procpool.ProcessPoolExecutor(2) as ex:
        seen = 0
        for obj in ex.map(box, range(200), chunksize=chunksize):
            assert obj.value == seen
            ref = weakref.ref(obj)
            del obj
            assert ref() is None, seen
            seen += 1
        assert seen == 200
    with procpool.Pool(2) as pool:  # next() on an imap iterator alike
        it = pool.imap(box, range(100), chunksize=50)
        ref = weakref.ref(next(it))
        assert ref() is None


def test_executor_map_timeout_is_a_deadline():
    ex = procpool.ProcessPoolExecutor(1)
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        list(ex.map(sleep_then, [5.0], timeout=0.1))
    assert time.monotonic() - started < 4
    ex.shutdown(wait=False, cancel_futures=True)
    ex._pool.terminate()


def test_submit_after_shutdown_raises_runtime_error():
    ex = procpool.ProcessPoolExecutor(1)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_shutdown_cancel_futures_cancels_what_has_not_started():
    ex = procpool.ProcessPoolExecutor(1)
    running = ex.submit(sleep_then, 0.5, "ran")
    queued = [ex.submit(square, i) for i in range(10)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(10) == "ran"
    assert any(f.cancelled() for f in queued)


@pytest.mark.parametrize("waiting", ["before", "after"])
def test_futures_cancelled_by_shutdown_end_concurrent_futures_waits(waiting):
    """The stdlib's executors leave such futures CANCELLED without telling their waiters:
    ``concurrent.futures.wait`` and ``as_completed`` then run to their timeout (or forever)."""
    ex = procpool.ProcessPoolExecutor(1)
    running = ex.submit(sleep_then, 0.5, "ran")
    queued = [ex.submit(square, i) for i in range(10)]
    waits = []
    waiter = None
    if waiting == "before":  # a thread already waiting on them all
        waiter = threading.Thread(
            target=lambda: waits.append(concurrent.futures.wait(queued, timeout=30.0))
        )
        waiter.start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(10) == "ran"
    assert any(f.cancelled() for f in queued)
    if waiter is not None:
        waiter.join(30.0)
        done, not_done = waits[0]
    else:
        done, not_done = concurrent.futures.wait(queued, timeout=30.0)
    assert not not_done and done == set(queued)
    assert set(concurrent.futures.as_completed(queued, timeout=30.0)) == set(queued)


@pytest.mark.parametrize("end", ["shutdown_cancel_futures", "terminate"])
def test_futures_the_caller_cancelled_end_waits_when_the_pool_gives_them_up(end):
    """Cancelled by the caller while queued in a burst (runs), then given up by the pool
    before it would have started them: concurrent.futures waits on them end."""
    ex = procpool.ProcessPoolExecutor(1)
    assert ex.submit(square, 2).result(10) == 4  # cached: a burst travels as runs
    blocker = ex.submit(sleep_then, 0.5, "ran")
    futures = [ex.submit(square, i) for i in range(2000)]
    cancelled = [f for f in futures[-500::50] if f.cancel()]
    assert cancelled
    if end == "terminate":
        ex._pool.terminate()
    ex.shutdown(wait=True, cancel_futures=True)
    done, not_done = concurrent.futures.wait([blocker, *futures], timeout=30.0)
    assert not not_done
    assert all(f.cancelled() for f in cancelled)


def test_a_done_callback_of_a_future_cancelled_by_shutdown_finds_it_done():
    """Waiters are told before the callbacks run: a callback may wait on its own future."""
    ex = procpool.ProcessPoolExecutor(1)
    ex.submit(sleep_then, 0.5, "ran")
    queued = ex.submit(square, 3)
    seen = []
    queued.add_done_callback(
        lambda f: seen.append(len(concurrent.futures.wait([f], timeout=30.0).not_done))
    )
    ex.shutdown(wait=True, cancel_futures=True)
    assert queued.cancelled() and seen == [0]


def test_future_cancel_before_it_runs():
    with procpool.Pool(1) as pool:
        blocker = pool.submit(sleep_then, 0.5)
        waiting = pool.submit(square, 2)
        assert waiting.cancel()
        assert blocker.result(10) is None
        assert waiting.cancelled()
        assert pool.submit(square, 3).result(10) == 9


def test_works_with_asyncio_run_in_executor():
    async def main():
        loop = asyncio.get_running_loop()
        with procpool.ProcessPoolExecutor(2) as ex:
            results = await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(8)))
        return results

    assert asyncio.run(main()) == [x * x for x in range(8)]


def sleep_then_abort(seconds):
    time.sleep(seconds)
    os.abort()


def test_futures_queued_behind_a_crash_are_sent_again_and_complete():
    # the worker holds the crashing task and the quick ones queued after it (their cost is
    # known, so they are batched); it dies before starting them: they go back to the queue,
    # and their futures -- already RUNNING -- were started a second time, which raised in the
    # I/O thread and killed the pool
    with procpool.ProcessPoolExecutor(1) as ex:
        for f in [ex.submit(square, i) for i in range(200)]:
            f.result(20)
        crash = ex.submit(sleep_then_abort, 0.3)
        quick = [ex.submit(square, i) for i in range(50)]
        done, pending = concurrent.futures.wait([crash, *quick], timeout=30)
        assert not pending
        assert isinstance(crash.exception(), procpool.WorkerLostError)
        assert [f.result() for f in quick] == [i * i for i in range(50)]
        assert ex.submit(square, 3).result(20) == 9


def test_an_initializer_failure_is_a_broken_executor():
    from tasks import failing_initializer

    with procpool.ProcessPoolExecutor(1, initializer=failing_initializer) as ex:
        with pytest.raises(concurrent.futures.BrokenExecutor, match="initializer exploded"):
            ex.submit(square, 2).result(20)


# ProcessPoolExecutor.map left early cancels what it has not sent, as the stdlib cancels the
# futures of a map whose iterator is closed (its map submits them all at once; ours reads the
# input lazily). Each task records that it ran: far fewer than the 400 items may run.
def _map_400(ex, path, **kw):
    n = 400
    return ex.map(record, [path] * n, range(n), [0.01] * n, **kw)


def test_closing_an_executor_map_iterator_cancels_what_it_has_not_sent(tmp_path):
    path = str(tmp_path / "ran")
    with procpool.ProcessPoolExecutor(2) as ex:
        it = _map_400(ex, path)
        assert next(it) == 0
        it.close()
        assert ex.submit(square, 4).result(10) == 16
    assert count_lines(path) < 100


def test_dropping_an_executor_map_iterator_cancels_what_it_has_not_sent(tmp_path):
    path = str(tmp_path / "ran")
    with procpool.ProcessPoolExecutor(2) as ex:
        it = _map_400(ex, path)
        assert next(it) == 0
        del it
        gc.collect()
    assert count_lines(path) < 100


def test_an_executor_map_item_error_cancels_the_rest(tmp_path):
    path = str(tmp_path / "ran")
    n = 400
    with procpool.ProcessPoolExecutor(2) as ex:
        got = []
        with pytest.raises(ValueError, match="bad item 3"):
            for x in ex.map(record, [path] * n, range(n), [0.01] * n, [3] * n):
                got.append(x)
        assert got == [0, 1, 2]
    assert count_lines(path) < 100


def test_shutdown_cancel_futures_cancels_a_running_executor_map(tmp_path):
    path = str(tmp_path / "ran")
    ex = procpool.ProcessPoolExecutor(2)
    it = _map_400(ex, path)
    assert next(it) == 0
    ex.shutdown(wait=True, cancel_futures=True)
    got = []
    with pytest.raises(concurrent.futures.CancelledError):
        for x in it:
            got.append(x)
    assert got == list(range(1, len(got) + 1))  # what was sent, in order, then the error
    assert count_lines(path) < 100


def test_a_cancelled_map_does_not_send_again_what_a_dead_worker_gives_back(tmp_path):
    # after the cancel, a retry (or a chunk handed back by a dead worker) must not run
    path, marker = str(tmp_path / "ran"), str(tmp_path / "marker")
    n = 50
    with procpool.ProcessPoolExecutor(1, retries=1) as ex:
        it = ex.map(record_die_once, [path] * n, [marker] * n, range(n), [1.0] * n)
        assert next(it) == 0
        deadline = time.monotonic() + 20
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.02)  # item 1 runs; its worker dies in 1 s
        it.close()
        assert ex.submit(sleep_then, 1.5, "after").result(20) == "after"
    ran = recorded(path)
    assert ran.count(1) == 1 and max(ran) <= 3, ran  # item 1 once; nothing sent after


@pytest.mark.parametrize("ending", ["shutdown(wait=False)", "no shutdown", "dropped"])
def test_work_submitted_to_an_executor_runs_even_when_the_program_ends(tmp_path, ending):
    # concurrent.futures: "the entire Python program will not exit until all pending futures
    # are done executing"; procpool's executor terminated its pool at exit (nothing ran)
    import textwrap

    code = textwrap.dedent(
        f"""
        import gc, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import procpool
        from tasks import nap_then_record
        ex = procpool.ProcessPoolExecutor(2)
        for i in range(4):
            ex.submit(nap_then_record, {str(tmp_path / "ran")!r}, i, 0.3)
        ending = {ending!r}
        if ending == "shutdown(wait=False)":
            ex.shutdown(wait=False)
        elif ending == "dropped":
            del ex
            gc.collect()
        """
    )
    out = run_python(code, 60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(recorded(str(tmp_path / "ran"))) == [0, 1, 2, 3]


def test_executor_map_checks_its_chunksize_as_the_standard_one():
    with procpool.ProcessPoolExecutor(1) as ex:
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            ex.map(square, [1], chunksize=0)
        with pytest.raises(TypeError):
            ex.map(square, [1], chunksize=None)
        # a chunksize that is no int: its own error (it said "cannot schedule new futures
        # after shutdown", the executor running on)
        with pytest.raises(ValueError, match="1.5"):
            ex.map(square, [1], chunksize=1.5)
        assert list(ex.map(square, [1, 2])) == [1, 4]


def test_a_forked_child_exits_while_the_program_has_a_busy_executor():
    # The exit hook that waits for executors ran in forked children too (a Process runs
    # threading._shutdown): it closed the child's copy of the parent's executor, whose lock
    # the I/O thread may have held at the fork -- and the child hung at exit for good.
    import textwrap

    code = textwrap.dedent(
        """
        import multiprocessing, time
        import procpool
        def spin(x):
            return sum(range(x))
        if __name__ == "__main__":
            ex = procpool.ProcessPoolExecutor(2)
            ctx = multiprocessing.get_context("fork")
            for i in range(40):
                fs = [ex.submit(spin, 1000) for _ in range(200)]
                p = ctx.Process(target=time.sleep, args=(0,))
                p.start()
                p.join(20)
                assert p.exitcode == 0, (i, p.exitcode)
                for f in fs:
                    f.result()
            ex.shutdown()
            print("ok")
        """
    )
    out = run_python(code, 120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def _wait_for(event):
    return event.wait(60)


def test_work_waits_in_the_pool_not_behind_a_worker_whose_task_runs_long():
    # After thousands of tiny tasks the pool estimated each at a few microseconds, and sent a
    # busy worker thousands more ahead: behind a long task they waited for it (while the other
    # worker was free), counted as running, and could not be cancelled (review: 1,526 of 3,000
    # "running", cancel() False for all, shutdown(cancel_futures=True) ran them all)
    wait = concurrent.futures.wait
    release = procpool.Event()
    with procpool.ProcessPoolExecutor(2) as ex:
        try:
            wait([ex.submit(abs, i) for i in range(3000)])
            long = ex.submit(_wait_for, release)
            time.sleep(0.1)  # (running now, silent past the estimate)
            small = [ex.submit(abs, -i) for i in range(3000)]
            done, not_done = wait(small, timeout=30)
            assert not not_done and not long.done()  # all ran on the free worker
            blocked = ex.submit(_wait_for, release)  # now both workers are busy
            time.sleep(0.1)
            queued = [ex.submit(abs, i) for i in range(500)]
            time.sleep(0.1)
            assert not any(f.running() for f in queued)
            assert all(f.cancel() for f in queued[:250])
        finally:
            release.set()
        assert long.result(30) and blocked.result(30)
        assert [f.result(30) for f in queued[250:]] == list(range(250, 500))


def _append_line(path, x):
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


def test_executor_map_reads_its_inputs_in_the_calling_thread_and_runs_every_item(tmp_path):
    # it read them in a feeder thread (a cursor bound to the caller's thread failed there, and
    # an input's exception came out of the result iterator, lost if nobody iterated), and
    # stopped running items once 65,536 results were unread (review)
    readers = set()

    def items():
        for i in range(3):
            readers.add(threading.current_thread().name)
            yield i

    def broken():
        yield 1
        raise KeyError("input broke")

    path = tmp_path / "ran"
    with procpool.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(abs, items())) == [0, 1, 2]
        assert readers == {threading.current_thread().name}
        with pytest.raises(KeyError, match="input broke"):
            ex.map(abs, broken())
        ex.map(_append_line, [path] * 70_000, range(70_000), chunksize=1000)  # never read
    assert len(path.read_text().splitlines()) == 70_000
