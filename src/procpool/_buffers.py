"""Reusable shared-memory segments for large buffers between a pool and its workers.

A large buffer (``_serialize.OOB_THRESHOLD`` and up) travels as a memfd.  Writing into a
*fresh* memfd is capped by the kernel allocating and clearing its pages (about 1.6-3 GB/s
here, a fifth to a third of ``memcpy``); writing into one whose pages already exist and are
mapped runs at ``memcpy`` speed.  So each side keeps a :class:`BufferCache` for what it
sends: the pool one for its tasks' arguments, each worker one for its results.  Segments are
mapped by their owner, and handed out again once nobody can still see their old contents --
for a buffer of another size too, from half to 5/4 of it: the segment is cut or grown to it,
unless sizes alternate (see :meth:`BufferCache._fitting`).

A segment is free for reuse only when both of these are gone:

* the **payload** that holds it (``_serialize.Payload``): released when its task is done, after
  the last retry (a worker's result: once its descriptors are queued, held for the parent
  first);
* every **mapping** of it on the other side: each time the owner sends the segment it counts
  one hold for the receiver (:meth:`BufferCache.hold`); the receiver reports the segment's
  inode in a ``RELEASED`` frame once the unpickled objects that used the mapping are freed and
  it is unmapped, or once it drops the descriptor unmapped (:meth:`BufferCache.released`); a
  dead worker's holds go with it (:meth:`BufferCache.forget_worker`).  A segment mapped on the
  receiving side when that process forked is *pinned* (a ``PINNED`` frame): the child may read
  it for as long as it lives, so it is closed when given back, never reused.

Arguments: the worker reports what it unmapped (``_worker``, ``_mapping.on_release``).
Results: the pool's process notes the inode of each result buffer it receives, with the
:class:`Returns` of the worker that sent it (``_mapping.lenders``); mapping it or dropping it
unread says so, and the I/O thread sends the worker its ``PINNED`` and ``RELEASED`` frames
(``Dispatch._give_back``).  memfd inodes are numbered by a kernel counter, so an inode names
one segment for as long as either side can still mention it.

An object that keeps a buffer alive (a task storing its argument in a global, a caller keeping
a result) simply keeps its segment busy; the cache then makes new ones, up to
``max_segments`` (a worker's: each lent segment holds one of its descriptors), and past that
fresh memfds as before.  Free segments are bounded (:data:`CACHE_BYTES`, or a worker's
:func:`worker_cache_bytes`, and :data:`CACHE_SEGMENTS`) and trimmed after :data:`TRIM_AFTER`
seconds unused, so an idle pool or worker gives its memory back.  Mappings are ``MADV_DONTFORK`` and the fds are internal: forked workers (and children a
task forks) inherit no mapping, and pool workers no descriptor.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

from . import _protocol as P
from ._mapping import map_fd
from ._start import INTERNAL_FDS

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

CACHE_BYTES = 256 << 20  # free segments a pool keeps, in bytes
CACHE_SEGMENTS = 32  # ...and in number (each holds a descriptor)
TRIM_AFTER = 2.0  # seconds a free segment is kept unused before it is closed
#: a size a segment was cut or grown away from, asked for again within this many takes,
#: alternates with the size it went to: segments of both are then kept as they are for
#: EXACT_SPELL takes (see BufferCache._fitting)
RECENT = 16
EXACT_SPELL = 256
#: free result segments all of a pool's workers keep, in bytes (each at least WORKER_MIN)
WORKERS_BYTES = 512 << 20
WORKER_MIN = 64 << 20


def worker_cache_bytes(processes: int) -> int:
    """The bytes of free result segments each of *processes* workers may keep."""
    return max(WORKER_MIN, WORKERS_BYTES // max(1, processes))


class Segment:
    """One memfd, mapped by its owner (the sender), lent to one payload at a time."""

    __slots__ = ("fd", "ino", "size", "view", "busy", "holders", "freed_at", "pinned")

    def __init__(self, raw: memoryview, name: str = "procpool-arg") -> None:
        """A new segment holding a copy of *raw*: written with pwrite(2), which fills a fresh
        memfd faster than page faults through a mapping; mapped when first reused."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        INTERNAL_FDS.add(fd)  # at once: a worker forked during the write must not inherit it
        try:
            view = raw.cast("B")
            done, total = 0, len(view)
            while done < total:
                done += os.pwrite(fd, view[done:], done)
            self.ino = os.fstat(fd).st_ino
        except BaseException:
            INTERNAL_FDS.discard(fd)
            os.close(fd)
            raise
        self.fd = fd
        self.size = total
        self.view: memoryview | None = None
        self.busy = True  # lent to a payload
        self.holders: dict[int, int] = {}  # worker id -> mappings it has not released
        self.freed_at = 0.0
        self.pinned = False  # a process forked by a task may map it: never reuse

    def fill(self, raw: memoryview) -> None:
        """Overwrite the whole segment with *raw*: one memcpy into mapped pages.  A segment
        of another size is first cut or grown to *raw*'s (``ftruncate``) and mapped again
        at that size: the pages it keeps exist already, only those it gains are allocated
        and cleared (the unmapping and mapping again cost about a copy more: 32 MiB 4 KiB
        larger ≈ 2 ms + 4 ms, the copy ≈ 3.6 ms; a fresh memfd more still)."""
        size = raw.nbytes
        if size != self.size:
            if self.view is not None:  # (its mapping has the old size)
                self.view.release()
                self.view = None
            os.ftruncate(self.fd, size)
            self.size = size
        if self.view is None:  # no descriptor kept, no mapping inherited by forked workers
            self.view = map_fd(self.fd, self.size, dontfork=True)
        self.view[:] = raw.cast("B")

    def close(self) -> None:
        if self.view is not None:
            self.view.release()  # the mapping goes with its last view
            self.view = None
        os.close(self.fd)


class BufferCache:
    """Reusable segments of one sender (see the module docstring).  Thread-safe."""

    def __init__(
        self,
        limit: int = CACHE_BYTES,
        on_free: Callable[[], None] | None = None,
        max_segments: int = 0,
        name: str = "procpool-arg",
    ) -> None:
        """*limit*: bytes of free segments kept.  *on_free* is called (under the cache's lock:
        it must not take others) when a first segment becomes free: the owner then arranges
        for :meth:`trim` to run.  *max_segments*: segments at most, busy or free (0: no
        bound); past it, :meth:`take` gives None.  *name*: the memfds' (as /proc shows it)."""
        self._lock = threading.Lock()
        self._limit = limit
        self._on_free = on_free
        self._max = max_segments
        self._name = name
        self._segments: dict[int, Segment] = {}  # inode -> segment, busy or free
        self._free: OrderedDict[int, Segment] = OrderedDict()  # inode -> free segment (LRU)
        self._free_bytes = 0
        self._closed = False
        self._takes = 0  # (see _fitting)
        # size a segment was cut or grown away from -> (the take, the size it went to)
        self._resized: dict[int, tuple[int, int]] = {}
        self._keep: dict[int, int] = {}  # size -> the take until which no segment is cut from it

    def take(self, raw: memoryview) -> Segment | None:
        """A segment holding a copy of *raw* (bytes, C-contiguous), lent to the caller until
        :meth:`unlend`; None when the cache is closed or holds ``max_segments`` none of which
        is free (the caller makes a fresh memfd)."""
        size = raw.nbytes
        with self._lock:
            if self._closed:
                return None
            seg = self._fitting(size)
            if seg is not None:
                del self._free[seg.ino]
                self._free_bytes -= seg.size
                seg.busy = True
            elif self._max and len(self._segments) >= self._max:
                if not self._free:
                    return None
                _, old = self._free.popitem(last=False)  # room for one of this size
                self._free_bytes -= old.size
                self._drop(old)
        if seg is None:
            seg = Segment(raw, self._name)
            with self._lock:
                if self._closed:
                    INTERNAL_FDS.discard(seg.fd)
                    seg.close()
                    return None
                self._segments[seg.ino] = seg
            return seg
        try:
            seg.fill(raw)
        except BaseException:
            self.unlend(seg)
            raise
        return seg

    def _fitting(self, size: int) -> Segment | None:
        """The free segment to take for a buffer of *size* bytes (the lock is held): one of
        that size; else the closest one from half to 5/4 of it, to be cut or grown to it
        (an array whose size changes from call to call: see Segment.fill) -- but not one of
        a size that alternates with another: a size a segment was cut away from, asked for
        again within :data:`RECENT` takes, and the size it was cut to, are kept as they
        are for the next :data:`EXACT_SPELL` (a segment of each then serves them at memcpy
        speed; cut and grown at each call, one served neither: a review measured 3.8
        against 1.3 GB/s) -- unless the free segments fill the cache's bound, where a
        fresh one would only push another out."""
        keep = self._keep
        takes = self._takes = self._takes + 1
        past = self._resized.pop(size, None)
        if past is not None and takes - past[0] <= RECENT:  # sizes alternate
            keep[size] = keep[past[1]] = takes + EXACT_SPELL
            if len(keep) > 64:  # (a bound: the expired go)
                for old in [k for k, until in keep.items() if until <= takes]:
                    del keep[old]
        full = self._free_bytes + size > self._limit or len(self._free) >= CACHE_SEGMENTS
        seg = None
        for cand in self._free.values():
            if cand.size == size:
                return cand
            if (
                size // 2 <= cand.size <= size + size // 4
                and (full or keep.get(cand.size, 0) <= takes)
                and (seg is None or abs(cand.size - size) < abs(seg.size - size))
            ):
                seg = cand
        if seg is not None:
            self._resized[seg.size] = (takes, size)
            if len(self._resized) > 64:  # (a bound: the oldest go)
                del self._resized[next(iter(self._resized))]
        return seg

    def unlend(self, seg: Segment) -> None:
        """The payload holding *seg* is done with it."""
        with self._lock:
            seg.busy = False
            self._maybe_free(seg)

    def hold(self, segments: list[Segment], wid: int) -> None:
        """*segments* were sent to worker *wid*: it maps each until it says RELEASED."""
        with self._lock:
            for seg in segments:
                seg.holders[wid] = seg.holders.get(wid, 0) + 1

    def released(self, wid: int, inodes: list[int]) -> None:
        """Worker *wid* unmapped these segments (its RELEASED frame)."""
        with self._lock:
            for ino in inodes:
                seg = self._segments.get(ino)
                if seg is None or wid not in seg.holders:
                    continue  # not ours (a buffer of another kind), or already closed
                left = seg.holders[wid] - 1
                if left > 0:
                    seg.holders[wid] = left
                else:
                    seg.holders.pop(wid, None)
                    self._maybe_free(seg)

    def pin(self, inodes: list[int]) -> None:
        """The receiver forked while it mapped these segments (PINNED): the child may read
        them as long as it lives, so they are closed when given back, never reused."""
        with self._lock:
            for ino in inodes:
                seg = self._segments.get(ino)
                if seg is not None:
                    seg.pinned = True
                    if self._free.pop(ino, None) is not None:  # (never, in the order frames
                        self._free_bytes -= seg.size  # go: PINNED first) no reuse from now
                        self._drop(seg)

    def forget_worker(self, wid: int) -> None:
        """Worker *wid* is dead: its own mappings are gone with it -- but not those of a
        process its task forked, whose PINNED it may have died before sending (it goes with
        the worker's next flush): what it held is closed when given back, never reused (a
        helper process reading its argument saw the next task's bytes, or a SIGBUS once the
        segment was cut to another size: review)."""
        with self._lock:
            for seg in list(self._segments.values()):
                if seg.holders.pop(wid, None) is not None:
                    seg.pinned = True
                    self._maybe_free(seg)

    def _maybe_free(self, seg: Segment) -> None:
        if seg.busy or seg.holders or seg.ino in self._free:
            return
        if self._segments.get(seg.ino) is not seg:  # (closed)
            return
        if self._closed or seg.pinned:
            self._drop(seg)
            return
        seg.freed_at = time.monotonic()
        if not self._free and self._on_free is not None:
            self._on_free()
        self._free[seg.ino] = seg
        self._free_bytes += seg.size
        while self._free and (self._free_bytes > self._limit or len(self._free) > CACHE_SEGMENTS):
            _, old = self._free.popitem(last=False)
            self._free_bytes -= old.size
            self._drop(old)

    def _drop(self, seg: Segment) -> None:
        del self._segments[seg.ino]
        INTERNAL_FDS.discard(seg.fd)
        seg.close()

    @property
    def free_bytes(self) -> int:
        """Bytes held by free segments (a lock-free read)."""
        return self._free_bytes

    def trim(self, older_than: float = TRIM_AFTER) -> bool:
        """Close the free segments unused for *older_than* seconds; True if some are left."""
        with self._lock:
            cutoff = time.monotonic() - older_than
            for ino, seg in list(self._free.items()):
                if seg.freed_at <= cutoff:
                    del self._free[ino]
                    self._free_bytes -= seg.size
                    self._drop(seg)
            return bool(self._free)

    def close(self) -> None:
        """The pool is finished: close the free segments now, and each lent or held one as soon
        as it is given back (a thread may still be filling one for a last submission)."""
        with self._lock:
            self._closed = True
            for seg in self._free.values():
                self._drop(seg)
            self._free.clear()
            self._free_bytes = 0


class Returns:
    """What the pool's process owes one worker for the result buffers it sent: the inodes of
    those unmapped here (or dropped unread), and of those mapped when this process forked.

    Called from anywhere -- a mapping's finalizer runs in whichever thread frees the last
    object using it, perhaps holding the scheduler's lock -- so it only queues ``(worker id,
    frame kind, inode)`` on the scheduler's deque and wakes its I/O thread, which sends the
    frames (``Dispatch._give_back``).  It holds the scheduler weakly: results outlive pools.
    """

    __slots__ = ("wid", "_sched")

    def __init__(self, wid: int, sched: Any) -> None:
        self.wid = wid
        self._sched = weakref.ref(sched)

    def released(self, ino: int) -> None:
        """The segment *ino* is no longer mapped here (nor held unmapped): the worker may
        reuse it once this reaches it."""
        sched = self._sched()
        if sched is None:
            return
        owed = sched._returns
        if owed is not None:  # (None: the pool has ended, nobody would send it)
            owed.append((self.wid, P.RELEASED, ino))
            sched._wake()

    def pinned(self, ino: int) -> None:
        """This process forks while it maps *ino*: its child may keep reading it (no wake-up:
        the segment's RELEASED follows, and the two go in this order)."""
        sched = self._sched()
        owed = sched._returns if sched is not None else None
        if owed is not None:
            owed.append((self.wid, P.PINNED, ino))
