"""The worker's main loop: runs in the child process, talks to the parent over one Channel.

    INIT ──► run the initializer ──► READY (or INIT_FAILED and exit)
    loop:  FUNC  ──► remember the function under its id
           MAP   ──► map a shared-memory region, found under its key by the tasks that name it
           FORGET ─► drop those regions
           TASKS ──► run each record in order; results are buffered and flushed when the batch
                     is done, every ~0.2 ms while it runs, before a task of another
                     function, or when the buffer grows large
           EXIT  ──► flush and return 0
    EOF on the channel (the parent is gone) ──► return at once

A task's exception is carried back as an *error tuple* ``(exception pickle or None, type name,
message, traceback text)``: the caller re-raises the same exception type with the traceback as
``__cause__``; if the exception cannot make the trip, the texts still can (``RemoteError``).
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import sys
import time
from itertools import count as _count
from multiprocessing import process

from . import _express, _mapping, _serialize
from . import _protocol as P
from ._buffers import TRIM_AFTER, BufferCache
from ._channel import Channel, ChannelClosed, Spin
from ._errinfo import error_info
from .errors import SerializationError, TaskTimeout

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

FLUSH_INTERVAL = 2e-4  # seconds of work after which buffered results are sent anyway (0.2 ms)
FLUSH_BYTES = 256 * 1024
FLUSH_COUNT = 32  # small results buffered at most: what a worker's death loses (see run_calls)
REPLY_SPIN = 1e-4  # seconds a worker polls without sleeping after a lone call (see serve)
FUNC_CACHE = 1024  # the parent mirrors this FIFO (see _scheduler)
RESULT_SEGMENTS = 64  # result segments a worker keeps, lent or free (each holds a descriptor)
PARENT = 0  # the holder of a lent result segment (see _buffers.BufferCache.hold)
PLAIN = _serialize.PLAIN
#: result types buffered as they are and sent as one VALUES record (small, fixed size)
SCALARS = frozenset({int, float, bool, type(None), complex})


class _Pickled:
    """A function as it arrived (FUNC frame), not yet unpickled."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob


class _SoftTimeout:
    """Arms SIGALRM around one task that has a timeout; leaves SIGALRM alone otherwise."""

    def __init__(self) -> None:
        self.active = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.active:
            self.active = False
            raise TaskTimeout("task exceeded its time limit")

    def arm(self, seconds: float) -> Any:
        previous = signal.signal(signal.SIGALRM, self._handler)
        self.active = True
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        except BaseException:  # (the parent sends nothing setitimer refuses: see MAX_TIMEOUT)
            self.disarm(previous)
            raise
        return previous

    def disarm(self, previous: Any) -> None:
        self.active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Worker:
    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.funcs: dict[int, Any] = {}
        self.out = bytearray()
        # consecutive small scalar results, not yet packed (see add_result)
        self.scalar_ids: list[int] = []
        self.scalars: list[Any] = []
        self.scalar_time = 0.0
        self.out_fds: list[int] = []
        self.last_flush = time.perf_counter()
        self.alarm = _SoftTimeout()
        self.max_memory = 0
        self.spin_allowed: bool | None = None
        self.retiring = False
        # the progress slot: given by main() (fork), or replaced by the one INIT brings
        self.progress: Any = bytearray(P.PROGRESS_SIZE)
        self.last_done = 0
        # inodes of argument buffers unmapped since the last flush (appended by finalizers)
        self.released: list[int] = []
        _mapping.on_release = self.released.append
        # buffers mapped when a task forks: the child may read them for as long as it lives,
        # after we unmap ours, so the parent must never rewrite them (PINNED)
        self.pinned: list[int] = []
        # set in a child a task forks (see failure): it must never act as this worker
        self.task_child = False
        self.chunk_rest: Iterator[Any] = iter(())  # the items of the chunk running, left
        # segments our large results travel in, reused once the parent unmaps them (see
        # _buffers); made at the first such result, with the free bytes INIT allows
        self.results: BufferCache | None = None
        self.results_bytes = 0
        self.trim_at = 0.0  # when free result segments are next looked at between frames
        # apply's express lane (see _express), when the slot is one the parent mapped
        self.box: _express.WorkerSide | None = None
        self.setup_read = 0  # FUNC, MAP and FORGET frames read (see _express.PoolSide.setup_read)
        os.register_at_fork(before=self._pin_mapped, after_in_child=self._in_task_child)

    # ---------------------------------------------------------------- start-up
    def init(self, body: memoryview, fds: list[int], inherited: Any = None) -> bool:
        """Set up from the INIT frame: *fds* are the progress slot (unless forked) and the
        initializer's arguments' descriptors; *inherited*: a forked worker's initializer and
        its arguments, as the parent holds them."""
        config = pickle.loads(body[P.INIT_HEAD.size :])
        take_identity(config["method"], P.INIT_HEAD.unpack_from(body)[0], config["pool_pid"])
        cut = len(fds) - config.get("init_fds", 0)
        init_fds = fds[cut:]
        if cut:  # the progress slot (see _protocol.PROGRESS)
            self.progress = mmap.mmap(fds[0], P.PROGRESS_SIZE)
            _serialize.Payload(b"", 0, fds[:cut]).close()  # (received fds are registered internal)
        if config.get("sys_path"):
            sys.path[:] = config["sys_path"]
        self.max_memory = config.get("max_memory") or 0
        self.results_bytes = config.get("result_cache", 0)
        self.spin_allowed = config.get("spin")  # (see Spin: the parent asked for us)
        if not self.spin_allowed:  # (the express lane needs a worker that polls)
            self.box = None
        stage = "main script"
        try:
            if config.get("main"):
                from ._start import import_main

                import_main(config["main"])
            stage = "initializer"
            if inherited is not None:
                initializer, initargs = inherited
                initializer(*initargs)
            elif config.get("init"):
                initializer, initargs = _serialize.loads(config["init"], 0, init_fds)
                initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, then we exit
            data = pickle.dumps((self.failure(exc), stage))  # (a child the initializer forked
            self.chan.send_frame(P.frame(P.INIT_FAILED, data))  # exits in failure())
            return False
        if self.task_child:  # a child the initializer forked and left to return: it exits
            _leave_task_child(None)  # (its parent, the worker, says READY)
        self.chan.send_frame(P.frame(P.READY))
        return True

    def _pin_mapped(self) -> None:
        self.pinned.extend(_mapping.mapped)

    def _in_task_child(self) -> None:
        self.task_child = True
        # a chunk's loop the task forked from goes no further in the child: its items are
        # the worker's (the child exits at the end of its own item, see add_result)
        for _ in self.chunk_rest:
            pass

    def failure(self, exc: BaseException) -> tuple:
        """What a task's exception is sent as (see _errinfo) -- unless this is a child the task
        forked, come back into the worker's code with it (``sys.exit()`` in the child, say):
        that child exits, as a ``multiprocessing.Process`` would, leaving the pool's channel to
        the worker."""
        if self.task_child:
            _leave_task_child(exc)
        return error_info(exc)

    # ---------------------------------------------------------------- results
    def flush(self) -> None:
        if self.max_memory and not self.retiring and rss() > self.max_memory:
            self.retiring = True  # said before the results: no new task is sent our way
            self.chan.send_frame(P.frame(P.RETIRE))
        if self.pinned:  # before RELEASED: a pinned buffer must not be freed for reuse
            pinned, self.pinned = self.pinned, []
            self.chan.push(P.frame(P.PINNED, P.pack_inodes(pinned)))
        if self.released:  # before the results: the parent may reuse these buffers at once
            n = len(self.released)
            inodes = self.released[:n]
            del self.released[:n]  # a finalizer may append meanwhile
            self.chan.push(P.frame(P.RELEASED, P.pack_inodes(inodes)))
        if self.scalar_ids:
            self.pack_scalars()
        if self.out:
            fds, self.out_fds = self.out_fds, []
            body, self.out = self.out, bytearray()
            self.chan.send_frame(P.frame(P.RESULTS, body, len(fds)), fds)
        elif self.chan.pending():
            self.chan.send_pending()
        self.last_flush = time.perf_counter()

    def add_result(self, task_id: int, status: int, duration: float, value: Any) -> None:
        if self.task_child:  # a child the task forked, back from the task's function
            _leave_task_child(None)
        if type(value) in SCALARS and status == P.OK:  # (a chunk's value is a list)
            # the commonest tiny result: kept as it is, and those of a batch go together in
            # one VALUES record -- one pickle and one record head instead of one per task
            self.scalar_ids.append(task_id)
            self.scalars.append(value)
            self.scalar_time += duration
            return
        if self.scalar_ids:  # results keep their order
            self.pack_scalars()
        if type(value) in PLAIN:  # a tiny result: no out-of-band machinery
            P.pack_result(self.out, task_id, status, duration, 0, 0, pickle.dumps(value, 5))
            return
        ok = status != P.ERROR  # (an error tuple holds bytes and strings: a plain stream,
        try:  # as the parent reads it)
            payload = _serialize.dumps(value, oob=ok, cache=self.result_cache() if ok else None)
            fds = self.lend(payload) if payload.segments else payload.fds
        except BaseException as exc:  # noqa: BLE001 - even SystemExit from a __reduce__
            status = P.ERROR
            why = exc.__cause__ if isinstance(exc, SerializationError) and exc.__cause__ else exc
            if isinstance(why, OSError) and why.errno is not None:  # (its memfds: EMFILE...)
                text = f"could not be sent: {why.strerror} in the worker"
            else:
                text = f"could not be pickled: {why!r}"
            exc2 = SerializationError(f"the result of the task {text}")
            payload = _serialize.Payload(pickle.dumps(error_info(exc2)))
            fds = []
        nfd = len(fds) - payload.nbuf
        P.pack_result(self.out, task_id, status, duration, payload.nbuf, nfd, payload.data)
        self.out_fds.extend(fds)

    def result_cache(self) -> BufferCache | None:
        cache = self.results
        if cache is None and self.results_bytes:
            cache = self.results = BufferCache(
                self.results_bytes, max_segments=RESULT_SEGMENTS, name="procpool-result"
            )
        return cache

    def lend(self, payload: _serialize.Payload) -> list[int]:
        """The descriptors to send for *payload*, whose large buffers are (some of them) in
        segments of ``self.results``: duplicates of those (the channel closes what it sends),
        each segment held for the parent until it says RELEASED.  On an OSError (out of
        descriptors) the payload is closed and the error raised."""
        from ._start import INTERNAL_FDS

        cache = self.results
        segments = payload.segments or []
        lent = {seg.fd for seg in segments}
        fds: list[int] = []
        try:
            for fd in payload.fds:
                if fd in lent:
                    fd = os.dup(fd)
                    INTERNAL_FDS.add(fd)  # (a pool a task starts: its workers need not)
                fds.append(fd)
        except BaseException:
            for fd in fds:
                if fd not in payload.fds:
                    INTERNAL_FDS.discard(fd)
                    os.close(fd)
            payload.close()
            raise
        assert cache is not None
        cache.hold(segments, PARENT)
        for seg in segments:
            cache.unlend(seg)
        return fds

    def pack_scalars(self) -> None:
        ids, values = self.scalar_ids, self.scalars
        if len(ids) == 1:  # a plain OK record: what apply's reader expects (see _read_reply)
            data = pickle.dumps(values[0], 5)
            P.pack_result(self.out, ids[0], P.OK, self.scalar_time, 0, 0, data)
        else:
            first = ids[0]  # ids that follow one another (a run's, see _tasks.CallRun): the first
            data = pickle.dumps(
                (first if ids == list(range(first, first + len(ids))) else ids, values), 5
            )
            P.pack_result(self.out, first, P.VALUES, self.scalar_time, 0, 0, data)
        self.scalar_ids, self.scalars, self.scalar_time = [], [], 0.0

    # ---------------------------------------------------------------- tasks
    def run_record(self, rec: P.TaskRecord, fds: list[int]) -> None:
        start = time.perf_counter()
        task_id, fid, kind, timeout, nbuf, _, payload = rec
        try:
            func = self.func(fid)
        except BaseException as exc:  # noqa: BLE001
            _mapping.discard_received(nbuf, fds)
            _serialize.Payload(b"", 0, fds).close()
            err = SerializationError(f"the task's function could not be loaded: {exc!r}")
            self.add_result(task_id, P.ERROR, 0.0, error_info(err))
            return
        try:
            data = _serialize.loads(payload, nbuf, fds) if fds else pickle.loads(payload)
            if kind == P.CALL and len(data) != 2:  # (args, kwds, refs): see with_refs
                data = with_refs(*data)
        except BaseException as exc:  # noqa: BLE001
            err = SerializationError(f"the task's arguments could not be unpickled: {exc!r}")
            self.add_result(task_id, P.ERROR, 0.0, error_info(err))
            return
        if kind == P.CALL:
            previous = self.alarm.arm(timeout) if timeout > 0 else None
            error: BaseException | None = None
            try:
                args, kwds = data
                status, value = P.OK, func(*args, **kwds)
            except BaseException as exc:  # noqa: BLE001 - SystemExit etc. fail the task only
                error = exc
            finally:
                if previous is not None:
                    self.disarm(previous)
            if error is not None:  # (formatted with the alarm off: it could fire in there)
                status, value = P.ERROR, self.failure(error)
                error = None
        elif timeout > 0:  # a chunk with a time limit: the limit is per item
            status, value = self.run_chunk_timed(func, kind == P.STARMAP, data, timeout)
        else:
            status, value = self.run_chunk(func, kind == P.STARMAP, data)
        self.add_result(task_id, status, time.perf_counter() - start, value)

    def disarm(self, previous: Any) -> None:
        try:
            self.alarm.disarm(previous)
        except TaskTimeout:  # fired in the instant between the task's end and here
            self.alarm.disarm(previous)

    def run_chunk_timed(
        self, func: Any, star: bool, items: list, timeout: float
    ) -> tuple[int, Any]:
        values: list[Any] = []
        errors: dict[int, tuple] = {}
        pack_item = P.PROGRESS_ITEM.pack_into
        self.chunk_rest = rest = enumerate(items)  # (see _in_task_child)
        for i, item in rest:
            # the scheduler's hard limit runs from here, and then fails only this item
            pack_item(self.progress, P.ITEM_OFFSET, i, time.monotonic())
            previous = self.alarm.arm(timeout)
            error: BaseException | None = None
            try:
                values.append(func(*item) if star else func(item))
            except BaseException as exc:  # noqa: BLE001 - one item fails, the others go on
                error = exc
                values.append(None)
            finally:
                self.disarm(previous)
            if error is not None:  # (formatted with the alarm off: it could fire in there)
                errors[i] = self.failure(error)
                error = None
        return (P.CHUNK_PARTIAL, (values, errors)) if errors else (P.OK, values)

    def run_chunk(self, func: Any, star: bool, items: list) -> tuple[int, Any]:
        values: list[Any] = []
        append = values.append
        errors: dict[int, tuple] = {}
        self.chunk_rest = rest = iter(items)  # (see _in_task_child)
        # (A loop in C -- values.extend(map(func, rest)) -- saved ≈ 8 ns an item and was
        # reverted: it takes an item's StopIteration for the end of the chunk, so the item's
        # own exception was lost, and a signal handler's exception raised once the C loop
        # had ended fell after the last item.)
        while True:
            try:  # the fast loop; after a failure it resumes with the next item
                if star:
                    for args in rest:
                        append(func(*args))
                else:
                    for item in rest:
                        append(func(item))
                break
            except BaseException as exc:  # noqa: BLE001 - one item fails, the others go on
                errors[len(values)] = self.failure(exc)
                append(None)
        if errors:
            return P.CHUNK_PARTIAL, (values, errors)
        return P.OK, values

    def run_one(self, body: memoryview) -> bool:
        """Run a TASKS frame of one plain call (``apply``'s): what run_tasks and run_record do
        for it, without their loop, generator and checks.  Return False, having done nothing,
        for anything else: several records, fds, a time limit, a function not yet loaded.
        (True, having done nothing, for the channel copy of a call run from the express lane's
        slot: see _express.)"""
        head = P.TASK_HEAD
        task_id, fid, kind, timeout, nbuf, _, n = head.unpack_from(body)
        if self.box is not None and self.box.channel_copy(task_id):
            return True
        func = self.funcs.get(fid)
        if kind != P.CALL or timeout or nbuf or head.size + n != len(body):
            return False
        if self.out or self.scalar_ids:
            return False
        if func is None or type(func) is _Pickled:
            return False
        self.add_result(task_id, *self.call(func, task_id, body[P.TASK_HEAD.size :]))
        self.flush()
        return True

    def call(self, func: Any, task_id: int, data: memoryview) -> tuple[int, float, Any]:
        """Run one plain call, *data* its pickled ``(args, kwds)``: its status, duration and
        value (or error tuple), for ``add_result``."""
        start = time.perf_counter()
        # running from here: unpickling may run user code that kills the worker (as run_tasks)
        progress = self.progress
        P.PROGRESS.pack_into(progress, 0, task_id, self.last_done, 0, 0.0)
        if progress[P.SKIP_FLAG] and self.skipped(task_id):
            status, value = P.ERROR, self.skip_info()
        else:
            try:
                call = pickle.loads(data)
                args, kwds = call if len(call) == 2 else with_refs(*call)
            except BaseException as exc:  # noqa: BLE001 - as in run_record
                err = SerializationError(f"the task's arguments could not be unpickled: {exc!r}")
                status, value = P.ERROR, error_info(err)
            else:
                try:
                    status, value = P.OK, func(*args, **kwds)
                except BaseException as exc:  # noqa: BLE001 - as in run_record
                    status, value = P.ERROR, self.failure(exc)
        duration = time.perf_counter() - start
        if self.task_child:  # a child the task forked, back from the task's function: it
            _leave_task_child(None)  # exits (the slot is the worker's)
        self.last_done = task_id
        P.PROGRESS.pack_into(progress, 0, 0, task_id, 0, 0.0)
        return status, duration, value

    def run_posted(self) -> None:
        """Run the call posted in the express lane's slot and answer it there -- or by the
        channel too when its caller stopped waiting, or only by the channel when the reply
        is too large or other frames must go first (see _express)."""
        box = self.box
        assert box is not None
        task_id, fid, data = box.request()  # (marked as seen)
        if self.out or self.scalar_ids:  # (never: a linger follows a flush)
            self.flush()
        func = self.funcs.get(fid)
        if func is None or type(func) is _Pickled:
            # running from here (as run_tasks says it): loading runs user code that may kill us
            P.PROGRESS.pack_into(self.progress, 0, task_id, self.last_done, 0, 0.0)
            try:
                func = self.func(fid)
            except BaseException as exc:  # noqa: BLE001 - (never expected: see func)
                err = SerializationError(f"the task's function could not be loaded: {exc!r}")
                func = None
                status, duration, value = P.ERROR, 0.0, error_info(err)
        if func is not None:
            status, duration, value = self.call(func, task_id, data)
        quiet = not (self.pinned or self.released or self.max_memory)  # (see flush)
        if status == P.OK and type(value) in PLAIN and quiet:  # apply's commonest reply
            pickled = pickle.dumps(value, 5)
            if len(pickled) <= _express.VALUE_MAX:
                if not box.answer(task_id, status, duration, pickled):  # its caller has gone
                    body = bytearray()  # (from the slot to the channel)
                    P.pack_result(body, task_id, status, duration, 0, 0, pickled)
                    self.chan.send_frame(P.frame(P.ALSO, body))
                return
        self.add_result(task_id, status, duration, value)
        if self.scalar_ids:
            self.pack_scalars()
        out = self.out
        if len(out) <= _express.REPLY_MAX and not self.out_fds and quiet:
            self.out = bytearray()
            if not box.answer_body(task_id, out):  # its caller has gone: by the channel
                self.chan.send_frame(P.frame(P.ALSO, out))
            return
        self.flush()
        box.answered_by_channel(task_id)

    def after_call(self, spin: Spin) -> None:
        """A lone call ran: its caller may send the next one at once, so poll for it -- the
        express lane's slot and the channel -- for as long as *spin* says polling pays."""
        box = self.box
        chan = self.chan
        if box is None:
            budget = 0.0 if chan.buffered() else spin.take()
            if budget:
                spin.done(budget, chan.spin(budget))
            return
        while True:
            budget = 0.0 if chan.buffered() else spin.take()
            what = box.linger(budget, chan.poller().poll) if budget else box.leave()
            if what == _express.CALL:
                self.run_posted()  # (before the bookkeeping: its caller waits)
            if budget:
                spin.done(budget, what != _express.NOTHING)
            if what != _express.CALL:
                return  # (no longer awake: see _express)

    def skipped(self, task_id: int) -> bool:
        """Whether the pool asked to skip call *task_id*, which starts now (the progress
        slot's SKIP, its flag set): the flag is cleared, the call not run."""
        if P.SKIP.unpack_from(self.progress, P.SKIP_OFFSET)[0] != task_id:
            return False
        self.progress[P.SKIP_FLAG] = 0
        return True

    @staticmethod
    def skip_info() -> tuple:
        from concurrent.futures import CancelledError

        return error_info(CancelledError("skipped: cancel(force=True) before it started"))

    def run_calls(self, rec: P.TaskRecord) -> None:
        """A CALLS record: plain calls to one function, each a task of its own -- its progress
        slot, its result, the flush checks after it -- as run_tasks runs single records."""
        pack_progress, progress = P.PROGRESS.pack_into, self.progress
        perf = time.perf_counter
        # the first one runs from here (the record's id): loading may crash this process
        pack_progress(progress, 0, rec[0], self.last_done, 0, 0.0)
        ids, argss = pickle.loads(rec[6])  # (plain values the parent pickled: no user code)
        if type(ids) is int:  # the first of ids that follow one another
            ids = range(ids, ids + len(argss))
        fid = rec[1]
        try:
            func = self.func(fid)
        except BaseException as exc:  # noqa: BLE001 - as in run_record
            err = SerializationError(f"the task's function could not be loaded: {exc!r}")
            for task_id in ids:
                self.add_result(task_id, P.ERROR, 0.0, error_info(err))
            self.last_done = ids[-1]
            pack_progress(progress, 0, 0, ids[-1], 0, 0.0)
            return
        # its unpickling failed (still pickled: see func): that fails the first call alone,
        # and each call after it tries again, as the task of its own it is
        again = type(self.funcs.get(fid)) is _Pickled
        first = ids[0]
        for task_id, args in zip(ids, argss, strict=True):
            start = perf()
            pack_progress(progress, 0, task_id, self.last_done, 0, 0.0)
            if progress[P.SKIP_FLAG] and self.skipped(task_id):
                status, value = P.ERROR, self.skip_info()
            else:
                try:
                    if again and task_id != first:  # (running: a crash counts against it)
                        func = self.func(fid)
                        again = type(self.funcs.get(fid)) is _Pickled
                    status, value = P.OK, func(*args)
                except BaseException as exc:  # noqa: BLE001 - as in run_record
                    status, value = P.ERROR, self.failure(exc)
            now = perf()
            self.add_result(task_id, status, now - start, value)
            self.last_done = task_id
            pack_progress(progress, 0, 0, task_id, 0, 0.0)
            # a time bound, and a count bound: these tasks take well under a microsecond
            # each, and results still buffered die with the worker (result_lost)
            if now - self.last_flush > FLUSH_INTERVAL or len(self.scalar_ids) >= FLUSH_COUNT:
                self.flush()
            elif len(self.out) > FLUSH_BYTES:
                self.flush()

    def run_tasks(self, body: memoryview, fds: list[int]) -> None:
        mine: list[int] = []
        pack_progress = P.PROGRESS.pack_into
        fid = 0
        for rec in P.iter_tasks(body):
            if fds:
                nfds = rec[4] + rec[5]
                mine, fds = fds[:nfds], fds[nfds:]
            if rec[1] != fid:
                # Another function: its cost may be nothing like the last one's (the parent's
                # batching estimate is one for the pool), so the results buffered so far go
                # now -- not after a slow task that follows them, nor die with its worker.
                if self.out or self.scalar_ids:
                    self.flush()
                fid = rec[1]
            if rec[2] == P.CALLS:
                self.run_calls(rec)
                continue
            task_id = rec[0]
            # a call with a time limit: its hard limit counts from here (a chunk's, from each
            # item's start: see run_chunk_timed)
            started = time.monotonic() if rec[3] and rec[2] == P.CALL else 0.0
            pack_progress(self.progress, 0, task_id, self.last_done, 0, started)
            if self.progress[P.SKIP_FLAG] and rec[2] == P.CALL and self.skipped(task_id):
                _mapping.discard_received(rec[4], mine)
                _serialize.Payload(b"", 0, mine).close()
                self.add_result(task_id, P.ERROR, 0.0, self.skip_info())
            else:
                self.run_record(rec, mine)
            self.last_done = task_id
            pack_progress(self.progress, 0, 0, task_id, 0, 0.0)
            mine = []
            if (
                len(self.out) > FLUSH_BYTES
                or time.perf_counter() - self.last_flush > FLUSH_INTERVAL
            ):
                self.flush()
        self.flush()

    # ---------------------------------------------------------------- loop
    def serve(self, inherited: Any = None) -> int:
        chan = self.chan
        try:
            kind, body, fds = chan.recv_frame()
            if kind != P.INIT or not self.init(body, fds, inherited):
                return 1
            spin = Spin(REPLY_SPIN, self.spin_allowed)
            while True:
                if self.results is not None and self.results.free_bytes:
                    self.trim_while_idle()
                kind, body, fds = chan.recv_frame()
                if kind == P.TASKS:
                    if fds or len(body) < P.TASK_HEAD.size or not self.run_one(body):
                        self.run_tasks(body, fds)
                    else:  # apply's: its caller may send the next call at once
                        self.after_call(spin)
                elif kind == P.FUNC:
                    (fid,) = P.FUNC_HEAD.unpack_from(body)
                    self.load_func(fid, body[P.FUNC_HEAD.size :])
                    self.count_setup()
                elif kind == P.MAP or kind == P.FORGET:
                    self.map_regions(kind, body, fds)
                    self.count_setup()
                elif kind == P.RELEASED or kind == P.PINNED:
                    self.given_back(kind, body)
                elif kind == P.EXIT:
                    self.flush()
                    return 0
        except (ChannelClosed, BrokenPipeError, ConnectionResetError):
            return 0  # the parent is gone: nothing to report to

    def given_back(self, kind: int, body: memoryview) -> None:
        """A RELEASED or PINNED frame: the parent unmapped these result segments (reuse
        them), or forked while it mapped them (never reuse them)."""
        cache = self.results
        if cache is not None:
            if kind == P.RELEASED:
                cache.released(PARENT, P.unpack_inodes(body))
            else:
                cache.pin(P.unpack_inodes(body))

    def trim_while_idle(self) -> None:
        """Before waiting for the next frame while result segments lie free: close those
        unused for ``TRIM_AFTER`` seconds -- looked at every ``TRIM_AFTER`` seconds between
        frames (a stream of small tasks), and when no frame comes for that long (an idle
        worker gives their memory back)."""
        cache = self.results
        assert cache is not None
        now = time.monotonic()
        if now >= self.trim_at:
            self.trim_at = now + TRIM_AFTER
            cache.trim()
        while cache.free_bytes and not self.chan.wait(TRIM_AFTER):
            cache.trim()

    def count_setup(self) -> None:
        """A FUNC, MAP or FORGET frame was read: count it in the slot (a call may go by the
        express lane only once every such frame sent before it is read: see _express)."""
        self.setup_read += 1
        if self.box is not None:
            self.box.read_setup(self.setup_read)

    def map_regions(self, kind: int, body: memoryview, fds: list[int]) -> None:
        """A MAP or FORGET frame (see _ipc_mem.remember): imported here, on the first one, as
        a worker that is never passed shared memory must not carry the module."""
        from . import _ipc_mem
        from ._start import INTERNAL_FDS

        if kind == P.MAP:
            (key,) = P.MAP_HEAD.unpack_from(body)
            text = bytes(body[P.MAP_HEAD.size :]).decode()
            if not fds:  # the parent could not send it: the tasks naming it say why
                _ipc_mem.unsent(key, text)
                return
            name = text or None
            fd = fds[0]
            # no longer the channel's: the region's, which a pool this worker's task starts
            # inherits as any shared object of the task's (the channel closes its own in them)
            INTERNAL_FDS.discard(fd)
            _ipc_mem.remember(key, fd, name)
            _serialize.Payload(b"", 0, fds[1:]).close()  # (never more than one)
        else:
            _ipc_mem.forget(P.unpack_keys(body))

    def load_func(self, fid: int, blob: memoryview) -> None:
        # Kept pickled until a task uses it: unpickling runs user code (imports, __setstate__)
        # that may crash the process, and it must then count against that task, which the
        # progress slot already names as running -- not against tasks that never started.
        self.funcs[fid] = _Pickled(bytes(blob))
        if len(self.funcs) > FUNC_CACHE:  # FIFO, mirrored by the parent
            del self.funcs[next(iter(self.funcs))]

    def func(self, fid: int) -> Any:
        func = self.funcs.get(fid)
        if func is None:  # never expected: the parent mirrors our cache (see _dispatch._send)
            raise SerializationError(f"function {fid} is not known to this worker")
        if type(func) is _Pickled:
            try:
                func = pickle.loads(func.blob)
            except BaseException as exc:  # noqa: BLE001 - every call of this task will say why
                # Not kept: the next task tries again.  A signal handler's exception, or an
                # import that failed for the moment, may have cut short an unpickling that
                # would succeed, and a stand-in kept here failed every later task for good.
                def failed(*args: Any, _exc: BaseException = exc, **kwds: Any) -> Any:
                    raise SerializationError(
                        f"the task's function could not be unpickled: {_exc!r}"
                    ) from _exc

                return failed
            self.funcs[fid] = func
        return func


_from_ref: Any = None  # procpool.shared.from_ref, imported on first use (see with_refs)


def with_refs(args: list, kwds: dict, refs: list) -> tuple[list, dict]:
    """A call's arguments as ``_serialize.dumps_refs`` sent them: each ``(index, key, ...)``
    of *refs* is the SharedArray at ``args[index]``, its region mapped here by key (MAP)."""
    global _from_ref
    from_ref = _from_ref
    if from_ref is None:  # (a worker never passed one does without the module)
        from .shared import from_ref

        _from_ref = from_ref
    for i, key, shape, dtype, name in refs:
        args[i] = from_ref(key, shape, dtype, name)
    return args, kwds


def rss() -> int:
    """This process's own resident memory in bytes: its resident set less the pages it shares
    through files and shared memory (statm's ``shared``) -- the SharedArrays and argument
    buffers it maps are not its memory, nor are they freed by replacing it."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def batch_scheduling(pid: int) -> None:
    """Put process *pid* (0: this one) under SCHED_BATCH: a worker woken by a new task then
    does not preempt the parent on its CPU, so the parent's send returns at once instead of
    after the task (measured: the sendmsg of an `apply` fell from ~34 us to ~4 us on the
    2-core machine).  A forked worker gets it from the parent (see ForkLauncher.start): the
    call's libc code is then not paged into every worker."""
    try:
        os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux (or the worker is gone)
        pass


def _leave_task_child(exc: BaseException | None) -> None:
    """End a child a task forked that came back into the worker's code: with the exit code of
    its ``SystemExit``, or 1 (its traceback printed) for another exception, or 0."""
    code = 0
    try:
        if isinstance(exc, SystemExit):
            if isinstance(exc.code, int):
                code = exc.code
            elif exc.code is not None:  # sys.exit("message")
                print(exc.code, file=sys.stderr)
                code = 1
        elif exc is not None:
            import traceback

            traceback.print_exception(exc)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code)


_WORKER_NAMES = {
    "fork": "ForkPoolWorker-",
    "spawn": "SpawnPoolWorker-",
    "forkserver": "ForkServerPoolWorker-",
}


class _Parent(process._ParentProcess):  # type: ignore[name-defined,misc]
    """``parent_process()`` in a worker: the pool's process.  Its sentinel, a pidfd, is opened
    when first used: opening it in every worker pages in ≈ 64 kB more of the interpreter."""

    def __init__(self, name: str, pid: int) -> None:  # (_ParentProcess's, with no sentinel)
        self._identity = ()
        self._name = name
        self._pid = pid
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._sentinel: int | None = None
        self._config: dict = {}

    def _open(self) -> int:
        sentinel = self._sentinel
        if sentinel is None:
            from ._start import INTERNAL_FDS

            sentinel = self._sentinel = os.pidfd_open(self._pid)
            INTERNAL_FDS.add(sentinel)  # (a pool a task starts: its workers need not)
        return sentinel

    @property
    def sentinel(self) -> Any:
        return self._open()

    def is_alive(self) -> bool:
        self._open()
        return super().is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._open()
        super().join(timeout)


#: the counter of a worker's children, made here (at import, in the parent: a forked worker
#: inherits it unused) rather than in take_identity, where making it pages in ≈ 64 kB
_CHILDREN = _count(1)


def take_identity(method: str, number: int, pool_pid: int) -> None:
    """Be what :mod:`multiprocessing` says its pool workers are: ``current_process()`` named
    ``ForkPoolWorker-<number>`` (or ``SpawnPoolWorker``...), ``parent_process()`` the pool's
    process, no children yet -- not the parent's ``MainProcess`` and its children, which a
    forked worker inherits and a script's ``current_process().name == "MainProcess"`` guard
    tests.  (Not daemonic, unlike multiprocessing's: a task may start processes and pools.)"""
    # (plain statements, no f-string, no set or counter made, no multiprocessing code run:
    # each cold path of the interpreter an idle worker first runs pages in ≈ 64 kB)
    me = process.current_process()
    parent_pid, parent_name = pool_pid, me._name  # type: ignore[attr-defined]
    me._name = _WORKER_NAMES[method] + str(number)  # type: ignore[attr-defined]
    me._identity = (number,)  # type: ignore[attr-defined]  # (children: Process-<number>:k)
    me._parent_pid = parent_pid  # type: ignore[attr-defined]
    me._parent_name = parent_name  # type: ignore[attr-defined]
    process._parent_process = _Parent(parent_name, parent_pid)  # type: ignore[attr-defined]
    process._children.clear()  # type: ignore[attr-defined]  # (a forked worker's: the parent's)
    process._process_counter = _CHILDREN  # type: ignore[attr-defined]  # (Process-N:1, N:2...)


def main(sock: socket.socket, batch: bool = True, progress: Any = None, init: Any = None) -> int:
    """Serve the pool on *sock* until told to exit or the parent goes away (*batch*: put this
    process under SCHED_BATCH first, unless the parent did; *progress*: the progress slot,
    when the parent mapped it before forking us -- otherwise it comes with INIT; *init*: the
    initializer and its arguments, inherited from the parent that forked us)."""
    sock.setblocking(True)
    from ._start import INTERNAL_FDS

    INTERNAL_FDS.add(sock.fileno())  # a pool created inside a task must not inherit it
    if batch:
        batch_scheduling(0)
    worker = Worker(Channel(sock))
    if progress is not None:
        worker.progress = progress
        if _express.AVAILABLE and len(progress) >= _express.SLOT_SIZE:
            worker.box = _express.WorkerSide(progress)
    code = worker.serve(init)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def spawn_main() -> None:
    """Entry point of a worker started with the ``spawn`` method (fd 3 is its socket)."""
    from ._start import child_setup, die_with_parent, ignore_sigint

    die_with_parent(int(os.environ.pop("PROCPOOL_PARENT_PID", "0")) or os.getppid())
    child_setup(3)
    ignore_sigint()
    os._exit(main(socket.socket(fileno=3)))
