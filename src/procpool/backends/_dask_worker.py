"""What runs on the Dask workers for :class:`~procpool.backends.dask.DaskPool`.

Each Dask task is :func:`_run_unit` applied to a :class:`_Payload`: it runs the unit's items,
catching each item's exception as procpool's error tuple, and returns a pickled
:class:`_Outcome`; :class:`_Watchdog` enforces soft per-item timeouts.  Dask pickles these by
reference, so every worker imports this module: keep it free of Dask and of the caller's side
(``_dask_engine``).
"""

from __future__ import annotations

import ctypes
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import cloudpickle

from .._errinfo import error_info
from ..errors import SerializationError, TaskTimeout

T = TypeVar("T")

#: pickle protocol of the outcomes the workers send back
PROTOCOL = 5

# what a unit's items are: one call (args + kwds), map items, starmap argument tuples
CALL, MAP, STARMAP = 0, 1, 2


class _Payload:
    """What one Dask task carries to the worker.

    One opaque object rather than separate arguments, because Dask walks list, tuple and dict
    arguments looking for futures: a chunk of ten thousand items would be walked item by item.
    """

    __slots__ = ("func", "kind", "items", "kwds", "timeout")

    def __init__(
        self, func: Callable[..., Any], kind: int, items: list, kwds: dict, timeout: float | None
    ) -> None:
        self.func, self.kind, self.items, self.kwds, self.timeout = func, kind, items, kwds, timeout


class _Outcome(NamedTuple):
    """What one Dask task sends back (pickled): a value per item, the failed items' errors."""

    values: list
    errors: dict[int, tuple]  # item index -> procpool error tuple (see _errinfo)
    seconds: float  # how long the items took on the worker (sizes lazy imap chunks)


def _run_unit(payload: _Payload) -> bytes:
    """Run a unit's items on the Dask worker; an item's exception is caught and sent back.

    The outcome is pickled here rather than by Dask: a result Dask cannot pickle would fail
    only when the caller fetches it, deep in Dask's event loop, and the caller would wait
    forever.  Here it becomes that item's :class:`~procpool.SerializationError`.
    """
    start = time.perf_counter()
    func, kind, kwds, timeout = payload.func, payload.kind, payload.kwds, payload.timeout
    values: list[Any] = []
    errors: dict[int, tuple] = {}
    for i, item in enumerate(payload.items):
        try:
            if timeout is None:
                values.append(_call(func, kind, item, kwds))
            else:
                values.append(_WATCHDOG.run(timeout, _call, func, kind, item, kwds))
        except BaseException as exc:  # noqa: BLE001 - one item fails, the others go on
            errors[i] = error_info(exc)
            values.append(None)
    return _pickle_outcome(_Outcome(values, errors, time.perf_counter() - start))


def _dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:  # noqa: BLE001 - lambdas, closures, __main__ classes: cloudpickle can
        return cloudpickle.dumps(obj, PROTOCOL)


def _pickle_outcome(outcome: _Outcome) -> bytes:
    try:
        return _dumps(outcome)
    except Exception:  # noqa: BLE001 - find the values that cannot travel (the slow path)
        pass
    values, errors = list(outcome.values), dict(outcome.errors)
    for i, value in enumerate(values):
        if i not in errors:
            try:
                _dumps(value)
            except Exception as why:  # noqa: BLE001
                err = SerializationError(f"the result of the task could not be pickled: {why!r}")
                errors[i] = error_info(err)
                values[i] = None
    return _dumps(_Outcome(values, errors, outcome.seconds))


def _call(func: Callable[..., Any], kind: int, item: Any, kwds: dict) -> Any:
    if kind == MAP:
        return func(item)
    return func(*item, **kwds)  # CALL: item is the args tuple; STARMAP: kwds is empty


# ==================================================================== soft timeouts


class _ItemTimeout(TaskTimeout):
    """The :class:`TaskTimeout` the watchdog raises (an exception *class* is all it can send)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("task exceeded its time limit",)))


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise *exc* in thread *thread_id* at its next bytecode (None: forget a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), None if exc is None else ctypes.py_object(exc)
    )


class _Watchdog:
    """Soft timeouts on a Dask worker: raises TaskTimeout in a thread whose item runs too long.

    Dask runs tasks in a thread pool, not in the main thread, so ``SIGALRM`` (the local pool's
    way) cannot reach them.  One daemon thread per worker process keeps the deadlines and, at
    one, raises the exception in the task's thread with ``PyThreadState_SetAsyncExc``.  It
    lands at that thread's next Python bytecode: a task blocked in C (``time.sleep``, a long
    numpy call) sees it when that call returns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._deadlines: dict[int, float] = {}  # thread id -> monotonic deadline
        self._fired: set[int] = set()  # threads sent an exception since their item started
        self._thread: threading.Thread | None = None

    def run(self, seconds: float, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, with :class:`TaskTimeout` raised inside it after *seconds*."""
        me = threading.get_ident()
        with self._lock:
            self._fired.discard(me)
            self._deadlines[me] = time.monotonic() + seconds
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="procpool-dask-watchdog", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        try:
            return fn(*args)
        finally:
            with self._lock:  # after this no exception can be sent to this item
                self._deadlines.pop(me, None)
                if me in self._fired:
                    self._fired.discard(me)
                    # sent but maybe not delivered yet (the item ended right at its limit):
                    # it must not land in whatever this thread runs next
                    _set_async_exc(me, None)

    def _loop(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for tid, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[tid]
                        self._fired.add(tid)
                        _set_async_exc(tid, _ItemTimeout)
                soonest = min(self._deadlines.values(), default=None)
                self._wake.wait(None if soonest is None else soonest - now)


_WATCHDOG = _Watchdog()
