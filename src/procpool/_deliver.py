"""Deliveries: results, errors and callbacks handed to the caller's objects, outside the lock.

The I/O thread (and a caller's thread that read a reply itself) queues what it has read as
*deliveries* under the scheduler's lock -- ``("results", tasks, records, fds)`` for a RESULTS
frame, ``("values", ...)`` and ``("members", ...)`` for plain values, ``("error", task,
exception)``, ``("call", function, args)`` -- and :meth:`Delivery._deliver` unpickles them and
calls the sinks (``AsyncResult``, ``Future``, an imap iterator...) and their callbacks with the
lock released, one thread at a time, in order.  A callback may then submit more work; one that
raises is printed, as ``multiprocessing`` does, and never stops the pool.  A Ctrl-C in a
delivering caller loses nothing and delivers nothing twice (``_deliver_all``).

A mixin of :class:`procpool._scheduler.Scheduler`.
"""

from __future__ import annotations

import pickle
import threading
import traceback
from concurrent.futures import CancelledError

from . import _protocol as P
from . import _serialize
from ._errinfo import rebuild_error
from ._start import program_signals
from ._supervise import CLOSING, FINISHED, TERMINATING
from ._tasks import _DONE, _PENDING, BARE, Task
from .errors import SerializationError
from .results import untold

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any


class Delivery:
    """Mixin: delivering what was read to the caller's objects (see the module docstring)."""

    # provided by Scheduler
    _lock: Any
    _state: str
    _broken: BaseException | None
    _pending: Any
    _deliveries: list[Any]
    _deliver_lock: Any
    _delivering: int | None
    _deciding: set[int]
    _thread: threading.Thread

    if TYPE_CHECKING:  # Scheduler's own methods, used here

        def _wake(self) -> None: ...
        def _stopped_error(self) -> BaseException: ...

    def _fail(self, task: Task, error: BaseException) -> None:
        if task.kind == P.CALLS:  # a run: a delivery per member (its callbacks run apart, as
            sink = task.sink  # for tasks of their own) and a cancel's exception its own
            fresh = type(error) is CancelledError
            cancelled = sink.cancelled or ()  # (members cancel(force=True) stopped)
            items = [
                (
                    "error",
                    Task.unsent(member, task.label),
                    CancelledError() if fresh or i in cancelled else error,
                )
                for i, member in enumerate(sink.members[sink.got :], sink.got)
                if not member._done or untold(member)
            ]
            task.state = _DONE  # (from here on: no Python call)
            self._deliveries += items
            return
        task.state = _DONE
        task.release()
        self._deliveries.append(("error", task, error))

    def _deliver(self, wait: bool = True) -> None:
        """Unpickle results and run the caller's sinks and callbacks, outside the lock.

        One thread at a time (``_deliver_lock``): a MapResult counts its chunks without a lock.
        Without *wait*, return at once if another thread delivers: it delivers what is queued
        (a caller with a deadline must not wait behind another task's slow callback; only one
        that comes in the instant between the other's taking the lock and saying so waits).
        """
        if self._deliveries:
            me = threading.get_ident()
            if not wait and self._delivering not in (None, me):
                return  # (the thread delivering delivers what is queued too)
            # A with, not acquire() and a try: CPython raises a Ctrl-C's exception as a call
            # returns, so one landing as acquire() returned left the lock held for good and
            # every later delivery -- terminate() included -- waited on it (a Ctrl-C storm
            # over an apply loop showed it).  The C-level with releases it whatever comes.
            with self._deliver_lock:
                outer, self._delivering = self._delivering, me
                try:
                    if threading.current_thread() is self._thread:
                        with program_signals():  # callbacks are the caller's code
                            self._deliver_all()
                    else:
                        self._deliver_all()
                finally:
                    self._delivering = outer

    def _deliver_all(self) -> None:
        """Deliver what is queued, in order.  A Ctrl-C in a caller's thread delivering loses
        nothing and delivers nothing twice: what is left of the batch goes back to the front
        of the queue, for the I/O thread, and the caller gets its interrupt.  Each item says
        itself how far it got: a delivered one leaves None in ``batch[at]``, one stopped
        midway what is left of it -- the part it had begun counts as delivered (a callback
        took the interrupt) -- and one not begun is left as it is."""
        while True:
            batch: list[Any] = []
            at = 0  # the item being delivered (those before it are)
            try:
                with self._lock:
                    batch, self._deliveries = self._deliveries, []
                if not batch:
                    return
                for at, item in enumerate(batch):
                    kind = item[0]
                    if kind == "results":
                        self._deliver_results(item[1], item[2], item[3], batch, at)
                    elif kind == "values":
                        self._deliver_values(item[1], batch, at)
                    elif kind == "members":
                        self._deliver_members(item[1], item[2], batch, at)
                    else:
                        batch[at] = None  # (begun)
                        try:
                            if kind == "error":
                                task, error = item[1], item[2]
                                task.sink._on_error(task, error)
                            else:
                                item[1](*item[2])
                        except KeyboardInterrupt:
                            raise
                        except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                            traceback.print_exc()
            except KeyboardInterrupt:
                rest = [item for item in batch[at:] if item is not None]
                with self._lock:
                    self._deliveries[:0] = rest
                    self._wake()
                raise

    def _deliver_results(
        self, tasks: list[Task], recs: list, rfds: list, batch: list[Any], i: int
    ) -> None:
        """Deliver the records of one RESULTS frame (``batch[i]``, see _on_results).

        The common record, a plain value (no out-of-band buffer or fd) for one call, is handled
        inline: this loop runs once per task.
        """
        loads = pickle.loads
        ok, call = P.OK, P.CALL
        k = 0  # tasks delivered, or begun (see _deliver_all)
        try:
            for j, task in enumerate(tasks):
                k = j + 1
                try:
                    rec = recs[j]
                    fds = rfds[j]
                    nbuf = rec[3]
                    if rec[1] == ok and task.kind == call and not fds and not nbuf:
                        if type(task.payload) not in BARE:  # nothing to release
                            task.release()
                        try:
                            value = loads(rec[5])
                        except BaseException as exc:  # noqa: BLE001 - as in _deliver_result
                            task.sink._on_error(task, self._unpickling_error(task, exc))
                            continue
                        task.sink._on_result(task, value)
                    else:
                        self._deliver_result(task, rec[1], rec[5], nbuf, fds)
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                    traceback.print_exc()
            batch[i] = None  # (delivered: in the try, so that nothing can come between)
        except KeyboardInterrupt:  # what is left of this item (see _deliver_all)
            more = k < len(tasks)
            batch[i] = ("results", tasks[k:], recs[k:], rfds[k:]) if more else None
            if k:  # the one begun counts as delivered: no retry is being decided for it
                self._decided(tasks[k - 1])
            raise

    def _deliver_values(self, values: list, batch: list[Any], i: int) -> None:
        """Deliver the ``[task, value, ...]`` of a frame's VALUES records (``batch[i]``)."""
        k = 0  # entries delivered, or begun (see _deliver_all)
        try:
            for j in range(0, len(values), 2):
                k = j + 2
                task = values[j]
                try:
                    if type(task.payload) not in BARE:  # nothing to release
                        task.release()
                    task.sink._on_result(task, values[j + 1])
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                    traceback.print_exc()
            batch[i] = None  # (delivered: in the try, so that nothing can come between)
        except KeyboardInterrupt:  # what is left of this item (see _deliver_all)
            batch[i] = ("values", values[k:]) if k < len(values) else None
            raise

    def _deliver_members(self, results: list, values: list, batch: list[Any], i: int) -> None:
        """Deliver the plain values of run members (see CallRun), ``batch[i]``."""
        k = 0  # members delivered, or begun (see _deliver_all)
        try:
            if getattr(results[0], "needs_start", False):
                # Futures: settled together (k stays 0: settling one again does nothing);
                # those waited on, one by one (their callbacks) -- rebound in one statement
                waited = type(results[0])._settle_run(results, values)
                results, values = [f for f, _ in waited], [v for _, v in waited]
            for j in range(len(results)):
                k = j + 1
                try:
                    results[j]._on_result(None, values[j])
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                    traceback.print_exc()
            batch[i] = None  # (delivered: in the try, so that nothing can come between)
        except KeyboardInterrupt:  # what is left of this item (see _deliver_all)
            batch[i] = ("members", results[k:], values[k:]) if k < len(results) else None
            raise

    def _deliver_result(self, task: Task, status, data, nbuf, fds) -> None:
        sink = task.sink
        if status == P.ERROR:  # (a plain stream: see _worker.add_result -- fds, if any, closed)
            deciding = bool(task.retry_on) and task.attempts <= task.retries  # (_on_results)
            try:
                error = rebuild_error(
                    _serialize.loads(data, nbuf, fds) if fds else pickle.loads(data), task
                )
                if deciding and isinstance(error, task.retry_on):
                    self._requeue(task)  # keeps its payload (and fds) for the next run
                    return
            finally:
                if deciding:
                    self._decided(task)
            task.release()
            sink._on_error(task, error)
            return
        task.release()
        try:
            value = _serialize.loads(data, nbuf, fds)
        except BaseException as exc:  # noqa: BLE001 - never lets a bad result kill the thread
            sink._on_error(task, self._unpickling_error(task, exc))
            return
        if status == P.OK:
            if task.kind == P.CALL:
                sink._on_result(task, value)
            else:
                sink._on_chunk(task, value, {})
        else:
            values, errors = value
            start = task.index
            sink._on_chunk(
                task, values, {i: rebuild_error(e, task, start + i) for i, e in errors.items()}
            )

    @staticmethod
    def _unpickling_error(task: Task, exc: BaseException) -> SerializationError:
        err = SerializationError(f"the result of {task.describe()} could not be unpickled: {exc!r}")
        err.__cause__ = exc
        return err

    def _decided(self, task: Task) -> None:
        """*task*'s retry_on decision is made, or its delivery given up (a Ctrl-C there): a
        closing pool may end now (see _on_results, _has_work)."""
        with self._lock:
            if task.id in self._deciding:
                self._deciding.discard(task.id)
                if self._state == CLOSING:
                    self._wake()

    def _requeue(self, task: Task) -> None:
        with self._lock:
            if self._state in (TERMINATING, FINISHED) or self._broken is not None:
                self._fail(task, self._stopped_error())
            else:
                task.state = _PENDING
                self._pending.appendleft(task)
                self._wake()
                return
        self._deliver()
