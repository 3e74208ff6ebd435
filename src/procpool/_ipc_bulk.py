"""Large messages out of band: payloads bigger than a datagram travel in a ``memfd``.

A message too large for one socket datagram (or for the socket's buffer) is written into a
memfd, and only the descriptor crosses the socket (``SCM_RIGHTS``).  Creating a fresh memfd per
message costs page allocation and zeroing in the kernel (~2.7 GB/s for 1 MiB messages), so each
sending process keeps a few memfds and reuses one as soon as its receiver is done with it:

    offset 0: the "done" byte -- 0 while in flight, set to 1 by the receiver after reading
    offset 64: the payload

The receiver copies the payload out before setting "done", so reuse can never overwrite data
still being read.  A receiver killed before setting it just leaves that memfd unused; it is
evicted (closed) when the cache is full, and the kernel frees it with its last descriptor.
The sender writes and sends a *duplicate* of the cache's descriptor, which it closes once
sent: another thread evicting the entry meanwhile closes only the cache's own (it closed the
one being sent, whose number a third thread's memfd could then take: a message lost and
another sent twice).  Nothing has a name; nothing can leak past the processes.
"""

from __future__ import annotations

import mmap
import os
import threading

__all__ = ["HEADER", "write", "read_bytes", "map_payload", "release", "clear_cache"]

HEADER = 64
_CACHE_ENTRIES = 8
_CACHE_MAX_BYTES = 8 << 20  # larger payloads use a fresh memfd each time
_DONE = b"\1"
DONE = _DONE  # (a Pipe's sender reads it to see that its message was taken: see _ipc_wire)
_BUSY = b"\0"

_lock = threading.Lock()
_cache: list[list[int]] = []  # [fd, capacity]


def _reset_after_fork() -> None:
    # the child inherited the parent's descriptors: never reuse them (the parent does)
    global _lock
    _lock = threading.Lock()
    for fd, _cap in _cache:
        try:
            os.close(fd)
        except OSError:
            pass
    _cache.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def clear_cache() -> None:
    """Close the cached memfds (in-flight ones stay valid for their receivers)."""
    with _lock:
        for fd, _cap in _cache:
            try:
                os.close(fd)
            except OSError:
                pass
        _cache.clear()


def _new_memfd(size: int) -> int:
    fd = os.memfd_create("procpool-bulk", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, HEADER + size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write(data: bytes | memoryview) -> int:
    """Put *data* in a memfd; return a descriptor of it, which the caller sends, then closes
    (a reused memfd's own descriptor stays with the cache: this is a duplicate)."""
    size = len(data)
    if size <= _CACHE_MAX_BYTES:
        with _lock:
            fd = -1
            for entry in _cache:
                efd, cap = entry
                if os.pread(efd, 1, 0) == _DONE:
                    if cap < size:
                        os.ftruncate(efd, HEADER + size)
                        entry[1] = size
                    os.pwrite(efd, _BUSY, 0)
                    fd = os.dup(efd)
                    break
            if fd < 0:
                new = _new_memfd(size)
                try:
                    fd = os.dup(new)
                except BaseException:
                    os.close(new)
                    raise
                if len(_cache) >= _CACHE_ENTRIES:
                    old = _cache.pop(0)  # in flight too long (its receiver may be dead)
                    os.close(old[0])  # (its sender's duplicate, if still sending, stays)
                _cache.append([new, size])
    else:
        fd = _new_memfd(size)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < size:
            done += os.pwrite(fd, view[done:], HEADER + done)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: the most one read() returns on Linux, whatever is asked (0x7ffff000 bytes)
_READ_MAX = 0x7FFFF000


def read_bytes(fd: int, size: int) -> bytes:
    """Copy the payload of a received memfd into ``bytes``."""
    if size > _READ_MAX:  # one read would stop short: copy from a mapping instead
        with mmap.mmap(fd, HEADER + size, prot=mmap.PROT_READ) as m:
            return m[HEADER : HEADER + size]
    data = os.pread(fd, size, HEADER)
    if len(data) < size:  # pread of a regular file returns short only at EOF
        raise EOFError("truncated out-of-band message")
    return data


def map_payload(fd: int, size: int) -> tuple[mmap.mmap, memoryview]:
    """Map a received memfd read-only; return the mapping and a view of its payload."""
    m = mmap.mmap(fd, HEADER + size, prot=mmap.PROT_READ)
    return m, memoryview(m)[HEADER : HEADER + size]


def release(fd: int) -> None:
    """The receiver is done with *fd*: let its sender reuse it, and close our descriptor."""
    try:
        os.pwrite(fd, _DONE, 0)
    finally:
        os.close(fd)
