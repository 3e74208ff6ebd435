"""Large task arguments travel in reused shared-memory segments (``procpool._buffers``).

Reuse must never show a task someone else's bytes: a segment is rewritten only when the task
that held it is done *and* every worker that mapped it has said RELEASED (or died).  These
tests run real pools and check the bytes each task sees, the segments the parent keeps, and
that nothing is left when the pool ends.
"""

from __future__ import annotations

import array
import os
import signal
import time

import numpy as np
import pytest
from conftest import importing_tests, run_python, wait_until

import procpool
from procpool import _buffers, _mapping, _serialize

pytestmark = pytest.mark.timeout(60)

N = 64 * 1024  # float64 items: 512 KiB, above the out-of-band threshold
_kept: list = []


def first_last(a):
    return float(a[0]), float(a[-1]), a.nbytes


def keep(a):
    """Keep the argument alive in the worker (the segment must stay busy)."""
    _kept.append(a)
    return float(a[0])


def kept_values(_=None):
    return [float(a[0]) for a in _kept] + [float(a[-1]) for a in _kept]


def drop_kept(_=None):
    _kept.clear()
    return os.getpid()


def die_once(marker, a):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return float(a[0]), float(a[-1])


def segments(pool):
    return pool._sched._buffers._segments


def arrays(count, offset=0):
    return [np.full(N, float(i + offset)) for i in range(count)]


def test_reused_segments_carry_each_tasks_own_bytes():
    with procpool.Pool(2) as pool:
        for round_ in range(6):
            data = arrays(6, offset=10 * round_)
            want = [(float(a[0]), float(a[0]), a.nbytes) for a in data]
            assert pool.map(first_last, data, chunksize=1) == want
            for a in data[:3]:
                assert pool.apply(first_last, (a,)) == (float(a[0]), float(a[0]), a.nbytes)
        made = len(segments(pool))
        assert 0 < made <= 12, f"{made} segments for 6 arrays at a time: they are not reused"


def test_an_argument_a_task_keeps_is_never_overwritten():
    with procpool.Pool(1) as pool:
        assert pool.apply(keep, (np.full(N, 7.0),)) == 7.0
        for i in range(20):  # same size: would take the kept one's segment if it were free
            assert pool.apply(first_last, (np.full(N, float(i)),)) == (float(i), float(i), N * 8)
        assert pool.apply(kept_values) == [7.0, 7.0]
        pool.apply(drop_kept)
        busy = [s for s in segments(pool).values() if s.busy or s.holders]
        assert wait_until(lambda: not [s for s in busy if s.busy or s.holders], 5.0)


def test_a_dead_workers_holds_are_forgotten_and_a_retry_sees_the_same_bytes(tmp_path):
    marker = str(tmp_path / "died")
    with procpool.Pool(1) as pool:
        a = np.arange(N, dtype=np.float64)
        assert pool.apply_async(die_once, (marker, a), retries=1).get(30) == (0.0, N - 1.0)
        assert wait_until(lambda: all(not s.holders for s in segments(pool).values()), 5.0)
        b = np.full(N, 3.0)
        assert pool.apply(first_last, (b,)) == (3.0, 3.0, N * 8)


def test_forked_workers_do_not_inherit_the_parents_segments():
    with procpool.Pool(1) as pool:
        for i in range(4):
            pool.apply(first_last, (np.full(N, float(i)),))
        (old,) = pool.pids()
        os.kill(old, signal.SIGKILL)
        new = wait_until(lambda: [p for p in pool.pids() if p != old], 10.0)
        assert new, "the dead worker was not replaced"
        assert pool.apply(first_last, (np.full(N, 5.0),)) == (5.0, 5.0, N * 8)  # it serves
        with open(f"/proc/{new[0]}/maps") as f:
            inherited = [line for line in f if "procpool-arg" in line]
        assert inherited == []


def test_the_pool_gives_segments_back_when_idle_and_when_it_ends():
    pool = procpool.Pool(2)
    try:
        pool.map(first_last, arrays(4), chunksize=1)
        pool._sched._buffers.trim(older_than=0.0)  # what the I/O thread's timer runs
        assert wait_until(lambda: not segments(pool), 5.0)
        pool.map(first_last, arrays(4), chunksize=1)
        assert segments(pool)
    finally:
        pool.close()
        pool.join(15)
    assert not segments(pool)
    with open("/proc/self/maps") as f:
        assert not [line for line in f if "procpool-arg" in line]


def test_the_cache_is_bounded():
    cache = _buffers.BufferCache(limit=3 * N * 8)
    data = [memoryview(np.full(N, float(i))).cast("B") for i in range(6)]
    taken = [cache.take(raw) for raw in data]
    assert all(seg is not None for seg in taken)
    for seg in taken:
        assert seg is not None
        cache.unlend(seg)
    assert cache.free_bytes == 3 * N * 8
    assert len(cache._segments) == 3
    cache.close()
    assert cache.take(data[0]) is None  # closed: the caller falls back to a fresh memfd


def _memfds(*names):
    """This process's memfds of these names: the descriptors it holds, and its mappings."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if any(f"memfd:{name}" in target for name in names):
            fds.append(target)
    with open("/proc/self/maps") as f:
        maps = [line for line in f if any(name in line for name in names)]
    return fds, maps


def worker_memfds(_=None):
    """The procpool memfds this worker holds (descriptors) and maps."""
    return _memfds("procpool-arg", "procpool-buffer")


def test_workers_started_later_inherit_no_argument_memory():
    """Workers replaced while large arguments exist (maxtasksperchild=1: all the time) keep no
    descriptor or mapping of the parent's segments or buffers (they would pin that memory)."""
    with procpool.Pool(2, maxtasksperchild=1) as pool:
        for round_ in range(5):
            data = arrays(6, offset=10 * round_)
            assert pool.map(first_last, data, chunksize=1)[0][0] == 10.0 * round_
        assert pool.apply(worker_memfds) == ([], [])


def test_a_ctrl_c_as_apply_unpickles_its_reply_leaves_no_segment_lent():
    # apply unpickles its own reply (Scheduler.reply_value, no delivery): the arguments'
    # segment must be free by then, or a Ctrl-C there kept it lent for good
    import sys

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "reply_value" and armed:
            armed.clear()
            raise KeyboardInterrupt
        return None

    with procpool.Pool(1) as pool:
        a = np.full(N, 2.0)
        for _ in range(3):
            assert pool.apply(keep, (a,)) == 2.0  # kept: no RELEASED frame comes with the reply
        interrupted = 0
        try:
            for _ in range(5):
                armed = [True]
                sys.settrace(tracer)  # (unset by the exception it raises)
                try:
                    pool.apply(keep, (a,))
                except KeyboardInterrupt:
                    interrupted += 1
        finally:
            sys.settrace(None)
        assert interrupted == 5
        assert pool.apply(first_last, (np.full(N, 1.0),)) == (1.0, 1.0, N * 8)
        assert wait_until(lambda: not [s for s in segments(pool).values() if s.busy], 5.0)


BIG = bytes(range(256)) * 4096  # 1 MiB: above the out-of-band threshold


class Holder:
    """An object whose attribute is a large buffer also passed beside it."""

    def __init__(self, value):
        self.value = value


def same(x):
    return x


def described(*args):
    """What a task got: each argument's type, length and whether it is the first one."""
    return [(type(a).__name__, len(a), a is args[0]) for a in args]


def shares(a, holder):
    """Whether *holder* holds the very object *a*, and a change to *a* shows there."""
    a[0] = 255
    return holder.value is a, holder.value[0]


def made(kind):
    """A large bytes-like result of each kind, made in the worker."""
    if kind == "bytes":
        return BIG
    if kind == "bytearray":
        return bytearray(BIG)
    if kind == "pair":
        return ("key", BIG)
    return memoryview(array.array("d", range(len(BIG) // 8)))


def _round_trip(obj):
    """*obj* through dumps and loads, and the payload's stream length and buffer count."""
    payload = _serialize.dumps(obj)
    fds = [os.dup(fd) for fd in payload.fds]
    payload.close()
    return _serialize.loads(payload.data, payload.nbuf, fds), len(payload.data), payload.nbuf


def test_large_bytes_bytearrays_and_memoryviews_go_out_of_band():
    # pickle copies these three into its stream whatever their size (its C code saves them
    # before any reducer): procpool sends them through shared memory, as arrays
    doubles_array = array.array("d", range(len(BIG) // 8))  # (reduces to a bytes copy)
    for obj in (BIG, bytearray(BIG), ((BIG,), {}), {"k": [1, BIG]}, [[0] * 16, BIG], doubles_array):
        back, size, nbuf = _round_trip(obj)
        assert nbuf == 1 and size < 1000, type(obj)
        assert type(back) is type(obj) and back == obj
    # a memoryview arrives as bytes, as cloudpickle sends one (plain pickle refuses them)
    doubles = memoryview(array.array("d", range(len(BIG) // 8)))
    for view in (doubles, memoryview(BIG), memoryview(np.zeros(3, np.float16)), doubles[::2]):
        back, _, _ = _round_trip((view, BIG))
        assert type(back[0]) is bytes and back[0] == view.tobytes()
    assert _round_trip((doubles,))[2] == 1
    # a level further down (a chunk of (key, data) items): found once the stream is large
    back, _, nbuf = _round_trip([(i, BIG) for i in range(10)])
    assert nbuf == 1 and back == [(i, BIG) for i in range(10)]
    assert _round_trip([[0] * 100 + [BIG]])[2] == 1  # (not the first item of its list)
    # small ones stay in the stream, and large ones deeper than three levels too
    assert _round_trip((b"x" * 1000,))[2] == 0
    assert _round_trip([[[[BIG]]]])[2] == 0  # (four levels down)


def test_sending_buffers_out_of_band_keeps_what_pickle_keeps():
    # identity, sharing and cycles: an object named twice is sent once and arrives as one,
    # wherever the second mention is
    (first, second), _, nbuf = _round_trip((BIG, BIG))
    assert nbuf == 1 and first is second
    shared = [bytearray(BIG)]
    (a, b), _, _ = _round_trip((shared, shared))
    assert a is b
    cyclic = {"data": BIG}
    cyclic["self"] = cyclic
    back, _, nbuf = _round_trip(cyclic)
    assert nbuf == 1 and back["self"] is back
    ba = bytearray(BIG)
    (x, many), _, nbuf = _round_trip((ba, [ba] * 40))
    assert nbuf == 1 and all(m is x for m in many)
    (y, holder), _, nbuf = _round_trip((ba, Holder(ba)))
    assert nbuf == 1 and holder.value is y


def test_bytes_like_arguments_and_results_cross_a_pool_intact(leak_check):
    with procpool.Pool(1) as pool:
        for obj in (BIG, bytearray(BIG)):
            back = pool.apply(same, (obj,))
            assert type(back) is type(obj) and back == obj
            assert pool.apply_async(same, (obj,)).get(30) == obj
        assert segments(pool), "the arguments did not travel through shared memory"
        assert pool.apply(described, (BIG, BIG, bytearray(BIG))) == [
            ("bytes", len(BIG), True),
            ("bytes", len(BIG), True),
            ("bytearray", len(BIG), False),
        ]
        ba = bytearray(BIG)
        assert pool.apply(shares, (ba, Holder(ba))) == (True, 255)
        assert ba[0] == 0  # (the task's copy changed, not the caller's)
        assert pool.map(len, [BIG, bytearray(BIG)] * 3) == [len(BIG)] * 6
        got = pool.map(made, ["bytes", "bytearray", "pair", "view"], chunksize=1)
        assert [type(g) for g in got] == [bytes, bytearray, tuple, bytes]
        assert got[0] == BIG and got[1] == BIG and got[2] == ("key", BIG)
        assert got[3] == array.array("d", range(len(BIG) // 8)).tobytes()
        del got


def test_a_parent_out_of_descriptors_fails_only_the_task_it_cannot_send():
    """The pool duplicates a large argument's descriptor when it sends the task; out of
    descriptors then, that task fails saying so and the pool goes on (before: the pool's I/O
    thread died, and with it every task and the pool).  Also when the task is apply's on an
    idle pool (sent from the caller's thread, which claims the worker), and when it was its
    worker's last before retiring (maxtasksperchild): the worker is not left claimed or
    retiring with nothing to run (a review found both hanging the next task)."""
    code = """if True:
        import os, resource, time
        import numpy as np
        import procpool
        from conftest import use_up_descriptors, wait_until
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        def settled(pool):  # one worker ready (not the one retiring), the segment free again
            sched = pool._sched
            with sched._lock:
                workers = list(sched._workers.values())
                free = not any(s.busy or s.holders for s in sched._buffers._segments.values())
            return free and len(workers) == 1 and workers[0].ready and not workers[0].retiring

        def unsent(call):
            held = use_up_descriptors()
            try:
                call()
            except procpool.SerializationError as exc:
                assert "could not be sent" in str(exc), exc
            else:
                raise AssertionError("it was sent")
            finally:
                for fd in held:
                    os.close(fd)

        arg = np.ones(1 << 16)
        with procpool.Pool(1) as pool:
            busy = pool.apply_async(time.sleep, (1.0,), timeout=60)  # runs alone: the next waits
            big = pool.apply_async(np.sum, (arg,))
            unsent(lambda: (busy.get(30), big.get(30)))
            assert pool.apply(np.sum, (arg,)) == 1 << 16
            unsent(lambda: pool.apply(np.sum, (arg,)))  # idle: apply's own path
            assert pool.apply_async(int, (7,)).get(20) == 7
        for maxtasks in (1, 2):
            with procpool.Pool(1, maxtasksperchild=maxtasks) as pool:
                assert pool.apply(np.sum, (arg,)) == 1 << 16
                assert wait_until(lambda: settled(pool), 10)  # (maxtasks=1: a new worker)
                unsent(lambda: pool.apply_async(np.sum, (arg,)).get(20))
                assert pool.apply_async(int, (7,)).get(20) == 7
        print("ok")
    """
    done = run_python(importing_tests(code), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok"]


def first_byte_or_hang(b):
    if b[0] == 5:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # (the hard limit kills it)
        time.sleep(30)
    return b[0]


def test_a_chunk_of_large_buffers_past_its_time_limit_fails_only_its_item():
    # the chunk's other items are sent again: its large buffers are read back from their
    # memfds (before the review: a chunk with any descriptor failed whole)
    items = [bytes([i]) * (300 * 1024) for i in range(8)]
    with procpool.Pool(1, grace=0.2) as pool:
        got = []
        it = pool.imap(first_byte_or_hang, items, chunksize=4, timeout=0.3)
        while True:
            try:
                got.append(next(it))
            except StopIteration:
                break
            except procpool.TaskTimeoutError as exc:
                got.append(str(exc).split(" of ")[0])
        assert got == [0, 1, 2, 3, 4, "item 5", 6, 7]


def raise_with(size):
    raise ValueError(b"x" * size)


def test_an_exception_carrying_large_bytes_reaches_the_caller():
    # its pickle (bytes) went out of band, and the parent read error records as plain pickle:
    # the task never settled and its memfd leaked (a review found it)
    with procpool.Pool(1) as pool:
        for size in (1000, 300 * 1024):
            with pytest.raises(ValueError) as info:
                pool.apply(raise_with, (size,))
            assert info.value.args[0] == b"x" * size
            with pytest.raises(ValueError):
                pool.apply_async(raise_with, (size,)).get(30)


# ---------------------------------------------------------------- results: the worker's segments


def full(value, n=N):
    """A large result made in the worker: n float64 items, all *value*."""
    return np.full(n, float(value))


def result_segments(_=None):
    """This worker's result segments: how many descriptors it holds, and how many it maps."""
    fds, maps = _memfds("procpool-result")
    return len(fds), len(maps)


def intact(results):
    """Each result still holds the value it was made with (its index in *results*' keys)."""
    return all(bool((a == float(v)).all()) for v, a in results.items())


def test_results_the_caller_keeps_are_never_overwritten_and_dropped_ones_are_reused():
    kept = {}
    with procpool.Pool(1) as pool:
        for i in range(40):
            got = pool.apply(full, (i,)) if i % 2 else pool.apply_async(full, (i,)).get(30)
            if i % 5 == 0:
                kept[i] = got  # same size as the rest: its segment would be taken if free
            del got
            for j, a in enumerate(pool.map(full, [100 + i, 200 + i], chunksize=1)):
                assert (a == float((j + 1) * 100 + i)).all()
            assert intact(kept)
        fds, _ = pool.apply(result_segments)
        assert fds <= len(kept) + 4, f"{fds} result segments: dropped ones are not reused"
        assert fds > len(kept) - 1, "results kept alive are not in segments of the worker"
    assert intact(kept)  # (the pool is gone: the memory lives as long as the arrays do)


def test_a_fork_pins_the_results_the_parent_maps_then():
    # the forked child keeps its view of a result after the parent drops its own: the
    # worker must never write that segment again
    with procpool.Pool(1) as pool:
        a = pool.apply(full, (7,))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait for the parent's word, then check its copy
            try:
                os.close(w)
                os.read(r, 1)
                os._exit(0 if (a == 7.0).all() else 3)
            finally:
                os._exit(4)
        os.close(r)
        try:
            del a
            for i in range(10):  # each would reuse the segment, were it not pinned
                assert (pool.apply(full, (i,)) == float(i)).all()
        finally:
            os.write(w, b"x")
            os.close(w)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child saw a reused segment"


def test_results_outlive_their_worker():
    with procpool.Pool(1) as pool:
        a = pool.apply(full, (3,))
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: [p for p in pool.pids() if p != pid], 10.0)
        assert (a == 3.0).all()
        del a
        assert (pool.apply(full, (4,)) == 4.0).all()


def test_an_idle_worker_gives_its_free_result_segments_back(leak_check):
    with procpool.Pool(1) as pool:
        for i in range(3):
            assert (pool.apply(full, (i,)) == float(i)).all()
        assert pool.apply(result_segments)[0] > 0
        # dropped: RELEASED reaches the worker, which closes free segments unused for TRIM_AFTER
        time.sleep(_buffers.TRIM_AFTER + 0.5)
        assert pool.apply(result_segments) == (0, 0)


def test_a_result_dropped_unread_is_given_back_to_its_worker():
    # a result that comes for a cancelled task is closed unmapped: its worker is told all
    # the same (else the segment stayed lent for good)
    from procpool import _supervise

    class Lender:  # (as _buffers.Returns: told each segment's inode)
        def __init__(self):
            self.told = []

        def released(self, ino):
            self.told.append(ino)

    lender = Lender()
    fd = os.memfd_create("procpool-result")
    os.ftruncate(fd, 4096)
    ino = os.fstat(fd).st_ino
    _mapping.lenders[ino] = lender
    try:
        _supervise._drop_received(1, [fd])
    finally:
        _mapping.lenders.pop(ino, None)
    assert lender.told == [ino]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_the_result_cache_is_bounded_in_segments():
    cache = _buffers.BufferCache(max_segments=2, name="procpool-result")
    raw = memoryview(np.zeros(N)).cast("B")
    a, b = cache.take(raw), cache.take(raw)
    assert a is not None and b is not None
    cache.hold([a, b], 0)
    cache.unlend(a)
    cache.unlend(b)
    assert cache.take(raw) is None  # both lent to the receiver: the sender makes a fresh memfd
    cache.released(0, [a.ino])
    cache.released(0, [a.ino])  # (a second word for the same lending changes nothing)
    assert cache.free_bytes == raw.nbytes
    c = cache.take(memoryview(np.zeros(2 * N)).cast("B"))  # another size: the free one makes room
    assert c is not None and len(cache._segments) == 2
    cache.close()


def test_a_free_segment_is_cut_or_grown_to_a_buffer_of_another_size():
    # segments were reused only for a buffer of exactly their size: an array whose size
    # changed from call to call paid for fresh memfds every time (1.5 against 3.6 GB/s for
    # 32 MiB arguments changing by 4 KiB: benchmark review)
    cache = _buffers.BufferCache()

    def raw(items: int, fill: float) -> memoryview:
        return memoryview(np.full(items, fill)).cast("B")

    a = cache.take(raw(N, 1.0))
    cache.unlend(a)
    for items, fill in ((N + 512, 2.0), (N - 1024, 3.0), (N + N // 2, 4.0)):
        data = raw(items, fill)
        seg = cache.take(data)
        assert seg is a and seg.size == data.nbytes == os.fstat(seg.fd).st_size
        assert bytes(seg.view) == bytes(data)  # (its pages hold exactly the new buffer)
        cache.unlend(seg)
        assert cache.free_bytes == data.nbytes
    # not cut to far less than its size (freeing its pages costs what a fresh memfd does),
    # nor grown past twice its size: a new segment
    for items in (N, 4 * N):
        other = cache.take(raw(items, 5.0))
        assert other is not a
        cache.unlend(other)
    assert len(cache._segments) == 3
    cache.close()


def test_segments_are_not_cut_and_grown_back_when_sizes_alternate():
    # one segment cut and grown at each call served neither size at memcpy speed: a review
    # measured 1.3 GB/s for 16/32 MiB alternating, 3.8 with a segment of each size
    cache = _buffers.BufferCache()
    small, large = memoryview(np.ones(N)).cast("B"), memoryview(np.ones(N + N // 8)).cast("B")
    seen = []
    for data in (small, large, small, large, small, large, small, large):
        seg = cache.take(data)
        seen.append(seg)
        cache.unlend(seg)
    assert seen[0] is seen[1]  # (a new size: the free segment is grown to it)
    assert seen[2] is not seen[1]  # the old size again: sizes alternate, no more cutting
    assert seen[2:] == [seen[2], seen[3]] * 3 and seen[2] is not seen[3]
    assert [s.size for s in seen[2:4]] == [small.nbytes, large.nbytes]
    cache.close()


def test_sizes_that_jitter_keep_reusing_their_segment():
    # a size asked for again by chance stopped all cutting, cache-wide, for 256 takes: most
    # of 1,000 takes of 8 MiB +- 200 pages made fresh segments (a third review); sizes that
    # come back often are kept instead, a segment of each (exact sizes: memcpy speed)
    import random

    rng = random.Random(3)
    cache = _buffers.BufferCache()
    made = set()
    for _ in range(300):
        data = memoryview(np.ones(N + 64 * rng.randint(-200, 200))).cast("B")
        seg = cache.take(data)
        made.add(seg.ino)
        cache.unlend(seg)
    assert len(made) <= 32, len(made)  # (at most the free segments a cache keeps: no churn)
    cache.close()


def test_what_a_dead_worker_held_is_never_reused():
    # a process its task forked may still map it: the worker died before sending PINNED (a
    # helper process read the next task's bytes, or died of SIGBUS once the segment was cut
    # to another size: review)
    cache = _buffers.BufferCache()
    data = memoryview(np.ones(N)).cast("B")
    seg = cache.take(data)
    cache.hold([seg], 7)
    cache.unlend(seg)
    cache.forget_worker(7)
    assert seg.ino not in cache._segments and cache.free_bytes == 0  # closed, not free
    again = cache.take(data)
    assert again is not seg
    cache.unlend(again)
    cache.close()


def test_a_result_mapped_while_the_process_forks_is_pinned_too():
    # another thread maps a result after procpool's before-fork hook ran but before the fork
    # (a later hook -- logging's -- waits for its lock meanwhile): the child has the mapping,
    # so the worker must never rewrite it (a review found the child reading other results)
    code = """if True:
        import logging  # imported first: its before-fork hook runs after procpool's
        import os, threading, time
        import numpy as np
        import procpool
        from test_buffers import full
        pool = procpool.Pool(1)
        pool.apply(full, (0,))
        held = {}
        ready, forking = threading.Event(), threading.Event()
        def hold_logging_lock():
            logging._acquireLock(); ready.set(); time.sleep(0.5); logging._releaseLock()
        def get_result():
            forking.wait(); time.sleep(0.1)
            held["a"] = pool.apply(full, (7,))  # mapped while the main thread is in os.fork
        t1 = threading.Thread(target=hold_logging_lock); t1.start(); ready.wait()
        t2 = threading.Thread(target=get_result); t2.start()
        r, w = os.pipe()
        forking.set()
        pid = os.fork()
        if pid == 0:
            os.close(w); os.read(r, 1)
            a = held.get("a")
            os._exit(0 if a is not None and (a == 7.0).all() else 3)
        os.close(r); t1.join(); t2.join()
        assert (held.pop("a") == 7.0).all()
        for i in range(1, 6):  # each would rewrite the segment, were it not pinned
            assert (pool.apply(full, (100 + i,)) == 100 + i).all()
        os.write(w, b"x"); os.close(w)
        _, status = os.waitpid(pid, 0)
        pool.terminate()
        print(os.waitstatus_to_exitcode(status))
    """
    done = run_python(importing_tests(code), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0"], "the child saw its result rewritten"


def test_a_mapping_that_fails_half_way_is_reported_once(monkeypatch):
    # a Ctrl-C (here: injected) after map_fd registered its finalizer: the except and the
    # finalizer both said RELEASED, and the second one freed a segment lent again since
    calls = []
    real = _mapping.weakref.finalize

    def finalize_then_interrupt(*args):
        real(*args)
        raise KeyboardInterrupt

    fd = os.memfd_create("procpool-test")
    try:
        os.ftruncate(fd, 1 << 20)
        monkeypatch.setattr(_mapping.weakref, "finalize", finalize_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            _mapping.map_fd(fd, 1 << 20, on_unmap=lambda: calls.append(1))
        monkeypatch.undo()
        assert calls == [1]  # at once: nothing maps it any more
        import gc

        gc.collect()
        assert calls == [1]  # and not again when the finalizer's object goes
    finally:
        os.close(fd)
    with open("/proc/self/maps") as f:
        assert not [line for line in f if "procpool-test" in line]


_real_map_fd = _mapping.map_fd


def test_a_result_whose_reading_fails_keeps_its_segment_until_freed(monkeypatch):
    # the result's mapping lives on in the failure's traceback: its segment must not be
    # rewritten until that goes (before: reported at once, and again when freed)
    armed = [True]

    def flaky(fd, size, **kw):
        view = _real_map_fd(fd, size, **kw)
        if armed[0] and kw.get("on_unmap"):
            armed[0] = False
            raise KeyboardInterrupt  # (where a Ctrl-C can land)
        return view

    monkeypatch.setattr(_mapping, "map_fd", flaky)
    with procpool.Pool(1) as pool:
        bad = pool.apply_async(full, (1,))
        with pytest.raises(procpool.SerializationError):
            bad.get(30)
        kept = pool.apply(full, (2,))
        del bad
        import gc

        gc.collect()
        for i in range(3, 6):
            assert (pool.apply(full, (i,)) == float(i)).all()
        assert (kept == 2.0).all()


_held_descriptors: list = []


def full_without_descriptors(value):
    """A large result made while this worker has no descriptor left (kept until the next
    call of ``give_descriptors_back``): it cannot be sent."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _held_descriptors.append((soft, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    from conftest import use_up_descriptors

    _held_descriptors.extend(use_up_descriptors())
    return np.full(N, float(value))


def give_descriptors_back(_=None):
    import resource

    limits = _held_descriptors.pop(0)
    for fd in _held_descriptors:
        os.close(fd)
    _held_descriptors.clear()
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    return True


def test_a_large_result_a_worker_out_of_descriptors_cannot_send_fails_alone():
    with procpool.Pool(1) as pool:
        for first in (True, False):  # no segment yet (memfd_create fails); one to reuse (dup)
            if not first:
                assert (pool.apply(full, (1,)) == 1.0).all()
            with pytest.raises(procpool.SerializationError, match="could not be sent"):
                pool.apply(full_without_descriptors, (2,))
            assert pool.apply(give_descriptors_back)
            assert (pool.apply(full, (3,)) == 3.0).all()
        assert pool.apply(result_segments)[0] <= 2  # nothing left lent by the failures


def test_free_result_segments_are_closed_while_small_tasks_keep_the_worker_busy():
    # they were closed only after TRIM_AFTER seconds with no frame at all (a review)
    with procpool.Pool(1) as pool:
        assert (pool.apply(full, (1,)) == 1.0).all()
        assert pool.apply(result_segments)[0] == 1
        deadline = time.monotonic() + 3 * _buffers.TRIM_AFTER
        while pool.apply(result_segments)[0] and time.monotonic() < deadline:
            time.sleep(0.3)  # a small call every 0.3 s: never 2 s without a frame
        assert pool.apply(result_segments) == (0, 0)
