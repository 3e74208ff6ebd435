"""What the caller holds while a task runs: AsyncResult, MapResult, IMapIterator, Future glue.

Each class is a *sink* for the scheduler: the I/O thread calls ``_on_result`` / ``_on_error`` /
``_on_chunk`` once per task (never under the scheduler's lock), and the caller waits on it.
``AsyncResult`` keeps no lock of its own until somebody actually waits: a pool running a million
small tasks creates a million results, most of which are ready before anyone looks.
"""

from __future__ import annotations

import _thread
import concurrent.futures
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import CancelledError

from .errors import TimeoutError

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any, Generic, TypeVar

    T = TypeVar("T")
else:
    from ._typing import Generic, T


_WAITER_LOCK = threading.Lock()


def _note(exc: BaseException, text: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python >= 3.11
    if add_note is not None:
        try:
            add_note(text)
        except Exception:
            pass


#: A blocked wait returns to Python at least this often (seconds).  A signal that arrives after
#: CPython's lock acquire has released the GIL but before it blocks runs only the C-level
#: handler: the wait is not interrupted, and Python's handler -- Ctrl-C's KeyboardInterrupt --
#: would wait for the wait to end (seen under load: a caught Ctrl-C lost in ``map``).  Coming
#: back to the interpreter lets it run the handler.
WAIT_SLICE = 0.1


def _never_delivered(result: Any) -> None:
    """Raise RuntimeError when the calling thread is the one delivering the results of
    *result*'s pool: it runs one of that pool's callbacks (or is the pool's I/O thread
    running one), and no other thread can deliver a result while it holds the deliveries --
    an untimed wait for one that has not come would never return.  (``apply`` and a lone
    task's ``get()`` first read their own reply, see ``Scheduler.drive``: that still works.)
    Also when this thread runs *result*'s own callback: it is ready once that returns."""
    if getattr(result, "_calling", None) == threading.get_ident():
        raise RuntimeError(
            "waiting, with no timeout, for a result inside its own callback, which would never"
            " return: the result is ready once its callback has returned (the callback is"
            " given its value)"
        )
    pool = result._pool
    # (a procpool pool's scheduler, or a DaskPool's engine: both say who delivers)
    sched = getattr(result, "_sched", None) or getattr(
        pool, "_sched", getattr(pool, "_engine", None)
    )
    owner = getattr(sched, "_owner", None)
    if owner is not None and owner != os.getpid():
        raise RuntimeError(
            "waiting, with no timeout, in a forked child for a result of its parent's pool,"
            " which would never come: the pool is not running here"
        )
    if sched is not None and getattr(sched, "_delivering", None) == threading.get_ident():
        raise RuntimeError(
            "waiting, with no timeout, inside a callback of this pool for another of its"
            " results, which would never come: the callback runs in the thread that delivers"
            " the pool's results. Wait in another thread, or give that call a callback of its"
            " own (apply_async / map_async(..., callback=...))"
        )


class _Wakeup:
    """Wake-ups for threads waiting on a result, with no lock held while they sleep.

    ``threading.Condition.wait`` releases and re-acquires its lock in Python code; a Ctrl-C
    landing in between leaves the lock in the wrong state, and the caller's ``with`` block then
    raises ``RuntimeError: ... un-acquired lock`` on top of the KeyboardInterrupt.  Here each
    waiter sleeps on a private lock of its own that the notifier releases: an interrupt during
    the sleep leaves nothing shared behind.  Use: under the owner's lock, check the condition
    and ``prepare()``; then, with no lock held, ``sleep()``.  The notifier changes the state
    (under the owner's lock, or before reading the owner's ``_Wakeup`` reference) and calls
    ``notify_all()``, so a change between the check and the sleep is never missed.
    """

    __slots__ = ("_mutex", "_waiters")

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: list[Any] = []

    def prepare(self) -> Any:
        waiter = _thread.allocate_lock()
        waiter.acquire()
        with self._mutex:
            self._waiters.append(waiter)
        return waiter

    def notify_all(self) -> None:
        fresh: list[Any] = []  # (made outside the mutex: a collection it set off could run a
        with self._mutex:  # loop's close, which notifies, in this thread: see _chunk_views)
            waiters, self._waiters = self._waiters, fresh
        for waiter in waiters:
            waiter.release()

    def sleep(self, waiter: Any, timeout: float | None) -> bool:
        """Sleep until notified (True) or *timeout* seconds pass (False), in slices of
        :data:`WAIT_SLICE` seconds: see there."""
        try:
            deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
            while True:
                left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if waiter.acquire(True, max(0.0, min(left, WAIT_SLICE))):
                    return True
                if deadline is not None and left <= WAIT_SLICE:
                    return False
        finally:
            with self._mutex:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


class AsyncResult(Generic[T]):
    """The result of :meth:`Pool.apply_async`, as in :mod:`multiprocessing`.

    ``get(timeout)`` returns the value or raises the task's exception (the worker's traceback
    is its ``__cause__``); it raises ``multiprocessing.TimeoutError`` if *timeout* passes first.
    """

    __slots__ = (
        "_done",
        "_ok",
        "_value",
        "_event",
        "_callback",
        "_error_callback",
        "_sched",
        "_task",
        "_pool",
        "_entry",
        "_args",
        "_calling",  # the thread running its callback, while it does (see _never_delivered)
        "__weakref__",
    )

    def __init__(
        self,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._done = False
        self._ok = False
        self._value: Any = None
        self._event: _Wakeup | None = None
        self._callback = callback
        self._error_callback = error_callback
        # the scheduler and the task, while not done (two slots, not a tuple: one object fewer
        # per task for the garbage collector to track when a million results are in flight)
        self._sched: Any = None
        self._task: Any = None
        # the pool, while not done: a pool only its results refer to (``Pool(2).map_async``)
        # must live until they are in, as in multiprocessing (its finalizer terminates it)
        self._pool: Any = None
        # _entry and _args, set only for one of apply_async's quick calls, queued with no Task
        # of its own (see Scheduler.call_async): its function's cache entry and its arguments
        # (the latter until the I/O thread takes it).  Not set here: a write fewer per result.

    # -- the caller's side ---------------------------------------------------
    def ready(self) -> bool:
        """True once the task has finished (successfully or not)."""
        return self._done

    def successful(self) -> bool:
        """True if the task finished without raising; ``ValueError`` if not ready yet."""
        if not self._done:
            raise ValueError(f"{self!r} not ready")
        return self._ok

    def wait(self, timeout: float | None = None) -> None:
        """Block until the result is ready or *timeout* seconds pass."""
        if self._done:
            return
        if timeout is not None and timeout != timeout:  # NaN: no wait, as the stdlib's
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + timeout
        task = self._task
        sched = self._sched
        if task is not None and sched is not None:  # maybe wait by reading the channel directly
            sched.drive(task, self, timeout)
            if self._done:
                return
        if timeout is None:
            _never_delivered(self)
        with _WAITER_LOCK:
            if self._event is None:
                self._event = _Wakeup()
            event = self._event
            waiter = event.prepare()
        if not self._done:  # the setter reads _event after setting _done: no lost wake-up
            event.sleep(waiter, None if deadline is None else deadline - time.monotonic())

    def get(self, timeout: float | None = None) -> T:
        """Return the value; raise the task's exception, or ``TimeoutError`` after *timeout*."""
        if self._done and self._ok:  # the common case: no call, no lock
            return self._value
        self.wait(timeout)
        if not self._done:
            raise TimeoutError
        if self._ok:
            return self._value
        raise self._value

    def cancel(self, force: bool = False) -> bool:
        """Cancel the task if it has not started; with ``force=True`` also stop it if running
        (its worker is killed and replaced).  Return True if the task was cancelled; its
        ``get()`` then raises ``concurrent.futures.CancelledError``."""
        sched = self._sched
        if self._done or sched is None:
            return False
        return sched.cancel(self._task, force, self)  # (no task yet: a quick call, queued)

    # -- the scheduler's side ------------------------------------------------
    def _set(self, ok: bool, value: Any) -> None:
        self._ok = ok
        self._value = value
        self._task = None  # drop the task: no reference cycle outlives the result
        self._sched = None
        self._pool = None
        callback = self._callback if ok else self._error_callback
        if callback is not None:
            self._call_back(callback, value)
            return
        self._done = True
        event = self._event  # read after _done is set: see wait()
        if event is not None:
            event.notify_all()

    def _on_result(self, task: Any, value: Any) -> None:
        # _set(True, value), inlined: this runs once per task
        self._ok = True
        self._value = value
        self._task = None
        self._sched = None
        self._pool = None
        callback = self._callback
        if callback is not None:
            self._call_back(callback, value)
            return
        self._done = True
        event = self._event  # read after _done is set: see wait()
        if event is not None:
            event.notify_all()

    def _call_back(self, callback: Callable[[Any], object], value: Any) -> None:
        """Run the callback, then make the result ready: as in :mod:`multiprocessing`, what a
        callback collects is there once ``wait()`` or ``get()`` returns."""
        self._calling: int | None = threading.get_ident()
        try:
            callback(value)
        finally:  # (a callback that raises: its traceback is printed, the result is ready)
            self._calling = None
            self._done = True
            event = self._event
            if event is not None:
                event.notify_all()

    def _on_error(self, task: Any, exc: BaseException) -> None:
        self._set(False, exc)

    def _on_chunk(self, task: Any, values: list, errors: dict[int, BaseException]) -> None:
        if errors:  # a single-item chunk: apply_async never makes bigger ones
            self._set(False, errors[min(errors)])
        else:
            self._set(True, values[0])


ApplyResult = AsyncResult


class MapResult(AsyncResult[list]):
    """The result of :meth:`Pool.map_async`/``starmap_async``: a list in input order.

    When items fail, the other items still complete; ``get()`` then raises the exception of the
    lowest failing index (its notes name the item).  With ``fail_fast=True`` it raises as soon
    as the first failure arrives, as ``multiprocessing`` does.
    """

    __slots__ = ("_values", "_remaining", "_errors", "_fail_fast", "_label")

    def __init__(
        self,
        length: int,
        label: str,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        fail_fast: bool = False,
    ) -> None:
        super().__init__(callback, error_callback)
        self._values: list[Any] = [None] * length
        self._remaining = length
        self._errors: dict[int, BaseException] = {}
        self._fail_fast = fail_fast
        self._label = label
        if length == 0:
            self._set(True, [])

    def cancel(self, force: bool = False) -> bool:
        """A map cannot be cancelled as a whole (yet): always returns False."""
        return False

    def _finish_items(self, n: int) -> None:
        self._remaining -= n
        if self._done:
            return
        if self._errors and (self._fail_fast or self._remaining <= 0):
            # the first failing item; results lost beside a crash are collateral, the crash
            # itself is the error worth raising
            causes = [i for i, e in self._errors.items() if not getattr(e, "result_lost", False)]
            first = min(causes or self._errors)
            exc = self._errors[first]
            _note(exc, f"raised by item {first} of {self._label}")
            self._set(False, exc)
        elif self._remaining <= 0:
            self._set(True, self._values)

    def _on_chunk(self, task: Any, values: list, errors: dict[int, BaseException]) -> None:
        start = task.index
        self._values[start : start + len(values)] = values
        for i, exc in errors.items():
            self._errors[start + i] = exc
        self._finish_items(len(values))

    def _on_error(self, task: Any, exc: BaseException) -> None:
        self._errors[task.index] = exc
        self._finish_items(task.n_items)

    def _on_result(self, task: Any, value: Any) -> None:  # pragma: no cover - chunks only
        self._on_chunk(task, [value], {})


def _not_held_by_this_thread(holders: set[int]) -> None:
    """A ``for`` loop over an imap iterator takes a chunk of results at a time: the same thread
    advancing it meanwhile (``next(it)``, or a nested loop, in the loop's body) would skip past
    the rest of that chunk, and lose it should the loop then stop.  Refused instead."""
    if threading.get_ident() in holders:
        raise RuntimeError(
            "next() on an imap iterator, or another loop over it, inside a for loop over the"
            " same iterator: the loop holds a batch of its results (use next() alone, or the"
            " for loop alone)"
        )


class _Loop(itertools.chain):
    """A ``for`` loop's iterator over an :class:`IMapIterator`: the items are taken in C
    (a chain of list iterators, one per chunk), Python code runs once per chunk."""

    __slots__ = ("_chunks",)
    _chunks: _Chunks

    def close(self) -> None:
        """Stop this loop now, as a generator's ``close()``: what it has not taken stays."""
        self._chunks.views.close()


class _Raising:
    """An iterator whose first ``next()`` raises *exc*, and is then exhausted."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc: BaseException | None = exc

    def __iter__(self) -> _Raising:
        return self

    def __next__(self) -> Any:
        exc, self.exc = self.exc, None
        if exc is None:
            raise StopIteration
        try:
            raise exc
        finally:  # the traceback must not keep this frame's references (see next())
            del exc, self


class _Chunks:
    """A _Loop's source: the chunk views of ``IMapIterator._chunk_views``, taken by one thread
    at a time.  Threads sharing one loop then wait for the next chunk in turn; the generator
    itself would raise "already executing" in the second, and a chain whose source raises
    drops it: the first thread's loop would end there, its results left untaken."""

    __slots__ = ("views", "lock")

    def __init__(self, views: Generator) -> None:
        self.views = views
        self.lock = threading.Lock()

    def __iter__(self) -> _Chunks:
        return self

    def __next__(self) -> Iterator:
        with self.lock:
            return next(self.views)


class IMapIterator(Generic[T]):
    """The iterator returned by :meth:`Pool.imap` / ``imap_unordered``.

    ``next(timeout)`` waits at most *timeout* seconds (``multiprocessing.TimeoutError``).  A
    failed item raises its exception at its position; iteration can go on after it.  An error
    raised by the *input* iterable is raised after the results of the items read before it.

    Results arrive a chunk at a time and are kept as chunks (a list and its errors), so taking
    the next result is a few operations, not a dictionary entry per item.
    """

    def __init__(self, ordered: bool, release: Callable[[int], None]) -> None:
        # reentrant only so that a loop's close can tell it runs inside it (see _chunk_views)
        self._lock = threading.RLock()
        self._wakeup = _Wakeup()
        self._ordered = ordered
        self._chunks: dict[int, tuple[list, dict[int, BaseException]]] = {}  # by start index
        self._arrived: deque[tuple[list, dict[int, BaseException]]] = deque()  # unordered
        self._values: list = []  # the chunk being consumed
        self._errors: dict[int, BaseException] = {}
        self._pos = 0
        self._base = 0  # the index of _values[0] among the results (ordered)
        self._back: list[tuple[int, list, dict]] = []  # given back by loops (see _give_back)
        self._next_start = 0  # index of the first item of the next chunk (ordered)
        self._yielded = 0
        self._length: int | None = None  # known once the input is exhausted
        self._input_error: BaseException | None = None
        self._release = release
        self._reported = 0  # of _yielded, what the job was told (see _flush_release)
        self._holders: set[int] = set()  # threads whose for loop holds a chunk (see __iter__)
        # views of loops a garbage collection closed inside this lock (see _chunk_views)
        self._late: list[tuple[int, list, int, int, int]] = []
        self._pool: Any = None  # kept alive by its iterator (see AsyncResult._pool)
        self._job: Any = None  # the scheduler's MapJob feeding it (set by Pool._imap)

    def __iter__(self) -> Iterator[T]:
        """Iterate over the results, a chunk at a time.

        Breaking out of the loop gives back what was not taken (``next(it)`` goes on from
        there).  A failed item ends this loop with its exception; iterating again continues
        after it, as with :mod:`multiprocessing`.
        """
        chunks = _Chunks(self._chunk_views())
        loop = _Loop.from_iterable(chunks)
        loop._chunks = chunks  # type: ignore[attr-defined]  # (typeshed: from_iterable -> chain)
        return loop

    def _chunk_views(self) -> Generator[Iterator[T], None, None]:
        """__iter__'s chunks: an iterator over the rest of each chunk, taken whole.  What a
        view has left when the loop is left (this generator closed) says how far it got."""
        while True:
            if self._late:
                self._settle_late()
            if self._holders:  # before anything is taken (_wait_for_item may move on)
                _not_held_by_this_thread(self._holders)
            if not self._wait_for_item(None):
                return
            with self._lock:
                if self._errors or self._pos >= len(self._values):
                    chunk = None  # failures in it (or another consumer took it): item by item
                else:
                    chunk, start, base = self._values, self._pos, self._base
                    self._pos = len(chunk)  # ours now; what is not taken is given back
                    holder = threading.get_ident()
                    self._holders.add(holder)
            if chunk is None:
                try:
                    value = self.next()
                except StopIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - an item's error
                    # raised as the loop's next item, not by its source: a chain whose source
                    # raised drops it, and threads sharing the loop would see it end.  (Its
                    # traceback without this frame: that would hold self, in a cycle.)
                    tb = exc.__traceback__
                    error = _Raising(exc.with_traceback(tb.tb_next if tb else None))
                    tb = None
                    yield error
                    continue
                yield iter((value,))
                continue
            view = iter(chunk[start:] if start else chunk)
            try:
                yield view  # resumed once the loop has taken it all, closed if left early
            finally:  # (maybe in another thread: a generator can be closed anywhere)
                # what the view has left, taken from it: the loop (a chain) must not go on
                # yielding from it after a close(); list() runs in C, in one step
                given = len(chunk) - len(list(view))
                if self._lock._is_owned():  # type: ignore[attr-defined]
                    # a garbage collection closes this loop (left inside a reference cycle)
                    # in a thread inside this iterator's lock, its state maybe half changed:
                    # settled by the next consumer, before it takes anything
                    self._late.append((holder, chunk, start, base, given))
                    self._wakeup.notify_all()
                else:
                    with self._lock:
                        self._settle_view(holder, chunk, start, base, given)
                    if self._yielded - self._reported >= 1024:
                        self._flush_release()

    def _settle_view(self, holder: int, chunk: list, start: int, base: int, given: int) -> None:
        """A loop's view of *chunk* (from *start*; *base*: the chunk's first index) is closed,
        *given* of its items yielded: count them, and give back the rest (the lock is held)."""
        self._holders.discard(holder)
        if given < len(chunk):  # the loop was left early: the rest stays
            if self._values is chunk:
                self._pos = given
            else:  # another thread moved on meanwhile
                self._give_back(base + given, chunk[given:])
        taken = given - start
        self._yielded += taken
        if given < len(chunk) or self._over():
            self._wakeup.notify_all()  # other consumers: results, or the end

    def _settle_late(self) -> None:
        """Settle the views a garbage collection closed inside the lock (see _chunk_views)."""
        with self._lock:
            while self._late:
                self._settle_view(*self._late.pop(0))

    def next(self, timeout: float | None = None) -> T:
        if self._late:
            self._settle_late()
        if self._holders:  # before anything is taken
            _not_held_by_this_thread(self._holders)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._wait_for_item(left):
                raise StopIteration
            with self._lock:  # check again and take, in one go: another consumer may be here
                if self._pos >= len(self._values) and not self._next_chunk():
                    continue
                pos = self._pos
                self._pos = pos + 1
                self._yielded += 1
                exc = self._errors.pop(pos, None) if self._errors else None
                values = self._values
                value = values[pos]
                values[pos] = None  # (the caller's alone now: freed when it drops it)
                if self._length is not None and self._over():
                    self._wakeup.notify_all()  # other consumers waiting: this was the last
            if self._yielded - self._reported >= 1024:
                self._flush_release()
            if exc is not None:
                try:
                    raise exc
                finally:  # the traceback must not keep this frame, and so self, alive: an
                    del exc, self  # iterator dropped after an item raised is then freed at once
            return value

    __next__ = next

    def _wait_for_item(self, timeout: float | None) -> bool:
        """Wait until an item is available (True) or the results are over (False).

        Raises the input iterable's error at the end, and TimeoutError after *timeout*.  Meant
        for one consuming thread, as iterators are.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                while self._late:  # (see _chunk_views)
                    self._settle_view(*self._late.pop(0))
                if self._pos < len(self._values) or self._next_chunk():
                    return True
                if self._over():
                    error, self._input_error = self._input_error, None
                    over = True
                else:
                    if timeout is None:
                        _never_delivered(self)
                    waiter = self._wakeup.prepare()
                    over = False
            self._flush_release(poke=not over)  # let the input be read on before we sleep
            if over:
                if error is not None:
                    raise error
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not self._wakeup.sleep(waiter, left):
                raise TimeoutError

    def _over(self) -> bool:
        return self._length is not None and self._yielded >= self._length

    def _give_back(self, index: int, rest: list) -> None:
        """Results a loop took and did not yield (*rest*, no failures among them; *index*: the
        first one's among the results) after another thread moved on to a later chunk: they
        are consumed first (ordered: by index, with the rest of the current chunk and any
        other given back; the caller holds the lock)."""
        pieces = self._back
        pos = self._pos
        if pos < len(self._values):
            errors = {i - pos: e for i, e in self._errors.items() if i >= pos}
            pieces.append((self._base + pos, self._values[pos:], errors))
        pieces.append((index, rest, {}))
        if self._ordered:
            pieces.sort(key=lambda piece: piece[0])
        self._base, self._values, self._errors = pieces.pop(0)
        self._pos = 0

    def _next_chunk(self) -> bool:
        if self._back:  # (all of them before _next_start: from chunks taken already)
            self._base, self._values, self._errors = self._back.pop(0)
            self._pos = 0
            return True
        if self._ordered:
            chunk = self._chunks.pop(self._next_start, None)
        else:
            chunk = self._arrived.popleft() if self._arrived else None
        if chunk is None:
            return False
        self._values, self._errors = chunk
        self._pos = 0
        self._base = self._next_start
        self._next_start += len(self._values)
        return True

    def _flush_release(self, poke: bool = False) -> None:
        """Tell the job how many results were taken in all, if more than last time; with
        *poke* (about to wait), even if not: a job whose window was full then reads on
        (``MapJob.release``).  A total, not a count since the last report: a report a Ctrl-C
        cut short is made good by the next, and threads reporting out of order count
        nothing twice (a count taken out first was lost for good: the window shrank)."""
        with self._lock:
            total = self._yielded
            fresh, self._reported = total > self._reported, total
        if fresh or poke:
            self._release(total)  # takes the scheduler's lock: never called holding ours

    def _on_chunk(self, task: Any, values: list, errors: dict[int, BaseException]) -> None:
        with self._lock:
            if self._ordered:
                self._chunks[task.index] = (values, errors)
                # a consumer waits for the chunk at _next_start alone: one that arrives
                # ahead of it wakes nobody (a wake-up costs the I/O thread a context switch)
                due = task.index == self._next_start
            else:
                self._arrived.append((values, errors))
                due = True
        if due:  # (out of the lock: the woken consumer takes it first thing)
            self._wakeup.notify_all()

    def _on_error(self, task: Any, exc: BaseException) -> None:
        n = task.n_items
        self._on_chunk(task, [None] * n, dict.fromkeys(range(n), exc))

    def _on_result(self, task: Any, value: Any) -> None:  # pragma: no cover - chunks only
        self._on_chunk(task, [value], {})

    def _end_of_input(self, length: int, error: BaseException | None) -> None:
        with self._lock:
            self._length = length
            self._input_error = error
            self._wakeup.notify_all()


class WeakSink:
    """Hands the scheduler's deliveries to a result object it refers to weakly.

    The scheduler's I/O thread holds the sinks of running jobs; an iterator holding its pool
    (``for x in Pool(2).imap(...)``) must not be kept alive -- with its pool, workers and all
    -- by its own job once the caller has dropped it: results for a dropped iterator are
    discarded.
    """

    __slots__ = ("_ref",)

    def __init__(self, target: Any) -> None:
        self._ref = weakref.ref(target)

    def _on_chunk(self, task: Any, values: list, errors: dict[int, BaseException]) -> None:
        target = self._ref()
        if target is not None:
            target._on_chunk(task, values, errors)

    def _on_error(self, task: Any, exc: BaseException) -> None:
        target = self._ref()
        if target is not None:
            target._on_error(task, exc)

    def _on_result(self, task: Any, value: Any) -> None:
        target = self._ref()
        if target is not None:
            target._on_result(task, value)

    def _end_of_input(self, length: int, error: BaseException | None) -> None:
        target = self._ref()
        if target is not None:
            target._end_of_input(length, error)


# the stdlib Future's states (concurrent.futures._base; the same names in 3.10 to 3.13)
_PENDING, _RUNNING, _FINISHED = "PENDING", "RUNNING", "FINISHED"
_CANCELLED, _CANCELLED_AND_NOTIFIED = "CANCELLED", "CANCELLED_AND_NOTIFIED"
_OVER = frozenset({_CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED})


class _FutureCondition(_thread.RLock):  # type: ignore[misc]  # (typeshed: final)
    """A :class:`Future`'s condition: an RLock with the ``notify``/``wait`` of a
    ``threading.Condition``, whose ``with`` is the RLock's own C code.

    The standard library's ``Future`` methods (``cancel``, ``add_done_callback``,
    ``set_result``...) take their condition with ``with``; a ``threading.Condition``'s
    ``__enter__`` is Python code, and a Ctrl-C raised just as its inner acquire returned left
    the lock held for good -- the pool's thread then waited for it when it started the task,
    holding the pool's lock (a review).  Waiters sleep on a private lock each, released by
    ``notify`` (see :class:`_Wakeup`): ``Future.result()`` sleeps with no shared lock held.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[Any] = []

    def prepare(self) -> Any:
        """A private lock, held, that the next ``notify`` releases (call under the lock)."""
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._sleepers.append(waiter)
        return waiter

    def forget(self, waiter: Any) -> None:
        """*waiter* no longer waits (call under the lock)."""
        if waiter in self._sleepers:
            self._sleepers.remove(waiter)

    def notify(self, n: int = 1) -> None:
        sleepers = self._sleepers
        woken = sleepers[:n]
        del sleepers[:n]
        for waiter in woken:
            waiter.release()

    def notify_all(self) -> None:
        self.notify(len(self._sleepers))

    def wait(self, timeout: float | None = None) -> bool:
        """``threading.Condition.wait``, for code that calls it (procpool's own waits do
        not: see ``Future._wait_sliced``)."""
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = self.prepare()
        saved = self._release_save()  # type: ignore[attr-defined]
        try:
            return waiter.acquire() if timeout is None else waiter.acquire(True, max(0, timeout))
        finally:
            self._acquire_restore(saved)  # type: ignore[attr-defined]
            self.forget(waiter)


#: guards the state of the futures that have no condition yet, and the making of one.  An
#: RLock, as a condition's lock is: a signal handler or a finalizer (a garbage collection runs
#: them wherever it starts) may use a future while this thread holds it.  Nothing allocates
#: while holding it (allocating can start a collection).
_FUTURE_LOCK = threading.RLock()


def _new_locks() -> None:
    global _FUTURE_LOCK, _WAITER_LOCK
    # a child forked while another thread held them must not inherit them held
    _FUTURE_LOCK, _WAITER_LOCK = threading.RLock(), threading.Lock()


os.register_at_fork(after_in_child=_new_locks)


def untold(sink: Any) -> bool:
    """A done result the pool must still deliver to when it gives up its task: a Future the
    caller cancelled, whose waiters hear of it then (see Future._cancel_and_notify)."""
    return getattr(sink, "_state", None) == _CANCELLED


class Future(concurrent.futures.Future[T]):
    """A :class:`concurrent.futures.Future` (``Pool.submit`` returns it) that is cheap when
    nobody waits on it, and whose waits return to the interpreter every :data:`WAIT_SLICE`.

    The stdlib's Future builds a ``threading.Condition`` (an RLock, a deque and bound methods:
    half a dozen objects for the garbage collector) for each future; with thousands in flight,
    making them was half of ``submit``'s time.  Here the condition is made on first use --
    a thread waiting in ``result()``, ``concurrent.futures.wait``/``as_completed``, a done
    callback --; until then the state changes under one module lock (no waiter or callback can
    exist without the condition, so there is nobody to notify).  Once made, the stdlib's own
    methods run unchanged.  A Ctrl-C that lands while the caller blocks in ``result()`` is
    raised at once (see :data:`WAIT_SLICE`).
    """

    _pool: Any = None  # the pool, until the result is in (see AsyncResult._pool)
    _sched: Any = None  # Pool.submit's scheduler and task, until the result is in: result()
    _task: Any = None  # may then read the reply in its own thread (Scheduler.drive)
    needs_start = True  # the scheduler calls _start when it sends the task (see below)

    # Until its first use a future has no condition, nor the stdlib's lists of waiters and
    # callbacks (nobody can add to them without the condition): these defaults stand in, and
    # a future in a burst is one object for the garbage collector to track, not three.
    _cond: _FutureCondition | None = None
    _result: Any = None
    _exception: BaseException | None = None
    _waiters: Any = ()  # then a list (see _condition)
    _done_callbacks: Any = ()  # then a list
    _state = _PENDING

    # The stdlib's __init__ makes the condition: a future is made with no state of its own
    # (the defaults above stand in), and object's __init__ is a C call where a Python one
    # cost ≈ 0.1 µs of submit's ≈ 2 µs in the caller.
    __init__ = object.__init__  # type: ignore[assignment]

    @property
    def _condition(self) -> _FutureCondition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            new = _FutureCondition()  # made outside the lock: see _FUTURE_LOCK
            waiters: list = []
            callbacks: list = []
            with _FUTURE_LOCK:
                cond = self._cond
                if cond is None:
                    self._waiters, self._done_callbacks = waiters, callbacks
                    cond = self._cond = new  # (last: whoever sees it sees the lists)
        return cond

    # -- state changes: under the module lock while there is no condition ----------------
    def _settle(self, value: Any, exc: BaseException | None) -> bool:
        """Finish without a condition (True), or say there is one now (False)."""
        with _FUTURE_LOCK:
            if self._cond is not None:
                return False
            over = self._state in _OVER
            if not over:
                self._result, self._exception = value, exc
                self._state = _FINISHED
        if over:  # (not under the lock: repr() makes the condition)
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
        self._invoke_callbacks()  # type: ignore[attr-defined]  # (none without a condition)
        return True

    def set_result(self, result: Any) -> None:
        if self._cond is None and self._settle(result, None):
            return
        super().set_result(result)

    # -- the scheduler's side: a Future is its task's sink, as an AsyncResult is ----------
    def _start(self) -> bool:
        """Its task is being sent to a worker: False if the future was cancelled meanwhile."""
        if self._state == _RUNNING:  # sent before, to a worker that died before starting it
            return True
        return self.set_running_or_notify_cancel()

    def _on_result(self, task: Any, value: Any) -> None:
        self._resolve(value)

    def _on_error(self, task: Any, exc: BaseException) -> None:
        self._pool = self._sched = self._task = None
        state = self._state
        if state == _CANCELLED or (state == _PENDING and isinstance(exc, CancelledError)):
            self._cancel_and_notify()  # the pool will never start it
        elif state not in _OVER:
            try:
                self.set_exception(exc)
            except concurrent.futures.InvalidStateError:  # the caller cancelled it meanwhile
                self._cancel_and_notify()

    def _cancel_and_notify(self) -> None:
        """A future the pool gives up before starting it -- cancelled now
        (``shutdown(cancel_futures=True)``), or by the caller before: CANCELLED_AND_NOTIFIED,
        ``concurrent.futures.wait``/``as_completed`` told, then the callbacks run (one may wait
        on it).  What ``set_running_or_notify_cancel`` does when an executor would have started
        it.  The stdlib's executors never do this for the futures they cancel, nor for those
        cancelled before they stop: such waits then run to their timeout, or forever."""
        if self._cond is None:
            with _FUTURE_LOCK:
                if self._cond is None:  # no condition: no waiter, no callback
                    if self._state in (_PENDING, _CANCELLED):
                        self._state = _CANCELLED_AND_NOTIFIED
                    return
        with self._cond:
            state = self._state
            if state not in (_PENDING, _CANCELLED):
                return
            self._state = _CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._cond.notify_all()
        if state == _PENDING:  # (the caller's cancel() ran them)
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def _on_chunk(self, task: Any, values: list, errors: dict[int, BaseException]) -> None:
        if errors:
            self._on_error(task, errors[min(errors)])
        else:
            self._on_result(task, values[0])

    def _resolve(self, value: Any) -> None:
        """The pool's result for this future, unless it is already over (cancelled): what
        ``if not done(): set_result(value)`` does, in one call while nobody waits on it."""
        self._pool = self._sched = self._task = None  # (see Future._pool)
        if self._cond is None:
            with _FUTURE_LOCK:
                if self._cond is None:  # no waiter, no callback: nobody to notify
                    if self._state not in _OVER:
                        self._result = value
                        self._state = _FINISHED
                    return
        if not self.done():
            super().set_result(value)

    # -- a run's members (see _tasks.CallRun): many at once, under one acquisition of the lock
    @staticmethod
    def _start_run(futures: list[Future]) -> list[int]:
        """``_start`` for each of *futures*, a run being sent; the indexes of those cancelled
        meanwhile, in order."""
        dropped: list[int] = []
        waited: list[int] = []  # with a condition (or in a state only _start may judge)
        with _FUTURE_LOCK:
            for i, future in enumerate(futures):
                state = future._state
                if future._cond is not None or state not in (_PENDING, _CANCELLED):
                    waited.append(i)
                elif state == _PENDING:
                    future._state = _RUNNING
                else:
                    future._state = _CANCELLED_AND_NOTIFIED
                    dropped.append(i)
        for i in waited:
            if not futures[i]._start():
                dropped.append(i)
        dropped.sort()
        return dropped

    @staticmethod
    def _settle_run(futures: list[Future], values: list) -> list[tuple[Future, Any]]:
        """``_on_result`` for each of *futures* (a run's) that nobody waits on; the others,
        with their values, are left to the caller.  Settling a Future twice does nothing."""
        waited = []
        with _FUTURE_LOCK:
            for future, value in zip(futures, values, strict=True):
                future._pool = future._sched = future._task = None
                if future._cond is not None:
                    waited.append((future, value))
                elif future._state not in _OVER:
                    future._result = value
                    future._state = _FINISHED
        return waited

    def set_exception(self, exception: BaseException | None) -> None:
        if self._cond is None and self._settle(None, exception):
            return
        super().set_exception(exception)

    def set_running_or_notify_cancel(self) -> bool:
        if self._cond is None:
            with _FUTURE_LOCK:
                state = self._state
                if self._cond is None:
                    if state == _CANCELLED:
                        self._state = _CANCELLED_AND_NOTIFIED
                        return False
                    if state == _PENDING:
                        self._state = _RUNNING
                        return True
            if self._cond is None:
                raise RuntimeError(f"Future in unexpected state: {state}")
        return super().set_running_or_notify_cancel()

    def cancel(self) -> bool:
        cancelled = None
        if self._cond is None:
            with _FUTURE_LOCK:
                if self._cond is None:
                    if self._state in (_RUNNING, _FINISHED):
                        return False
                    if self._state == _PENDING:
                        self._state = _CANCELLED
                    cancelled = True
        if cancelled is None and not super().cancel():
            return False
        self._pool = self._sched = self._task = None  # done: it no longer keeps its pool alive
        return True

    # -- reading: a plain read of the state is atomic -------------------------------------
    def done(self) -> bool:
        return self._state in _OVER

    def running(self) -> bool:
        return self._state == _RUNNING

    def cancelled(self) -> bool:
        return self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)

    @property
    def _done(self) -> bool:  # (what Scheduler.drive reads on the result it waits for)
        return self._state in _OVER

    def _wait_sliced(self, timeout: float | None) -> None:
        if timeout is not None and timeout != timeout:  # NaN: no wait, as the stdlib's
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + timeout
        sched, task = self._sched, self._task
        if sched is not None and task is not None:  # maybe wait by reading the channel
            sched.drive(task, self, timeout)  # (returns at the deadline at the latest)
            if self._state in _OVER:
                return
        if timeout is None:
            _never_delivered(self)
        cond = self._condition
        # no lock held while it sleeps (see _FutureCondition): a Ctrl-C anywhere in here
        # leaves nothing shared behind but, at worst, a private lock nobody waits on
        while True:
            with cond:  # (the RLock's C code)
                if self._state in _OVER:
                    return
                waiter = cond.prepare()
            try:
                left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return
                waiter.acquire(True, min(left, WAIT_SLICE))
            finally:
                with cond:
                    cond.forget(waiter)

    def result(self, timeout: float | None = None) -> T:
        if self._state not in _OVER:
            self._wait_sliced(timeout)
        state = self._state  # read once: it may change between two reads
        if state == _FINISHED:
            exc = self._exception
            if exc is not None:
                try:
                    raise exc
                finally:  # no cycle: exception -> traceback -> this frame -> the future
                    del exc, self
            return self._result
        if state in _OVER:
            raise CancelledError()
        raise concurrent.futures.TimeoutError()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state not in _OVER:
            self._wait_sliced(timeout)
        state = self._state
        if state == _FINISHED:
            return self._exception
        if state in _OVER:
            raise CancelledError()
        raise concurrent.futures.TimeoutError()
