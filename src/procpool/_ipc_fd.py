"""How the IPC primitives' file descriptors travel to another process.

Every procpool primitive (Queue, Pipe connection, Lock, Value...) is a handful of descriptors: a
socket, a memfd.  Pickling one pickles :class:`FdHandle` placeholders, which pick the way the
descriptor travels at that moment:

* procpool is pickling (a pool task's arguments or result, a message through a procpool Queue or
  Pipe): the descriptor rides along with ``SCM_RIGHTS`` (:func:`procpool._serialize.send_fd`);
* :mod:`multiprocessing` is starting a process with *spawn* or *forkserver*: its own
  ``DupFd`` mechanism hands the descriptor to the child;
* :mod:`multiprocessing`'s ``ForkingPickler`` outside a start (a stdlib ``Pool`` task, an
  ``mp.Queue`` message): the stdlib's resource sharer lends the descriptor, as it does for its
  own ``Connection`` objects;
* plain :func:`pickle.dumps` anywhere else raises ``RuntimeError``: there is no channel that could
  carry a descriptor, and a pickle without it would be a lie.

With *fork*, nothing is pickled: the child inherits the descriptors.
"""

from __future__ import annotations

import errno
import os
from multiprocessing import context, reduction

from . import _serialize

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

__all__ = [
    "FdHandle",
    "register_forking_reducer",
    "region_token",
    "send_token",
    "explain_emfile",
]


def send_token(fd: int) -> int | None:
    """The token *fd* travels under when procpool is pickling right now, else ``None``.

    The fast path for an object's ``__reduce__``: with a token it can reduce to
    ``(rebuild, (..., token))`` and rebuild with :func:`procpool._serialize.recv_fd` -- one
    global in the pickle instead of a nested :class:`FdHandle`.  ``None`` means another mechanism
    must carry the descriptor (a :mod:`multiprocessing` start or ``ForkingPickler``, or none:
    plain pickle): reduce to something holding an :class:`FdHandle` then, which picks it.
    """
    if context.get_spawning_popen() is not None:
        return None
    try:
        return _serialize.send_fd(fd)
    except RuntimeError:
        return None


def region_token(region: Any) -> int | None:
    """:func:`send_token` for a shared-memory region: in a pool task's arguments, the region
    goes by key, without its descriptor (see :func:`procpool._serialize.send_region`).
    (Only procpool's own pickling passes one: no need to look for a spawning Popen first.)"""
    try:
        return _serialize.send_region(region)
    except RuntimeError:
        return None


class FdHandle:
    """Pickles as "this file descriptor" and unpickles as a new descriptor (an ``int``).

    The unpickling side owns the new descriptor.  The handle itself does not own *fd*.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if context.get_spawning_popen() is not None:
            return (_rebuild_dupfd, (reduction.DupFd(self.fd),))
        try:
            token = _serialize.send_fd(self.fd)
        except RuntimeError:
            raise RuntimeError(
                "procpool IPC objects carry file descriptors; they can be passed to a procpool "
                "pool task or Process, through a procpool Queue or Pipe, to a multiprocessing "
                "Process or Pool, or inherited with fork -- not pickled with plain pickle"
            ) from None
        return (_serialize.recv_fd, (token,))


def _reduce_for_forking_pickler(handle: FdHandle) -> tuple[Any, tuple[Any, ...]]:
    # DupFd uses the spawning Popen when there is one, else the stdlib's resource sharer.
    return (_rebuild_dupfd, (reduction.DupFd(handle.fd),))


def _rebuild_dupfd(dup: Any) -> int:
    return dup.detach()


def register_forking_reducer() -> None:
    """Teach :class:`multiprocessing.reduction.ForkingPickler` to send :class:`FdHandle`."""
    reduction.ForkingPickler.register(FdHandle, _reduce_for_forking_pickler)


register_forking_reducer()


# ---------------------------------- the standard library's sockets and connections (see _serialize)
def _refuse_outside_procpool(obj: Any) -> None:
    """Outside procpool's pickling (plain ``pickle``, ``copy``, cloudpickle...), these objects
    cannot be pickled, with the ``TypeError`` plain pickle raised for a socket before procpool
    registered its reductions (code probing whether something pickles catches that)."""
    if not _serialize.collecting():
        raise TypeError(f"cannot pickle {type(obj).__name__!r} object")


def reduce_socket(sock: Any) -> tuple[Any, tuple[Any, ...]]:
    """A ``socket.socket`` travels as its descriptor, as :mod:`multiprocessing` sends it."""
    _refuse_outside_procpool(sock)
    fd = sock.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, "cannot send a closed socket")
    return (_rebuild_socket, (FdHandle(fd), sock.family, sock.type, sock.proto))


def _rebuild_socket(fd: Any, family: int, kind: int, proto: int) -> Any:
    import socket

    return socket.socket(family, kind, proto, fileno=fd)


def reduce_stdlib_connection(conn: Any) -> tuple[Any, tuple[Any, ...]]:
    """A :mod:`multiprocessing` ``Connection`` travels as its descriptor (``fileno()`` raises
    ``OSError`` for a closed one)."""
    _refuse_outside_procpool(conn)
    return (_rebuild_stdlib_connection, (FdHandle(conn.fileno()), conn.readable, conn.writable))


def _rebuild_stdlib_connection(fd: Any, readable: bool, writable: bool) -> Any:
    from multiprocessing.connection import Connection

    return Connection(fd, readable, writable)


def close_quietly(fd: int) -> None:
    """Close *fd*, ignoring a descriptor that is already closed."""
    try:
        os.close(fd)
    except OSError:
        pass


def explain_emfile(make: Callable[[], T]) -> T:
    """``make()``; if this process is out of descriptors (``EMFILE``), an ``OSError`` with
    that errno which says what holds them and how to allow more.

    procpool's primitives hold descriptors where :mod:`multiprocessing`'s hold none (a Lock
    two, a Value or a Queue four, an Event six, half that from Python 3.13): under the usual
    soft limit of 1,024, a program makes a few hundred of them, not thousands.  The limit is
    the program's to raise (``ulimit -n``, ``resource.setrlimit``): raising it behind the
    program's back was tried and dropped (review) -- descriptors above 1,023 then broke its
    ``select.select()`` later, far from the cause, and its child processes inherited the limit.
    """
    try:
        return make()
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        raise OSError(
            errno.EMFILE,
            f"Too many open files: this process holds its limit of {soft} descriptors (a "
            "procpool Lock holds 2, a Value or a Queue 4, an Event 6, half that from Python "
            f"3.13); allow more with `ulimit -n` or resource.setrlimit(RLIMIT_NOFILE, ...), up "
            f"to the hard limit of {hard}",
        ) from exc
