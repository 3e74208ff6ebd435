"""Shared memory regions, and process-shared semaphores living inside them.

A :class:`Region` is a file mapped ``MAP_SHARED`` in every process that uses it:

* anonymous by default: a ``memfd`` -- no name anywhere; the kernel frees it when the last
  process holding the descriptor or a mapping exits, SIGKILL included, so nothing can leak into
  ``/dev/shm``.  It reaches other processes by inheritance or as a passed descriptor
  (:mod:`procpool._ipc_fd`);
* named only when the caller gives a name: ``/dev/shm/<name>``, created ``O_EXCL`` with mode
  ``0600``, opened by unrelated processes by that name, removed by an explicit ``unlink``.

Layout: the first page holds up to :data:`MAX_SEMS` semaphore slots and a JSON description (so a
named region can be opened knowing only its name); the user data starts at :data:`DATA_OFFSET`,
page aligned (numpy views are aligned).

Semaphores are POSIX unnamed semaphores (``sem_init(pshared=1)``) placed in a slot and driven by
the standard library's own C ``SemLock`` (``_multiprocessing.SemLock._rebuild`` wraps a raw
``sem_t *``).  So procpool's locks run the very C code of :mod:`multiprocessing`'s -- same speed,
same semantics, timeouts and ``EINTR`` handling -- but in anonymous memory instead of a named
``/dev/shm/sem.*`` file that leaks when a process is killed.
"""

from __future__ import annotations

import _multiprocessing
import ctypes
import json
import mmap
import os
import re
import sys
import threading
import weakref
from itertools import count

from ._ipc_fd import FdHandle, close_quietly, explain_emfile, region_token
from ._serialize import recv_fd, send_region

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "Region",
    "SemLock",
    "RECURSIVE_MUTEX",
    "SEMAPHORE",
    "SEM_VALUE_MAX",
    "DATA_OFFSET",
    "MAX_SEMS",
]

RECURSIVE_MUTEX, SEMAPHORE = 0, 1
SEM_VALUE_MAX: int = _multiprocessing.SemLock.SEM_VALUE_MAX

PAGE = mmap.PAGESIZE
SEM_SLOT = 64  # sizeof(sem_t) is 32 on 64-bit glibc; keep slots cache-line sized
MAX_SEMS = 32
META_OFFSET = SEM_SLOT * MAX_SEMS
META_SIZE = PAGE - META_OFFSET
DATA_OFFSET = PAGE
SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,200}")

_libc = ctypes.CDLL(None, use_errno=True)
_sem_init = _libc.sem_init
_sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
_sem_init.restype = ctypes.c_int


def _check_libc() -> None:
    # SemLock's destructor calls sem_close() on the handle: glibc answers EINVAL for an unnamed
    # semaphore (harmless); other C libraries might not.  Refuse rather than risk it.
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError) as exc:  # pragma: no cover - non-glibc systems
        raise ImportError("procpool's IPC primitives need Linux with glibc") from exc


_check_libc()


class SemLock(_multiprocessing.SemLock):
    """The stdlib's C semaphore, kept together with the region whose memory it uses.

    Holding the region here means a bound method such as ``lock.acquire`` kept by a caller can
    never outlive the memory it operates on.
    """

    __slots__ = ("_region", "__weakref__")


# Every semaphore made in this process, for _after_fork_in_child.  Weak: the set keeps nothing
# alive.  Only semaphores are tracked -- a region without any (a SharedArray, Value, Array) costs
# no bookkeeping at all.
_live_sems: weakref.WeakSet[SemLock] = weakref.WeakSet()
_live_lock = threading.Lock()
# The semaphores of regions received here, by file (device, inode) and slot: a primitive that
# comes back to a process that has it already (a pool task's result, a Queue's message, an
# initializer's argument then a task's) gets the same handle.  An RLock's owner and count live
# in its handle: with two, the thread holding the lock through one waited for good taking it
# through the other (`with v.get_lock(): v2.value += 1`), and a Condition's wait through the
# second said its lock was not held.
_sems_by_file: weakref.WeakValueDictionary[tuple[int, int, int], SemLock] = (
    weakref.WeakValueDictionary()
)


def _after_fork_in_child() -> None:
    # A forked child must not believe it owns the RLocks its parent held (same thread id).
    for sem in list(_live_sems):
        sem._after_fork()
    # Nobody will tell a child to forget the regions its parent was given by key: a worker of
    # a pool its task starts would keep them mapped for good.  (Objects already rebuilt from
    # them hold their regions themselves.)
    _MAPPED.clear()
    global _key_lock, _live_lock
    _key_lock = threading.Lock()  # another thread may have held it at the fork
    _live_lock = threading.Lock()  # (so may one making or receiving a semaphore)


os.register_at_fork(after_in_child=_after_fork_in_child)


def shm_path(name: str) -> str:
    """The file behind a named region; raises ``ValueError`` for an unusable name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid shared memory name {name!r} (letters, digits, '_.-' only)")
    return os.path.join(SHM_DIR, name)


# Python >= 3.13 can map without mmap.mmap keeping a dup() of the descriptor for the mapping's
# life (the region keeps its own, for passing it on): one descriptor per region, not two.
_MAP_KW: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


# Regions passed by key (a pool task's arguments, see _serialize.send_region).  A key is
# unique across processes (the pid in its high bits): a worker may itself run a pool.
_KEY_COUNTER = count(1)
_KEY_PID_SHIFT = 40
#: the regions this process gave a key, for unpickling its own keyed payloads (a chunk split)
_OWN: weakref.WeakValueDictionary[int, Region] = weakref.WeakValueDictionary()
_key_lock = threading.Lock()


class _Unmapped:
    """A region whose MAP frame came but whose mapping failed (ENOMEM, the map count...):
    its descriptor, kept to try again when a task names it, since the parent counts it as
    mapped here."""

    __slots__ = ("fd", "name")

    def __init__(self, fd: int, name: str | None) -> None:
        self.fd = fd
        self.name = name

    def __del__(self) -> None:
        close_quietly(self.fd)


#: in a worker: the regions its pool mapped here (MAP frames), until it says FORGET; or why
#: the pool could not send one (a str: see unsent)
_MAPPED: dict[int, Region | _Unmapped | str] = {}


def remember(key: int, fd: int, name: str | None) -> None:
    """Map the region *fd* (taking ownership) to be found under *key* (a MAP frame)."""
    try:
        _MAPPED[key] = Region(os.dup(fd), name)
    except Exception:  # noqa: BLE001 - tried again, and explained, when a task names it
        _MAPPED[key] = _Unmapped(fd, name)
    else:
        os.close(fd)


def unsent(key: int, reason: str) -> None:
    """The pool could not send the region under *key* (a MAP frame without its fd): the
    tasks naming it fail, saying *reason*; the next one to reach here brings it again."""
    _MAPPED[key] = reason


def forget(keys: list[int]) -> None:
    """Drop the regions under *keys* (a FORGET frame); objects built on them keep them."""
    for key in keys:
        _MAPPED.pop(key, None)


def by_key(key: int) -> Region:
    """The region passed under *key*: mapped here by its pool (a MAP frame), or this
    process's own (see :meth:`Region.key`)."""
    region = _MAPPED.get(key) or _OWN.get(key)
    if type(region) is Region:
        return region
    if region is None:
        raise RuntimeError(f"shared memory {key:#x} is not mapped in this process")
    if isinstance(region, str):
        raise OSError(f"shared memory {key:#x} could not be sent to this worker: {region}")
    try:  # its mapping failed when it came: once more
        mapped = Region(os.dup(region.fd), region.name)
    except OSError as exc:
        raise OSError(exc.errno, f"shared memory {key:#x} cannot be mapped here: {exc}") from None
    _MAPPED[key] = mapped  # (the _Unmapped goes, and its descriptor)
    return mapped


class Region:
    """A shared-memory region mapped in this process (see the module docstring).

    Cheap to make: mapping it is the whole cost.  A region passed to a pool task is mapped in
    the worker once and found by key after that (see :meth:`key`).  The semaphores in it are
    tracked for fork (``_live_sems``); its address is computed on first use.
    """

    __slots__ = ("mmap", "fd", "size", "name", "_address", "_key", "_file", "__weakref__")

    mmap: mmap.mmap
    fd: int
    size: int
    name: str | None
    _address: int | None

    def __init__(self, fd: int, name: str | None = None) -> None:
        """Map *fd* (taking ownership of it: closed by :meth:`close`, or now if mapping fails)."""
        try:
            self.mmap = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, **_MAP_KW)  # 0: the whole file
        except BaseException:
            close_quietly(fd)
            raise
        self.fd = fd
        self.size = len(self.mmap)
        self.name = name
        self._address = None
        self._key = 0
        self._file: tuple[int, int] | None = None  # (device, inode): see semaphore

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, data_size: int, meta: dict[str, Any], name: str | None = None) -> Region:
        """A new zero-filled region with *data_size* bytes of data after the header page
        (out of descriptors: an ``OSError`` that says what holds them)."""
        return explain_emfile(lambda: cls._create(data_size, meta, name))

    @classmethod
    def _create(cls, data_size: int, meta: dict[str, Any], name: str | None) -> Region:
        size = DATA_OFFSET + max(int(data_size), 0)
        if name is None:
            fd = os.memfd_create("procpool", os.MFD_CLOEXEC)
        else:
            path = shm_path(name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, size)
            except BaseException:
                close_quietly(fd)
                raise
            region = cls(fd, name)  # closes fd itself if it fails: not twice
            try:
                region.write_meta(meta)  # (a description too long, say)
            except BaseException:
                region.close()
                raise
        except BaseException:
            if name is not None:
                _unlink_quietly(shm_path(name))
            raise
        return region

    @classmethod
    def open(cls, name: str) -> Region:
        """Open the named region *name*; raises ``FileNotFoundError`` when there is none."""
        fd = os.open(shm_path(name), os.O_RDWR | os.O_CLOEXEC)
        return cls(fd, name)

    @classmethod
    def received(cls, token: int, name: str | None) -> Region:
        """The region procpool passed under *token* (see :meth:`token`): its descriptor, or
        for a negative token the region mapped under that key (see :meth:`key`)."""
        if token < 0:
            return by_key(-token)
        return cls(recv_fd(token), name)

    def key(self) -> int:
        """This region's key, given on first use: a pool sends its descriptor to each worker
        once (a MAP frame), then its tasks name it by this key (``_dispatch._map_regions``).
        The pool tells the workers to forget it when the region dies here."""
        key = self._key
        if not key:
            with _key_lock:  # two threads passing a fresh region: one key
                key = self._key
                if not key:
                    key = (os.getpid() << _KEY_PID_SHIFT) | next(_KEY_COUNTER)
                    _OWN[key] = self
                    self._key = key
        return key

    # -- metadata ---------------------------------------------------------------------------
    def write_meta(self, meta: dict[str, Any]) -> None:
        blob = json.dumps(meta, separators=(",", ":")).encode()
        if len(blob) >= META_SIZE:
            raise ValueError("shared object description too long")
        self.mmap[META_OFFSET : META_OFFSET + len(blob)] = blob

    def read_meta(self) -> dict[str, Any]:
        raw = bytes(self.mmap[META_OFFSET : META_OFFSET + META_SIZE]).rstrip(b"\0")
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise ValueError(f"{self.name!r} is not a procpool shared object")
        return meta

    # -- semaphores -------------------------------------------------------------------------
    def semaphore(self, slot: int, kind: int, value: int, maxvalue: int, *, init: bool) -> SemLock:
        """The semaphore in *slot*; with *init*, first initialise it to *value*."""
        if not 0 <= slot < MAX_SEMS:
            raise ValueError("semaphore slot out of range")
        address = self.address + slot * SEM_SLOT
        if init:
            if _sem_init(address, 1, value) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        where = None
        file = self._file
        if file is None and self.fd >= 0:  # (once per region: a lock passed to each task)
            st = os.fstat(self.fd)
            file = self._file = (st.st_dev, st.st_ino)
        if file is not None:
            where = (*file, slot)
        with _live_lock:
            if where is not None and not init:  # (a new region's file is new: nothing to find)
                sem = _sems_by_file.get(where)
                if sem is not None and sem.kind == kind and sem.maxvalue == maxvalue:
                    return sem
            sem = SemLock._rebuild(address, kind, maxvalue, None)
            sem._region = self
            _live_sems.add(sem)
            if where is not None:
                _sems_by_file[where] = sem
        return sem

    # -- data -------------------------------------------------------------------------------
    def data(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable view of the data area."""
        end = self.size if length is None else DATA_OFFSET + offset + length
        return memoryview(self.mmap)[DATA_OFFSET + offset : end]

    @property
    def address(self) -> int:
        """Where the mapping starts in this process (computed on first use)."""
        address = self._address
        if address is None:
            address = self._address = ctypes.addressof(ctypes.c_char.from_buffer(self.mmap))
        return address

    @property
    def data_address(self) -> int:
        return self.address + DATA_OFFSET

    # -- lifetime ---------------------------------------------------------------------------
    def unlink(self) -> None:
        """Remove the region's name (named regions only); mappings stay valid."""
        if self.name is None:
            raise ValueError("an anonymous shared object has no name to unlink")
        os.unlink(shm_path(self.name))

    def close(self) -> None:
        """Close this process's descriptor.  The mapping lives on while objects use it."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            close_quietly(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- passing ----------------------------------------------------------------------------
    def _fd(self) -> int:
        if self.fd < 0:
            raise ValueError("cannot pass a closed shared object")
        return self.fd

    def token(self) -> int | None:
        """Register the region to travel with what procpool is pickling now (its descriptor,
        or in a pool task's arguments its key); the token to give :meth:`received` on the
        other side.  ``None`` when procpool is not pickling: pickle the region itself then
        (its ``__reduce__`` finds the way).

        Objects built on one region reduce to ``(_attach_x, (..., token, name))`` with this: one
        global in the pickle, no nested Region and FdHandle reductions.
        """
        if self.fd < 0:
            raise ValueError("cannot pass a closed shared object")
        try:  # (region_token, inlined: the hot path of a task's SharedArray argument)
            return send_region(self)
        except RuntimeError:
            return None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        fd = self._fd()
        token = region_token(self)
        if token is not None:
            return (_attach_region, (token, self.name))
        return (_rebuild_region, (FdHandle(fd), self.name))


def _rebuild_region(fd: int, name: str | None) -> Region:
    return Region(fd, name)


def _attach_region(token: int, name: str | None) -> Region:
    return Region.received(token, name)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
