"""What a pool does to the process around it: its threads leave the program's signals to the
main thread, its workers get the program's signal mask back, and it imports nothing it does not
need (cloudpickle costs ~2 MB in every forked worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial

import pytest
from conftest import run_python, wait_until
from tasks import fork_and_end_child, pid, record_and_fork_on_zero, recorded, sleep_then, square

import procpool

pytestmark = pytest.mark.timeout(60)


def blocked(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk in {path}")


def bit(sig: signal.Signals) -> int:
    return 1 << (sig - 1)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_pool_threads_leave_signals_to_the_main_thread_and_workers_get_them_back(method):
    before = blocked("/proc/thread-self/status")
    with procpool.Pool(1, start_method=method) as pool:
        list(pool.imap(square, range(3)))  # a feeder thread too
        io = next(t for t in threading.enumerate() if t.name == "procpool-io")
        # (while it delivers, the I/O thread has the program's mask -- callbacks run with it:
        # see _start.program_signals -- so look until it is idle)
        deadline = time.monotonic() + 10
        while True:
            io_mask = blocked(f"/proc/self/task/{io.native_id}/status")
            if io_mask & bit(signal.SIGINT) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1):
            assert io_mask & bit(sig), f"the I/O thread can receive {sig.name}"
        assert not io_mask & bit(signal.SIGSEGV)  # faults stay where they happen
        assert blocked("/proc/thread-self/status") == before  # the caller's mask is untouched
        worker = pool.apply(pid)
        assert blocked(f"/proc/{worker}/status") == before  # as the program had it


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_run_under_batch_scheduling_and_the_parent_does_not(method):
    """SCHED_BATCH: a worker woken by a task does not preempt the parent (a forked worker
    gets it from the parent, see ForkLauncher.start)."""
    with procpool.Pool(2, start_method=method) as pool:
        assert os.sched_getscheduler(pool.apply(pid)) == os.SCHED_BATCH  # one serving now
        # (a spawned worker still starting sets it when it reaches its loop: wait for that)
        batch = lambda: all(os.sched_getscheduler(p) == os.SCHED_BATCH for p in pool.pids())  # noqa: E731
        assert wait_until(batch, timeout=30)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_waiting_on_a_long_apply_after_short_ones_burns_no_cpu():
    """apply polls without sleeping only for a short while (DRIVE_SPIN, when tasks have been
    short), and a worker only briefly after a lone call (REPLY_SPIN): neither spins on."""
    with procpool.Pool(1) as pool:
        for i in range(2000):  # short tasks: the pool's estimate now says "spin"
            assert pool.apply(square, (i,)) == i * i
        assert pool.apply(sleep_then, (0.0, 1)) == 1  # known and loaded: the quick paths
        (worker,) = pool.pids()
        before, worker_before = time.thread_time(), cpu_seconds(worker)
        assert pool.apply(sleep_then, (0.5, 7)) == 7
        assert time.thread_time() - before < 0.1  # spinning throughout would be 0.5 s
        time.sleep(0.5)  # the worker, idle after its call
        assert cpu_seconds(worker) - worker_before < 0.1


def test_a_spin_stops_once_polls_that_do_not_pay_outnumber_those_that_do_and_tries_again():
    from procpool._channel import SPIN_CREDIT, SPIN_PROBE, SPIN_PROBE_FIRST, Spin, can_spin

    if not can_spin():
        pytest.skip("one CPU: nothing spins")
    spin = Spin(1e-4)
    for _ in range(SPIN_CREDIT - 1):  # late inputs, but fewer than its credit: the whole limit
        assert spin.take() == 1e-4
        spin.done(1e-4, False)
    for _ in range(50):  # then one poll in two pays: it goes on polling
        assert spin.take() == 1e-4
        spin.done(1e-4, True)
        assert spin.take() == 1e-4
        spin.done(1e-4, False)
    for _ in range(100):  # a long run that pays buys no more than SPIN_CREDIT late inputs
        spin.done(spin.take(), True)
    for _ in range(SPIN_CREDIT):
        assert spin.take() == 1e-4
        spin.done(1e-4, False)
    assert spin.take() == 0.0
    spin = Spin(1e-4)
    polled = 0  # one poll in three pays (review: "3 late inputs in a row" polled after every wait)
    for i in range(3000):
        budget = spin.take()
        if budget:
            polled += 1
            spin.done(budget, i % 3 == 2)
    assert polled < 1000, polled
    spin = Spin(1e-4)
    for _ in range(SPIN_CREDIT):  # late inputs in a row: stopped
        assert spin.take() == 1e-4
        spin.done(1e-4, False)
    # stopped: it tries the whole limit again after 8, 16, ... waits
    for interval in (SPIN_PROBE_FIRST, 2 * SPIN_PROBE_FIRST, 4 * SPIN_PROBE_FIRST):
        budgets = [spin.take() for _ in range(interval)]
        assert budgets[:-1] == [0.0] * (interval - 1) and budgets[-1] == 1e-4
        spin.done(1e-4, False)  # that try did not pay either
    tries = []  # the interval stops growing at SPIN_PROBE
    for i in range(8 * SPIN_PROBE):
        budget = spin.take()
        if budget:
            tries.append(i)
            spin.done(budget, False)
    gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    assert gaps[-3:] == [SPIN_PROBE] * 3 and max(gaps) == SPIN_PROBE
    while not spin.take():
        pass
    spin.done(1e-4, True)  # a try paid: polling again, on a credit of one...
    assert spin.take() == 1e-4
    spin.done(1e-4, False)
    budgets = [spin.take() for _ in range(SPIN_PROBE_FIRST)]  # ...and the next tries from 8
    assert budgets[-1] == 1e-4 and not any(budgets[:-1])
    spin.credit = -1  # (threads racing a decrement): a late input still stops it
    spin.done(1e-4, True)
    assert spin.take() == 1e-4
    spin.done(1e-4, False)
    assert spin.take() == 0.0


def test_nothing_spins_in_a_process_confined_to_one_cpu():
    """A caller polling for its reply would hold the CPU its worker needs (see can_spin)."""
    code = textwrap.dedent(
        """
        import os
        from procpool._channel import can_spin
        assert can_spin() == (len(os.sched_getaffinity(0)) > 1)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        assert not can_spin()
        import pickle
        import procpool
        with procpool.Pool(1) as pool:
            assert pool._sched._spin.limit == 0.0 and pool.apply(abs, (-3,)) == 3
            # its workers are told so (they do not ask: see _scheduler's config["spin"])
            assert pickle.loads(pool._sched._init_body)["spin"] is False
        print("ok")
        """
    )
    out = run_python(code, 60)
    assert out.stdout.strip() == "ok", out.stderr


def test_importable_functions_do_not_import_cloudpickle():
    code = textwrap.dedent(
        """
        import sys
        import procpool
        from tasks import square
        with procpool.Pool(2) as pool:
            assert pool.map(square, range(10)) == [x * x for x in range(10)]
            assert pool.apply(abs, (-3,)) == 3
        print("cloudpickle" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=__file__.rsplit("/", 1)[0],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_lambda_still_travels_by_value():
    with procpool.Pool(1) as pool:
        assert pool.apply(lambda x: x * 3, (5,)) == 15


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_program_that_leaves_its_pool_open_exits_cleanly(method):
    # the interpreter's exit terminates the pool (its finalizer) while workers' progress slots
    # and received arrays are still mapped: nothing may be unmapped under code still running
    # (it segfaulted when finalize() unmapped them first, at exit)
    code = textwrap.dedent(
        f"""
        import atexit, os
        import numpy as np
        import procpool
        pool = procpool.Pool(2, start_method={method!r})
        kept = pool.apply(np.ones, (1 << 18,))  # received through a memfd mapping
        atexit.register(lambda: print("sum at exit", int(kept.sum())))
        pids = {{pool.apply(os.getpid) for _ in range(8)}}
        pids.add(pool.apply_async(os.getpid).get())
        print("workers", *pids)
        """
    )
    out = run_python(code, 60)
    assert out.returncode == 0, out.stderr
    assert "sum at exit 262144" in out.stdout
    assert not out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("workers"))
    pids = [int(p) for p in line.split()[1:]]
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 10)


def test_threads_first_using_main_functions_at_once_all_succeed():
    # the first __main__ function imports cloudpickle; threads that came at the same moment
    # found the half-imported module in sys.modules ("no attribute 'dumps'"): 3-7 runs in 10
    code = textwrap.dedent(
        """
        import threading
        import procpool
        def f(x): return x + 1
        def g(x): return x * 2
        pool = procpool.Pool(2)
        barrier = threading.Barrier(4)
        errors = []
        def client(fn):
            barrier.wait()
            try:
                pool.apply(fn, (1,))
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=client, args=(fn,)) for fn in (f, g, f, g)]
        for t in threads: t.start()
        for t in threads: t.join()
        pool.close(); pool.join()
        print("errors", errors)
        """
    )
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "errors []"


def test_received_descriptors_are_never_inherited_by_a_worker_forked_meanwhile():
    # a result's memfd is received in one thread (the I/O thread, or a caller reading its own
    # reply) and closed after unpickling, maybe in another: a worker forked in between closes
    # it first thing, as it closes every pool-internal fd (a result's memory would live on)
    from procpool import _protocol as P
    from procpool import _serialize
    from procpool._channel import Channel
    from procpool._start import INTERNAL_FDS

    a, b = __import__("socket").socketpair()
    memfd = os.memfd_create("t")
    try:
        Channel(a).send_frame(P.frame(P.RESULTS, b"x", 1), [os.dup(memfd)])
        chan = Channel(b)
        chan.fill()
        ((_, _, fds),) = chan.frames()
        assert len(fds) == 1 and fds[0] in INTERNAL_FDS
        _serialize.Payload(b"", 0, fds).close()
        assert fds[0] not in INTERNAL_FDS
    finally:
        os.close(memfd)
        a.close()
        b.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_child_a_task_forks_never_acts_as_the_worker(method):
    # a forked child that comes back into the worker's code (sys.exit() in it, an exception,
    # a plain return) exits there: its SystemExit was sent as the task's result, and it went
    # on reading the worker's channel, a second worker the parent did not know
    with procpool.Pool(1, start_method=method) as pool:
        got = [
            pool.apply(fork_and_end_child, (i, how))
            for i, how in enumerate(["exit3", "return", "raise"] * 2)
        ]
        assert got == [(0, 3), (1, 0), (2, 1), (3, 3), (4, 0), (5, 1)]
        worker = pool.pids()[0]
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        assert pool.pids() == [worker]


def test_a_child_forked_by_a_map_item_does_not_run_the_rest_of_the_chunk(tmp_path):
    # back in the worker's chunk loop, the child ran the chunk's remaining items again
    path = str(tmp_path / "ran")
    with procpool.Pool(1) as pool:
        assert pool.map(partial(record_and_fork_on_zero, path), range(4), chunksize=4) == [
            0,
            1,
            2,
            3,
        ]
        assert sorted(recorded(path)) == [0, 1, 2, 3]


def test_a_wake_up_racing_the_pools_end_never_writes_into_a_reused_descriptor(tmp_path):
    """A thread that wakes the I/O thread (a task queued, a SharedArray or a buffer freed)
    just as the pool ends: the pool's eventfd stays open until that thread has written it.
    Before, the pool could close it in between, and the 8 bytes went into whatever file took
    its number."""
    import inspect

    from procpool._scheduler import Scheduler

    lines, first = inspect.getsourcelines(Scheduler._wake)
    at = first + next(i for i, line in enumerate(lines) if "eventfd_write" in line)
    paused, go = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def tracer(frame, event, arg):
        if frame.f_code is Scheduler._wake.__code__:
            if event == "line" and frame.f_lineno == at:
                paused.set()
                go.wait(10)
            return tracer
        return None

    pool = procpool.Pool(1)
    assert pool.apply(square, (3,)) == 9

    def wake():
        sys.settrace(tracer)
        try:
            pool._sched._woken = False  # (idle: nothing else wakes it)
            pool._sched._wake()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failed.append(exc)
        finally:
            sys.settrace(None)

    waker = threading.Thread(target=wake)
    waker.start()
    assert paused.wait(10)
    pool._sched._woken = False  # as if the I/O thread had read a wake-up meanwhile
    ender = threading.Thread(target=lambda: (pool.terminate(), pool.join()))
    ender.start()
    ender.join(1.0)  # (the fix keeps it waiting for the waker here)
    files = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(64)]
    go.set()
    waker.join(10)
    ender.join(10)
    for fd in files:
        os.close(fd)
    assert not ender.is_alive() and not waker.is_alive()
    assert not failed, failed
    assert [os.path.getsize(tmp_path / f"f{i}") for i in range(64)] == [0] * 64


def test_a_pool_ends_even_when_its_ender_interrupted_a_wake_up():
    """A signal handler that ends the pool (terminate and join: the usual SIGTERM pattern) may
    run in the main thread inside ``_wake``, which holds the lock that keeps the eventfd open
    while it is written.  The pool's end waits for it a moment, then leaves the eventfd to be
    closed with the scheduler (a review's handler deadlocked the pool's end on that lock)."""
    import gc

    pool = procpool.Pool(1)
    assert pool.apply(square, (2,)) == 4
    sched = pool._sched
    fd = sched._wakefd
    with sched._wake_lock:  # as a handler running inside _wake in this thread
        pool.terminate()
        pool.join()
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    del pool, sched
    gc.collect()
    assert wait_until(
        lambda: (
            not os.path.exists(f"/proc/self/fd/{fd}")
            or os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]"
        ),
        timeout=5,
    ), "the eventfd outlived its scheduler"


def test_a_child_forked_while_a_thread_wakes_the_pool_can_still_wake_it():
    # the child inherits the wake lock as the parent's thread held it: held for good there
    pool = procpool.Pool(1)
    try:
        sched = pool._sched
        with sched._wake_lock:  # (as another thread inside _wake at the fork)
            pid = os.fork()
            if pid == 0:  # the child: _wake must return at once (its pool is FINISHED here)
                done = threading.Event()

                def wake():
                    sched._woken = False
                    sched._wake()
                    done.set()

                threading.Thread(target=wake, daemon=True).start()
                os._exit(0 if done.wait(5) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        pool.terminate()
        pool.join()
