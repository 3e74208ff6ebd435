"""Bursts of submissions: the inbox, hand-offs to the I/O thread, and runs of calls.

A caller submitting while the pool is busy appends to ``_inbox`` without the lock and wakes
the I/O thread only if it sleeps (``_enqueue``); ``apply_async``'s plain calls to a cached
function queue their ``AsyncResult`` (or ``Future``) itself, with no ``Task``
(:meth:`Bursts.call_async`).  The I/O thread moves the inbox into the pending queue
(``_take_inbox``), gathering consecutive such calls to one function into *runs*: one ``Task``
whose sink is a ``CallRun``, one CALLS record on the wire.

A thread submitting in a loop holds the GIL, and the I/O thread would run only at the
interpreter's forced switches: every ``HANDOFF_EVERY`` tasks (sooner when tasks are long) the
submitter waits for one turn of the I/O thread (:meth:`Bursts._handoff`, an eventfd in
semaphore mode that the I/O thread writes at the end of its turn).

A mixin of :class:`procpool._scheduler.Scheduler`.
"""

from __future__ import annotations

import os
import select
import threading
import time

from . import _protocol as P
from . import _serialize
from ._start import INTERNAL_FDS, interrupts_held
from ._supervise import FINISHED, RUNNING, TERMINATING
from ._tasks import _PENDING, CHUNK_TARGET, RUN_MAX, CallRun, Task
from .errors import PoolTerminated

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

PLAIN = _serialize.PLAIN
HANDOFF_EVERY = 1024  # tasks a burst of submissions queues before it lets the I/O thread run
HANDOFF_CHECK = 64  # ... and, when tasks take longer than HANDOFF_TASK seconds (the workers,
HANDOFF_TASK = 1e-4  # not the parent, are then the limit), it looks every HANDOFF_CHECK tasks
HANDOFF_AFTER = 1e-3  # whether the I/O thread ran in the last HANDOFF_AFTER seconds
HANDOFF_WAIT = 0.05  # seconds the submitting thread gives the I/O thread at most


def _close_left_over(box: list[int]) -> None:
    """Close a hand-off eventfd nobody closed (see Scheduler.__init__): in its own process
    only (a forked child's copy of the number may name another file there)."""
    fd, pid = box
    if fd >= 0 and pid == os.getpid():
        box[0] = -1
        INTERNAL_FDS.discard(fd)
        os.close(fd)


def _take_token(fd: int) -> bool:
    """Read one token from a semaphore-mode eventfd; False if it had none (another waiter of
    the same turn took it: the turn came all the same)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


class Bursts:
    """Mixin: the inbox, hand-offs and runs (see the module docstring)."""

    # provided by Scheduler
    processes: int
    _lock: Any
    _state: str
    _broken: BaseException | None
    _inbox: Any
    _pending: Any
    _funcs: dict[int, tuple[Any, int, bytes, str]]
    _tids: Iterator[int]
    _run_ids: Iterator[int]
    _maxtasks: int | None
    _est: float | None
    _woken: bool
    _thread: threading.Thread
    _delivering: int | None
    _handofffd: int
    _handoffs: int
    _handoff_waiting: int
    _handoff_box: list[int]
    _turn_at: float
    _early_for: float

    if TYPE_CHECKING:  # Scheduler's and Delivery's, used here

        def _wake(self) -> None: ...
        def _deliver(self, wait: bool = True) -> None: ...
        def _fail(self, task: Task, error: BaseException) -> None: ...
        def _broken_error(self) -> BaseException: ...

    def _enqueue(self, task: Any) -> Any:
        """Queue *task* (or a quick call's result, see call_async) while the pool is busy: no
        lock, no syscall unless the I/O thread sleeps (it sends batches); a burst hands off to
        it now and then (see _handoff)."""
        inbox = self._inbox
        inbox.append(task)
        if not self._woken:
            self._wake()
        if not len(inbox) % HANDOFF_CHECK or self._state != RUNNING:
            self._queued(len(inbox))
        return task

    def _queued(self, queued: int) -> None:
        """_enqueue's rarer part, every HANDOFF_CHECK tasks queued (HANDOFF_EVERY is a multiple
        of it), or when the pool stopped running meanwhile."""
        if not queued % HANDOFF_CHECK:
            if not queued % HANDOFF_EVERY:
                self._handoff(HANDOFF_WAIT)
            elif (
                (self._est or 0.0) > HANDOFF_TASK
                and self._turn_at != self._early_for
                and time.monotonic() - self._turn_at > HANDOFF_AFTER
            ):
                self._early_for = self._turn_at  # once per turn of the I/O thread
                self._handoff(HANDOFF_AFTER)
        if self._state != RUNNING:  # terminate() raced us: settle it ourselves
            try:
                with interrupts_held(), self._lock:
                    self._take_inbox()
            except BaseException:  # the Ctrl-C held back: the I/O thread delivers
                self._wake()
                raise
            self._deliver()

    def call_async(
        self, func: Callable, args: tuple, result: Any, retries: int, retry_on: tuple
    ) -> bool:
        """``apply_async``'s quick submission in a burst: tasks already queued, *func* cached,
        the arguments plain scalars or strings, no keywords or time limit.  Queue the call for
        *result* and return True, or return False having done nothing (then submit_call).

        *result* itself is what is queued: the I/O thread gathers such calls to one function
        into runs (see _take_inbox and CallRun), so a call costs no Task.  Not with retries
        (counted per task) or maxtasksperchild (a run would count as one task): a Task each."""
        entry = self._funcs.get(id(func))
        if entry is None or entry[0] is not func or not (self._inbox or self._pending):
            return False
        for a in args:
            if type(a) not in PLAIN:
                return False
        if self._state != RUNNING:
            return False
        result._sched = self  # (before it is queued: it may complete at once)
        if retries or self._maxtasks:
            tid = next(self._tids)
            task = Task(
                tid, entry[1], entry[2], P.CALL, args, result, entry[3], None, retries, retry_on
            )
            result._task = task
            self._enqueue(task)
        else:
            result._entry = entry
            result._args = args
            inbox = self._inbox  # _enqueue(result), inlined: this runs once per call
            inbox.append(result)
            if not self._woken:
                self._wake()
            if not len(inbox) % HANDOFF_CHECK or self._state != RUNNING:
                self._queued(len(inbox))
        return True

    def _handoff(self, wait: float) -> None:
        """Let the I/O thread take a turn now, during a burst of submissions.

        A thread submitting in a loop holds the GIL; the I/O thread then runs only when the
        interpreter forces a switch (every 5 ms), and each of its syscalls (recv, send) hands
        the GIL back for another 5 ms: the workers starve while tasks pile up in the inbox.
        Every ``HANDOFF_EVERY`` tasks the submitter instead sleeps (GIL released) until the
        I/O thread has been through one turn -- read results, sent the inbox -- in one go; at
        most ``HANDOFF_WAIT`` seconds, should the I/O thread be busy elsewhere.  When tasks are
        long (``HANDOFF_TASK``), sooner: once the I/O thread has not been through a turn for
        ``HANDOFF_AFTER`` seconds, since workers holding a few milliseconds of work would run
        dry waiting for the forced switch (measured on 16 cores: the workers' useful share of
        time rose 1-2 points).  An early hand-off waits at most ``HANDOFF_AFTER`` (*wait*),
        and is made once per turn: an I/O thread held up by a slow callback costs a submitter
        one such wait, not one every ``HANDOFF_CHECK`` tasks.  Tiny tasks keep the long
        period: there the parent is the limit, and each early turn sends smaller batches
        (measured: 15 % fewer tasks/s).

        The wake-up is an eventfd write, a syscall made without the GIL: the woken thread may
        take the CPU from the I/O thread at once, which must not be holding the GIL then (as
        it would be while releasing a lock).  A waiter that gives up (time-out, Ctrl-C)
        withdraws its request, or takes the token written for it meanwhile: a token left
        behind would let every later hand-off return at once, without a turn.
        """
        if threading.current_thread() is self._thread or self._delivering == threading.get_ident():
            return  # a callback submitting: the I/O thread would wait for this very thread
        with self._lock:
            if self._state != RUNNING:
                return
            self._handoffs += 1
            self._handoff_waiting += 1
            fd = self._handofffd
        got = False
        try:
            self._wake()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            got = bool(poller.poll(wait * 1000)) and _take_token(fd)
        finally:
            with self._lock:
                if not got:  # timed out (or interrupted): no token may stay behind for us
                    if self._handoffs:
                        self._handoffs -= 1  # the request was not served yet: withdrawn
                    elif self._handofffd >= 0:
                        _take_token(self._handofffd)  # served meanwhile: that token is ours
                self._handoff_waiting -= 1
                if self._state == FINISHED and not self._handoff_waiting:
                    self._close_handoff()  # the I/O thread left it open for us

    def _end_handoffs(self) -> None:
        """Wake the submitters waiting for this turn (from the I/O thread, holding no lock)."""
        with self._lock:  # under the lock: a waiter that gives up may close the eventfd
            n, self._handoffs = self._handoffs, 0
            if n and self._handofffd >= 0:
                os.eventfd_write(self._handofffd, n)

    def _close_handoff(self) -> None:
        if self._handofffd >= 0:
            INTERNAL_FDS.discard(self._handofffd)
            os.close(self._handofffd)
            self._handofffd = self._handoff_box[0] = -1

    def _take_inbox(self) -> None:
        """Move what callers queued without the lock into the pending queue (or fail it).

        apply_async's quick calls come as their results (see call_async): those to one
        function in a row are gathered into runs (see CallRun), each worth up to
        ``CHUNK_TARGET`` seconds of work by the pool's estimate, and no more than an even share
        of what is queued -- so that a short burst still spreads over the workers."""
        inbox = self._inbox
        if inbox and self._broken is None and self._state not in (TERMINATING, FINISHED):
            append, take = self._pending.append, inbox.popleft
            n = len(inbox)  # what a caller appends meanwhile waits for the next turn
            size = self._run_size(n)
            while n:
                item = take()
                n -= 1
                if type(item) is Task:
                    append(item)
                    continue
                entry = item._entry
                if entry is None:  # cancelled while queued (see _cancel_queued)
                    continue
                kind = type(item)  # (AsyncResults, or Futures: submit)
                members = [item]
                try:
                    while n and len(members) < size:
                        item = inbox[0]
                        if type(item) is not kind or item._entry is not entry:
                            break
                        members.append(take())
                        n -= 1
                    task = self._make_run(entry, members)
                except BaseException:  # a Ctrl-C, in a caller's thread (cancel_pending): the
                    inbox.extendleft(reversed(members))  # calls taken go back, untouched
                    raise
                append(task)
                self._taken(members, task)
            return
        while inbox:
            task = inbox.popleft()
            if type(task) is not Task:  # a quick call's result (see call_async)
                entry = task._entry
                if entry is None:  # cancelled while queued
                    continue
                members = [task]
                task = self._make_run(entry, members)
                self._taken(members, task)
            if task.state != _PENDING:  # cancelled while queued: settled already
                continue
            if self._broken is not None:
                self._fail(task, self._broken_error())
            elif self._state in (TERMINATING, FINISHED):
                self._fail(task, PoolTerminated("the pool was terminated"))
            else:
                self._pending.append(task)

    def _run_size(self, queued: int) -> int:
        """How many quick calls make a run (see _take_inbox); 1 while the cost is unknown."""
        est = self._est
        if est is None:
            return 1
        size = int(CHUNK_TARGET / est) if est > 0 else RUN_MAX
        share = -(-queued // self.processes)
        return max(1, min(RUN_MAX, size, share))

    def _make_run(self, entry: tuple, members: list) -> Task:
        """The Task for quick calls to one function (see _take_inbox): a run, or a plain call
        alone (as submit_call would have queued it).  The calls are left as they are."""
        argss = [result._args for result in members]
        if len(members) == 1:
            tid = next(self._tids)
            return Task(
                tid, entry[1], entry[2], P.CALL, argss[0], members[0], entry[3], None, 0, ()
            )
        rid = next(self._run_ids)
        sink = CallRun(members, argss)
        task = Task(rid, entry[1], entry[2], P.CALLS, argss, sink, entry[3], None, 0, ())
        task.n_items = len(members)
        return task

    @staticmethod
    def _taken(members: list, task: Task) -> None:
        """The calls are in *task* now: each finds it (cancel(), wait()), and keeps neither its
        function's cache entry nor its args."""
        for result in members:
            result._task = task
            result._entry = result._args = None
