"""procpool: a process pool and inter-process communication toolkit.

``import procpool as multiprocessing`` works for the classic programs: the pool, pipes, queues,
shared memory and signals keep the standard library's names and semantics, and procpool fixes
what hurts there (hangs when a worker dies, no per-task timeouts, orphaned workers, leaks).
This module only lists the public names; see ``docs/architecture.md`` for the design.

The IPC primitives are imported on first use (PEP 562), so a program that only needs the pool
(and every worker started with ``spawn``) does not pay for loading them.
"""

from __future__ import annotations

import importlib
from multiprocessing import Process, active_children, cpu_count, current_process, parent_process

from .errors import (
    InitializerError,
    PoolTerminated,
    ProcpoolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    TaskTimeoutError,
    TimeoutError,
    WorkerLostError,
)
from .pool import Pool, ProcessPoolExecutor
from .results import AsyncResult, IMapIterator, MapResult

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

if TYPE_CHECKING:  # the lazily loaded names, for type checkers
    from . import signals as signals
    from ._mp_names import AuthenticationError as AuthenticationError
    from ._mp_names import BufferTooShort as BufferTooShort
    from ._mp_names import Manager as Manager
    from ._mp_names import ProcessError as ProcessError
    from ._mp_names import RawArray as RawArray
    from ._mp_names import RawValue as RawValue
    from ._mp_names import allow_connection_pickling as allow_connection_pickling
    from ._mp_names import freeze_support as freeze_support
    from ._mp_names import get_all_start_methods as get_all_start_methods
    from ._mp_names import get_context as get_context
    from ._mp_names import get_logger as get_logger
    from ._mp_names import get_start_method as get_start_method
    from ._mp_names import log_to_stderr as log_to_stderr
    from ._mp_names import reducer as reducer
    from ._mp_names import set_executable as set_executable
    from ._mp_names import set_forkserver_preload as set_forkserver_preload
    from ._mp_names import set_start_method as set_start_method
    from .pipe import Connection as Connection
    from .pipe import Pipe as Pipe
    from .queue import JoinableQueue as JoinableQueue
    from .queue import Queue as Queue
    from .queue import SimpleQueue as SimpleQueue
    from .shared import Array as Array
    from .shared import SharedArray as SharedArray
    from .shared import Value as Value
    from .sync import Barrier as Barrier
    from .sync import BoundedSemaphore as BoundedSemaphore
    from .sync import Condition as Condition
    from .sync import Event as Event
    from .sync import Lock as Lock
    from .sync import RLock as RLock
    from .sync import Semaphore as Semaphore

#: the IPC primitives (issue 3) and the module each lives in, loaded on first access
_LAZY = {
    "Array": "shared",
    "Barrier": "sync",
    "BoundedSemaphore": "sync",
    "Condition": "sync",
    "Connection": "pipe",
    "Event": "sync",
    "JoinableQueue": "queue",
    "Lock": "sync",
    "Pipe": "pipe",
    "Queue": "queue",
    "RLock": "sync",
    "Semaphore": "sync",
    "SharedArray": "shared",
    "SimpleQueue": "queue",
    "Value": "shared",
    "signals": "signals",
}
#: the rest of multiprocessing's names (see _mp_names), loaded on first access too
_LAZY.update(
    dict.fromkeys(
        (
            "AuthenticationError",
            "BufferTooShort",
            "Manager",
            "ProcessError",
            "RawArray",
            "RawValue",
            "allow_connection_pickling",
            "freeze_support",
            "get_all_start_methods",
            "get_context",
            "get_logger",
            "get_start_method",
            "log_to_stderr",
            "reducer",
            "set_executable",
            "set_forkserver_preload",
            "set_start_method",
        ),
        "_mp_names",
    )
)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'procpool' has no attribute {name!r}")
    loaded = importlib.import_module(f".{module}", __name__)
    value = loaded if name == module else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "IMapIterator",
    "InitializerError",
    "MapResult",
    "Pool",
    "PoolTerminated",
    "Process",
    "ProcessPoolExecutor",
    "ProcpoolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "TaskTimeoutError",
    "TimeoutError",
    "WorkerLostError",
    "active_children",
    "cpu_count",
    "current_process",
    "parent_process",
    *_LAZY,
]
