"""The units of work the scheduler moves: a Task (one call, or one chunk of a map) and a
MapJob (a map/imap whose input is cut into chunk Tasks on demand).

A Task's lifecycle: PENDING (queued) -> SENT (held by a worker) -> DONE; a task a dead worker
had not started goes back to PENDING.  Its arguments are pickled once, by the submitting
thread, and kept (``payload``) until it is done, so a retry needs no second pickling -- except
plain scalars and strings, kept as they are and pickled by the I/O thread as they are sent.
"""

from __future__ import annotations

import os
import threading

from . import _protocol as P
from . import _serialize

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

CHUNK_TARGET = 2e-3  # seconds of work per map chunk
# seconds of work below which the last chunks of a map are not cut any smaller: each chunk
# costs ≈ 20-30 µs of CPU (parent and worker) whatever its size, more than it balances then
CHUNK_MIN = 1e-4
# an idle worker waits this long for a fuller chunk of an imap whose input is still being read
# (see Dispatch._hold_over): long enough for a fast iterator to fill it, short against a slow one
FEED_HOLD = 1e-3
FEED_POLL_MAX = 32e-3  # the longest a feeder blocked inside a run goes unlooked at
NEVER = float("inf")  # MapJob.wake_at: the feeder wakes nobody
STOP = -1.0  # MapJob.wake_at: the feeder looks at once (cancelled, or the pool is stopping)
BARE = (bytes, tuple, list)  # payload types with nothing to release (see Task.payload)

_PENDING, _SENT, _DONE = 0, 1, 2

# A run's task id is RUN_IDS + k * RUN_STRIDE and its member i's that plus 1 + i (see CallRun):
# no plain task id (counted from 1) gets this high, and no member's is its run's
RUN_IDS = 1 << 62
RUN_STRIDE = 128  # (a power of two: a member's run is its id with the low bits cleared)
RUN_MASK = RUN_STRIDE - 1
RUN_MAX = 64  # members a run holds at most


class Task:
    """One unit sent to a worker: a single call, or a chunk of a map job."""

    __slots__ = (
        "id",
        "fid",
        "func_blob",
        "kind",
        "payload",
        "timeout",
        "sink",
        "index",
        "n_items",
        "attempts",
        "retries",
        "retry_on",
        "label",
        "state",
        "worker",
        "cancel_requested",
        "timed_out",
        "job",
        "cost",
        "bounces",
    )

    def __init__(self, tid, fid, func_blob, kind, payload, sink, label, timeout, retries, retry_on):
        self.id = tid
        self.fid = fid
        self.func_blob = func_blob
        self.kind = kind
        # the arguments: for a call whose arguments are all plain scalars and strings
        # (immutable, always picklable) and no keywords, the args tuple itself (whoever sends
        # the batch pickles those together); for a run (kind CALLS, see CallRun), a list of
        # such tuples; else pickled: a Payload, or only its bytes on apply's quick path
        # (Scheduler.call)
        self.payload: _serialize.Payload | bytes | tuple | list = payload
        self.sink = sink
        self.label = label
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on
        self.index = 0
        self.n_items = 1
        self.attempts = 0
        self.state = _PENDING
        self.worker: Any = None  # the scheduler's _Worker holding it, while SENT
        self.cancel_requested = False
        self.timed_out = False
        self.job: MapJob | None = None
        self.cost = 0.0
        self.bounces = 0  # times a dead worker handed it back unstarted

    @classmethod
    def unsent(
        cls, sink: Any, label: str, kind: int = 0, job: Any = None, index: int = 0, n_items: int = 1
    ) -> Task:
        """A task that never reaches a worker: it exists only to carry a failure to its sink
        (arguments that cannot be pickled, a broken or terminated pool)."""
        task = cls(0, 0, b"", kind, _serialize.Payload(b""), sink, label, None, 0, ())
        task.job, task.index, task.n_items = job, index, n_items
        task.state = _DONE
        return task

    def release(self) -> None:
        payload = self.payload
        if isinstance(payload, _serialize.Payload):  # (bytes, tuple, list: nothing to release)
            payload.close()

    def describe(self) -> str:
        """'task 7 (f)' or 'items 100-199 of map(f)', for error messages."""
        if self.id >= RUN_IDS:  # a member of a run (see CallRun): its id means nothing to anyone
            return f"a call of {self.label}"
        if self.job is not None:
            last = self.index + self.n_items - 1
            items = f"item {self.index}" if last == self.index else f"items {self.index}-{last}"
            return f"{items} of {self.label}"
        return f"task {self.id} ({self.label})"


class CallRun:
    """The sink of a *run*: plain calls to one function that ``apply_async`` queued in a burst
    (see ``Scheduler.call_async``), travelling as one Task whose payload is their argument
    tuples -- one CALLS record on the wire -- so that a call costs no Task of its own.

    Member *i* (``members[i]``, its AsyncResult) has the id ``task.id + 1 + i``.  The worker
    runs the members in order, each a task of its own (its progress slot, its own result
    record), so their replies come in member order: ``got`` counts those read.  A member that
    needs more than a plain value -- an error, its worker's death, a cancel that kills it --
    first becomes a Task of its own (:meth:`member`), and the usual paths take it from there;
    a run that fails whole fails each member apart (``Scheduler._fail``).
    """

    __slots__ = ("members", "args", "got", "cancelled", "needs_start")

    def __init__(self, members: list, args: list) -> None:
        self.members = members
        self.args = args  # their argument tuples: the run's payload
        self.got = 0  # members whose reply was read: members[:got] are settled or being so
        self.cancelled: set[int] | None = None  # cancelled while running: their worker is killed
        # the members are Futures (Pool.submit): marked running as the run is sent (_start)
        self.needs_start = getattr(members[0], "needs_start", False)

    def _start(self) -> bool:
        """The run is being sent: mark its Futures running, and drop those cancelled
        meanwhile (a Future's cancel() only changes its state).  False if none is left."""
        members, args = self.members, self.args
        for i in reversed(type(members[0])._start_run(members)):
            members[i]._task = None  # (set after its cancel(): keep nothing)
            del members[i]
            del args[i]
        return bool(members)

    def member(self, run: Task, i: int) -> Task:
        """Member *i* of *run* as a Task of its own, in the state *run* is in."""
        result = self.members[i]
        task = Task(
            run.id + 1 + i,
            run.fid,
            run.func_blob,
            P.CALL,
            self.args[i],
            result,
            run.label,
            None,
            run.retries,
            run.retry_on,
        )
        task.state, task.worker, task.attempts = run.state, run.worker, run.attempts
        task.bounces = run.bounces
        task.cancel_requested = self.cancelled is not None and i in self.cancelled
        result._task = task  # (its cancel() now finds it)
        return task


class MapJob:
    """A map/imap over many items, cut into chunk Tasks on demand by the dispatcher."""

    def __init__(self, lock, fid, blob, kind, sink, label, timeout, retries, chunksize, limit):
        self.fid, self.blob, self.kind = fid, blob, kind
        self.owner = os.getpid()  # (a consumer in a forked child reports nothing: release)
        self.sink = sink
        self.label = label
        self.timeout = timeout
        self.retries = retries
        self.chunksize = chunksize
        # items read; buf[pos:] are not cut into chunks yet (a map over a range: the range)
        self.buf: list[Any] | range = []
        self.stop: int | None = None  # an imap over a range: the end of the part "read"
        self.pos = 0
        self.next_index = 0  # index (in the whole input) of buf[pos]
        self.input_done = False
        self.queued = False  # in the scheduler's pending deque
        self.limit = limit  # max items held (read, not consumed): None for lists
        self.fed = 0  # items read (by its feeder thread alone, or the I/O thread: see source)
        self.released = 0  # items whose results the caller consumed (under the lock)
        # the feeder's hand-over of one item at a time (Scheduler._feed): appended at the end
        # without the lock, its head moved into buf by available(), which every reader of
        # buf calls under the lock (see _unstage)
        self.staged: list[Any] = []
        self.unstaged = 0  # items available() moved out of staged (under the lock), in all
        # the feeder wakes the I/O thread once this many items are staged: set by the
        # dispatcher when it waits for input (an idle worker, a partial chunk), NEVER after;
        # STOP (for good) when the feeder must stop: its one test per item covers both
        self.wake_at: float = 1
        self.hold_until: float | None = None  # an idle worker waits for a fuller chunk until
        self.read_ahead = 1  # the feeder's next run (1: one item at a time), see Scheduler._stage
        self.bulk = False  # the feeder is inside a run: it cannot look at wake_at until it ends
        self.polled = False  # a "poll" timer is armed for it (see Dispatch._poll_feeder)
        self.poll_delay = FEED_HOLD
        self.on_end: Any = None  # called with (length, error) once the input is read
        # an in-memory input (a range, a list's iterator...) that the I/O thread reads itself,
        # under the lock, as the window has room: no feeder thread (Feeding._read_input)
        self.source: Iterator[Any] | range | None = None
        # ...whose window was full when last read: the consumer's next release wakes the I/O
        # thread (on_room, set by the scheduler), which reads on (Feeding._feed_waiting)
        self.starved = False
        self.on_room: Callable[[], None] | None = None
        self.cancelled = False  # what it has not sent will not run (Scheduler.cancel_map)
        self.cut = False  # its input was ended for it (the pool stopped): the rest is dropped
        # its imap iterator was dropped: nobody consumes, so `held` no longer paces the
        # feeder -- the items read but not yet sent do (all of it runs, as multiprocessing
        # runs a dropped imap's tasks, within the bound); set by a finalizer, a flag only
        self.orphaned = False
        self.space = threading.Condition(lock)  # the scheduler's lock: the feeder waits on it
        # The scheduler's lock itself, for code a Ctrl-C may cut (a consumer's release): a
        # Condition's __enter__ is Python code, where a signal's exception raised once the
        # lock is taken leaves it held for good -- the I/O thread then waits for it forever
        self.lock = lock
        # one of its chunks has come back: until then the pool's estimate is another
        # function's, and a busy worker takes none of its chunks (see Dispatch._next_for)
        self.measured = False

    def chunk_size(self, est: float | None, nworkers: int) -> int:
        if self.chunksize:
            return self.chunksize
        if self.timeout:
            return 1
        if est is None:  # nothing measured yet
            if self.input_done:  # a list: small first chunks, as multiprocessing's len/(4n)
                return max(1, min(-(-self.available() // (4 * nworkers)), 64))
            return 1  # imap: probe with one item before committing to big chunks
        est = max(est, 1e-8)
        size = max(1, int(CHUNK_TARGET / est))
        if self.limit is not None:
            # an imap holds at most `limit` items, read and not yet consumed: in chunks of
            # more than a quarter of its share per worker, the window fills with a chunk
            # running on each worker, and the next waits for the consumer to catch up (x+1
            # on 2 workers, chunks of ≈ 22,000 against 65,536: a worker idled ≈ 2.5 ms of 5)
            size = min(size, max(1, self.limit // (4 * nworkers)))
        if self.input_done:
            # shrink near the end so the last chunks spread over the workers, but not below
            # CHUNK_MIN of work -- except that a short input still gives every worker a chunk
            # (est is the pool's: the last map's, maybe of a far cheaper function).  The
            # whole input's share, not what is left: with the rest's, each chunk near the end
            # halved the next one's floor, down to chunks of one item (a 100,000-item map
            # of x+1 ended in ten chunks of 152, 76 ... 1 items, each a round trip)
            left = self.available()
            # (the whole input's share rounded down, and never below the rest's share: an
            # input a little longer than the pool is wide still gives every worker a chunk)
            share = max((self.next_index + left) // nworkers, -(-left // nworkers))
            floor = min(int(CHUNK_MIN / est), share)
            size = min(size, max(1, floor, -(-left // (2 * nworkers))))
        return size

    def available(self) -> int:
        """Items read and not yet cut into chunks (what the feeder staged included)."""
        if self.staged:
            self._unstage()
        return (len(self.buf) if self.stop is None else self.stop) - self.pos

    def _unstage(self) -> None:
        staged = self.staged
        n = len(staged)  # (the feeder may append more meanwhile: those come next time)
        # The feeder only ever appends (its list.extend reads the list's size afresh for
        # each item it adds), and the slice and the del are one step each under the GIL:
        # the head they copy and cut is the same n items.  (A deque's popleft per item cost
        # ≈ 20 ns an item; these two copy pointers.)
        taken = staged[:n]
        del staged[:n]
        self.unstaged += n  # (the feeder counts its run's items by it: Scheduler._stage_run)
        if self.cancelled or self.cut:  # what was read as it was cancelled is not run
            return
        self.add(taken)

    def add(self, items: Iterable) -> None:
        buf = self.buf
        assert isinstance(buf, list)  # a range is only ever a whole input (map), never fed
        if self.pos > 65536 and self.pos * 2 > len(buf):  # compact now and then
            del buf[: self.pos]
            self.pos = 0
        buf.extend(items)

    def take(self, size: int, idle: bool) -> list | range | None:
        """Up to *size* items from the buffer, or None if the dispatcher should wait."""
        left = self.available()
        if not left or (left < size and not self.input_done and not idle):
            return None  # nothing, or more input is coming: wait for a fuller chunk
        n = min(size, left)
        items = self.buf[self.pos : self.pos + n]
        self.pos += n
        self.hold_until = None
        return items

    def release(self, total: int) -> None:
        """The caller has consumed *total* results in all (imap): make room for more input.
        A total, not a count (see ``IMapIterator._flush_release``).  Also called with no
        more than before by a consumer about to wait: an in-memory input not read to its
        end then wakes the I/O thread, which reads on if its window has room (a wake-up a
        Ctrl-C cut from an earlier release is not lost for good)."""
        if os.getpid() != self.owner:
            return  # a forked child: the job is the parent's, whose thread may hold the lock
        with self.lock:  # (not `with self.space`: see __init__)
            fresh = total > self.released
            if fresh:
                self.released = total
                self.space.notify()
            if self.on_room is not None and self.source is not None and (self.starved or not fresh):
                self.on_room()

    def room(self) -> bool:
        """Whether its window has room for more input (under the lock; a dropped iterator's
        is paced by what is sent: see backlog)."""
        return self.limit is not None and self.backlog() < self.limit

    def backlog(self) -> int:
        """What paces the feeder: items held (read, not consumed), or for a job whose
        iterator was dropped, items read but not sent yet (under the lock)."""
        return self.available() if self.orphaned else self.fed - self.released
