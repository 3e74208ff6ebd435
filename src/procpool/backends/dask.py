"""DaskPool: procpool's ``Pool`` API on a Dask cluster, for when one machine is not enough.

::

 caller threads                        this process                            the Dask cluster
 ──────────────                        ────────────                            ────────────────
 apply / apply_async / submit ─► one _Unit ──┐
 map / starmap (input read at once) ─► chunks ├─► client.submit(_run_unit,   ─► a worker process:
 imap / imap_unordered ─► _Feeder ─► chunks ─┘    _Payload), one Dask task      _run_unit runs the
      (reads the input a bounded number of chunks    per unit                   items, catching each
       ahead of what the caller consumed)                                       item's error
 AsyncResult / MapResult / IMapIterator / Future ◄── delivery thread ◄── as_completed ◄── _Outcome

One module per box:

- this module, the public API: :class:`DaskPool` checks its arguments, starts or connects to the
  cluster, and cuts the work into units (one call, or a chunk of a map).  Its map family and
  context manager are :class:`procpool._api.PoolAPI`'s, shared with the local pool.
- :mod:`procpool.backends._dask_engine`, the caller's side of the wire: ``_Engine`` submits the
  units and runs the delivery thread, ``_Feeder`` reads a lazy ``imap``'s input, and Dask's own
  failures are translated into procpool's.
- :mod:`procpool.backends._dask_worker`, what runs on the workers: ``_run_unit`` and the
  soft-timeout watchdog.  Dask pickles them by reference, so the workers import that module
  (it needs neither Dask nor the engine).

How it behaves:

- A *unit* is one Dask task.  Chunking is what makes tiny tasks affordable: a Dask task costs
  around a millisecond of scheduler and network work, so a map sends ``len / (4 * workers)``
  items per task, and a lazy ``imap`` grows its chunks until each is about
  ``_dask_engine.ADAPTIVE_TARGET_S`` of work.
- The result objects are procpool's own (:mod:`procpool.results`), fed by one delivery thread
  per pool: ``get(timeout)``, callbacks, map error ordering and ``imap`` iteration behave
  exactly as with the local :class:`procpool.Pool`.
- Errors: the worker catches each item's exception and sends procpool's *error tuple* back
  (:mod:`procpool._errinfo`), so the caller re-raises the same type with the worker's traceback
  as ``__cause__``, and one failing item does not fail the other items of its chunk.  Dask's
  own failures are translated: ``KilledWorker`` (the worker process died running the task, as
  many times as the scheduler's ``allowed-failures`` allows) becomes
  :class:`~procpool.WorkerLostError`.
- Per-task timeouts are *soft*: a watchdog thread in the worker raises
  :class:`~procpool.TaskTimeout` in the task's thread (Dask runs tasks in threads, so the local
  pool's ``SIGALRM`` cannot reach them), and the caller gets
  :class:`~procpool.TaskTimeoutError`.
"""

from __future__ import annotations

import atexit
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

try:
    import distributed
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("procpool.backends.dask needs Dask: pip install 'procpool[dask]'") from exc

from .._api import PoolAPI, check_chunksize, check_timeout, default_processes
from ..results import AsyncResult, Future, IMapIterator, MapResult, WeakSink
from ._dask_engine import RUN, _check_arguments, _Engine, _Feeder, _Unit
from ._dask_worker import CALL, MAP, STARMAP, _Payload

T = TypeVar("T")

__all__ = ["DaskPool"]

#: chunks an ``imap`` keeps submitted and not yet consumed, per worker (default ``prefetch``)
PREFETCH_PER_WORKER = 4

#: the pools not yet finalized, for :func:`_terminate_at_exit`
_LIVE: weakref.WeakSet[DaskPool] = weakref.WeakSet()


def _terminate_at_exit() -> None:
    """Terminate the pools still open when the interpreter exits.

    Their finalizers would do it too, but ``weakref.finalize`` runs after the atexit handlers
    registered later than its own, and ``distributed`` registers one on import that closes
    every ``LocalCluster`` the slow way (a nanny waits 4 s for a busy worker).  Registered
    here, after importing ``distributed``, this runs first (atexit runs last-in first-out).
    """
    for pool in list(_LIVE):
        pool._finalizer()


atexit.register(_terminate_at_exit)


def _check_address(address: str) -> None:
    """Refuse a TCP/TLS scheduler address without a port before a Client is made for it.

    ``distributed.Client`` raises ValueError for it too, but the half-made client's
    ``__del__`` then waits 60 s for a connection at interpreter exit.  (Other schemes, e.g.
    ``inproc://`` or ``ucx://``, are left to Dask.)
    """
    if not isinstance(address, str):
        return  # (Client also takes a cluster object: Dask checks it)
    scheme, location = distributed.comm.parse_address(address)
    if scheme in ("tcp", "tls"):
        try:
            distributed.comm.addressing.parse_host_port(location)
        except ValueError as exc:
            raise ValueError(f"not a Dask scheduler address: {address!r} ({exc})") from None


def _label(name: str, func: Any) -> str:
    return f"{name}({getattr(func, '__qualname__', None) or type(func).__name__})"


# ==================================================================== the pool


class DaskPool(PoolAPI):
    """The :class:`procpool.Pool` API on a Dask cluster.

    ``DaskPool()`` starts a local cluster of its own (one single-threaded worker process per
    CPU, on 127.0.0.1, no dashboard) and shuts it down on :meth:`close` + :meth:`join`,
    :meth:`terminate` or leaving the ``with`` block.  ``DaskPool(address="tcp://host:8786")`` or
    ``DaskPool(client=client)`` uses a cluster that already runs, and never shuts it down.

    Example::

        from procpool.backends.dask import DaskPool

        with DaskPool(address="tcp://scheduler:8786") as pool:
            print(pool.apply_async(pow, (2, 10)).get(timeout=30))   # 1024
            print(pool.map(abs, range(-5, 0)))                       # [5, 4, 3, 2, 1]

    Chunking: :meth:`map` and :meth:`starmap` send ``chunksize`` items per Dask task (default:
    ``len / (4 * workers)``, as :mod:`multiprocessing` chooses); :meth:`imap` reads its input at
    most ``prefetch`` chunks ahead of the results consumed, and without a *chunksize* its chunks
    start at one item and grow until each is about 50 ms of work (or of reading the input).

    What differs from the local pool (see ``docs/dask.md``): arguments and results always travel
    by pickle over the network (no shared-memory path), procpool's IPC objects cannot be task
    arguments (:class:`~procpool.SerializationError`), per-task timeouts are soft only, and a
    worker that dies fails its task with :class:`~procpool.WorkerLostError` only once Dask's
    ``allowed-failures`` retries are used up.

    Args:
        processes: worker processes of the cluster this pool starts (default: the CPUs this
            process may use).  Not allowed with *address* or *client*.
        address: the scheduler address of a running Dask cluster.
        client: a :class:`distributed.Client` to use (the caller keeps owning it).
        timeout: default time limit in seconds for each task or map item (soft: raised inside
            the task as :class:`~procpool.TaskTimeout`; see ``_dask_worker._Watchdog``).
        allowed_failures: how many times a task may be re-run after its worker died before it
            fails with ``WorkerLostError`` (default: Dask's ``allowed-failures``, 3).  Only for
            the cluster this pool starts; an external cluster's scheduler has its own setting.
        prefetch: chunks an ``imap`` keeps submitted ahead of the caller (default: 4 per worker).
        cluster_kwargs: more keyword arguments for the ``distributed.LocalCluster`` this pool
            starts (e.g. ``memory_limit``).
    """

    def __init__(
        self,
        processes: int | None = None,
        *,
        address: str | None = None,
        client: distributed.Client | None = None,
        timeout: float | None = None,
        allowed_failures: int | None = None,
        prefetch: int | None = None,
        cluster_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if address is not None and client is not None:
            raise ValueError("give an address or a client, not both")
        external = address is not None or client is not None
        if external and (processes is not None or allowed_failures is not None or cluster_kwargs):
            raise ValueError(
                "processes, allowed_failures and cluster_kwargs are for the cluster DaskPool "
                "starts itself, not for an existing one"
            )
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if allowed_failures is not None and (
            not isinstance(allowed_failures, int) or allowed_failures < 0
        ):
            raise ValueError("allowed_failures must be a non-negative int")
        if prefetch is not None and (not isinstance(prefetch, int) or prefetch < 1):
            raise ValueError("prefetch must be a positive int")
        self._timeout = check_timeout(timeout)
        cluster: distributed.LocalCluster | None = None
        if client is not None:
            engine_client, own_client = client, False
        elif address is not None:
            _check_address(address)
            engine_client, own_client = distributed.Client(address, set_as_default=False), True
        else:
            options: dict[str, Any] = {
                "host": "127.0.0.1",
                "n_workers": processes or default_processes(),
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
            # no dashboard; the scheduler's small HTTP server (health, metrics) is always
            # started, by default on port 8787: a free port on loopback instead
            scheduler_kwargs: dict[str, Any] = {"dashboard_address": "127.0.0.1:0"}
            if allowed_failures is not None:
                scheduler_kwargs["allowed_failures"] = allowed_failures
            options["scheduler_kwargs"] = scheduler_kwargs
            options.update(cluster_kwargs or {})
            cluster = distributed.LocalCluster(**options)
            try:
                engine_client = distributed.Client(cluster, set_as_default=False)
            except BaseException:
                cluster.close()
                raise
            own_client = True
        self._engine = _Engine(engine_client, own_client, cluster)
        self._prefetch = prefetch
        # a pool dropped without close() or still alive at exit is terminated, not leaked
        self._finalizer = weakref.finalize(self, self._engine.terminate)
        _LIVE.add(self)

    # ---------------------------------------------------------------- introspection
    @property
    def client(self) -> distributed.Client:
        """The Dask client this pool submits through."""
        return self._engine.client

    @property
    def processes(self) -> int:
        """The worker threads of the cluster now (one per process on the pool's own cluster)."""
        return max(1, sum(self._engine.client.nthreads().values()))

    # ---------------------------------------------------------------- one task
    def apply(
        self, func: Callable[..., T], args: Iterable[Any] = (), kwds: dict | None = None
    ) -> T:
        """Run ``func(*args, **kwds)`` on a Dask worker and return its result (blocking)."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncResult[T]:
        """Queue ``func(*args, **kwds)``; return an :class:`~procpool.AsyncResult`.

        *callback* / *error_callback* run with the result / exception in the pool's delivery
        thread, as in :mod:`multiprocessing`; keep them short.  *timeout* (seconds) limits the
        task's run time (default: the pool's).  Raises ``ValueError`` if the pool is closed.
        """
        self._engine.check_running()
        result: AsyncResult[T] = AsyncResult(callback, error_callback)
        result._pool = self  # until its result is in (see AsyncResult._pool)
        self._submit_call(func, args, kwds, result, timeout)
        return result

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; return a :class:`concurrent.futures.Future`.

        The pool's ``timeout`` applies.  Raises ``RuntimeError`` after :meth:`close` or
        :meth:`shutdown`, as executors do.  The future is *running* from the start (Dask does not
        say when a task starts), so ``future.cancel()`` returns False.
        """
        if self._engine.state != RUN:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()
        future._pool = self
        self._submit_call(fn, args, kwargs, future, None)
        return future

    def _submit_call(
        self,
        func: Callable[..., Any],
        args: Iterable[Any],
        kwds: dict | None,
        sink: Any,
        timeout: float | None,
    ) -> None:
        limit = self._task_timeout(timeout)
        call_args, call_kwds = tuple(args), dict(kwds) if kwds else {}
        label = _label("apply", func)
        _check_arguments([call_args], STARMAP, label)
        _check_arguments(call_kwds.values(), MAP, label)
        unit = _Unit(sink, getattr(func, "__qualname__", None) or type(func).__name__, limit)
        self._engine.submit(unit, _Payload(func, CALL, [call_args], call_kwds, limit))

    # ---------------------------------------------------------------- many tasks
    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[list[Any]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        timeout: float | None,
        fail_fast: bool,
        star: bool,
    ) -> MapResult:
        self._engine.check_running()
        chunksize = check_chunksize(chunksize)
        kind = STARMAP if star else MAP
        limit = self._task_timeout(timeout)
        items = list(iterable) if kind == MAP else [tuple(args) for args in iterable]
        label = _label("map" if kind == MAP else "starmap", func)
        _check_arguments(items, kind, label)
        result = MapResult(len(items), label, callback, error_callback, fail_fast)
        if items:
            result._pool = self  # until its results are in
        if chunksize is None:
            chunksize = max(1, math.ceil(len(items) / (4 * self.processes)))
        for start in range(0, len(items), chunksize):
            chunk = items[start : start + chunksize]
            unit = _Unit(result, label, limit, start, len(chunk), single=False)
            self._engine.submit(unit, _Payload(func, kind, chunk, {}, limit))
        return result

    def _imap(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout: float | None,
        ordered: bool,
    ) -> IMapIterator:
        self._engine.check_running()
        chunksize = check_chunksize(chunksize)
        limit = self._task_timeout(timeout)
        window = self._prefetch or PREFETCH_PER_WORKER * self.processes
        it: IMapIterator = IMapIterator(ordered, release=lambda n: None)
        label = _label("imap" if ordered else "imap_unordered", func)
        sink: Any = WeakSink(it)  # the feeder must not keep a dropped iterator (and pool) alive
        feeder = _Feeder(self._engine, func, MAP, iterable, chunksize, limit, sink, label, window)
        it._release = feeder.release
        it._pool = self
        self._engine.add_feeder(feeder)
        feeder.feed()
        return it

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Accept no more tasks; :meth:`join` then waits for the queued ones."""
        self._engine.close()

    def terminate(self) -> None:
        """Stop now: unfinished tasks fail with ``PoolTerminated``; the own cluster shuts down.

        Dask cannot stop a task that already runs on a worker of an external cluster; its
        result is dropped.
        """
        self._finalizer()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the queued tasks, then release the client and cluster; close() first."""
        if self._engine.state == RUN:
            raise ValueError("Pool is still running")
        self._engine.join(timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor-style shutdown: close, optionally cancel what has not started, and wait.

        *cancel_futures*: the tasks the Dask scheduler has not given to a worker yet fail with
        ``CancelledError``, and imap inputs are read no further; running tasks finish, and so
        do :meth:`submit`'s futures (they are *running* from the start).
        """
        if cancel_futures:
            self._engine.cancel_unstarted()
        self.close()
        if wait:
            self._engine.join(None)

    def __repr__(self) -> str:
        where = "own cluster" if self._engine.cluster is not None else "external cluster"
        return f"<procpool.backends.dask.DaskPool state={self._engine.state} {where}>"

    # ---------------------------------------------------------------- helpers
    def _check_running(self) -> None:
        self._engine.check_running()
