"""Module-level task functions shared by the tests (importable by every start method)."""

from __future__ import annotations

import functools
import os
import sys
import time


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def identity(x):
    return x


def pid(_=None):
    return os.getpid()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def mixed(i):
    """A result of another kind for each ``i % 8``: scalars, a string, a list, an error."""
    kind = i % 8
    if kind == 5:
        raise ValueError(f"bad {i}")
    return [i, i / 2, str(i), None, [i], None, i % 3 == 0, complex(i, 1)][kind]


def fail(message="boom"):
    raise ValueError(message)


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * 10


def stop_on(x, bad=3):
    """x * 10, but StopIteration at *bad* (which a loop in C reads as the end of its input)."""
    if x == bad:
        raise StopIteration(x)
    return x * 10


SLOW_TEXT = "ab" * 2_000_000  # SLOW_TEXT.count("b"): ≈ 2 ms of C, no Python between


def _load_unless_first(marker):
    """FlakyLoad's reconstructor: fails the first time any process unpickles it (*marker*, a
    file, is made then), and gives ``square`` every time after."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return square
    os.close(fd)
    raise ImportError("not yet")


class FlakyLoad:
    """A task function whose first unpickling fails, as an import that fails for the moment."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, x):  # pragma: no cover - a worker gets square instead
        return square(x)

    def __reduce__(self):
        return (_load_unless_first, (self.marker,))


class Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise Stopped("told to stop")


def raise_on_sigusr1():
    """An initializer: SIGUSR1 raises Stopped in whatever the worker runs."""
    import signal

    signal.signal(signal.SIGUSR1, _raise_stopped)


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def raise_custom():
    raise CustomError(42, "detail")


class BadInitError(Exception):
    """Its __init__ does not round-trip through pickle (takes 2 args, stores 1)."""

    def __init__(self, a, b):
        super().__init__(a)


def raise_bad_init():
    raise BadInitError("a", "b")


def raise_local_class():
    class LocalError(Exception):
        pass

    raise LocalError("from a local class")


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


def return_unpicklable():
    return Unpicklable()


class ErrorWithUnpicklableAttr(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = __import__("threading").Lock()


def raise_unpicklable_attr():
    raise ErrorWithUnpicklableAttr("has a lock")


def raise_system_exit():
    raise SystemExit(7)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


_init_value = None


def set_init_value(value):
    global _init_value
    _init_value = value


def get_init_value(_=None):
    return _init_value


class Box:
    """A result a weak reference can follow (see box)."""

    def __init__(self, value):
        self.value = value


def box(x):
    return Box(x)


class InitValue:
    """A class whose classmethod reads this module's globals (see get_init_value)."""

    @classmethod
    def get(cls, _=None):
        return _init_value


def _tagged(tag, cls, x):
    return tag, cls.__name__, x


class PartialClassMethod:
    """A classmethod over a callable with no ``__name__``."""

    get = classmethod(functools.partial(_tagged, "plain"))


def failing_initializer():
    raise RuntimeError("initializer exploded")


def nbytes(array):
    return int(array.nbytes)


def make_array(n):
    import numpy as np

    return np.arange(n, dtype=np.float64)


def double(array):
    return array * 2


def record(path, x, seconds=0.0, bad=-1):
    """Append ``x`` as one line to *path* (O_APPEND: whole lines from any process), sleep,
    return ``x``; raise ValueError for ``x == bad``.  Counts what actually ran."""
    if x == bad:
        raise ValueError(f"bad item {x}")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"%d\n" % x)
    finally:
        os.close(fd)
    time.sleep(seconds)
    return x


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def record_die_once(path, marker, x, seconds=0.0, die_at=1):
    """``record`` x; for ``x == die_at``, the first time (no *marker* file yet), sleep
    *seconds*, then kill the worker (``os._exit``)."""
    record(path, x)
    if x == die_at and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(seconds)
        os._exit(7)
    time.sleep(0.01)
    return x


def recorded(path):
    """The values ``record`` wrote to *path*, in order."""
    try:
        with open(path, "rb") as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


def _fail_unpickling(path):
    record(path, 1)
    raise ValueError("cannot rebuild")


class FailsWhenUnpickled:
    """An argument whose unpickling (in the worker) records one line in *path*, then raises."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_fail_unpickling, (self.path,))


class KillsWhenUnpickled:
    """An argument whose unpickling kills the worker (as an OOM kill of a large one would)."""

    def __reduce__(self):
        return (os._exit, (7,))


_shared: dict = {}


def keep_shared(lock, counter, q=None):
    """An initializer: keep what the pool hands every worker (see use_shared)."""
    _shared.update(lock=lock, counter=counter, q=q)


def use_shared(x):
    """Count *x* in the shared counter under the shared lock, and put it in the queue."""
    with _shared["lock"]:
        _shared["counter"].value += 1
    if _shared["q"] is not None:
        _shared["q"].put(x)
    return x


def nap_then_record(path, x, seconds):
    """Sleep, then ``record`` x: what is recorded ran to its end."""
    time.sleep(seconds)
    return record(path, x)


def fork_and_end_child(x, how):
    """Fork; the child ends *how* ("exit3": sys.exit(3), "return": returns, "raise": raises)
    without os._exit -- back into the worker's code; the task returns (x, child's exit code)."""
    pid = os.fork()
    if pid == 0:
        if how == "exit3":
            sys.exit(3)
        if how == "raise":
            raise ValueError("raised in the child")
        return "the child's value"
    _, status = os.waitpid(pid, 0)
    return x, os.waitstatus_to_exitcode(status)


def killed_initializer(path):
    """An initializer its worker dies of, by SIGKILL (as the out-of-memory killer does), after
    appending a line to *path* (one per worker start)."""
    import signal

    with open(path, "a") as f:
        f.write("started\n")
    os.kill(os.getpid(), signal.SIGKILL)


def fill(arr, value):
    """Write 1, 2, 3... into a shared array and 7 into a shared value, in place."""
    for i in range(len(arr)):
        arr[i] = i + 1.0
    value.value = 7


def set_all(arr, value):
    """Set every element of a shared array to *value*, in place; return the first."""
    arr[:] = value
    return arr[0]


def record_and_fork_on_zero(path, x):
    """``record`` x; for x == 0 also fork a child that returns from here (into the worker's
    code, not os._exit) and wait for it."""
    record(path, x)
    if x == 0:
        pid = os.fork()
        if pid == 0:
            return x
        os.waitpid(pid, 0)
    return x


def _chained(n):
    try:
        if n == 0:
            raise KeyError("root")
        _chained(n - 1)
    except Exception as exc:
        raise ValueError(f"level {n}") from exc


def raise_long_chain_just_before(limit):
    """Spin until 10 ms before *limit*, then raise an error whose traceback takes long to
    format (300 chained causes): the soft timeout must not land in the formatting."""
    end = time.monotonic() + limit - 0.01
    while time.monotonic() < end:
        pass
    _chained(300)


def flush_late_then(seconds):
    """Return at once for 0, else sleep *seconds* (a timed call's untimed follower)."""
    if seconds:
        time.sleep(seconds)
    return seconds


def record_twice(path, x):
    """``record`` x, under another function's name (a task apart from ``record``'s runs)."""
    return record(path, x)


class Scale:
    """A callable object with state: ``Scale(k)(x) == k * x``."""

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return self.k * x


def fork_and_return():
    """An initializer that forks a child and forgets ``os._exit`` in it: both return."""
    os.fork()


_IMPORTED_BY = os.getpid()  # (a forked worker has the parent's number here, not its own)


def _rebuild_slowly(args):
    if os.getpid() == _IMPORTED_BY:
        time.sleep(0.5)  # slow to unpickle in the parent (a large payload, say)
    return SlowToRebuild(*args)


class SlowToRebuild(Exception):
    """An exception that takes 0.5 s to unpickle in the process that imported this module."""

    def __reduce__(self):
        return _rebuild_slowly, (self.args,)


def fail_once_slowly(path):
    """Raise SlowToRebuild the first time (no *path* yet), then return "ok on retry"."""
    time.sleep(0.1)
    if not os.path.exists(path):
        open(path, "w").close()
        raise SlowToRebuild("transient")
    return "ok on retry"


def set_socket_default_timeout(seconds=0.01):
    """An initializer: a program that sets socket.setdefaulttimeout() in its workers."""
    import socket

    socket.setdefaulttimeout(seconds)


def hold_ipc_ends(*objs):
    """A task that is given procpool Queues or Pipe ends: rebuilds them in the worker."""
    return len(objs)
