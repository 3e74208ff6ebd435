"""DaskPool: the Pool API on a real Dask cluster (127.0.0.1, started here; nothing is mocked).

Most tests share one module-scoped cluster of two single-threaded worker processes, with
``allowed_failures=0`` so that a worker killed mid-task fails that task at once.  One test lets
DaskPool start and stop a cluster of its own and checks that nothing is left behind.

Dask is imported inside the fixtures and tasks, not at module level: collecting this file must
not load Dask (its logging set-up, its modules) into the process of every other test.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing
import os
import signal
import threading
import time

import pytest
from conftest import child_processes, is_alive, run_python, wait_until

import procpool
from procpool.errors import RemoteTraceback

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        importlib.util.find_spec("distributed") is None,
        reason="needs Dask: pip install 'procpool[dask]'",
    ),
]


# ---------------------------------------------------------------- tasks (run on the workers)


def event(n: int) -> str:
    time.sleep(0.01)
    return f"event {n} handled by process {os.getpid()}"


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0, *, c: int = 0) -> int:
    return a + b + c


def current_key(x: int) -> tuple[int, str]:
    """The item and the Dask task that ran it (which chunk it travelled in)."""
    import distributed

    return x, distributed.get_worker().get_current_task()


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise KeyError(f"item {x} is bad")
    return x


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def busy(seconds: float) -> float:
    """Pure-Python work (the soft timeout lands at the next bytecode)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def kill_own_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def make_lock() -> object:
    return threading.Lock()  # cannot be pickled back


def worker_pid() -> int:
    return os.getpid()


class Box:
    """Hides an object in an attribute, where the argument check does not look."""

    def __init__(self, content: object) -> None:
        self.content = content


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def undo_dask_side_effects():
    """Give the next test modules the process as it was before Dask was imported here.

    Importing ``distributed`` changes the whole process: it registers tblib's pickling for every
    exception class in ``copyreg`` (an exception whose ``__init__`` does not round-trip then
    pickles anyway, which the local pool's own tests check), and once a client has run it keeps
    one executor thread (``Dask-Offload``), which would for example take a process-directed
    signal that a later test blocks in the main thread only.
    """
    import copyreg
    from concurrent.futures import ThreadPoolExecutor

    saved = dict(copyreg.dispatch_table)
    yield
    copyreg.dispatch_table.clear()
    copyreg.dispatch_table.update(saved)
    import distributed.utils

    old = distributed.utils._offload_executor  # a fresh one starts no thread until used
    distributed.utils._offload_executor = ThreadPoolExecutor(1, thread_name_prefix="Dask-Offload")
    old.shutdown(wait=True)


@pytest.fixture(scope="module")
def cluster():
    import distributed

    cluster = distributed.LocalCluster(
        host="127.0.0.1",
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"allowed_failures": 0, "dashboard_address": "127.0.0.1:0"},
    )
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def DaskPool():
    """The class under test (imported here: see the module docstring)."""
    from procpool.backends.dask import DaskPool

    return DaskPool


@pytest.fixture(scope="module")
def pool(cluster, DaskPool):
    pool = DaskPool(address=cluster.scheduler_address)
    yield pool
    pool.terminate()


# ---------------------------------------------------------------- one task


def test_tutorial_apply_async_get(pool):
    results = [pool.apply_async(event, (n,)) for n in range(10)]
    texts = [r.get(timeout=30) for r in results]
    assert [t.split(" handled")[0] for t in texts] == [f"event {n}" for n in range(10)]
    pids = {int(t.rsplit(" ", 1)[1]) for t in texts}
    assert os.getpid() not in pids  # it ran in the cluster's worker processes
    assert all(r.ready() and r.successful() for r in results)


def test_apply_with_args_and_kwds(pool):
    assert pool.apply(add, (1, 2), {"c": 3}) == 6
    assert pool.apply(lambda: 42) == 42  # lambdas travel too (cloudpickle)


def test_submit_returns_a_concurrent_future(pool):
    future = pool.submit(add, 1, b=2, c=3)
    assert future.result(timeout=30) == 6


def test_callbacks_get_the_result_and_the_error(pool):
    got: list[object] = []
    done = threading.Event()

    def on_result(value: object) -> None:
        got.append(value)
        if len(got) == 2:
            done.set()

    pool.apply_async(square, (7,), callback=on_result)
    pool.apply_async(raise_value_error, ("boom",), error_callback=on_result)
    assert done.wait(30)
    assert 49 in got
    (err,) = [g for g in got if isinstance(g, BaseException)]
    assert isinstance(err, ValueError) and str(err) == "boom"


def test_exception_travels_with_its_type_and_the_worker_traceback(pool):
    result = pool.apply_async(raise_value_error, ("bad input",))
    with pytest.raises(ValueError, match="bad input") as info:
        result.get(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(info.value.__cause__)
    assert result.ready() and not result.successful()


def test_get_timeout_raises_multiprocessing_timeout_error(pool):
    result = pool.apply_async(nap, (1.0,))
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    assert not result.ready()
    assert result.get(timeout=30) == 1.0


def test_task_timeout_fails_the_task_with_task_timeout_error(pool):
    started = time.monotonic()
    result = pool.apply_async(busy, (20.0,), timeout=0.5)
    with pytest.raises(procpool.TaskTimeoutError) as info:
        result.get(timeout=30)
    assert time.monotonic() - started < 10
    assert isinstance(info.value.__cause__, procpool.TaskTimeout)
    assert isinstance(info.value, multiprocessing.TimeoutError)  # as the stdlib's except sees it
    assert pool.apply(square, (3,)) == 9  # the worker goes on


def test_map_item_timeout_fails_only_that_item(pool):
    with pytest.raises(procpool.TaskTimeoutError, match="item 1 of map"):
        pool.map(busy, [0.0, 20.0, 0.0], chunksize=3, timeout=0.5)


def test_worker_killed_mid_task_fails_it_with_worker_lost_and_the_pool_goes_on(pool):
    with pytest.raises(procpool.WorkerLostError, match="died"):
        pool.apply_async(kill_own_worker).get(timeout=30)
    assert pool.apply(square, (5,)) == 25
    assert pool.map(square, range(20)) == [x * x for x in range(20)]


def test_ipc_objects_are_refused_as_arguments_with_a_clear_error(pool):
    queue = procpool.Queue()
    try:
        with pytest.raises(procpool.SerializationError, match="cannot be passed to a DaskPool"):
            pool.apply_async(square, (queue,))
        with pytest.raises(procpool.SerializationError, match="cannot be passed"):
            pool.map(square, [1, [2, queue]])
        with pytest.raises(procpool.SerializationError, match="cannot send"):
            pool.apply_async(square, (Box(queue),))  # Dask's pickling fails: said at once
    finally:
        queue.close()


def test_ipc_objects_are_found_three_container_levels_inside_an_argument(pool):
    queue = procpool.Queue()
    try:
        for call in (
            lambda: pool.apply_async(square, ([[[queue]]],)),
            lambda: pool.apply_async(square, (), {"x": {"k": ({queue},)}}),
            lambda: pool.map(square, [1, [[[queue]]]]),
            lambda: pool.starmap(add, [(1, [[[queue]]])]),
        ):
            with pytest.raises(procpool.SerializationError, match="cannot be passed to a DaskPool"):
                call()
    finally:
        queue.close()


def test_unpicklable_result_fails_the_task_instead_of_hanging(pool):
    with pytest.raises(procpool.SerializationError, match="could not be pickled"):
        pool.apply_async(make_lock).get(timeout=30)


def test_a_result_lost_with_its_worker_before_delivery_is_computed_again(cluster, DaskPool):
    """A task has finished, but the worker holding its result dies before the delivery thread
    fetched it: Dask computes it again, and the caller gets the value (not CancelledError)."""
    import distributed

    gate = threading.Event()
    in_callback = threading.Event()

    def hold_the_delivery_thread(_value: object) -> None:
        in_callback.set()
        gate.wait(30)

    with DaskPool(address=cluster.scheduler_address) as pool:
        pool.apply_async(square, (1,), callback=hold_the_delivery_thread)
        try:
            assert in_callback.wait(30)
            result = pool.apply_async(nap, (1.0,))  # recomputing it takes 1 s again
            client = pool.client

            def holder() -> str | None:
                held = [w for k, ws in client.who_has().items() if "nap" in str(k) for w in ws]
                return held[0] if held else None

            address = wait_until(holder, timeout=30)
            assert address, "the task did not finish"
            os.kill(client.run(os.getpid, workers=[address])[address], signal.SIGKILL)
            assert wait_until(lambda: holder() is None, timeout=30)  # the scheduler knows
        finally:
            gate.set()  # the delivery thread now finds the result lost (and recomputing)
        assert result.get(timeout=30) == 1.0
    # the shared cluster gets its worker back before the next test
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        assert wait_until(lambda: len(client.nthreads()) == 2, timeout=30)


def tagged_bytes(n: int) -> bytes:
    return b"x" * n


def test_a_delivered_result_is_not_kept_by_the_delivery_thread(pool):
    """Once the caller drops a result, its Dask future is released (and the value on the
    worker with it): the delivery thread, waiting for the next batch, holds none of the last."""
    result = pool.apply_async(tagged_bytes, (1000,))
    assert result.get(timeout=30) == b"x" * 1000
    del result

    def held() -> list:
        return [key for key in list(pool.client.refcount) if "tagged_bytes" in str(key)]

    assert wait_until(lambda: not held(), timeout=10), held()


# ---------------------------------------------------------------- many tasks


def test_map_batches_items_into_one_dask_task_per_chunk(pool):
    out = pool.map(current_key, range(100), chunksize=25)
    assert [x for x, _ in out] == list(range(100))
    keys = [k for _, k in out]
    assert len(set(keys)) == 4
    assert all(len(set(keys[i : i + 25])) == 1 for i in range(0, 100, 25))
    # the default: len / (4 * workers) items per task, as multiprocessing chooses (a worker
    # replaced after the kill test may not be back yet: 1 or 2 workers)
    out = pool.map(current_key, range(1000))
    assert 4 <= len({k for _, k in out}) <= 8


def test_map_raises_the_first_failing_item_after_the_others_complete(pool):
    assert pool.map(square, []) == []
    with pytest.raises(KeyError, match="item 3 is bad"):
        pool.map(fail_on, range(10), chunksize=2)
    result = pool.map_async(fail_on, range(10), chunksize=2)
    result.wait(30)
    assert result.ready() and not result.successful()


def test_starmap(pool):
    assert pool.starmap(add, [(1, 2), (3, 4), (5, 6)]) == [3, 7, 11]
    assert pool.starmap_async(add, zip(range(5), range(5), strict=True)).get(timeout=30) == [
        0,
        2,
        4,
        6,
        8,
    ]


def test_imap_keeps_order_and_reads_its_input_lazily(cluster, DaskPool):
    read = itertools.count()
    n_read = 0

    def numbers():
        nonlocal n_read
        for i in itertools.count():  # infinite: only laziness lets this test end
            n_read = next(read) + 1
            yield i

    with DaskPool(address=cluster.scheduler_address, prefetch=3) as pool:
        it = pool.imap(square, numbers(), chunksize=2)
        assert n_read <= 3 * 2  # the window, not the input, was read
        assert [it.next(timeout=30) for _ in range(10)] == [x * x for x in range(10)]
        assert n_read <= 10 + 3 * 2
        # without a chunksize it starts with one item per task and grows them
        assert list(pool.imap(square, iter(range(200)))) == [x * x for x in range(200)]


def test_imap_unordered_returns_every_result(pool):
    assert sorted(pool.imap_unordered(square, range(50), chunksize=5)) == [x * x for x in range(50)]
    it = pool.imap(fail_on, range(5), chunksize=1)
    assert [it.next(timeout=30) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
        it.next(timeout=30)
    assert it.next(timeout=30) == 4  # iteration goes on after a failed item


# ---------------------------------------------------------------- lifecycle


def test_close_and_join_semantics(cluster, DaskPool):
    pool = DaskPool(address=cluster.scheduler_address)
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    results = [pool.apply_async(nap, (0.2,)) for _ in range(4)]
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])
    with pytest.raises(RuntimeError):
        pool.submit(square, 1)
    pool.join(timeout=30)
    assert all(r.ready() and r.get(0) == 0.2 for r in results)
    # the external cluster is still there for others
    with DaskPool(address=cluster.scheduler_address) as again:
        assert again.apply(square, (4,)) == 16


def test_shutdown_cancel_futures_cancels_only_what_has_not_started(cluster, DaskPool):
    """As concurrent.futures and the local pool do: running tasks finish (a running future
    never ends with CancelledError while cancelled() is False); queued ones may be cancelled."""
    from concurrent.futures import CancelledError

    pool = DaskPool(address=cluster.scheduler_address)
    future = pool.submit(nap, 1.0)
    running = pool.apply_async(nap, (1.0,))

    def started() -> bool:
        given = [k for keys in pool.client.processing().values() for k in keys if "nap" in k]
        return len(given) >= 2

    assert wait_until(started, timeout=30)
    queued = [pool.apply_async(nap, (0.2,)) for _ in range(8)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert future.result(timeout=30) == 1.0 and not future.cancelled()
    assert running.get(timeout=30) == 1.0
    for result in queued:
        try:
            assert result.get(timeout=30) == 0.2
        except CancelledError:
            pass


def test_terminate_fails_what_is_outstanding(cluster, DaskPool):
    with DaskPool(address=cluster.scheduler_address) as pool:
        result = pool.apply_async(nap, (5.0,))
    with pytest.raises(procpool.PoolTerminated):
        result.get(timeout=10)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(square, (1,))


def test_terminate_of_an_own_cluster_kills_its_busy_workers_and_leaves_nothing(DaskPool):
    """terminate() kills the own cluster's worker processes (a nanny closing waits 4 s for one
    busy in a task before it kills it, and close() still waits: only terminate kills)."""
    before = set(child_processes())
    pool = DaskPool(1)
    workers = list(pool.client.run(worker_pid).values())
    result = pool.apply_async(nap, (60.0,))
    assert wait_until(
        lambda: pool.client.processing() and any(pool.client.processing().values()), 10
    )
    pool.terminate()
    with pytest.raises(procpool.PoolTerminated):
        result.get(timeout=10)
    assert wait_until(lambda: not any(is_alive(pid) for pid in workers), timeout=10)
    assert wait_until(lambda: not (set(child_processes()) - before), timeout=10)


EXIT_WITH_A_BUSY_POOL = """
import time
from procpool.backends.dask import DaskPool

def report(exc):
    print("task failed with", type(exc).__name__, flush=True)

pool = DaskPool(1)  # left open: the interpreter's exit must terminate it
pool.apply_async(time.sleep, (30,), error_callback=report)
deadline = time.monotonic() + 30
while not any(pool.client.processing().values()) and time.monotonic() < deadline:
    time.sleep(0.05)
print("exiting", flush=True)
"""


def test_a_pool_open_at_exit_is_terminated_before_dask_closes_its_cluster():
    """The pool's exit hook runs before distributed's own (which closes the cluster the slow
    way: each nanny waits 4 s for its busy worker), so the exit takes terminate()'s path."""
    proc = run_python(EXIT_WITH_A_BUSY_POOL, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["exiting", "task failed with PoolTerminated"]
    assert "still alive after 4.0 seconds" not in proc.stderr, proc.stderr


def test_an_address_without_a_port_is_refused_and_the_exit_does_not_wait():
    """Refused before a Client is made: the half-made Client's __del__ waited 60 s at exit."""
    code = (
        "from procpool.backends.dask import DaskPool\n"
        "try:\n"
        "    DaskPool(address='not an address')\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n"
    )
    proc = run_python(code, timeout=40)  # (the exit took 60 s)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ValueError:") and "not an address" in proc.stdout


def test_uses_a_client_it_is_given_and_leaves_it_open(cluster, DaskPool):
    import distributed

    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        with DaskPool(client=client) as pool:
            assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert client.submit(square, 3).result(timeout=30) == 9


def test_own_cluster_is_started_and_stopped_leaving_no_process_behind(cluster, DaskPool):
    import distributed

    before = set(child_processes())
    threads_before = set(threading.enumerate())
    pool = DaskPool(1)
    workers = list(pool.client.run(worker_pid).values())
    assert pool.apply(square, (6,)) == 36
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    pool.close()
    pool.join(timeout=30)
    assert wait_until(lambda: not any(is_alive(pid) for pid in workers), timeout=10)
    # the shared cluster's workers may have been replaced meanwhile: they are not leaks
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        shared = set(client.run(worker_pid).values())
    assert wait_until(lambda: not (set(child_processes()) - before - shared), timeout=10), (
        set(child_processes()) - before - shared
    )
    # no thread of the pool's; Dask's own process-wide executors (Dask-Offload...) may stay
    left = {t.name for t in set(threading.enumerate()) - threads_before}
    assert not {name for name in left if not name.startswith("Dask-")}, left


# ---------------------------------------------------------------- the lazy imap's input


def test_terminate_returns_while_another_thread_reads_the_imap_input(cluster, DaskPool):
    """The feeder reads the input without its lock: terminate() (which ends the feeder) does
    not wait for a generator that is blocked in the middle of a chunk."""
    gate = threading.Event()
    reading = threading.Event()

    def stalls_after_one():
        yield 0
        reading.set()
        gate.wait(30)  # the input blocks (a slow producer) until the test is done
        yield 1

    pool = DaskPool(address=cluster.scheduler_address, prefetch=2)
    feeder = threading.Thread(target=lambda: pool.imap(square, stalls_after_one()))
    feeder.start()
    try:
        assert reading.wait(30)
        terminated = threading.Event()
        threading.Thread(target=lambda: (pool.terminate(), terminated.set()), daemon=True).start()
        assert terminated.wait(15), "terminate() waited for the imap input"
    finally:
        gate.set()
        feeder.join(30)
    assert not feeder.is_alive()


def test_imap_streams_results_of_a_slowly_produced_input(cluster, DaskPool):
    """Adaptive chunks end once reading them took ADAPTIVE_TARGET_S: a slow input is not read
    for thousands of items (the compute time per item says nothing about it) before the
    first results come out."""
    n_read = 0

    def slow_input():
        nonlocal n_read
        for i in range(400):  # 4 s in all
            time.sleep(0.01)
            n_read += 1
            yield i

    with DaskPool(address=cluster.scheduler_address, prefetch=2) as pool:
        it = pool.imap(square, slow_input())
        assert [it.next(timeout=30) for _ in range(30)] == [x * x for x in range(30)]
        # a chunk is at most ~50 ms of reading (5 items here, fewer on a loaded machine)
        assert n_read < 150, n_read


def test_imap_item_dask_cannot_pickle_fails_at_its_own_position(cluster, DaskPool):
    def with_a_lock():
        for i in range(8):
            yield threading.Lock() if i == 5 else i

    with DaskPool(address=cluster.scheduler_address, prefetch=2) as pool:
        it = pool.imap(square, with_a_lock(), chunksize=1)
        out: list[object] = []
        while True:
            try:
                out.append(it.next(timeout=30))
            except StopIteration:
                break
            except procpool.SerializationError:
                out.append("SerializationError")
        assert out == [0, 1, 4, 9, 16, "SerializationError", 36, 49]
        # the same, never consumed: join() reads the rest and returns
        it = pool.imap(square, with_a_lock(), chunksize=1)
        pool.close()
        pool.join(timeout=30)
        assert pool._engine.state == "TERMINATE"  # joined: stopped
        assert list(itertools.islice(it, 5)) == [0, 1, 4, 9, 16]
        with pytest.raises(procpool.SerializationError, match="cannot send"):
            next(it)
        assert list(it) == [36, 49]


# ---------------------------------------------------------------- found by a review (2026-11-28)


def test_a_callback_waiting_for_another_result_of_its_pool_gets_an_error_not_a_hang(
    cluster, DaskPool
):
    # as procpool.Pool: the callback runs in the thread that delivers the results, so such a
    # wait would never return -- it held the deliveries for good, and terminate() with them
    said: list[str] = []

    def callback(_: object) -> None:
        try:
            pool.map(square, [1, 2])
        except RuntimeError as exc:
            said.append(str(exc))

    with DaskPool(address=cluster.scheduler_address) as pool:
        assert pool.apply_async(square, (3,), callback=callback).get(30) == 9
        assert len(said) == 1 and "inside a callback of this pool" in said[0]
        assert pool.apply_async(square, (5,)).get(30) == 25


def test_join_returns_once_every_callback_has_run_and_every_result_is_in(cluster, DaskPool):
    # join() returned once the last units were taken out for delivery, and waited 5 s for
    # the delivery thread: callbacks taking longer ran after it (4 of 10 in the review's
    # case), the client and cluster closed under them
    ran: list[int] = []

    def callback(value: int) -> None:
        time.sleep(0.6)
        ran.append(value)

    pool = DaskPool(address=cluster.scheduler_address)
    results = [pool.apply_async(square, (i,), callback=callback) for i in range(10)]
    time.sleep(1)  # (all done by now: their callbacks, 6 s in all, queue up)
    pool.close()
    pool.join(timeout=30)
    assert sorted(ran) == [i * i for i in range(10)]
    assert all(r.ready() for r in results)


def test_join_from_a_callback_returns(cluster, DaskPool):
    # join() waited for the units being settled, the callback's own among them (review)
    done: list[int] = []

    def callback(value: int) -> None:
        pool.close()
        pool.join(timeout=20)
        done.append(value)

    pool = DaskPool(address=cluster.scheduler_address)
    try:
        assert pool.apply_async(square, (7,), callback=callback).get(15) == 49
        assert done == [49]
    finally:
        pool.terminate()


def test_an_ipc_object_in_an_imap_input_ends_it_after_the_items_before_it(cluster, DaskPool):
    # as with a chunksize of 1: the items read before it run, then the iteration raises; a
    # larger chunk dropped them, unreported
    queue = procpool.Queue()
    try:
        with DaskPool(address=cluster.scheduler_address) as pool:
            for chunksize in (1, 4):
                it = pool.imap(square, [1, 2, queue, 4, 5], chunksize=chunksize)
                assert [it.next(30), it.next(30)] == [1, 4]
                with pytest.raises(procpool.SerializationError, match="cannot be passed"):
                    it.next(30)
                with pytest.raises(StopIteration):
                    it.next(30)
    finally:
        queue.close()


@pytest.mark.timeout(150)
def test_an_imap_whose_scheduler_goes_away_ends_and_the_pool_joins():
    # the chunk read when the client was closed was counted and never sent: the iteration
    # waited for it for good, and join() raised the client's error at every call
    code = """if True:
        import os, signal, subprocess, sys, time
        import dask
        dask.config.set({"distributed.comm.timeouts.connect": "3s"})  # gives up soon
        import procpool
        from procpool.backends.dask import DaskPool

        CLUSTER = '''if True:
            import time, distributed
            if __name__ == "__main__":
                c = distributed.LocalCluster(host="127.0.0.1", n_workers=1,
                    threads_per_worker=1, processes=True, dashboard_address=None,
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
                print(c.scheduler_address, flush=True)
                time.sleep(120)
        '''

        def square(x):
            return x * x

        if __name__ == "__main__":
            child = subprocess.Popen([sys.executable, "-c", CLUSTER], stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
            try:
                pool = DaskPool(address=child.stdout.readline().strip(), prefetch=4)
                it = pool.imap(square, range(100), chunksize=2)
                print([it.next(timeout=20) for _ in range(4)])
                os.killpg(child.pid, signal.SIGKILL)  # the scheduler and its workers
                child.wait()
                deadline = time.monotonic() + 30
                while pool.client.status != "closed" and time.monotonic() < deadline:
                    time.sleep(0.2)
                for _ in range(200):
                    try:
                        it.next(timeout=5)
                    except StopIteration:
                        print("ended")
                        break
                    except procpool.TimeoutError:
                        print("waited")
                        break
                    except Exception:
                        pass
                pool.close()
                pool.join(timeout=20)
                print("joined", pool._engine.state)
            finally:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    """
    proc = run_python(code, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:3] == ["[0, 1, 4, 9]", "ended", "joined TERMINATE"]


def test_a_ctrl_c_in_join_finds_the_engines_lock_retaken_in_c(pool):
    """join() waits on a Condition over the engine's lock: over a plain Lock the Condition
    released and retook it in Python, where a Ctrl-C could leave it released and the `with`
    then released it again (RuntimeError, or under the delivery thread; found by a review).
    Over an RLock both are C calls; and join waits in slices, as Pool.join does."""
    import types

    engine = pool._engine
    cond = engine._changed
    for name in ("_release_save", "_acquire_restore", "_is_owned"):
        assert isinstance(getattr(cond, name), types.BuiltinMethodType), name
    assert pool.apply_async(square, (4,)).get(60) == 16
