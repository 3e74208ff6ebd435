"""PoolAPI: the ``multiprocessing.Pool`` surface that every procpool pool offers.

:class:`procpool.Pool` (this machine's worker processes) and
:class:`procpool.backends.dask.DaskPool` (a Dask cluster) both inherit :class:`PoolAPI`, so the
map family (``map``, ``map_async``, ``starmap``, ``starmap_async``, ``imap``,
``imap_unordered``) and the context manager are written, typed and documented once, here.  A
pool supplies the private hooks they call: ``_map_async``, ``_imap``, ``_check_running`` and
``terminate``.  ``apply``, ``apply_async``, ``submit`` and the lifecycle stay in each pool:
their bodies are the backends' own (and ``Pool.apply`` is a hot path, kept free of a call
layer).

Also the argument checks both pools share.  This module imports nothing heavy: ``import
procpool`` loads it, and must not load Dask.
"""

from __future__ import annotations

import concurrent.futures
import operator
import os
from collections.abc import Callable, Iterable

from .results import IMapIterator, MapResult

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")
    _PoolT = TypeVar("_PoolT", bound="PoolAPI")


__all__ = ["PoolAPI", "check_chunksize", "check_timeout", "default_processes"]


def default_processes() -> int:
    """The CPUs this process may use (at least 1): a pool's default number of workers."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: a task time limit beyond this many seconds (~31 years; ``inf`` included) is no limit: the
#: timers that enforce one (setitimer, epoll) take nothing much longer
MAX_TIMEOUT = 1e9


def check_timeout(timeout: float | None) -> float | None:
    """*timeout* as a task time limit: a positive number of seconds, or None for none (also
    for ``inf`` and anything over :data:`MAX_TIMEOUT`); ``TypeError`` for what is no number
    (a bool included), ``ValueError`` for one that is not positive (NaN included)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool):  # (True was a one-second limit, "exceeded ... of Trues")
        raise TypeError("timeout must be a number of seconds or None, not a bool")
    try:
        positive = timeout > 0
    except TypeError:
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
        ) from None
    if not positive:
        raise ValueError("timeout must be a positive number of seconds or None")
    return None if timeout > MAX_TIMEOUT else timeout


def check_chunksize(chunksize: int | None) -> int | None:
    """*chunksize* as an int (numpy's integers too), or None; ``ValueError`` unless at least 1."""
    if chunksize is None:
        return None
    try:
        size = operator.index(chunksize)
    except TypeError:
        size = 0  # (a float, a list...: refused below, by name)
    if size < 1 or isinstance(chunksize, bool):
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
    return size


class PoolAPI(concurrent.futures.Executor):
    """The ``multiprocessing.Pool`` map family and context manager, on a pool's private hooks.

    A subclass sets ``_timeout`` (its default per-task limit) and implements ``_map_async``,
    ``_imap``, ``_check_running`` and ``terminate``; it is also a
    :class:`concurrent.futures.Executor` (``submit``, ``shutdown``).
    """

    #: the pool's default time limit for each task, in seconds (None: none)
    _timeout: float | None

    # ---------------------------------------------------------------- many tasks
    def map(  # type: ignore[override]
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> list[T]:
        """Apply *func* to every item, in parallel; return the list of results in order.

        The items are read at once (as ``multiprocessing`` does) and sent to the workers
        *chunksize* at a time (the default depends on the pool: see its class).  If items fail,
        the others still complete, then the exception of the first failing item is raised.
        """
        return self.map_async(func, iterable, chunksize, timeout=timeout).get()

    def map_async(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
        fail_fast: bool = False,
    ) -> MapResult:
        """Like :meth:`map` but return a :class:`~procpool.MapResult` at once."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, timeout, fail_fast, star=False
        )

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> list[T]:
        """Like :meth:`map` but each item is unpacked as arguments: ``func(*item)``."""
        return self.starmap_async(func, iterable, chunksize, timeout=timeout).get()

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        timeout: float | None = None,
        fail_fast: bool = False,
    ) -> MapResult:
        """Like :meth:`starmap` but return a :class:`~procpool.MapResult` at once."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, timeout, fail_fast, star=True
        )

    def imap(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> IMapIterator[T]:
        """Apply *func* to every item; return an iterator over the results, in order.

        The input is read lazily, a bounded number of items ahead of the results you have
        consumed: an infinite generator works and memory does not grow with its length (how
        far ahead, and the default *chunksize*, depend on the pool: see its class).  Use
        ``it.next(timeout)`` to wait at most *timeout* seconds for the next result
        (``multiprocessing.TimeoutError``).
        """
        return self._imap(func, iterable, chunksize, timeout, ordered=True)

    def imap_unordered(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
    ) -> IMapIterator[T]:
        """Like :meth:`imap` but results come in completion order."""
        return self._imap(func, iterable, chunksize, timeout, ordered=False)

    # ---------------------------------------------------------------- lifecycle
    def terminate(self) -> None:
        """Stop now; unfinished tasks fail with ``PoolTerminated``."""
        raise NotImplementedError

    def __enter__(self: _PoolT) -> _PoolT:
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()  # as multiprocessing.Pool does

    # ---------------------------------------------------------------- the hooks
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
        """Start a map (``func(*item)`` with *star*) over the items, read at once."""
        raise NotImplementedError

    def _imap(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        timeout: float | None,
        ordered: bool,
    ) -> IMapIterator:
        """Start a lazy map over *iterable*; results in order, or as they come."""
        raise NotImplementedError

    def _check_running(self) -> None:
        """Raise ``ValueError`` unless the pool still accepts tasks."""
        raise NotImplementedError

    def _task_timeout(self, timeout: float | None) -> float | None:
        """A call's time limit: *timeout* (checked), or the pool's default."""
        return self._timeout if timeout is None else check_timeout(timeout)
