"""The caller's side of :class:`~procpool.backends.dask.DaskPool`: units in, results out.

The data flow is drawn in :mod:`procpool.backends.dask`.  Here:

- :class:`_Unit`: one Dask task as the caller sees it (which items, which result object).
- :class:`_Engine`: submits units (``_run_unit`` with a ``_Payload``, from
  :mod:`procpool.backends._dask_worker`), runs the pool's delivery thread (``as_completed``,
  one ``gather`` per batch, exceptions rebuilt, result objects fed), and shuts the client and
  cluster down.
- :func:`_dask_error`: Dask's own failure of a unit in procpool's terms (``KilledWorker`` ->
  :class:`~procpool.WorkerLostError`).
- :class:`_Feeder`: reads a lazy ``imap``'s input a bounded number of chunks ahead of what the
  caller consumed, sizing chunks to about :data:`ADAPTIVE_TARGET_S` of work or of reading.
- :func:`_check_portable`: refuses procpool's IPC objects as task arguments.
"""

from __future__ import annotations

import functools
import pickle
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from typing import Any

import distributed
from distributed import KilledWorker

from .._errinfo import rebuild_error
from ..errors import PoolTerminated, SerializationError, WorkerLostError
from ..results import WAIT_SLICE, Future, IMapIterator
from ._dask_worker import STARMAP, _Outcome, _Payload, _run_unit

#: a lazy ``imap`` without a chunksize grows its chunks until each is about this much work
ADAPTIVE_TARGET_S = 0.05
#: ... but never beyond this many items
ADAPTIVE_MAX_CHUNK = 4096

#: terminate: how long a nanny of the own cluster waits for its worker process before killing
#: it (the nanny's own default, when the cluster closes, is 4 s)
KILL_WAIT = 0.5

# pool states, as multiprocessing names them
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"

#: the modules of procpool's IPC primitives: their objects hold file descriptors of this machine
_IPC_MODULES = frozenset({"procpool.queue", "procpool.pipe", "procpool.shared", "procpool.sync"})
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})


# ==================================================================== units


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


# ==================================================================== the engine


class _Engine:
    """Submits units to Dask, delivers their outcomes to the result objects, shuts down.

    Owns the Dask client (unless the caller lent one), the cluster (when it started it) and the
    delivery thread.  Holds no reference to the :class:`~procpool.backends.dask.DaskPool`, so a pool that is dropped is
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
        # an RLock: a Condition over it releases and retakes it in C (over a Lock, in Python:
        # a Ctrl-C in a caller's wait could leave it released, the `with` then releasing it
        # again, maybe under the delivery thread; found by a review)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # units, feeders or state changed
        self._units: dict[Any, tuple[_Unit, distributed.Future]] = {}  # Dask key -> unit
        self._feeders: set[_Feeder] = set()
        # one thread settles results at a time: a MapResult counts its chunks without a lock
        self._settle_lock = threading.RLock()
        self._delivering: int | None = None  # the thread settling (see results._never_delivered)
        self._settling = 0  # units taken out of _units and not settled yet (join waits for them)
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
            self._deliver(batch)
            # not kept while the next next_batch() waits: the batch's Dask futures (and so
            # the results on the workers) must go as soon as the caller drops its result
            del batch

    def _deliver(self, batch: list[distributed.Future]) -> None:
        """Fetch the outcomes of the Dask tasks *batch* (ended) and settle their units."""
        with self._lock:  # None: settled already (terminate, cancel)
            entries = [(self._units.get(f.key), f) for f in batch]
        done = [(entry[0], f) for entry, f in entries if entry is not None]
        finished = [f for _, f in done if f.status == "finished"]
        blobs = self._fetch(finished)
        with self._lock:
            settle = []
            for unit, future in done:
                if not isinstance(blobs.get(future.key), bytes) and _recomputing(future):
                    # the result was lost with its worker before it was fetched: Dask
                    # computes it again, and as_completed reports it again
                    self._completed.add(future)
                elif self._units.pop(future.key, None) is not None:
                    settle.append((unit, future))
            self._settling += len(settle)
        try:
            for unit, future in settle:
                self._settle(unit, future, blobs.get(future.key))
        finally:  # (join() returns once the callbacks have run and the results are in)
            with self._lock:
                self._settling -= len(settle)
                if not self._units and not self._settling:
                    self._changed.notify_all()

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
        """Hand a unit's outcome (*blob*, its fetched bytes) or its failure to its sink."""
        status = future.status
        if isinstance(blob, bytes):  # fetched (the status may say "lost" since: it is here)
            self._settle_outcome(unit, blob)
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

    def _settle_outcome(self, unit: _Unit, blob: bytes) -> None:
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
        errors = {i: rebuild_error(info, _ItemView(unit, i)) for i, info in outcome.errors.items()}
        self._hand_over(unit.sink._on_chunk, unit, outcome.values, errors)

    def _settle_error(self, unit: _Unit, exc: BaseException) -> None:
        self._hand_over(unit.sink._on_error, unit, exc)

    def _hand_over(self, deliver: Callable[..., object], *args: Any) -> None:
        """``deliver(*args)``: a result object settled, its callbacks run, one thread at a
        time.  The thread is recorded meanwhile: a callback that waited, untimed, for
        another result of the pool would hold the deliveries for good, terminate() too;
        it gets a RuntimeError instead (results._never_delivered)."""
        with self._settle_lock:
            outer, self._delivering = self._delivering, threading.get_ident()
            try:
                deliver(*args)
            except BaseException:  # noqa: BLE001 - a callback's failure is the caller's
                traceback.print_exc()
            finally:
                self._delivering = outer

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
        # (from a callback, the delivery thread: what it is settling waits for it to return)
        mine = threading.current_thread() is self._thread
        with self._lock:
            while self._units or self._feeders or (self._settling and not mine):
                left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(min(left, WAIT_SLICE))  # (in slices: see WAIT_SLICE)
        self._stop()

    def cancel_outstanding(self, exc: BaseException) -> None:
        """Fail every unit not settled yet with *exc*, and cancel their Dask tasks."""
        with self._lock:
            entries = list(self._units.values())
            self._units.clear()
            feeders = list(self._feeders)
            self._feeders.clear()
            self._changed.notify_all()
        self._cancel(entries, exc)
        for feeder in feeders:
            feeder.abort(exc)

    def _cancel(self, entries: list[tuple[_Unit, distributed.Future]], exc: BaseException) -> None:
        """Cancel the Dask tasks of *entries* (taken out of ``_units``), failing each with *exc*."""
        if entries:
            try:
                self.client.cancel([future for _, future in entries], force=True)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass
        for unit, _ in entries:
            self._settle_error(unit, exc)

    def cancel_unstarted(self) -> None:
        """``shutdown(cancel_futures=True)``: fail the units no worker has started with
        CancelledError (their Dask tasks cancelled), and stop reading the imap inputs.

        Dask does not say when a task starts: a task the scheduler has given to a worker
        (``processing``) counts as started, although it may still wait there behind another,
        and is left to finish, as are the tasks that ended.  ``submit()``'s futures are
        *running* from the start (``cancel()`` returns False), so they are never cancelled:
        a running future must not end with CancelledError while ``cancelled()`` is False.
        """
        try:
            given = {key for keys in self.client.processing().values() for key in keys}
        except Exception:  # noqa: BLE001 - the cluster is gone: nothing is cancelled
            return
        with self._lock:
            entries = [
                (unit, future)
                for key, (unit, future) in self._units.items()
                if key not in given and not future.done() and not isinstance(unit.sink, Future)
            ]
            for _, future in entries:
                del self._units[future.key]
            feeders = list(self._feeders)
            self._feeders.clear()
            self._changed.notify_all()
        self._cancel(entries, CancelledError())
        for feeder in feeders:
            feeder.abort(CancelledError())

    def terminate(self) -> None:
        """Fail what is outstanding with PoolTerminated, then stop (idempotent)."""
        with self._lock:
            self.state = TERMINATE
        self.cancel_outstanding(PoolTerminated("the pool was terminated"))
        self._stop(now=True)

    def _stop(self, now: bool = False) -> None:
        """Stop the delivery thread, then release the client and the own cluster; *now*
        (terminate): the own cluster's worker processes are killed at once, not waited for."""
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
            if now:
                self._kill_own_workers()
            _quietly(self.cluster.close)

    def _kill_own_workers(self) -> None:
        """Kill the own cluster's worker processes (terminate).  Closing the cluster asks each
        to stop, and a nanny waits 4 s for one still running a task before it kills it."""
        cluster = self.cluster
        assert cluster is not None
        for nanny in list(cluster.workers.values()):
            kill = getattr(nanny, "kill", None)  # (a Nanny; a thread Worker has none)
            if kill is not None:
                _quietly(functools.partial(cluster.sync, kill, timeout=KILL_WAIT))


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - shutting down: the cluster may already be gone
        pass


# ==================================================================== Dask's failures


def _recomputing(future: distributed.Future) -> bool:
    """Dask lost the task's result with its worker and is computing it again.

    The client says "lost" until the scheduler re-queues the task, then "pending"; neither is
    an outcome: the task ends again as finished, or as an error once ``allowed-failures``
    workers died running it (``KilledWorker``)."""
    return future.status in ("lost", "pending")


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


# ==================================================================== the imap feeder


class _Feeder:
    """Reads an ``imap``'s input a bounded number of chunks ahead of what the caller consumed.

    The input is read in the caller's thread (in :meth:`~procpool.backends.dask.DaskPool.imap` and when the iterator
    hands back consumed results, which it does before it waits), never in the delivery thread:
    a generator that waits for results of the same ``imap`` cannot block their delivery.

    One thread reads at a time (``_reading``); a thread that finds another one reading leaves
    the work to it, which looks at the window again after each chunk.  The lock guards only the
    bookkeeping: it is never held while the input is read or a chunk submitted, so that
    ``terminate()`` (:meth:`abort`) and a consumer handing back results (:meth:`release`) never
    wait for a slow input.
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
        self._reading = False  # a thread is in feed(), reading and submitting
        self._read = 0  # items read and submitted
        self._consumed = 0  # results the caller took
        self._ends: deque[int] = deque()  # end index of each chunk not yet fully consumed
        self._per_item: float | None = None  # measured seconds per item (adaptive chunks)
        self._done = False

    def feed(self) -> None:
        """Submit chunks until *window* chunks are ahead of the caller or the input ends
        (returns at once if another thread is doing it)."""
        with self._lock:
            if self._reading:
                return
            self._reading = True
        try:
            while True:
                with self._lock:  # deciding to stop and saying so in one step: a release()
                    if self._done or len(self._ends) >= self._window:  # after it feeds
                        self._reading = False
                        return
                    size = self._next_size()
                self._feed_chunk(size)
        except BaseException:  # e.g. a KeyboardInterrupt in the input: the next call reads on
            with self._lock:
                self._reading = False
            raise

    def _feed_chunk(self, size: int) -> None:
        """Read up to *size* items and submit them as one unit (the reading thread only)."""
        items, error, ended = self._read_chunk(size)
        for i, item in enumerate(items):
            try:
                _check_arguments((item,), self._kind, self._label)
            except SerializationError as exc:  # an input error at its position: the items
                items, error, ended = items[:i], exc, True  # before it still run (as with
                break  # a chunksize of 1), then the iteration raises it
        with self._lock:
            if self._done:  # aborted (terminate) while we read: what was read is dropped
                return
            unit = _Unit(
                self._sink, self._label, self._timeout, self._read, len(items), self, single=False
            )
            self._read += len(items)
            if items:
                self._ends.append(self._read)
        if items:
            payload = _Payload(self._func, self._kind, items, {}, self._timeout)
            try:
                self._engine.submit(unit, payload)
            except SerializationError as exc:  # Dask cannot pickle an item: that chunk's error
                self._engine._settle_error(unit, exc)
            except Exception as exc:  # noqa: BLE001 - the client is closed, the scheduler gone:
                # that chunk's error, and the input's end (counted and never sent, the chunk
                # was waited for, and join() raised the client's error, for good)
                self._engine._settle_error(unit, exc)
                ended, error = True, exc
        if ended:
            self._finish(error)

    def _read_chunk(self, size: int) -> tuple[list, BaseException | None, bool]:
        """Up to *size* items of the input: (items, the input's error, whether it ended).

        An adaptive chunk also ends once reading it took :data:`ADAPTIVE_TARGET_S`: the size
        is measured on the workers' compute time only, and a slowly produced input would
        otherwise be read for thousands of items before anything is submitted.
        """
        items: list = []
        deadline = None if self._chunksize is not None else time.monotonic() + ADAPTIVE_TARGET_S
        try:
            for item in self._input:
                items.append(tuple(item) if self._kind == STARMAP else item)
                if len(items) >= size or (deadline is not None and time.monotonic() >= deadline):
                    return items, None, False
        except Exception as exc:  # noqa: BLE001 - raised after the items read before it
            return items, exc, True
        return items, None, True

    def release(self, total: int) -> None:
        """The caller took *total* results in all (a total: see IMapIterator._flush_release):
        read on."""
        with self._lock:
            self._consumed = max(self._consumed, total)
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
        """The pool ended: the iteration stops after what was submitted, then raises *exc*."""
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
        """The input ended (with *error*, if it raised): the iteration ends after what was read."""
        with self._lock:
            if self._done:  # aborted meanwhile: abort() told the sink
                return
            self._done = True
            self._sink._end_of_input(self._read, error)
        self._engine.feeder_done(self)


# ==================================================================== what may not travel


def _check_arguments(items: Iterable[Any], kind: int, where: str) -> None:
    """:func:`_check_portable` for each argument of a chunk's *items* (one argument per item
    of a map; the argument tuples of a starmap)."""
    for item in items:
        for arg in item if kind == STARMAP else (item,):
            _check_portable(arg, where)


def _check_portable(obj: Any, where: str, depth: int = 0) -> None:
    """Refuse procpool IPC objects in a task argument *obj*: they cannot cross machines.

    A procpool Queue, Pipe, Value, SharedArray or lock is a handful of file descriptors and
    shared memory of *this* machine.  Dask would fail to pickle it somewhere in its event loop;
    raising here names the argument instead.  Looks into lists, tuples, sets and dicts three
    levels deep (``[[[queue]]]`` is refused), not into the attributes of other objects.
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
