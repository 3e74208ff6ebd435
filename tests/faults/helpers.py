"""Task functions for the fault-injection tests.

They live in an importable module (not in the test files' closures) so that every start method
-- ``fork``, ``forkserver`` and ``spawn`` -- finds them by reference in the worker.  Each fault
happens *inside the worker process*, exactly as a buggy or unlucky task would cause it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time


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
    print(f"TASK-STARTED {x} pid={os.getpid()}", flush=True)
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
def wait_for_sigusr1(path, limit=10.0):
    """Install a SIGUSR1 handler, tell the test our pid (via *path*), return once it arrived."""
    got = []

    def handler(signum, frame):
        got.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        announce_pid(path)
        deadline = time.monotonic() + limit
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)  # interrupted by the signal; the handler runs in between
        return ("got", got[0]) if got else ("no signal", None)
    finally:
        signal.signal(signal.SIGUSR1, previous)


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


def sigint_disposition():
    h = signal.getsignal(signal.SIGINT)
    return h if isinstance(h, int) else repr(h)
