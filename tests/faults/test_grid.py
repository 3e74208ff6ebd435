"""The fault grid (issue 4): every kind of fault at every point of a task's trip, per start method.

Fault kinds (``grid_tasks.fire``): ``sigkill``, ``sigterm``, ``os_exit`` (``os._exit(3)``),
``segfault`` (``ctypes.string_at(0)``), ``abort`` (``os.abort()``) -- the five *deaths* -- and
``system_exit`` (``SystemExit(7)``), ``keyboard_interrupt``, ``error`` (a plain ``ValueError``
subclass, the reference row) -- the three *raises*.

Fault points, and what the caller must get (``get(timeout=...)``, never unbounded):

======  ==============================================  ===================================  =================================
point   where the fault fires                          deaths (5 kinds)                      raises (3 kinds)
======  ==============================================  ===================================  =================================
1       worker unpickles the task's *arguments*        WorkerLostError "while running",      SerializationError ("arguments
        (``ArgBomb.__reduce__``)                        naming the signal / exit code         could not be unpickled"); the
                                                                                              worker survives
1f      worker unpickles the task's *function*         WorkerLostError, after exactly one    SerializationError ("function
        (``FuncBomb``; sent in its own FUNC frame)      worker died (retries=0)               could not be unpickled")
2       the task runs (``run_fault``)                  WorkerLostError "while running"       the same exception type
                                                                                              (SystemExit code 7 ...); the
                                                                                              worker survives
3       worker pickles the result                      WorkerLostError "while running"       SerializationError (or the
        (``ResultBomb.__reduce__``)                                                           raised type); the worker survives
4       worker is writing a result whose pickle is     the whole result, or WorkerLostError  --  (a raise in a thread kills
        24 MiB in band (``str`` / list of 64 KiB        "after running" with result_lost      only that thread: not a fault
        ``bytes``), fired by a watcher thread as soon                                         of the task)
        as the main thread is inside ``send_frame``
5       the *parent* unpickles the result              --  (the parent is not killed here;   SerializationError ("could not
        (``ParentBomb``: raises only outside the       see test_parent_death.py)             be unpickled"); for a task
        worker that made it) -- via ``apply_async``,                                          *exception* that cannot be
        ``apply``, ``map`` (delivered by the I/O                                              rebuilt: RemoteError; the
        thread), and a task exception                                                         worker survives
======  ==============================================  ===================================  =================================

Every cell runs for ``fork``, ``forkserver`` and ``spawn`` and then checks that the pool serves
the next task (``apply_async(...).get(timeout)`` and ``apply``) and that nothing is left over:
the process tree below the test is exactly the pool's workers (plus the fork server), with no
zombie; the parent's descriptors (by kind: sockets, pidfds, memfds...) and threads are back to
what they were; no new ``/dev/shm`` entry (per cell: none that appeared during the cell, as other
jobs share the machine's ``/dev/shm``).  Cells share one warmed-up pool per start method
(module-scoped); that pool is finally closed and joined (bounded) and the full leak check
(processes, zombies, fds, ``/dev/shm``, threads) runs against the state before it was created.
Cells that need their own pool (1f, close(), all workers killed at once) use ``leak_check``.

Also: a worker killed during ``close()`` (its task fails with WorkerLostError, a task queued
behind it still runs, ``join()`` returns within a bound); all workers killed at once during a
``map`` (the map raises WorkerLostError; with ``retries=1`` it completes).

Cells marked ``xfail(reason="BUG: ...")`` are procpool bugs found by this grid and not fixed yet;
the comments "Regression test: before 34f8dc8 ..." name bugs it found that are fixed.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import signal
import threading
import time

import cloudpickle
import pytest
from conftest import LeakSnapshot, proc_stat, wait_until

import procpool

from . import grid_tasks as g
from . import helpers as h
from .helpers import START_METHODS

GET_TIMEOUT = 20.0  # a defined error arrives in milliseconds; this only turns a hang into a failure
SETTLE = 10.0  # replacements (spawn: a fresh interpreter) and reaping, on a noisy 2-core machine
BIG = 24 << 20  # point 4: bytes of in-band pickle, ~100x the socket buffer
JOIN_BOUND = 10.0  # close(): idle workers exit in milliseconds once told to

pytestmark = pytest.mark.timeout(120)

DEATHS = list(g.DEATHS)
RAISES = list(g.RAISES)
KINDS = DEATHS + RAISES


# ====================================================================== what the process looks like
def tree() -> dict[int, str]:
    """Every process below this one (zombies included): pid -> state."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                procs[int(name)] = (st[0], st[1])
    found, frontier = {}, {os.getpid()}
    while frontier:
        nxt = {p for p, (_, pp) in procs.items() if pp in frontier and p not in found}
        for p in nxt:
            found[p] = procs[p][0]
        frontier = nxt
    return found


def fd_kinds() -> collections.Counter:
    """The parent's open descriptors, by kind ('socket', 'anon_inode:[pidfd]', '/memfd:...')."""
    kinds = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        kinds[re.sub(r"\[\d+\]$|:\[\d+\]$| \(deleted\)$", "", target)] += 1
    return kinds


def threads_now() -> set[threading.Thread]:
    return set(threading.enumerate())


def settle(check, what: str, timeout: float = SETTLE) -> None:
    """Poll *check* (returns a description of what is wrong, or '' when fine) with a deadline."""
    last = ""

    def ok():
        nonlocal last
        last = check()
        return not last

    assert wait_until(ok, timeout, interval=0.01), f"{what} after {timeout}s: {last}"


def warm_up(pool: procpool.Pool) -> None:
    """Run one task on every worker so that all are started and READY."""

    def all_reached():
        got = set(pool.map_async(h.pid_after, [0.05] * pool.processes, chunksize=1).get(30))
        return got == set(pool.pids())

    assert wait_until(all_reached, 60, interval=0.0), "could not reach every worker"


def join_within(pool: procpool.Pool, seconds: float) -> bool:
    """``pool.join()`` (no timeout of its own) in a helper thread; True if it returned in time."""
    joiner = threading.Thread(target=pool.join, name="grid-joiner", daemon=True)
    joiner.start()
    joiner.join(seconds)
    return not joiner.is_alive()


# ====================================================================== the shared pool
class Shared:
    """A warmed-up pool and the state the process should return to after every cell."""

    def __init__(self, pool: procpool.Pool) -> None:
        self.pool = pool
        warm_up(pool)
        self.helpers = set(tree()) - set(pool.pids())  # the fork server, if any
        self.fds = fd_kinds()
        self.threads = threads_now()
        self.shm = LeakSnapshot()  # only its /dev/shm part is used per cell
        self.cell_start = time.time()

    def begin(self) -> set[int]:
        """A cell starts: remember when, return the workers' pids."""
        self.cell_start = time.time()
        return self.pids()

    def pids(self) -> set[int]:
        return set(self.pool.pids())

    def new_shm(self) -> list[str]:
        """/dev/shm entries that appeared during this cell and that no other process uses.
        (Other jobs share this machine's /dev/shm: an entry older than the cell is not ours; the
        full check against the state before the pool runs when the pool is closed.)"""
        found = []
        for name in self.shm.leftovers().get("/dev/shm entries", []):
            try:
                if os.stat(f"/dev/shm/{name}").st_ctime >= self.cell_start - 1.0:
                    found.append(name)
            except FileNotFoundError:
                pass
        return found

    def serves(self) -> None:
        """The pool runs the next task: bounded first, then through ``apply``."""
        assert self.pool.apply_async(g.square, (7,)).get(timeout=GET_TIMEOUT) == 49
        assert self.pool.apply(g.square, (6,)) == 36

    def wait_replaced(self, dead: int) -> None:
        def check():
            pids = self.pids()
            if dead in pids or len(pids) != self.pool.processes:
                return f"workers {sorted(pids)} (dead: {dead})"
            return ""

        settle(check, "the dead worker was not replaced")

    def clean(self) -> None:
        """Nothing left over by the cell: processes, zombies, fds, threads, /dev/shm."""

        def check():
            procs = tree()
            expected = self.pids() | self.helpers
            zombies = {p: s for p, s in procs.items() if s in ("Z", "X", "x")}
            if zombies:
                return f"zombies {zombies}"
            if set(procs) != expected:
                return f"processes {sorted(procs)} != workers+server {sorted(expected)}"
            fds = fd_kinds()
            if fds != self.fds:
                return f"descriptors changed: +{fds - self.fds} -{self.fds - fds}"
            threads = threads_now()
            if threads != self.threads:
                return f"threads changed: +{threads - self.threads} -{self.threads - threads}"
            shm = self.new_shm()
            return f"/dev/shm entries {shm}" if shm else ""

        settle(check, "left over")


@pytest.fixture(scope="module", params=START_METHODS)
def method(request):
    return request.param


@pytest.fixture(scope="module")
def shared(method):
    before = LeakSnapshot()
    threads_before = threads_now()
    pool = procpool.Pool(2, start_method=method)
    joined = False
    try:
        state = Shared(pool)
        yield state
        pool.close()  # the graceful end, after every fault this pool went through
        joined = join_within(pool, 30)
    finally:
        pool.terminate()
        pool.join(10)
    assert joined, "close(); join() did not return within 30s"
    before.assert_clean()
    settle(
        lambda: "" if threads_now() == threads_before else f"{threads_now() - threads_before}",
        "threads left after the pool was joined",
    )


@pytest.fixture
def fresh(method, leak_check):
    """Make pools of this start method; terminated, joined and leak-checked (threads too)."""
    threads_before = threads_now()
    pools: list[procpool.Pool] = []

    def make(processes: int = 2, **kwds) -> procpool.Pool:
        pool = procpool.Pool(processes, start_method=method, **kwds)
        pools.append(pool)
        warm_up(pool)
        return pool

    yield make
    for pool in pools:
        pool.terminate()
        assert join_within(pool, 30), "join() after terminate() did not return within 30s"
    leak_check.assert_clean()
    settle(
        lambda: "" if threads_now() == threads_before else f"{threads_now() - threads_before}",
        "threads left after the pool was joined",
    )


# ====================================================================== outcome checks
def outcome(result) -> BaseException:
    """The error the caller gets, within GET_TIMEOUT (a result or a timeout fails the cell)."""
    try:
        value = result.get(timeout=GET_TIMEOUT)
    except procpool.TimeoutError:
        pytest.fail(f"no defined outcome within {GET_TIMEOUT}s (a hang)")
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are outcomes here
        return exc
    pytest.fail(f"the fault produced no error: returned {value!r}")


def dead_pid_of(exc: BaseException) -> int:
    found = re.search(r"worker pid (\d+)", str(exc))
    assert found, str(exc)
    return int(found.group(1))


def assert_lost(exc: BaseException, kind: str, func: str, when: str) -> int:
    """*exc* is WorkerLostError naming the signal / exit code, the task and when; its pid."""
    how, code = g.DEATHS[kind]
    assert isinstance(exc, procpool.WorkerLostError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert how in message and func in message and when in message, message
    assert exc.exitcode == code, (exc.exitcode, message)
    assert exc.result_lost == (when == "after running"), message
    return dead_pid_of(exc)


def death_cell(shared: Shared, exc: BaseException, kind: str, func: str, when: str, before):
    dead = assert_lost(exc, kind, func, when)
    assert dead in before, (dead, before)
    shared.wait_replaced(dead)
    shared.serves()
    shared.clean()


def survivor_cell(shared: Shared, before) -> None:
    assert shared.pids() == before, "the worker died of an exception"
    shared.serves()
    shared.clean()


def raised_text(kind: str) -> str:
    return {
        "system_exit": "SystemExit(7)",
        "keyboard_interrupt": "KeyboardInterrupt",
        "error": "GridError",
    }[kind]


# ====================================================================== sanity of the bombs
@pytest.mark.parametrize("kind", KINDS)
def test_bombs_do_not_fire_in_the_process_that_made_them(kind):
    """Pickling a bomb calls nothing; unpickling it where it was made defuses it -- so the test
    process (the pool's parent, which pickles arguments and functions) is never hit."""
    assert isinstance(pickle.loads(pickle.dumps(g.ArgBomb(kind))), g.Defused)
    func = g.FuncBomb(kind, "")
    assert isinstance(cloudpickle.loads(cloudpickle.dumps(func)), g.Defused)  # procpool's way
    made_elsewhere = g.ResultBomb(kind)
    made_elsewhere.home = -1
    assert isinstance(pickle.loads(pickle.dumps(made_elsewhere)), g.Defused)
    assert isinstance(pickle.loads(pickle.dumps(g.ParentBomb(kind))), g.Defused)


# ====================================================================== point 1: unpickling args
@pytest.mark.parametrize("kind", KINDS)
def test_point1_fault_while_worker_unpickles_arguments(shared, kind):
    before = shared.begin()
    exc = outcome(shared.pool.apply_async(g.takes_arg, (g.ArgBomb(kind),)))
    if kind in g.DEATHS:
        death_cell(shared, exc, kind, "takes_arg", "while running", before)
    else:
        assert isinstance(exc, procpool.SerializationError), f"{type(exc).__name__}: {exc}"
        assert "arguments could not be unpickled" in str(exc), str(exc)
        assert raised_text(kind) in str(exc), str(exc)
        survivor_cell(shared, before)


# ====================================================================== point 1f: the function
# Regression test: before 34f8dc8 a function whose unpickling killed the worker was re-sent
# forever (the death came before the progress slot's "running" mark: ~1000 forks in 4 s).
@pytest.mark.parametrize("kind", KINDS)
def test_point1f_fault_while_worker_unpickles_the_function(fresh, kind, tmp_path):
    pool = fresh(1)
    before = set(pool.pids())
    counter = str(tmp_path / "victims")
    result = pool.apply_async(g.FuncBomb(kind, counter), ("x",))

    def victims() -> int:
        try:
            with open(counter) as f:
                return len(f.read().split())
        except FileNotFoundError:
            return 0

    # a defined outcome, or proof there will be none: the task killed a third worker
    wait_until(lambda: result.ready() or victims() >= 3, GET_TIMEOUT)
    assert result.ready(), (
        f"no outcome; the task was sent again and again: {victims()} workers died unpickling "
        f"its function (retries=0)"
    )
    exc = outcome(result)
    if kind in g.DEATHS:
        dead = assert_lost(exc, kind, "FuncBomb", "while running")
        assert dead in before and victims() == 1
        settle(
            lambda: "" if len(pool.pids()) == 1 and dead not in pool.pids() else "waiting",
            "the dead worker was not replaced",
        )
    else:
        assert isinstance(exc, procpool.SerializationError), f"{type(exc).__name__}: {exc}"
        assert "function could not be unpickled" in str(exc), str(exc)
        assert raised_text(kind) in str(exc), str(exc)
        assert set(pool.pids()) == before
    assert pool.apply_async(g.square, (7,)).get(timeout=GET_TIMEOUT) == 49
    assert pool.apply(g.square, (6,)) == 36


# ====================================================================== point 2: running
@pytest.mark.parametrize("kind", KINDS)
def test_point2_fault_while_task_runs(shared, kind):
    before = shared.begin()
    exc = outcome(shared.pool.apply_async(g.run_fault, (kind,)))
    if kind in g.DEATHS:
        death_cell(shared, exc, kind, "run_fault", "while running", before)
    else:
        assert type(exc) is g.RAISES[kind], f"{type(exc).__name__}: {exc}"
        assert isinstance(exc.__cause__, procpool.RemoteTraceback)
        if kind == "system_exit":
            assert exc.code == 7
        survivor_cell(shared, before)


# ====================================================================== point 3: pickling the result
# Regression test: before 34f8dc8 a SystemExit/KeyboardInterrupt raised while the worker pickled
# a result escaped _worker.main and killed the worker (WorkerLostError "exited with code 1").
@pytest.mark.parametrize("kind", KINDS)
def test_point3_fault_while_worker_pickles_the_result(shared, kind):
    before = shared.begin()
    exc = outcome(shared.pool.apply_async(g.return_result_bomb, (kind,)))
    if kind in g.DEATHS:
        death_cell(shared, exc, kind, "return_result_bomb", "while running", before)
    else:
        # "the return value cannot be pickled: SerializationError for that task"; a task's
        # SystemExit/KeyboardInterrupt fails only that task, the worker survives
        assert isinstance(exc, (procpool.SerializationError, g.RAISES[kind])), (
            f"{type(exc).__name__}: {exc}"
        )
        survivor_cell(shared, before)


# ====================================================================== point 4: mid-write
@pytest.mark.parametrize(
    "kind,shape", [(k, "str") for k in DEATHS] + [("sigkill", "list"), ("segfault", "list")]
)
def test_point4_fault_while_worker_writes_a_large_result(shared, kind, shape, tmp_path):
    """The watcher thread fires while the worker's main thread is in ``send_frame`` (or not at
    all, if the write finished first): the caller gets the whole result or WorkerLostError
    ("after running", result_lost) -- never a truncated value, a hang or a broken pool."""
    before = shared.begin()
    marker = str(tmp_path / "marker")
    result = shared.pool.apply_async(g.big_result_then_fault, (kind, BIG, shape, marker))
    try:
        value = result.get(timeout=GET_TIMEOUT)
    except procpool.TimeoutError:
        pytest.fail(f"no defined outcome within {GET_TIMEOUT}s (a hang)")
    except procpool.WorkerLostError as exc:
        assert os.path.exists(marker), "a worker died that was not told to"
        death_cell(shared, exc, kind, "big_result_then_fault", "after running", before)
        return
    # the write won the race: the value is whole and the worker was left alone
    if shape == "str":
        assert len(value) == BIG and value[:1] == value[-1:] == "x"
    else:
        assert len(value) == BIG // 65536 and all(len(b) == 65536 for b in value)
    assert wait_until(lambda: os.path.exists(marker), SETTLE)
    with open(marker) as f:
        assert f.read() == "missed"
    survivor_cell(shared, before)


# ====================================================================== point 5: parent unpickles
@pytest.mark.parametrize("kind", RAISES)
@pytest.mark.parametrize("via", ["apply_async", "apply", "map"])
def test_point5_result_that_cannot_be_rebuilt_in_the_parent(shared, kind, via):
    before = shared.begin()
    pool = shared.pool
    if via == "apply_async":
        exc = outcome(pool.apply_async(g.return_parent_bomb, (kind,)))
    elif via == "apply":  # the caller's own thread reads and unpickles the reply (drive)
        with pytest.raises(procpool.SerializationError) as info:
            pool.apply(g.return_parent_bomb, (kind,))
        exc = info.value
    else:  # map: chunks are delivered by the I/O thread
        items = [(i, kind, 5) for i in range(12)]
        exc = outcome(pool.starmap_async(g.parent_bomb_at, items, chunksize=1))
    assert isinstance(exc, procpool.SerializationError), f"{type(exc).__name__}: {exc}"
    assert "could not be unpickled" in str(exc) and raised_text(kind) in str(exc), str(exc)
    assert isinstance(exc.__cause__, g.RAISES[kind])
    survivor_cell(shared, before)


@pytest.mark.parametrize("kind", RAISES)
def test_point5_task_exception_that_cannot_be_rebuilt_in_the_parent(shared, kind):
    before = shared.begin()
    exc = outcome(shared.pool.apply_async(g.raise_parent_bomb_error, (kind,)))
    assert isinstance(exc, procpool.RemoteError), f"{type(exc).__name__}: {exc}"
    assert exc.type_name == "faults.grid_tasks.ParentBombError", exc.type_name
    assert "raised by the task" in str(exc) and raised_text(kind) in str(exc), str(exc)
    assert isinstance(exc.__cause__, procpool.RemoteTraceback)
    survivor_cell(shared, before)


# ====================================================================== close() and mass deaths
# Found by this grid: Scheduler.drive's `finally` woke the I/O thread after it had FINISHED and
# closed its eventfd (get() after close() raised OSError(EBADF) about 1 run in 10). Fixed: _wake()
# is a no-op once FINISHED. The cells below are its regression tests.


def wait_pid_file(path, timeout: float = SETTLE) -> int:
    assert wait_until(path.exists, timeout), f"the task did not start within {timeout}s"
    return int(path.read_text())


def test_worker_killed_during_close(fresh, tmp_path):
    """close() while a task runs, then SIGKILL its worker: the task fails with WorkerLostError,
    join() returns within a bound, nothing is left."""
    pool = fresh(2)
    flag = tmp_path / "started"
    result = pool.apply_async(h.announce_then_sleep, (str(flag), 60.0))
    victim = wait_pid_file(flag)
    pool.close()
    os.kill(victim, signal.SIGKILL)
    exc = outcome(result)
    assert dead_pid_of(exc) == victim
    assert_lost(exc, "sigkill", "announce_then_sleep", "while running")
    assert join_within(pool, JOIN_BOUND), f"join() did not return within {JOIN_BOUND}s"
    with pytest.raises(ValueError):
        pool.apply_async(g.square, (1,))


# Regression test: before 34f8dc8, apply_async(f); close(); get(); join() hung forever (the
# result read by the caller's thread in Scheduler.drive never woke the I/O thread).
@pytest.mark.parametrize("order", ["join_then_get", "get_then_join"])
def test_worker_killed_during_close_with_a_task_queued_behind(fresh, tmp_path, order):
    """The same with one worker and a second task waiting: the running one fails, the queued one
    runs on a replacement (close() lets queued work finish), and join() returns -- whether the
    caller joins before or after collecting the queued task's result."""
    pool = fresh(1)
    flag = tmp_path / "started"
    running = pool.apply_async(h.announce_then_sleep, (str(flag), 60.0))
    queued = pool.apply_async(g.square, (5,))
    victim = wait_pid_file(flag)
    pool.close()
    os.kill(victim, signal.SIGKILL)
    assert_lost(outcome(running), "sigkill", "announce_then_sleep", "while running")
    if order == "get_then_join":
        assert queued.get(timeout=GET_TIMEOUT) == 25
    assert join_within(pool, JOIN_BOUND), f"join() did not return within {JOIN_BOUND}s"
    assert queued.get(timeout=GET_TIMEOUT) == 25


def _kill_all_workers_mid_map(pool: procpool.Pool, tmp_path) -> tuple[procpool.MapResult, set]:
    """Start a map of 6 half-second items; once every worker is inside an item, SIGKILL all."""
    items = [(str(tmp_path), i, 0.5) for i in range(6)]
    result = pool.starmap_async(g.mark_and_sleep, items, chunksize=1)
    workers = set(pool.pids())

    def busy():
        running = {int(n.split("-")[1]) for n in os.listdir(tmp_path) if "tmp" not in n}
        return running if running >= workers else None

    running = wait_until(busy, SETTLE)
    assert running, f"not every worker started an item: {os.listdir(tmp_path)}"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    return result, workers


def test_all_workers_killed_at_once_during_map(fresh, tmp_path):
    pool = fresh(2)
    result, victims = _kill_all_workers_mid_map(pool, tmp_path)
    exc = outcome(result)
    assert isinstance(exc, procpool.WorkerLostError), f"{type(exc).__name__}: {exc}"
    assert "was killed by signal 9 (SIGKILL)" in str(exc) and "of starmap(mark_and_sleep)" in str(
        exc
    ), str(exc)
    assert dead_pid_of(exc) in victims
    settle(
        lambda: "" if not set(pool.pids()) & victims and len(pool.pids()) == 2 else "waiting",
        "the workers were not replaced",
    )
    assert pool.apply_async(g.square, (7,)).get(timeout=GET_TIMEOUT) == 49
    assert pool.apply(g.square, (6,)) == 36


def test_all_workers_killed_at_once_during_map_with_retries(fresh, tmp_path):
    pool = fresh(2, retries=1)
    result, victims = _kill_all_workers_mid_map(pool, tmp_path)
    assert result.get(timeout=GET_TIMEOUT) == [i * i for i in range(6)]
    assert not set(pool.pids()) & victims
    assert pool.apply_async(g.square, (7,)).get(timeout=GET_TIMEOUT) == 49
    assert pool.apply(g.square, (6,)) == 36
