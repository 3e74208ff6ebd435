"""How an exception crosses from a worker to the caller: the *error tuple*.

``error_info`` (in the worker) turns an exception into ``(pickle or None, type name, message,
traceback text)``; it checks that the pickle round-trips, because an exception whose
``__init__`` does not accept its own ``args`` would otherwise fail only in the caller.
``rebuild_error`` (in the parent) turns the tuple back into the same exception type, with the
worker's traceback as ``__cause__`` (a ``RemoteTraceback``) — or, when the exception cannot
make the trip, a ``RemoteError`` that keeps its type name, message and traceback.
"""

from __future__ import annotations

import pickle
import traceback

from . import _serialize
from .errors import RemoteError, RemoteTraceback, TaskTimeout, TaskTimeoutError

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any


def error_info(exc: BaseException) -> tuple:
    """The error tuple for *exc* (see the module docstring)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb = f'\n"""\n{tb}"""'
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<str() failed>"
    blob: bytes | None
    try:
        payload = _serialize.dumps(exc, oob=False)
        payload.close()
        blob = payload.data
        pickle.loads(blob)  # must round-trip here, or the caller would fail to rebuild it
    except BaseException as why:  # noqa: BLE001 - anything: a broken __reduce__, a bad __init__
        blob = None
        message = f"{message} (the exception could not be sent back intact: {why!r})"
    return (blob, name, message, tb)


def rebuild_error(info: tuple, task: Any = None, item: int | None = None) -> BaseException:
    """Turn a worker's error tuple back into an exception with the remote traceback as cause
    (*task*: the task it failed; *item*: which item of that map chunk, by its input index)."""
    blob, name, message, tb = info
    exc: Any = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except BaseException as why:  # noqa: BLE001
            message = f"{message} (the exception could not be rebuilt here: {why!r})"
        if not isinstance(exc, BaseException):
            exc = None
    if exc is None:
        exc = RemoteError(f"{name}: {message}", name)
    exc.__cause__ = RemoteTraceback(tb)
    if isinstance(exc, TaskTimeout) and task is not None:
        where = task.describe() if item is None else f"item {item} of {task.label}"
        outer = TaskTimeoutError(f"{where} exceeded its timeout of {task.timeout}s", task.timeout)
        outer.__cause__ = exc
        return outer
    return exc
