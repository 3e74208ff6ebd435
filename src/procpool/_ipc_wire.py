"""One message = one datagram: how Pipe and Queue put objects on a Unix socket and take them off.

Both run over ``SOCK_SEQPACKET`` socketpairs.  The kernel moves each datagram whole: a process
killed while sending or receiving can neither deliver half a message nor deliver one twice, and
several processes may send and receive on the same socket without any lock.

Wire format of a datagram:

* no ancillary data -- the datagram *is* the message (a pickle stream, or the raw bytes of
  ``send_bytes``).  This is the fast path: no header, one ``send``, one ``recvmsg_into``;
* with descriptors attached (``SCM_RIGHTS``) -- the datagram starts with :data:`HEADER`
  (magic, flags, number of out-of-band pickle buffers, payload length).  With ``BULK`` the
  payload is in the first descriptor, a memfd (:mod:`procpool._ipc_bulk`); otherwise it follows
  the header.  The remaining descriptors belong to the pickle (out-of-band numpy buffers, and the
  descriptors of procpool objects inside the message: a Queue sent through a Queue).

Encoding tries ``pickle.dumps`` first (fast) and falls back to procpool's serializer
(:mod:`procpool._serialize`: out-of-band buffers, descriptors, cloudpickle) when the object needs
it; an object that cannot be pickled raises :class:`~procpool.SerializationError` at once.
"""

from __future__ import annotations

import array
import errno
import fcntl
import math
import os
import pickle
import select
import socket
import struct
import time
from collections import deque

from . import _ipc_bulk, _serialize
from .errors import SerializationError

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["Wire", "encode", "decode", "INLINE_MAX"]

HEADER = struct.Struct("<4sIIQ")  # magic, flags, nbuf, payload length
MAGIC = b"PPw1"
BULK = 1
RAW = 2  # the payload is a top-level ``bytes`` object, not a pickle (big bytes: one copy less)
INLINE_MAX = 64 * 1024
MAX_FDS = 250  # the kernel accepts at most 253 per message (SCM_MAX_FD)
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECVBUF = INLINE_MAX + HEADER.size + 64
_SOCK_WANT_BYTES = 64 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

# plain ints: the socket module's constants are IntFlag enums, slow to combine on a hot path
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_RECV_NOWAIT = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
_RECV_WAIT = int(socket.MSG_CMSG_CLOEXEC)
_SEND_NOWAIT = int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
_POLLIN = int(select.POLLIN)
_POLLOUT = int(select.POLLOUT)
_PAUSE_MIN, _PAUSE_MAX = 0.001, 0.05  # seconds a send on a full buffer waits to try again
_POLL_MAX_S = 2_000_000.0  # ~23 days: the longest single poll() (2**31 - 1 ms), rounded down
_SIOCOUTQ = 0x5411  # (TIOCOUTQ) bytes of datagrams this socket sent that the peer has not taken
#: a Pipe's large messages (memfds) that one sender may have sent and its peer not yet taken,
#: in bytes (more waits, see Wire._room_for_bulk); a single larger message goes alone
PIPE_BULK_IN_FLIGHT = 64 << 20
_BULK_TRACKED = 64  # ... and at most this many of them (each holds a descriptor meanwhile)
_BULK_PAUSE_MAX = 0.005  # seconds between looks of a sender waiting for its reader


class Expired(Exception):
    """Nothing could be sent or received by the deadline (or at once, not blocking).

    Deliberately not a ``TimeoutError``: the callers turn it into ``queue.Empty``, ``queue.Full``
    or ``False``, and a ``TimeoutError`` a signal handler raises meanwhile
    (:func:`procpool.signals.timeout`) must go through them untouched.
    """


class _NeedSlowPath(Exception):
    pass


def _inband_only(buf: pickle.PickleBuffer) -> bool:
    if buf.raw().nbytes >= _serialize.OOB_THRESHOLD:
        raise _NeedSlowPath  # a big buffer: let _serialize send it out of band
    return True


def encode(obj: Any) -> tuple[bytes, int, list[int]]:
    """Pickle *obj* -> ``(data, nbuf, fds)``; the caller owns (and must close) *fds*."""
    try:
        return pickle.dumps(obj, 5, buffer_callback=_inband_only), 0, []
    except Exception:
        pass  # descriptors, big buffers, lambdas...: the full serializer decides
    payload = _serialize.dumps(obj)
    return payload.data, payload.nbuf, payload.fds


def decode(data: Any, nbuf: int, fds: list[int]) -> Any:
    """Unpickle what :func:`encode` produced (takes ownership of *fds*)."""
    if not fds:
        return pickle.loads(data)
    return _serialize.loads(data, nbuf, fds)


def own_socket(fd: int) -> socket.socket:
    """A socket object for *fd*, a descriptor of a procpool Pipe or Queue, in blocking mode
    whatever ``socket.setdefaulttimeout()`` says in this process (as for ``multiprocessing``'s
    connections, bpo-6056).  Made under a default timeout, a socket object has that timeout
    (a blocking ``recv`` raises ``TimeoutError``) and sets ``O_NONBLOCK`` on the open file
    description -- which every process holding the descriptor shares: a blocking read
    elsewhere would fail with ``BlockingIOError``.  Until this clears the flag, such a read
    may still meet it; the blocking reads wait and try again then (see ``take_datagram``)."""
    sock = socket.socket(fileno=fd)
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    return sock


def enlarge_buffers(sock: socket.socket, want: int = _SOCK_WANT_BYTES) -> None:
    """Raise the socket's send buffer as far as allowed (it bounds the bytes in flight)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, want)  # needs CAP_NET_ADMIN
        return
    except OSError:
        pass
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = want
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(want, limit))
    except OSError:
        pass


def _too_many_fds(n: int) -> SerializationError:
    return SerializationError(
        f"a message can carry at most {MAX_FDS} descriptors; this one would carry {n}"
        " (procpool objects inside it, and one for a message over 64 KiB): nothing was sent"
    )


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Wire:
    """Datagram I/O on one SOCK_SEQPACKET socket (shared by Pipe and Queue).

    ``send_frame`` / ``recv_frame`` never leave a descriptor behind: on every error path the
    descriptors they own are closed.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # how long a send on a full buffer waits before it tries again (see _send): kept
        # between sends, so that a sender that keeps ahead of its receiver settles on waits
        # that let a batch of messages leave, instead of waking for each one
        self._pause = _PAUSE_MIN
        self.inline_max = min(
            INLINE_MAX, max(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4, 1024)
        )
        # the bytes of large messages a sender may have in flight (a Pipe's: see
        # _room_for_bulk); None: no bound beyond the socket's (a Queue's: its maxsize)
        self.bulk_limit: int | None = None
        # this sender's large messages not yet seen taken: [a descriptor of the payload's
        # memfd, whose "done" byte the reader sets (_ipc_bulk), the message's bytes]
        self._inflight: deque[list[int]] = deque()
        self._outq = bytearray(4)

    # -- sending ----------------------------------------------------------------------------
    def send_frame(
        self,
        data: Any,
        nbuf: int,
        fds: list[int],
        deadline: float | None,
        block: bool = True,
        raw: bool = False,
        ready: Callable[[], None] | None = None,
        ready_first: bool = False,
    ) -> None:
        """Send one message; raise :class:`Expired` (nothing sent) past *deadline*.

        Takes ownership of *fds* (closed once sent, or on error).  *ready* is called once the
        message is ready to go, a large one's payload written (a bounded queue takes its slot
        there: a producer killed while it copies must not hold one), or with *ready_first*
        before anything; what it raises, nothing is sent.
        """
        try:
            if ready_first and ready is not None:
                ready()
                ready = None
            size = len(data)
            if not fds and not raw and 0 < size <= self.inline_max:
                if ready is not None:
                    ready()
                self._send(data, None, deadline, block)
                return
            bulk_fd = -1
            bounded = self.bulk_limit is not None
            weight = 0
            try:
                flags = RAW if raw else 0
                parts: list[Any] = []
                # every headed datagram carries a descriptor (an empty SCM_RIGHTS is not
                # delivered, and the receiver tells headed datagrams by their descriptors);
                # a Pipe's message with out-of-band buffers (a numpy array's memfds) puts its
                # pickle in a memfd too, whose "done" byte says when it was taken
                if size > self.inline_max or size == 0 or raw or not fds or (bounded and nbuf):
                    if len(fds) >= MAX_FDS:
                        raise _too_many_fds(len(fds) + 1)
                    if bounded:
                        weight = size + sum(os.fstat(fd).st_size for fd in fds[:nbuf])
                        self._room_for_bulk(weight, deadline, block)
                    bulk_fd = _ipc_bulk.write(data)
                    flags |= BULK
                else:
                    parts.append(data)
                all_fds = ([bulk_fd] if bulk_fd >= 0 else []) + fds
                if len(all_fds) > MAX_FDS:
                    raise _too_many_fds(len(all_fds))
                header = HEADER.pack(MAGIC, flags, nbuf, size)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", all_fds))]
                if ready is not None:
                    ready()
                self._send([header, *parts], anc, deadline, block)
                if bounded and bulk_fd >= 0:  # kept, to see when it is taken
                    self._inflight.append([bulk_fd, weight])
                    bulk_fd = -1
            finally:
                if bulk_fd >= 0:  # (a duplicate: see _ipc_bulk.write)
                    os.close(bulk_fd)
        finally:
            _close_all(fds)

    def _room_for_bulk(self, size: int, deadline: float | None, block: bool) -> None:
        """Wait, before a large message's payload is copied, until this sender's large
        messages not yet taken stay within ``bulk_limit`` bytes (and ``_BULK_TRACKED``
        messages) with it.  A large message is a memfd beside a small datagram, so the
        socket's buffer never fills with them, and a sender ahead of its reader held
        unbounded shared memory (a review: 1.2 GB in 2 s of 1 MiB sends to a reader that
        slept; the stdlib's pipe blocks at once).  A message is taken once its reader has set
        its payload memfd's "done" byte (``_ipc_bulk``: this sender keeps a descriptor of it),
        or once the kernel says the peer has taken every datagram sent on this socket
        (``SIOCOUTQ`` 0: also when the peer is gone).  Neither wakes anyone, so a full sender
        looks again after 1-5 ms.  Each sender counts its own: processes sending on copies of
        one end do not hold each other up.  Both ends of a duplex pipe sending more than the
        bound before either reads wait for each other for good -- as the stdlib's do, far
        sooner (its buffer)."""
        limit = self.bulk_limit
        assert limit is not None
        pause = _PAUSE_MIN
        while True:
            held = self._untaken()
            if held + size <= limit and len(self._inflight) < _BULK_TRACKED or not held:
                return
            if not block:
                raise Expired("too many large messages in flight")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Expired("too many large messages in flight")
            time.sleep(pause if deadline is None else min(pause, deadline - now))
            pause = min(pause * 2, _BULK_PAUSE_MAX)

    def _untaken(self) -> int:
        """The bytes of this sender's large messages its reader has not taken (the oldest
        first: a reader takes them in order)."""
        inflight = self._inflight
        if not inflight:
            return 0
        fcntl.ioctl(self.sock.fileno(), _SIOCOUTQ, self._outq)
        if not any(self._outq):  # the peer took every datagram (or is gone)
            self.forget_inflight()
            return 0
        # No lock (threads of one process may send on one end; a fork keeps no lock held):
        # an entry is looked at only by the thread that took it out, so none is closed twice
        # or read once closed; one not taken yet goes back in front.
        while True:
            try:
                entry = inflight.popleft()
            except IndexError:
                break
            if os.pread(entry[0], 1, 0) != _ipc_bulk.DONE:
                inflight.appendleft(entry)
                break
            os.close(entry[0])
        return sum(entry[1] for entry in list(inflight))  # (a snapshot: others append)

    def forget_inflight(self) -> None:
        """Close the descriptors kept of large messages in flight (taken, or the end closes)."""
        inflight = self._inflight
        while True:
            try:
                fd = inflight.popleft()[0]  # (each taken out by one thread: closed once)
            except IndexError:
                return
            try:
                os.close(fd)
            except OSError:
                pass

    def _send(self, data: Any, anc: list[Any] | None, deadline: float | None, block: bool) -> None:
        sock = self.sock
        pause = self._pause
        waited = False
        while True:
            try:
                if anc is None:
                    sock.send(data, _SEND_NOWAIT)
                else:
                    sock.sendmsg(data, anc, _SEND_NOWAIT)
                self._pause = pause if waited else max(pause / 2, _PAUSE_MIN)
                return
            except BlockingIOError:
                waited = True
            except ConnectionResetError as exc:  # (the peer closed with messages unread)
                raise BrokenPipeError(errno.EPIPE, "the other end is closed") from exc
            except OSError as exc:
                # An unprivileged user may have at most RLIMIT_NOFILE descriptors in flight in
                # sockets: each large message holds one until a consumer takes it.  That is a
                # full queue too, only the socket cannot say when it has room: poll for it.
                if exc.errno != errno.ETOOMANYREFS:
                    raise
                if not block:
                    raise Expired("too many descriptors in flight") from None
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise Expired("too many descriptors in flight") from None
                time.sleep(pause if deadline is None else min(pause, deadline - now))
                pause = min(pause * 2, _PAUSE_MAX)
                continue
            if not block:
                raise Expired("the socket buffer is full")
            # A Unix socket says it is writable only once its buffer is three-quarters empty,
            # yet a send fits as soon as one message has left: waiting for POLLOUT alone made a
            # put(timeout=) on a queue with room raise Full, and a sender wait for good on a
            # peer that took a few messages and then waited for it.  So try again now and then.
            end = time.monotonic() + pause
            if deadline is not None and deadline < end:
                end = deadline
            try:
                wait_fd(sock.fileno(), _POLLOUT, end)
            except Expired:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            pause = min(pause * 2, _PAUSE_MAX)

    # -- receiving --------------------------------------------------------------------------
    def recv_frame(self, block: bool, deadline: float | None) -> tuple[Any, int, list[int], bool]:
        """Receive one message -> ``(data, nbuf, fds, eof)`` (the caller owns *fds*).

        Raises :class:`Expired` when nothing arrived by *deadline* (or at once without *block*).
        """
        data, anc, msg_flags = take_datagram(self.sock, block, deadline)
        if not anc:
            if not data:
                return b"", 0, [], True
            if msg_flags & _MSG_TRUNC:
                raise OSError("message truncated: sender and receiver disagree on the wire format")
            return data, 0, [], False
        return self._unpack(data, anc, msg_flags, as_object=False)

    def recv_datagram(self, block: bool, deadline: float | None) -> tuple[bytes, Any, int]:
        """Receive one datagram as it is -> ``(data, ancillary data, flags)``, for
        :meth:`finish_object` (empty data and no ancillary data: end of file)."""
        return take_datagram(self.sock, block, deadline)

    def recv_object(self, block: bool, deadline: float | None) -> tuple[Any, bool]:
        """Receive and unpickle one message -> ``(obj, eof)``."""
        data, anc, msg_flags = take_datagram(self.sock, block, deadline)
        if not anc and data and not msg_flags & _MSG_TRUNC:  # the fast path
            return pickle.loads(data), False
        return self.finish_object(data, anc, msg_flags)

    def finish_object(self, data: bytes, anc: list[Any], msg_flags: int) -> tuple[Any, bool]:
        """Unpickle a datagram already received -> ``(obj, eof)``."""
        if not anc and data and not msg_flags & _MSG_TRUNC:
            return pickle.loads(data), False
        if not anc:
            if not data:
                return None, True
            raise OSError("message truncated: sender and receiver disagree on the wire format")
        obj, _nbuf, _fds, eof = self._unpack(data, anc, msg_flags, as_object=True)
        return obj, eof

    @staticmethod
    def _unpack(
        data: bytes, anc: list[Any], msg_flags: int, as_object: bool
    ) -> tuple[Any, int, list[int], bool]:
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - (len(payload) % a.itemsize)])
                fds.extend(a)
        try:
            if msg_flags & _MSG_CTRUNC:
                raise OSError("too many descriptors attached to one message")
            magic, flags, nbuf, size = HEADER.unpack_from(data, 0)
            if magic != MAGIC:
                raise OSError("not a procpool message")
            if not flags & BULK:
                body: Any = memoryview(data)[HEADER.size : HEADER.size + size]
                if not as_object:
                    return body, nbuf, fds, False
                owned, fds = fds, []
                return decode(body, nbuf, owned), 0, [], False
            bulk_fd = fds.pop(0)
            try:
                if flags & RAW:  # a big bytes object send() sent with no pickle around it
                    raw = _ipc_bulk.read_bytes(bulk_fd, size)
                    if not as_object:  # recv_bytes(): the pickle send() stands for
                        return pickle.dumps(raw, 5), 0, fds, False
                    return raw, 0, fds, False
                if not as_object or size == 0:
                    body = _ipc_bulk.read_bytes(bulk_fd, size)
                    if not as_object:
                        return body, nbuf, fds, False
                    owned, fds = fds, []
                    return decode(body, nbuf, owned), 0, [], False
                m, view = _ipc_bulk.map_payload(bulk_fd, size)
                try:
                    owned, fds = fds, []
                    return decode(view, nbuf, owned), 0, [], False
                finally:
                    view.release()
                    m.close()
            finally:
                _ipc_bulk.release(bulk_fd)
        except BaseException:
            _close_all(fds)
            raise


def take_datagram(
    sock: socket.socket, block: bool, deadline: float | None
) -> tuple[bytes, Any, int]:
    """One ``recvmsg`` of a datagram: ``(data, ancillary data, flags)``.  Waits for one when
    *block* (until *deadline*, then ``Expired``); raises ``Expired`` at once otherwise."""
    if block and deadline is None:
        # sleep in the kernel's recvmsg: one system call, woken directly by the sender.
        # (Never set O_NONBLOCK or a socket timeout: the descriptor is shared with other
        # processes, and those flags would change for all of them.)
        try:
            data, anc, msg_flags, _ = sock.recvmsg(_RECVBUF, _ANCBUF, _RECV_WAIT)
            return data, anc, msg_flags
        except BlockingIOError:  # another process made the description non-blocking: wait
            pass  # as below (see own_socket)
    while True:
        try:
            data, anc, msg_flags, _ = sock.recvmsg(_RECVBUF, _ANCBUF, _RECV_NOWAIT)
            return data, anc, msg_flags
        except BlockingIOError:
            if not block:
                raise Expired("no message") from None
            wait_fd(sock.fileno(), _POLLIN, deadline)


def wait_fd(fd: int, events: int, deadline: float | None) -> None:
    """Wait until *fd* is ready for *events*; raise :class:`Expired` past *deadline*.

    *fd* is always polled at least once, so a deadline already past (``poll(0)``, a
    non-blocking wait) still sees a descriptor that is ready now.
    """
    poller = select.poll()
    poller.register(fd, events)
    while True:
        if deadline is None:
            timeout_ms = None
        else:
            # capped: poll() takes a C int of milliseconds (a longer wait, or an infinite
            # one, goes round the loop); rounded up: a wait shorter than a millisecond must not
            # become a busy zero poll
            remaining = min(deadline - time.monotonic(), _POLL_MAX_S)
            timeout_ms = max(math.ceil(remaining * 1000), 0)
        if poller.poll(timeout_ms):
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise Expired("timed out")
