"""What each start method must give every worker -- the first ones and their replacements:
death with the parent (a death pipe, or PR_SET_PDEATHSIG), SIGINT ignored, the right parentage -- and the faults
that belong to one method: the ``forkserver``'s server dying; pools inside workers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import child_processes, is_alive, wait_until

import procpool

from . import helpers as h

GET_TIMEOUT = 15.0

pytestmark = pytest.mark.timeout(90)


def every_worker(pool, func):
    """``func(pid)`` evaluated in every worker: {worker pid: value}."""
    deadline_pids = set(pool.pids())
    seen = {}

    def reached_all():
        for pid, value in pool.map(h.pid_and, [func] * pool.processes * 2, chunksize=1):
            seen[pid] = value
        return set(pool.pids()) <= set(seen)

    assert wait_until(reached_all, 20.0, interval=0.0), (deadline_pids, seen)
    return {pid: seen[pid] for pid in pool.pids()}


def test_start_method_is_reported_and_checked():
    with procpool.Pool(1, start_method="spawn") as pool:
        assert pool.start_method == "spawn"
    with procpool.Pool(1) as pool:
        assert pool.start_method == "fork"  # the documented default
    with pytest.raises(ValueError, match="start_method"):
        procpool.Pool(1, start_method="vfork")


def check_workers(pool):
    # the kernel SIGKILLs the worker when its pool goes: a forked worker through the pool's
    # death pipe; a fresh interpreter (spawn, the fork server's) with PR_SET_PDEATHSIG
    how = "pipe" if pool.start_method == "fork" else "pdeathsig"
    assert set(every_worker(pool, h.death_notice).values()) == {(how, int(signal.SIGKILL))}
    # Ctrl-C belongs to the caller: workers ignore SIGINT (and do not block it: a task may
    # install its own handler)
    assert set(every_worker(pool, h.sigint_disposition).values()) == {(int(signal.SIG_IGN), False)}
    parents = set(every_worker(pool, h.parent_pid).values())
    if pool.start_method == "forkserver":  # all forked by one server, itself our child
        assert len(parents) == 1 and parents <= set(child_processes())
        assert parents != {os.getpid()}
    else:
        assert parents == {os.getpid()}


def test_workers_die_with_parent_and_ignore_sigint(pool):
    check_workers(pool)


def test_replacement_workers_get_the_same_setup(pool):
    first = set(pool.pids())
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not set(pool.pids()) & first and len(pool.pids()) == 2, 10.0)
    check_workers(pool)


def test_fork_server_killed_pool_recovers(leak_check, tmp_path):
    """The fork server dies (OOM killer, a stray kill): its workers die with it, the task that
    was running fails with WorkerLostError, and a new server starts the replacements."""
    started = tmp_path / "started"
    before = set(child_processes())  # (an earlier test's: multiprocessing's resource tracker)
    with procpool.Pool(2, start_method="forkserver") as pool:
        workers = set(pool.pids())
        servers = set(child_processes()) - workers - before
        assert len(servers) == 1
        result = pool.apply_async(h.touch_then_sleep, (str(started), 30.0))
        assert wait_until(started.exists, GET_TIMEOUT), "the task did not start"
        os.kill(servers.pop(), signal.SIGKILL)
        with pytest.raises(procpool.WorkerLostError):  # its worker died with the server
            result.get(timeout=GET_TIMEOUT)
        assert pool.apply_async(h.square, (6,)).get(timeout=GET_TIMEOUT) == 36
        assert not set(pool.pids()) & workers


def test_pool_inside_a_worker(pool):
    """A task may run its own pool (any method outside, fork inside)."""
    values, inner = pool.apply_async(h.nested_pool_map, (6,)).get(timeout=30.0)
    assert values == [x * x for x in range(6)]
    assert len(inner) == 2 and not set(inner) & set(pool.pids())
    assert pool.apply(h.square, (3,)) == 9


def test_inner_pool_dies_with_its_worker(pool, tmp_path):
    """A worker running its own pool is SIGKILLed: its task fails, and the inner workers --
    whose parent just died -- are gone within 5 s."""
    info = tmp_path / "inner.json"
    result = pool.apply_async(h.nested_pool_then_sleep, (str(info),))
    assert wait_until(info.exists, 20.0), "the inner pool did not start"
    pids = json.loads(info.read_text())
    stats = {p: h.proc_stat(p) for p in [pids["outer"], *pids["inner"]]}
    assert all(stats.values()), (stats, result.ready() and result.get())
    inner = {p: stats[p][3] for p in pids["inner"]}
    os.kill(pids["outer"], signal.SIGKILL)
    with pytest.raises(procpool.WorkerLostError):
        result.get(timeout=GET_TIMEOUT)
    assert wait_until(lambda: not h.still_alive(inner), 5.0), h.still_alive(inner)
    assert all(not is_alive(p, start) for p, start in inner.items())
    assert pool.apply(h.square, (3,)) == 9


def test_a_fork_server_asked_to_reap_a_live_worker_answers_in_time():
    # it waited in a blocking waitpid: a pool asking about a live worker (seen once in CI)
    # then waited for good, its I/O thread reading the answer
    from procpool import _start

    launcher = _start.ForkServerLauncher()
    try:
        proc = launcher.start()
        start = time.monotonic()
        assert launcher.reap(proc) is None  # alive: "unknown", in time
        assert time.monotonic() - start < _start.REAP_WAIT + 3
        proc.sock.close()  # its channel closed: the worker exits
        codes = []
        assert wait_until(lambda: codes.append(launcher.reap(proc)) or codes[-1] is not None, 20)
        if proc.pidfd >= 0:
            os.close(proc.pidfd)
    finally:
        launcher.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_initializer_whose_forked_child_returns_does_not_hang_the_pool(method):
    # the child came back into the worker's start, said READY a second time and read the
    # worker's channel: the pool hung for good (multiprocessing runs the tasks)
    from tasks import fork_and_return, pid

    with procpool.Pool(1, initializer=fork_and_return, start_method=method) as pool:
        pids = set(pool.map_async(pid, range(20), chunksize=1).get(timeout=30))
    assert len(pids) == 1


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_pool_made_by_a_thread_that_ends_keeps_its_workers(method, tmp_path):
    # the fork server died with the thread that started it (PR_SET_PDEATHSIG), and the task
    # running then with it (WorkerLostError); it is now started by the pool's I/O thread
    from tasks import record, recorded, sleep_then

    box: list = []
    path = str(tmp_path / "ran")

    def make() -> None:
        pool = procpool.Pool(1, start_method=method)
        box.append(pool)
        assert pool.apply_async(sleep_then, (0, 1)).get(30) == 1  # (workers up)
        box.append(pool.apply_async(record, (path, 2, 0.5)))
        assert wait_until(lambda: 2 in recorded(path), 10)  # it runs as this thread ends

    t = threading.Thread(target=make)
    t.start()
    t.join(30)
    pool, r = box
    try:
        assert r.get(30) == 2
        assert pool.apply(sleep_then, (0, 3)) == 3
    finally:
        pool.terminate()


SCRIPT_FOR_FRESH_WORKERS = """
import sys
sys.path.insert(0, SRC)  # procpool found through the program's sys.path alone
import procpool


def flags(_):
    import sys

    return sys.flags.optimize, sys.flags.no_site, sys.flags.dev_mode


if __name__ == "__main__":
    for method in ("spawn", "forkserver"):
        with procpool.Pool(1, start_method=method) as pool:
            print(method, pool.apply(flags, (0,)))
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_workers_started_afresh_get_the_interpreters_options_and_find_procpool(tmp_path, how):
    # spawn/forkserver workers ran `python -c` without the parent's -O/-S/-X options (as
    # multiprocessing passes them), imported procpool before the parent's sys.path arrived
    # (not found: 3 workers in a row died), and a script piped to `python -` failed every task
    # (its path, "<stdin>", was run again in each worker)
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(procpool.__file__)))
    script = SCRIPT_FOR_FRESH_WORKERS.replace("SRC", repr(src))
    if how == "file":  # -S: no site-packages, procpool only where the script says
        path = tmp_path / "script.py"
        path.write_text(script)
        argv = [sys.executable, "-O", "-S", "-X", "dev", str(path)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        want = ["spawn (1, 1, True)", "forkserver (1, 1, True)"]
    else:  # (the function goes by value: cloudpickle, from site-packages)
        argv = [sys.executable, "-O", "-"]
        out = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=60)
        want = ["spawn (1, 0, False)", "forkserver (1, 0, False)"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == want


def test_a_fork_server_that_cannot_start_reaps_no_other_child():
    # Pool() raised, and closing the launcher ran waitpid(0): it waited for (and reaped) any
    # child of the program -- here one that sleeps 1.5 s and exits 7
    code = """
import errno, subprocess, time
import procpool
from procpool import _start

def failing_spawn(code, sock):
    raise OSError(errno.EAGAIN, "simulated")

_start._spawn_python = failing_spawn
child = subprocess.Popen(["sh", "-c", "sleep 1.5; exit 7"])
t0 = time.monotonic()
try:
    procpool.Pool(1, start_method="forkserver")
except OSError as exc:
    print("raised", exc.errno == errno.EAGAIN, time.monotonic() - t0 < 1.0)
print("child", child.wait())
"""
    from conftest import run_python

    out = run_python(code, 60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["raised True True", "child 7"]
