"""multiprocessing.Pool compatibility: every method of the surface, with the stdlib's semantics."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import sys
import threading
import time
import traceback

import pytest
from _ipc_helpers import no_leaks  # noqa: F401
from conftest import child_processes, run_python, wait_until
from tasks import (
    SLOW_TEXT,
    FlakyLoad,
    Stopped,
    add,
    fail,
    fail_on,
    get_init_value,
    identity,
    keep_shared,
    mixed,
    pid,
    raise_on_sigusr1,
    set_init_value,
    sleep_then,
    square,
    stop_on,
    use_shared,
)

import procpool
from procpool.errors import SerializationError


@pytest.fixture
def pool():
    with procpool.Pool(2) as p:
        yield p


def test_apply_returns_the_value(pool):
    assert pool.apply(add, (2, 3)) == 5
    assert pool.apply(add, (2,), {"b": 5}) == 7


def test_apply_async_get_ready_successful_wait(pool):
    r = pool.apply_async(sleep_then, (0.2, "done"))
    with pytest.raises(ValueError):
        r.successful()  # not ready yet: the stdlib raises ValueError
    r.wait(10)
    assert r.ready()
    assert r.successful()
    assert r.get(timeout=1) == "done"


def test_get_timeout_raises_multiprocessing_timeout_error(pool):
    r = pool.apply_async(sleep_then, (2, 1))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    assert procpool.TimeoutError is multiprocessing.TimeoutError
    assert r.get(timeout=10) == 1


def test_wait_with_timeout_returns_when_not_ready(pool):
    r = pool.apply_async(sleep_then, (1, 1))
    started = time.monotonic()
    r.wait(0.05)
    assert not r.ready()
    assert time.monotonic() - started < 0.9


def test_callbacks_receive_result_and_error(pool):
    got: list = []
    done = threading.Event()

    def on_result(value):
        got.append(("ok", value))
        done.set()

    def on_error(exc):
        got.append(("err", type(exc).__name__))
        done.set()

    pool.apply_async(square, (4,), callback=on_result).get(10)
    assert done.wait(10)
    done.clear()
    r = pool.apply_async(fail, ("x",), error_callback=on_error)
    with pytest.raises(ValueError):
        r.get(10)
    assert done.wait(10)
    assert got == [("ok", 16), ("err", "ValueError")]


def test_a_burst_of_calls_with_mixed_results_gives_each_its_own(pool):
    """Small scalar results of a batch travel together (one VALUES record); strings, lists and
    errors between them keep records of their own: each caller and callback gets its value."""
    n = 4000
    called: dict[int, object] = {}

    def on(i):
        return lambda value: called.setdefault(i, value)

    results = [
        pool.apply_async(mixed, (i,), callback=on(i), error_callback=on(i)) for i in range(n)
    ]
    for i, r in enumerate(results):
        if i % 8 == 5:
            with pytest.raises(ValueError, match=f"^bad {i}$"):
                r.get(60)
            continue
        want = [i, i / 2, str(i), None, [i], None, i % 3 == 0, complex(i, 1)][i % 8]
        value = r.get(60)
        assert value == want and type(value) is type(want), (i, value)
    deadline = time.monotonic() + 30  # callbacks run just after get() can return
    while len(called) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(called) == n
    assert [called[i] for i in range(0, n, 8)] == list(range(0, n, 8))
    assert all(isinstance(called[i], ValueError) for i in range(5, n, 8))


def test_callbacks_of_one_worker_run_in_the_order_its_tasks_finished():
    """Small scalar results travel apart from the others (VALUES records), yet callbacks and
    error callbacks still run in the order the worker finished the tasks."""
    order: list[int] = []
    n = 3000
    with procpool.Pool(1) as p:
        for i in range(n):
            p.apply_async(mixed, (i,), callback=lambda _, i=i: order.append(i),
                          error_callback=lambda _, i=i: order.append(i))  # fmt: skip
        deadline = time.monotonic() + 60
        while len(order) < n and time.monotonic() < deadline:
            time.sleep(0.01)
    assert order == list(range(n))


def test_callbacks_run_one_at_a_time_also_for_a_reply_its_caller_reads(pool):
    """A caller whose get() reads its own reply delivers it in order, after the callback the
    I/O thread is running: callbacks never overlap (as with multiprocessing)."""
    inside = threading.Event()
    overlapped: list[bool] = []

    def slow(_):
        inside.set()
        time.sleep(0.5)
        inside.clear()

    pool.apply(square, (0,))
    pool.apply_async(square, (1,), callback=slow)
    assert inside.wait(10)
    pool.apply_async(square, (2,), callback=lambda _: overlapped.append(inside.is_set())).get(10)
    assert overlapped == [False]


def test_callback_may_submit_more_work(pool):
    nested = []
    finished = threading.Event()

    def on_result(value):
        nested.append(pool.apply_async(square, (value,), callback=lambda v: finished.set()))

    pool.apply_async(square, (3,), callback=on_result)
    assert finished.wait(10)
    assert nested[0].get(10) == 81


def test_map_matches_builtin_map(pool):
    assert pool.map(square, range(100)) == [x * x for x in range(100)]
    assert pool.map(square, []) == []
    assert pool.map(square, range(50), chunksize=7) == [x * x for x in range(50)]
    assert pool.map(square, iter(range(10))) == [x * x for x in range(10)]  # no __len__


def test_map_async_with_callback(pool):
    got = []
    r = pool.map_async(square, range(10), callback=got.append)
    assert r.get(10) == [x * x for x in range(10)]
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [[x * x for x in range(10)]]


def test_map_raises_the_items_exception_after_the_others_complete(pool):
    with pytest.raises(ValueError, match="bad item 3"):
        pool.map(fail_on, range(10))
    r = pool.map_async(fail_on, range(10))
    with pytest.raises(ValueError) as info:
        r.get(10)
    assert not r.successful()
    if sys.version_info >= (3, 11):  # exceptions carry notes from 3.11 on
        assert any("item 3" in n for n in info.value.__notes__)


def test_starmap_and_starmap_async(pool):
    assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.starmap_async(add, [(5, 5)]).get(10) == [10]


def test_imap_is_ordered_and_next_has_a_timeout(pool):
    it = pool.imap(square, range(20))
    assert it.next(timeout=10) == 0
    assert list(it) == [x * x for x in range(1, 20)]
    slow = pool.imap(sleep_then, [1.0])
    with pytest.raises(multiprocessing.TimeoutError):
        slow.next(timeout=0.05)


def test_imap_unordered_yields_every_result(pool):
    assert sorted(pool.imap_unordered(square, range(50))) == [x * x for x in range(50)]
    assert sorted(pool.imap_unordered(square, range(50), chunksize=3)) == [x * x for x in range(50)]


def test_imap_failed_item_raises_at_its_position_and_iteration_goes_on(pool):
    it = pool.imap(fail_on, range(6))
    assert [next(it), next(it), next(it)] == [0, 10, 20]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)
    assert list(it) == [40, 50]


@pytest.mark.parametrize("star", [False, True])
def test_an_item_raising_stopiteration_fails_alone_with_its_own_exception(pool, star):
    """A loop in C over a chunk (list.extend over a map) would take an item's StopIteration
    for the end of its input: the item's exception lost, or the rest of the chunk dropped."""
    items = list(range(8))
    if star:
        res = pool.starmap_async(stop_on, [(x,) for x in items], chunksize=8)
    else:
        res = pool.map_async(stop_on, items, chunksize=8)
    with pytest.raises(StopIteration) as info:
        res.get(10)
    assert info.value.args == (3,)
    assert "stop_on" in "".join(traceback.format_exception(info.value))  # (the worker's)
    it = pool.imap(stop_on, items, chunksize=8)
    assert [next(it), next(it), next(it)] == [0, 10, 20]
    with pytest.raises(StopIteration):
        it.next(10)
    assert list(it) == [40, 50, 60, 70]


def test_a_signal_handler_raising_while_a_chunk_runs_fails_one_item_and_the_chunk_ends():
    """A worker's own handler (the initializer's) raises while a chunk of C calls runs: one
    item fails with its exception, and the worker answers (a loop in C had run past the
    chunk's end, appending failures for good)."""
    import signal

    with procpool.Pool(1, initializer=raise_on_sigusr1) as pool:
        # loaded first: the signal must not land while the worker unpickles the function and
        # its 4 MB string (it would fail the load, and so every item -- see the next test)
        assert pool.map(SLOW_TEXT.count, ["b"]) == [SLOW_TEXT.count("b")]
        res = pool.map_async(SLOW_TEXT.count, ["b"] * 150, chunksize=150)  # ≈ 0.3 s in C
        workers = pool._sched._workers.values()
        assert wait_until(lambda: any(w.read_progress()[0] for w in workers), 10)  # running
        procpool.signals.kill_pool(pool, signal.SIGUSR1)
        with pytest.raises(Stopped):
            res.get(15)
        assert pool.apply_async(identity, (1,)).get(10) == 1


def test_a_function_that_failed_to_unpickle_is_unpickled_again_by_the_next_task(tmp_path):
    """A failed unpickling of a task's function (a signal handler's exception, an import that
    failed for the moment) fails that task, and is not kept to fail every later one."""
    func = FlakyLoad(str(tmp_path / "loaded-once"))
    with procpool.Pool(1) as pool:
        with pytest.raises(SerializationError, match="function could not be unpickled") as info:
            pool.apply(func, (3,))
        assert isinstance(info.value.__cause__, ImportError) or "not yet" in str(info.value)
        assert pool.apply(func, (3,)) == 9
        assert pool.map(func, range(4)) == [0, 1, 4, 9]


def test_a_function_that_failed_to_unpickle_fails_one_call_of_a_batch_not_all(tmp_path):
    """Calls queued behind a busy worker travel to it as one CALLS record, each call a task of
    its own: a failed unpickling fails the call it ran for, and the next call unpickles the
    function again (the record's one load had failed all of them; found by a review)."""

    def outcome(result):
        try:
            return result.get(30)
        except SerializationError:
            return "failed"

    for trial in range(4):  # (whether the first load falls in a CALLS record is timing)
        func = FlakyLoad(str(tmp_path / f"loaded-once-{trial}"))
        with procpool.Pool(1) as pool:
            for i in range(20):  # the pool's estimate: short tasks (batched, sent as runs)
                assert pool.apply(square, (i,)) == i * i
            ahead = [pool.apply_async(square, (i,)) for i in range(300)]
            results = [pool.apply_async(func, (i,)) for i in range(16)]
            got = [outcome(r) for r in results]
            assert [r.get(30) for r in ahead] == [i * i for i in range(300)]
        assert got.count("failed") <= 1, got
        assert all(g == i * i for i, g in enumerate(got) if g != "failed"), got


def test_imap_input_error_reaches_the_caller_after_earlier_results(pool):
    def source():
        yield 1
        yield 2
        raise RuntimeError("input broke")

    it = pool.imap(square, source())
    assert next(it) == 1
    assert next(it) == 4
    with pytest.raises(RuntimeError, match="input broke"):
        next(it)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_a_fast_input_that_breaks_inside_a_run_keeps_every_item_read_before(pool, method):
    """A fast generator is read in runs (list.extend) while the dispatcher drains them; a
    run's items are counted at its end, those drained meanwhile included (counted short, the
    run would pass for the input's end), and the input's error comes after all of them."""

    def source(n):
        yield from range(n)
        raise RuntimeError("input broke")

    for n in (5000, 20_001):
        it = getattr(pool, method)(identity, source(n))
        got = [next(it) for _ in range(n)]
        assert sorted(got) == list(range(n))
        with pytest.raises(RuntimeError, match="input broke"):
            next(it)


def test_imap_reads_an_infinite_generator_lazily(pool):
    read = []

    def endless():
        n = 0
        while True:
            read.append(n)
            yield n
            n += 1

    it = pool.imap(identity, endless())
    assert [next(it) for _ in range(1000)] == list(range(1000))
    time.sleep(0.2)  # give the feeder every chance to run ahead; it must stay bounded
    assert len(read) < 1000 + 200_000


def test_apply_async_after_close_raises_value_error():
    pool = procpool.Pool(1)
    pool.close()
    with pytest.raises(ValueError):
        pool.apply_async(square, (1,))
    with pytest.raises(ValueError):
        pool.map(square, [1])
    pool.join()


def test_join_without_close_raises_value_error():
    with procpool.Pool(1) as pool:
        with pytest.raises(ValueError):
            pool.join()


def test_close_then_join_waits_for_queued_tasks():
    pool = procpool.Pool(2)
    results = [pool.apply_async(sleep_then, (0.1, i)) for i in range(6)]
    pool.close()
    pool.join()
    assert [r.get(0) for r in results] == list(range(6))


def test_terminate_fails_unfinished_tasks_promptly():
    pool = procpool.Pool(2)
    results = [pool.apply_async(sleep_then, (30, i)) for i in range(4)]
    started = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < 5
    for r in results:
        with pytest.raises(procpool.PoolTerminated):
            r.get(5)


def test_context_manager_terminates(pool):
    assert pool.apply(square, (3,)) == 9


def test_processes_argument_is_validated():
    with pytest.raises(ValueError):
        procpool.Pool(0)
    with pytest.raises(TypeError):
        procpool.Pool(1, initializer=3)
    for bad in (0, -1, 0.5, "12"):  # (0.5 and "12" raised TypeError; multiprocessing: ValueError)
        with pytest.raises(ValueError, match="maxtasksperchild"):
            procpool.Pool(1, maxtasksperchild=bad)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="retries"):
            procpool.Pool(1, retries=bad)
    with procpool.Pool(1) as pool:  # per call too (apply_async took retries=-1 silently)
        for call in (
            lambda: pool.apply_async(square, (1,), retries=-1),
            lambda: pool.schedule(square, (1,), retries=-1),
        ):
            with pytest.raises(ValueError, match="retries"):
                call()
        assert pool.apply_async(square, (3,), retries=2).get(10) == 9


def test_max_memory_per_child_and_timeout_refuse_what_is_no_number_of_bytes_or_seconds():
    # max_memory_per_child="2GB" was taken: every worker then died after its task (the
    # comparison raised in the worker), each result lost; -5 replaced it after every task.
    # timeout=True was a one-second limit ("exceeded its timeout of Trues")
    for bad, error in (("2GB", TypeError), (True, TypeError), (-5, ValueError), (0, ValueError)):
        with pytest.raises(error, match="max_memory_per_child"):
            procpool.Pool(1, max_memory_per_child=bad)
    for bad, error in ((True, TypeError), ("3", TypeError), (float("nan"), ValueError)):
        with pytest.raises(error, match="timeout"):
            procpool.Pool(1, timeout=bad)
    with procpool.Pool(1, max_memory_per_child=1.5e9) as pool:  # bytes as a float: taken
        assert pool.apply(square, (3,)) == 9
        with pytest.raises(TypeError, match="timeout"):
            pool.apply_async(square, (1,), timeout=True)


def test_a_nan_timeout_waits_no_time_as_the_standard_librarys_waits():
    # (a ValueError "Invalid value NaN" before, from the poll of the channel)
    with procpool.Pool(1) as pool:
        slow = pool.apply_async(time.sleep, (0.5,))
        assert slow.wait(float("nan")) is None
        with pytest.raises(multiprocessing.TimeoutError):
            slow.get(float("nan"))
        with pytest.raises(concurrent.futures.TimeoutError):
            pool.submit(time.sleep, 0.5).result(float("nan"))
        assert slow.get(10) is None
        pool.close()
        pool.join(float("nan"))  # returns at once
        pool.join(10)


def test_default_processes_is_the_cpu_count():
    with procpool.Pool() as pool:
        assert pool.processes == len(os.sched_getaffinity(0))  # the CPUs we may run on
        assert len(set(pool.map(pid, range(pool.processes * 4)))) >= 1


def test_initializer_runs_in_every_worker():
    with procpool.Pool(2, initializer=set_init_value, initargs=("ready",)) as pool:
        assert set(pool.map(get_init_value, range(8))) == {"ready"}


@pytest.mark.parametrize("cloudpickle_loaded", [False, True])
def test_a_classmethod_runs_against_the_workers_own_module_as_a_function_does(
    cloudpickle_loaded,
):
    # it went by value through cloudpickle, with a copy of its module's globals as the
    # parent had them, and its traceback said "<dynamic-code>" (CPython's concurrent.futures
    # tests, review); plain pickle, and cloudpickle once loaded, now send its class and name
    code = f"""if True:
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        if {cloudpickle_loaded}:
            import cloudpickle
        import procpool, tasks
        tasks.set_init_value("parent's")
        with procpool.Pool(1, initializer=tasks.set_init_value, initargs=("worker's",)) as p:
            print(p.apply(tasks.InitValue.get), p.submit(tasks.InitValue.get).result(30))
            print(p.map(tasks.InitValue.get, range(3)))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == [
        "worker's worker's",
        '["worker\'s", "worker\'s", "worker\'s"]',
    ]


def test_a_classmethod_over_a_callable_with_no_name_still_runs(pool):
    from tasks import PartialClassMethod

    # (its name was read unguarded: AttributeError before anything was sent: review)
    assert pool.apply(PartialClassMethod.get, (5,)) == ("plain", "PartialClassMethod", 5)


def test_maxtasksperchild_replaces_workers_without_losing_tasks():
    with procpool.Pool(2, maxtasksperchild=2) as pool:
        results = [pool.apply_async(pid) for _ in range(20)]
        pids = [r.get(10) for r in results]
        assert len(pids) == 20
        assert len(set(pids)) >= 5  # each worker served at most 2 tasks


def test_lambdas_and_closures_work_as_tasks(pool):
    offset = 10
    assert pool.apply(lambda x: x + offset, (1,)) == 11
    assert pool.map(lambda x: x * offset, range(3)) == [0, 10, 20]

    def local(x):
        return x - offset

    assert pool.submit(local, 15).result(10) == 5


def test_many_threads_submit_at_once(pool):
    out: dict[int, int] = {}

    def worker(k):
        out[k] = sum(pool.apply(square, (i,)) for i in range(50))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {k: sum(i * i for i in range(50)) for k in range(4)}


def test_import_procpool_as_multiprocessing_has_the_tutorials_names():
    import procpool as mp

    for name in (
        "Pool",
        "Process",
        "current_process",
        "cpu_count",
        "Pipe",
        "Queue",
        "Value",
        "Array",
        "Lock",
        "Semaphore",
        "Event",
        "TimeoutError",
    ):
        assert hasattr(mp, name), name


def test_several_threads_waiting_on_one_result_all_get_it():
    """Only one of them reads the worker's channel (Scheduler.drive); the others wait on the
    result (before: the second one's poll() raised RuntimeError('concurrent poll() invocation'))."""
    with procpool.Pool(1) as pool:
        assert pool.apply(square, (2,)) == 4  # the function is known: the idle quick paths
        for _ in range(3):
            result = pool.apply_async(sleep_then, (0.2, "x"))
            out = []
            threads = [
                threading.Thread(target=lambda r=result, o=out: o.append(r.get(10)))
                for _ in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert out == ["x"] * 4


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_procpool_ipc_objects_reach_the_workers_through_initargs(method):
    # the textbook way to share a lock, a counter, a queue with a pool's workers; the
    # descriptors they carry went nowhere (every worker failed to start) and leaked
    lock, counter, q = procpool.Lock(), procpool.Value("i", 0), procpool.Queue()
    with procpool.Pool(2, keep_shared, (lock, counter, q), start_method=method) as pool:
        assert pool.map(use_shared, range(10)) == list(range(10))
    assert counter.value == 10
    assert sorted(q.get(timeout=10) for _ in range(10)) == list(range(10))
    q.close()


def test_a_multiprocessing_value_in_initargs_is_inherited_by_forked_workers():
    # multiprocessing hands initargs to forked workers by inheritance: its Value and Lock,
    # which refuse pickling, work there, and so after swapping in procpool.Pool
    counter = multiprocessing.Value("i", 0)
    with procpool.Pool(2, keep_shared, (counter.get_lock(), counter)) as pool:
        assert pool.map(use_shared, range(10)) == list(range(10))
    assert counter.value == 10


@pytest.mark.parametrize("lib", [multiprocessing, procpool], ids=["multiprocessing", "procpool"])
def test_a_callback_has_run_once_its_result_is_ready(lib):
    # as in multiprocessing: what a callback collects is there when wait() or get() returns
    collected = []

    def slow_append(value):
        time.sleep(0.2)
        collected.append(value)

    with lib.Pool(2) as pool:
        r = pool.map_async(square, [1, 2, 3], callback=slow_append)
        r.wait(10)
        assert r.ready() and collected == [[1, 4, 9]]
        r = pool.apply_async(square, (4,), callback=slow_append)
        assert r.get(10) == 16 and collected[-1] == 16
        r = pool.apply_async(fail, ("boom",), error_callback=slow_append)
        r.wait(10)
        assert r.ready() and isinstance(collected[-1], ValueError)


def worker_identity(_=None):
    import multiprocessing as mp

    parent = mp.parent_process()
    return (
        mp.current_process().name,
        parent.pid if parent else None,
        parent.is_alive() if parent else None,
        [c.pid for c in mp.active_children()],
        mp.get_context("fork").Process(target=abs).name,  # (its first child's name)
    )


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_worker_is_a_pool_worker_for_multiprocessing(method):
    # current_process() was the parent's MainProcess in a forked worker (and its children
    # were the worker's): a script guarded by `current_process().name == "MainProcess"` ran
    # its pool again in every spawned worker
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(5,))
    child.start()
    try:
        with procpool.Pool(1, start_method=method) as pool:
            name, parent, alive, children, child_name = pool.apply(worker_identity)
    finally:
        child.terminate()
        child.join()
    prefix = {"fork": "ForkPoolWorker-", "spawn": "SpawnPoolWorker-"}.get(
        method, "ForkServerPoolWorker-"
    )
    assert name.startswith(prefix) and name != "MainProcess"
    assert parent == os.getpid() and alive  # (the pool's process, also behind a fork server)
    assert children == []
    assert child_name == f"ForkProcess-{name.rsplit('-', 1)[1]}:1"  # (its own count, from 1)


def test_initargs_with_more_descriptors_than_a_frame_holds_are_refused_at_once():
    # 250 descriptors plus the progress slot's: every worker died at start (3 in a row)
    pipes = [procpool.Pipe() for _ in range(125)]
    try:
        for method in ("spawn", "forkserver"):
            before = set(child_processes())
            with pytest.raises(ValueError, match="at most 249"):
                procpool.Pool(1, identity, (pipes,), start_method=method)
            assert wait_until(lambda b=before: set(child_processes()) <= b, 10)  # (no server)
        with procpool.Pool(
            1, keep_shared, (procpool.Lock(), procpool.Value("i", 0)), start_method="spawn"
        ) as pool:
            assert pool.apply(identity, (5,)) == 5
    finally:
        for a, b in pipes:
            a.close()
            b.close()


def slow_start(seconds):
    time.sleep(seconds)


def test_force_cancelling_tasks_of_a_starting_worker_does_not_break_the_pool():
    # the pool's own kills of workers still starting counted as deaths from outside: ten
    # force-cancels broke the pool ("the out-of-memory killer?")
    with procpool.Pool(1, slow_start, (0.3,)) as pool:
        for _ in range(12):
            r = pool.apply_async(sleep_then, (5,))
            assert wait_until(lambda r=r: r._task is not None and r._task.worker is not None, 10)
            r.cancel(force=True)  # (sent to the worker still starting: its worker is killed)
        assert pool.apply(square, (7,)) == 49


def _long_if_none(x, release):
    if x is None:
        return release.wait(60)
    time.sleep(x)
    return x


def _star_long_if_none(args):
    return _long_if_none(*args)


def test_a_map_of_chunksize_1_does_not_queue_items_behind_its_first_long_item():
    # the pool's estimate came from earlier tiny tasks: the map's first round sent a busy
    # worker several items behind its long first one, while the other worker went idle
    # (review: map(slow, [3.0] + [0.3] * 10, 1) took 4.5 s, multiprocessing's 3.0 s).  Now a
    # busy worker takes no chunk of a map none of whose chunks came back, nor any once its
    # task has run far past the estimate.  (Items far shorter than a round trip can still
    # queue one behind the other in that first instant: see guarantees.md)
    release = procpool.Event()
    with procpool.Pool(2) as pool:
        try:
            assert pool.map(abs, range(3000), 1) == list(range(3000))
            items = [(None, release)] + [(0.02, release)] * 20
            it = pool.imap_unordered(_star_long_if_none, items, 1)
            assert [it.next(30) for _ in range(20)] == [0.02] * 20
        finally:
            release.set()
        assert it.next(30) is True


def test_numpy_integers_and_what_scripts_read_of_a_multiprocessing_pool():
    # numpy's integers were refused as processes and chunksize ("must be at least 1"); _state,
    # _processes and multiprocessing.pool.ThreadPool were missing; pickling a pool said
    # "cannot pickle '_thread.RLock'" (review)
    import pickle

    import numpy as np

    with procpool.Pool(np.int64(2)) as pool:
        assert pool._processes == 2 and pool._state == "RUN"
        assert pool.map(abs, [-1, -2, -3], chunksize=np.int64(2)) == [1, 2, 3]
        assert list(pool.imap(abs, [-1, -2], np.int32(1))) == [1, 2]
        with pytest.raises(NotImplementedError, match="cannot be passed"):
            pickle.dumps(pool)
        pool.close()
        assert pool._state == "CLOSE"
    with pytest.raises(TypeError):
        procpool.Pool(2.0)
    with pytest.raises(ValueError, match="Chunksize"):
        procpool.Pool(1).map(abs, [1], chunksize=1.5)
    assert procpool.pool.ThreadPool is multiprocessing.pool.ThreadPool


def test_a_callable_object_or_partial_changed_between_calls_runs_as_it_is_now(pool):
    # they were pickled once and cached by identity: a changed one ran as it first was
    import functools

    from tasks import Scale, add

    scale = Scale(2)
    assert pool.map(scale, [1, 2, 3]) == [2, 4, 6]
    scale.k = 10
    assert pool.map(scale, [1, 2, 3]) == [10, 20, 30]
    assert pool.apply(scale, (5,)) == 50
    part = functools.partial(add, b=0)
    assert pool.apply(part, (1,)) == 1
    part.keywords["b"] = 100  # (a partial's keywords are a dict: it can change)
    assert pool.apply(part, (1,)) == 101
    assert [pool.apply_async(part, (i,)).get(10) for i in range(3)] == [100, 101, 102]


def test_a_bound_builtin_method_whose_object_changed_runs_on_the_object_as_it_is_now(pool):
    table = {1: "old"}
    assert pool.map(table.get, [1]) == ["old"]
    table[1] = "new"
    assert pool.map(table.get, [1]) == ["new"]
    assert pool.map(abs, [-1]) == [1]  # (a module's builtin: cached by identity)


def test_a_running_pool_collected_in_a_reference_cycle_warns_too():
    # the collector runs the pool's finalizer (terminate) before its __del__, which looked
    # at the pool's state and said nothing (review)
    import warnings

    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        pool = procpool.Pool(1)
        pids = set(pool.pids())
        pool.cycle = pool
        del pool
        gc.collect()
        said = [w for w in log if issubclass(w.category, ResourceWarning)]
        assert len(said) == 1 and "unclosed running procpool pool" in str(said[0].message)
        assert wait_until(lambda: not pids & set(child_processes()), 10), child_processes()
        executor = procpool.ProcessPoolExecutor(1)  # (closed by its own finalizer: silent,
        executor.cycle = executor  # as the standard library's)
        del executor
        gc.collect()
        assert [w for w in log if issubclass(w.category, ResourceWarning)] == said


def test_a_pool_whose_start_is_interrupted_stops_at_once_and_warns_of_nothing(monkeypatch):
    # a Ctrl-C in Pool() left its workers running until the half-made pool was collected,
    # which then warned of an unclosed pool the caller never had (review)
    import warnings

    from procpool._scheduler import Scheduler

    started = Scheduler.wait_started

    def interrupted(self):
        started(self)
        raise KeyboardInterrupt

    before = set(child_processes())
    monkeypatch.setattr(Scheduler, "wait_started", interrupted)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt) as info:
            procpool.Pool(2)
        # (the half-made pool lives on in the traceback's frames: nothing collects it)
        assert wait_until(lambda: set(child_processes()) <= before, 10), child_processes()
        del info
        gc.collect()
        assert not [w for w in log if issubclass(w.category, ResourceWarning)]


def test_a_running_pool_dropped_warns_with_a_resource_warning_and_is_still_terminated():
    """As multiprocessing's, a running pool dropped says so (ResourceWarning) -- and is
    terminated all the same while the warning is kept: with the pool as the warning's
    source, a recorded warning held it, and its workers lived on (review)."""
    import warnings

    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        pool = procpool.Pool(1)
        pids = set(pool.pids())
        del pool
        gc.collect()
        said = [w for w in log if issubclass(w.category, ResourceWarning)]
        assert len(said) == 1 and "unclosed running procpool pool" in str(said[0].message)
        assert wait_until(lambda: not pids & set(child_processes()), 10), child_processes()
        with procpool.Pool(1) as pool:  # closed: nothing to say
            pass
        del pool
        gc.collect()
        assert [w for w in log if issubclass(w.category, ResourceWarning)] == said


@pytest.mark.parametrize(
    "call",
    [
        lambda pool, i: pool.apply(square, (i,)),
        lambda pool, i: pool.apply(add, (i,), {"b": 1}),
        lambda pool, i: pool.apply_async(square, (i,)).get(10),
        lambda pool, i: pool.submit(square, i).result(10),
        lambda pool, i: pool.map(square, [i, i]),
        lambda pool, i: list(pool.imap(square, [i, i])),
    ],
    ids=["apply", "apply-kwds", "apply_async", "submit", "map", "imap"],
)
def test_a_finished_call_leaves_no_reference_cycle_for_the_collector(pool, call):
    """Each call's objects are freed by their reference counts as it returns: an apply's
    result and task kept each other alive, so the collector ran every few hundred calls
    and took ≈ 140 µs out of one of them (apply's p99)."""
    for i in range(20):  # warm: the function known to every worker, the caches filled
        call(pool, i)
    gc.collect()
    gc.disable()
    try:
        for i in range(300):
            call(pool, i)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 100, f"{found} objects in cycles after 300 calls"
