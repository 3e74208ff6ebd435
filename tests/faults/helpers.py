"""Task functions for the fault-injection tests.

They live in an importable module (not in the test files' closures) so that every start method
-- ``fork``, ``forkserver`` and ``spawn`` -- finds them by reference in the worker.  Each fault
happens *inside the worker process*, exactly as a buggy or unlucky task would cause it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import signal
import stat
import sys
import time

START_METHODS = ["fork", "forkserver", "spawn"]  # every test that can runs under each


def _no_core_dump() -> None:
    """Crashing tasks must not write (or pipe to a handler) a core file: it is slow and litters."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


# ------------------------------------------------------------------ plain tasks
def square(x):
    return x * x


def getpid(_=None):
    return os.getpid()


def pid_after(delay):
    """Return this worker's pid after *delay* seconds (used to reach every worker)."""
    time.sleep(delay)
    return os.getpid()


def touch_then_sleep(path, seconds):
    """Create *path* (the test's sign that the task is running), then sleep."""
    open(path, "w").close()
    time.sleep(seconds)


def sleep_return(value, seconds):
    time.sleep(seconds)
    return value


def echo(value):
    return value


def double(arr):
    return arr * 2


def announce_then_sleep(path, seconds, value=None):
    """Write this worker's pid to *path* (atomically), then sleep: the test can now act on a
    worker known to be *inside* a task."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(seconds)
    return value


def print_then_sleep(x, seconds=30.0):
    """Say on stdout that a task started (the Ctrl-C tests wait for it), then run long."""
    # one write(2) for the whole line: the caller writes to the same pipe, and print() may
    # send the text and its newline separately, letting the caller's line land in between
    os.write(sys.stdout.fileno(), f"TASK-STARTED {x} pid={os.getpid()}\n".encode())
    time.sleep(seconds)
    return x


# ------------------------------------------------------------------ faults (they kill the worker)
def segfault(_=None):
    """A real segmentation fault: read address 0 through ctypes."""
    _no_core_dump()
    ctypes.string_at(0)


def exit_3(_=None):
    os._exit(3)


def sigkill_self(_=None):
    # What the OOM killer does to a process: SIGKILL.  The SIGKILL tests stand for OOM kills.
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # never reached


def abort(_=None):
    _no_core_dump()
    os.abort()


def raise_system_exit(_=None):
    raise SystemExit(7)


def raise_keyboard_interrupt(_=None):
    raise KeyboardInterrupt


def segfault_if(x, bad):
    if x == bad:
        segfault()
    return x * x


FAULTS = {
    "sigkill": (sigkill_self, "killed by signal 9 (SIGKILL)", -signal.SIGKILL),
    "segfault": (segfault, "killed by signal 11 (SIGSEGV)", -signal.SIGSEGV),
    "os_exit": (exit_3, "exited with code 3", 3),
    "abort": (abort, "killed by signal 6 (SIGABRT)", -signal.SIGABRT),
}


# ------------------------------------------------------------------ user code that owns signals
def wait_for_signal(path, signum, limit=10.0):
    """Install a handler for *signum*, tell the test our pid (via *path*), return once the
    signal arrived (or after *limit* seconds, saying so)."""
    got = []

    def handler(sig, frame):
        got.append(sig)

    previous = signal.signal(signum, handler)
    try:
        announce_pid(path)
        deadline = time.monotonic() + limit
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)  # interrupted by the signal; the handler runs in between
        return ("got", got[0]) if got else ("no signal", None)
    finally:
        signal.signal(signum, previous)


def wait_for_sigusr1(path, limit=10.0):
    return wait_for_signal(path, signal.SIGUSR1, limit)


def announce_pid(path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def alarm_and_pause():
    """The tutorial's pattern: ``signal.alarm(1)`` then ``signal.pause()``; our handler runs."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        start = time.monotonic()
        signal.alarm(1)
        signal.pause()
        return fired, time.monotonic() - start
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def setitimer_handler(interval=0.05, ticks=3):
    """A periodic ITIMER_REAL: the task's SIGALRM handler runs *ticks* times."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, interval, interval)
        deadline = time.monotonic() + 5
        while len(fired) < ticks and time.monotonic() < deadline:
            signal.pause()
        return len(fired)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def leave_sigalrm_handler():
    """User code that installs a SIGALRM handler and does not restore it."""
    signal.signal(signal.SIGALRM, lambda s, f: None)
    return os.getpid()


def sigint_disposition(_=None):
    h = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return (h if isinstance(h, int) else repr(h)), blocked


def segfault_if_13(x):
    return segfault_if(x, 13)


def raise_in_initializer():
    raise RuntimeError("initializer failed on purpose")


# ====================================================================== test side (not tasks)
# Plumbing for the tests that run a pool inside a child Python process (parent death, Ctrl-C).

import json  # noqa: E402
import queue  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: what every child script starts with: import procpool and these helpers, and print the pool's
#: worker pids once every worker has run a task (so they are all started and ready).
CHILD_PRELUDE = """
import json, os, sys, time
import procpool
from faults import helpers as h

def report_pids(pool):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = set(pool.map(h.pid_after, [0.05] * pool.processes, chunksize=1))
        if got == set(pool.pids()):
            break
    print("PIDS " + json.dumps(sorted(pool.pids())), flush=True)
"""


class Child:
    """A child Python running *script* (after :data:`CHILD_PRELUDE`), its output read by threads
    so that the test can wait for a line with a deadline and never blocks on a pipe."""

    def __init__(self, script: str, *args: str, new_session: bool = False) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONFAULTHANDLER", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_PRELUDE + script, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=TESTS_DIR,
            start_new_session=new_session,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False)),
        ]
        for t in self._readers:
            t.daemon = True
            t.start()

    def _pump(self, stream, sink: list[str], lines: bool) -> None:
        try:
            for line in stream:
                sink.append(line)
                if lines:
                    self.lines.put(line)
        except (ValueError, OSError):  # closed under us by close()
            pass
        if lines:
            self.lines.put(None)

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first (next) stdout line starting with *prefix*; AssertionError after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(
                    f"no line starting with {prefix!r} within {timeout}s (child rc="
                    f"{self.proc.poll()}); stdout={''.join(self.stdout)!r} "
                    f"stderr={''.join(self.stderr)!r}"
                )
            if line.startswith(prefix):
                return line.rstrip("\n")

    def worker_pids(self, timeout: float = 30.0) -> list[int]:
        return json.loads(self.wait_line("PIDS ", timeout)[5:])

    def wait(self, timeout: float) -> int | None:
        """The child's exit code, or None if it is still running after *timeout*."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self, timeout: float = 5.0) -> str:
        """Everything the child (and anything sharing its stderr) wrote, once the pipe closed
        (or after *timeout*, if a process still holds it open)."""
        self._readers[1].join(timeout)
        return "".join(self.stderr)

    def close(self) -> None:
        """Kill what is left of the child and release the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def proc_stat(pid: int):
    """(state, ppid, pgrp, starttime) of *pid*, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def all_processes() -> dict[int, tuple]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                procs[int(name)] = st
    return procs


def descendants(root: int) -> dict[int, int]:
    """Every live process below *root*: pid -> starttime (to tell a recycled pid apart)."""
    procs = all_processes()
    tree, found = {root}, {}
    grew = True
    while grew:
        grew = False
        for pid, (state, ppid, _, start) in procs.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                if state not in ("Z", "X", "x"):
                    found[pid] = start
                grew = True
    return found


def group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of process group *pgid*: pid -> state."""
    return {
        pid: st[0]
        for pid, st in all_processes().items()
        if st[2] == pgid and st[0] not in ("Z", "X", "x")
    }


def still_alive(procs: dict[int, int]) -> dict[int, str]:
    """Those of *procs* (pid -> starttime) that still run (zombies count as gone)."""
    alive = {}
    for pid, start in procs.items():
        st = proc_stat(pid)
        if st is not None and st[3] == start and st[0] not in ("Z", "X", "x"):
            alive[pid] = st[0]
    return alive


def fd_count(_=None):
    """How many descriptors this (worker) process has open."""
    return len(os.listdir("/proc/self/fd"))


def result_segments(_=None):
    """How many of this worker's descriptors are its result segments (reused: see _buffers)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "memfd:procpool-result" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return count


def procpool_mappings(_=None):
    """The memfd mappings procpool created that this process still has mapped."""
    with open("/proc/self/maps") as f:
        return sorted({line.split(None, 5)[-1].strip() for line in f if "memfd:procpool" in line})


def array_stats(arr):
    return arr.shape, str(arr.dtype), float(arr.sum())


def filled_array(i, n=40_000):
    """A 320 KB float64 array (above procpool's out-of-band threshold) filled with *i*."""
    import numpy as np

    return np.full(n, float(i))


def nested_pool_map(n=4, method="fork"):
    """A task that runs its own pool (procpool allows a worker to have workers)."""
    import procpool

    with procpool.Pool(2, start_method=method) as inner:
        return inner.map(square, range(n)), sorted(inner.pids())


def pdeathsig(_=None):
    """The signal this process gets when its parent dies (prctl PR_GET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    if libc.prctl(2, ctypes.byref(value), 0, 0, 0) != 0:  # PR_GET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_PDEATHSIG)")
    return value.value


def death_notice(_=None):
    """How the kernel ends this worker when its pool goes: ``("pdeathsig", signal)`` for
    PR_SET_PDEATHSIG (spawn, forkserver), ``("pipe", signal)`` for a death pipe (fork): the
    read end of a pipe opened with O_ASYNC and owned by this process, and the signal it
    raises (F_GETSIG; 0 is SIGIO, which only counts at its default action and not blocked)."""
    sig = pdeathsig()
    if sig:
        return "pdeathsig", sig
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ASYNC:
                continue
            if fcntl.fcntl(fd, fcntl.F_GETOWN) != os.getpid():
                continue
            sig = fcntl.fcntl(fd, fcntl.F_GETSIG) or int(signal.SIGIO)
        except OSError:
            continue
        if signal.getsignal(sig) != signal.SIG_DFL or sig in signal.pthread_sigmask(
            signal.SIG_BLOCK, []
        ):
            return "pipe, but its signal is caught or blocked", sig
        return "pipe", sig
    return None, 0


def pipe_inodes(_=None):
    """(pid, (the inodes of this process's pipes with O_ASYNC set -- its own end of a death
    pipe --, the inodes of its other pipes but stdin/stdout/stderr))."""
    time.sleep(0.02)  # long enough that one map spreads over all workers
    own, other = [], []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            st = os.fstat(fd)
            if fd > 2 and stat.S_ISFIFO(st.st_mode):
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                (own if flags & os.O_ASYNC else other).append(st.st_ino)
        except OSError:
            continue
    return os.getpid(), (own, other)


def nested_pool_then_sleep(path, seconds=60.0):
    """Run an inner pool whose workers announce their pids (in *path*) and then sleep."""
    import json as _json

    import procpool

    with procpool.Pool(2) as inner:
        pids = sorted(inner.pids())
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            _json.dump({"outer": os.getpid(), "inner": pids}, f)
        os.replace(tmp, path)
        inner.starmap(sleep_return, [(0, seconds), (1, seconds)], chunksize=1)


def parent_pid(_=None):
    return os.getppid()


def pid_and(func):
    """(this worker's pid, func()) -- used to evaluate *func* in every worker."""
    time.sleep(0.02)  # long enough that one map spreads over all workers
    return os.getpid(), func()


def exit_on_tens(x):
    if x % 10 == 0:
        os._exit(3)
    return x


def tiny(x):
    return x


def sleep_a_while(seconds):
    time.sleep(seconds)
    return seconds
