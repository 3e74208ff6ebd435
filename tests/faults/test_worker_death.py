"""A worker that dies -- SIGKILL, a real segfault, ``os._exit``, ``abort`` -- idle or mid-task.

Promise under test (DESIGN.md, first row of the table): the task(s) that worker held fail with
:class:`procpool.WorkerLostError`, whose message names the exit code or signal and the task; the
worker is replaced; tasks on other workers complete; the pool goes on serving.  An idle worker's
death is invisible to the caller.  Every test runs for the three start methods.

The OOM killer kills with SIGKILL, exactly like ``os.kill(pid, SIGKILL)``: the SIGKILL cases here
(a task killing itself, and the test killing a worker from outside) stand for OOM kills -- we do
not trigger a real OOM.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import textwrap
import threading

import pytest
from conftest import importing_tests, run_python, wait_until

import procpool

from . import helpers as h
from .helpers import START_METHODS

FAULT_NAMES = list(h.FAULTS)
GET_TIMEOUT = 15.0  # generous on a noisy 2-core machine; a hang fails here instead of hanging

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ helpers
def warm_up(pool: procpool.Pool, timeout: float = 20.0) -> set[int]:
    """Run one task on every worker, so that every worker is started, READY and idle."""

    def all_reached():
        got = set(pool.map_async(h.pid_after, [0.05] * pool.processes, chunksize=1).get(timeout))
        return got if got == set(pool.pids()) else None

    pids = wait_until(all_reached, timeout, interval=0.0)
    assert pids, "could not reach every worker"
    return pids


def wait_replaced(pool: procpool.Pool, dead: set[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of *dead* is among the pool's workers and the pool is full again."""
    pids = wait_until(
        lambda: (p := pool.pids()) and not (set(p) & dead) and len(p) == pool.processes and p,
        timeout,
    )
    assert pids, f"workers {sorted(dead)} not replaced within {timeout}s: {pool.pids()}"
    return pids


def wait_for_file(path, timeout: float = 10.0) -> int:
    """The pid a task wrote into *path* (see helpers.announce_then_sleep)."""
    assert wait_until(path.exists, timeout), f"the task did not start within {timeout}s"
    return int(path.read_text())


def assert_worker_lost(exc: BaseException, how: str, code: int, func_name: str) -> None:
    assert isinstance(exc, procpool.WorkerLostError), f"{type(exc).__name__}: {exc}"
    # nothing timed out: the process is gone
    assert not isinstance(exc, TimeoutError)
    assert not isinstance(exc, multiprocessing.TimeoutError)
    message = str(exc)
    assert how in message, message
    assert func_name in message, message
    assert exc.exitcode == code


def assert_serving(pool: procpool.Pool) -> None:
    assert pool.apply(h.square, (7,)) == 49
    assert pool.map_async(h.square, range(50)).get(GET_TIMEOUT) == [x * x for x in range(50)]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(params=START_METHODS)
def method(request):
    return request.param


@pytest.fixture
def pool(method, leak_check):
    p = procpool.Pool(2, start_method=method)
    try:
        warm_up(p)
        yield p
    finally:
        p.terminate()
        p.join(10)


# ------------------------------------------------------------------ a task kills its worker
@pytest.mark.parametrize("fault", FAULT_NAMES)
def test_fault_in_task_fails_that_task_and_worker_is_replaced(pool, fault):
    """The faulting task gets WorkerLostError naming signal/exit code and the task; a new worker
    replaces the dead one; the pool then serves normally."""
    func, how, code = h.FAULTS[fault]
    before = set(pool.pids())
    result = pool.apply_async(func)
    with pytest.raises(procpool.WorkerLostError) as info:
        result.get(timeout=GET_TIMEOUT)
    assert_worker_lost(info.value, how, code, func.__name__)
    dead_pid = int(re.search(r"worker pid (\d+)", str(info.value)).group(1))
    assert dead_pid in before
    assert "task" in str(info.value)
    after = wait_replaced(pool, {dead_pid})
    assert len(set(after) - before) == 1  # exactly one new worker, the other one untouched
    assert_serving(pool)


@pytest.mark.parametrize("fault", FAULT_NAMES)
def test_fault_spares_tasks_running_on_other_workers(pool, fault, tmp_path):
    """A task running on the other worker while one worker dies completes with its value."""
    func, how, code = h.FAULTS[fault]
    flag = tmp_path / "started"
    survivor = pool.apply_async(h.announce_then_sleep, (str(flag), 1.0, "survivor"))
    survivor_pid = wait_for_file(flag)
    doomed = pool.apply_async(func)
    with pytest.raises(procpool.WorkerLostError) as info:
        doomed.get(timeout=GET_TIMEOUT)
    assert_worker_lost(info.value, how, code, func.__name__)
    assert f"pid {survivor_pid} " not in str(info.value)
    assert survivor.get(timeout=GET_TIMEOUT) == "survivor"
    assert survivor_pid in pool.pids()
    assert_serving(pool)


def test_sigkill_from_outside_mid_task(pool, tmp_path):
    """The test SIGKILLs a worker inside a task (what the OOM killer does)."""
    flag = tmp_path / "started"
    result = pool.apply_async(h.announce_then_sleep, (str(flag), 60.0))
    victim = wait_for_file(flag)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(procpool.WorkerLostError) as info:
        result.get(timeout=GET_TIMEOUT)
    assert_worker_lost(info.value, "killed by signal 9 (SIGKILL)", -9, "announce_then_sleep")
    assert f"worker pid {victim} " in str(info.value)
    wait_replaced(pool, {victim})
    assert_serving(pool)


def test_segfault_in_map_fails_only_the_items_of_that_worker(pool):
    """A map item that segfaults: the map raises WorkerLostError naming the signal and items.
    With imap (one item per task): the crashing item fails "while running"; items that worker
    had finished but not yet reported fail "after running" (``result_lost``); items it held but
    had not started are run by another worker; every other item succeeds."""
    bad = 13
    items = [(x, bad) for x in range(40)]
    with pytest.raises(procpool.WorkerLostError) as info:
        pool.starmap_async(h.segfault_if, items).get(timeout=GET_TIMEOUT)
    message = str(info.value)
    assert "SIGSEGV" in message and "segfault_if" in message, message
    assert re.search(r"items? \d+(-\d+)? of starmap", message), message

    outcomes = {}
    it = pool.imap(h.segfault_if_13, range(40), chunksize=1)
    for i in range(40):
        try:
            outcomes[i] = ("ok", it.next(timeout=GET_TIMEOUT))
        except procpool.WorkerLostError as exc:
            outcomes[i] = ("lost", exc)
    with pytest.raises(StopIteration):
        it.next(timeout=GET_TIMEOUT)
    kind, crash = outcomes[bad]
    assert kind == "lost"
    assert "while running item 13 of map(segfault_if_13)" in str(crash), str(crash)
    assert not crash.result_lost
    dead = re.search(r"worker pid (\d+)", str(crash)).group(1)
    for i, (kind, value) in outcomes.items():
        if kind == "ok":
            assert value == i * i
        elif i != bad:  # finished on the dying worker just before the crash, result not sent
            assert i < bad and value.result_lost, (i, str(value))
            assert f"worker pid {dead} " in str(value) and "after running" in str(value)
    assert_serving(pool)


def test_system_exit_in_task_fails_only_that_task(pool):
    """``raise SystemExit`` in a task is an exception of that task: the worker survives."""
    before = sorted(pool.pids())
    with pytest.raises(SystemExit) as info:
        pool.apply_async(h.raise_system_exit).get(timeout=GET_TIMEOUT)
    assert info.value.code == 7
    with pytest.raises(KeyboardInterrupt):
        pool.apply_async(h.raise_keyboard_interrupt).get(timeout=GET_TIMEOUT)
    assert sorted(pool.pids()) == before
    assert_serving(pool)


# ------------------------------------------------------------------ idle workers die
def test_idle_worker_death_after_it_is_noticed(pool):
    """An idle worker SIGKILLed from outside is replaced; nothing is reported to anyone."""
    victim = sorted(pool.pids())[0]
    os.kill(victim, signal.SIGKILL)
    wait_replaced(pool, {victim})
    assert pool.map_async(h.square, range(20)).get(GET_TIMEOUT) == [x * x for x in range(20)]
    assert_serving(pool)


def test_idle_worker_death_is_invisible(pool):
    """Kill an idle worker and map *at once*, as a user would: the map must just work, even
    when the I/O thread has not noticed the death yet and sends it a chunk (the chunk never
    started, so it goes to another worker)."""
    for _ in range(10):  # the window is short: try a few times
        victim = sorted(warm_up(pool))[0]
        os.kill(victim, signal.SIGKILL)
        assert pool.map_async(h.square, range(20)).get(GET_TIMEOUT) == [x * x for x in range(20)]


def test_all_idle_workers_killed_at_once_pool_recovers(pool):
    before = set(pool.pids())
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    after = wait_replaced(pool, before)
    assert not set(after) & before
    assert_serving(pool)


def test_all_busy_workers_killed_at_once_pool_recovers(pool, tmp_path):
    """Both workers die mid-task: both tasks fail with WorkerLostError, then the pool serves."""
    flags = [tmp_path / "a", tmp_path / "b"]
    results = [pool.apply_async(h.announce_then_sleep, (str(f), 60.0)) for f in flags]
    victims = {wait_for_file(f) for f in flags}
    assert victims == set(pool.pids())
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    for r in results:
        with pytest.raises(procpool.WorkerLostError) as info:
            r.get(timeout=GET_TIMEOUT)
        assert_worker_lost(info.value, "SIGKILL", -9, "announce_then_sleep")
    wait_replaced(pool, victims)
    assert_serving(pool)


def test_apply_right_after_all_workers_were_killed(pool):
    """``apply`` at once after every worker was SIGKILLed: it runs on a replacement (it used to
    raise ValueError from Scheduler.drive, or WorkerLostError, before fd06bcf)."""
    for _ in range(5):
        pids = warm_up(pool)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert pool.apply(h.square, (4,)) == 16


def test_deaths_while_threads_submit(pool):
    """Three caller threads submit tasks while the test SIGKILLs workers one after the other:
    every task ends with its value or WorkerLostError -- nothing else, nothing hangs."""
    results: list = []
    lock = threading.Lock()

    def submitter(base):
        for i in range(base, base + 150):
            r = pool.apply_async(h.sleep_return, (i, 0.002))
            with lock:
                results.append((i, r))

    threads = [threading.Thread(target=submitter, args=(k * 1000,)) for k in range(3)]
    for t in threads:
        t.start()
    kills = 0

    def unfinished():
        with lock:
            return any(t.is_alive() for t in threads) or not all(r.ready() for _, r in results)

    while kills < 10 and unfinished():  # kill one worker, wait for its replacement, again
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        kills += 1
        wait_replaced(pool, {victim})
    for t in threads:
        t.join(GET_TIMEOUT)
    assert len(results) == 450
    for i, r in results:
        try:
            assert r.get(timeout=GET_TIMEOUT) == i
        except procpool.WorkerLostError as exc:
            assert exc.exitcode == -signal.SIGKILL
    assert_serving(pool)


@pytest.mark.parametrize("method", START_METHODS)
def test_workers_killed_before_ready_do_not_break_pool(method, leak_check):
    """Three workers SIGKILLed right after Pool() returns, before they said READY: that is no
    'startup failure' (the pool used to give up after 3 of them), the pool replaces them."""
    pool = procpool.Pool(3, start_method=method)
    try:
        first = set(pool.pids())
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        wait_replaced(pool, first)
        assert pool.map_async(h.square, range(10)).get(GET_TIMEOUT) == [x * x for x in range(10)]
    finally:
        pool.terminate()
        pool.join(10)


def test_map_on_a_broken_pool_fails_instead_of_hanging(leak_check):
    """Once the pool is broken (here: its initializer raises), every task must fail with
    InitializerError -- ``apply_async`` does, but ``map`` must not hang either."""
    pool = procpool.Pool(2, initializer=h.raise_in_initializer)
    try:
        with pytest.raises(procpool.InitializerError):
            pool.apply_async(h.square, (3,)).get(timeout=GET_TIMEOUT)
        with pytest.raises(procpool.InitializerError):  # it used to hang (TimeoutError here)
            pool.map_async(h.square, range(4)).get(timeout=GET_TIMEOUT)
    finally:
        pool.terminate()
        pool.join(10)


def test_imap_on_a_broken_pool_fails_instead_of_hanging(leak_check):
    """imap on a broken pool fails its items (it used to end silently with no result, or hang:
    the feeder stopped before reading and its end-of-input delivery woke nobody)."""
    pool = procpool.Pool(2, initializer=h.raise_in_initializer)
    try:
        with pytest.raises(procpool.InitializerError):
            pool.map_async(h.square, range(4)).get(timeout=GET_TIMEOUT)
        it = pool.imap(h.square, range(4))
        with pytest.raises(procpool.InitializerError):
            it.next(timeout=5)  # neither StopIteration (4 items are lost) nor TimeoutError
    finally:
        pool.terminate()
        pool.join(10)


def test_tasks_queued_behind_crashing_tasks_are_never_failed_for_them(leak_check):
    # every tenth task kills its worker; the tiny tasks batched behind it had not started and
    # go to another worker -- counted as "bounced" every time, they failed after 5 such deaths
    # ("sent to 6 workers that all died before it could start"), though none was to blame
    with procpool.Pool(2, retries=2) as pool:
        pool.map(h.tiny, range(2000))  # the pool learns the tasks are tiny: it batches them
        results = [pool.apply_async(h.exit_on_tens, (i,)) for i in range(300)]
        messages = []
        for r in results:
            try:
                r.get(60)
            except procpool.WorkerLostError as exc:
                messages.append(str(exc))
    assert not [m for m in messages if "before it could start" in m], messages[:3]


def test_results_of_one_function_do_not_wait_for_another_functions_slow_task(leak_check):
    # the batching estimate is one for the pool: a slow task of another function can be batched
    # behind tiny ones; their results must not wait for it (nor die with its worker)
    with procpool.Pool(1) as pool:
        pool.map(h.tiny, range(1000))
        for _ in range(3):
            [pool.apply_async(h.tiny, (i,)).get(20) for i in range(50)]
        tiny = [pool.apply_async(h.tiny, (i,)) for i in range(5)]
        slow = pool.apply_async(h.sleep_a_while, (3,))
        assert all(wait_until(r.ready, 2.0) for r in tiny), [r.ready() for r in tiny]
        assert [r.get() for r in tiny] == list(range(5))
        assert not slow.ready()
        pool.terminate()


#: the start of a script whose process may have at most 256 descriptors (use_up_descriptors
#: then fills them at once)
_SHORT_OF_DESCRIPTORS = """\
import os, resource, signal, threading, time
import procpool
from conftest import use_up_descriptors, wait_until
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
"""


def _run_short_of_descriptors(body: str):
    """Run *body* after _SHORT_OF_DESCRIPTORS in a fresh interpreter; it must print "ok"."""
    code = importing_tests(_SHORT_OF_DESCRIPTORS + textwrap.dedent(body))
    done = run_python(code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok"]
    return done


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_worker_lost_while_the_parent_is_out_of_descriptors_is_replaced_later(method):
    """Its replacement cannot start (socketpair, memfd: EMFILE): the pool tries again, and
    runs the next task once descriptors are back (before: the first failure killed the I/O
    thread, and every task with it)."""
    _run_short_of_descriptors(
        f"""
        with procpool.Pool(1, start_method={method!r}) as pool:
            pid = pool.apply(os.getpid)
            held = use_up_descriptors()
            os.kill(pid, signal.SIGKILL)
            late = pool.apply_async(os.getpid)  # waits for a worker
            assert wait_until(lambda: pool._sched._spawn_armed, 10)  # (a start failed)
            for fd in held:
                os.close(fd)
            assert late.get(30) != pid
            assert pool.apply(os.getpid) != pid
            before = len(os.listdir("/proc/self/fd"))  # (nothing a failed start made is left)
            assert pool.apply(os.getpid) != pid
            assert len(os.listdir("/proc/self/fd")) == before
        print("ok")
        """
    )


def test_a_pool_that_cannot_start_any_worker_for_long_fails_saying_why():
    _run_short_of_descriptors(
        """
        with procpool.Pool(1) as pool:
            pid = pool.apply(os.getpid)
            held = use_up_descriptors()
            os.kill(pid, signal.SIGKILL)
            try:
                pool.apply_async(os.getpid).get(30)
            except procpool.WorkerLostError as exc:
                assert "no worker could be started" in str(exc), exc
            else:
                raise AssertionError("it ran")
            finally:
                for fd in held:
                    os.close(fd)
        print("ok")
        """
    )


def test_pool_raises_when_not_one_worker_can_start():
    # out of descriptors at Pool(): it said nothing, printed the I/O thread's traceback and
    # returned a dead pool ("Pool not running" at the first task)
    done = _run_short_of_descriptors(
        """
        held = use_up_descriptors()
        for fd in held[-3:]:  # (room for the pool's own eventfds and epoll, not a worker)
            os.close(fd)
        try:
            procpool.Pool(1)
        except OSError as exc:
            assert exc.errno == 24, exc
        else:
            raise AssertionError("Pool() returned")
        for fd in held[:-3]:
            os.close(fd)
        assert threading.active_count() == 1, threading.enumerate()
        with procpool.Pool(1) as pool:
            assert pool.apply(os.getpid) != os.getpid()
        print("ok")
        """
    )
    assert "Traceback" not in done.stderr


def test_a_fork_server_that_cannot_start_a_worker_serves_on_and_keeps_its_workers(leak_check):
    # its socketpair (or fork) failing raised in the server, which died -- and took every
    # worker of the pool with it; now it says why, and the pool tries again
    import resource

    with procpool.Pool(2, start_method="forkserver") as pool:
        server = pool._sched._launcher._pid
        assert wait_until(lambda: len(pool.pids()) == 2, 10.0)
        doomed, kept = pool.pids()
        limits = resource.prlimit(server, resource.RLIMIT_NOFILE)
        resource.prlimit(server, resource.RLIMIT_NOFILE, (1, limits[1]))  # no new descriptor
        try:
            os.kill(doomed, signal.SIGKILL)
            assert wait_until(lambda: pool._sched._spawn_armed, 10.0)  # (a start failed)
            assert [pool.apply_async(os.getpid).get(10) for _ in range(5)] == [kept] * 5
            os.kill(server, 0)  # (alive)
        finally:
            resource.prlimit(server, resource.RLIMIT_NOFILE, limits)
        assert wait_until(lambda: len(pool.pids()) == 2, 10.0), "no replacement started"
        assert kept in pool.pids() and pool._sched._launcher._pid == server
        assert pool.map(abs, range(-50, 0), chunksize=1) == list(range(50, 0, -1))
