"""Reading a lazy map's input: the I/O thread's own reads, and the imap feeder threads.

``Pool.imap`` / ``imap_unordered`` read their input within the job's bound on the items it
holds (``MapJob.limit``: read, not yet consumed), so memory does not grow with the input's
length.  Who reads depends on the input:

* an input that only walks memory -- a ``range``, or the iterator of a list, a tuple...
  (``_IN_MEMORY_ITERATORS``) -- is read by the I/O thread itself, under the lock, as the
  window has room (``_read_input``): a range is not read at all, it becomes the job's buffer
  and "reading" widens the window the dispatcher may cut (its chunks travel as ranges); an
  iterator is read in one ``list.extend`` at C speed;
* any other iterator -- a generator may be waiting for this very imap's results -- is read
  by a feeder thread of its own (``_feed``), which hands over each item before it reads the
  next (``MapJob.staged``), one at a time while items come slowly, in runs
  (``list.extend``) while they come fast; the dispatcher moves staged items into chunks
  (``MapJob.available``), and asks for a wake-up when it waits for input
  (``MapJob.wake_at``).

A mixin of :class:`procpool._scheduler.Scheduler`.  The feeder's methods run in the feeder
thread and take the scheduler's lock where they say so; ``_read_input`` and ``_feed_waiting``
run in the I/O thread, under the lock, and ``_stop_feeders`` under the lock, called by
whoever stops a job.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
from collections.abc import Iterable, Iterator

from ._supervise import FINISHED, RUNNING, TERMINATING
from ._tasks import FEED_HOLD, NEVER, STOP, MapJob

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

FEED_BATCH = 8192  # items a feeder reads between two looks at the job's window (see _feed)
# a generator's items that come faster than this each are read in runs (see _stage)
FAST_ITEM = 2e-6
READ_AHEAD_PROBE = 64  # items read one at a time before trying runs
READ_AHEAD_MAX = 1024  # the longest run: a run cannot be stopped midway (terminate, cancel)


class _Raised(Exception):  # noqa: N818 - not an error: carries the iterator's own
    """The input iterator raised *error* after *count* items were staged (see _stage)."""

    def __init__(self, count: int, error: BaseException) -> None:
        self.count, self.error = count, error


#: iterators that only walk memory: reading them in bulk can neither block nor deadlock
_IN_MEMORY_ITERATORS: frozenset[type] = frozenset(
    {
        type(iter(range(0))),
        type(iter([])),
        type(iter(())),
        type(iter("")),
        type(iter(b"")),
        type(iter(bytearray())),
        type(iter({})),
        type(iter(set())),
    }
)


class Feeding:
    """Mixin: the imap feeder threads (see the module docstring)."""

    # provided by Scheduler
    _lock: Any
    _state: str
    _broken: BaseException | None
    _feeding: set[MapJob]
    _thread: threading.Thread  # the I/O thread

    if TYPE_CHECKING:  # Scheduler's own methods, used here

        def _wake(self) -> None: ...
        def _deliver(self, wait: bool = True) -> None: ...
        def _input_end(self, job: MapJob, error: BaseException | None) -> None: ...
        def _queue_job(self, job: MapJob) -> None: ...
        def _stopped_error(self) -> BaseException: ...

    def _feed(self, job: MapJob, it: Iterator) -> None:
        """The imap feeder thread: reads the caller's iterator within the job's limit.

        An iterator that is not known to walk memory alone -- a generator may be waiting for
        the results of this very imap -- is handed over one item at a time, so no item it has
        produced is ever held back while the next one is being read: each is staged
        (``MapJob.staged``) before the next is read, without the lock, and wakes the I/O
        thread only when the dispatcher asked for it (``MapJob.wake_at``: a worker waits for
        input); the dispatcher gathers the staged items into chunks, and sends a partial one
        after ``FEED_HOLD`` (see ``Dispatch._hold_over``).  (In-memory inputs have no feeder:
        the I/O thread reads them itself, see _read_input.)
        """
        error: BaseException | None = None
        while True:
            with job.space:
                # the bound holds while the caller may still read; once the pool is closed,
                # the rest of the input is read and run, as close() promises
                while (
                    job.backlog() >= job.limit
                    and self._state == RUNNING
                    and not self._broken
                    and not job.cancelled
                ):
                    # 1 s: a safety net (release(), close() and dispatch notify), and how soon
                    # a dropped iterator's finalizer, which cannot notify, is seen
                    job.space.wait(1.0)
                if job.cancelled:  # (cancel_map has ended its input)
                    break
                if self._state in (TERMINATING, FINISHED) or self._broken:
                    error = self._stopped_error()  # the caller's iterator must say why
                    break
                room = job.limit - job.backlog() if self._state == RUNNING else FEED_BATCH
            want = min(room, FEED_BATCH)
            got, error = self._stage(job, it, want)
            with self._lock:
                if job.cancelled or job.cut:  # meanwhile: what was just read is not run
                    break
                if got:
                    self._queue_job(job)
                if error is None and (self._state in (TERMINATING, FINISHED) or self._broken):
                    error = self._stopped_error()  # the input did not end: the pool did
                if error is not None or got < want:
                    break
                self._wake()
        with self._lock:
            self._feeding.discard(job)
            self._input_end(job, error)
            self._wake()  # someone must deliver the end of input
        self._deliver()  # ...and if the I/O thread is gone already, that is us

    def _read_input(self, job: MapJob) -> None:
        """Top up the window of *job*'s in-memory input (``job.source``), under the lock, in
        the I/O thread alone: no feeder thread.

        Reading a range or a list's iterator can neither block nor run the caller's code, so
        the I/O thread may do it; what it saves is a thread hand-over: the consumer's release
        woke the feeder, whose read woke the I/O thread, each waiting for the GIL up to the
        interpreter's switch interval (5 ms) while another thread ran.  Only the I/O thread
        reads, and ends the input: a Ctrl-C cannot cut its bookkeeping short there (a caller's
        thread, with a signal taken by any thread of the program, could).  Called by the
        dispatcher (``_next_for``) and at each turn for a job whose window has room
        (``_feed_waiting``); elsewhere it wakes the I/O thread instead.  Window full:
        ``job.starved``, and the consumer's next release, or its next wait, wakes the I/O
        thread (``MapJob.on_room``).  Once the pool is closed the bound is lifted, as in
        _feed: it reads a window's worth ahead of what is sent, consumed or not."""
        source = job.source
        if source is None or job.input_done or job.cancelled or job.cut:
            return
        if threading.current_thread() is not self._thread:  # (a caller dispatching)
            self._wake()
            return
        if self._state == RUNNING:
            room = job.limit - job.backlog()
        else:  # (closed: a window's worth ahead of what is sent, whatever is consumed)
            room = job.limit - job.available()
        if room <= 0:
            job.starved = self._state == RUNNING
            return
        error: BaseException | None = None
        if isinstance(source, range):  # the window over it widens (see _feed)
            stop = job.stop or 0
            got = min(room, len(source) - stop)
            job.stop = stop + got
            done = job.stop == len(source)
        else:
            buf = job.buf
            assert isinstance(buf, list)
            job.add(())  # (compacts the buffer now and then)
            before = len(buf)
            try:
                buf.extend(itertools.islice(source, room))  # keeps items read before an error
            except BaseException as exc:  # noqa: BLE001 - reaches the caller via the iterator
                error = exc
            got = len(buf) - before
            # (an in-memory iterator knows what it has left: an input that fills the window
            # exactly is over now, not at a read after the consumer's next release)
            done = error is not None or got < room or not operator.length_hint(source)
        job.fed += got
        # the window is full now: the dispatcher sends what there is, and the job waits for
        # the consumer once it is all out (closed: no bound to wait on, it reads on)
        job.starved = not done and self._state == RUNNING
        if done:
            job.source = None
            self._feeding.discard(job)
            self._input_end(job, error)

    def _feed_waiting(self) -> None:
        """At each turn of the I/O thread (under the lock): queue the jobs whose feeder staged
        items, and read on the in-memory inputs whose window has room -- one just
        submitted, or whose consumer released results: read here, and not only when a worker
        takes a chunk, their end is known even while no worker can."""
        for job in list(self._feeding):
            if job.source is not None:
                if job.room():
                    self._read_input(job)
                    self._queue_job(job)  # (queued again once its window had filled)
            elif job.staged and not job.queued:
                self._queue_job(job)

    def _stage(self, job: MapJob, it: Iterator, want: int) -> tuple[int, BaseException | None]:
        """Read up to *want* items of *it*, each handed over before the next is read: the
        feeder's loop for an iterator that may block (see _feed).  Returns how many were
        read, and the iterator's exception.  No lock: the dispatcher moves staged items
        into the job's buffer itself.

        Items come one at a time, with a look at ``job.wake_at`` after each, while they come
        slowly or the dispatcher waits for the next one; while they come fast (under
        FAST_ITEM each) and nobody waits, ``list.extend`` reads them in growing runs at C
        speed -- still each appended before the next is read (≈ 5x faster on a plain
        generator).  A run that ends up blocked inside the iterator is found by the
        dispatcher's poll (``job.bulk``, see ``Dispatch._next_for``)."""
        staged = job.staged
        got = 0
        error = None
        try:
            while got < want:
                room = want - got
                wake_at = job.wake_at
                k = min(job.read_ahead, room)
                if wake_at != NEVER:  # (STOP, or the dispatcher waits for this many)
                    k = min(k, max(1, int(wake_at) - len(staged)))
                if k == 1:
                    k = min(room, READ_AHEAD_PROBE)
                    n = self._stage_each(job, it, k)
                else:
                    n, k = self._stage_run(job, it, k)  # (k: the run it made, maybe shorter)
                if n < 0:  # stopped after -n items: the caller's loop says why
                    got -= n
                    break
                got += n
                if n < k:
                    break  # exhausted
        except _Raised as raised:
            got += raised.count
            error = raised.error
        job.fed += got  # (read by this thread alone: the bound is kept, got <= want)
        return got, error

    def _stage_each(self, job: MapJob, it: Iterator, count: int) -> int:
        """Up to *count* items one at a time; how many (negative: stopped after that many).
        Fast items make the next reads runs of READ_AHEAD_PROBE."""
        staged = job.staged
        append = staged.append
        got = 0
        t0 = time.monotonic()
        try:
            for item in itertools.islice(it, count):  # (a for loop: ≈ 3x a next() call's speed)
                append(item)
                got += 1
                if len(staged) >= job.wake_at and not self._wake_for(job):  # (or STOP)
                    return -got
        except BaseException as exc:  # noqa: BLE001 - reaches the caller via the iterator
            raise _Raised(got, exc) from None
        if got == count == READ_AHEAD_PROBE and time.monotonic() - t0 < count * FAST_ITEM:
            job.read_ahead = READ_AHEAD_PROBE
        return got

    def _stage_run(self, job: MapJob, it: Iterator, k: int) -> tuple[int, int]:
        """Up to *k* items in one ``list.extend`` (each appended as it is read): how many
        (negative: stopped after that many), and the run's length (*k*, or less where a
        wake-up is due first: fewer items read than that means the iterator is exhausted).

        The items are counted by the staged list's length and what the dispatcher moved out of it
        meanwhile (``job.unstaged``), both read under the lock before and after the run:
        counting each item as it passed (``zip`` with a counter) cost ≈ 17 ns an item, a
        third of a plain generator's own ≈ 50 ns."""
        staged = job.staged
        job.bulk = True
        # the dispatcher may have begun waiting for input just before: it saw no run (bulk
        # still False: no poll), so this one must end where a wake-up is due (as _stage chose)
        if job.wake_at != NEVER:
            k = min(k, max(1, int(job.wake_at) - len(staged)))
        before = self._staged_ever(job)
        t0 = time.monotonic()
        try:
            staged.extend(itertools.islice(it, k))
        except BaseException as exc:  # noqa: BLE001 - reaches the caller via the iterator
            raise _Raised(self._staged_ever(job) - before, exc) from None
        finally:
            job.bulk = False
        n = self._staged_ever(job) - before
        fast = time.monotonic() - t0 < k * FAST_ITEM
        job.read_ahead = min(2 * k, READ_AHEAD_MAX) if fast else 1
        job.poll_delay = FEED_HOLD
        if len(job.staged) >= job.wake_at and not self._wake_for(job):  # (or STOP)
            return -n, k
        return n, k

    def _staged_ever(self, job: MapJob) -> int:
        """Items *job*'s feeder has staged in all: those still staged and those the
        dispatcher moved out (under the lock, where it moves them)."""
        with self._lock:
            return len(job.staged) + job.unstaged

    def _wake_for(self, job: MapJob) -> bool:
        """The feeder staged as many items as the dispatcher asked for (``job.wake_at``), or
        was told to STOP: False if it must stop; else wake the I/O thread and return True.
        Under the lock: the dispatcher may have taken the items and asked again meanwhile
        (a new wake_at that NEVER must not overwrite: the next item would wake nobody)."""
        with self._lock:
            if job.cancelled or self._state in (TERMINATING, FINISHED) or self._broken:
                return False
            if len(job.staged) >= job.wake_at:  # still due
                job.wake_at = NEVER  # (the dispatcher sets it again when it waits for input)
                self._wake()
        return True

    def _stop_feeders(self, jobs: Iterable[MapJob]) -> None:
        """Feeders of *jobs* stop: those waiting for room now, those reading at their next
        item (the pool is stopping, or the job was cancelled; under the lock)."""
        for job in jobs:
            job.wake_at = STOP
            job.space.notify_all()
