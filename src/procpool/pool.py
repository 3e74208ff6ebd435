"""Pool and ProcessPoolExecutor: what the caller sees.

:class:`Pool` has the surface and semantics of :class:`multiprocessing.pool.Pool` (``apply``,
``apply_async``, ``map``, ``imap``, ``starmap``, ``close``, ``join``, ``terminate``, context
manager) and is also a :class:`concurrent.futures.Executor` (``submit``, ``shutdown``).
:class:`ProcessPoolExecutor` is a drop-in for the standard one on the same engine.  Extras are
keyword-only arguments with safe defaults: ``start_method``, ``timeout``, ``retries``,
``retry_on``, ``max_memory_per_child``.

All the work happens in :mod:`procpool._scheduler`; this module validates arguments and wraps
results.  The map family and the context manager, which :class:`Pool` shares with the other
backends' pools, are written once in :mod:`procpool._api` (:class:`~procpool._api.PoolAPI`).
"""

from __future__ import annotations

import concurrent.futures
import operator
import os
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

from ._api import PoolAPI, check_chunksize, check_timeout, default_processes
from ._scheduler import Scheduler
from ._start import check_not_importing_main, make_launcher
from ._supervise import RUNNING, TERMINATING
from .errors import TimeoutError as PoolTimeoutError  # multiprocessing.TimeoutError
from .results import AsyncResult, Future, IMapIterator, MapResult, WeakSink

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")


__all__ = ["Pool", "ProcessPoolExecutor"]


def _check_retries(retries: Any) -> int:
    if type(retries) is not int or retries < 0:  # (not a bool either)
        raise ValueError(f"retries must be a non-negative int, not {retries!r}")
    return retries


def _check_memory_limit(limit: Any) -> int | None:
    """*max_memory_per_child* as an int of bytes, or None (also for ``inf``).  A str ("2GB")
    was taken, and every worker died after its first task, its result lost."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not (hasattr(limit, "__index__") or isinstance(limit, float)):
        raise TypeError(
            f"max_memory_per_child must be a number of bytes or None, not {type(limit).__name__}"
        )
    if not limit >= 1:  # (NaN too)
        raise ValueError(f"max_memory_per_child must be at least 1 byte, not {limit!r}")
    return None if limit == float("inf") else int(limit)


def _start_method(start_method: str | None, context: Any) -> str | None:
    if start_method is None and context is not None:
        return context.get_start_method()
    return start_method


class Pool(PoolAPI):
    """A pool of worker processes that does not hang, leak or lose work.

    ``Pool(processes)`` starts *processes* workers (default: the CPUs this process may use).
    Tasks go in with :meth:`apply_async`, :meth:`map` and friends exactly as with
    :class:`multiprocessing.Pool`; :meth:`close` then :meth:`join` wait for them to finish.
    Without a *chunksize*, :meth:`map`, :meth:`imap` and friends pick an adaptive one (a few
    milliseconds of work per chunk).

    What is different: a worker that dies (SIGKILL, segfault, ``os._exit``, OOM) fails only the
    task(s) it held with :class:`~procpool.WorkerLostError` and is replaced; ``timeout`` gives
    every task a time limit (``TaskTimeout`` is raised inside it, and the worker is killed if it
    does not stop within ``grace`` seconds); ``retries`` re-runs tasks lost to a dead worker
    (and to the exception types in ``retry_on``); lambdas and closures work as tasks; workers
    exit when the parent dies.

    It is also a :class:`concurrent.futures.Executor` (:meth:`submit`, :meth:`shutdown`), but
    :meth:`map` and ``with`` keep :mod:`multiprocessing`'s meaning (``map(func, iterable,
    chunksize)``; leaving the block terminates the pool): for an Executor's ``map(fn,
    *iterables, timeout=)`` and a ``with`` that waits, use :class:`ProcessPoolExecutor`.

    Example::

        with Pool(4) as pool:
            r = pool.apply_async(pow, (2, 10))
            print(r.get(timeout=5))          # 1024
            print(pool.map(abs, [-1, -2]))   # [1, 2]

    Args:
        processes: number of workers.
        initializer: called as ``initializer(*initargs)`` in each worker when it starts.  If it
            raises, the pool is broken: every task fails with ``InitializerError``.
        maxtasksperchild: a worker is replaced after this many tasks (a map chunk counts as one).
        context: a ``multiprocessing`` context; only its start method is used.
        start_method: ``"fork"`` (default), ``"forkserver"`` or ``"spawn"`` (see
            ``docs/architecture.md`` for the choice).
        timeout: default time limit in seconds for each task (None: none).
        retries: how many times a task lost to a worker's death is run again.
        retry_on: exception types that also trigger a retry.
        max_memory_per_child: a worker whose own memory (its resident set, less the shared
            memory and files it maps) exceeds this many bytes after a batch is replaced once
            its tasks are done.
        grace: seconds between the soft timeout (``TaskTimeout`` raised in the task) and the
            hard one (the worker is killed).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        start_method: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (),
        max_memory_per_child: int | None = None,
        grace: float = 1.0,
    ) -> None:
        check_not_importing_main()
        if processes is None:
            processes = default_processes()
        processes = operator.index(processes)  # (numpy's integers too; TypeError for a float)
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None:
            # (numpy's integers too; a float or a string is a ValueError, as multiprocessing's)
            try:
                maxtasksperchild = operator.index(maxtasksperchild)
            except TypeError:
                maxtasksperchild = 0
            if maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        limit = check_timeout(timeout)
        _check_retries(retries)
        max_memory_per_child = _check_memory_limit(max_memory_per_child)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < 1e9:
            raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")
        grace = float(grace)
        launcher = make_launcher(_start_method(start_method, context))
        self._timeout = limit
        self._retries = retries
        self._retry_on = tuple(retry_on)
        try:
            self._sched = Scheduler(
                processes,
                launcher,
                initializer,
                tuple(initargs),
                maxtasksperchild,
                max_memory_per_child,
                grace,
            )
        except BaseException:  # (initargs that cannot go, say): no fork server left behind
            launcher.close()
            raise
        # a pool dropped without close() or still alive at exit is terminated, not leaked --
        # also one whose start a Ctrl-C cuts (set before the I/O thread starts)
        self._finalizer = weakref.finalize(self, self._sched.terminate)
        try:
            self._sched.start()
            self._sched.wait_started()
        except BaseException:  # a Ctrl-C, a worker that could not start: no pool to warn
            self.terminate()  # about (see __del__), and nothing left running meanwhile
            raise
        self._unclosed = True  # until close(), terminate() or shutdown() (see __del__)

    # ---------------------------------------------------------------- introspection
    @property
    def processes(self) -> int:
        """The number of worker processes the pool keeps."""
        return self._sched.processes

    # what scripts written for multiprocessing read of its Pool
    @property
    def _processes(self) -> int:
        return self._sched.processes

    @property
    def _state(self) -> str:
        """``"RUN"``, ``"CLOSE"`` or ``"TERMINATE"``, as :mod:`multiprocessing`'s (once its
        workers are gone, ``"CLOSE"`` however the pool ended)."""
        return _MP_STATES.get(self._sched.state, "CLOSE")

    def __reduce__(self) -> Any:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled"
        )  # (multiprocessing's words)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # dropped while running: terminated (see _finalizer), and said, as multiprocessing does
        # -- but without source=self: a recorded warning (catch_warnings(record=True), pytest)
        # would keep the pool alive, and its finalizer, the only thing that stops its workers,
        # would never run.  A flag, not the pool's state: collected in a reference cycle, the
        # finalizer has already terminated it (the collector runs weakref callbacks first)
        if self.__dict__.get("_unclosed"):  # (not when __init__ raised)
            _warn(f"unclosed running procpool pool {self!r}", ResourceWarning)

    @property
    def start_method(self) -> str:
        return self._sched._launcher.method

    def pids(self) -> list[int]:
        """The pids of the live workers (they change as workers are replaced)."""
        return self._sched.worker_pids()

    def signal_workers(self, signum: int) -> list[int]:
        """Send signal *signum* to every live worker; return the pids signalled.  Raises
        ``ValueError`` for a number that is no signal (``os.kill``'s ``EINVAL``), before any."""
        signum = operator.index(signum)
        if signum != 0 and signum not in signal.valid_signals():
            raise ValueError(f"signal number {signum} out of range")
        return self._sched.signal_workers(signum)

    # ---------------------------------------------------------------- one task
    def apply(
        self, func: Callable[..., T], args: Iterable[Any] = (), kwds: dict | None = None
    ) -> T:
        """Run ``func(*args, **kwds)`` in a worker and return its result (blocking)."""
        result: AsyncResult[T] = AsyncResult()
        sched = self._sched
        try:
            task = None
            if not kwds and self._timeout is None and type(args) is tuple:
                task = sched.call(func, args, result, self._retries, self._retry_on)
            if task is None:
                task = sched.submit_call(
                    func,
                    tuple(args),
                    dict(kwds) if kwds else {},
                    result,
                    timeout=self._timeout,
                    retries=self._retries,
                    retry_on=self._retry_on,
                    claim=True,
                )
            if not result._done:
                result._sched, result._task = sched, task
                data = sched.drive(task, result, None, direct=True)  # releases the claim
                if data is not None:  # the reply came to this thread, as a plain value
                    # (never delivered to the result: the links _set would drop, dropped
                    # here -- else each call left a task-result cycle for the collector, whose
                    # passes then took ≈ 140 µs out of an apply every few hundred calls)
                    result._sched = result._task = None
                    return sched.reply_value(task, data)
        except BaseException:  # a Ctrl-C before drive took the claim over: release it
            sched.unclaim(result)
            raise
        return result.get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> AsyncResult[T]:
        """Queue ``func(*args, **kwds)``; return an :class:`AsyncResult` (``.get(timeout)``).

        *callback* / *error_callback* run with the result / exception in the thread that
        delivers it (the pool's I/O thread, or a caller's thread waiting on a result),
        as in :mod:`multiprocessing`; keep them short.  *timeout* (seconds) limits the task's
        run time (default: the pool's).  Raises ``ValueError`` if the pool is closed.
        """
        result: AsyncResult[T] = AsyncResult(callback, error_callback)
        result._pool = self  # before it can complete (which drops it): see AsyncResult._pool
        sched = self._sched
        if timeout is None and retries is None and not kwds and self._timeout is None:
            if type(args) is tuple:
                if sched.call_async(func, args, result, self._retries, self._retry_on):
                    return result  # queued: the scheduler links it to its task
        task = sched.submit_call(
            func,
            args if type(args) is tuple else tuple(args),
            dict(kwds) if kwds else {},
            result,
            timeout=self._timeout if timeout is None else self._task_timeout(timeout),
            retries=self._retries if retries is None else _check_retries(retries),
            retry_on=self._retry_on,
        )
        if not result._done:
            result._sched, result._task = sched, task
            if result._done:  # it completed in between (sent inline, read by the I/O thread)
                result._sched = result._task = None  # as _on_result leaves it: no references
        return result

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; return a :class:`concurrent.futures.Future`.

        The pool's ``timeout``/``retries`` apply (``kwargs`` all go to *fn*; for a per-call
        limit use :meth:`schedule`).  Raises ``RuntimeError`` after :meth:`shutdown`/:meth:`close`,
        as executors do.
        """
        return self._future_call(fn, args, kwargs, self._timeout, self._retries)

    def schedule(
        self,
        fn: Callable[..., T],
        args: Iterable[Any] = (),
        kwargs: dict | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Future[T]:
        """Like :meth:`submit`, with a time limit (seconds) and retries for this call only.

        ``pool.schedule(f, (1, 2), timeout=5).result()``: at the limit ``TaskTimeout`` is raised
        inside the task and the future fails with :class:`~procpool.TaskTimeoutError`.
        """
        limit = self._task_timeout(timeout)  # a bad timeout is a ValueError of its own
        retries = self._retries if retries is None else _check_retries(retries)
        return self._future_call(fn, tuple(args), kwargs, limit, retries)

    def _future_call(
        self,
        fn: Callable[..., T],
        args: tuple,
        kwargs: dict | None,
        timeout: float | None,
        retries: int,
    ) -> Future[T]:
        """submit's and schedule's: queue the call with a Future as its sink."""
        future: Future[T] = Future()
        future._pool = self  # until its result is in
        sched = self._sched
        if timeout is None and not kwargs and type(args) is tuple:
            if sched.call_async(fn, args, future, retries, self._retry_on):
                return future  # queued: the scheduler links it to its task
        try:
            task = sched.submit_call(
                fn,
                args,
                dict(kwargs) if kwargs else {},
                future,
                timeout=timeout,
                retries=retries,
                retry_on=self._retry_on,
            )
        except ValueError:
            raise RuntimeError("cannot schedule new futures after shutdown") from None
        if future._pool is not None:  # (not in yet: see Future._sched)
            future._sched, future._task = sched, task
            if future._pool is None:  # it came in meanwhile: as _resolve leaves it
                future._sched = future._task = None
        return future

    # ---------------------------------------------------------------- many tasks
    def _map_async(
        self, func, iterable, chunksize, callback, error_callback, timeout, fail_fast, star
    ):
        self._sched._check_running()
        chunksize = check_chunksize(chunksize)
        # a range stays one (the scheduler cuts it into ranges: a few bytes each to pickle)
        items = iterable if type(iterable) is range else list(iterable)
        label = f"{'starmap' if star else 'map'}({getattr(func, '__qualname__', func)})"
        result = MapResult(len(items), label, callback, error_callback, fail_fast)
        if items:
            result._pool = self  # until its results are in (dropped when it completes)
            self._sched.submit_map(
                func,
                items,
                result,
                star=star,
                chunksize=chunksize,
                timeout=self._task_timeout(timeout),
                retries=self._retries,
            )
        return result

    def _imap(
        self, func, iterable, chunksize, timeout, ordered, star=False, lazy=True
    ) -> IMapIterator:
        self._sched._check_running()
        chunksize = check_chunksize(chunksize)
        it: IMapIterator = IMapIterator(ordered, release=lambda n: None)
        sink = WeakSink(it)  # the job must not keep a dropped iterator, and its pool, alive
        job = self._sched.submit_map(
            func,
            iterable,
            sink,
            star=star,
            chunksize=chunksize,
            timeout=self._task_timeout(timeout),
            retries=self._retries,
            lazy=lazy,
            on_input_end=sink._end_of_input,
        )
        it._release = job.release
        it._job = job  # (ProcessPoolExecutor.map cancels it)
        it._pool = self  # the pool lives as long as its iterator
        # dropped, it no longer holds its input back (see MapJob.orphaned): a finalizer may run
        # anywhere, the lock held or not, so it only sets a flag, and wakes the I/O thread
        weakref.finalize(it, self._sched.orphan, job).atexit = False
        return it

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Accept no more tasks; workers exit once the queued tasks are done."""
        self._unclosed = False
        self._sched.close()

    def terminate(self) -> None:
        """Stop the workers now (SIGKILL); unfinished tasks fail with ``PoolTerminated``."""
        # (not the finalizer itself: it is spent once called, and a Ctrl-C that cut the
        # terminating short would leave the pool running for good)
        self._unclosed = False
        self._sched.terminate()
        self._finalizer.detach()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workers to exit; call :meth:`close` or :meth:`terminate` first."""
        if self._sched.state == RUNNING:
            raise ValueError("Pool is still running")
        self._sched.join(timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor-style shutdown: close, optionally cancel what has not started, and wait."""
        if cancel_futures:
            self._sched.cancel_pending()
        self.close()
        if wait:
            self._sched.join()

    def __repr__(self) -> str:
        return f"<procpool.Pool state={self._sched.state} processes={self.processes}>"

    # ---------------------------------------------------------------- helpers
    def _check_running(self) -> None:
        self._sched._check_running()


_MP_STATES = {RUNNING: "RUN", TERMINATING: "TERMINATE"}


def __getattr__(name: str) -> Any:
    # ``import procpool as multiprocessing`` then ``multiprocessing.pool.ThreadPool``: the
    # standard library's (threads share memory: nothing of procpool's to add), imported on
    # first use -- multiprocessing.pool costs every process about 1 MB
    if name == "ThreadPool":
        from multiprocessing.pool import ThreadPool

        return ThreadPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ProcessPoolExecutor(concurrent.futures.Executor):
    """A drop-in :class:`concurrent.futures.ProcessPoolExecutor` on procpool's engine.

    Same constructor and methods; a worker crash fails only its own futures (with
    ``WorkerLostError``) instead of breaking the whole executor.  Works with
    ``asyncio``'s ``loop.run_in_executor``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple = (),
        max_tasks_per_child: int | None = None,
        *,
        start_method: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:  # (the standard executor's errors, not Pool's)
            try:
                operator.index(max_tasks_per_child)
            except TypeError:
                raise TypeError("max_tasks_per_child must be an integer") from None
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._pool = Pool(
            max_workers,
            initializer,
            initargs,
            max_tasks_per_child,
            mp_context,
            start_method=start_method,
            timeout=timeout,
            retries=retries,
        )
        # As the standard executor: work submitted runs to its end even when the executor is
        # dropped without shutdown() (it is closed: its workers exit once that work is done),
        # and the program waits for it at exit.  (A Pool is terminated then, as
        # multiprocessing's.)
        sched = self._pool._sched
        self._pool._finalizer.detach()
        self._pool._unclosed = False  # (the executor closes it: nothing to warn about)
        weakref.finalize(self, sched.close)
        _register_for_exit(sched)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return a Future."""
        return self._pool.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like the built-in ``map`` but in parallel; results in order.

        ``timeout`` is a deadline for the whole iteration, counted from this call, as in the
        standard library (``TimeoutError``); an item's exception is raised at its position.
        The inputs are read here, in the calling thread, as the standard library reads them
        (an input's exception is raised by ``map``; a cursor bound to this thread works), and
        every item is sent whether or not the results are read (``Pool.imap`` reads lazily).
        """
        if chunksize < 1:  # (None: TypeError, as in the standard library)
            raise ValueError("chunksize must be >= 1.")
        size = check_chunksize(chunksize)  # (1.5: its ValueError, not "after shutdown")
        assert size is not None  # (None failed above)
        deadline = None if timeout is None else time.monotonic() + timeout
        pool = self._pool
        if pool._sched.state != RUNNING:  # (before the inputs are read, as submit)
            raise RuntimeError("cannot schedule new futures after shutdown")
        items = list(zip(*iterables, strict=False))
        try:
            it = pool._imap(fn, items, size, None, ordered=True, star=True, lazy=False)
        except ValueError:
            raise RuntimeError("cannot schedule new futures after shutdown") from None
        job = it._job

        def results() -> Iterator[T]:
            # Left early -- closed, dropped, a timeout, an item's exception -- the rest is
            # cancelled (what has not been sent), as the stdlib cancels the map's futures.
            try:
                while True:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    try:
                        yield it.next(wait)
                    except StopIteration:
                        return
                    except PoolTimeoutError:  # executors raise their own TimeoutError
                        raise concurrent.futures.TimeoutError from None
            finally:
                pool._sched.cancel_map(job)  # (nothing left to cancel after the last item)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with *wait*, return when all running work is done."""
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


#: the schedulers of live ProcessPoolExecutors, whose work the program waits for at exit
_executors: weakref.WeakSet[Scheduler] = weakref.WeakSet()
_exit_registered = False


def _register_for_exit(sched: Scheduler) -> None:
    global _exit_registered
    if not _exit_registered:
        # where concurrent.futures registers its own: before the interpreter joins its
        # threads, so before the finalizers that terminate pools (atexit comes after)
        threading._register_atexit(_wait_for_executors)  # type: ignore[attr-defined]
        _exit_registered = True
    _executors.add(sched)


def _wait_for_executors() -> None:
    """At exit: every ProcessPoolExecutor's work runs to its end (as the standard library's).
    Not in a forked child (a Process, a task's fork), whose copies of the executors are not
    its own: their lock may be held by a thread that does not exist there."""
    me = os.getpid()
    for sched in list(_executors):
        if sched._owner == me:
            sched.close()
            sched.join()
