"""Framed messages over one end of a Unix stream socketpair, with file descriptors.

A :class:`Channel` is everything that crosses between the parent and one worker.  The same class
serves both sides: the worker uses it blocking (``recv_frame``/``send_frame``); the parent's I/O
thread uses it non-blocking (``fill`` when epoll says readable, ``frames`` to take what has fully
arrived, ``push`` + ``flush`` to write, with an outbox for what the kernel did not take yet).

File descriptors travel as ``SCM_RIGHTS`` attached to the first byte of their frame.  The kernel
never lets one ``recvmsg`` run past a message that carries descriptors, so when a frame is
complete its descriptors have already arrived; they wait in a FIFO until the frame is taken.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from collections import deque

from ._protocol import FRAME, FRAME_PREFIX
from ._start import INTERNAL_FDS

RECV_SIZE = 64 * 1024  # below glibc's mmap threshold: no mmap/munmap per read
MAX_FDS_PER_FRAME = 250  # the kernel's SCM_MAX_FD is 253
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: `flags & IntFlag` runs enum code per read
_INT_SIZE = array.array("i").itemsize


SPIN_CREDIT = 8  # a Spin's credit: each poll that pays adds one (up to this), each that does
# not takes one; at none it stops polling
SPIN_PROBE_FIRST = 8  # waits without polling before a Spin that stopped tries once more...
SPIN_PROBE = 256  # ...the wait doubling, while those tries fail, up to this many


def can_spin() -> bool:
    """Whether this process may run on more than one CPU: a thread polling without sleeping
    for a reply (see ``Channel.spin``) would otherwise hold the very CPU the other end needs."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) > 1


class Spin:
    """How long to poll without sleeping before a wait, adapted to what it gets.

    Polling pays when the other end answers on another CPU meanwhile; it costs when the CPUs
    are not really free (a loaded host, virtual CPUs that share one core): the process waited
    for cannot run while we poll.  So a Spin polls for its whole *limit* while that pays, and
    keeps a credit: each poll that pays adds one, up to ``SPIN_CREDIT``; each in which the
    input did not come in time takes one; at none it stops.  Then it polls once more -- for
    the whole limit again -- after ``SPIN_PROBE_FIRST`` waits, and while those tries fail,
    after twice as many each time, up to ``SPIN_PROBE``: one that pays starts it polling
    again on a credit of one, and the tries after its next stop from ``SPIN_PROBE_FIRST``.

    Why not less: one late input (a host's hiccup) must not stop it, nor a try be shorter
    than the limit.  Both ends of an ``apply`` loop poll (the caller for the reply, the worker
    for the next call); once both have stopped, the other end sleeps through any try, and its
    wake-up plus the loop's turn-around (65 µs or more on the development machine) must fit in
    the try.  With a budget halved at each late input and tries of half the limit, a loop
    fell into that state and stayed there for a third to half of its calls (≈ 200 µs each,
    against ≈ 50 µs polling).  Why a credit, not a count of misses in a row: a caller whose
    next call comes late two times in three (work between its calls) kept a worker polling
    after every call, two polls in three for nothing (review).  Why up to eight: with three,
    polls that paid six times in ten (a random schedule) stopped it for 89 % of the waits
    that would have paid, with eight for 19 % (seven in ten: 64 against 1 %), while a
    schedule that pays one time in three still stops it (a review's simulation).  Threads
    may share one: its updates are plain stores, a heuristic's.
    """

    __slots__ = ("limit", "budget", "credit", "skipped", "interval")

    def __init__(self, limit: float, allowed: bool | None = None) -> None:
        """*allowed*: whether this process may spin (None: ask ``can_spin``)."""
        if allowed is None:
            allowed = can_spin()
        self.limit = limit if allowed else 0.0
        self.budget = self.limit
        self.credit = SPIN_CREDIT
        self.skipped = 0  # waits without polling since it stopped, or since its last try
        self.interval = SPIN_PROBE_FIRST  # waits between two tries while it is stopped

    def take(self) -> float:
        """Seconds to poll before this wait (0.0: none)."""
        budget = self.budget
        if budget or not self.limit:
            return budget
        self.skipped += 1
        if self.skipped < self.interval:
            return 0.0
        self.skipped = 0
        self.interval = min(2 * self.interval, SPIN_PROBE)
        return self.limit

    def done(self, budget: float, got: bool) -> None:
        """A wait polled for *budget* seconds: *got* says whether the input came meanwhile."""
        if got:
            self.budget = self.limit
            self.credit = min(max(self.credit, 0) + 1, SPIN_CREDIT)
            self.interval = SPIN_PROBE_FIRST
        elif self.budget:
            credit = self.credit = self.credit - 1
            if credit <= 0:  # it stops: the tries begin (<=: threads may race a decrement)
                self.credit = 0
                self.budget = 0.0
                self.skipped = 0


def poll_for(poller: select.poll, seconds: float) -> bool:
    """``poller.poll(0)`` until it reports something or *seconds* pass: True if the input
    came in time.  Input noticed only after the deadline (this thread lost its CPU meanwhile:
    a loaded machine) counts as False -- polling did not pay.

    No ``sched_yield`` between polls: on a loaded machine it hands the CPU to another process
    for a whole time slice (measured with both CPUs busy: apply p50 ≈ 4 ms), where a thread
    that sleeps in ``poll`` is woken at once when the reply comes."""
    end = time.perf_counter() + seconds
    while True:
        got = poller.poll(0)
        if time.perf_counter() > end:
            return False
        if got:
            return True


class ChannelClosed(EOFError):
    """The other end of the channel is gone."""


def _fds_from(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(data) // _INT_SIZE  # (struct, not array: a worker then never runs
            fds.extend(struct.unpack(f"{n}i", data[: n * _INT_SIZE]))  # array's code)
    return fds


class Channel:
    """One end of a parent<->worker socketpair, speaking frames (see ``_protocol``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._rbuf = bytearray()
        self._rfds: deque[int] = deque()
        self._ready: deque[tuple[int, memoryview, list[int]]] = deque()
        # outbox: [data, fds-or-None] pairs not yet (fully) written
        self._out: deque[list] = deque()
        self.eof = False
        self._poller: select.poll | None = None  # (see spin)

    def fileno(self) -> int:
        return self.sock.fileno()

    # ----------------------------------------------------------------- reading
    def fill(self) -> int:
        """Read what is available (one ``recvmsg``).

        Return the number of bytes read: 0 if nothing was waiting (non-blocking), -1 at EOF.
        """
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(RECV_SIZE, _ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:  # ECONNRESET and friends: the peer is gone
            self.eof = True
            return -1
        if ancdata:
            fds = _fds_from(ancdata)
            # ours until their frame's payload closes them: a process forked meanwhile (another
            # worker starting) must not inherit them -- a result's memory would live on in it
            INTERNAL_FDS.update(fds)
            self._rfds.extend(fds)
        if flags & _MSG_CTRUNC:
            # The kernel dropped descriptors (this process is out of fds): the frames can no
            # longer be matched with their fds. Treat the channel as broken -- the worker is
            # replaced and its tasks settled -- rather than hand a task someone else's memfd.
            self.eof = True
            return -1
        if not data:
            self.eof = True
            return -1
        n = len(data)
        if not self._rbuf and not ancdata and n >= FRAME.size:
            size, kind, nfds = FRAME.unpack_from(data)
            if size + FRAME_PREFIX == n and not nfds:  # exactly one whole frame: no copies
                self._ready.append((kind, memoryview(data)[FRAME.size :], []))
                return n
        self._rbuf += data
        return n

    def read_single(self, kinds: frozenset[int]) -> tuple[int, memoryview] | None:
        """One ``fill``; when it brought exactly one whole frame of one of *kinds*, without
        fds, and nothing else waits, take that frame and return its kind and body.  Otherwise
        None, and what came waits for ``frames`` (the caller's quick path for a reply it
        expects alone)."""
        n = self.fill()
        ready = self._ready
        if 0 < n < RECV_SIZE and len(ready) == 1 and not self._rbuf:
            kind, body, fds = ready[0]
            if kind in kinds and not fds:
                ready.clear()
                return kind, body
        return None

    def frames(self) -> list[tuple[int, memoryview, list[int]]]:
        """Take every complete frame received so far, as ``(kind, body, fds)``."""
        self._parse()
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def _parse(self) -> None:
        buf = self._rbuf
        offset, end = 0, len(buf)
        ready = self._ready
        while end - offset >= FRAME.size:
            size, kind, nfds = FRAME.unpack_from(buf, offset)
            stop = offset + FRAME_PREFIX + size
            if stop > end:
                break
            body = memoryview(buf[offset + FRAME.size : stop])  # a copy: buf is reused
            fds = [self._take_fd() for _ in range(nfds)] if nfds else []
            ready.append((kind, body, fds))
            offset = stop
        if offset:
            del buf[:offset]

    def _take_fd(self) -> int:
        return self._rfds.popleft() if self._rfds else -1  # -1: never expected (see fill)

    def _poll(self) -> select.poll:
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        return poller

    def poller(self) -> select.poll:
        """The channel's own poll object (its socket, POLLIN), for a polling loop of the
        reader's; :meth:`buffered` tells what it cannot see."""
        return self._poller or self._poll()

    def buffered(self) -> bool:
        """Whether input was received and not taken yet (a poll would not report it)."""
        return bool(self._ready or self._rbuf)

    def spin(self, seconds: float) -> bool:
        """Poll for input without sleeping, for up to *seconds*: True if some came."""
        return poll_for(self._poller or self._poll(), seconds)

    def wait(self, seconds: float) -> bool:
        """Sleep until input comes or *seconds* pass: True if a frame can be taken now or
        some input is waiting (a blocking reader's timed wait)."""
        if self._ready:
            return True
        return bool((self._poller or self._poll()).poll(max(0, int(seconds * 1000))))

    def recv_frame(self) -> tuple[int, memoryview, list[int]]:
        """Block until one frame has arrived and return it (raise ChannelClosed at EOF)."""
        while True:
            if self._ready:
                return self._ready.popleft()
            self._parse()
            if self._ready:
                return self._ready.popleft()
            if self.fill() < 0:
                raise ChannelClosed("channel closed")

    # ----------------------------------------------------------------- writing
    def push(self, data: bytes | bytearray, fds: list[int] | None = None) -> None:
        """Queue a whole frame for writing; *fds* are sent with it (and then closed)."""
        self._out.append([memoryview(data), fds])

    def write(self, data: bytes) -> None:
        """Write one frame without fds now, as far as the socket takes it (the rest waits in
        the outbox for ``flush``, which also raises what a broken socket raises): one
        ``send`` when nothing is queued before it."""
        if not self._out:
            try:
                sent = self.sock.send(data)
            except OSError:  # full (or gone: the next flush says so)
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._out.append([memoryview(data), None])

    def flush(self) -> bool:
        """Write as much of the outbox as the socket takes.  Return True when it is empty.

        Consecutive frames without fds go out in one ``sendmsg``; a frame with fds starts a new
        one so its descriptors attach to its own first byte.
        """
        out = self._out
        sock = self.sock
        while out:
            first = out[0]
            fds = first[1]
            if fds:
                group = [first[0]]
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            else:
                group = []
                for item in out:
                    if item[1] or len(group) >= 64:
                        break
                    group.append(item[0])
                anc = []
            try:
                sent = sock.sendmsg(group, anc)
            except (BlockingIOError, InterruptedError):
                return False
            if fds:
                for fd in fds:
                    _close(fd)
                first[1] = None
            while sent:
                data = out[0][0]
                if sent >= len(data):
                    sent -= len(data)
                    out.popleft()
                else:
                    out[0][0] = data[sent:]
                    sent = 0
        return True

    def pending(self) -> bool:
        """Frames pushed and not yet written."""
        return bool(self._out)

    def send_pending(self) -> None:
        """Blocking write of the outbox (worker side)."""
        while not self.flush():
            pass

    def send_frame(self, data: bytes | bytearray, fds: list[int] | None = None) -> None:
        """Blocking write of one frame (worker side)."""
        if not fds and not self._out:
            self.sock.sendall(data)  # the common case: one syscall, no outbox
            return
        self.push(data, fds)
        self.send_pending()

    def discard_output(self) -> None:
        """Drop the outbox (the peer is gone), closing any fds that were waiting in it."""
        for item in self._out:
            for fd in item[1] or ():
                _close(fd)
        self._out.clear()

    def close(self) -> None:
        self.discard_output()
        while self._rfds:
            _close(self._rfds.popleft())
        self.sock.close()


def _close(fd: int) -> None:
    INTERNAL_FDS.discard(fd)  # (a payload's memfd, registered while it existed: see _serialize)
    try:
        os.close(fd)
    except OSError:
        pass
