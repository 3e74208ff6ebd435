"""Dispatch, the scheduler's half that decides which task goes to which worker, in what batch.

A worker may take more tasks while the work it holds is estimated below ``INFLIGHT_BUDGET``
seconds (``Scheduler._est``: the per-item time the workers report, item-weighted); unknown
cost means one task at a time, as does a map whose chunks have not come back yet (the
estimate is then another function's), and a task with a timeout runs alone.  A worker that has not
answered for longer than twice the work it holds (and ``INFLIGHT_BUDGET``) takes nothing more
until it does: its task runs far past the estimate, and what would queue behind it waits in the
pool, for the other workers, cancellable (``_stalled``).  Pending tasks are handed
round-robin, one at a time, to the workers that can take them, and each worker's share goes out
as one TASKS frame (plus a FUNC frame for each function it has not seen).  A mixin of
:class:`procpool._scheduler.Scheduler`, whose lock is held by every method here.
"""

from __future__ import annotations

import itertools
import os
import pickle
import time
from collections.abc import Iterator

from . import _protocol as P
from . import _serialize
from ._buffers import BufferCache
from ._channel import MAX_FDS_PER_FRAME
from ._start import INTERNAL_FDS
from ._supervise import TERMINATING, _Worker
from ._tasks import _DONE, _PENDING, _SENT, FEED_HOLD, MapJob, Task
from ._worker import FUNC_CACHE
from .errors import (
    SerializationError,
)

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = _serialize.PROTOCOL
INFLIGHT_BUDGET = 5e-3  # seconds of estimated work a worker may hold
PREFETCH_LIMIT = 50e-3  # tasks shorter than this get one more queued behind them
MAX_INFLIGHT = 4096  # tasks a worker may hold, whatever their cost
CALL_RUN = 64  # plain calls given to one worker in a row while dispatching (see _take_calls)


class Dispatch:
    """Mixin: batching pending work onto workers (see the module docstring)."""

    # provided by Scheduler
    processes: int
    _workers: dict[int, _Worker]
    _pending: Any
    _broken: BaseException | None
    _state: str
    _est: float | None
    _maxtasks: int | None
    _grace: float
    _tids: Iterator[int]
    _buffers: BufferCache
    _returns: Any  # (worker id, frame kind, inode), see _buffers.Returns

    if TYPE_CHECKING:  # provided by Scheduler and WorkerSupervision

        def _fail(self, task: Task, error: BaseException) -> None: ...
        def _cancel_pending_task(self, task: Task) -> None: ...
        def _add_timer(self, delay: float, kind: str, what: Any) -> None: ...
        def _accepts(self, w: _Worker) -> bool: ...
        def _flush(self, w: _Worker) -> None: ...
        def _set_mask(self, w: _Worker) -> None: ...
        def _watch_region(self, region: Any) -> None: ...
        def _read_input(self, job: MapJob) -> None: ...

    _mapped: dict[int, Any]
    _dispatch_now = 0.0  # when the current _dispatch began (monotonic)

    def _can_take(self, w: _Worker, cost: float, exclusive: bool) -> bool:
        if not w.inflight:
            return True
        if exclusive or len(w.inflight) >= MAX_INFLIGHT or self._est is None or self._stalled(w):
            return False
        budget = max(INFLIGHT_BUDGET, min(2 * cost, PREFETCH_LIMIT))
        return w.cost + cost <= budget

    def _stalled(self, w: _Worker) -> bool:
        """Whether busy worker *w* has been silent for longer than twice the work it holds
        (and INFLIGHT_BUDGET): its task runs far past the pool's estimate (after thousands of
        tiny tasks, one that sleeps), and tasks sent now would wait behind it -- while another
        worker may be free, and counted as running where they could still be cancelled."""
        silent = self._dispatch_now - w.heard
        return silent > INFLIGHT_BUDGET and silent > 2 * w.cost

    def _next_for(self, w: _Worker) -> Task | None:
        """The next task for worker *w* from the pending queue, or None if it should wait."""
        pending = self._pending
        while pending:
            head = pending[0]
            if type(head) is Task:
                if head.state != _PENDING:
                    pending.popleft()
                    continue
                if head.job is not None and head.job.cancelled:  # a chunk queued again (a
                    pending.popleft()  # retry, a dead worker's, a split) after cancel_map
                    self._cancel_pending_task(head)
                    continue
                if w.inflight:  # _can_take(w, est * head.n_items, bool(head.timeout)), inlined
                    est = self._est
                    if head.timeout or est is None or len(w.inflight) >= MAX_INFLIGHT:
                        return None
                    silent = self._dispatch_now - w.heard  # (_stalled, inlined)
                    if silent > INFLIGHT_BUDGET and silent > 2 * w.cost:
                        return None
                    cost = est * head.n_items
                    budget = 2 * cost  # max(INFLIGHT_BUDGET, min(2 * cost, PREFETCH_LIMIT))
                    if budget > PREFETCH_LIMIT:
                        budget = PREFETCH_LIMIT
                    if w.cost + cost > (budget if budget > INFLIGHT_BUDGET else INFLIGHT_BUDGET):
                        return None
                pending.popleft()
                if getattr(head.sink, "needs_start", False) and head.attempts == 0:
                    if not head.sink._start():  # a Future cancelled while pending
                        head.state = _DONE
                        head.release()
                        continue
                return head
            job = head
            if job.cancelled:  # (what it held failed with CancelledError: see _cancel_map)
                pending.popleft()
                job.queued = False
                continue
            if w.inflight and not job.measured:
                return None  # (its cost is not known yet: one chunk per worker, as est None)
            if job.source is not None:  # an in-memory input: read here (see _read_input)
                self._read_input(job)
            size = job.chunk_size(self._est, self.processes)
            est = self._est
            cost = float("inf") if est is None else est * size
            if not self._can_take(w, cost, bool(job.timeout)):
                return None
            idle = not w.inflight
            if job.starved:  # its window is full: no fuller chunk comes before a release
                idle = True
            elif idle and size > 1 and not job.input_done and job.available() < size:
                idle = self._hold_over(job, size)
            items = job.take(size, idle=idle)
            if items is None:
                if job.available():
                    return None  # a fuller chunk is coming: wait (FIFO)
                job.wake_at = 1  # the feeder's next item wakes the I/O thread, which
                if job.available():  # queues it again (see Scheduler._run) -- unless one
                    continue  # came in between: it is here now
                if job.bulk:  # inside a run, the feeder looks at wake_at only at its end
                    self._poll_feeder(job)
                pending.popleft()  # waiting for input
                job.queued = False
                continue
            if not job.available() and job.input_done:
                pending.popleft()  # that was its last chunk
                job.queued = False
            elif job.orphaned and job.limit is not None and job.available() * 2 < job.limit:
                job.space.notify()  # a dropped imap's feeder reads on as its items go out
            task = self._chunk_task(job, items)
            if task is not None:
                return task
        return None

    def _hold_over(self, job: MapJob, size: int) -> bool:
        """Whether an idle worker takes *job*'s partial chunk now: an imap whose feeder hands
        items over one at a time would otherwise go out an item or two per chunk, as fast as
        they come (≈ 4 µs each; a fast generator gives one every ≈ 0.1 µs).  The first look
        says wait, for FEED_HOLD at most, and asks the feeder to wake the I/O thread once
        the chunk is full; the timer sends what is there then."""
        if job.hold_until is None:
            job.hold_until = self._dispatch_now + FEED_HOLD
            self._add_timer(FEED_HOLD, "hold", None)
            job.wake_at = size - job.available()  # (items staged meanwhile count too)
            return False
        return self._dispatch_now >= job.hold_until

    def _poll_feeder(self, job: MapJob) -> None:
        """Look at *job*'s staged items after ``job.poll_delay``: its feeder reads a run (see
        Scheduler._stage) and may block inside it, items staged and nobody told."""
        if not job.polled:
            job.polled = True
            self._add_timer(job.poll_delay, "poll", job)

    def _chunk_task(
        self, job: MapJob, items: list | range, index: int | None = None
    ) -> Task | None:
        if index is None:  # the next items of the job's input
            index = job.next_index
            job.next_index += len(items)
        try:
            payload = _serialize.dumps(items, cache=self._buffers, keyed=True)
        except SerializationError as exc:
            task = Task.unsent(job.sink, job.label, job.kind, job, index, len(items))
            self._fail(task, SerializationError(f"{task.describe()}: {exc}"))
            return None
        task = Task(
            next(self._tids),
            job.fid,
            job.blob,
            job.kind,
            payload,
            job.sink,
            job.label,
            job.timeout,
            job.retries,
            (),
        )
        task.job, task.index, task.n_items = job, index, len(items)
        return task

    def _split_chunk(self, task: Task, item: int) -> Task | None:
        """A chunk whose worker was killed because its item *item* overran its time limit:
        queue the chunk's other items again -- those before it (their results died with the
        worker) and those after it (never started) -- as chunks of their own, first in line,
        and return a task standing for the item alone, to be failed.  None if the chunk cannot
        be split (its items carry descriptors other than their large buffers': a Queue, a
        Pipe): it then fails whole."""
        payload = task.payload
        job = task.job
        if job is None or not isinstance(payload, _serialize.Payload):
            return None
        if len(payload.fds) != payload.nbuf or not 0 <= item < task.n_items:
            return None
        try:  # the parent pickled them: it can read them (large buffers mapped here)
            if payload.fds:
                items = _serialize.loads(payload.data, payload.nbuf, _dup_all(payload.fds))
            else:
                items = pickle.loads(payload.data)
        except Exception:  # noqa: BLE001 - then the chunk fails whole, as before
            return None
        for lo, hi in ((item + 1, len(items)), (0, item)):  # appendleft: the earlier ones first
            if lo < hi:
                rest = self._chunk_task(job, items[lo:hi], task.index + lo)
                if rest is not None:
                    self._pending.appendleft(rest)
        task.release()
        overran = Task.unsent(task.sink, task.label, task.kind, job, task.index + item, 1)
        overran.timeout = task.timeout
        return overran

    def _give_back(self) -> None:
        """Tell each worker which of its result segments are no longer mapped here (RELEASED:
        it may reuse them) or were mapped when this process forked (PINNED: never reuse),
        as ``_buffers.Returns`` queued them; those of a dead worker are dropped."""
        returns = self._returns
        owed: dict[int, tuple[list[int], list[int]]] = {}
        while returns:  # (not None: while it runs)
            wid, kind, ino = returns.popleft()
            owed.setdefault(wid, ([], []))[kind == P.RELEASED].append(ino)
        for wid, (pinned, released) in owed.items():
            w = self._workers.get(wid)
            if w is None or w.eof or w.exit_sent:
                continue
            if pinned:  # first: a pinned segment must not be freed for reuse
                w.chan.push(P.frame(P.PINNED, P.pack_inodes(pinned)))
            if released:
                w.chan.push(P.frame(P.RELEASED, P.pack_inodes(released)))
            self._flush(w)
            self._set_mask(w)

    def _dispatch(self) -> None:
        """Hand pending work to workers that can take it, one batch (frame) per worker."""
        if self._returns:
            self._give_back()
        if not self._pending or self._broken is not None or self._state == TERMINATING:
            return
        # not a worker a caller is reading itself (drive): its reply then stays the lone one
        # that thread reads on its quick path, and a Ctrl-C there costs no other task
        workers = [w for w in self._workers.values() if self._accepts(w) and w.driven is None]
        if not workers:
            return
        workers.sort(key=lambda w: w.cost if w.inflight else -1.0)
        self._dispatch_now = time.monotonic()  # (see _stalled)
        batches: dict[int, list[Task]] = {w.wid: [] for w in workers}
        pending = self._pending
        active = workers
        while pending and active:
            still = []
            for w in active:
                if w.retiring or w.exclusive:  # reached maxtasksperchild, or runs a timed task
                    continue
                task = self._next_for(w)
                if task is None:
                    continue
                self._assign(w, task)
                batch = batches[w.wid]
                batch.append(task)
                # (not behind a timed task: it runs alone, see _hard_deadline)
                if (
                    type(task.payload) is tuple
                    and pending
                    and not self._maxtasks
                    and not task.timeout
                ):
                    self._take_calls(w, task, batch)
                still.append(w)
                if not pending:
                    break
            active = still
        for wid, tasks in batches.items():
            if tasks:
                self._send(self._workers[wid], tasks)

    def _take_calls(self, w: _Worker, first: Task, batch: list[Task]) -> None:
        """After *first*, a plain call (see Task.payload), give *w* the plain calls to the same
        function queued right behind it, up to CALL_RUN more: what _next_for and _assign
        would do for each, minus their general checks (a burst of ``apply_async`` sends
        thousands of them; they then make one CALLS record, see _send)."""
        cost = self._est  # (est * n_items, n_items being 1)
        if cost is None:  # unknown cost: one task at a time (as _next_for)
            return
        pending = self._pending
        fid = first.fid
        inflight = w.inflight
        budget = 2 * cost if 2 * cost < PREFETCH_LIMIT else PREFETCH_LIMIT  # _next_for's
        limit = (budget if budget > INFLIGHT_BUDGET else INFLIGHT_BUDGET) - cost
        taken = 0
        while pending and taken < CALL_RUN:
            head = pending[0]
            if (
                type(head) is not Task
                or type(head.payload) is not tuple
                or head.fid != fid
                or head.state != _PENDING
                or head.timeout
                or head.attempts
                or head.job is not None
                or getattr(head.sink, "needs_start", False)
                or len(inflight) >= MAX_INFLIGHT
                or w.cost > limit
            ):
                return
            pending.popleft()
            head.state = _SENT  # _assign's, inlined
            head.worker = w
            head.attempts = 1
            inflight[head.id] = head
            head.cost = cost
            w.cost += cost
            w.sent += 1
            batch.append(head)
            taken += 1

    def _assign(self, w: _Worker, task: Task) -> None:
        if not w.inflight:  # busy from now: silent since (see _stalled)
            w.heard = time.monotonic()
        task.state = _SENT
        task.worker = w
        task.attempts += 1
        w.inflight[task.id] = task
        est = self._est  # the task's cost is est * n_items; an unknown cost counts as 0 here
        if est is not None:
            cost = est * task.n_items
            task.cost = cost
            w.cost += cost
        else:
            task.cost = 0.0
        if task.timeout:
            w.exclusive = True
            # the first check of the hard limit: one item's limit and the grace from now;
            # then it follows the item running (see Scheduler._hard_deadline)
            what = (task, w, task.attempts, time.monotonic(), False)  # w: this sending only
            self._add_timer(task.timeout + self._grace, "hard", what)
        w.sent += 1
        if self._maxtasks and w.sent >= self._maxtasks:
            w.retiring = True

    def _send(self, w: _Worker, tasks: list[Task]) -> None:
        if self._returns:  # (first: the tasks' results may reuse those segments)
            self._give_back()
        chan = w.chan
        if len(tasks) == 1:  # the common single call (apply): one pack, one send
            task = tasks[0]
            payload = task.payload
            if type(payload) is tuple:
                payload = pickle.dumps((payload, {}), PROTOCOL)
            if type(payload) is bytes and task.fid in w.known:
                data = P.task_frame(task.id, task.fid, task.kind, task.timeout or 0.0, payload)
                chan.write(data)
                if chan.pending():  # (_flush also settles a broken channel)
                    self._flush(w)
                self._set_mask(w)
                return
        body = bytearray()
        fds: list[int] = []
        known = w.known
        pack_task = P.pack_task
        i, n = 0, len(tasks)
        while i < n:
            task = tasks[i]
            i += 1
            if task.fid not in known:
                if len(w.known) >= FUNC_CACHE and body:
                    # this FUNC evicts the worker's oldest function, which a task already in
                    # `body` may use: send those tasks first
                    chan.push(P.frame(P.TASKS, body, len(fds)), fds)
                    body, fds = bytearray(), []
                chan.push(P.frame(P.FUNC, P.FUNC_HEAD.pack(task.fid) + task.func_blob))
                w.known[task.fid] = None
                w.setup_sent += 1  # (counted by the worker as it reads it: see _express)
                if len(w.known) > FUNC_CACHE:
                    del w.known[next(iter(w.known))]
            payload = task.payload
            if isinstance(payload, list):  # a run (see CallRun): one CALLS record, member i's id
                first = task.id + 1  # the run's + 1 + i (given as the first alone)
                data = pickle.dumps((first, payload), PROTOCOL)
                pack_task(body, first, task.fid, P.CALLS, 0.0, 0, 0, data)
                continue
            if isinstance(payload, tuple):  # plain arguments (see Task.payload): with the plain
                fid = task.fid  # calls that follow it to the same function, one CALLS record
                j = i  # (a call with a time limit goes alone: CALLS records have none)
                while j < n and type(tasks[j].payload) is tuple and tasks[j].fid == fid:
                    if task.timeout or tasks[j].timeout:
                        break
                    j += 1
                if j == i:  # alone: a CALL record, as apply's worker expects (run_one)
                    data = pickle.dumps((payload, {}), PROTOCOL)
                    pack_task(body, task.id, fid, P.CALL, task.timeout or 0.0, 0, 0, data)
                    continue
                group = tasks[i - 1 : j]
                data = pickle.dumps(([t.id for t in group], [t.payload for t in group]), PROTOCOL)
                pack_task(body, task.id, fid, P.CALLS, 0.0, 0, 0, data)
                i = j
                continue
            if isinstance(payload, bytes):  # nothing out of band (see Task.payload)
                pack_task(body, task.id, task.fid, task.kind, task.timeout or 0.0, 0, 0, payload)
                continue
            if payload.regions:
                body, fds = self._map_regions(w, payload.regions, body, fds)
            if payload.fds:
                try:
                    dups = _dup_all(payload.fds)  # keep ours for a retry
                except OSError as exc:  # out of descriptors here: this task fails, saying so
                    self._not_sent(w, task, exc)
                    continue
                if len(fds) + len(dups) > MAX_FDS_PER_FRAME and body:
                    chan.push(P.frame(P.TASKS, body, len(fds)), fds)
                    body, fds = bytearray(), []
                fds += dups
                if payload.segments:  # it maps them until it says RELEASED
                    self._buffers.hold(payload.segments, w.wid)
            nfd = len(payload.fds) - payload.nbuf
            pack_task(
                body,
                task.id,
                task.fid,
                task.kind,
                task.timeout or 0.0,
                payload.nbuf,
                nfd,
                payload.data,
            )
        if body:
            chan.push(P.frame(P.TASKS, body, len(fds)), fds)
        self._flush(w)
        self._set_mask(w)

    def _not_sent(self, w: _Worker, task: Task, exc: OSError) -> None:
        """*task*, assigned to *w*, cannot go (its descriptors could not be duplicated): it
        fails alone, and *w* goes on as if it had never been given it (its count for
        maxtasksperchild too: a retirement now would start a worker while descriptors are
        short)."""
        w.inflight.pop(task.id, None)
        w.cost = max(0.0, w.cost - task.cost) if w.inflight else 0.0
        w.sent -= 1
        w.retiring = w.retire_asked or bool(self._maxtasks and w.sent >= self._maxtasks)
        if task.timeout:
            w.exclusive = False
        if w.driven is task:  # apply's claim (this thread's own: see Scheduler.drive)
            w.driven = None
        task.worker = None
        why = f"{exc.strerror or exc} in the pool's process"
        self._fail(task, SerializationError(f"{task.describe()} could not be sent: {why}"))

    def _map_regions(
        self, w: _Worker, regions: list, body: bytearray, fds: list[int]
    ) -> tuple[bytearray, list[int]]:
        """Before a task whose arguments name *regions* by key (see _serialize.send_region)
        goes to *w*: a MAP frame, with its descriptor, for each region *w* does not map yet,
        so a SharedArray (or Value, Lock...) costs its worker one mapping, not one per task.

        *w* keeps at most ``w.map_cap`` (see _supervise.mapping_cap), least recently used out
        first (a FORGET frame).  The tasks already packed in *body* (a TASKS frame being
        built, with its *fds*) may use those: they go first, and the frame being built starts
        again -- the body and fds to go on with are returned.  A worker runs its frames in order, so the
        tasks sent before a FORGET are done with the region by then.  It also forgets a
        region once it dies here (see Scheduler._forget_gone)."""
        known = w.regions
        new = None
        ours = 0
        for region in regions:
            key = region._key
            if key in known:
                if known[key]:  # mapped there, now most recently used: last out
                    del known[key]
                    known[key] = True
                    ours += 1
                    continue
                del known[key]  # (it could not be sent last time: once more)
            if new is None:
                new = [region]
            else:
                new.append(region)
        if new is None:
            return body, fds
        chan = w.chan
        # the payload's own are the last `ours` (a payload names at most MAX_REGIONS: fewer
        # than that many, and never evicted)
        over = min(len(known) + len(new) - w.map_cap, len(known) - ours)
        if over > 0:
            if body:
                chan.push(P.frame(P.TASKS, body, len(fds)), fds)
                body, fds = bytearray(), []
            out = list(itertools.islice(known, over))
            for key in out:
                del known[key]
            chan.push(P.forget_frame(out))
            w.setup_sent += 1
        mapped = self._mapped
        for region in new:
            key = region._key
            if region.fd < 0:  # (closed since it was pickled: its tasks say it is not mapped)
                continue
            try:
                fd = os.dup(region.fd)
            except OSError as exc:  # out of descriptors here: its tasks fail, saying so
                chan.push(P.unsent_frame(key, f"{exc.strerror} in the pool's process"))
                known[key] = False  # (not mapped: the next task naming it sends it again;
            else:  # but its note there goes with a FORGET, as a mapping would)
                INTERNAL_FDS.add(fd)  # (a worker forked before it goes must not inherit it)
                chan.push(P.map_frame(key, region.name), [fd])
                known[key] = True
            w.setup_sent += 1  # (counted by the worker as it reads them: see _express)
            if key not in mapped:
                self._watch_region(region)
        return body, fds


def _dup_all(fds: list[int]) -> list[int]:
    """Duplicates of *fds*, all or none (OSError, the ones made closed)."""
    out: list[int] = []
    try:
        for fd in fds:
            out.append(os.dup(fd))
    except OSError:
        for fd in out:
            os.close(fd)
        raise
    return out
