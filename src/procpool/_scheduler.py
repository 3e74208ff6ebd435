"""The scheduler: the pool's one I/O thread, its queues, timers and shutdown.

:class:`Scheduler` is this module's engine plus six mixins, one job each: worker supervision
(``_supervise.py``), dispatch (``_dispatch.py``), bursts of submissions -- the inbox, hand-offs
and runs -- (``_bursts.py``), the imap feeder threads (``_feeder.py``), ``apply``'s quick path
read by the caller's own thread (``_drive.py``) and the deliveries to result objects
(``_deliver.py``).  This module holds the caller-side API (submissions, map jobs, cancel,
close), the pending queue, the I/O loop, timers and shutdown.

::

  caller threads                 the I/O thread (this module)                    worker processes
  ──────────────                 ────────────────────────────                    ────────────────
  apply_async / submit ──► Task ──► pending deque ──► per-worker batches ──► Channel[i] ──► worker i
  map / imap (lazy)   ──► MapJob ─┘     │                (one TASKS frame)   (socketpair)   runs the
                                        │ epoll over: channels, worker pidfds,               records,
                                        │ a wake-up eventfd; a timer heap (timeouts)         replies
  AsyncResult / Future ◄── deliveries ◄─┴── results, exceptions, WorkerLost, TaskTimeout ◄──┘

* **One channel per worker**: no shared queue and no lock on the workers' side; the scheduler
  always knows which tasks each worker holds (``_Worker.inflight``), so a dead worker fails, or
  retries, exactly those.
* **Death is seen at once**: each worker's pidfd sits in the same epoll set as the channels.
* **Batching**: tasks are queued and sent in batches.  Arguments are pickled by the caller's
  thread (so an unpicklable argument fails at once, in the caller), except plain scalars
  without keywords, pickled by the thread that sends the batch.  A worker gets more tasks
  while the work it holds is estimated below ``INFLIGHT_BUDGET`` seconds (``_est``: the
  measured per-item time, item-weighted).  Unknown cost means one task at a time; a task with
  a timeout always runs alone.
* **Map jobs** cut their input into chunks lazily, sized from the same estimate (a few ms of
  work per chunk, smaller near the end so no worker idles); ``imap`` reads its input (in the
  I/O thread for an in-memory one, else in a feeder thread) with a bound on the items it
  holds, so memory does not grow with input length.
* **Locking**: one lock (``_lock``) guards the pending queue, the workers and what each holds
  (``_Worker.inflight``).  Two reads are deliberately lock-free: a submitting caller appends to
  ``_inbox`` (a deque) and checks ``_pool_idle()`` first, taking the lock only for the inline
  send.  Unpickling results and calling the caller's callbacks happen *outside* the lock
  (``_deliver``), so a callback may submit more work.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
import select
import sys
import threading
import time
import traceback
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError

from . import _protocol as P
from . import _serialize
from ._buffers import TRIM_AFTER, BufferCache, worker_cache_bytes
from ._bursts import Bursts, _close_left_over
from ._channel import MAX_FDS_PER_FRAME, Spin, can_spin
from ._deliver import Delivery
from ._dispatch import Dispatch
from ._drive import DRIVE_SPIN, Driving
from ._feeder import _IN_MEMORY_ITERATORS, Feeding
from ._start import (
    INTERNAL_FDS,
    Launcher,
    interrupts_held,
    main_preparation,
    send_signal,
    start_thread,
)
from ._supervise import CLOSING, FINISHED, RUNNING, TERMINATING, WorkerSupervision, _Worker
from ._tasks import (
    _DONE,
    _PENDING,
    _SENT,
    FEED_POLL_MAX,
    RUN_IDS,
    RUN_STRIDE,
    MapJob,
    Task,
)
from ._worker import FUNC_CACHE
from .errors import (
    InitializerError,
    PoolTerminated,
    SerializationError,
)
from .results import WAIT_SLICE

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

WAKE_CLOSE_WAIT = 0.5  # seconds a pool's end waits for a thread writing its eventfd (_wake)
IMAP_HELD = 65536  # items an imap may hold (read, not yet consumed): its memory bound
# callables whose pickle cannot change while they live: cached by identity (see _function)
_BY_IDENTITY = frozenset({types.FunctionType, types.BuiltinFunctionType, type})


def _bound_to_state(func: Any) -> bool:
    """A builtin bound to an object (``table.get``, ``rng.random``), whose state may change:
    not a builtin function of a module."""
    owner = getattr(func, "__self__", None)
    return owner is not None and not isinstance(owner, types.ModuleType)


_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


class Scheduler(WorkerSupervision, Dispatch, Bursts, Feeding, Driving, Delivery):
    """The engine behind :class:`procpool.Pool`: owns the workers and the I/O thread."""

    def __init__(
        self,
        processes: int,
        launcher: Launcher,
        initializer: Callable[..., object] | None,
        initargs: tuple,
        maxtasksperchild: int | None,
        max_memory_per_child: int | None,
        grace: float,
    ) -> None:
        self.processes = processes
        self._launcher = launcher
        self._maxtasks = maxtasksperchild
        self._grace = grace
        config: dict[str, Any] = {"max_memory": max_memory_per_child}
        if launcher.method != "fork":  # a fresh interpreter: the parent's path and main script
            config["sys_path"] = list(sys.path)
            config["main"] = main_preparation()
        # the descriptors the initializer's arguments carry (procpool's locks, queues...), sent
        # with every INIT frame; kept until the pool ends
        self._init_fds: list[int] = []
        if initializer is None:
            pass
        elif launcher.method == "fork":  # inherited, as multiprocessing's forked workers do:
            launcher.init = (initializer, initargs)  # (its Value, Lock... refuse pickling)
            config["init"] = True
        else:
            payload = _serialize.dumps((initializer, initargs), oob=False)
            nfds = len(payload.fds)
            if nfds >= MAX_FDS_PER_FRAME:  # (INIT carries the progress slot too)
                payload.close()
                raise ValueError(
                    f"initargs carry {nfds} file descriptors (procpool objects); a pool's"
                    f" workers can be given at most {MAX_FDS_PER_FRAME - 1}"
                )
            config["init"] = payload.data
            config["init_fds"] = len(payload.fds)
            self._init_fds = payload.fds
            INTERNAL_FDS.update(payload.fds)  # (no worker of another pool keeps them)
        config["method"] = launcher.method
        config["pool_pid"] = os.getpid()  # (a forkserver worker's parent is the server)
        # whether its workers may spin (see Spin): they run on this process's CPUs, and asking
        # in each would page ≈ 64 kB of libc (sched_getaffinity) into every idle worker
        config["spin"] = spin = can_spin()
        config["result_cache"] = worker_cache_bytes(processes)  # (see _buffers)
        self._init_body = pickle.dumps(config)  # (the INIT frame's: see _spawn)

        self._lock = threading.RLock()
        self._deliver_lock = threading.RLock()
        self._delivering: int | None = None  # the thread delivering (holding _deliver_lock)
        self._pending: deque[Task | MapJob] = deque()
        # appended by callers without the lock: Tasks, and apply_async's quick calls as their
        # AsyncResults (see call_async)
        self._inbox: deque[Any] = deque()
        self._dead: list[_Worker] = []  # workers seen dead by EOF (no pidfd): to bury
        self._workers: dict[int, _Worker] = {}
        self._by_fd: dict[int, tuple[str, _Worker | None]] = {}
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_seq = itertools.count()
        self._funcs: dict[int, tuple[Any, int, bytes, str]] = {}  # func, fid, blob, label
        self._by_pickle: dict[bytes, tuple[Any, int, bytes, str]] = {}  # (see _function)
        self._fids = itertools.count(1)
        self._tids = itertools.count(1)
        self._run_ids = itertools.count(RUN_IDS, RUN_STRIDE)  # (see CallRun)
        self._wids = itertools.count(1)
        self._est: float | None = None  # seconds per item (see _supervise._on_results)
        self._spin = Spin(DRIVE_SPIN, spin)  # (see drive)
        self._est_time = 0.0
        self._est_items = 0.0
        self._state = RUNNING
        self._broken: BaseException | None = None
        self._startup_failures = 0  # workers that crashed while starting, in a row
        self._no_worker_since: float | None = None  # since when starts fail with no worker
        self._start_error: OSError | None = None  # why the first worker could not start
        self._spawn_armed = False  # a "spawn" timer is set
        self._startup_kills = 0  # ... and that were killed while starting (see _bury)
        # jobs whose feeder thread runs (a plain set, not a WeakSet: a weakref callback running
        # in the caller's thread when a job is freed could swallow its Ctrl-C)
        self._feeding: set[MapJob] = set()
        self._deliveries: list[Any] = []
        self._settled: Task | None = None  # the reply _read_reply settled last (see _drive)
        self._refill = False  # a caller read results while tasks wait: wake the I/O thread
        self._killed_all = False
        # ids of tasks with retry_on whose error was read and not yet delivered (_decided)
        self._deciding: set[int] = set()
        self._owner = os.getpid()

        self._buffers = BufferCache(on_free=self._wake)  # large arguments' memfds, reused
        # what result buffers unmapped owe their workers (see _buffers.Returns); None once over
        self._returns: deque[tuple[int, int, int]] | None = deque()
        self._trim_armed = False
        self._epoll = select.epoll()
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._woken = False
        self._wake_lock = threading.RLock()  # its writers and its closing (see _wake)
        # submitters waiting for one turn of the I/O thread (see _handoff): an eventfd in
        # semaphore mode, the tokens asked for, and the threads inside the wait
        self._handofffd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
        self._handoffs = 0
        self._handoff_waiting = 0
        self._turn_at = 0.0  # time.monotonic() at the end of the I/O thread's last turn
        self._cancels: list[MapJob] = []  # map jobs to cancel (see cancel_map)
        # the shared-memory regions this pool's workers were given by key (see _map_regions),
        # watched; and the keys of those that died here since (see _forget_gone)
        self._mapped: dict[int, weakref.ref] = {}
        self._gone: list[int] = []
        self._early_for = -1.0  # the _turn_at after which an early hand-off was last made
        self._epoll.register(self._wakefd, select.EPOLLIN)
        self._by_fd[self._wakefd] = ("wake", None)
        INTERNAL_FDS.update((self._epoll.fileno(), self._wakefd, self._handofffd))
        # The hand-off eventfd is closed by whoever is last of the I/O thread and the waiters
        # (_handoff_waiting); a Ctrl-C landing in a waiter's bookkeeping can lose its count.
        # Then it is closed when the scheduler goes (no waiter can exist: each holds it).
        self._handoff_box = [self._handofffd, os.getpid()]
        weakref.finalize(self, _close_left_over, self._handoff_box).atexit = False

        _live.add(self)
        # released once the first workers are started (a bare lock, not an Event: a Ctrl-C
        # in Condition.wait can leave its lock broken, see results._Wakeup)
        self._starting = threading.Lock()
        self._starting.acquire()
        self._thread = threading.Thread()  # the I/O thread, once start() has made it

    def start(self) -> None:
        """Start the I/O thread, which starts the first workers.  (Apart from __init__: the
        pool sets its finalizer first, which terminates a pool whose start a Ctrl-C cut.)"""
        start_thread(self._run, "procpool-io", made=self._made)

    def _made(self, thread: threading.Thread) -> None:
        self._thread = thread

    # =================================================================== caller side
    @property
    def state(self) -> str:
        return self._state

    def function(self, func: Callable) -> tuple[int, bytes]:
        """The id and pickle of *func*, pickled once and cached (functions go once per worker)."""
        entry = self._function(func)
        return entry[1], entry[2]

    def _function(self, func: Callable) -> tuple[Any, int, bytes, str]:
        """*func*'s cache entry: ``(func, fid, pickle, label)``.

        A function, a builtin or a class is cached by identity: pickled once.  Any other
        callable -- a ``functools.partial``, an object with ``__call__``, a bound method -- is
        pickled at each submission, as ``multiprocessing`` does, since its state may have
        changed since the last (cached by identity, a changed callable ran as it was); the
        cache is then keyed by the pickle, so an unchanged one is still sent to a worker once.
        """
        entry = self._funcs.get(id(func))
        if entry is not None and entry[0] is func:
            return entry
        blob = _serialize.dumps_function(func)
        label = getattr(func, "__qualname__", None) or repr(func)
        with self._lock:
            if type(func) in _BY_IDENTITY and not _bound_to_state(func):
                entry = (func, next(self._fids), blob, label)
                self._funcs[id(func)] = entry
                if len(self._funcs) > FUNC_CACHE:
                    del self._funcs[next(iter(self._funcs))]
            else:
                entry = self._by_pickle.get(blob)
                if entry is None:
                    entry = self._by_pickle[blob] = (None, next(self._fids), blob, label)
                    if len(self._by_pickle) > FUNC_CACHE:
                        del self._by_pickle[next(iter(self._by_pickle))]
        return entry

    def _check_running(self) -> None:
        if self._state != RUNNING:
            raise ValueError("Pool not running")

    def submit_call(
        self,
        func: Callable,
        args: tuple,
        kwds: dict,
        sink: Any,
        *,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: tuple = (),
        claim: bool = False,
    ) -> Task:
        """Queue ``func(*args, **kwds)``; raise ValueError if the pool is closed.

        With *claim*, the caller promises to call :meth:`drive` for this task right away.

        An argument that cannot be pickled fails *sink* at once (a SerializationError naming
        the argument) rather than raising, as ``multiprocessing`` reports it through the result.
        """
        if self._state != RUNNING:
            raise ValueError("Pool not running")
        entry = self._funcs.get(id(func))  # the cached function: inline, this runs per task
        if entry is not None and entry[0] is func:
            label = entry[3]
        else:
            label = getattr(func, "__qualname__", None) or repr(func)
            entry = None
        try:
            if entry is None:
                entry = self._function(func)  # its message names the function
            fid, blob = entry[1], entry[2]
            try:
                payload = _serialize.dumps_call(args, kwds, self._buffers)
            except SerializationError as exc:
                what = _serialize.find_unpicklable(args, kwds)
                cause = exc.__cause__ or exc
                raise SerializationError(f"task {label}: cannot pickle {what}: {cause}") from cause
        except SerializationError as err:
            task = Task.unsent(sink, label)
            sink._on_error(task, err)
            return task
        task = Task(
            next(self._tids), fid, blob, P.CALL, payload, sink, label, timeout, retries, retry_on
        )
        if self._state != RUNNING:
            task.release()
            raise ValueError("Pool not running")
        if self._inbox or self._pending or not self._pool_idle():
            return self._enqueue(task)
        with self._lock:  # idle: the low-latency path, sent from the caller's own thread
            if self._state != RUNNING:
                task.release()
                raise ValueError("Pool not running")
            w = self._idle_worker()
            if self._broken is not None:
                self._fail(task, self._broken_error())
            elif w is None or self._inbox or self._pending:
                self._pending.append(task)
                self._wake()
            elif not getattr(sink, "needs_start", False) or sink._start():
                if claim:  # the caller will read the reply itself (see drive): keep the
                    w.driven = task  # I/O thread from waking up for it
                    self._set_mask(w)
                try:
                    self._assign(w, task)
                    self._send(w, [task])
                except BaseException:  # a Ctrl-C: what reached the worker is unknown
                    self._abandon(w)
                    raise
                if w.writing:
                    self._wake()
        self._deliver()
        return task

    def _dispatch_here(self) -> None:
        """``_dispatch`` from a caller's thread, under the lock (the I/O thread would first
        have to wake up: ≈ 0.1-0.2 ms on the development machine, for a small map there
        ≈ a third of the call).  Stopped midway (a Ctrl-C), the workers it was sending to
        are abandoned (see ``_abandon``)."""
        before = [(w, w.sent, len(w.inflight)) for w in self._workers.values()]
        try:
            self._dispatch()
        except BaseException:
            for w, sent, held in before:  # (_assign counts a task in inflight, then in sent)
                if w.sent != sent or len(w.inflight) != held:
                    self._abandon(w)
            raise

    def submit_map(
        self,
        func: Callable,
        items: Iterable,
        sink: Any,
        *,
        star: bool,
        chunksize: int | None,
        timeout: float | None = None,
        retries: int = 0,
        lazy: bool = False,
        on_input_end: Callable[[int, BaseException | None], None] | None = None,
    ) -> MapJob:
        """Queue a map over *items*.  A list is used as is; with ``lazy``, a feeder thread reads
        the iterable while fewer than a bounded number of items are held (imap)."""
        self._check_running()
        label = f"{'starmap' if star else 'map'}({getattr(func, '__qualname__', func)})"
        fid, blob = self.function(func)
        kind = P.STARMAP if star else P.MAP
        limit = max(IMAP_HELD, 4 * self.processes * (chunksize or 1)) if lazy else None
        job = MapJob(self._lock, fid, blob, kind, sink, label, timeout, retries, chunksize, limit)
        job.on_end = on_input_end
        # (everything that may raise -- a TypeError, a Ctrl-C in a call -- before the job is
        # known to the pool: a job registered and never ended keeps close() waiting forever)
        direct = False
        if lazy:
            source = items if type(items) is range else iter(items)
            if type(source) is range:
                try:
                    len(source)
                except OverflowError:  # longer than sys.maxsize: a feeder reads it
                    source = iter(source)
                else:
                    job.buf, job.stop = source, 0  # (see _read_input)
            # in memory: the I/O thread reads it itself (see Feeding._read_input); else a
            # feeder thread does, running the caller's code: signals as theirs
            direct = type(source) is range or type(source) in _IN_MEMORY_ITERATORS
            if direct:
                job.source = source
                job.on_room = self._wake  # (the I/O thread reads on: see _feed_waiting)
        else:  # a list as it is; a range too (its chunks are ranges: a few bytes to pickle)
            buf = items if isinstance(items, (list, range)) else list(items)
        with self._lock:
            self._check_running()
            if lazy:
                self._feeding.add(job)
                if direct and self._broken is not None:  # its input ends here, as a feeder's
                    self._feeding.discard(job)  # would at its first look (see _feed)
                    self._input_end(job, self._stopped_error())
                elif direct:  # queued in its turn; the I/O thread reads it (_feed_waiting)
                    self._queue_job(job)
                if direct:
                    self._wake()  # (and delivers the end of a broken pool's input)
            else:
                job.buf = buf
                self._input_end(job, None)
                if not self._inbox and len(self._pending) == 1 and self._pool_idle():
                    self._dispatch_here()  # idle: the first chunks go now, from this thread
                else:
                    self._wake()
                if self._deliveries:  # (a chunk that could not be pickled): the I/O thread
                    self._wake()  # runs its callbacks, as multiprocessing's threads do
        if lazy and not direct:
            try:
                quiet = type(items) is range  # (a range's iterator runs no code of the caller)
                start_thread(self._feed, "procpool-feeder", (job, source), quiet=quiet)
            except BaseException:  # no feeder (a Ctrl-C, no thread to be had): end its input
                self.cancel_map(job)
                raise
        return job

    def _stopped_error(self) -> BaseException:
        if self._broken is not None:
            return self._broken_error()
        return PoolTerminated("the pool was terminated")

    def _input_end(self, job: MapJob, error: BaseException | None) -> None:
        if job.input_done:
            return
        job.input_done = True
        total = job.next_index + job.available()
        if job.on_end is not None:
            self._deliveries.append(("call", job.on_end, (total, error)))
        self._queue_job(job)

    def _queue_job(self, job: MapJob) -> None:
        if self._broken is not None or self._state in (TERMINATING, FINISHED):
            self._fail_job(job, self._stopped_error())
            return
        if not job.queued and (job.available() or not job.input_done):
            # (in this order: cut in between by a Ctrl-C in a caller's thread, the job is
            # queued twice -- harmless -- rather than marked queued and never run)
            self._pending.append(job)
            job.queued = True

    def cancel(self, task: Task | None, force: bool, result: Any = None) -> bool:
        """Cancel a pending task; with *force*, stop a running one by replacing its worker.
        *result*: the AsyncResult, for one of apply_async's quick calls (no Task of its own
        while queued, then maybe a member of a run: see call_async)."""
        if os.getpid() != self._owner:  # a forked child: the tasks, and the workers a forced
            return False  # cancel would kill, are the parent's; its lock may be held for good
        with self._lock:
            if task is None or task.kind == P.CALLS:
                task = result._task  # (again, under the lock: the I/O thread sets it)
            if task is None:
                outcome = self._cancel_queued(result)
            elif result is not None and result._done:
                outcome = False
            elif task.kind == P.CALLS:
                outcome = self._cancel_member(task, result, force)
            elif task.state == _PENDING:
                self._cancel_pending_task(task)
                outcome = True
            elif task.state == _SENT and force and task.worker is not None:
                # stopped (or skipped), unless it has finished (its reply is on its way): the
                # promise is CancelledError, even should the reply arrive before the worker's
                # death, or come from a skip
                outcome = self._stop_on(task.worker, task.id)
                if outcome:
                    task.cancel_requested = True
            else:
                outcome = False
        self._deliver()
        return outcome

    def _cancel_queued(self, result: Any) -> bool:
        """cancel() for a quick call still in the inbox (its task is None, read under the
        lock: the I/O thread takes the inbox under it): marked, the I/O thread skips it."""
        entry = getattr(result, "_entry", None)  # (None: cancelled already)
        if entry is None:
            return False
        dead, error = Task.unsent(result, entry[3]), CancelledError()
        result._entry = result._args = None  # (from here to its delivery: no Python call)
        self._deliveries.append(("error", dead, error))
        return True

    def _cancel_member(self, run: Task, result: Any, force: bool) -> bool:
        """cancel() for a member of a run (see CallRun): one still queued leaves the run;
        with *force*, one sent and not answered yet is cancelled with its worker."""
        sink = run.sink
        i = next((j for j, member in enumerate(sink.members) if member is result), -1)
        if i < 0:
            return False
        if run.state == _PENDING:
            dead, error = Task.unsent(result, run.label), CancelledError()
            del sink.members[i]  # (from here to its delivery: no Python call)
            del sink.args[i]  # (the run's payload)
            self._deliveries.append(("error", dead, error))
            run.n_items -= 1
            if not sink.members:
                run.state = _DONE  # (the dispatcher drops it)
            return True
        if (
            run.state == _SENT
            and force
            and i >= sink.got
            and run.worker is not None
            and self._stop_on(run.worker, run.id + 1 + i)
        ):
            if sink.cancelled is None:
                sink.cancelled = set()
            sink.cancelled.add(i)
            return True
        return False

    def cancel_pending(self) -> None:
        """Cancel every task not yet sent, map jobs' unsent items too
        (``shutdown(cancel_futures=True)``: often in a Ctrl-C handler, and a second Ctrl-C
        must not cut the moving of tasks between queues in the middle: see interrupts_held)."""
        if os.getpid() != self._owner:
            return  # a forked child: the pool belongs to the parent (its lock may be held)
        try:
            with interrupts_held(), self._lock:
                self._take_inbox()
                for item in self._pending:
                    if isinstance(item, Task) and item.state == _PENDING:
                        self._cancel_pending_task(item)
                jobs = {item for item in self._pending if isinstance(item, MapJob)}
                for job in jobs | self._feeding:
                    self._cancel_map(job)
                self._pending = deque(i for i in self._pending if isinstance(i, MapJob))
        except BaseException:  # the Ctrl-C held back: the I/O thread delivers the cancels
            self._wake()
            raise
        self._deliver()

    def cancel_map(self, job: MapJob) -> None:
        """Cancel what a map job has not sent: its unread input, the items read but not cut
        into chunks yet, chunks waiting to be sent again, or queued again later.  Its
        consumer gets ``CancelledError`` at the first of them; chunks already with a worker
        finish.  (What ``ProcessPoolExecutor.map``'s iterator does when it is closed, as the
        stdlib cancels the futures of a map whose iterator is closed.)

        Done by the I/O thread in its next turn, before it sends anything (or by a caller's
        ``drive`` before it does): this is called from a generator's ``finally``, which a
        garbage collection may run anywhere -- in the middle of the engine's own work, or in
        a forked child (then: nothing).
        """
        if os.getpid() != self._owner:
            return
        self._cancels.append(job)  # (one operation: safe wherever this runs)
        self._wake()

    def orphan(self, job: MapJob) -> None:
        """*job*'s imap iterator was dropped: nobody will consume, so its held results no
        longer pace its input (``MapJob.orphaned``).  A finalizer's: it may run anywhere, the
        lock held or not, so it sets a flag and wakes the I/O thread, which reads on an
        in-memory input whose window was waiting for a consumer (``_feed_waiting``)."""
        job.orphaned = True
        if job.source is not None and os.getpid() == self._owner:
            self._wake()

    def _cancel_pending_task(self, task: Task) -> None:
        task.cancel_requested = True
        self._fail(task, CancelledError())

    def _take_cancels(self) -> None:
        while self._cancels:
            self._cancel_map(self._cancels.pop())

    def _cancel_map(self, job: MapJob) -> None:
        if job.cancelled:
            return
        self._fail_job(job, CancelledError())  # the items read (staged too), not yet in a chunk
        job.cancelled = True
        for task in self._pending:  # chunks queued again (after a worker died, a time limit)
            if type(task) is Task and task.job is job and task.state == _PENDING:
                self._cancel_pending_task(task)
        if not job.input_done:  # the feeder stops at its next look, and reads no more
            self._feeding.discard(job)
            self._input_end(job, CancelledError())
            self._stop_feeders((job,))

    def close(self) -> None:
        if os.getpid() != self._owner:
            return  # a forked child (its exit hooks, say): the pool belongs to the parent
        with self._lock:
            if self._state == RUNNING:
                self._state = CLOSING
                self._wake()
                for job in self._feeding:  # feeders waiting for room may now read on
                    job.space.notify_all()
                    if job.source is not None:  # (the I/O thread reads it: _read_input)
                        self._queue_job(job)

    def terminate(self) -> None:
        if os.getpid() != self._owner:
            return  # a forked child: the pool belongs to the parent
        with self._lock:
            if self._state in (RUNNING, CLOSING):
                self._state = TERMINATING
                self._wake()
                self._stop_feeders(self._feeding)
        # not from the I/O thread, nor from a thread delivering (a result's last reference to
        # its pool can go in a delivery): the I/O thread's last deliveries would wait for it
        me = threading.get_ident()
        thread = self._thread
        if thread is not threading.current_thread() and self._delivering != me and thread.ident:
            thread.join(10)
        self._deliver()

    def join(self, timeout: float | None = None) -> bool:
        # in slices, so that a Ctrl-C during join() is raised at once (see results.WAIT_SLICE)
        if timeout is not None and timeout != timeout:  # NaN: no wait, as the stdlib's
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            self._thread.join(min(left, WAIT_SLICE))
        return not self._thread.is_alive()

    def signal_workers(self, signum: int) -> list[int]:
        """Send *signum* to every live worker; return their pids."""
        if os.getpid() != self._owner:
            return []  # a forked child: no worker is its own (and the lock may be held)
        with self._lock:
            pids = []
            for w in self._workers.values():
                send_signal(w.proc, signum)
                pids.append(w.proc.pid)
            return pids

    def worker_pids(self) -> list[int]:
        if os.getpid() != self._owner:
            return []  # a forked child: no worker is its own (and the lock may be held)
        with self._lock:
            return [w.proc.pid for w in self._workers.values()]

    # =================================================================== the I/O thread
    def _wake(self) -> None:
        # Safe without the pool's lock: the I/O thread clears _woken *before* it drains the
        # inbox, so a caller that sees True here appended its task before that drain.
        # _wake_lock keeps the eventfd open while it is written: once the pool has closed it
        # (FINISHED), its number may already be another file's, which would get the 8 bytes
        # (see _close_resources).  Reentrant: a region's death callback, or a signal handler,
        # may wake from inside a wake.
        if not self._woken:
            with self._wake_lock:
                if self._state != FINISHED:
                    self._woken = True
                    os.eventfd_write(self._wakefd, 1)

    def wait_started(self) -> None:
        """Return once the pool's first workers exist (forked: they hold the program's state
        as it is now, as ``multiprocessing.Pool()`` forks before it returns).  Raise the
        OSError of the first worker's start when it failed (``Pool()`` then fails)."""
        while not self._starting.acquire(True, WAIT_SLICE):  # in slices: see WAIT_SLICE
            if not self._thread.is_alive():
                break
        else:
            self._starting.release()
        if self._start_error is not None:  # not even one worker could start: Pool() says why
            self._thread.join()
            raise self._start_error

    def _run(self) -> None:
        try:
            try:
                with self._lock:  # the first start's failure is Pool()'s; later ones are retried
                    try:
                        self._spawn()
                    except OSError as exc:
                        self._start_error = exc  # (wait_started raises it)
                        raise
                    for _ in range(self.processes - 1):
                        self._replace()
            finally:
                self._starting.release()
            self._deliver()
            while True:
                events = self._epoll.poll(self._poll_timeout())
                with self._lock:
                    for fd, mask in events:
                        self._on_event(fd, mask)
                    self._run_timers()
                    if self._buffers.free_bytes and not self._trim_armed:
                        self._trim_armed = True  # give unused buffers back after a while
                        self._add_timer(TRIM_AFTER, "trim", None)
                    while self._dead:
                        w = self._dead.pop()
                        self._bury(w, self._launcher.reap(w.proc))
                    self._take_cancels()  # (after the wake-up is read: see _wake)
                    if self._gone:
                        self._forget_gone()
                    self._take_inbox()
                    if self._feeding:  # staged items, in-memory inputs to read on
                        self._feed_waiting()
                    self._dispatch()
                    finished = self._progress_shutdown()
                self._deliver()
                if self._handoffs:  # submitters waiting for this turn (see _handoff)
                    self._end_handoffs()
                self._turn_at = time.monotonic()
                if finished:
                    break
        except BaseException as exc:  # noqa: BLE001 - the engine itself failed: fail everything
            if exc is not self._start_error:  # (that one Pool() raises)
                traceback.print_exc()
            with self._lock:
                self._state = TERMINATING
                self._broken = self._broken or PoolTerminated(
                    f"the pool's I/O thread failed: {exc!r}"
                )
                self._kill_all()
                self._fail_everything(self._broken)
                for w in list(self._workers.values()):
                    self._bury(w, self._launcher.reap(w.proc))
            self._deliver()
        finally:
            self._close_resources()

    def _close_resources(self) -> None:
        with self._lock:
            self._mapped.clear()  # (no region's death calls back from here on)
            # no _wake may be writing the eventfd as it closes -- but one may be stopped in
            # there for good: a signal handler that ends the pool ran in its thread (Python
            # runs handlers between any two bytecodes).  Then it stays open until the
            # scheduler is freed: no thread can write it after that
            held = self._wake_lock.acquire(timeout=WAKE_CLOSE_WAIT)
            self._state = FINISHED
            if held:
                _close_internal(self._wakefd)
                self._wake_lock.release()
            else:
                weakref.finalize(self, _close_internal, self._wakefd)
            INTERNAL_FDS.discard(self._epoll.fileno())
            self._epoll.close()
            self._launcher.close()
            for fd in self._init_fds:
                INTERNAL_FDS.discard(fd)
                os.close(fd)
            self._init_fds = []
            self._funcs.clear()
            self._by_pickle.clear()
            self._buffers.close()
            self._returns = None  # (what results unmapped from now on owe: nothing, see Returns)
            self._stop_feeders(self._feeding)  # the pool is gone
        self._end_handoffs()  # whoever still waits returns, and the last one closes the fd
        with self._lock:
            if not self._handoff_waiting:
                self._close_handoff()

    def _poll_timeout(self) -> float:
        if not self._timers:
            return -1
        # at most an hour (epoll takes a C int of milliseconds: ~24 days): then poll again
        return min(max(0.0, self._timers[0][0] - time.monotonic()), 3600.0)

    def _on_event(self, fd: int, mask: int) -> None:
        what, w = self._by_fd.get(fd, ("", None))
        if what == "wake":
            try:
                os.eventfd_read(self._wakefd)
            except BlockingIOError:
                pass
            self._woken = False
        elif what == "sock" and w is not None:
            if mask & select.EPOLLOUT:
                self._flush(w)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and w.driven is None:
                self._read(w)
        elif what == "pidfd" and w is not None:
            self._read(w)  # results it wrote before dying still count
            self._bury(w, self._launcher.reap(w.proc))

    def _watch_region(self, region: Any) -> None:
        """Have the workers told to forget *region* once it dies here (see _forget_gone).
        The callback runs wherever the region is freed, maybe inside this very lock's holder:
        it only notes the key and wakes the I/O thread."""
        gone, wake = self._gone, self._wake

        def died(_ref: Any, key: int = region._key) -> None:
            gone.append(key)
            wake()

        self._mapped[region._key] = weakref.ref(region, died)

    def _forget_gone(self) -> None:
        """A FORGET frame to each worker that maps regions which died here: their memory is
        freed once no process maps it.  No task of theirs is in flight: a task's payload
        keeps its regions alive until it is done."""
        gone = self._gone
        keys: dict[int, list[int]] = {}
        while gone:  # (pop: a callback may append meanwhile)
            key = gone.pop()
            self._mapped.pop(key, None)
            for w in self._workers.values():
                if key in w.regions:
                    del w.regions[key]
                    keys.setdefault(w.wid, []).append(key)
        for wid, out in keys.items():
            told = self._workers.get(wid)
            if told is None:  # (buried meanwhile: never expected, a flush buries its own)
                continue
            told.chan.push(P.forget_frame(out))
            told.setup_sent += 1
            self._flush(told)
            self._set_mask(told)

    def _has_work(self) -> bool:
        return (
            bool(self._pending or self._inbox)
            or bool(self._feeding)  # map jobs whose input is not fully read yet
            or bool(self._deciding)  # errors a retry_on may send again, not yet rebuilt
            or any(w.inflight for w in self._workers.values())
        )

    def _break(self, error: BaseException) -> None:
        """The pool cannot run tasks (initializer failed, workers die at start): fail them all."""
        self._broken = error
        self._kill_all()
        self._fail_everything(error)

    def _broken_error(self) -> BaseException:
        err = self._broken
        assert err is not None
        new = type(err)(*err.args) if isinstance(err, InitializerError) else err
        new.__cause__ = err.__cause__
        return new

    def _fail_everything(self, error: BaseException) -> None:
        # imaps still reading: their input ends here, with *error* -- their feeder may be
        # blocked in the caller's generator for good -- and what it reads after is dropped
        for job in self._feeding:
            self._fail_job(job, error)  # (what it staged too: failed, not dropped)
            job.cut = True
            self._input_end(job, error)
        self._stop_feeders(self._feeding)
        self._feeding.clear()
        self._take_inbox()
        pending, self._pending = self._pending, deque()
        for item in pending:
            if isinstance(item, Task):
                if item.state == _PENDING:
                    item.state = _DONE
                    self._fail(item, error)
            else:
                self._fail_job(item, error)
        for w in self._workers.values():
            for task in w.inflight.values():  # (one cancel(force=True) stopped: as promised)
                self._fail(task, CancelledError() if task.cancel_requested else error)
            w.inflight.clear()

    def _fail_job(self, job: MapJob, error: BaseException) -> None:
        left = job.available()
        if left:
            task = Task.unsent(job.sink, job.label, job.kind, job, job.next_index, left)
            job.next_index += left
            job.buf, job.pos, job.stop = [], 0, None
            self._fail(task, error)

    # ------------------------------------------------------------------ timers
    def _add_timer(self, delay: float, kind: str, what: Any) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), kind, what))
        if threading.current_thread() is not self._thread:
            self._wake()  # the I/O thread may be asleep with a later deadline

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, what = heapq.heappop(self._timers)
            if kind == "hard":
                task, w, attempt, sent, extended = what
                if task.state == _SENT and task.attempts == attempt and task.worker is w:
                    due, extended = self._hard_deadline(task, sent, extended, now)
                    if due > now:
                        self._add_timer(due - now, "hard", (task, w, attempt, sent, extended))
                    else:
                        task.timed_out = True
                        self._kill(task.worker)
            elif kind == "exit":
                if what.wid in self._workers:
                    self._kill(what, deliberate=False)  # (it closed its channel, or was told to go)
            elif kind == "spawn":
                self._spawn_armed = False
                while self._needs_workers() and not self._spawn_armed and self._broken is None:
                    self._replace()
            elif kind == "trim":
                self._trim_armed = False
                self._buffers.trim()
            elif kind == "poll":  # a feeder reading a run: has it staged anything?
                what.polled = False
                if what.bulk and not what.staged and what in self._feeding and not what.queued:
                    what.poll_delay = min(2 * what.poll_delay, FEED_POLL_MAX)
                    self._poll_feeder(what)  # (blocked inside the run: look less often)
                # (if it has, the loop queues its job again)
            # ("hold": an imap's partial chunk may go now; the dispatch after timers sends it)

    def _hard_deadline(
        self, task: Task, sent: float, extended: bool, now: float
    ) -> tuple[float, bool]:
        """When the worker running *task* (a call or a chunk with a time limit, sent at *sent*)
        is to be killed, and whether the one extension for a result on its way is used.

        ``grace`` seconds after the limit of the item it runs now, counted from that item's
        start, which the worker writes into its progress slot (one monotonic clock for every
        process): a chunk is not killed for its total time, and the item blamed is the one
        that overran.  A chunk still being unpickled has the whole chunk's budget from its
        sending, as before items are timed; a task not started one limit after its sending
        (the worker is stopped or hogged) is killed, as is one that finished but whose result
        has not come ``grace`` seconds later.  A worker still starting up (its initializer, the
        main script) is waited for: tasks are sent before it is ready."""
        running, done, _, started = task.worker.read_progress()
        if running == task.id:
            if started:
                return started + task.timeout + self._grace, extended
            return sent + task.timeout * task.n_items + self._grace, extended
        if done == task.id and not extended:  # finished: its result is on the way
            return now + self._grace, True
        if not task.worker.ready:  # still starting (initializer, main script): wait for it
            return now + task.timeout + self._grace, extended
        return now, extended

    # ------------------------------------------------------------------ shutdown
    def _progress_shutdown(self) -> bool:
        """Advance close()/terminate(); return True when the I/O thread may stop."""
        if self._state == RUNNING and self._broken is None:
            return False
        if self._state == TERMINATING or self._broken is not None:
            if not self._killed_all:
                self._killed_all = True
                self._kill_all()
                if self._state == TERMINATING:
                    self._fail_everything(PoolTerminated("the pool was terminated"))
            if self._state == RUNNING:  # broken but still open: keep failing new submissions
                return False
            return not self._workers
        # CLOSING: let the work finish, then ask every worker to exit
        if self._has_work():
            return False
        for w in self._workers.values():
            if not w.exit_sent:
                self._send_exit(w)
        return not self._workers


def _close_internal(fd: int) -> None:
    INTERNAL_FDS.discard(fd)
    os.close(fd)


def _after_fork_in_child() -> None:
    for sched in list(_live):
        sched._state = FINISHED  # the I/O thread does not exist here
        sched._wake_lock = threading.RLock()  # (a thread of the parent may have held it)
        sched._returns = None  # (results the child drops owe the workers nothing: pinned)
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
