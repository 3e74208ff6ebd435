"""``Queue``, ``JoinableQueue``, ``SimpleQueue``: many-producer, many-consumer message queues.

Same API as :mod:`multiprocessing`'s (``put``/``get`` with ``block`` and ``timeout``,
``put_nowait``, ``get_nowait``, ``qsize``, ``empty``, ``full``, ``close``, ``join_thread``,
``queue.Full``/``queue.Empty``), plus ``put_many``/``get_many``, and fixes for what breaks there:

* ``put`` is synchronous: when it returns, the message is in the kernel, not in a feeder
  thread's buffer.  The producer may ``os._exit`` right after; nothing is lost, nothing to join.
* an object that cannot be pickled raises :class:`~procpool.SerializationError` from ``put``.
* a process SIGKILLed inside ``put`` or ``get`` cannot corrupt the queue: each message is
  delivered whole, exactly once, or not at all (if its sender or receiver died with it).
* a message of any size is delivered: above 64 KiB it travels out of band in a memfd.
* ``qsize()`` works everywhere (it is a counter, not a platform feature).

How it is built (see ``docs/ipc.md``)::

    producers --send()--> [ SOCK_SEQPACKET socketpair: one datagram per message ] --recv()--> consumers
         |                                                                              |
         +---- items.release() ----> [ counters: semaphores in shared memory ] <-- items.acquire()

The kernel queues the datagrams: no user-space lock on the hot path, no shared-memory ring that a
killed process could leave half written.  The counters (C ``SemLock`` semaphores in an anonymous
shared page) give the exact ``qsize`` and ``maxsize``.

Guarantees when a process is SIGKILLed inside ``put``/``get`` (documented honestly): the message
itself is delivered whole exactly once or lost with its dying sender/receiver; never half, never
twice, and the queue keeps working for everyone else.  The *counters* are updated just after the
datagram moves, so a kill in that window (about one SIGKILL in three of a consumer in a busy
``get`` loop) leaves the count one too high and, for a bounded queue, one slot held by the
dead.  ``empty()`` does not depend on them (it asks the kernel), nor does ``qsize() == 0``; a
bounded queue keeps a ledger of which processes hold slots and gives back what the dead held
once no message waits (:mod:`._ipc_slots`; docs/ipc.md, "Guarantees under SIGKILL").

Capacity: an unbounded queue (``maxsize=0``) holds as much as the socket's kernel buffer -- we ask
for 64 MiB (``SO_SNDBUFFORCE`` when privileged, else up to ``net.core.wmem_max``); each small
message costs ~768 bytes of it.  When it is full, ``put`` waits for a consumer (``put(timeout=)``
then raises ``queue.Full``), like a bounded queue.
"""

from __future__ import annotations

import array
import fcntl
import operator
import os
import pickle
import queue as _stdqueue
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable

from . import _ipc_wire, _serialize
from ._ipc_fd import FdHandle, explain_emfile
from ._ipc_mem import SEM_VALUE_MAX, SEMAPHORE, Region
from ._ipc_slots import TABLE_BYTES, Ledger, ledger_for

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Queue", "JoinableQueue", "SimpleQueue", "Empty", "Full"]

Empty = _stdqueue.Empty
Full = _stdqueue.Full

_ITEMS, _DEBT, _FREE, _UNFINISHED, _ZERO, _JOINERS, _CLAIM, _UNNAMED = range(8)
JOIN_SLICE = 0.2  # seconds a JoinableQueue.join() waits for a wake-up before it looks again
_SIOCINQ = 0x541B  # (FIONREAD) bytes waiting in a socket; for SOCK_SEQPACKET, in every datagram
_SEND_FLAGS = int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
_dumps = pickle.dumps
_modules = sys.modules
_MP_CONNECTION = _serialize.MP_CONNECTION
_loads = pickle.loads
_RECVBUF = _ipc_wire._RECVBUF
_ANCBUF = _ipc_wire._ANCBUF
_RECV_WAIT = _ipc_wire._RECV_WAIT
_RECV_NOWAIT = _ipc_wire._RECV_NOWAIT
_POLLIN = _ipc_wire._POLLIN
_MSG_TRUNC = _ipc_wire._MSG_TRUNC
_inband_only = _ipc_wire._inband_only
_RENDEZVOUS = "\0procpool-queue-{}"


def _integer(value: Any, name: str) -> int:
    """*value* as an int (numpy's integers too); ``TypeError`` naming *name* for a float, a
    str or anything else."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, not {type(value).__name__} {value!r}"
        ) from None


def _check_timeout(timeout: float | None) -> None:
    """A blocking put's *timeout* must be comparable: a NaN made every deadline test false,
    and a put on a full queue waited for good (``get`` refuses one too, as the stdlib's).
    Refused whether or not the put would wait, so that it does not depend on the queue's
    state or the message's size (the stdlib's ``put`` refuses one only when it must wait); not
    blocking, the timeout is ignored, as there."""
    if timeout is not None and timeout != timeout:
        raise ValueError("timeout must be a number of seconds or None, not NaN")


def _give_slot(free: Any) -> None:
    """Give a bounded queue's slot back.  Already all free (a put interrupted just after its
    message went gave its slot back too, see Queue._put_slow): nothing to give, and the
    message is not lost for it."""
    try:
        free.release()
    except ValueError:  # ("semaphore or lock released too many times": at maxsize already)
        pass


class Queue:
    """A process-safe FIFO queue (:class:`multiprocessing.Queue`), see the module docstring.

    ``Queue(maxsize=0, *, name=None)``: ``maxsize`` > 0 bounds the number of messages.  With
    *name*, unrelated processes of the same user can attach with ``Queue.open(name)`` while this
    process keeps the queue open (the name is served by this process; ``unlink()`` removes it).

    Example::

        q = procpool.Queue()
        p = procpool.Process(target=lambda q: q.put("hello"), args=(q,))
        p.start(); print(q.get(timeout=5)); p.join()
    """

    def __init__(self, maxsize: int = 0, *, name: str | None = None) -> None:
        maxsize = _integer(maxsize, "maxsize")  # (2.5 or "3": as the stdlib's semaphore)
        if maxsize < 0:
            maxsize = 0
        if maxsize > SEM_VALUE_MAX:
            raise ValueError(f"maxsize must be at most {SEM_VALUE_MAX}")
        w, r = explain_emfile(lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        try:
            _ipc_wire.enlarge_buffers(w)
            # (a bounded queue's region holds its slot ledger: see _ipc_slots)
            meta = {"kind": "Queue", "maxsize": maxsize}
            region = Region.create(TABLE_BYTES if maxsize else 0, meta)
        except BaseException:  # (out of descriptors, say): the sockets go now, not with the
            w.close()  # traceback
            r.close()
            raise
        self._setup(w.detach(), r.detach(), region, maxsize, init=True)
        self._server: _Rendezvous | None = None
        if name is not None:
            try:
                self._server = _Rendezvous(name, self)
            except BaseException:  # (the name taken, out of descriptors): nothing left open
                self.close()
                region.close()
                raise

    def _setup(self, wfd: int, rfd: int, region: Region, maxsize: int, init: bool) -> None:
        self._w = _ipc_wire.own_socket(wfd)
        self._r = _ipc_wire.own_socket(rfd)
        self._wire_w = _ipc_wire.Wire(self._w)
        self._wire_r = _ipc_wire.Wire(self._r)
        self._inline_max = self._wire_w.inline_max
        self._region = region
        self._maxsize = maxsize
        self._items = region.semaphore(_ITEMS, SEMAPHORE, 0, SEM_VALUE_MAX, init=init)
        self._debt = region.semaphore(_DEBT, SEMAPHORE, 0, SEM_VALUE_MAX, init=init)
        self._free = None
        self._ledger: Ledger | None = None
        if maxsize:
            self._free = region.semaphore(_FREE, SEMAPHORE, maxsize, maxsize, init=init)
            self._ledger = ledger_for(
                region,
                maxsize,
                self._free,
                region.semaphore(_CLAIM, SEMAPHORE, 1, 1, init=init),
                region.semaphore(_UNNAMED, SEMAPHORE, 0, SEM_VALUE_MAX, init=init),
            )
        self._closed = False
        self._inq = array.array("i", [0])  # (SIOCINQ's answer)
        self._was_empty = False  # (a bounded get found no datagram last time: _take_counted)
        # a message get_many took that did not unpickle, after others it returned: raised by
        # the next get or get_many
        self._deferred: BaseException | None = None
        self._server = None
        # bound methods for the hot path
        self._send = self._w.send
        self._items_release = self._items.release
        self._items_acquire = self._items.acquire
        self._debt_acquire = self._debt.acquire
        self._debt_release = self._debt.release

    # -- passing to other processes -----------------------------------------------------
    def _state(self) -> tuple[Any, ...]:
        self._check_closed()
        return (FdHandle(self._w.fileno()), FdHandle(self._r.fileno()), self._region, self._maxsize)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_queue, (type(self), self._state()))

    def _rebuild(self, state: tuple[Any, ...]) -> None:
        wfd, rfd, region, maxsize = state[:4]
        self._setup(wfd, rfd, region, maxsize, init=False)

    @classmethod
    def open(cls, name: str, timeout: float = 5.0) -> Queue:
        """Attach to the queue that another process created with ``Queue(name=name)``.

        Raises ``FileNotFoundError`` when no live process serves that name.
        """
        return _Rendezvous.fetch(name, timeout)

    def unlink(self) -> None:
        """Stop serving this queue's name (existing handles keep working)."""
        if self._server is None:
            raise ValueError("this queue has no name (or it was already unlinked)")
        self._server.stop()
        self._server = None

    # -- put ----------------------------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put *obj* in the queue; when this returns, the message is in the queue.

        Waits for room when the queue is full (``maxsize``, or the kernel buffer) unless
        ``block`` is false; raises ``queue.Full`` when no room came within *timeout*,
        ``ValueError`` after :meth:`close`, :class:`~procpool.SerializationError` for an object
        that cannot be pickled (nothing is put).
        """
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if timeout is not None and block:
            _check_timeout(timeout)
        if type(obj) is bytes and len(obj) > self._inline_max:
            self._put_slow(obj, 0, [], block, timeout, raw=True)  # big bytes: skip the pickle
            return
        if _serialize.stdlib_pending and _MP_CONNECTION in _modules:
            _serialize.adopt_stdlib_connection()  # (see there)
        try:
            data = _dumps(obj, 5, buffer_callback=_inband_only)
        except Exception:
            data = None
        if data is not None and self._free is None and len(data) <= self._inline_max:
            try:
                self._send(data, _SEND_FLAGS)  # the fast path: one system call
            except BlockingIOError:
                self._put_slow(data, 0, [], block, timeout)
                return
            if not self._debt_acquire(False):
                self._items_release()
            return
        if data is not None and len(data) <= self._inline_max and self._put_counted(data):
            return  # (bounded, a slot free now)
        if data is None:
            data, nbuf, fds = _ipc_wire.encode(obj)
        else:
            nbuf, fds = 0, []
        self._put_slow(data, nbuf, fds, block, timeout)

    def _put_counted(self, data: bytes) -> bool:
        """A bounded queue's fast path: a small message and a slot free now -- taken, counted
        in the ledger (see _put_slow), the datagram sent.  False, nothing done, when no slot
        is free or the socket's buffer is full."""
        free, ledger = self._free, self._ledger
        assert free is not None and ledger is not None
        took: list[bool] = []
        counted: list[bool] = []
        try:
            took.extend(map(free.acquire, (False,)))  # (a C call records it: see _put_slow)
            if not took[0]:
                return False
            ledger.enter(counted)
            self._send(data, _SEND_FLAGS)
        except BaseException as exc:
            if took and took[0]:
                _give_slot(free)
            ledger.leave(counted)  # (after the slot is given back)
            if isinstance(exc, BlockingIOError):
                return False
            raise
        try:
            if not self._debt_acquire(False):
                self._items_release()
        finally:
            ledger.leave(counted)
        return True

    def _put_slow(
        self,
        data: Any,
        nbuf: int,
        fds: list[int],
        block: bool,
        timeout: float | None,
        raw: bool = False,
    ) -> None:
        deadline = None if timeout is None or not block else time.monotonic() + max(timeout, 0)
        free = self._free
        # A bounded queue's slot: taken once the message is ready to go (a producer killed while
        # it copies a large payload must not hold one), or first when not waiting (a full
        # queue then costs no copy).  What the acquire said is recorded by C code, with no
        # point between where a signal handler's exception could land: the interpreter runs
        # handlers between calls, so ``ok = acquire()`` could lose a slot taken (a maxsize=1
        # queue would refuse every put for good), while an interrupted wait takes none.
        took: list[bool] = []  # ends with True once the slot is ours
        counted: list[bool] = []  # [True] while this slot is counted in the ledger
        ledger = self._ledger

        def take_slot() -> None:
            assert free is not None and ledger is not None
            # counted in the ledger once taken (see _ipc_slots; enter() notes it in
            # `counted`, which the caller's finally uncounts).  No word changes while no slot
            # is free: a put_nowait that spins on a queue whose slots the dead hold must not
            # keep healers from their two looks
            took.extend(map(free.acquire, (False,)))  # (a C call records it)
            if took[-1]:
                ledger.enter(counted)
                return
            while True:  # waits for a slot, counting none, and looks to heal now and then
                now = time.monotonic()
                heal_at = ledger.due(now)
                left = None if deadline is None else max(deadline - now, 0)
                wait = max(heal_at - now, 0)
                if left is not None and left < wait:
                    wait = left
                took.extend(map(free.acquire, (block,), (wait,)))
                if took[-1]:
                    ledger.enter(counted)
                    return
                if not block or (left is not None and left <= wait):
                    raise Full
                if time.monotonic() >= heal_at:
                    self._heal()  # (slots the dead held, given back)

        try:
            try:
                self._wire_w.send_frame(
                    data,
                    nbuf,
                    fds,
                    deadline,
                    block,
                    raw,
                    None if free is None else take_slot,
                    not block,
                )
            except _ipc_wire.Expired:
                if took and took[-1]:
                    _give_slot(free)
                raise Full from None
            except BaseException:
                if took and took[-1]:
                    _give_slot(free)
                raise
            if not self._debt_acquire(False):
                self._items_release()
        finally:
            if counted:  # (after its slot is given back, or its message counted)
                ledger.leave(counted)  # type: ignore[union-attr]

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""
        self.put(obj, False)

    def put_many(
        self, objs: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put each object of *objs*, in order, within one *timeout*.

        Raises ``queue.Full`` if the queue stays full: the messages before the one that did
        not fit are in the queue (``exc.args[1]`` is how many).
        """
        if block:  # (before any message goes)
            _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
        put = self.put
        done = 0
        for obj in objs:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                put(obj, block, remaining)
            except Full:
                raise Full(f"the queue is full after {done} messages", done) from None
            done += 1

    # -- get ----------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest message.

        Waits for one unless ``block`` is false; raises ``queue.Empty`` when none came within
        *timeout*, ``ValueError`` after :meth:`close`.
        """
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        if self._ledger is not None:  # bounded: taken while marked (see _take_counted)
            deadline = None if timeout is None or not block else time.monotonic() + max(timeout, 0)
            try:
                data, anc, msg_flags = self._take_counted(block, deadline)
            except _ipc_wire.Expired:
                raise Empty from None
            obj, eof = self._wire_r.finish_object(data, anc, msg_flags)
        elif block and timeout is None:
            # the fast path: one blocking recvmsg, no header, no extra call layers
            try:
                data, anc, msg_flags, _ = self._r.recvmsg(_RECVBUF, _ANCBUF, _RECV_WAIT)
            except BlockingIOError:  # made non-blocking by another process (see own_socket)
                data, anc, msg_flags = _ipc_wire.take_datagram(self._r, True, None)
            if data:
                self._account_get()
            if not anc and data and not msg_flags & _MSG_TRUNC:
                return _loads(data)
            obj, eof = self._wire_r.finish_object(data, anc, msg_flags)
        else:
            deadline = None if timeout is None or not block else time.monotonic() + max(timeout, 0)
            try:
                data, anc, msg_flags = self._wire_r.recv_datagram(block, deadline)
            except _ipc_wire.Expired:
                raise Empty from None
            if data or anc:  # taken (an exception while waiting took nothing): counted even
                self._account_get()  # should it not unpickle
            obj, eof = self._wire_r.finish_object(data, anc, msg_flags)
        if eof:
            raise EOFError("no process holds this queue's writing end any more")
        return obj

    def _account_get(self) -> None:
        if not self._items_acquire(False):
            self._debt_release()  # we overtook the producer's counter update
        if self._free is not None:
            _give_slot(self._free)

    def _take_counted(self, block: bool, deadline: float | None) -> tuple[bytes, Any, int]:
        """A bounded queue's receive: one datagram taken and counted, this process counting
        one held slot in the ledger from before the take until its slot is given back, so
        that a kill in between leaves the slot to be healed (see _ipc_slots).  It waits for a
        datagram without taking one, counting none, and now and then looks for slots the dead
        held.  Raises ``_ipc_wire.Expired`` past *deadline* (or at once without *block*)."""
        ledger = self._ledger
        assert ledger is not None
        recvmsg = self._r.recvmsg
        while True:
            # a get that found the queue empty last time asks the kernel first: a consumer
            # that polls an empty queue must not count in and out (healers' looks would never
            # match), and one that streams should not pay the question
            if self._was_empty and self._socket_empty():
                if not block:
                    raise _ipc_wire.Expired("no message")
                self._wait_for_message(deadline)
            counted: list[bool] = []
            try:
                ledger.enter(counted)
                data, anc, msg_flags, _ = recvmsg(_RECVBUF, _ANCBUF, _RECV_NOWAIT)
            except BlockingIOError:
                ledger.leave(counted)
                self._was_empty = True
                if not block:
                    raise _ipc_wire.Expired("no message") from None
                self._wait_for_message(deadline)
                continue
            except BaseException:  # (a signal handler's, maybe with a datagram taken: then
                ledger.leave(counted)  # its slot is lost, and a heal gives it back)
                raise
            self._was_empty = False
            try:
                if data or anc:
                    self._account_get()
            finally:
                ledger.leave(counted)
            return data, anc, msg_flags

    def _wait_for_message(self, deadline: float | None) -> None:
        """Wait until a datagram may be taken (past *deadline*: ``Expired``), looking to
        heal when this process is due to (see _ipc_slots.Ledger.due)."""
        ledger = self._ledger
        assert ledger is not None
        fd = self._r.fileno()
        while True:
            heal_at = ledger.due(time.monotonic())
            end = heal_at if deadline is None or heal_at < deadline else deadline
            try:
                _ipc_wire.wait_fd(fd, _POLLIN, end)
                return
            except _ipc_wire.Expired:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise
                if now >= heal_at:
                    self._heal()

    def _heal(self) -> bool:
        """Give back the slots killed processes held, when that can be measured (see
        _ipc_slots.Ledger.heal); True if any was."""
        assert self._ledger is not None
        return self._ledger.heal(self._socket_empty, self._items, self._debt)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(False)

    def get_many(
        self,
        max_messages: int = 1_000_000,
        block: bool = True,
        timeout: float | None = None,
    ) -> list[Any]:
        """Wait for one message (like :meth:`get`), then take every message already waiting,
        up to *max_messages*; return them in order.  Raises ``queue.Empty`` like ``get``.  A
        message that does not unpickle ends the batch: the messages before it are returned,
        and its error is raised by the next ``get``/``get_many``."""
        wanted = _integer(max_messages, "max_messages")  # (before a message is taken)
        if wanted < 1:
            raise ValueError(f"max_messages must be at least 1, not {wanted}")
        out = [self.get(block, timeout)]
        recv, finish = self._wire_r.recv_datagram, self._wire_r.finish_object
        account = self._account_get
        take = None if self._ledger is None else self._take_counted
        while len(out) < wanted:
            try:
                if take is None:
                    data, anc, msg_flags = recv(False, None)
                else:
                    data, anc, msg_flags = take(False, None)  # (counted already)
            except _ipc_wire.Expired:
                break
            if not (data or anc):  # end of file
                break
            if take is None:
                account()  # (taken: counted even should it not unpickle)
            try:
                out.append(finish(data, anc, msg_flags)[0])
            except Exception as exc:  # (the messages taken before it are returned first)
                self._deferred = exc
                break
        return out

    # -- state --------------------------------------------------------------------------
    def qsize(self) -> int:
        """The number of messages in the queue: 0 exactly when none waits (the kernel's
        answer); above that, a count that a process killed inside ``put``/``get`` may have
        left off (docs/ipc.md, "Guarantees under SIGKILL")."""
        count = self._items._get_value() - self._debt._get_value()
        if self._closed:
            return count if count > 0 else 0
        if self._socket_empty():
            return 0
        return count if count > 1 else 1

    def empty(self) -> bool:
        """True if no message waits in the queue (the kernel's answer: exact, also after a
        process was killed inside ``put``/``get``; after :meth:`close`, the count's)."""
        if self._closed:
            return self._items._get_value() <= self._debt._get_value()
        return self._socket_empty()

    def full(self) -> bool:
        """True if a bounded queue holds ``maxsize`` messages (no slot free, and a message
        waits)."""
        if self._free is None or self._free._get_value() != 0:
            return False
        return self._closed or not self._socket_empty()

    def _socket_empty(self) -> bool:
        # every datagram carries data (a large message: its header), so 0 bytes = no message
        fcntl.ioctl(self._r.fileno(), _SIOCINQ, self._inq)
        return self._inq[0] == 0

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def close(self) -> None:
        """Close this process's handles on the queue; other processes are not affected.

        Messages already put stay in the queue for the others.  ``put``/``get`` then raise
        ``ValueError``.
        """
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._w.close()
        self._r.close()

    def join_thread(self) -> None:
        """Nothing to wait for (there is no feeder thread); raises ``ValueError`` if not closed,
        as the stdlib's assertion."""
        if not self._closed:
            raise ValueError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: ``put`` is synchronous."""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._closed:
            return f"<procpool.{type(self).__name__} closed>"
        return f"<procpool.{type(self).__name__} maxsize={self._maxsize} qsize={self.qsize()}>"


def _rebuild_queue(cls: type[Queue], state: tuple[Any, ...]) -> Queue:
    q = cls.__new__(cls)
    q._rebuild(state)
    return q


class SimpleQueue(Queue):
    """An unbounded queue with ``put``, ``get``, ``empty``, ``close``
    (:class:`multiprocessing.SimpleQueue`); the same machinery as :class:`Queue`."""

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(0, name=name)

    # (after close(), multiprocessing's raise OSError: code catching it keeps working)
    def put(self, obj: Any, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - Queue's
        if self._closed:
            raise OSError("handle is closed")
        super().put(obj, *args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - Queue's
        if self._closed:
            raise OSError("handle is closed")
        return super().get(*args, **kwargs)

    def empty(self) -> bool:  # noqa: D102 - Queue's
        if self._closed:
            raise OSError("handle is closed")
        return super().empty()


class JoinableQueue(Queue):
    """A :class:`Queue` with ``task_done()`` and ``join()``
    (:class:`multiprocessing.JoinableQueue`).

    Each ``put`` counts an unfinished task; each consumer calls ``task_done()`` when it has
    processed a message; ``join()`` waits until the count is back to zero.  ``task_done()``
    called more times than there were messages raises ``ValueError``.  A process killed between
    ``get`` and ``task_done`` leaves its task unfinished: ``join(timeout)`` then returns False.
    """

    def __init__(self, maxsize: int = 0, *, name: str | None = None) -> None:
        super().__init__(maxsize, name=name)
        self._join_semaphores(init=True)

    def _join_semaphores(self, init: bool) -> None:
        # the unfinished count; wake-up tokens for join(); how many join() now.  No lock: a
        # process killed holding one (a Condition's, as before) left task_done() and join()
        # waiting for good
        region = self._region
        self._unfinished = region.semaphore(_UNFINISHED, SEMAPHORE, 0, SEM_VALUE_MAX, init=init)
        self._zero = region.semaphore(_ZERO, SEMAPHORE, 0, SEM_VALUE_MAX, init=init)
        self._joiners = region.semaphore(_JOINERS, SEMAPHORE, 0, SEM_VALUE_MAX, init=init)

    def _rebuild(self, state: tuple[Any, ...]) -> None:
        super()._rebuild(state)
        self._join_semaphores(init=False)

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        self._unfinished.release()  # before the message can be seen, so task_done never races
        try:
            super().put(obj, block, timeout)
        except BaseException:
            self._one_done()  # (not put: a join() may be waiting for this count to be 0)
            raise

    def _one_done(self) -> bool:
        """Count one task done (False if none was unfinished); at zero, wake the joiners: a
        token each, up to as many as wait now (a joiner killed in join() counts on: its
        token is left over, and wakes a later joiner once, which looks and waits again)."""
        if not self._unfinished.acquire(False):
            return False
        if self._unfinished._is_zero():
            for _ in range(self._joiners._get_value() - self._zero._get_value()):
                try:
                    self._zero.release()
                except ValueError:  # (at its maximum)
                    break
        return True

    def task_done(self) -> None:
        """Mark one message taken with ``get`` as processed."""
        if not self._one_done():
            raise ValueError("task_done() called too many times")

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every message put has been marked done; False if *timeout* passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._joiners.release()  # (before looking: a task_done() that makes it 0 then wakes us)
        try:
            while not self._unfinished._is_zero():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # in slices: a wake-up another joiner took, or one lost with a killed
                # task_done(), costs at most one slice
                wait = JOIN_SLICE if remaining is None else min(remaining, JOIN_SLICE)
                self._zero.acquire(True, wait)
            return True
        finally:
            self._joiners.acquire(False)


class _Rendezvous:
    """Serves a named queue's descriptors to processes of the same user (abstract socket).

    An abstract Unix socket has no file: it disappears with this process, even after SIGKILL.

    The serving thread holds the queue only through a weak reference: a named queue the
    program drops is collected like an anonymous one, and its ``close()`` (from ``__del__``)
    stops this thread, which frees the name and the descriptors.
    """

    def __init__(self, name: str, q: Queue) -> None:
        from ._ipc_mem import shm_path

        shm_path(name)  # validates the name
        sock = explain_emfile(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        stop: tuple[int, int] | None = None
        try:
            try:
                sock.bind(_RENDEZVOUS.format(name))
            except OSError as exc:
                raise FileExistsError(f"a queue named {name!r} already exists") from exc
            sock.listen(16)
            stop = explain_emfile(os.pipe)
            self._thread = threading.Thread(
                target=self._serve, name=f"procpool-queue-{name}", daemon=True
            )
            self._sock, self._queue = sock, weakref.ref(q)
            # a child forked from this process inherits this object but not the thread, and
            # shares the stop pipe: only the process that serves the name may stop it (stop())
            self._pid = os.getpid()
            self._stop_r, self._stop_w = stop
            self._thread.start()
        except BaseException:  # the name is free again, nothing left open
            sock.close()
            for fd in stop or ():
                os.close(fd)
            raise
        _SERVING.add(self)

    def _serve(self) -> None:
        import select

        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events:
                break
            try:
                conn, _ = self._sock.accept()
            except OSError:  # out of descriptors, say: the client waits in the backlog (or
                time.sleep(0.05)  # times out); looking again at once, the loop spun
                continue
            with conn:
                try:
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    uid = int.from_bytes(creds[4:8], "little")
                    if uid not in (os.getuid(), 0):
                        continue
                    payload = self._payload()
                    if payload is None:  # dropped, its close() is on the way: refuse
                        continue
                    _ipc_wire.Wire(conn).send_frame(payload.data, payload.nbuf, payload.fds, None)
                except OSError:
                    continue
        self._sock.close()
        os.close(self._stop_r)

    def _payload(self) -> Any:
        # the queue is a local of this short call, never of the serving loop's frame, which
        # would keep it alive while the thread sleeps in poll()
        q = self._queue()
        return None if q is None else _serialize.dumps(q)

    def stop(self) -> None:
        if self._pid != os.getpid():
            # a forked copy: the thread is not here; close our copies of the descriptors and
            # leave the name to the process that serves it
            if self._stop_w >= 0:
                for fd in (self._stop_r, self._stop_w):
                    os.close(fd)
                self._stop_w = -1
                self._sock.close()
            return
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
            os.close(self._stop_w)
            self._stop_w = -1
            if threading.current_thread() is not self._thread:
                self._thread.join(5)

    def forget_in_child(self) -> None:
        """In a child forked from the serving process (see _forked): close the copies of the
        listening socket and the stop pipe at once -- a child keeping them kept the name
        bound after ``unlink()`` or the creator's death, for as long as it lived."""
        if self._pid != os.getpid() and self._stop_w >= 0:
            for fd in (self._stop_r, self._stop_w):
                os.close(fd)
            self._stop_w = -1
            self._sock.close()

    @staticmethod
    def fetch(name: str, timeout: float) -> Queue:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with sock:
            try:
                sock.connect(_RENDEZVOUS.format(name))
            except (ConnectionRefusedError, FileNotFoundError):
                raise FileNotFoundError(f"no process serves a queue named {name!r}") from None
            try:
                obj, eof = _ipc_wire.Wire(sock).recv_object(True, time.monotonic() + timeout)
            except _ipc_wire.Expired:
                raise TimeoutError(
                    f"the queue named {name!r} did not answer in {timeout}s"
                ) from None
            except ConnectionResetError:  # (the listener closed with us in its backlog)
                raise FileNotFoundError(f"no process serves a queue named {name!r}") from None
        if eof or not isinstance(obj, Queue):
            raise FileNotFoundError(f"no process serves a queue named {name!r}")
        return obj


#: the rendezvous this process serves (weakly: a dropped queue's goes with it)
_SERVING: weakref.WeakSet[_Rendezvous] = weakref.WeakSet()


def _forked() -> None:
    if _SERVING:  # (nothing touched in a child of a process serving no named queue)
        for server in list(_SERVING):
            server.forget_in_child()
        _SERVING.clear()


os.register_at_fork(after_in_child=_forked)
