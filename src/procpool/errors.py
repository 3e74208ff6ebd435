"""The exceptions procpool raises.

Everything procpool raises in the caller on its own account derives from :class:`ProcpoolError`
(``TaskTimeout``, raised *inside* a task, is a plain ``Exception`` so a task's handlers see it
like any other error).  Where the
standard library defines an error for the same situation, procpool raises the standard one
(``ValueError`` for a closed pool, ``multiprocessing.TimeoutError`` from ``AsyncResult.get``),
so code written for :mod:`multiprocessing` keeps working.
"""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor
from multiprocessing import TimeoutError  # the stdlib's class, so `except mp.TimeoutError` works

__all__ = [
    "ProcpoolError",
    "WorkerLostError",
    "TaskTimeout",
    "TaskTimeoutError",
    "SerializationError",
    "RemoteError",
    "RemoteTraceback",
    "InitializerError",
    "PoolTerminated",
    "TimeoutError",
]


class ProcpoolError(Exception):
    """Base class of the errors procpool raises on its own account."""


class WorkerLostError(ProcpoolError):
    """The worker running a task died before the task finished.

    Raised for the task that worker was running when it was killed by a signal (SIGKILL, the OOM
    killer, a segfault) or exited (``os._exit``), and for tasks it had just finished whose
    results had not been sent yet (``result_lost``).  Tasks it held but had not started are
    sent to another worker instead.  ``exitcode`` is the exit status (negative: the signal
    number, as :attr:`multiprocessing.Process.exitcode`); ``attempts`` counts the runs tried.
    Deliberately not a ``TimeoutError``: nothing timed out, the process is gone.
    """

    def __init__(
        self,
        message: str,
        exitcode: int | None = None,
        attempts: int = 1,
        result_lost: bool = False,
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.attempts = attempts
        #: True when the task had finished but its result died with the worker (it was
        #: waiting to be sent with the next ones); False for the task that was running.
        self.result_lost = result_lost

    def __reduce__(self):  # keep the attributes across pickling
        return (type(self), (self.args[0], self.exitcode, self.attempts, self.result_lost))


class TaskTimeout(Exception):
    """Raised *inside* a task when its time limit is reached (soft timeout).

    Catch it in the task to clean up; the caller then receives :class:`TaskTimeoutError`.
    """


class TaskTimeoutError(ProcpoolError, TimeoutError):
    """The caller's view of a task that ran past its ``timeout``.

    Subclasses :class:`multiprocessing.TimeoutError`, so ``except multiprocessing.TimeoutError``
    also catches it.  ``hard`` is true when the worker had to be killed because the task did not
    end within the grace period after the soft timeout.
    """

    def __init__(self, message: str, timeout: float | None = None, hard: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.hard = hard

    def __reduce__(self):
        return (type(self), (self.args[0], self.timeout, self.hard))


class SerializationError(ProcpoolError, pickle.PicklingError, TypeError):
    """An argument, function or result could not be pickled or unpickled.

    The message names the object and the reason; the original pickling error is the
    ``__cause__``.  Also a :class:`pickle.PicklingError` and a :class:`TypeError`, what
    :mod:`multiprocessing` raises there (``cannot pickle '_thread.lock' object``), so code
    written for it that catches either still does.
    """


class RemoteError(ProcpoolError):
    """A task raised an exception that could not be carried back intact.

    Used when the exception itself cannot be pickled, or cannot be rebuilt in the caller (a class
    local to the task, an ``__init__`` that does not round-trip, a module the caller cannot
    import).  ``type_name`` and the message of the original are kept; the worker's traceback is
    the ``__cause__``.
    """

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self):
        return (type(self), (self.args[0], self.type_name))


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback; set as ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class InitializerError(ProcpoolError, BrokenExecutor):
    """A worker's ``initializer`` raised; the pool is broken and runs no tasks.

    Also a :class:`concurrent.futures.BrokenExecutor`, what executors raise when their
    initializer fails (``except BrokenExecutor`` catches it; the stdlib's own
    ``BrokenProcessPool`` is a sibling, not a base).

    The initializer's own exception is the ``__cause__``.
    """


class PoolTerminated(ProcpoolError):
    """The pool was terminated (``terminate()``, leaving the ``with`` block) before the task could
    finish.  (``shutdown(cancel_futures=True)`` cancels futures instead: ``CancelledError``.)"""
