"""Worker supervision, the scheduler's half that deals with the processes themselves.

Starting a worker (its channel and pidfd into the epoll set, its progress slot, the INIT frame),
reading what it sends (READY, RESULTS, INIT_FAILED, RETIRE), writing to it (outbox and
EPOLLOUT), deciding what epoll watches on its channel, and burying it when it dies: the task it
was running fails (or is retried), the tasks it had not started go back to the queue, and a
replacement is started.  A mixin of :class:`procpool._scheduler.Scheduler`, whose lock is held
by every method here except ``_pool_idle`` (a deliberate lock-free peek, see _scheduler).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError

from . import _express, _mapping, _serialize
from . import _protocol as P
from ._buffers import BufferCache, Returns
from ._channel import RECV_SIZE, Channel
from ._errinfo import rebuild_error
from ._start import INTERNAL_FDS, Launcher, Proc, describe_exit, send_signal
from ._tasks import _DONE, _PENDING, RUN_IDS, RUN_MASK, Task
from .errors import (
    InitializerError,
    PoolTerminated,
    TaskTimeoutError,
    WorkerLostError,
)

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

EXIT_GRACE = 5.0  # seconds a worker told to exit gets before SIGKILL
EOF_GRACE = 1.0  # seconds a worker that closed its channel gets to exit before SIGKILL
SPAWN_RETRY = 0.1  # seconds before a worker is started again, after starting one failed here
SPAWN_GIVE_UP = 5.0  # seconds with no worker, its starts failing, before the pool gives up
STARTUP_FAILURES = 3  # workers crashing before READY, in a row, before the pool gives up
#: workers killed (SIGKILL/SIGTERM) before READY, in a row, before the pool gives up: one says
#: nothing about the next (a stray kill), a run of them does (the OOM killer and an
#: initializer that needs more memory than there is: a fork storm otherwise)
STARTUP_KILLS = 10
MAX_BOUNCES = 5  # a task re-sent this often, never started, fails instead of going round again

#: shared-memory regions a worker keeps mapped for the tasks that name them by key (see
#: _dispatch._map_regions), at most; beyond, the least recently used go.  Fewer when
#: descriptors are short (see mapping_cap).
MAPPED_PER_WORKER = 128
#: descriptors a worker of a process that started no pool holds (a spawned interpreter's)
_SPAWNED_FDS = 16


def mapping_cap(forked: bool) -> int:
    """How many regions a worker started now may keep mapped: a quarter of the descriptors it
    will have free, each region holding two there (its own and, before Python 3.13, mmap's),
    so that its tasks keep the rest; bounded by ``MAX_REGIONS`` (what one task may name) and
    ``MAPPED_PER_WORKER``.  A forked worker starts with the descriptors this process holds
    now, the shared objects made before it included.  (Asking the worker itself would page
    ≈ 0.1 MB of libc into every idle worker; an initializer that lowers its limit or opens
    many files is not seen.)"""
    limit = os.sysconf("SC_OPEN_MAX")  # RLIMIT_NOFILE's soft limit (-1: none)
    if limit < 0:
        return MAPPED_PER_WORKER
    free = limit - (len(os.listdir("/proc/self/fd")) if forked else _SPAWNED_FDS)
    return max(_serialize.MAX_REGIONS, min(MAPPED_PER_WORKER, free // 8))


# the pool's states (Scheduler._state)
RUNNING, CLOSING, TERMINATING, FINISHED = "RUNNING", "CLOSING", "TERMINATING", "FINISHED"


class _Worker:
    __slots__ = (
        "wid",
        "proc",
        "chan",
        "inflight",
        "cost",
        "heard",
        "known",
        "regions",
        "map_cap",
        "exclusive",
        "sent",
        "skip",
        "retiring",
        "retire_asked",
        "exit_sent",
        "ready",
        "eof",
        "writing",
        "driven",
        "progress",
        "mask",
        "killed",
        "returns",
        "box",
        "posted",
        "copied",
        "taken",
        "setup_sent",
        "setup_seen",
    )

    def __init__(self, wid: int, proc: Proc) -> None:
        self.wid = wid
        self.proc = proc
        self.chan = Channel(proc.sock)
        self.inflight: dict[int, Task] = {}
        self.cost = 0.0
        self.heard = 0.0  # when it last sent results, or became busy (see Dispatch._stalled)
        self.known: dict[int, None] = {}  # fids sent, FIFO, mirrors the worker's cache
        # keys of the regions it maps (True), or was told could not be sent (False), least
        # recently used first (see _dispatch._map_regions)
        self.regions: dict[int, bool] = {}
        self.map_cap = 0  # how many it may keep (see mapping_cap)
        self.exclusive = False
        self.sent = 0
        self.retiring = False  # no more tasks: maxtasksperchild reached, or it asked (RETIRE)
        self.retire_asked = False  # it said RETIRE (max_memory_per_child)
        self.exit_sent = False
        self.ready = False
        self.eof = False
        self.writing = False
        self.driven: Task | None = None  # a caller reads its channel (Scheduler.drive)
        self.progress = -1  # the progress slot's memfd, when not mapped (see read_progress)
        self.mask = select.EPOLLIN  # what epoll watches on its channel (see _set_mask)
        self.killed = False  # by the pool (a time limit, a cancel, terminate): see _bury
        self.skip: int | None = None  # the call it was last asked to skip (see _stop_on)
        # what we owe it for its result buffers (made at its first: see _note_lent)
        self.returns: Returns | None = None
        # apply's express lane (see _express): the pool's end of the worker's mailbox, when
        # it has one, and the call posted there whose caller still polls for the reply
        self.box: _express.PoolSide | None = None
        self.posted: Task | None = None
        self.copied = 0  # the last call posted whose channel copy it may not have read yet
        self.taken = 0  # the last call whose reply was taken from its slot
        self.setup_sent = 0  # FUNC, MAP and FORGET frames sent (see _express.PoolSide.setup_read)
        self.setup_seen = 0  # how many the worker had read when the slot last said so

    def read_progress(self) -> tuple[int, int, int, float]:
        """The worker's progress slot (see _protocol.PROGRESS): running task id, last finished
        id, item, its start.  A forked worker's is shared memory mapped before the fork
        (``Proc.progress``); a spawned one's a memfd sent with INIT, which the parent reads
        with ``pread`` (at a death and a time limit only) rather than maps: mapping it with
        no descriptor kept takes ``ctypes`` before Python 3.13, and every forked worker would
        hold that module's pages (see _mapping.map_fd)."""
        if self.proc.progress is not None:
            return P.PROGRESS.unpack_from(self.proc.progress)
        if self.progress < 0:  # (its start failed before the slot existed)
            return 0, 0, 0, 0.0
        return P.PROGRESS.unpack(os.pread(self.progress, P.PROGRESS.size, 0))

    def ask_skip(self, tid: int) -> None:
        """Have the worker skip call *tid* when it comes to it (see _protocol.SKIP)."""
        data = P.SKIP.pack(tid) + b"\x01"
        if self.proc.progress is not None:
            self.proc.progress[P.SKIP_OFFSET : P.SKIP_FLAG + 1] = data
        elif self.progress >= 0:
            os.pwrite(self.progress, data, P.SKIP_OFFSET)
        self.skip = tid

    def skip_asked(self) -> bool:
        """Whether the SKIP flag is still set (the worker clears it as it skips the call)."""
        if self.proc.progress is not None:
            return bool(self.proc.progress[P.SKIP_FLAG])
        return self.progress >= 0 and os.pread(self.progress, 1, P.SKIP_FLAG) == b"\x01"

    def close_progress(self) -> None:
        self.box = None
        if self.proc.progress is not None:
            try:
                self.proc.progress.close()
            except BufferError:  # a caller still holds the mailbox: unmapped when it lets go
                pass
        if self.progress >= 0:
            INTERNAL_FDS.discard(self.progress)
            os.close(self.progress)
            self.progress = -1


class WorkerSupervision:
    """Mixin: the workers' lifecycle and their channels (see the module docstring)."""

    # provided by Scheduler
    processes: int
    _launcher: Launcher
    _workers: dict[int, _Worker]
    _by_fd: dict[int, tuple[str, _Worker | None]]
    _epoll: Any
    _spin: Any
    _init_body: bytes
    _init_fds: list[int]
    _pending: Any
    _dead: list[_Worker]
    _state: str
    _broken: BaseException | None
    _deciding: set[int]
    _startup_failures: int
    _startup_kills: int
    _no_worker_since: float | None
    _spawn_armed: bool
    _buffers: BufferCache
    _est: float | None
    _est_time: float
    _est_items: float
    _deliveries: list[Any]
    _grace: float
    _wids: Iterator[int]

    if TYPE_CHECKING:  # Scheduler's (and Dispatch's) own methods, used here

        def _fail(self, task: Task, error: BaseException) -> None: ...
        def _break(self, error: BaseException) -> None: ...
        def _has_work(self) -> bool: ...
        def _wake(self) -> None: ...
        def _add_timer(self, delay: float, kind: str, what: Any) -> None: ...
        def _split_chunk(self, task: Task, item: int) -> Task | None: ...

    def _replace(self) -> None:
        """Start a worker in place of one gone.  When starting fails here (out of
        descriptors, processes or memory: an OSError), try again SPAWN_RETRY seconds later
        (a "spawn" timer); when no worker is left for SPAWN_GIVE_UP seconds, the pool fails,
        saying why.  (Before, the first failure killed the I/O thread, and the pool.)"""
        try:
            self._spawn()
        except OSError as exc:
            now = time.monotonic()
            if self._workers:
                self._no_worker_since = None
            elif self._no_worker_since is None:
                self._no_worker_since = now
            if self._no_worker_since is not None and now - self._no_worker_since >= SPAWN_GIVE_UP:
                self._break(
                    WorkerLostError(
                        f"no worker could be started for {SPAWN_GIVE_UP:g} s: {exc.strerror or exc}",
                        None,
                    )
                )
            elif not self._spawn_armed:
                self._spawn_armed = True
                self._add_timer(SPAWN_RETRY, "spawn", None)
        else:
            self._no_worker_since = None

    def _spawn(self) -> None:
        """Start a worker and send it INIT.  A failure leaves nothing behind: what needs
        descriptors is made before the worker is started, and if watching it fails, it goes."""
        cap = mapping_cap(self._launcher.method == "fork")  # (our descriptors, before the fork)
        fds: list[int] = []  # INIT's: the progress slot's memfd unless forked, the initializer's
        progress = -1
        try:
            if self._launcher.method != "fork":  # (a forked worker has its slot already)
                progress = os.memfd_create("procpool-progress", os.MFD_CLOEXEC)
                INTERNAL_FDS.add(progress)  # (closed in _bury)
                os.ftruncate(progress, P.PROGRESS_SIZE)
                fds.append(os.dup(progress))
            for fd in self._init_fds:  # (the initializer's arguments')
                fds.append(os.dup(fd))
            proc = self._launcher.start()
        except BaseException:
            for fd in fds:
                os.close(fd)
            if progress >= 0:
                INTERNAL_FDS.discard(progress)
                os.close(progress)
            raise
        sfd = proc.sock.fileno()
        INTERNAL_FDS.add(sfd)
        if proc.pidfd >= 0:
            INTERNAL_FDS.add(proc.pidfd)
        try:  # (epoll may refuse: ENOMEM, max_user_watches)
            proc.sock.setblocking(False)
            self._epoll.register(sfd, select.EPOLLIN)
            try:
                if proc.pidfd >= 0:
                    self._epoll.register(proc.pidfd, select.EPOLLIN)
            except BaseException:
                self._epoll.unregister(sfd)
                raise
        except BaseException:  # the worker goes, and all that was made for it
            send_signal(proc, signal.SIGKILL)
            self._launcher.reap(proc)
            for fd in (sfd, proc.pidfd, progress):
                INTERNAL_FDS.discard(fd)
            proc.sock.close()
            for fd in [proc.pidfd, progress, *fds]:
                if fd >= 0:
                    os.close(fd)
            if proc.progress is not None:
                proc.progress.close()
            raise
        w = _Worker(next(self._wids), proc)
        w.map_cap = cap
        slot = proc.progress
        if slot is not None and self._spin.limit and _express.AVAILABLE:
            w.box = _express.PoolSide(slot)
        self._workers[w.wid] = w
        self._by_fd[sfd] = ("sock", w)
        if proc.pidfd >= 0:
            self._by_fd[proc.pidfd] = ("pidfd", w)
        if progress >= 0:
            w.progress = progress
        # INIT: the worker's number (its name: see _worker.take_identity), the settings; its
        # descriptors: the progress slot's memfd first, unless the worker was forked (its slot
        # is mapped before the fork), then those of the initializer's arguments
        body = P.INIT_HEAD.pack(w.wid) + self._init_body
        w.chan.push(P.frame(P.INIT, body, len(fds)), fds)
        self._flush(w)

    def _idle_worker(self) -> _Worker | None:
        for w in self._workers.values():
            if not w.inflight and self._accepts(w) and w.driven is None:
                return w
        return None

    def _pool_idle(self) -> bool:
        """No worker holds a task and one can take one: send inline, from the caller's thread.

        Only then: while tasks stream in, queueing them lets the I/O thread send batches.
        """
        ok = False
        for w in list(self._workers.values()):  # list(): atomic under the GIL, lock or not
            if w.inflight:
                return False
            ok = ok or self._accepts(w)
        return ok

    @staticmethod
    def _accepts(w: _Worker) -> bool:
        return not (w.retiring or w.exit_sent or w.eof or w.exclusive)

    def _finished_on(self, w: _Worker, tid: int) -> bool:
        """Whether the task (or run member) *tid* that *w* holds has finished, by its progress
        slot: its reply is then written or buffered, and comes unless the worker dies first."""
        running, done, _, _ = w.read_progress()
        if running == tid:
            return False
        if done == tid:
            return True
        seen = False
        for task in w.inflight.values():  # in the order the worker runs them
            if task.kind == P.CALLS:  # a run: its members not answered yet, in order
                first = task.id + 1
                ids: Any = range(first + task.sink.got, first + len(task.sink.members))
            else:
                ids = (task.id,)
            if done in ids:  # what the worker finished last: tid, before it, did too
                return seen or tid in ids and tid < done
            seen = seen or tid in ids
        return False

    def _stop_on(self, w: _Worker, tid: int) -> bool:
        """``cancel(force=True)`` of call *tid*, held by *w*: False if it has finished (its
        reply is on its way).  Running, it is stopped with its worker.  Not started yet -- it
        waits behind the call *w* runs -- *w* is asked to skip it, and the call running and
        the others go on (killing *w* failed the one running, and lost the results it had
        not sent).  One skip at a time per worker: a second, while the first call is still
        held, kills.  (The worker may have read the flag just before it was written, as it
        started the call: then the call runs, and its reply is dropped.)"""
        if self._finished_on(w, tid):
            return False
        if w.read_progress()[0] != tid and (w.skip is None or not self._holds(w, w.skip)):
            w.ask_skip(tid)
            if w.read_progress()[0] != tid:  # not started meanwhile: it will be skipped,
                # unless it ran and finished meanwhile -- finished with the flag cleared is
                # skipped (only the worker clears it, before it writes "done": slot first)
                return not self._finished_on(w, tid) or not w.skip_asked()
        self._kill(w)
        return True

    def _holds(self, w: _Worker, tid: int) -> bool:
        """Whether *w* still holds call *tid* (a task, or a run's member) unanswered."""
        if tid in w.inflight:
            return True
        if tid < RUN_IDS:
            return False
        run = w.inflight.get(tid & ~RUN_MASK)
        return run is not None and tid - (tid & ~RUN_MASK) - 1 >= run.sink.got

    def _kill(self, w: _Worker, deliberate: bool = True) -> None:
        """SIGKILL *w*: *deliberate* for the pool's own reasons (a time limit, a cancel,
        terminate), which say nothing about the next worker (see _bury); not when the worker
        is only made sure of (its channel broke, it closed it and lingers)."""
        if deliberate:
            w.killed = True
        send_signal(w.proc, signal.SIGKILL)

    def _abandon(self, w: _Worker) -> None:
        """A caller's thread was stopped (a Ctrl-C) while it wrote to or read from *w*'s
        channel, under the lock: what crossed it is unknown -- a task assigned and never
        written, part of a frame, a reply taken off the socket and not settled.  Nobody could
        ever tell, and a task would wait forever: the worker is killed, its death settles
        its tasks as any worker's (see _bury), and a new one replaces it."""
        w.posted = None  # (its slot's answer, if any, dies with it)
        if w.wid in self._workers:
            w.driven = None  # watched again by the I/O thread, which sees it die
            self._kill(w)
            self._set_mask(w)
            self._wake()

    def _kill_all(self) -> None:
        for w in self._workers.values():
            self._kill(w)

    def _bury(self, w: _Worker, code: int | None) -> None:
        """A worker is dead: release it, settle the tasks it held, replace it if needed."""
        if w.wid not in self._workers:
            return
        posted, box = w.posted, w.box
        if posted is not None and box is not None and box.answered(posted.id):
            # a reply it wrote in its slot before dying counts, as one in its channel does
            # (see _on_event), though its caller may hold it: that caller then finds the
            # worker gone and waits on the delivery (see _express)
            reply = box.reply(posted.id)
            if reply is not None:
                w.taken = posted.id
                self._on_results(w, _express.record(*reply), [])
        # (the box too: a view of the slot left alive keeps close_progress from unmapping it,
        # and every worker forked meanwhile would inherit the mapping: a fourth review)
        w.posted = posted = box = None
        del self._workers[w.wid]
        sfd = w.proc.sock.fileno()
        for fd in (sfd, w.proc.pidfd) if w.proc.pidfd >= 0 else (sfd,):
            self._by_fd.pop(fd, None)
            INTERNAL_FDS.discard(fd)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        w.chan.close()
        self._buffers.forget_worker(w.wid)  # its mappings died with it
        if w.returns is not None:  # and its segments: nothing to tell it any more
            lenders = _mapping.lenders
            for ino, r in list(lenders.items()):  # (one C call: others pop meanwhile)
                if r is w.returns:
                    lenders.pop(ino, None)
        if w.proc.pidfd >= 0:
            os.close(w.proc.pidfd)
        how = describe_exit(code)
        running, done, item, started = w.read_progress()
        if not started:  # no item had started (a chunk still being read): none to blame
            item = -1
        w.close_progress()
        held = []  # in the order the worker runs them
        for task in w.inflight.values():
            if task.kind == P.CALLS:  # a run: its members not answered yet, a Task each
                sink = task.sink
                held += [sink.member(task, i) for i in range(sink.got, len(sink.members))]
            else:
                held.append(task)
        w.inflight.clear()
        ids = [t.id for t in held]
        cut = ids.index(running) if running in ids else (ids.index(done) + 1 if done in ids else 0)
        for task in held[:cut]:  # finished, but the result died with the worker
            self._settle_lost(task, w, code, how, "after running")
        blamed = running in ids  # the death is the running task's (or befell it), not theirs
        if blamed:
            self._settle_lost(held[cut], w, code, how, "while running", item)
            cut += 1
        for task in reversed(held[cut:]):  # never started: send again, no attempt used
            task.attempts -= 1
            if not blamed:  # counted only for deaths no running task explains
                task.bounces += 1
            task.timed_out = False  # (killed for not starting in time: it starts afresh)
            task.state = _PENDING
            task.worker = None
            if task.cancel_requested:
                self._fail(task, CancelledError())
            elif self._state == TERMINATING:
                self._fail(task, PoolTerminated("the pool was terminated"))
            elif task.bounces > MAX_BOUNCES:  # whatever kills them, it is not this task's run
                err = WorkerLostError(
                    f"{task.describe()} was sent to {task.bounces} workers that all died before"
                    f" it could start; the last one (pid {w.proc.pid}) {how}",
                    code,
                )
                self._fail(task, err)
            else:
                self._pending.appendleft(task)
        killed = code is not None and -code in (signal.SIGKILL, signal.SIGTERM)
        if not w.ready and not w.exit_sent and not w.killed and self._broken is None:
            # it died while starting (initializer, imports): a few crashes in a row mean it
            # always will; a kill from outside says little about the next one, many do
            if killed:
                self._startup_kills += 1
            else:
                self._startup_failures += 1
            if self._startup_failures >= STARTUP_FAILURES or self._startup_kills >= STARTUP_KILLS:
                n = STARTUP_KILLS if killed else STARTUP_FAILURES
                why = " (the out-of-memory killer?)" if killed else ""
                self._break(
                    WorkerLostError(
                        f"{n} workers in a row died while starting; the last one {how}{why}",
                        code,
                    )
                )
        if self._needs_workers():
            self._replace()

    def _settle_lost(
        self, task: Task, w: _Worker, code: int | None, how: str, when: str, item: int = -1
    ) -> None:
        """Settle a task its dead worker held; *item*: the item of it that was running (-1:
        none known -- a timed-out chunk then fails whole)."""
        task.state = _PENDING
        task.worker = None
        if task.cancel_requested:
            self._fail(task, CancelledError())
        elif task.timed_out:
            overran = self._split_chunk(task, item) if task.n_items > 1 else None
            if overran is not None:  # a chunk: only the item that overran fails
                task = overran
            err = TaskTimeoutError(
                f"{task.describe()} exceeded its timeout of {task.timeout}s and did not stop"
                f" within {self._grace}s; its worker (pid {w.proc.pid}) was killed",
                task.timeout,
                hard=True,
            )
            if (  # retry_on=(TaskTimeoutError,) retries a hard timeout as a soft one
                task.retry_on
                and task.attempts <= task.retries
                and isinstance(err, task.retry_on)
                and self._state != TERMINATING
            ):
                task.timed_out = False
                self._pending.appendleft(task)
            else:
                self._fail(task, err)
        elif self._state == TERMINATING:
            self._fail(task, PoolTerminated("the pool was terminated"))
        elif task.attempts <= task.retries:
            self._pending.appendleft(task)  # retry first: it has waited longest
        else:
            tries = f" (after {task.attempts} attempts)" if task.attempts > 1 else ""
            self._fail(
                task,
                WorkerLostError(
                    f"worker pid {w.proc.pid} {how} {when} {task.describe()}{tries}",
                    code,
                    task.attempts,
                    result_lost=when != "while running",
                ),
            )

    def _needs_workers(self) -> bool:
        if self._broken is not None or len(self._workers) >= self.processes:
            return False
        if self._state == RUNNING:
            return True
        return self._state == CLOSING and self._has_work()

    def _read(self, w: _Worker) -> None:
        chan = w.chan
        for _ in range(64):  # up to 4 MiB per wake-up; epoll is level-triggered for the rest
            if chan.fill() < RECV_SIZE:  # a short read: nothing more is waiting
                break
        self._handle_frames(w)
        if chan.eof and not w.eof:
            w.eof = True
            try:  # out of the epoll set: a hung-up socket reports EPOLLHUP whatever the mask
                self._epoll.unregister(w.chan.fileno())
            except (OSError, ValueError):
                pass
            if w.proc.pidfd >= 0:
                # Usually it is exiting and its pidfd fires in a moment, with the true exit
                # status; one that closed its channel but lives on is killed after a grace.
                self._add_timer(EOF_GRACE, "exit", w)
            else:  # no pidfd to tell us: kill it and let the I/O thread reap it now
                self._kill(w, deliberate=False)
                self._dead.append(w)
                self._wake()

    def _handle_frames(self, w: _Worker) -> None:
        for kind, body, fds in w.chan.frames():
            if kind == P.RESULTS:
                self._on_results(w, body, fds)
            elif kind == P.ALSO:  # a reply the express lane's slot had too (see _express)
                if P.RESULT_HEAD.unpack_from(body)[0] != w.taken:
                    self._on_results(w, body, fds)
            elif kind == P.READY:
                w.ready = True
                self._startup_failures = self._startup_kills = 0
                self._set_mask(w)
            elif kind == P.INIT_FAILED:
                info, stage = pickle.loads(body)  # stage: "initializer" or "main script"
                cause = rebuild_error(info)
                if stage == "initializer":
                    what = "the pool's initializer raised"
                else:  # spawn/forkserver workers run the main script first (see import_main)
                    what = "a worker running the main script (as spawn does) got"
                err = InitializerError(f"{what} {info[1]}: {info[2]}")
                err.__cause__ = cause
                self._break(err)
            elif kind == P.RELEASED:
                self._buffers.released(w.wid, P.unpack_inodes(body))
            elif kind == P.PINNED:
                self._buffers.pin(P.unpack_inodes(body))
            elif kind == P.RETIRE:
                w.retiring = w.retire_asked = True
                self._maybe_exit(w)

    def _on_results(self, w: _Worker, body: memoryview, fds: list[int]) -> None:
        w.heard = time.monotonic()
        # _est, the per-item time, is a running ratio of measured time to items (both decayed):
        # weighted by items, so the few small chunks at the end of a map (whose fixed costs
        # dominate) do not drag the estimate -- and the next map's chunk size -- far off
        spent, items = self._est_time, self._est_items
        inflight = w.inflight
        cost = w.cost
        # one delivery for the whole frame (see Scheduler._deliver_results): the tasks, their
        # records and, per record, its fds (``()`` for none), in three parallel lists
        tasks: list[Task] = []
        recs: list[P.ResultRecord] = []
        rfds: list[Any] = []
        mine: Any = ()
        values: list[Any] = []  # tasks and values of VALUES records: [task, value, ...]
        for rec in P.iter_results(body):
            if rec[1] == P.VALUES:  # several calls' scalars (no fds, no user code to unpickle)
                if tasks:  # deliveries keep the records' order (callbacks run in it)
                    self._deliveries.append(("results", tasks, recs, rfds))
                    tasks, recs, rfds = [], [], []
                ids, got = pickle.loads(rec[5])
                if type(ids) is int:  # the first of ids that follow one another
                    ids = range(ids, ids + len(got))
                if ids[-1] >= RUN_IDS or max(ids) >= RUN_IDS:  # members of runs (see CallRun)
                    cost = self._on_values(w, ids, got, values, cost)
                    values = []  # (_on_values queued them)
                else:
                    for tid, value in zip(ids, got, strict=True):
                        task = inflight.pop(tid, None)
                        if task is not None:  # (None: cancelled or failed meanwhile)
                            cost -= task.cost
                            task.worker = None
                            if task.timeout:
                                w.exclusive = False
                            task.state = _DONE
                            if task.cancel_requested:  # came before its worker's death
                                if values:  # (see the record's case below)
                                    self._deliveries.append(("values", values))
                                    values = []
                                self._deliveries.append(("error", task, CancelledError()))
                            else:
                                values += (task, value)
                spent = 0.7 * spent + rec[2]
                items = 0.7 * items + len(ids)
                continue
            if values:
                self._deliveries.append(("values", values))
                values = []
            if fds:
                n = rec[3] + rec[4]  # nbuf + nfd
                mine, fds = fds[:n], fds[n:]
                if rec[3]:  # large buffers: the worker reuses each once we are done with it
                    self._note_lent(w, mine, rec[3])
            task = inflight.pop(rec[0], None)
            if task is None and rec[0] >= RUN_IDS:  # a run's member: a Task of its own now
                task, freed = self._run_member(inflight, rec[0])
                cost -= freed
            if task is None:  # cancelled or failed meanwhile
                if mine:
                    _drop_received(rec[3], mine)
                    mine = ()
                continue
            spent = 0.7 * spent + rec[2]  # the duration
            items = 0.7 * items + task.n_items
            cost -= task.cost
            if task.job is not None:
                task.job.measured = True
            task.state = _DONE
            task.worker = None
            if task.timeout:
                w.exclusive = False
            if task.cancel_requested:
                # the reply of a task cancel(force=True) stopped came before its worker's
                # death: it fails all the same, as the cancel promised.  (Queued with no
                # Python call since the pop: a Ctrl-C in a caller's drive is raised at one.)
                if tasks:  # deliveries keep the records' order
                    self._deliveries.append(("results", tasks, recs, rfds))
                    tasks, recs, rfds = [], [], []
                self._deliveries.append(("error", task, CancelledError()))
                task.release()
                if mine:
                    _drop_received(rec[3], mine)
                    mine = ()
                continue
            if rec[1] == P.ERROR and task.retry_on and task.attempts <= task.retries:
                self._deciding.add(task.id)  # a retry may come of it: work until decided
            tasks.append(task)
            recs.append(rec)
            rfds.append(mine)
            mine = ()
        if tasks:
            self._deliveries.append(("results", tasks, recs, rfds))
        if values:  # (at most one of the two is left: each flushed the other, above)
            self._deliveries.append(("values", values))
        self._est_time, self._est_items = spent, items
        if items:
            self._est = spent / items
        w.cost = cost if inflight else 0.0
        self._maybe_exit(w)
        if not inflight:
            self._set_mask(w)

    def _note_lent(self, w: _Worker, fds: list[int], nbuf: int) -> None:
        """The first *nbuf* of *fds* are result buffers *w* sent: note the inode of each, so
        that mapping it, or dropping it unmapped, tells *w* when the segment may be reused
        (see _buffers)."""
        returns = w.returns
        if returns is None:
            returns = w.returns = Returns(w.wid, self)
        lenders = _mapping.lenders
        for fd in fds[:nbuf]:
            try:
                lenders[os.fstat(fd).st_ino] = returns
            except OSError:
                pass

    def _on_values(self, w: _Worker, ids: list, got: list, values: list, cost: float) -> float:
        """A VALUES record's plain values, *ids* among them members of runs (see CallRun):
        queue their deliveries (*values*, the ``[task, value, ...]`` gathered before, first)
        and return *cost* less what the runs answered in full held.  A run's members answer
        in order, so its ids here are consecutive: a slice of its members at a time."""
        inflight = w.inflight
        i, n = 0, len(ids)
        while i < n:
            tid = ids[i]
            task = inflight.pop(tid, None)
            if task is not None or tid < RUN_IDS:  # a task of its own
                i += 1
                if task is not None:
                    cost -= task.cost
                    task.state = _DONE
                    task.worker = None
                    if task.timeout:
                        w.exclusive = False
                    if task.cancel_requested:  # came before its worker's death
                        if values:  # (see _on_results)
                            self._deliveries.append(("values", values))
                            values = []
                        self._deliveries.append(("error", task, CancelledError()))
                    else:
                        values += (task, got[i - 1])
                continue
            base = tid & ~RUN_MASK
            run = inflight.get(base)
            k = tid - base - 1  # its index in the run
            if run is None:  # failed meanwhile
                i += 1
                continue
            sink = run.sink
            total = len(sink.members)
            m = min(total - k, n - i)
            if ids[i + m - 1] != tid + m - 1:  # (never: the worker answers in order)
                m = 1
            if values:  # deliveries keep the records' order
                self._deliveries.append(("values", values))
                values = []
            members = sink.members[k : k + m]
            deliveries: list[tuple[str, Any, Any]]
            if sink.cancelled is None or sink.cancelled.isdisjoint(range(k, k + m)):
                deliveries = [("members", members, got[i : i + m])]
            else:  # replies of members a cancel(force=True) had stopped: they stay unread
                deliveries = [
                    ("error", Task.unsent(member, run.label), CancelledError())
                    if k + j in sink.cancelled
                    else ("members", [member], [got[i + j]])
                    for j, member in enumerate(members)
                ]
            # the run's bookkeeping, then its deliveries, with no call in between: a Ctrl-C (in
            # a caller's drive, see _drive) is raised at a call, so both are done, or neither
            sink.got = k + m
            if k + m == total:  # all in
                del inflight[base]
                cost -= run.cost
                run.state = _DONE
                run.worker = None
            self._deliveries += deliveries
            i += m
        if values:
            self._deliveries.append(("values", values))
        return cost

    def _run_member(self, inflight: dict, tid: int) -> tuple[Task | None, float]:
        """The run member *tid* (see CallRun) as a Task of its own, its reply read (its
        result is not a plain value), and the cost freed should that finish its run."""
        base = tid & ~RUN_MASK
        run = inflight.get(base)
        if run is None:  # failed meanwhile
            return None, 0.0
        sink = run.sink
        k = tid - base - 1
        task = sink.member(run, k)
        sink.got = k + 1
        if sink.got < len(sink.members):
            return task, 0.0
        del inflight[base]
        run.state = _DONE
        run.worker = None
        return task, run.cost

    def _maybe_exit(self, w: _Worker) -> None:
        if w.retiring and not w.inflight and not w.exit_sent:
            self._send_exit(w)

    def _send_exit(self, w: _Worker) -> None:
        w.exit_sent = True
        w.chan.push(P.frame(P.EXIT))
        self._flush(w)
        self._add_timer(EXIT_GRACE, "exit", w)

    def _flush(self, w: _Worker) -> None:
        """Write what the worker's socket takes; watch EPOLLOUT while something is left."""
        try:
            done = w.chan.flush()
        except OSError:  # the worker is gone, or the channel is unusable: settle it as dead
            w.chan.discard_output()
            self._kill(
                w, deliberate=False
            )  # its pidfd (or EOF) then tells us, and its tasks are settled
            done = True
        writing = not done
        if writing != w.writing:
            w.writing = writing
            self._set_mask(w)

    def _set_mask(self, w: _Worker) -> None:
        """Watch a worker's channel for input while something is expected from it (it holds
        tasks, has not said READY, or has no pidfd to report its death) and no caller drives
        it; for output room while its outbox is not empty.  An idle worker's channel is left
        out of the epoll set: `apply` then costs no epoll_ctl at all."""
        mask = 0
        if w.driven is None and not w.eof and (w.inflight or not w.ready or w.proc.pidfd < 0):
            mask = select.EPOLLIN
        if w.writing:
            mask |= select.EPOLLOUT
        if mask != w.mask:
            w.mask = mask
            try:
                self._epoll.modify(w.chan.fileno(), mask)
            except (OSError, ValueError):
                pass


def _drop_received(nbuf: int, fds: Any) -> None:
    """A result that will never be read: its worker may reuse its segments, and its
    descriptors are closed."""
    _mapping.discard_received(nbuf, fds)
    _serialize.Payload(b"", 0, list(fds)).close()
