"""``Pipe``: a two-ended message channel between processes (:func:`multiprocessing.Pipe`).

::

    parent, child = procpool.Pipe()          # duplex: both ends send and receive
    reader, writer = procpool.Pipe(duplex=False)

Each end is a :class:`Connection`: ``send(obj)`` / ``recv()`` move picklable objects,
``send_bytes`` / ``recv_bytes`` raw bytes, ``poll(timeout)`` says whether a message is waiting.
``recv`` blocks until a message arrives and raises ``EOFError`` once the other end is closed and
nothing is left; ``send`` to a closed end raises ``BrokenPipeError``.

How it is built: a ``SOCK_SEQPACKET`` Unix socketpair, one datagram per message (no length
prefix, no second read: about half the system calls of the stdlib's stream framing).  Messages
larger than 64 KiB travel as a memfd attached to a small datagram (:mod:`procpool._ipc_bulk`),
so a 1 MiB message costs two memory copies and no pipe ping-pong.  Several processes may even use
the same end at once: a datagram is never interleaved with another.
"""

from __future__ import annotations

import errno
import pickle
import socket
import sys
import time

from . import _ipc_wire, _serialize
from ._ipc_fd import FdHandle, explain_emfile

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Pipe", "Connection"]

_loads = pickle.loads
_dumps = pickle.dumps
_modules = sys.modules
_MP_CONNECTION = _serialize.MP_CONNECTION
_inband_only = _ipc_wire._inband_only
_RECVBUF = _ipc_wire._RECVBUF
_ANCBUF = _ipc_wire._ANCBUF
_RECV_WAIT = _ipc_wire._RECV_WAIT
_MSG_TRUNC = _ipc_wire._MSG_TRUNC
_SEND_NOWAIT = int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)


class Connection:
    """One end of a :func:`Pipe` (same methods as :class:`multiprocessing.connection.Connection`).

    Raises ``OSError`` when used after :meth:`close` or in the direction it cannot go (the
    reading end of a one-way pipe cannot send), ``EOFError`` from the ``recv`` methods when the
    other end is closed, ``BrokenPipeError`` from the ``send`` methods in that case,
    :class:`~procpool.SerializationError` from :meth:`send` for an object that cannot be pickled.
    """

    def __init__(self, fd: int, readable: bool = True, writable: bool = True) -> None:
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        self._sock: socket.socket | None = _ipc_wire.own_socket(fd)
        self._wire = _ipc_wire.Wire(self._sock)
        self._wire.bulk_limit = _ipc_wire.PIPE_BULK_IN_FLIGHT  # (see Wire._room_for_bulk)
        self._inline_max = self._wire.inline_max
        self._readable = readable
        self._writable = writable

    # -- state ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._sock is None

    @property
    def readable(self) -> bool:
        """True if this end can receive."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if this end can send."""
        return self._writable

    def fileno(self) -> int:
        """The socket's descriptor (readable when a message or EOF is waiting)."""
        self._check_closed()
        assert self._sock is not None
        return self._sock.fileno()

    def close(self) -> None:
        """Close this end; the other end then sees ``EOFError`` / ``BrokenPipeError``."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            self._wire.forget_inflight()
            sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _check_closed(self) -> None:
        if self._sock is None:
            raise OSError("handle is closed")

    def _check_readable(self) -> None:
        self._check_closed()
        if not self._readable:
            raise OSError("connection is write-only")

    def _check_writable(self) -> None:
        self._check_closed()
        if not self._writable:
            raise OSError("connection is read-only")

    # -- sending ----------------------------------------------------------------------------
    def send(self, obj: Any) -> None:
        """Send a picklable object (blocks while the socket buffer is full)."""
        if self._sock is None or not self._writable:
            self._check_writable()
        if type(obj) is bytes and len(obj) > self._inline_max:  # big bytes: skip the pickle
            self._wire.send_frame(obj, 0, [], None, raw=True)
            return
        if _serialize.stdlib_pending and _MP_CONNECTION in _modules:
            _serialize.adopt_stdlib_connection()  # (see there)
        try:
            data = _dumps(obj, 5, buffer_callback=_inband_only)
        except Exception:
            data = None  # descriptors, big buffers, lambdas: the general path decides
        if data is not None and len(data) <= self._inline_max:
            try:  # the fast path: one system call
                self._sock.send(data, _SEND_NOWAIT)  # type: ignore[union-attr]  # (checked)
            except ConnectionResetError as exc:  # (the peer closed with messages unread)
                raise BrokenPipeError(errno.EPIPE, "the other end is closed") from exc
            except BlockingIOError:
                # the buffer is full.  (Not a blocking send: the kernel wakes a blocked sender
                # only once the buffer is three-quarters empty, see _ipc_wire.Wire._send)
                self._wire.send_frame(data, 0, [], None)
            return
        if data is None:
            data, nbuf, fds = _ipc_wire.encode(obj)
        else:
            nbuf, fds = 0, []
        self._wire.send_frame(data, nbuf, fds, None)

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send bytes from a bytes-like object (``offset``/``size`` select a slice)."""
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize != 1 or m.ndim != 1:  # (offset and size count bytes, not rows)
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        self._wire.send_frame(m[offset : offset + size], 0, [], None)

    # -- receiving --------------------------------------------------------------------------
    def recv(self) -> Any:
        """Wait for a message and return the object; ``EOFError`` when the peer is gone."""
        if self._sock is None or not self._readable:
            self._check_readable()
        assert self._sock is not None
        try:
            data, anc, msg_flags, _ = self._sock.recvmsg(_RECVBUF, _ANCBUF, _RECV_WAIT)
        except BlockingIOError:  # made non-blocking by another process (see own_socket)
            data, anc, msg_flags = _ipc_wire.take_datagram(self._sock, True, None)
        if not anc and data and not msg_flags & _MSG_TRUNC:  # the fast path
            return _loads(data)
        obj, eof = self._wire.finish_object(data, anc, msg_flags)
        if eof:
            raise EOFError
        return obj

    def _recv_raw(self) -> bytes | memoryview:
        data, nbuf, fds, eof = self._wire.recv_frame(True, None)
        if eof:
            raise EOFError
        if fds:
            # an object sent with send() whose large buffers (or descriptors) came apart from
            # its pickle: its bytes are its pickle with them in it, as multiprocessing's are
            try:
                return pickle.dumps(_ipc_wire.decode(data, nbuf, fds), 5)
            except Exception as exc:  # (descriptors: no bytes can carry them)
                raise OSError(
                    "received an object with descriptors; use recv(), not recv_bytes()"
                ) from exc
        return data

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Wait for a message and return its bytes; ``OSError`` if longer than *maxlength*."""
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        data = self._recv_raw()
        if maxlength is not None and len(data) > maxlength:
            # (as multiprocessing: the message is lost, so the end cannot be read any more; a
            # duplex end can still send)
            if self._writable:
                self._readable = False
            else:
                self.close()
            raise OSError("bad message length")
        return bytes(data)

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Receive a message into *buf* at *offset*; return its length.

        Raises :class:`multiprocessing.BufferTooShort` (carrying the message) when it does not
        fit.
        """
        from multiprocessing import BufferTooShort

        self._check_readable()
        with memoryview(buf) as m:
            bytesize = m.nbytes
            if offset < 0:
                raise ValueError("negative offset")
            if offset > bytesize:
                raise ValueError("offset too large")
            data = self._recv_raw()
            size = len(data)
            if bytesize - offset < size:
                raise BufferTooShort(bytes(data))
            m.cast("B")[offset : offset + size] = data
            return size  # in bytes, whatever the buffer's item size (as multiprocessing)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a message (or EOF) is waiting; wait up to *timeout* (None: forever)."""
        self._check_readable()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        try:
            _ipc_wire.wait_fd(self.fileno(), 1, deadline)  # POLLIN
        except _ipc_wire.Expired:
            return False
        return True

    # -- passing ----------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        self._check_closed()
        return (_rebuild_connection, (FdHandle(self.fileno()), self._readable, self._writable))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<procpool.Connection {state} readable={self._readable} writable={self._writable}>"


def _rebuild_connection(fd: int, readable: bool, writable: bool) -> Connection:
    return Connection(fd, readable, writable)


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """Return the two ends ``(conn1, conn2)`` of a new pipe.

    With ``duplex=False``, ``conn1`` can only receive and ``conn2`` can only send.

    Example::

        parent, child = procpool.Pipe()
        p = procpool.Process(target=lambda c: c.send("hello"), args=(child,))
        p.start(); print(parent.recv()); p.join()
    """
    a, b = explain_emfile(lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    for s in (a, b):
        _ipc_wire.enlarge_buffers(s, 4 << 20)
        s.set_inheritable(False)
    fa, fb = a.detach(), b.detach()
    if duplex:
        return Connection(fa), Connection(fb)
    return Connection(fa, writable=False), Connection(fb, readable=False)
