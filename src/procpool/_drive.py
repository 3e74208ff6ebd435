"""The low-latency path of ``apply``: a lone call sent and its reply read by the caller's thread.

When the pool is idle, ``apply`` need not go through the I/O thread at all.
:meth:`Driving.call` pickles a call of plain arguments to a function the pool knows and
writes it to an idle worker that has that function, from the caller's own thread, claiming
the worker's channel (``_Worker.driven``: the I/O thread then leaves it out of its epoll
set); ``Scheduler.submit_call(claim=True)`` does the same for any other call when the pool is
idle.  :meth:`Driving.drive` then polls the channel in the caller's thread -- first without
sleeping, for as long as the pool's ``Spin`` budget says -- and reads the reply itself
(``_read_reply``: one frame, one record; for ``apply``, no delivery either), so the reply
wakes the caller directly instead of the I/O thread.  A caller waiting on an
``AsyncResult`` or a ``Future`` whose task is the only one its worker holds drives it the same
way.  Anything unusual (another frame, an error, the worker's death, a Ctrl-C) hands the
channel back to the I/O thread, which settles it the usual way.

A mixin of :class:`procpool._scheduler.Scheduler`.
"""

from __future__ import annotations

import os
import pickle
import select
import time

from . import _express, _serialize
from . import _protocol as P
from ._channel import Spin, poll_for
from ._supervise import CLOSING, FINISHED, RUNNING, TERMINATING, _Worker
from ._tasks import _DONE, _SENT, BARE, Task
from .errors import SerializationError

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

PLAIN = _serialize.PLAIN
KEYED = _serialize.KEYED  # (filled when procpool.shared is imported)
PROTOCOL = _serialize.PROTOCOL
REQUEST_MAX = _express.REQUEST_MAX
#: the frames a driven task's reply may come in (see Driving._read_reply)
REPLY_FRAMES = frozenset({P.RESULTS, P.ALSO})
DRIVE_SPIN = 1e-4  # seconds a caller waiting on a short task polls without sleeping (see drive)


class Driving:
    """Mixin: ``apply``'s quick path (see the module docstring)."""

    # provided by Scheduler
    _lock: Any
    _owner: int  # the pid of the process that made the pool
    _state: str
    _broken: BaseException | None
    _workers: dict[int, _Worker]
    _funcs: dict[int, tuple[Any, int, bytes, str]]
    _inbox: Any
    _pending: Any
    _deliveries: list[Any]
    _returns: Any
    _tids: Iterator[int]
    _est: float | None
    _est_time: float
    _est_items: float
    _spin: Spin
    _settled: Task | None
    _refill: bool

    if TYPE_CHECKING:  # Scheduler's, WorkerSupervision's and Dispatch's, used here

        def _wake(self) -> None: ...
        def _deliver(self, wait: bool = True) -> None: ...
        def _abandon(self, w: _Worker) -> None: ...
        def _accepts(self, w: _Worker) -> bool: ...
        def _assign(self, w: _Worker, task: Task) -> None: ...
        def _flush(self, w: _Worker) -> None: ...
        def _set_mask(self, w: _Worker) -> None: ...
        def _give_back(self) -> None: ...
        def _map_regions(
            self, w: _Worker, regions: list, body: bytearray, fds: list[int]
        ) -> tuple[bytearray, list[int]]: ...
        def _maybe_exit(self, w: _Worker) -> None: ...
        def _on_results(self, w: _Worker, body: Any, fds: list[int]) -> None: ...
        def _read(self, w: _Worker) -> None: ...
        def _unpickling_error(self, task: Task, exc: BaseException) -> SerializationError: ...

    def call(self, func: Callable, args: tuple, sink: Any, retries: int, retry_on: tuple) -> Any:
        """``apply``'s quick submission: when the pool is idle, *func* cached and known to an
        idle worker, and the arguments plain scalars (or shared objects, by key), send the
        call to that worker from here -- posted in its express lane's slot when it can take
        it (see _express), else by its channel -- claimed for :meth:`drive`: what
        :meth:`submit_call` does in that case, minus its general checks.  Return the task, or
        None having done nothing (then submit_call)."""
        entry = self._funcs.get(id(func))
        if entry is None or entry[0] is not func:
            return None
        keyed = False
        for a in args:
            if type(a) not in PLAIN:
                if type(a) not in KEYED:
                    return None
                keyed = True
        fid = entry[1]
        payload: Any
        if keyed:  # SharedArray, Value...: their regions by key (see _map_regions)
            try:
                payload = _serialize.dumps_refs(args) or _serialize.dumps_keyed((args, {}))
            except Exception:  # (a closed one, say: submit_call says so)
                return None
            if payload.fds:  # (more regions than go by key)
                payload.close()
                return None
            data = payload.data
        else:
            payload = data = pickle.dumps((args, {}), PROTOCOL)  # (as _send pickles one)
        if self._state != RUNNING:  # (first: in a child forked while a thread of the parent
            return None  # held the lock, the lock stays held for good; a fourth review)
        with self._lock:
            if self._state != RUNNING or self._broken is not None or self._inbox or self._pending:
                return None
            w = None
            for x in self._workers.values():
                if x.inflight:
                    return None
                if w is None and fid in x.known and x.driven is None and not x.writing:
                    if self._accepts(x):
                        w = x
            if w is None:
                return None
            tid = next(self._tids)
            try:
                # the express lane first: the call is posted in the worker's slot (no syscall),
                # and runs while the task is made and assigned (see _express)
                box = w.box
                if box is not None and w.copied:  # a copy the worker has not read: not past it
                    if box.copy_seen(w.copied):
                        w.copied = 0
                    else:
                        box = None
                if len(data) > REQUEST_MAX:
                    box = None
                # once the worker has *read* every FUNC, MAP and FORGET frame sent (a call in
                # the slot passes those still in the channel: third and fourth reviews)
                if box is not None and w.setup_seen != w.setup_sent:  # (frames sent since the
                    w.setup_seen = box.setup_read()  # last look: only then is the slot read)
                    if w.setup_seen != w.setup_sent:
                        box = None
                if keyed:  # by key: once the worker maps every region it names
                    if box is not None and not all(w.regions.get(r._key) for r in payload.regions):
                        box = None
                    self._map_regions(w, payload.regions, bytearray(), [])  # (frames first)
                posted = box is not None and box.post(tid, fid, data)
                task = Task(
                    tid, fid, entry[2], P.CALL, payload, sink, entry[3], None, retries, retry_on
                )
                w.driven = task
                if self._returns:  # (the last result's segments, for this call's to reuse)
                    self._give_back()
                self._assign(w, task)
                # (not polling the slot, or about to stop: the channel too, unless it ran)
                if box is not None and not posted:
                    if box.stop_waiting(tid):
                        posted = True  # (it ran after all: the reply is in the slot)
                    else:
                        box.copied(tid)  # (before the copy is written: see _express)
                        w.copied = tid
                if posted:
                    w.posted = task
                    if w.mask:  # (a worker with no pidfd is watched while idle: not now)
                        self._set_mask(w)
                    return task
                chan = w.chan
                chan.write(P.task_frame(tid, fid, P.CALL, 0.0, data))
                if chan.pending():  # (_flush also settles a broken channel)
                    self._flush(w)
                self._set_mask(w)
            except BaseException:  # a Ctrl-C: what reached the worker is unknown
                self._abandon(w)
                raise
            if w.writing:
                self._wake()
        return task

    def drive(self, task: Task, result: Any, timeout: float | None, direct: bool = False) -> Any:
        """Wait for *task* by reading its worker's channel in the caller's own thread.

        The low-latency path of ``apply``: when the task is the only one its worker holds, the
        caller takes the channel out of the epoll set and polls it itself, so the reply wakes
        the caller directly instead of the I/O thread (one thread switch and a lock hand-off
        fewer).  When tasks are short (the pool's estimate is under ``DRIVE_SPIN``), it first
        polls without sleeping, for as long as the pool's ``Spin`` budget says (at most
        ``DRIVE_SPIN``; none on one CPU, nor while polling has not been paying): a thread
        that sleeps pays its wake-up and cold caches (≈ 10–15 µs a reply on the development
        machine) on top of the reply; each poll releases the GIL.  Returns when the result
        is in, on timeout, or if anything unusual happens; the caller then falls back to
        waiting on the result.

        *direct* (``apply``'s own result, which has no callback and nobody else sees): a
        reply that comes alone as one plain value is not delivered to *result*; its pickled
        bytes are returned instead (see :meth:`reply_value`).  Otherwise None.
        """
        w = task.worker
        if w is None or self._state == FINISHED:
            # FINISHED: the pool is over, or this is a child forked from its process, whose
            # copy of the pool is not its own: the worker's channel, the epoll set and the
            # express lane are the parent's (taking the worker out of the shared epoll set and
            # reading its reply here wedged the parent's pool), and a thread of the parent may
            # have held the lock at the fork (a review)
            return None
        try:  # (from the claim on: a Ctrl-C anywhere after it must release it)
            return self._drive(w, task, result, timeout, direct)
        finally:
            held = w.driven is task  # (only this thread clears its own claim: no lock to look)
            if held:
                with self._lock:
                    if w.posted is task:  # (a Ctrl-C, a time-out: see _unpost)
                        self._unpost(w, task)
                    w.driven = None
                    if w.wid in self._workers:
                        self._set_mask(w)
            # The I/O thread must take a turn when we may have read the last result close()
            # waits for; freed room for tasks waiting (it refills: sending from here, a Ctrl-C
            # could cut a frame), or held a worker it could not send to (_dispatch skips a
            # driven one); or left deliveries behind (a Ctrl-C).  Not after every attempt:
            # one that claimed nothing changed nothing.
            if (
                self._refill
                or self._deliveries
                or (held and (self._pending or self._inbox))
                or self._state in (CLOSING, TERMINATING)
            ):
                self._refill = False
                self._wake()

    def _drive(
        self, w: _Worker, task: Task, result: Any, timeout: float | None, direct: bool
    ) -> Any:
        # posted in the express lane's slot by call(), just now, in this thread: nothing to
        # check (its worker's death, if any, is seen when the reply is settled, under the lock)
        box = w.box if w.posted is task else None
        if box is None:
            with self._lock:
                if w.driven is not task:
                    if task.state != _SENT or task.worker is not w or w.driven or w.eof:
                        return None
                    if w.writing or len(w.inflight) != 1 or w.wid not in self._workers:
                        return None
                    w.driven = task
                    self._set_mask(w)
                elif w.wid not in self._workers or w.eof:  # claimed, but it died meanwhile
                    w.driven = w.posted = None
                    return None
        est = self._est
        # this thread's own: threads waiting on one result may all drive it (a poll object
        # raises RuntimeError if two threads use it at once); one reads, under the lock.
        # (Made when needed: a reply taken from the express lane's slot needs none.)
        poller: Any = None
        deadline = None if timeout is None else time.monotonic() + timeout
        # (a deadline shorter than a poll: nothing to learn from.  The budget is taken only
        # for a poll that happens: a Spin that stopped counts each take() as a wait, and its
        # try would be used up untested)
        spin = est is not None and est < DRIVE_SPIN and (timeout is None or timeout >= DRIVE_SPIN)
        reply = None  # a reply taken from the express lane's slot
        while not result._done and task.state == _SENT:
            came = False
            if box is not None:  # posted in the slot: poll it, not the channel (once)
                came, reply = self._wait_posted(w, box, task, spin)
                box = None
                spin = False
            if poller is None and not came and reply is None:
                fd = w.chan.fileno()
                if fd < 0:  # (closed: the worker died meanwhile, its death settles the task)
                    return None
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            if spin:  # once: then sleep
                spin = False
                budget = self._spin.take()
                if budget:
                    came = poll_for(poller, budget)
                    self._spin.done(budget, came)
            if not came and reply is None:  # (it came: read it, no poll more)
                wait = 100.0 if deadline is None else (deadline - time.monotonic()) * 1000
                if wait <= 0:
                    return None
                if not poller.poll(min(wait, 100.0)):  # slices: re-check the task's state
                    continue
            with self._lock:
                if w.wid not in self._workers:
                    return None
                self._settled = None
                try:
                    if reply is not None:
                        rec, value = reply
                        reply = None
                        ours: Any = value if self._settle(w, task, direct, rec, value) else None
                        if ours is None:
                            self._on_results(w, _express.record(rec, value), [])
                        w.posted = None
                    else:
                        ours = self._read_reply(w, task, direct)
                        if ours is None:
                            self._read(w)
                except BaseException:  # a Ctrl-C: a reply may be read and not settled
                    if self._settled is task:  # (no: settled, and nothing else was read)
                        w.posted = None
                        self._set_mask(w)
                        if direct and type(task.payload) not in BARE:
                            task.release()
                    elif w.posted is task and w.inflight.get(task.id) is task:
                        self._unpost(w, task)  # (untouched, its reply still in the slot)
                    else:
                        self._abandon(w)
                    raise
                self._settled = None  # (no reference kept)
                if self._pending or self._inbox:  # we freed room: the I/O thread refills
                    self._refill = True  # (in drive's finally)
                gone = w.eof
            if self._deliveries:
                self._deliver(wait=deadline is None)  # (a deadline: not behind a callback)
            if ours is not None:
                return ours if direct else None
            if gone:
                return None
        return None

    def _wait_posted(
        self, w: _Worker, box: _express.PoolSide, task: Task, spin: bool
    ) -> tuple[bool, tuple[tuple, bytes] | None]:
        """Poll the express lane's slot for the answer to *task* (posted there by
        :meth:`call`) for as long as the pool's ``Spin`` budget says (none unless *spin*),
        then stop waiting there.  Return ``(came, reply)``: the reply taken from the slot
        (its record's head and pickled value), or None and whether the reply is in the
        channel already (too large for the slot).  With no reply, the claim on the slot is
        dropped: the reply comes by the channel (see _express); with one, it is dropped as
        the reply is settled."""
        tid = task.id
        budget = self._spin.take() if spin else 0.0
        if budget:
            got = box.wait(tid, budget)
            self._spin.done(budget, got)
        else:
            got = False
        if got or box.stop_waiting(tid):
            reply = box.reply(tid)
            if reply is not None:
                w.taken = tid  # (an ALSO frame of it, if one comes, is dropped)
                return False, reply
            w.posted = None
            return True, None
        w.posted = None
        return False, None

    def _unpost(self, w: _Worker, task: Task) -> None:
        """Under the lock: *task*'s caller stops waiting on the express lane (a Ctrl-C, a
        time-out) -- a reply already in the slot is settled (the I/O thread delivers it),
        a later one comes by the channel."""
        box = w.box
        if box is not None and w.wid in self._workers:  # (dead: its death settled the task)
            if box.stop_waiting(task.id):
                reply = box.reply(task.id)
                if reply is not None:
                    w.taken = task.id
                    self._on_results(w, _express.record(*reply), [])
        w.posted = None  # (last: a Ctrl-C before it leaves this to do again)

    def _read_reply(self, w: _Worker, task: Task, direct: bool) -> memoryview | None:
        """Read the driven *task*'s reply when one read brings just that: a RESULTS frame with
        its one record, a plain value (``apply``'s path: no frame list, generator or record
        parsing loop per reply); see :meth:`_take_reply`.  Otherwise return None, what came
        having been handled or left for ``_read``.

        An ALSO frame too: the reply of a call posted in the express lane's slot whose caller
        had stopped waiting there (a task the pool does not expect short, or one that ran
        past the caller's polling) -- that one came the general way, a delivery and a
        wake-up more (≈ 15 µs an ``apply`` of a 0.05-1 ms task, the lane against none).  One
        whose reply was taken from the slot after all is dropped, as ``_handle_frames``
        does."""
        got = w.chan.read_single(REPLY_FRAMES)
        if got is None:
            return None
        kind, body = got
        if kind == P.ALSO and P.RESULT_HEAD.unpack_from(body)[0] == w.taken:
            return None
        return self._take_reply(w, task, direct, body)

    def _take_reply(
        self, w: _Worker, task: Task, direct: bool, body: memoryview
    ) -> memoryview | None:
        """A RESULTS *body* from the driven *task*'s worker: when it is the task's one record,
        a plain value, settle it (see :meth:`_settle`) and return the pickled value.
        Otherwise handle it as any results (``_on_results``) and return None."""
        head = P.RESULT_HEAD
        if len(body) >= head.size:
            rec = head.unpack_from(body)
            if head.size + rec[5] == len(body):
                data = body[head.size :]
                if self._settle(w, task, direct, rec, data):
                    return data
        self._on_results(w, body, [])
        return None

    def _settle(self, w: _Worker, task: Task, direct: bool, rec: tuple, data: Any) -> bool:
        """Settle the driven *task* with its reply, a RESULTS record whose head is *rec* and
        *data* its pickled value -- when that is the task's one plain value (``apply``'s
        path: no frame list, generator or record parsing loop per reply).
        Release the claim; unless *direct* (see :meth:`drive`), first queue the delivery (in
        order, and for whoever delivers next should a Ctrl-C stop this thread).  False,
        having done nothing, for any other reply."""
        tid, status, duration, nbuf, nfd, _ = rec
        if not (
            tid == task.id
            and status == P.OK
            and not (nbuf or nfd)
            and task.kind == P.CALL
            and len(w.inflight) == 1
            and w.inflight.get(tid)
            and not task.cancel_requested  # (_on_results settles it: see cancel)
        ):
            return False
        del w.inflight[tid]
        # as _on_results does for each record
        spent = self._est_time = 0.7 * self._est_time + duration
        items = self._est_items = 0.7 * self._est_items + 1
        self._est = spent / items
        task.state = _DONE
        task.worker = None
        w.exclusive = False  # (a timed task ran alone)
        w.cost = 0.0
        w.driven = None
        if not direct:
            self._deliveries.append(("results", [task], [(*rec[:5], data)], [()]))
        if w.retiring:  # (maxtasksperchild)
            self._maybe_exit(w)  # (may write to the worker: EXIT)
        # settled, nothing else read: a Ctrl-C from here on needs no _abandon, only what
        # follows (see _drive).  (No call since the settling began: CPython raises a Ctrl-C's
        # exception at calls, not between statements.)
        self._settled = task
        self._set_mask(w)
        if direct and type(task.payload) not in BARE:  # arguments in shared memory (here,
            task.release()  # not in reply_value: a Ctrl-C between)
        return True

    def reply_value(self, task: Task, data: memoryview) -> Any:
        """Unpickle a reply that :meth:`drive` returned (*direct*), as a delivery would."""
        try:
            return pickle.loads(data)
        except BaseException as exc:  # noqa: BLE001 - as in _deliver_results
            raise self._unpickling_error(task, exc) from exc

    def unclaim(self, sink: Any) -> None:
        """``apply`` was interrupted (Ctrl-C) between claiming a worker for its task and
        reading the reply (see drive): give that channel back to the I/O thread, which then
        delivers the result to *sink* -- else nobody would ever read it, and the worker
        would stay claimed for good."""
        if os.getpid() != self._owner:  # a forked child: it claimed nothing (its pool is not
            return  # running), and a thread of the parent may have held the lock for good
        with self._lock:
            for w in self._workers.values():
                if w.driven is not None and w.driven.sink is sink:
                    if w.posted is w.driven:
                        self._unpost(w, w.posted)
                    w.driven = None
                    self._set_mask(w)
