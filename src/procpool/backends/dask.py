"""DaskPool: procpool's ``Pool`` API on a Dask cluster, for when one machine is not enough.

::

 caller threads                        this process                            the Dask cluster
 ──────────────                        ────────────                            ────────────────
 apply / apply_async / submit ─► one _Unit ──┐
 map / starmap (input read at once) ─► chunks ├─► client.submit(_run_unit,   ─► a worker process:
 imap / imap_unordered ─► _Feeder ─► chunks ─┘    _Payload), one Dask task      _run_unit runs the
      (reads the input a bounded number of chunks    per unit                   items, catching each
       ahead of what the caller consumed)                                       item's error
 AsyncResult / MapResult / IMapIterator / Future ◄── delivery thread ◄── as_completed ◄── _Outcome

- A *unit* (:class:`_Unit`) is one Dask task: a single call, or a chunk of a map.  Chunking is
  what makes tiny tasks affordable: a Dask task costs around a millisecond of scheduler and
  network work, so a map sends ``len / (4 * workers)`` items per task, and a lazy ``imap``
  grows its chunks until each is about :data:`ADAPTIVE_TARGET_S` of work.
- The result objects are procpool's own (:mod:`procpool.results`), fed by one delivery thread
  per pool: ``get(timeout)``, callbacks, map error ordering and ``imap`` iteration behave
  exactly as with the local :class:`procpool.Pool`.
- Errors: the worker catches each item's exception and sends procpool's *error tuple* back
  (:mod:`procpool._errinfo`), so the caller re-raises the same type with the worker's traceback
  as ``__cause__``, and one failing item does not fail the other items of its chunk.  Dask's
  own failures are translated: ``KilledWorker`` (the worker process died running the task, as
  many times as the scheduler's ``allowed-failures`` allows) becomes
  :class:`~procpool.WorkerLostError`.
- Per-task timeouts are *soft*: a watchdog thread in the worker raises
  :class:`~procpool.TaskTimeout` in the task's thread (Dask runs tasks in threads, so the local
  pool's ``SIGALRM`` cannot reach them), and the caller gets
  :class:`~procpool.TaskTimeoutError`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import math
import os
import pickle
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future
from typing import Any, NamedTuple, TypeVar

try:
    import distributed
    from distributed import KilledWorker
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("procpool.backends.dask needs Dask: pip install 'procpool[dask]'") from exc

import cloudpickle

from .._errinfo import error_info, rebuild_error
from ..errors import PoolTerminated, SerializationError, TaskTimeout, WorkerLostError
from ..results import AsyncResult, FutureSink, IMapIterator, MapResult

T = TypeVar("T")

__all__ = ["DaskPool"]

#: a lazy ``imap`` without a chunksize grows its chunks until each is about this much work
ADAPTIVE_TARGET_S = 0.05
#: ... but never beyond this many items
ADAPTIVE_MAX_CHUNK = 4096
#: chunks an ``imap`` keeps submitted and not yet consumed, per worker (default ``prefetch``)
PREFETCH_PER_WORKER = 4
#: pickle protocol of the outcomes the workers send back
PROTOCOL = 5

# what a unit's items are: one call (args + kwds), map items, starmap argument tuples
CALL, MAP, STARMAP = 0, 1, 2

# pool states, as multiprocessing names them
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"

#: the modules of procpool's IPC primitives: their objects hold file descriptors of this machine
_IPC_MODULES = frozenset({"procpool.queue", "procpool.pipe", "procpool.shared", "procpool.sync"})
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})


# ==================================================================== what runs on the worker


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


# ==================================================================== the caller's side


class _Unit:
    """One Dask task as the caller sees it: which items, and where their results go."""

    __slots__ = ("sink", "label", "index", "n_items", "timeout", "feeder", "single")

    def __init__(
        self,
        sink: Any,
        label: str,
        timeout: float | None,
        index: int = 0,
        n_items: int = 1,
        feeder: _Feeder | None = None,
        single: bool = True,
    ) -> None:
        self.sink, self.label, self.timeout = sink, label, timeout
        self.index, self.n_items, self.feeder, self.single = index, n_items, feeder, single

    def describe(self, item: int | None = None) -> str:
        """'task (f)' or 'items 100-199 of map(f)', for error messages."""
        if self.single:
            return f"task ({self.label})"
        if item is not None:
            return f"item {self.index + item} of {self.label}"
        last = self.index + self.n_items - 1
        items = f"item {self.index}" if last == self.index else f"items {self.index}-{last}"
        return f"{items} of {self.label}"


class _ItemView:
    """What :func:`procpool._errinfo.rebuild_error` needs to name one failed item."""

    __slots__ = ("unit", "item", "timeout")

    def __init__(self, unit: _Unit, item: int) -> None:
        self.unit, self.item, self.timeout = unit, item, unit.timeout

    def describe(self) -> str:
        return self.unit.describe(self.item)


class _Engine:
    """Submits units to Dask, delivers their outcomes to the result objects, shuts down.

    Owns the Dask client (unless the caller lent one), the cluster (when it started it) and the
    delivery thread.  Holds no reference to the :class:`DaskPool`, so a pool that is dropped is
    finalized and its cluster shut down.
    """

    def __init__(
        self,
        client: distributed.Client,
        own_client: bool,
        cluster: distributed.LocalCluster | None,
    ) -> None:
        self.client = client
        self.own_client = own_client
        self.cluster = cluster
        self.state = RUN
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # units, feeders or state changed
        self._units: dict[Any, tuple[_Unit, distributed.Future]] = {}  # Dask key -> unit
        self._feeders: set[_Feeder] = set()
        # one thread settles results at a time: a MapResult counts its chunks without a lock
        self._settle_lock = threading.RLock()
        # as_completed only reports that a task ended; the delivery thread fetches the data
        # itself, so that a failure to fetch is an error it can hand to the caller
        self._completed = distributed.as_completed(loop=client.loop)
        self._stopped = False
        self._thread = threading.Thread(
            target=self._deliver_loop, name="procpool-dask-results", daemon=True
        )
        self._thread.start()

    # -- submitting ---------------------------------------------------------------------
    def check_running(self) -> None:
        if self.state != RUN:
            raise ValueError("Pool not running")

    def submit(self, unit: _Unit, payload: _Payload) -> None:
        """Send one unit to Dask (also after close(), for an imap that is still being read)."""
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in unit.label)[:60]
        try:
            future = self.client.submit(
                _run_unit, payload, key=f"procpool-{name}-{uuid.uuid4().hex}", pure=False
            )
        except (TypeError, pickle.PicklingError) as exc:  # Dask could not pickle the task
            raise SerializationError(
                f"cannot send {unit.describe()} to Dask: {str(exc)[:500]}"
            ) from exc
        with self._lock:
            if self.state == TERMINATE:
                terminated = True
            else:
                terminated = False
                self._units[future.key] = (unit, future)
                self._completed.add(future)
                self._changed.notify_all()
        if terminated:
            future.cancel()
            self._settle_error(unit, PoolTerminated("the pool was terminated"))

    def add_feeder(self, feeder: _Feeder) -> None:
        with self._lock:
            self._feeders.add(feeder)

    def feeder_done(self, feeder: _Feeder) -> None:
        with self._lock:
            self._feeders.discard(feeder)
            self._changed.notify_all()

    # -- delivering ---------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        while True:
            try:
                batch = self._completed.next_batch(block=True)
            except StopIteration:  # nothing in flight: sleep until something is submitted
                with self._lock:
                    while not self._units and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                continue
            with self._lock:  # None: settled already (terminate, cancel)
                entries = [(self._units.get(f.key), f) for f in batch]
            done = [(entry[0], f) for entry, f in entries if entry is not None]
            finished = [f for _, f in done if f.status == "finished"]
            blobs = self._fetch(finished)
            with self._lock:
                done = [(u, f) for u, f in done if self._units.pop(f.key, None) is not None]
                if not self._units:
                    self._changed.notify_all()  # join() may be waiting for this
            for unit, future in done:
                self._settle(unit, future, blobs.get(future.key))

    def _fetch(self, futures: list[distributed.Future]) -> dict[Any, Any]:
        """The pickled outcomes of *futures* (one round trip), or the error fetching each."""
        if not futures:
            return {}
        try:
            return dict(zip([f.key for f in futures], self.client.gather(futures), strict=True))
        except Exception:  # noqa: BLE001 - fetch one by one to find which failed
            pass
        blobs: dict[Any, Any] = {}
        for future in futures:
            try:
                blobs[future.key] = future.result()
            except BaseException as exc:  # noqa: BLE001 - becomes that unit's error
                blobs[future.key] = exc
        return blobs

    def _settle(self, unit: _Unit, future: distributed.Future, blob: Any) -> None:
        status = future.status
        if status == "finished" and isinstance(blob, bytes):
            try:
                outcome: _Outcome = pickle.loads(blob)
            except Exception as why:  # noqa: BLE001 - e.g. a class this machine cannot import
                err = SerializationError(
                    f"the result of {unit.describe()} could not be unpickled: {why!r}"
                )
                self._settle_error(unit, err)
                return
            if unit.feeder is not None:
                unit.feeder.observe(unit.n_items, outcome.seconds)
            errors = {
                i: rebuild_error(info, _ItemView(unit, i)) for i, info in outcome.errors.items()
            }
            with self._settle_lock:
                try:
                    unit.sink._on_chunk(unit, outcome.values, errors)
                except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                    traceback.print_exc()
        elif status == "finished":  # fetching the data failed
            self._settle_error(unit, blob)
        elif status == "error":
            try:
                exc = future.exception()
            except BaseException as why:  # noqa: BLE001
                exc = why
            self._settle_error(unit, _dask_error(unit, exc))
        else:  # cancelled by Dask (the client lost its scheduler, someone cancelled the key)
            self._settle_error(unit, CancelledError(f"Dask cancelled {unit.describe()}"))

    def _settle_error(self, unit: _Unit, exc: BaseException) -> None:
        with self._settle_lock:
            try:
                unit.sink._on_error(unit, exc)
            except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                traceback.print_exc()

    # -- ending -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self.state == RUN:
                self.state = CLOSE

    def join(self, timeout: float | None) -> None:
        """Wait until every unit is settled and every imap input read, then stop.

        An ``imap`` whose caller has not consumed its results yet has the rest of its input
        read and submitted here, as :mod:`multiprocessing` would have done up front: nobody can
        consume while the caller waits in ``join``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            feeders = list(self._feeders)
        for feeder in feeders:  # nobody may consume while we wait: read the rest now
            feeder.drain()
        with self._lock:
            while self._units or self._feeders:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._changed.wait(left)
        self._stop()

    def cancel_outstanding(self, exc: BaseException) -> None:
        """Fail every unit not settled yet with *exc*, and cancel their Dask tasks."""
        with self._lock:
            entries = list(self._units.values())
            self._units.clear()
            feeders = list(self._feeders)
            self._feeders.clear()
            self._changed.notify_all()
        if entries:
            try:
                self.client.cancel([future for _, future in entries], force=True)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass
        for unit, _ in entries:
            self._settle_error(unit, exc)
        for feeder in feeders:
            feeder.abort(exc)

    def terminate(self) -> None:
        """Fail what is outstanding with PoolTerminated, then stop (idempotent)."""
        with self._lock:
            self.state = TERMINATE
        self.cancel_outstanding(PoolTerminated("the pool was terminated"))
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self.state = TERMINATE
            self._changed.notify_all()
        self._completed.clear()  # the delivery thread's next_batch then ends within 0.1 s
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        if self.own_client:
            _quietly(self.client.close)
        if self.cluster is not None:
            _quietly(self.cluster.close)


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - shutting down: the cluster may already be gone
        pass


def _dask_error(unit: _Unit, exc: BaseException) -> BaseException:
    """Dask's own failure of a unit, in procpool's terms."""
    if isinstance(exc, KilledWorker):
        worker = getattr(getattr(exc, "last_worker", None), "address", "?")
        attempts = getattr(exc, "allowed_failures", 0) + 1
        lost = WorkerLostError(
            f"the Dask worker process running {unit.describe()} died "
            f"(last on {worker}; tried on {attempts} worker(s))",
            attempts=attempts,
        )
        lost.__cause__ = exc
        return lost
    return exc  # with the traceback Dask rebuilt


class _Feeder:
    """Reads an ``imap``'s input a bounded number of chunks ahead of what the caller consumed.

    The input is read in the caller's thread (in :meth:`DaskPool.imap` and when the iterator
    hands back consumed results, which it does before it waits), never in the delivery thread:
    a generator that waits for results of the same ``imap`` cannot block their delivery.
    """

    def __init__(
        self,
        engine: _Engine,
        func: Callable[..., Any],
        kind: int,
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout: float | None,
        sink: IMapIterator,
        label: str,
        window: int,
    ) -> None:
        self._engine, self._func, self._kind = engine, func, kind
        self._input = iter(iterable)
        self._chunksize, self._timeout, self._sink, self._label = chunksize, timeout, sink, label
        self._window = window
        self._lock = threading.Lock()
        self._read = 0  # items read and submitted
        self._consumed = 0  # results the caller took
        self._ends: deque[int] = deque()  # end index of each chunk not yet fully consumed
        self._per_item: float | None = None  # measured seconds per item (adaptive chunks)
        self._done = False

    def feed(self) -> None:
        """Submit chunks until *window* chunks are ahead of the caller or the input ends."""
        with self._lock:
            while not self._done and len(self._ends) < self._window:
                n = self._next_size()
                try:
                    items = list(itertools.islice(self._input, n))
                    if self._kind == STARMAP:
                        items = [tuple(args) for args in items]
                    _check_portable(items, self._label)
                except Exception as exc:  # noqa: BLE001 - raised at the iteration's end
                    self._finish(exc)
                    return
                if items:
                    unit = _Unit(
                        self._sink,
                        self._label,
                        self._timeout,
                        self._read,
                        len(items),
                        self,
                        single=False,
                    )
                    payload = _Payload(self._func, self._kind, items, {}, self._timeout)
                    self._engine.submit(unit, payload)
                    self._read += len(items)
                    self._ends.append(self._read)
                if len(items) < n:
                    self._finish(None)

    def release(self, n: int) -> None:
        """The caller took *n* more results: read on."""
        with self._lock:
            self._consumed += n
            while self._ends and self._ends[0] <= self._consumed:
                self._ends.popleft()
        self.feed()

    def drain(self) -> None:
        """Submit the rest of the input now, however long (the pool is being joined)."""
        with self._lock:
            self._window = sys.maxsize
        self.feed()

    def observe(self, n_items: int, seconds: float) -> None:
        """A chunk of *n_items* took *seconds* on its worker (the delivery thread calls this)."""
        per_item = seconds / max(1, n_items)
        prev = self._per_item
        self._per_item = per_item if prev is None else 0.5 * prev + 0.5 * per_item

    def abort(self, exc: BaseException) -> None:
        """The pool ended: the iteration stops after what was read, then raises *exc*."""
        with self._lock:
            if not self._done:
                self._done = True
                self._sink._end_of_input(self._read, exc)

    def _next_size(self) -> int:
        if self._chunksize is not None:
            return self._chunksize
        if self._per_item is None:
            return 1  # probe: nothing measured yet
        size = ADAPTIVE_TARGET_S / max(self._per_item, 1e-9)
        return max(1, min(ADAPTIVE_MAX_CHUNK, int(size)))

    def _finish(self, error: BaseException | None) -> None:
        self._done = True
        self._sink._end_of_input(self._read, error)
        self._engine.feeder_done(self)


def _check_portable(obj: Any, where: str, depth: int = 0) -> None:
    """Refuse procpool IPC objects in a task's arguments: they cannot cross machines.

    A procpool Queue, Pipe, Value, SharedArray or lock is a handful of file descriptors and
    shared memory of *this* machine.  Dask would fail to pickle it somewhere in its event loop;
    raising here names the argument instead.  Looks into lists, tuples, sets and dicts (three
    levels deep), not into the attributes of other objects.
    """
    kind = type(obj)
    if kind in _PLAIN:
        return
    if kind.__module__ in _IPC_MODULES:
        raise SerializationError(
            f"{kind.__module__}.{kind.__qualname__} cannot be passed to a DaskPool task ({where}):"
            " procpool's IPC objects are file descriptors and shared memory of this machine,"
            " and Dask workers may run elsewhere. Use Dask's own (distributed.Queue, Variable,"
            " Lock) or return values instead."
        )
    if depth >= 3:
        return
    if kind in (list, tuple, set, frozenset):
        for x in obj:
            _check_portable(x, where, depth + 1)
    elif kind is dict:
        for k, v in obj.items():
            _check_portable(k, where, depth + 1)
            _check_portable(v, where, depth + 1)


def _label(name: str, func: Any) -> str:
    return f"{name}({getattr(func, '__qualname__', None) or type(func).__name__})"


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds or None")


def _check_chunksize(chunksize: int | None) -> None:
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")


def _default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ==================================================================== the pool


class DaskPool(concurrent.futures.Executor):
    """The :class:`procpool.Pool` API on a Dask cluster.

    ``DaskPool()`` starts a local cluster of its own (one single-threaded worker process per
    CPU, on 127.0.0.1, no dashboard) and shuts it down on :meth:`close` + :meth:`join`,
    :meth:`terminate` or leaving the ``with`` block.  ``DaskPool(address="tcp://host:8786")`` or
    ``DaskPool(client=client)`` uses a cluster that already runs, and never shuts it down.

    Example::

        from procpool.backends.dask import DaskPool

        with DaskPool(address="tcp://scheduler:8786") as pool:
            print(pool.apply_async(pow, (2, 10)).get(timeout=30))   # 1024
            print(pool.map(abs, range(-5, 0)))                       # [5, 4, 3, 2, 1]

    What differs from the local pool (see ``docs/dask.md``): arguments and results always travel
    by pickle over the network (no shared-memory path), procpool's IPC objects cannot be task
    arguments (:class:`~procpool.SerializationError`), per-task timeouts are soft only, and a
    worker that dies fails its task with :class:`~procpool.WorkerLostError` only once Dask's
    ``allowed-failures`` retries are used up.

    Args:
        processes: worker processes of the cluster this pool starts (default: the CPUs this
            process may use).  Not allowed with *address* or *client*.
        address: the scheduler address of a running Dask cluster.
        client: a :class:`distributed.Client` to use (the caller keeps owning it).
        timeout: default time limit in seconds for each task or map item (soft: raised inside
            the task as :class:`~procpool.TaskTimeout`; see :class:`_Watchdog`).
        allowed_failures: how many times a task may be re-run after its worker died before it
            fails with ``WorkerLostError`` (default: Dask's ``allowed-failures``, 3).  Only for
            the cluster this pool starts; an external cluster's scheduler has its own setting.
        prefetch: chunks an ``imap`` keeps submitted ahead of the caller (default: 4 per worker).
        cluster_kwargs: more keyword arguments for the ``distributed.LocalCluster`` this pool
            starts (e.g. ``memory_limit``).
    """

    def __init__(
        self,
        processes: int | None = None,
        *,
        address: str | None = None,
        client: distributed.Client | None = None,
        timeout: float | None = None,
        allowed_failures: int | None = None,
        prefetch: int | None = None,
        cluster_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if address is not None and client is not None:
            raise ValueError("give an address or a client, not both")
        external = address is not None or client is not None
        if external and (processes is not None or allowed_failures is not None or cluster_kwargs):
            raise ValueError(
                "processes, allowed_failures and cluster_kwargs are for the cluster DaskPool "
                "starts itself, not for an existing one"
            )
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if allowed_failures is not None and (
            not isinstance(allowed_failures, int) or allowed_failures < 0
        ):
            raise ValueError("allowed_failures must be a non-negative int")
        if prefetch is not None and (not isinstance(prefetch, int) or prefetch < 1):
            raise ValueError("prefetch must be a positive int")
        _check_timeout(timeout)
        self._timeout = timeout
        cluster: distributed.LocalCluster | None = None
        if client is not None:
            engine_client, own_client = client, False
        elif address is not None:
            engine_client, own_client = distributed.Client(address, set_as_default=False), True
        else:
            options: dict[str, Any] = {
                "host": "127.0.0.1",
                "n_workers": processes or _default_processes(),
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
            # no dashboard; the scheduler's small HTTP server (health, metrics) is always
            # started, by default on port 8787: a free port on loopback instead
            scheduler_kwargs: dict[str, Any] = {"dashboard_address": "127.0.0.1:0"}
            if allowed_failures is not None:
                scheduler_kwargs["allowed_failures"] = allowed_failures
            options["scheduler_kwargs"] = scheduler_kwargs
            options.update(cluster_kwargs or {})
            cluster = distributed.LocalCluster(**options)
            try:
                engine_client = distributed.Client(cluster, set_as_default=False)
            except BaseException:
                cluster.close()
                raise
            own_client = True
        self._engine = _Engine(engine_client, own_client, cluster)
        self._prefetch = prefetch
        # a pool dropped without close() or still alive at exit is terminated, not leaked
        self._finalizer = weakref.finalize(self, self._engine.terminate)

    # ---------------------------------------------------------------- introspection
    @property
    def client(self) -> distributed.Client:
        """The Dask client this pool submits through."""
        return self._engine.client

    @property
    def processes(self) -> int:
        """The worker threads of the cluster now (one per process on the pool's own cluster)."""
        return max(1, sum(self._engine.client.nthreads().values()))

    # ---------------------------------------------------------------- one task
    def apply(
        self, func: Callable[..., T], args: Iterable[Any] = (), kwds: dict | None = None
    ) -> T:
        """Run ``func(*args, **kwds)`` on a Dask worker and return its result (blocking)."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncResult[T]:
        """Queue ``func(*args, **kwds)``; return an :class:`~procpool.AsyncResult`.

        *callback* / *error_callback* run with the result / exception in the pool's delivery
        thread, as in :mod:`multiprocessing`; keep them short.  *timeout* (seconds) limits the
        task's run time (default: the pool's).  Raises ``ValueError`` if the pool is closed.
        """
        self._engine.check_running()
        result: AsyncResult[T] = AsyncResult(callback, error_callback)
        self._submit_call(func, args, kwds, result, timeout)
        return result

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; return a :class:`concurrent.futures.Future`.

        The pool's ``timeout`` applies.  Raises ``RuntimeError`` after :meth:`close` or
        :meth:`shutdown`, as executors do.  The future is *running* from the start (Dask does not
        say when a task starts), so ``future.cancel()`` returns False.
        """
        if self._engine.state != RUN:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()
        self._submit_call(fn, args, kwargs, FutureSink(future), None)
        return future

    def _submit_call(
        self, func: Callable[..., Any], args: Iterable[Any], kwds: dict | None, sink: Any, timeout
    ) -> None:
        limit = self._task_timeout(timeout)
        call_args, call_kwds = tuple(args), dict(kwds) if kwds else {}
        label = _label("apply", func)
        _check_portable((call_args, call_kwds), label)
        unit = _Unit(sink, getattr(func, "__qualname__", None) or type(func).__name__, limit)
        self._engine.submit(unit, _Payload(func, CALL, [call_args], call_kwds, limit))

    # ---------------------------------------------------------------- many tasks
    def map(  # type: ignore[override]
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> list[T]:
        """Apply *func* to every item on the cluster; return the list of results in order.

        The items are read at once and sent ``chunksize`` per Dask task (default:
        ``len / (4 * workers)``, as :mod:`multiprocessing` chooses).  If items fail, the others
        still complete, then the exception of the first failing item is raised.
        """
        return self.map_async(func, iterable, chunksize, timeout=timeout).get()

    def map_async(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
        fail_fast: bool = False,
    ) -> MapResult:
        """Like :meth:`map` but return a :class:`~procpool.MapResult` at once."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, timeout, fail_fast, MAP
        )

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> list[T]:
        """Like :meth:`map` but each item is unpacked as arguments: ``func(*item)``."""
        return self.starmap_async(func, iterable, chunksize, timeout=timeout).get()

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
        fail_fast: bool = False,
    ) -> MapResult:
        """Like :meth:`starmap` but return a :class:`~procpool.MapResult` at once."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, timeout, fail_fast, STARMAP
        )

    def _map_async(
        self, func, iterable, chunksize, callback, error_callback, timeout, fail_fast, kind
    ) -> MapResult:
        self._engine.check_running()
        _check_chunksize(chunksize)
        limit = self._task_timeout(timeout)
        items = list(iterable) if kind == MAP else [tuple(args) for args in iterable]
        label = _label("map" if kind == MAP else "starmap", func)
        _check_portable(items, label)
        result = MapResult(len(items), label, callback, error_callback, fail_fast)
        if chunksize is None:
            chunksize = max(1, math.ceil(len(items) / (4 * self.processes)))
        for start in range(0, len(items), chunksize):
            chunk = items[start : start + chunksize]
            unit = _Unit(result, label, limit, start, len(chunk), single=False)
            self._engine.submit(unit, _Payload(func, kind, chunk, {}, limit))
        return result

    def imap(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> IMapIterator[T]:
        """Apply *func* to every item; return an iterator over the results, in order.

        The input is read lazily, at most ``prefetch`` chunks ahead of the results consumed:
        an infinite generator works.  Without *chunksize*, chunks start at one item and grow
        until each is about 50 ms of work.  ``it.next(timeout)`` waits at most *timeout*
        seconds for the next result (``multiprocessing.TimeoutError``).
        """
        return self._imap(func, iterable, chunksize, timeout, ordered=True)

    def imap_unordered(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> IMapIterator[T]:
        """Like :meth:`imap` but results come in completion order."""
        return self._imap(func, iterable, chunksize, timeout, ordered=False)

    def _imap(self, func, iterable, chunksize, timeout, ordered) -> IMapIterator:
        self._engine.check_running()
        _check_chunksize(chunksize)
        limit = self._task_timeout(timeout)
        window = self._prefetch or PREFETCH_PER_WORKER * self.processes
        it: IMapIterator = IMapIterator(ordered, release=lambda n: None)
        label = _label("imap" if ordered else "imap_unordered", func)
        feeder = _Feeder(self._engine, func, MAP, iterable, chunksize, limit, it, label, window)
        it._release = feeder.release
        self._engine.add_feeder(feeder)
        feeder.feed()
        return it

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Accept no more tasks; :meth:`join` then waits for the queued ones."""
        self._engine.close()

    def terminate(self) -> None:
        """Stop now: unfinished tasks fail with ``PoolTerminated``; the own cluster shuts down.

        Dask cannot stop a task that already runs on a worker of an external cluster; its
        result is dropped.
        """
        self._finalizer()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the queued tasks, then release the client and cluster; close() first."""
        if self._engine.state == RUN:
            raise ValueError("Pool is still running")
        self._engine.join(timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor-style shutdown: close, optionally cancel what is queued, and wait."""
        if cancel_futures:
            self._engine.cancel_outstanding(CancelledError())
        self.close()
        if wait:
            self._engine.join(None)

    def __enter__(self) -> DaskPool:
        self._engine.check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()  # as multiprocessing.Pool does

    def __repr__(self) -> str:
        where = "own cluster" if self._engine.cluster is not None else "external cluster"
        return f"<procpool.backends.dask.DaskPool state={self._engine.state} {where}>"

    # ---------------------------------------------------------------- helpers
    def _task_timeout(self, timeout: float | None) -> float | None:
        _check_timeout(timeout)
        return self._timeout if timeout is None else timeout
