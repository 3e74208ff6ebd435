"""Tasks and fault-injecting objects for the fault grid (``test_grid.py``).

Everything here lives in an importable module so that ``fork``, ``forkserver`` and ``spawn``
workers find it by reference.  Each object performs its fault at one precise *point* of a
task's trip through the pool:

=====================  ==================================================================
``ArgBomb``            point 1: its ``__reduce__`` returns ``(detonate_unless_home, ...)``,
                       so the fault fires when the *worker* unpickles the task's arguments.
                       Pickling it calls nothing; unpickling it in the process that created
                       it (the test) returns a harmless :class:`Defused` instead.
``FuncBomb``           point 1 (the function): the same, for the task's *function* (sent
                       once per worker in a FUNC frame, unpickled before the task starts).
``run_fault``          point 2: the task itself performs the fault.
``ResultBomb``         point 3: returned by ``return_result_bomb``; its ``__reduce__`` fires
                       when the worker pickles the result (only in the process that made it).
``big_result_then_fault``  point 4: returns a result whose pickle is tens of MB *in band*
                       (a ``str``, or a list of sub-256-KiB ``bytes``: no memfd) and starts a
                       watcher thread that fires the fault as soon as the worker's main thread
                       is inside ``Channel.send_frame`` -- i.e. while the result is being
                       written to the socket (the parent reads it 64 KiB at a time).
``ParentBomb``         point 5: returned by ``return_parent_bomb``; rebuilding it raises, but
                       only in a process other than the worker that created it (the parent).
``ParentBombError``    point 5 for an *exception*: the task raises it; the worker's own
                       round-trip check rebuilds it fine, the parent's rebuild raises.
=====================  ==================================================================
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import resource
import signal
import sys
import threading
import time

# kind -> (words in WorkerLostError's message, WorkerLostError.exitcode)
DEATHS = {
    "sigkill": ("was killed by signal 9 (SIGKILL)", -signal.SIGKILL),
    "sigterm": ("was killed by signal 15 (SIGTERM)", -signal.SIGTERM),
    "os_exit": ("exited with code 3", 3),
    "segfault": ("was killed by signal 11 (SIGSEGV)", -signal.SIGSEGV),
    "abort": ("was killed by signal 6 (SIGABRT)", -signal.SIGABRT),
}


class GridError(ValueError):
    """A plain ``Exception`` fault (the reference row: not a BaseException, no death)."""


# kind -> the exception type the fault raises
RAISES = {
    "system_exit": SystemExit,
    "keyboard_interrupt": KeyboardInterrupt,
    "error": GridError,
}

KINDS = list(DEATHS) + list(RAISES)


def _no_core_dump() -> None:
    """A crash must not write a core file, nor a faulthandler dump (pytest enables faulthandler
    and fork workers inherit it): the outcome is what counts, not the noise."""
    faulthandler.disable()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


def fire(kind: str) -> None:
    """Perform the fault *kind* in the calling process (kills it, or raises)."""
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif kind == "os_exit":
        os._exit(3)
    elif kind == "segfault":
        _no_core_dump()
        ctypes.string_at(0)
    elif kind == "abort":
        _no_core_dump()
        os.abort()
    elif kind == "system_exit":
        raise SystemExit(7)
    elif kind == "keyboard_interrupt":
        raise KeyboardInterrupt("grid fault")
    elif kind == "error":
        raise GridError("grid fault")
    else:
        raise AssertionError(f"unknown fault kind {kind!r}")
    time.sleep(30)  # a signal sent to ourselves is delivered before this; never reached
    os._exit(99)


# ====================================================================== plain tasks
def square(x):
    return x * x


def getpid(_=None):
    return os.getpid()


def identity(*args):
    return args


def mark_and_sleep(directory, i, seconds):
    """Say (a file ``<i>-<pid>`` in *directory*) that item *i* runs on this worker, then sleep."""
    path = os.path.join(directory, f"{i}-{os.getpid()}")
    with open(path + ".tmp", "w"):
        pass
    os.replace(path + ".tmp", path)
    time.sleep(seconds)
    return i * i


# ====================================================================== point 1: unpickling
class Defused:
    """What a bomb becomes when it is unpickled in the process that created it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, *args):
        return ("defused", self.kind, args)


def _count(path: str | None) -> None:
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


def detonate_unless_home(kind: str, home: int, counter: str | None = None):
    """The reconstructor of ArgBomb/FuncBomb: fires in any process but the one that made it."""
    if os.getpid() == home:
        return Defused(kind)
    _count(counter)
    fire(kind)
    return Defused(kind)  # not reached


class ArgBomb:
    """A task argument that performs *kind* while the worker unpickles it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.home = os.getpid()

    def __reduce__(self):
        return (detonate_unless_home, (self.kind, self.home))


class FuncBomb:
    """A task *function* that performs *kind* while the worker unpickles it.  *counter* (a
    file) gets one line per worker that unpickled it -- i.e. per worker it killed."""

    def __init__(self, kind: str, counter: str) -> None:
        self.kind = kind
        self.counter = counter
        self.home = os.getpid()

    def __call__(self, *args):  # pragma: no cover - never called in a worker
        return args

    def __reduce__(self):
        return (detonate_unless_home, (self.kind, self.home, self.counter))


def takes_arg(arg):
    return "ran with " + type(arg).__name__


# ====================================================================== point 2: running
def run_fault(kind):
    fire(kind)


# ====================================================================== point 3: result pickling
class ResultBomb:
    """A result that performs *kind* while the worker pickles it (only in its own process)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.home = os.getpid()

    def __reduce__(self):
        if os.getpid() == self.home:
            fire(self.kind)
        return (Defused, (self.kind,))


def return_result_bomb(kind):
    return ResultBomb(kind)


# ====================================================================== point 4: mid-write
def _frames_of(ident: int) -> list[str]:
    frame = sys._current_frames().get(ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _fault_mid_write(kind: str, main_ident: int, marker: str) -> None:
    """Wait until the worker's main thread is writing a frame, then fire.  If it is back to
    waiting for the next frame first (the write finished), do nothing."""
    deadline = time.monotonic() + 20
    left_task = False
    while time.monotonic() < deadline:
        names = _frames_of(main_ident)
        if "send_frame" in names:
            with open(marker, "w") as f:
                f.write("mid-write")
            fire(kind)
        if "big_result_then_fault" not in names:
            left_task = True
        if left_task and "recv_frame" in names:
            with open(marker, "w") as f:
                f.write("missed")
            return
        time.sleep(0.0002)


def big_result_then_fault(kind, nbytes, shape, marker):
    """Return ~*nbytes* of in-band pickle while a watcher thread fires *kind* mid-write."""
    if shape == "str":
        value = "x" * nbytes
    else:  # a list of 64 KiB bytes objects: each below the out-of-band threshold
        chunk = 64 * 1024
        value = [bytes([i % 251]) * chunk for i in range(nbytes // chunk)]
    watcher = threading.Thread(
        target=_fault_mid_write, args=(kind, threading.get_ident(), marker), daemon=True
    )
    watcher.start()
    return value


# ====================================================================== point 5: parent side
def rebuild_parent_bomb(kind: str, home: int):
    """Rebuilds fine in the worker that made it; raises *kind* anywhere else (the parent)."""
    if os.getpid() != home:
        fire(kind)
    return Defused(kind)


class ParentBomb:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.home = os.getpid()

    def __reduce__(self):
        return (rebuild_parent_bomb, (self.kind, self.home))


def return_parent_bomb(kind):
    return ParentBomb(kind)


def parent_bomb_at(i, kind, bad):
    """For map: item *bad* returns a ParentBomb, the others their square."""
    return ParentBomb(kind) if i == bad else i * i


def rebuild_parent_bomb_error(kind: str, home: int, message: str):
    if os.getpid() != home:
        fire(kind)
    return ParentBombError(kind, message)


class ParentBombError(Exception):
    """An exception that rebuilds in the worker (its round-trip check) but not in the parent."""

    def __init__(self, kind: str, message: str = "raised by the task") -> None:
        super().__init__(message)
        self.kind = kind
        self.home = os.getpid()

    def __reduce__(self):
        return (rebuild_parent_bomb_error, (self.kind, self.home, self.args[0]))


def raise_parent_bomb_error(kind):
    raise ParentBombError(kind)
