"""Nothing leaks (DESIGN principle 3): many pools in a row, pools dropped without close(), worker
deaths and large numpy arrays leave no child process, file descriptor, ``/dev/shm`` entry -- or
procpool memfd mapping -- behind.  The ``leak_check`` fixture (tests/conftest.py) compares
before/after snapshots, polling for a few seconds while things settle.
"""

from __future__ import annotations

import gc
import os
import signal

import numpy as np
import pytest
from conftest import open_fds, wait_until

import procpool

from . import helpers as h

GET_TIMEOUT = 15.0
EXPECTED = [x * x for x in range(20)]

pytestmark = pytest.mark.timeout(120)


def no_procpool_mappings():
    return not h.procpool_mappings()


@pytest.mark.parametrize(("method", "rounds"), [("fork", 50), ("forkserver", 10), ("spawn", 10)])
def test_pools_in_a_row_with_block(method, rounds, leak_check):
    for _ in range(rounds):
        with procpool.Pool(2, start_method=method) as pool:
            assert pool.map(h.square, range(20)) == EXPECTED
    leak_check.assert_clean()
    assert wait_until(no_procpool_mappings, 5.0), h.procpool_mappings()


@pytest.mark.parametrize(("method", "rounds"), [("fork", 50), ("forkserver", 10), ("spawn", 10)])
def test_pools_in_a_row_close_join(method, rounds, leak_check):
    for _ in range(rounds):
        pool = procpool.Pool(2, start_method=method)
        assert pool.map(h.square, range(20)) == EXPECTED
        pool.close()
        pool.join(GET_TIMEOUT)
        assert pool._sched._thread.is_alive() is False, "join() returned before the pool ended"
    leak_check.assert_clean()
    assert wait_until(no_procpool_mappings, 5.0), h.procpool_mappings()


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_pool_dropped_without_close(method, busy, leak_check):
    """``del pool`` (no close, no terminate): the finalizer stops the workers and releases
    everything within a few seconds -- once the tasks in flight are done (nothing submitted is
    lost: their callbacks run), as a pool only its results refer to lives until they are in."""
    pool = procpool.Pool(2, start_method=method)
    assert pool.map(h.square, range(20)) == EXPECTED
    workers = pool.pids()
    called = []
    if busy:
        pool.apply_async(h.sleep_return, (1, 0.5), callback=called.append)
        pool.starmap_async(h.sleep_return, [(i, 0.5) for i in range(4)], callback=called.append)
    del pool
    gc.collect()
    assert wait_until(lambda: not any(h.proc_stat(p) for p in workers), 10.0), workers
    assert sorted(map(repr, called)) == (["1", "[0, 1, 2, 3]"] if busy else [])
    leak_check.assert_clean()


def test_worker_deaths_leak_nothing(leak_check, tmp_path):
    """20 workers SIGKILLed mid-task: every replacement reuses the descriptors of the dead one
    (socket, pidfd, progress slot), none accumulates."""
    pool = procpool.Pool(2)
    try:
        counts = []
        for i in range(20):
            flag = tmp_path / f"started{i}"
            result = pool.apply_async(h.announce_then_sleep, (str(flag), 30.0))
            assert wait_until(flag.exists, 10.0)
            os.kill(int(flag.read_text()), signal.SIGKILL)
            with pytest.raises(procpool.WorkerLostError):
                result.get(timeout=GET_TIMEOUT)
            assert wait_until(lambda: len(pool.pids()) == 2, 10.0)
            counts.append(len(os.listdir("/proc/self/fd")))
        assert counts[-1] <= counts[0], counts
        assert pool.map(h.square, range(20)) == EXPECTED
    finally:
        pool.terminate()
        pool.join(10)


ARRAY_MIB = 8


def big_array(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(ARRAY_MIB * 2**20 // 8)  # float64


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_large_numpy_arrays_roundtrip_and_leak_nothing(method, leak_check):
    """8 MiB float64 arrays as arguments and results of apply/map come back equal; once the
    pool is closed and the results dropped, no descriptor and no procpool memfd mapping is left
    (the arrays travel through memfds)."""
    arrays = [big_array(i) for i in range(4)]
    with procpool.Pool(2, start_method=method) as pool:
        doubled = pool.apply(h.double, (arrays[0],))
        np.testing.assert_array_equal(doubled, arrays[0] * 2)

        stats = pool.apply_async(h.array_stats, (arrays[1],)).get(timeout=GET_TIMEOUT)
        assert stats == (arrays[1].shape, "float64", float(arrays[1].sum()))

        echoed = pool.apply_async(h.echo, (arrays[2],)).get(timeout=GET_TIMEOUT)
        np.testing.assert_array_equal(echoed, arrays[2])

        results = pool.map(h.double, arrays)
        assert len(results) == len(arrays)
        for got, sent in zip(results, arrays, strict=True):
            assert got.dtype == np.float64 and got.shape == sent.shape
            np.testing.assert_array_equal(got, sent * 2)
        results[0][0] = -1.0  # a result is an ordinary writable array
        assert results[1][0] == arrays[1][0] * 2  # ... and its own memory
        pool.close()
        pool.join(GET_TIMEOUT)
    del doubled, echoed, results, got
    gc.collect()
    leak_check.assert_clean()
    assert wait_until(no_procpool_mappings, 5.0), h.procpool_mappings()


def worker_buffers(mappings):
    return [m for m in mappings if "procpool-buffer" in m]


def test_worker_keeps_no_descriptors_across_large_tasks(leak_check):
    """One worker receives and returns 8 MiB arrays 20 times: its descriptor count does not
    grow and it keeps no buffer mapped (the memfds it gets and sends are all released), but
    for the few segments its results travel in, reused each round."""
    arr = big_array(7)
    with procpool.Pool(1) as pool:
        pool.apply(h.double, (arr,))
        before = pool.apply(h.fd_count) - pool.apply(h.result_segments)
        for _ in range(20):
            pool.apply(h.double, (arr,))
            pool.map(h.double, [arr, arr])
        segments = pool.apply(h.result_segments)
        assert 0 < segments <= 4, f"{segments} result segments for 3 results at a time"
        assert pool.apply(h.fd_count) - segments <= before
        assert worker_buffers(pool.apply(h.procpool_mappings)) == []


def test_live_large_results_hold_no_descriptors():
    """Received arrays are mapped memfds whose descriptors are closed at once: results that stay
    alive hold no fd (mmap.mmap used to dup one per array, found by this test)."""
    arrays = [big_array(i) for i in range(4)]
    with procpool.Pool(2) as pool:
        pool.apply(h.square, (1,))
        before = open_fds()
        results = pool.map(h.double, arrays)
        held = {
            fd: target
            for fd, target in open_fds().items()
            if fd not in before and "procpool-arg" not in target  # the pool's argument cache
        }
        del results  # (the traceback of a failure would keep them alive)
        assert not held, f"{len(arrays)} live results hold descriptors: {held}"


MANY_RESULTS_SCRIPT = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # a common default soft limit is 1024
with procpool.Pool(2, start_method=sys.argv[1]) as pool:
    report_pids(pool)
    results = pool.map_async(h.filled_array, range(400)).get(timeout=60)  # 400 x 320 KB
    ok = len(results) == 400 and all(float(a[0]) == i for i, a in enumerate(results))
    print("RESULTS", "ok" if ok else "wrong", flush=True)
"""


def test_many_large_results_under_a_low_descriptor_limit(leak_check):
    """400 live 320 KB results under RLIMIT_NOFILE=256 (used to fail with 'Too many open files'
    and then kill the I/O thread with an IndexError in Channel._parse)."""
    child = h.Child(MANY_RESULTS_SCRIPT, "fork")
    try:
        child.worker_pids()
        line = child.wait_line("RESULTS", 60.0)
        assert line == "RESULTS ok", child.stderr_text()
        assert child.wait(10.0) == 0, child.stderr_text()
        assert "Traceback" not in child.stderr_text()
    finally:
        child.close()


def test_a_pool_only_its_results_refer_to_lives_until_they_are_in(leak_check):
    """``Pool(2).imap(...)``, ``Pool(2).map_async(...)``: the pool is not referred to by the
    caller, only by what it returned; it must not be terminated under it (multiprocessing's
    results hold their pool too), and it is terminated once they are done with."""
    assert list(procpool.Pool(2).imap(h.square, range(20))) == EXPECTED
    assert procpool.Pool(2).map_async(h.square, range(20)).get(20) == EXPECTED
    result = procpool.Pool(2).apply_async(h.sleep_return, (7, 0.2))
    future = procpool.Pool(2).submit(h.sleep_return, 8, 0.2)
    gc.collect()
    assert result.get(20) == 7 and future.result(20) == 8
    del result, future
    gc.collect()
    leak_check.assert_clean()


def test_a_dropped_imap_iterator_lets_its_pool_go(leak_check):
    """The iterator holds its pool, but the pool's job must not hold the iterator: an imap the
    caller stopped reading and dropped (with its pool) leaves nothing running."""
    pool = procpool.Pool(2)
    workers = pool.pids()
    for _ in pool.imap(h.square, range(1_000_000)):
        break
    del pool
    gc.collect()
    assert wait_until(lambda: not any(h.proc_stat(p) for p in workers), 10.0), workers
    leak_check.assert_clean()


def test_a_cancelled_future_does_not_keep_its_pool(leak_check):
    import weakref

    pool = procpool.Pool(1)
    first = pool.submit(h.sleep_return, 1, 0.3)
    second = pool.submit(h.sleep_return, 2, 30.0)
    assert second.cancel()  # still queued behind the first: cancelled, done
    ref = weakref.ref(pool)
    del pool
    assert first.result(20) == 1
    gc.collect()
    assert wait_until(lambda: ref() is None, 5.0), "a cancelled future kept its pool alive"
    leak_check.assert_clean()


def _start_into(pools: list) -> None:
    pools.append(procpool.Pool(4))


def test_pools_starting_together_keep_each_others_fds_out_of_their_workers(leak_check):
    """Each forked worker holds one end of its own pool's death pipe, none of another's: the
    parent makes a pool's pipe, and a worker's end, under the lock that serializes the pools'
    forks."""
    import threading

    for _ in range(3):
        pools: list[procpool.Pool] = []
        threads = [threading.Thread(target=_start_into, args=(pools,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
        try:
            assert len(pools) == 2
            pipes = {pool: os.fstat(pool._sched._launcher._death[0]).st_ino for pool in pools}
            for pool in pools:
                seen = {}
                while set(seen) != set(pool.pids()):
                    seen.update(pool.map(h.pipe_inodes, range(16), chunksize=1))
                others = {ino for p, ino in pipes.items() if p is not pool}
                for own, other in seen.values():
                    assert own == [pipes[pool]] and not others & set(other), (seen, pipes)
        finally:
            for pool in pools:
                pool.terminate()
                pool.join()
