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
_IPC_NAMES = [
    "Array",
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Connection",
    "Event",
    "JoinableQueue",
    "Lock",
    "Pipe",
    "Queue",
    "RLock",
    "Semaphore",
    "SharedArray",
    "SimpleQueue",
    "Value",
    "signals",
]

from . import signals as signals  # noqa: E402
from .pipe import Connection as Connection  # noqa: E402
from .pipe import Pipe as Pipe  # noqa: E402
from .queue import JoinableQueue as JoinableQueue  # noqa: E402
from .queue import Queue as Queue  # noqa: E402
from .queue import SimpleQueue as SimpleQueue  # noqa: E402
from .shared import Array as Array  # noqa: E402
from .shared import SharedArray as SharedArray  # noqa: E402
from .shared import Value as Value  # noqa: E402
from .sync import Barrier as Barrier  # noqa: E402
from .sync import BoundedSemaphore as BoundedSemaphore  # noqa: E402
from .sync import Condition as Condition  # noqa: E402
from .sync import Event as Event  # noqa: E402
from .sync import Lock as Lock  # noqa: E402
from .sync import RLock as RLock  # noqa: E402
from .sync import Semaphore as Semaphore  # noqa: E402

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
