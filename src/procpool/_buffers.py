"""Reusable shared-memory segments for a pool's large task arguments (parent side).

A large argument buffer (``_serialize.OOB_THRESHOLD`` and up) travels as a memfd.  Writing into
a *fresh* memfd is capped by the kernel allocating and clearing its pages (about 3 GB/s here,
a third of ``memcpy``); writing into one whose pages already exist and are mapped in the parent
runs at ``memcpy`` speed.  So each pool keeps a :class:`BufferCache`: segments of exactly the
size asked for, mapped once in the parent, handed out again once nobody can still see their
old contents.

A segment is free for reuse only when both of these are gone:

* the **payload** that holds it (``_serialize.Payload``): released when its task is done, after
  the last retry;
* every **worker mapping** of it: each time the dispatcher sends the segment to a worker it
  counts one hold for that worker (:meth:`BufferCache.hold`); the worker reports the segment's
  inode in a ``RELEASED`` frame once the unpickled objects that used the mapping are freed and
  it is unmapped (:meth:`BufferCache.released`); a dead worker's holds go with it
  (:meth:`BufferCache.forget_worker`).  A segment the worker had mapped when a task forked is
  *pinned* (a ``PINNED`` frame): the child may read it for as long as it lives, so it is
  closed when given back, never reused.

A task that keeps an argument alive (stores it in a global) simply keeps its segment busy;
the cache then makes new ones.  Free segments are bounded (:data:`CACHE_BYTES`,
:data:`CACHE_SEGMENTS`) and trimmed after :data:`TRIM_AFTER` seconds unused, so an idle pool
gives its memory back.  The parent's mappings are ``MADV_DONTFORK`` and the fds are internal:
forked workers inherit neither.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ._serialize import map_fd
from ._start import INTERNAL_FDS

CACHE_BYTES = 256 << 20  # free segments a pool keeps, in bytes
CACHE_SEGMENTS = 32  # ...and in number (each holds a descriptor)
TRIM_AFTER = 2.0  # seconds a free segment is kept unused before it is closed


class Segment:
    """One memfd, mapped in the parent, lent to one payload at a time."""

    __slots__ = ("fd", "ino", "size", "view", "busy", "holders", "freed_at", "pinned")

    def __init__(self, raw: memoryview) -> None:
        """A new segment holding a copy of *raw*: written with pwrite(2), which fills a fresh
        memfd faster than page faults through a mapping; mapped when first reused."""
        fd = os.memfd_create("procpool-arg", os.MFD_CLOEXEC)
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
        """Overwrite the whole segment with *raw* (same size): one memcpy into mapped pages."""
        if self.view is None:  # no descriptor kept, no mapping inherited by forked workers
            self.view = map_fd(self.fd, self.size, dontfork=True)
        self.view[:] = raw.cast("B")

    def close(self) -> None:
        if self.view is not None:
            self.view.release()  # the mapping goes with its last view
            self.view = None
        os.close(self.fd)


class BufferCache:
    """A pool's reusable argument segments (see the module docstring).  Thread-safe."""

    def __init__(self, limit: int = CACHE_BYTES, on_free: Callable[[], None] | None = None) -> None:
        """*on_free* is called (under the cache's lock: it must not take others) when a first
        segment becomes free: the owner then arranges for :meth:`trim` to run."""
        self._lock = threading.Lock()
        self._limit = limit
        self._on_free = on_free
        self._segments: dict[int, Segment] = {}  # inode -> segment, busy or free
        self._free: OrderedDict[int, Segment] = OrderedDict()  # inode -> free segment (LRU)
        self._free_bytes = 0
        self._closed = False

    def take(self, raw: memoryview) -> Segment | None:
        """A segment holding a copy of *raw* (bytes, C-contiguous), lent to the caller until
        :meth:`unlend`; None when the cache is closed (the caller makes a fresh memfd)."""
        size = raw.nbytes
        with self._lock:
            if self._closed:
                return None
            seg = None
            for ino, cand in self._free.items():
                if cand.size == size:
                    seg = cand
                    del self._free[ino]
                    self._free_bytes -= size
                    break
            if seg is not None:
                seg.busy = True
        if seg is None:
            seg = Segment(raw)
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
                if seg is None:
                    continue  # not ours (a buffer of another kind), or already closed
                left = seg.holders.get(wid, 0) - 1
                if left > 0:
                    seg.holders[wid] = left
                else:
                    seg.holders.pop(wid, None)
                    self._maybe_free(seg)

    def pin(self, inodes: list[int]) -> None:
        """A task forked while its worker mapped these segments (PINNED): the child may read
        them as long as it lives, so they are closed when given back, never reused."""
        with self._lock:
            for ino in inodes:
                seg = self._segments.get(ino)
                if seg is not None:
                    seg.pinned = True

    def forget_worker(self, wid: int) -> None:
        """Worker *wid* is dead: its mappings are gone with it."""
        with self._lock:
            for seg in list(self._segments.values()):
                if seg.holders.pop(wid, None) is not None:
                    self._maybe_free(seg)

    def _maybe_free(self, seg: Segment) -> None:
        if seg.busy or seg.holders or seg.ino not in self._segments:
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
