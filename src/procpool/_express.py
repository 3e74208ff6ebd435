"""``apply``'s express lane: a lone call and its reply through the worker's slot, no syscall.

On the channel, an ``apply`` round trip has four syscalls on its critical path -- the
caller's send, the worker's read, its send, the caller's read: ≈ 1–1.4 µs each on the
development machine, Python's call included -- and the framing around them.  But right after
a lone call the worker polls for the next one anyway (``_worker.Worker.after_call``), and the
caller polls for its reply (``_drive``): both can watch shared memory instead.  A forked
worker's progress slot (``_protocol.PROGRESS``, mapped before the fork) is one page; the rest
of it is this mailbox:

    offset  writer  field
       64   worker  AWAKE      u8   1 while it polls the slot for a call, or runs one posted
                                    there (``linger``, ``_worker.Worker.after_call``)
       72   worker  ANSWERED   u64  the id of the last call it answered
       80   worker  COPY_SEEN  u64  the id of the last channel copy it read (see COPIED)
       88   worker  SETUP_READ u64  how many FUNC, MAP and FORGET frames it has read (see
                                    setup_read)
      128   pool    POSTED     u64  the id of the last call posted here
      136   pool    COPIED     u64  the id of the last call posted that went by the channel too
      184   pool    WAITING    u8   1 while the caller polls for the reply here
      192   pool    REQUEST         the call: a TASKS record (TASK_HEAD, pickled arguments)
     2048   worker  REPLY           the reply: a RESULTS record (RESULT_HEAD, pickled value),
                                    or a head of id 0: it went by the channel (too large)

Each side's words sit on a cache line of their own.  Only a call the pool could send in one
record -- plain arguments, or shared objects by key once the worker has mapped them -- to an
idle worker claimed for the caller (``_drive.call``) that has read every frame the call depends
on (SETUP_READ: its function's FUNC, its regions' MAP...), is posted: one at a time per worker,
so the areas need no more than the ids.

**The handshake.**  Two races matter: the pool posting as the worker stops polling (the call
would wait for a channel frame that never comes) and the worker answering as the caller stops
polling (the reply would wait in the slot, unread).  Both are closed as in Dekker's algorithm:
each side stores its own word, then a full memory barrier, then loads the other's::

    the pool posts:       POSTED = id;    fence; AWAKE?    0: the call goes by the channel too
    the worker sleeps:    AWAKE = 0;      fence; POSTED?   new: it runs the call
    the worker answers:   ANSWERED = id;  fence; WAITING?  0: the reply goes by the channel too
    the caller stops:     WAITING = 0;    fence; ANSWERED? id: it takes the reply here

With the barriers, at least one side of each pair sees the other's store, so neither a call
nor a reply is stranded -- but both may see it, so either may travel twice; the ids settle
that.  A call's channel copy is announced (COPIED, written before the frame): the worker skips
it if it ran the call from the slot, and otherwise marks the call as seen, so that the slot
does not run it again; either way it says so (COPY_SEEN), and the pool posts nothing more to
that worker until it has -- a newer post would move POSTED on and hide which calls the copy
still in the channel stands for.  A task the channel brings again with the same id
(``retry_on`` retries it) is not announced: it runs.  A reply the worker sends by the channel
as well as the slot is an ALSO frame (``_protocol.ALSO``), which the pool drops when it took
that reply from the slot.  Between the data and its word no
barrier is needed on x86-64, which keeps stores in order, and loads in order; the lane is off
elsewhere (``AVAILABLE``).  The barrier is the acquire and release of a ``_thread`` lock
that only this end of the mailbox takes (``with``: released whatever is raised between): each
is a locked instruction there (glibc's semaphores, CPython's own mutexes), a full barrier --
no ctypes (≈ 0.7 MB more in every worker), no compiled code.
"""

from __future__ import annotations

import _thread
import os
import struct
import time

from . import _protocol as P

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["AVAILABLE", "SLOT_SIZE", "PoolSide", "WorkerSide", "record"]

#: whether the lane may be used here: x86-64 only (see the module docstring)
AVAILABLE = os.uname().machine.lower() in ("x86_64", "amd64")  # (no platform module: see
# the idle worker's memory in docs/benchmarks.md)
SLOT_SIZE = 4096  # the whole slot, the progress record first
AWAKE = 64
ANSWERED = 72
COPY_SEEN = 80
SETUP_READ = 88
POSTED = 128
COPIED = 136
WAITING = 184  # (just before the request: written with it, in one pack)
REQUEST = 192
REPLY = 2048
REQUEST_MAX = REPLY - REQUEST - P.TASK_HEAD.size  # the pickled arguments, at most
REPLY_MAX = SLOT_SIZE - REPLY  # the RESULTS body, at most
VALUE_MAX = REPLY_MAX - P.RESULT_HEAD.size  # its pickled value, at most

# worker-side outcomes of linger
NOTHING, INPUT, CALL = 0, 1, 2

_U64 = struct.Struct("<Q")
# WAITING and a request, or a reply, packed in one call: their structs by the pickle's size
_REQUESTS: dict[int, struct.Struct] = {}
_REPLIES: dict[int, struct.Struct] = {}
_STRUCTS_KEPT = 512  # sizes remembered, each way (then forgotten, all at once)


def _request_struct(n: int) -> struct.Struct:
    s = _REQUESTS[n] = struct.Struct(f"<B7x{P.TASK_HEAD.format[1:]}{n}s")
    if len(_REQUESTS) > _STRUCTS_KEPT:
        _REQUESTS.clear()
    return s


def _reply_struct(n: int) -> struct.Struct:
    s = _REPLIES[n] = struct.Struct(f"{P.RESULT_HEAD.format}{n}s")
    if len(_REPLIES) > _STRUCTS_KEPT:
        _REPLIES.clear()
    return s


class PoolSide:
    """The pool's end of one worker's mailbox (used by the caller that claimed the worker)."""

    __slots__ = ("mv", "lock")

    def __init__(self, slot: Any) -> None:
        self.mv = memoryview(slot)  # (keeps the slot mapped while a caller holds this)
        self.lock = _thread.allocate_lock()  # the barrier's: this end's own, never waited on

    def post(self, tid: int, fid: int, data: bytes) -> bool:
        """Write call *tid* of function *fid* with pickled ``(args, {})`` *data* (at most
        ``REQUEST_MAX`` bytes) and publish it, the caller waiting for the reply here.  True
        if the worker polls the slot and will run it; False if it may not, and the call must
        also go by the channel, after :meth:`stop_waiting` (see the module docstring)."""
        mv = self.mv
        n = len(data)
        pack = (_REQUESTS.get(n) or _request_struct(n)).pack_into
        pack(mv, WAITING, 1, tid, fid, P.CALL, 0.0, 0, 0, n, data)  # (WAITING, then the record)
        _U64.pack_into(mv, POSTED, tid)
        with self.lock:  # a full barrier (see the module docstring; with: a Ctrl-C
            pass  # raised between the acquire and the release cannot leave it held)
        return mv[AWAKE] == 1

    def copied(self, tid: int) -> None:
        """Call *tid*, posted, goes by the channel too (:meth:`post` said the worker may not
        see it): said before the channel's frame is written, so that the worker, if it ran
        the call from the slot after all, skips that copy (and only that copy).  Post nothing
        more to this worker until :meth:`copy_seen` says it read the copy."""
        _U64.pack_into(self.mv, COPIED, tid)

    def setup_read(self) -> int:
        """How many *setup frames* -- FUNC, MAP and FORGET, which the calls after them depend
        on -- the worker has read: a call may go by the slot only once it has read every one
        sent (``_Worker.setup_sent``), as the call passes those still in the channel."""
        return _U64.unpack_from(self.mv, SETUP_READ)[0]

    def copy_seen(self, tid: int) -> bool:
        """Whether the worker has read the channel copy of call *tid* (see :meth:`copied`)."""
        return _U64.unpack_from(self.mv, COPY_SEEN)[0] == tid

    def wait(self, tid: int, seconds: float) -> bool:
        """Poll for the answer to call *tid*, without sleeping, for up to *seconds*."""
        mv = self.mv
        unpack = _U64.unpack_from
        clock = time.perf_counter
        end = clock() + seconds
        while unpack(mv, ANSWERED)[0] != tid:
            if clock() > end:
                return unpack(mv, ANSWERED)[0] == tid
        return True

    def answered(self, tid: int) -> bool:
        """Whether call *tid* was answered (in the slot, or by the channel: see :meth:`reply`)."""
        return _U64.unpack_from(self.mv, ANSWERED)[0] == tid

    def stop_waiting(self, tid: int) -> bool:
        """Stop polling for call *tid*'s answer: True if it was answered here (then take it
        with :meth:`reply`); otherwise the worker sends its reply by the channel."""
        mv = self.mv
        mv[WAITING] = 0
        with self.lock:  # a full barrier (see the module docstring; with: a Ctrl-C
            pass  # raised between the acquire and the release cannot leave it held)
        return _U64.unpack_from(mv, ANSWERED)[0] == tid

    def reply(self, tid: int) -> tuple[tuple, bytes] | None:
        """The answer to call *tid*: its RESULTS record's head and pickled value (a copy),
        or None when it went by the channel."""
        mv = self.mv
        head = P.RESULT_HEAD
        rec = head.unpack_from(mv, REPLY)
        if rec[0] != tid:
            return None
        start = REPLY + head.size
        return rec, mv[start : start + rec[5]].tobytes()


def record(rec: tuple, data: bytes) -> memoryview:
    """A RESULTS body of one record, from its head's fields *rec* and its pickled *data*."""
    return memoryview(P.RESULT_HEAD.pack(*rec) + data)


class WorkerSide:
    """The worker's end of its mailbox."""

    __slots__ = ("mv", "seen", "ran", "lock")

    def __init__(self, slot: Any) -> None:
        self.mv = memoryview(slot)
        self.lock = _thread.allocate_lock()  # the barrier's: this end's own, never waited on
        self.seen = 0  # the last call posted that this worker ran (from here or the channel)
        self.ran = 0  # the last call it ran from here, whose channel copy may come

    def linger(self, seconds: float, ready: Any) -> int:
        """After a lone call: poll the slot (and, every few turns, *ready* -- the channel's
        ``poll(0)``) for up to *seconds*.  Return CALL (a call was posted: run it, see
        :meth:`request`; still awake: call this or :meth:`leave` next), INPUT (the channel
        has input) or NOTHING (then no longer awake)."""
        mv = self.mv
        seen = self.seen
        unpack = _U64.unpack_from
        clock = time.perf_counter
        end = clock() + seconds
        mv[AWAKE] = 1
        turn = 0
        while True:
            if unpack(mv, POSTED)[0] != seen:
                return CALL  # (awake: no other call comes before its answer is taken)
            turn += 1
            if not turn & 63:  # (a poll is a syscall: ≈ 1 µs against ≈ 0.1 µs a turn)
                if ready(0):
                    return self.leave() or INPUT
                if clock() > end:
                    return self.leave()

    def leave(self) -> int:
        """Stop polling the slot: CALL if a call was posted meanwhile (run it), else
        NOTHING -- a call posted from now on comes by the channel too."""
        mv = self.mv
        mv[AWAKE] = 0
        with self.lock:  # a full barrier (see the module docstring; with: a Ctrl-C
            pass  # raised between the acquire and the release cannot leave it held)
        return CALL if _U64.unpack_from(mv, POSTED)[0] != self.seen else NOTHING

    def request(self) -> tuple[int, int, memoryview]:
        """The call posted, now marked as seen: its id, its function's and its pickled
        ``(args, kwds)``."""
        mv = self.mv
        tid, fid, _, _, _, _, n = P.TASK_HEAD.unpack_from(mv, REQUEST)
        self.seen = self.ran = tid  # (= POSTED: the pool writes the record, then the word)
        start = REQUEST + P.TASK_HEAD.size
        return tid, fid, mv[start : start + n]

    def channel_copy(self, tid: int) -> bool:
        """A call *tid* came by the channel: True if it is the announced copy of one already
        run from the slot (skip it).  The copy of a call not run yet is marked as seen (run
        it now, from the channel: the slot will not)."""
        mv = self.mv
        if tid != _U64.unpack_from(mv, COPIED)[0]:
            return False  # (a task of its own, or one retry_on sends again: it runs)
        skip = tid == self.ran
        if skip:
            self.ran = 0  # (once: the same id again is a retry, to run)
        elif tid == _U64.unpack_from(mv, POSTED)[0]:
            self.seen = tid
        _U64.pack_into(mv, COPY_SEEN, tid)  # (the pool may post again)
        return skip

    def answer(self, tid: int, status: int, duration: float, data: bytes) -> bool:
        """Write the reply to call *tid*: one record, *data* at most ``VALUE_MAX`` bytes.
        True if its caller waits for it here; False if it must also go by the channel."""
        mv = self.mv
        n = len(data)
        pack = (_REPLIES.get(n) or _reply_struct(n)).pack_into
        pack(mv, REPLY, tid, status, duration, 0, 0, n, data)
        _U64.pack_into(mv, ANSWERED, tid)
        with self.lock:  # a full barrier (see the module docstring; with: a Ctrl-C
            pass  # raised between the acquire and the release cannot leave it held)
        return mv[WAITING] == 1

    def answer_body(self, tid: int, body: bytes | bytearray) -> bool:
        """:meth:`answer` with a whole RESULTS *body* of one record (at most ``REPLY_MAX``
        bytes)."""
        mv = self.mv
        mv[REPLY : REPLY + len(body)] = body
        _U64.pack_into(mv, ANSWERED, tid)
        with self.lock:  # a full barrier (see the module docstring; with: a Ctrl-C
            pass  # raised between the acquire and the release cannot leave it held)
        return mv[WAITING] == 1

    def read_setup(self, count: int) -> None:
        """The worker has read *count* setup frames in all (see PoolSide.setup_read)."""
        _U64.pack_into(self.mv, SETUP_READ, count)

    def answered_by_channel(self, tid: int) -> None:
        """The reply to call *tid* was sent by the channel (too large for the slot, or with
        descriptors): say so, so that its caller reads the channel at once."""
        mv = self.mv
        P.RESULT_HEAD.pack_into(mv, REPLY, 0, 0, 0.0, 0, 0, 0)  # (no call has id 0)
        _U64.pack_into(mv, ANSWERED, tid)
