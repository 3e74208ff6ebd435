"""Edge cases found in review, each once a hang or a wrong error; now regression tests."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
from conftest import wait_until
from tasks import sleep_then, square

import procpool


def length(x):
    return len(x)


def total(arrays):
    return sum(int(a.size) for a in arrays)


def flaky_with_array(marker, array):
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError("transient")
    return int(array.sum())


def slow_item(x):
    time.sleep(0.3)
    return x


@pytest.fixture(scope="module")
def pool():
    with procpool.Pool(2) as p:
        yield p


def test_arguments_larger_than_the_socket_buffer_are_sent_whole(pool):
    # str and bytes travel in-band (pickle hands only buffer objects such as numpy arrays and
    # bytearray to the out-of-band path): the outbox must keep writing as the worker reads
    assert pool.apply_async(length, ("x" * 3_000_000,)).get(20) == 3_000_000
    assert pool.map(length, ["y" * 200_000] * 30) == [200_000] * 30


def test_retry_on_keeps_the_out_of_band_buffers_of_the_task(tmp_path):
    array = np.ones(100_000)  # 800 KB: travels as a memfd
    with procpool.Pool(1, retries=2, retry_on=(ConnectionError,)) as pool:
        r = pool.apply_async(flaky_with_array, (str(tmp_path / "m"), array))
        assert r.get(20) == 100_000
        assert pool.apply(square, (3,)) == 9


def ones_arrays(n):
    return [np.ones(40_000) for _ in range(n)]


def test_more_large_buffers_than_one_frame_carries_travel_in_band(pool):
    # one frame carries at most 250 fds: the buffers beyond travel inside the pickle (this
    # was a SerializationError, where multiprocessing passes them)
    arrays = [np.ones(40_000) for _ in range(300)]  # 320 KB each: out of band, one fd each
    assert pool.apply_async(total, (arrays,)).get(30) == 12_000_000
    back = pool.apply(ones_arrays, (300,))
    assert len(back) == 300 and all(a.sum() == 40_000 for a in back)
    assert pool.apply(total, (arrays[:10],)) == 400_000


def test_close_and_join_finish_an_imap_the_caller_stopped_reading():
    pool = procpool.Pool(2)
    for _ in pool.imap(abs, range(200_000)):
        break
    pool.close()
    pool.join(30)
    assert not pool._sched._thread.is_alive(), "join() did not return"


def test_get_timeout_is_a_deadline(pool):
    r = pool.apply_async(sleep_then, (5, None))
    started = time.monotonic()
    with pytest.raises(procpool.TimeoutError):
        r.get(timeout=0.5)
    assert time.monotonic() - started < 1.4


def test_imap_next_timeout_is_a_deadline(pool):
    it = pool.imap(sleep_then, [0.1] * 30 + [5.0], chunksize=1)
    started = time.monotonic()
    with pytest.raises(procpool.TimeoutError):
        for _ in range(31):
            it.next(timeout=max(0.01, 1.0 - (time.monotonic() - started)))
    assert time.monotonic() - started < 3


def test_a_chunks_time_limit_applies_to_each_item():
    with procpool.Pool(1) as pool:
        r = pool.map_async(slow_item, range(8), chunksize=8, timeout=1)
        assert r.get(30) == list(range(8))


def test_an_unpicklable_function_is_named(pool):
    import threading

    lock = threading.Lock()

    def uses_a_lock(x):
        with lock:
            return x

    with pytest.raises(procpool.SerializationError, match="function"):
        pool.apply_async(uses_a_lock, (1,)).get(10)


def test_breaking_out_of_an_imap_loop_gives_back_the_rest(pool):
    it = pool.imap(identity_item, range(300), chunksize=100)
    for x in it:
        if x == 5:
            break
    assert next(it) == 6
    assert list(it) == list(range(7, 300))


def test_several_threads_can_share_one_imap_iterator(pool):
    import threading

    it = pool.imap(identity_item, range(5000), chunksize=7)
    got: list[int] = []
    errors: list[BaseException] = []

    def consume():
        try:
            for x in iter(it.next, None):
                got.append(x)
        except StopIteration:
            pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(got) == list(range(5000))


def test_a_closed_imap_loop_yields_nothing_more_and_loses_nothing(pool):
    # the loop is a chain over list iterators: close() gave the rest of the chunk back while
    # the chain went on yielding it -- items 2-9 came out twice
    it = pool.imap(identity_item, list(range(20)), chunksize=10)
    loop = iter(it)
    assert [next(loop), next(loop)] == [0, 1]
    loop.close()
    assert list(loop) == []
    assert list(it) == list(range(2, 20))
    # closed from another thread while the loop's own thread is in its body
    it = pool.imap(identity_item, list(range(20)), chunksize=10)
    loop = iter(it)
    got = []
    paused, closed = threading.Event(), threading.Event()

    def consume():
        for x in loop:
            got.append(x)
            if x == 2:
                paused.set()
                closed.wait(10)

    t = threading.Thread(target=consume)
    t.start()
    assert paused.wait(10)
    loop.close()
    closed.set()
    t.join(10)
    assert got == [0, 1, 2]
    assert list(it) == list(range(3, 20))


def slow_identity(x):
    time.sleep(0.02)
    return x


def test_threads_sharing_one_imap_loop_object_take_every_result_once(pool):
    # a second thread's next() on the loop found its generator "already executing": a chain
    # whose source raises drops it, and the first thread's loop ended early, results untaken
    it = pool.imap(slow_identity, range(40), chunksize=4)
    loop = iter(it)
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def consume(mine):
        try:
            for x in loop:
                mine.append(x)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(g,)) for g in got]
    threads[0].start()
    time.sleep(0.02)
    threads[1].start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(got[0] + got[1]) == list(range(40))
    assert list(it) == []


def fail_on_seven(x):
    time.sleep(0.001)
    if x == 7:
        raise ValueError("seven")
    return x


def test_an_item_error_ends_only_the_loop_of_the_thread_that_takes_it(pool):
    # the error is that thread's next item; a thread sharing the loop object goes on (it
    # ended early, 190-odd results untaken, when the error came out of the chain's source)
    it = pool.imap(fail_on_seven, range(200), chunksize=1)
    loop = iter(it)
    got: dict[str, tuple[str, list[int]]] = {}

    def consume(name):
        mine: list[int] = []
        try:
            for x in loop:
                mine.append(x)
            got[name] = ("ended", mine)
        except ValueError:
            got[name] = ("raised", mine)

    threads = [threading.Thread(target=consume, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(how for how, _ in got.values()) == ["ended", "raised"]
    assert sorted(got["a"][1] + got["b"][1]) == [x for x in range(200) if x != 7]
    assert list(it) == []


def sleepy_pid(_):
    time.sleep(0.02)
    return os.getpid()


def test_a_map_after_a_far_cheaper_one_still_spreads_over_the_workers():
    # the last chunks of a map are not cut below CHUNK_MIN of estimated work; the estimate
    # is the pool's, here a cheap map's (≈ 0.1 µs an item): 8 slow items made one chunk
    with procpool.Pool(2) as pool:
        pool.map(identity_item, range(200_000))
        assert len(set(pool.map(sleepy_pid, range(8)))) == 2


@pytest.mark.parametrize(
    "n, nworkers",
    [(100, 2), (5_000, 2), (100_000, 2), (5, 4), (9, 8), (17, 16), (13, 6)],
)
def test_the_last_chunks_of_a_map_are_not_cut_below_the_floor(n, nworkers):
    """Near the end chunks shrink so no worker idles, but not below CHUNK_MIN of work: the
    floor was a share of what was left, so each chunk halved the next one's, and a
    100,000-item map of x+1 ended in ten chunks of 152, 76 ... 1 items, a round trip each.
    An input a little longer than the pool is wide still gives every worker a chunk (the
    whole input's share rounded up made 9 items on 8 workers 2,2,2,2,1: found by a review)."""
    import threading

    from procpool._tasks import CHUNK_MIN, MapJob

    job = MapJob(threading.Lock(), 1, b"", 0, None, "map(f)", None, 0, None, None)
    job.buf, job.input_done = list(range(n)), True
    est = 1e-7  # x+1: 0.1 µs an item, a floor of 1,000 items
    sizes = []
    while job.available():
        items = job.take(job.chunk_size(est, nworkers), idle=True)
        job.next_index += len(items)
        sizes.append(len(items))
    assert sum(sizes) == n
    floor = min(int(CHUNK_MIN / est), n // nworkers)
    assert all(size >= floor for size in sizes[:-1]), sizes  # the last: what is left
    assert len(sizes) >= min(nworkers, n), sizes  # every worker still gets a chunk


def test_imap_input_that_waits_for_its_own_results(pool):
    import queue

    feedback: queue.Queue = queue.Queue()

    def source():
        yield 0
        for _ in range(3):
            yield feedback.get(timeout=20)

    it = pool.imap(identity_item, source())
    for expected in range(4):
        value = it.next(timeout=10)
        assert value == expected
        feedback.put(value + 1)


def test_a_fast_imap_input_that_then_waits_for_its_own_results_is_not_held_back(pool):
    # after thousands of quick items the pool gathers a generator's items into big chunks
    # (an idle worker waits for a fuller one, see Dispatch._hold_over); the items read before
    # the generator blocks on their results must still go out, or this would never end
    import queue

    feedback: queue.Queue = queue.Queue()

    def source():
        for round_ in range(3):
            yield from range(round_ * 10_000, round_ * 10_000 + 5_000)
            yield feedback.get(timeout=20)  # the result of the round's last item, plus 1

    it = pool.imap(identity_item, source())
    for round_ in range(3):
        for i in range(round_ * 10_000, round_ * 10_000 + 5_000):
            assert it.next(timeout=20) == i
        feedback.put(i + 1)
        assert it.next(timeout=20) == i + 1
    with pytest.raises(StopIteration):
        it.next(timeout=20)


def test_terminate_while_imap_reads_its_input_ends_the_iterator():
    def endless():
        n = 0
        while True:
            yield n
            n += 1

    pool = procpool.Pool(2)
    it = pool.imap(identity_item, endless())
    assert next(it) == 0
    pool.terminate()
    with pytest.raises(procpool.PoolTerminated):
        for _ in range(1_000_000):
            it.next(timeout=10)


def test_schedule_rejects_a_bad_timeout_as_such(pool):
    with pytest.raises(ValueError, match="timeout"):
        pool.schedule(square, (1,), timeout=-1)


def identity_item(x):
    return x


def test_map_over_a_range_is_cut_into_ranges_with_the_same_results(pool):
    """A range is not listed: its chunks travel as ranges (a few bytes each)."""
    from tasks import fail_on

    for chunksize in (None, 1, 7, 1000):
        assert pool.map(square, range(3, 2000, 3), chunksize) == [x * x for x in range(3, 2000, 3)]
    assert pool.map(square, range(0)) == []
    assert pool.map(square, range(10, 0, -2)) == [100, 64, 36, 16, 4]
    res = pool.map_async(fail_on, range(10), chunksize=4)
    with pytest.raises(ValueError, match="bad item 3"):
        res.get(30)
    with pytest.raises(TypeError):
        pool.starmap(square, range(3))  # starmap of ints: each item fails to unpack


def test_imap_over_a_range_reads_a_window_of_it():
    """imap over a range moves a window over it: ranges travel, the bound on held items holds
    (an endless-looking range is fine), and every result comes back in order."""
    with procpool.Pool(2) as pool:
        from procpool._scheduler import IMAP_HELD

        assert list(pool.imap(square, range(5000))) == [x * x for x in range(5000)]
        assert sorted(pool.imap_unordered(square, range(0, 3000, 7))) == sorted(
            x * x for x in range(0, 3000, 7)
        )
        it = pool.imap(square, range(10**12), chunksize=64)
        assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
        time.sleep(0.5)  # the workers run ahead only as far as the bound allows
        waiting = sum(len(values) for values, _ in it._chunks.values()) + len(it._values)
        assert waiting <= 2 * IMAP_HELD
        for i, value in enumerate(it, start=10):  # breaking out leaves the rest unread
            assert value == i * i
            if i == 100_000:
                break
        from tasks import fail_on

        it2 = pool.imap(fail_on, range(6))
        assert [next(it2) for _ in range(3)] == [0, 10, 20]
        with pytest.raises(ValueError, match="bad item 3"):
            next(it2)
        assert list(it2) == [40, 50]


def test_an_open_file_as_an_argument_is_refused_not_copied(pool, tmp_path):
    # cloudpickle (the fallback for what plain pickle refuses) would send a text file as a
    # StringIO snapshot, which the task then writes in vain; multiprocessing refuses it too
    path = tmp_path / "f.txt"
    with open(path, "w") as f:
        r = pool.apply_async(length, (f,))
        with pytest.raises(procpool.SerializationError, match="open file"):
            r.get(10)
    assert pool.apply(length, (str(path),)) == len(str(path))


def test_next_inside_a_for_loop_over_the_same_imap_iterator_is_refused_and_loses_nothing():
    # the loop holds a chunk of results: next() in its body skipped past the rest of it, and
    # lost it when the loop then stopped (items 1-9 here); now a clear error, nothing lost
    with procpool.Pool(2) as pool:
        it = pool.imap(abs, range(100), chunksize=10)
        got = []
        with pytest.raises(RuntimeError, match="inside a for loop"):
            for x in it:
                got.append(x)
                got.append(next(it))
        assert got == [0]
        assert list(it) == list(range(1, 100))
        it = pool.imap(abs, range(30), chunksize=10)
        with pytest.raises(RuntimeError, match="another loop"):
            for _ in it:
                for _ in it:
                    pass
        assert list(it) == list(range(1, 30))  # refused before the inner loop took anything
        it = pool.imap(abs, range(5), chunksize=5)  # one chunk: nothing to wait for
        with pytest.raises(RuntimeError):
            list(zip(it, it, strict=False))  # (multiprocessing pairs them up)
        assert list(it) == [1, 2, 3, 4]
        it = pool.imap(abs, range(30), chunksize=10)
        loop = iter(it)
        assert next(loop) == 0
        closer = threading.Thread(target=loop.close)  # a loop closed in another thread
        closer.start()
        closer.join(10)
        assert next(it) == 1 and list(it) == list(range(2, 30))
        it = pool.imap(abs, range(30), chunksize=10)
        assert [next(it), next(it)] == [0, 1]
        for x in it:  # next() before or after a loop is fine
            if x == 5:
                break
        assert next(it) == 6 and list(it) == list(range(7, 30))


def test_a_loop_left_early_while_another_thread_advanced_the_iterator_loses_nothing():
    # the loop holds a chunk (0-9); another thread's next() moves on to the next chunk; the
    # loop then stops: the 8 items it had not yielded are given back first (they were lost)
    with procpool.Pool(2) as pool:
        it = pool.imap(abs, range(100), chunksize=10)
        got = []
        for x in it:
            got.append(x)
            other = threading.Thread(target=lambda: got.append(next(it)))
            other.start()
            other.join(10)
            break
        assert got == [0, 10]
        assert list(it) == list(range(1, 10)) + list(range(11, 100))


def test_threads_waiting_on_a_shared_imap_are_woken_by_a_loop_giving_back_or_finishing():
    # a for loop holds a chunk; another thread's next() waits: the loop's break gives the rest
    # back, and the last result taken ends the iteration -- both must wake the waiter
    with procpool.Pool(2) as pool:
        for stop_early in (True, False):
            it = pool.imap(abs, range(100), chunksize=100)  # one chunk: B can only wait
            holding, release = threading.Event(), threading.Event()
            got_a: list[int] = []
            got_b: list[int] = []

            def loop_a(it=it, got_a=got_a, holding=holding, release=release, stop=stop_early):
                for x in it:
                    got_a.append(x)
                    holding.set()
                    release.wait(10)
                    if stop:
                        break

            def consumer_b(it=it, got_b=got_b):
                for x in iter(it.next, None):
                    got_b.append(x)

            a = threading.Thread(target=loop_a)
            a.start()
            assert holding.wait(10)
            b = threading.Thread(target=consumer_b)  # (iter() ends at StopIteration)
            b.start()
            time.sleep(0.2)  # B waits: A holds the only chunk
            release.set()
            a.join(10)
            b.join(10)
            assert not b.is_alive(), "the waiting thread was never woken"
            assert sorted(got_a + got_b) == list(range(100))


def test_results_given_back_by_loops_of_two_threads_stay_in_order():
    with procpool.Pool(2) as pool:
        it = pool.imap(abs, range(200), chunksize=100)
        assert it.next(timeout=10) == 0
        took: list[int] = []

        def loop(took_one, close):  # takes one result (and holds its chunk), then stops
            loop = iter(it)
            took.append(next(loop))
            took_one.set()
            close.wait(10)
            loop.close()

        events = [(threading.Event(), threading.Event()) for _ in range(2)]
        threads = [threading.Thread(target=loop, args=e) for e in events]
        for t, (took_one, _) in zip(threads, events, strict=True):
            t.start()  # the first takes 1 (of 1-99), the second 100 (of 100-199)
            assert took_one.wait(10)
        assert took == [1, 100]
        for t, (_, close) in zip(threads, events, strict=True):
            close.set()  # the earlier chunk is given back first, then the later one
            t.join(10)
        assert list(it) == list(range(2, 100)) + list(range(101, 200))


def test_terminate_while_the_imap_input_is_blocked_ends_the_iterator():
    # the input's end was set only by the feeder thread, blocked in the generator: next()
    # waited for good after terminate()
    import queue

    gate: queue.Queue = queue.Queue()

    def source():
        yield 1
        yield 2
        yield gate.get(timeout=30)  # input from a peer that never comes

    pool = procpool.Pool(2)
    try:
        it = pool.imap(identity_item, source(), chunksize=1)
        assert it.next(timeout=10) == 1
        pool.terminate()
        with pytest.raises(procpool.PoolTerminated):
            for _ in range(3):
                it.next(timeout=10)
    finally:
        gate.put(3)  # the feeder thread goes, and drops what it read


def test_a_call_cancelled_then_terminated_from_a_callback_is_settled_once():
    # a result cancelled while still in the inbox was failed again by terminate(): its
    # error_callback ran twice and get() changed its answer to PoolTerminated
    from tasks import flush_late_then

    calls: list[str] = []
    box: dict = {}
    pool = procpool.Pool(1)

    def on_first(_value):  # in the pool's I/O thread
        pool.apply_async(flush_late_then, (0.3,))
        r = pool.apply_async(
            flush_late_then, (0,), timeout=5, error_callback=lambda e: calls.append(type(e))
        )
        box["r"], box["cancelled"] = r, r.cancel()
        pool.terminate()

    pool.apply(flush_late_then, (0,))
    pool.apply_async(flush_late_then, (0,), callback=on_first)
    assert wait_until(lambda: "r" in box, 10)
    pool.join(10)
    assert box["cancelled"] is True
    with pytest.raises(CancelledError):
        box["r"].get(5)
    assert calls == [CancelledError]


def test_an_imap_whose_run_is_cut_short_by_a_wake_up_request_reads_its_input_to_the_end(
    pool, monkeypatch
):
    # the feeder chose a run of k items; the dispatcher asked for a wake-up at the next item
    # before the run began, which then read 1 item -- taken for "exhausted": the imap ended
    # early, silently (65 results of 20,000).  The pause stands for a GIL switch there
    from procpool import _scheduler
    from procpool._tasks import NEVER

    original = _scheduler.Scheduler._stage_run
    paused: list[float] = []

    def stage_run_after_a_switch(self, job, it, k):
        if job.wake_at == NEVER and len(paused) < 20:
            deadline = time.monotonic() + 0.05
            while job.wake_at == NEVER and time.monotonic() < deadline:
                time.sleep(0.0005)
            paused.append(job.wake_at)
        return original(self, job, it, k)

    monkeypatch.setattr(_scheduler.Scheduler, "_stage_run", stage_run_after_a_switch)

    def numbers():
        yield from range(20_000)

    assert list(pool.imap(identity_item, numbers())) == list(range(20_000))
    assert any(w != NEVER for w in paused)  # (the race was made to happen)
