"""procpool: a process pool and inter-process communication toolkit.

``import procpool as multiprocessing`` works for the classic programs: the pool, pipes, queues,
shared memory and signals keep the standard library's names and semantics, and procpool fixes
what hurts there (hangs when a worker dies, no per-task timeouts, orphaned workers, leaks).
This module only re-exports the public names; see ``docs/architecture.md`` for the design.
"""

from __future__ import annotations

from multiprocessing import (
    Process,
    active_children,
    cpu_count,
    current_process,
    parent_process,
)

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

# --- IPC primitives (issue 3) ---
from multiprocessing import (  # noqa: E402  (delegated to the stdlib until procpool's own land)
    Array,
    Barrier,
    BoundedSemaphore,
    Condition,
    Event,
    JoinableQueue,
    Lock,
    Pipe,
    Queue,
    RLock,
    Semaphore,
    SimpleQueue,
    Value,
)

_IPC_NAMES = [
    "Array",
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "JoinableQueue",
    "Lock",
    "Pipe",
    "Queue",
    "RLock",
    "Semaphore",
    "SimpleQueue",
    "Value",
]
# --- end IPC ---

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "IMapIterator",
    "MapResult",
    "Pool",
    "ProcessPoolExecutor",
    "InitializerError",
    "PoolTerminated",
    "Process",
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
    *_IPC_NAMES,
]
