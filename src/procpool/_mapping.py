"""Received buffers: memfds mapped without keeping a descriptor, and who may reuse them.

A large buffer (see ``_serialize``) arrives as a memfd.  :func:`map_fd` maps it shared and
keeps no descriptor; the mapping goes when its last view is freed, and then its sender is
told, so that it may rewrite the segment (``_buffers``):

* in a pool's worker, each received argument buffer's inode goes to ``on_release`` (the
  worker's RELEASED frame to the pool);
* in the pool's process, a worker's result segments are listed in ``lenders`` as they arrive
  (``_supervise._note_lent``) and report to that worker's ``Returns`` once unmapped -- or that
  they are *pinned* for good when this process forks while it maps them (a child keeps the
  mapping: ``_pin_lent``, an ``os.register_at_fork`` hook).

:func:`discard_received` says the same for buffers that are dropped without being mapped.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any


#: set in a pool's worker: called with a received buffer's inode once its mapping is gone, so
#: the parent may reuse the segment (see ``_buffers``); the parent leaves it None
on_release: Callable[[int], None] | None = None


#: in a pool's worker: the received buffers mapped now, by inode (how many mappings each)
mapped: dict[int, int] = {}


def _mapped(ino: int) -> None:
    if on_release is not None:
        mapped[ino] = mapped.get(ino, 0) + 1


def _released(ino: int) -> None:
    report = on_release
    if report is not None:
        left = mapped.get(ino, 0) - 1
        if left > 0:
            mapped[ino] = left
        else:
            mapped.pop(ino, None)
        report(ino)


#: in the pool's process: result buffers received from workers and neither mapped nor dropped
#: yet, by inode -> the sender's ``_buffers.Returns`` (noted by ``_supervise._note_lent``):
#: the worker may reuse the segment once told it is no longer mapped here
lenders: dict[int, Any] = {}
#: ...and those mapped now: a fork pins them (see _pin_lent)
mapped_lent: dict[int, Any] = {}


def _map_lent(fd: int, size: int, ino: int, lender: Any) -> memoryview:
    """Map a worker's result buffer; tell *lender* once when the mapping is gone (map_fd
    calls back once, also when it fails), and that it is pinned if a fork may have copied it
    before it was listed in mapped_lent (see _pin_lent)."""
    forked = _forks[1]  # forks finished so far
    mapped_lent[ino] = lender  # (before the mapping: a fork from now on pins it)
    view = map_fd(fd, size, on_unmap=lambda: _unmapped_lent(ino, lender))
    if _forks[0] != forked:  # a fork began since, or was under way: its child may map it
        lender.pinned(ino)
    return view


def _unmapped_lent(ino: int, lender: Any) -> None:
    mapped_lent.pop(ino, None)
    lender.released(ino)


#: forks of this process begun (before-fork hooks run) and finished (in the parent): a
#: mapping made while they differ may be in a child that _pin_lent did not see it for
_forks = [0, 0]
_forks_lock = threading.Lock()  # (the counts only: nothing else is done under it)


def _pin_lent() -> None:
    """Before a fork of this process: a child keeps the result buffers mapped now, so their
    workers must never rewrite them (PINNED; the unmapping here still says RELEASED).
    Mappings made from here until the fork is done pin themselves (see _map_lent)."""
    with _forks_lock:
        _forks[0] += 1
    if mapped_lent:
        for ino, lender in list(mapped_lent.items()):  # (one C call: others add meanwhile)
            lender.pinned(ino)
            mapped_lent.pop(ino, None)  # (pinned for good: the unmapping still says RELEASED)


def _forked_in_parent() -> None:
    with _forks_lock:
        _forks[1] += 1


def _forget_lent() -> None:
    # (touching as little as it can: every forked worker runs this, and each page written
    # is its own from then on -- the idle worker's memory)
    global _forks_lock
    if _forks_lock.locked():  # (held by another thread of the parent as it forked)
        _forks_lock = threading.Lock()
    if lenders:  # a forked worker: its pool's process's, not its own
        lenders.clear()
    if mapped_lent:
        mapped_lent.clear()


os.register_at_fork(
    before=_pin_lent, after_in_parent=_forked_in_parent, after_in_child=_forget_lent
)


class _Unmapped:
    """A mapping's end, run once (see map_fd): unmap it, if it was made, then call *on_unmap*
    -- from the finalizer when its last view is freed, or at once when map_fd fails half
    way.  Once only: a second report would let the sender rewrite a segment lent again."""

    __slots__ = ("close", "on_unmap")

    def __init__(self, on_unmap: Callable[[], None] | None) -> None:
        self.close: Callable[[], object] | None = None  # set once the mapping exists
        self.on_unmap = on_unmap

    def __call__(self) -> None:
        close, self.close = self.close, None
        on_unmap, self.on_unmap = self.on_unmap, None
        try:
            if close is not None:
                close()
        finally:  # a soft timeout's SIGALRM may raise in here: the sender must still be told
            if on_unmap is not None:
                on_unmap()


if sys.version_info >= (3, 13):

    def map_fd(
        fd: int, size: int, *, dontfork: bool = False, on_unmap: Callable[[], None] | None = None
    ) -> memoryview:
        """Map *fd* shared, read-write and populated, keeping no descriptor (``trackfd=False``):
        the fd can be closed at once, and a process forked later inherits no descriptor.
        Unmapped when the last view is freed, then *on_unmap* runs -- exactly once, also when
        this raises (after undoing the mapping).  *dontfork*: forked children do not inherit
        the mapping either."""
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        once = _Unmapped(on_unmap)  # (the mmap's own dealloc unmaps: no close to give it)
        mm = None
        try:
            mm = mmap.mmap(fd, size, flags=flags, prot=prot, trackfd=False)  # type: ignore[call-arg]
            if dontfork and hasattr(mmap, "MADV_DONTFORK"):
                mm.madvise(mmap.MADV_DONTFORK)
            weakref.finalize(mm, once).atexit = False
            return memoryview(mm)
        except BaseException:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # (a view made just before the exception: it goes with it)
                    pass
            once()  # told once: the finalizer, if made, finds it done
            raise

else:  # mmap.mmap dup()s the fd and keeps it for the mapping's life: map it ourselves
    _libc: Any = None  # loaded at the first mapping: see _load_libc

    def _load_libc() -> Any:
        """libc's mmap, munmap and madvise through ``ctypes``, imported now and not with
        procpool: a forked worker holds every page of its parent's memory, and ctypes is
        ≈ 0.35 MB of it, for programs that never send a large buffer.  The parent loads it at
        its first large buffer (workers forked later inherit it); a worker forked before
        imports it at its own first (≈ 0.1 MB more in that worker)."""
        global _libc
        from . import _start

        with _start._FORK_LOCK:  # (no fork of ours in the middle of the import: see _cloudpickle)
            import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = libc
        return libc

    def map_fd(
        fd: int, size: int, *, dontfork: bool = False, on_unmap: Callable[[], None] | None = None
    ) -> memoryview:
        """Map *fd* shared, read-write and populated, keeping no descriptor: a program may hold
        thousands of received arrays without running out of fds, and a process forked later
        inherits no descriptor.  Unmapped when the last view is freed, then *on_unmap* runs --
        exactly once, also when this raises (after undoing the mapping).  *dontfork*: forked
        children do not inherit the mapping either."""
        import ctypes

        once = _Unmapped(on_unmap)
        try:
            libc = _libc or _load_libc()
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of a shared buffer failed: {os.strerror(err)}")
            once.close = lambda: libc.munmap(addr, size)
            if dontfork and hasattr(mmap, "MADV_DONTFORK"):
                libc.madvise(addr, size, mmap.MADV_DONTFORK)
            region = (ctypes.c_char * size).from_address(addr)
            # never at interpreter exit (finalize's default): code running then -- the pool's
            # own finalizer reading a progress slot, a user's atexit handler reading a result
            # -- may still use the memory, and the exit unmaps everything anyway
            weakref.finalize(region, once).atexit = False
            return memoryview(region).cast("B")
        except BaseException:  # unmapped now and told once (the finalizer, if made, finds
            once()  # it done; `region`, kept by this traceback alone, must not be read)
            raise


def _map_buffer(fd: int) -> memoryview:
    """Map a received memfd (its reuse is reported to the sender once unmapped: the parent in
    a worker, a worker in the pool's process)."""
    st = os.fstat(fd)
    ino = st.st_ino
    if lenders:
        lender = lenders.pop(ino, None)
        if lender is not None:
            return _map_lent(fd, st.st_size, ino, lender)
    if on_release is None:
        return map_fd(fd, st.st_size)
    _mapped(ino)  # (map_fd reports its end once, also when it fails)
    return map_fd(fd, st.st_size, on_unmap=lambda: _released(ino))


def discard_received(nbuf: int, fds: list[int], start: int = 0) -> None:
    """Received buffers that will never be mapped (from *start* on): say so, as an unmapping
    would.  Does not close *fds*."""
    if on_release is None and not lenders:
        return
    for fd in fds[start:nbuf]:
        try:
            ino = os.fstat(fd).st_ino
        except OSError:
            continue
        lender = lenders.pop(ino, None)
        if lender is not None:
            lender.released(ino)
        elif on_release is not None:
            _released(ino)
