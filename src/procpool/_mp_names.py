"""The rest of :mod:`multiprocessing`'s names, so that ``import procpool as multiprocessing``
runs a classic program from its first line (``freeze_support()``, ``set_start_method()``).

Start methods and contexts choose how procpool's pools start their workers (and, through
:mod:`multiprocessing`, how a ``Process`` starts); ``RawValue``/``RawArray`` are procpool's
shared objects without a lock.  The other names are :mod:`multiprocessing`'s own objects:
``Manager`` (its proxies reach a forked pool's workers; spawned ones lack the parent's
authentication key), the exceptions, logging, and the settings that concern only
:mod:`multiprocessing`'s processes (``set_executable``, ``set_forkserver_preload``,
``allow_connection_pickling``, ``reducer``).
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing import (  # noqa: F401 - re-exported
    AuthenticationError,
    BufferTooShort,
    Manager,
    ProcessError,
    allow_connection_pickling,
    freeze_support,
    get_all_start_methods,
    get_logger,
    log_to_stderr,
    reducer,
    set_executable,
    set_forkserver_preload,
)

from . import _start

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

#: the start method set_start_method chose (None: not chosen, procpool's default applies)
_chosen: str | None = None


def set_start_method(method: str | None, force: bool = False) -> None:
    """Set how pools (and ``Process``) start processes: ``"fork"``, ``"spawn"`` or
    ``"forkserver"``.  As in :mod:`multiprocessing`, ``RuntimeError`` if it was set already
    (unless *force*); ``None`` with *force* goes back to the default."""
    global _chosen
    if method is not None and method not in _start.START_METHODS:
        raise ValueError(f"cannot find context for {method!r}")
    multiprocessing.set_start_method(method, force)  # (its checks: set already, force)
    _chosen = method
    _start.DEFAULT_START_METHOD = method or _start.START_METHODS[0]


def get_start_method(allow_none: bool = False) -> str | None:
    """The start method pools use; with *allow_none*, None while none was set (neither here
    nor in :mod:`multiprocessing`, which fixes its own once it has been asked)."""
    if _chosen is None and allow_none and multiprocessing.get_start_method(True) is None:
        return None
    return _chosen or _start.DEFAULT_START_METHOD


def get_context(method: str | None = None) -> Context:
    """A context: procpool's names, its ``Pool`` and ``ProcessPoolExecutor`` starting their
    workers with *method*, and ``Process`` (the rest of :mod:`multiprocessing`'s context) using
    it too.  Without *method*, the default context, as :mod:`multiprocessing`'s: it follows
    the current start method, and its ``set_start_method`` sets that; a context of a named
    method refuses to (``ValueError``)."""
    if method is None:
        return _DEFAULT_CONTEXT
    return Context(method)


class Context:
    """What :func:`get_context` returns (see there)."""

    def __init__(self, method: str | None) -> None:
        """*method*: the start method (None: the default context)."""
        if method is not None and method not in _start.START_METHODS:
            raise ValueError(f"cannot find context for {method!r}")
        self._fixed = method

    @property
    def _method(self) -> str:
        return self._fixed or _chosen or _start.DEFAULT_START_METHOD

    @property
    def _mp(self) -> Any:
        return multiprocessing.get_context(self._method)

    def get_start_method(self, allow_none: bool = False) -> str | None:
        if self._fixed is None:
            return get_start_method(allow_none)
        return self._fixed

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        """The default context's sets the start method (:func:`set_start_method`); a context
        of a named method raises ``ValueError``, as :mod:`multiprocessing`'s."""
        if self._fixed is not None:
            raise ValueError("cannot set start method of concrete context")
        set_start_method(method, force)

    def get_context(self, method: str | None = None) -> Context:
        if method is None:
            return self if self._fixed is not None else Context(self._method)
        return Context(method)

    def Pool(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - multiprocessing's name
        from .pool import Pool

        kwargs.setdefault("start_method", self._method)
        return Pool(*args, **kwargs)

    def ProcessPoolExecutor(self, max_workers: int | None = None, **kwargs: Any) -> Any:  # noqa: N802
        from .pool import ProcessPoolExecutor

        kwargs.setdefault("mp_context", self)
        return ProcessPoolExecutor(max_workers, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """procpool's own IPC primitives (they need no start method); :mod:`multiprocessing`'s
        for its other names (``Process``, ``Manager``... with this start method), and for
        every name asked by the code of :mod:`multiprocessing` or :mod:`concurrent.futures`
        itself: the standard ``ProcessPoolExecutor(mp_context=...)`` or
        ``multiprocessing.pool.Pool(context=...)`` read the internals of the queues and
        locks they make (``SimpleQueue()._reader``), which procpool's do not have -- the
        executor's thread died on it, and its caller waited for good.  (The asking frame
        decides: a ``getattr`` that such code runs for another caller -- a thread pool's
        worker calling ``getattr(ctx, name)`` -- gets :mod:`multiprocessing`'s too.)"""
        # (copy, pickle: _fixed not set yet; _method and _mp, properties reading it, come
        # here when it is missing -- a subclass skipping __init__: answering them would recurse)
        if name.startswith("__") or name in ("_fixed", "_method", "_mp"):
            raise AttributeError(name)
        import procpool

        value = getattr(procpool, name, None)
        if (
            value is None
            or getattr(value, "__module__", "").startswith("multiprocessing")
            or _stdlib_asks(sys._getframe(1))
        ):
            return getattr(self._mp, name)
        return value

    def __repr__(self) -> str:
        kind = "default context" if self._fixed is None else "context"
        return f"<procpool {kind} {self._method!r}>"


_DEFAULT_CONTEXT = Context(None)


def _stdlib_asks(frame: Any) -> bool:
    """Whether *frame* runs code of :mod:`multiprocessing` or :mod:`concurrent.futures`."""
    module = frame.f_globals.get("__name__", "")
    return module.partition(".")[0] == "multiprocessing" or (
        module == "concurrent.futures" or module.startswith("concurrent.futures.")
    )


def RawValue(typecode_or_type: Any, *args: Any) -> Any:  # noqa: N802 - multiprocessing's name
    """A ctypes object in shared memory, without a lock (:func:`multiprocessing.RawValue`):
    ``procpool.Value(..., lock=False)``.  ``ctypes.byref``, ``memoryview`` and numpy take it;
    passed to a task or through a queue it travels by reference, as a ``Value``."""
    from .shared import Value

    return Value(typecode_or_type, *args, lock=False)


def RawArray(typecode_or_type: Any, size_or_initializer: Any) -> Any:  # noqa: N802
    """A ctypes array in shared memory, without a lock (:func:`multiprocessing.RawArray`):
    ``procpool.Array(..., lock=False)``.  ``numpy.frombuffer`` and ``memoryview`` take it; it
    travels by reference, as ``RawValue``."""
    from .shared import Array

    return Array(typecode_or_type, size_or_initializer, lock=False)
