"""The wire messages between the parent and one worker, and how each is packed.

Every message is one *frame*: ``[u32 size][u8 kind][u16 nfds] body``, where ``size`` counts
everything after itself and ``nfds`` file descriptors ride along with the frame (``SCM_RIGHTS``,
see ``_channel``).  Frames are hand-packed with :mod:`struct` rather than pickled: task and
result payloads are already pickled once by the sender, and packing a batch of a thousand
records must cost a few microseconds, not a second pickle pass.

parent -> worker                              worker -> parent
----------------                              ----------------
INIT    its number, start-up settings,        READY        initializer done, serving
        the initializer
FUNC    a function, sent once per worker      INIT_FAILED  the initializer (or main script) raised
TASKS   a batch of task records               RESULTS      a batch of result records
                                              ALSO         one result, also in the express
                                                           lane's slot (see ``_express``)
EXIT    finish and exit(0)                    RETIRE       over max_memory_per_child
MAP     a shared-memory region (its fd) and
        its key: tasks then name it by key
        (no fd: it could not be sent, and the
        body says why)
FORGET  keys of regions to drop (they died
        in the parent, or made room)
RELEASED inodes of result buffers the         RELEASED     inodes of argument buffers it has
        parent unmapped, or dropped unread                 unmapped (see ``_buffers``)
PINNED  inodes of result buffers mapped       PINNED       inodes of argument buffers mapped
        when the parent forked: never reuse                when a task forked: never reuse

RELEASED and PINNED mean the same both ways: the receiver of large buffers tells their sender
which of its reused segments it may write again (RELEASED) and which it must never write
again (PINNED: the receiver forked while it mapped them); PINNED goes first (see
``_buffers``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

# frame kinds
INIT, FUNC, TASKS, EXIT, MAP, FORGET = 1, 2, 3, 4, 5, 6
READY, INIT_FAILED, RESULTS, RETIRE, RELEASED, PINNED = 11, 12, 13, 14, 15, 16
# a RESULTS body of one record also written in the express lane's slot, for a caller that had
# stopped waiting there: the pool drops it if it took that reply from the slot (see _express)
ALSO = 17

FRAME = struct.Struct("<IBH")  # size (after this u32), kind, nfds
FRAME_PREFIX = 4  # bytes of the size field itself

# task record kinds (what the payload unpickles to and how the function is called)
CALL = 0  # (args, kwds)            -> func(*args, **kwds)
MAP = 1  # [item, item, ...]        -> [func(item) ...]
STARMAP = 2  # [args, args, ...]    -> [func(*args) ...]
CALLS = 3  # ([id, ...], [args, ...]) -> func(*args) for each, every one a task of its own (the
#            head's id is the first one's): single calls of plain arguments sent together; ids
#            that follow one another may come as the first one alone (an int)

# result record status
OK = 0  # payload: the value (or, for MAP/STARMAP, the list of values)
ERROR = 1  # payload: an error tuple (see ``_worker.error_info``)
CHUNK_PARTIAL = 2  # payload: (values, {index_in_chunk: error tuple}) for a chunk with failures
VALUES = 3  # payload: ([task id, ...], [value, ...]): several single calls' small scalar values
#             (int, float, bool, None, complex) in one pickle; the head's id is the first one's
#             and its duration their total; ids that follow one another come as the first alone

TASK_HEAD = struct.Struct("<QIBdHHI")  # id, fid, kind, timeout (0 = none), nbuf, nfd, size
RESULT_HEAD = struct.Struct("<QBdHHI")  # id, status, duration in seconds, nbuf, nfd, size
FUNC_HEAD = struct.Struct("<I")  # fid
INIT_HEAD = struct.Struct("<I")  # the worker's number in its pool (then the settings' pickle)
INODE = struct.Struct("<Q")  # one inode in a RELEASED body
MAP_HEAD = struct.Struct("<Q")  # the region's key (then its name, UTF-8, if it has one)
KEY = struct.Struct("<Q")  # one key in a FORGET body

# The progress slot: 48 bytes of shared memory per worker (a forked worker inherits an
# anonymous shared page, which the express lane shares; others get a memfd with INIT).
# The worker writes the id of the task it starts and, when the task's result is buffered,
# that id as the last finished one.  When a worker dies, the scheduler reads the slot to tell
# the task that was running (fails, or is retried) from those that never started (sent again,
# to another worker).
# A task with a time limit also writes when it started (``time.monotonic()``: one clock for
# every process), and a chunk the index and start of each item: the scheduler kills the worker
# only once the running item has overrun its limit by the grace time (a hard timeout), and
# then only that item fails.
PROGRESS = struct.Struct("<QQQd")  # running task id (0: none), last finished id, item, its start
PROGRESS_ITEM = struct.Struct("<Qd")  # the item and its start, alone (at offset ITEM_OFFSET)
ITEM_OFFSET = 16
# Written by the pool: a call the worker holds and has not started, to skip (``cancel(force=
# True)`` of a call queued behind the one running: that one goes on).  The id, then the flag
# byte; the worker looks at the flag as it starts each call (after it wrote "running").
SKIP = struct.Struct("<Q")
SKIP_OFFSET = PROGRESS.size
SKIP_FLAG = SKIP_OFFSET + SKIP.size
PROGRESS_SIZE = SKIP_FLAG + 8


# Records are yielded as plain tuples: a NamedTuple's Python-level __new__ costs more than the
# rest of a tiny task's bookkeeping.
#   task record:   (task_id, fid, kind, timeout, nbuf, nfd, payload)
#   result record: (task_id, status, duration, nbuf, nfd, payload)
TaskRecord = tuple[int, int, int, float, int, int, memoryview]
ResultRecord = tuple[int, int, float, int, int, memoryview]


def frame(kind: int, body: bytes | bytearray = b"", nfds: int = 0) -> bytes:
    """Pack a whole frame."""
    return FRAME.pack(len(body) + 3, kind, nfds) + body


_TASK_FRAME = struct.Struct(FRAME.format + TASK_HEAD.format[1:])


def task_frame(task_id: int, fid: int, kind: int, timeout: float, data: bytes) -> bytes:
    """A whole TASKS frame of one record with nothing out of band (one pack, one concat)."""
    n = len(data)
    size = _TASK_FRAME.size - FRAME_PREFIX + n
    return _TASK_FRAME.pack(size, TASKS, 0, task_id, fid, kind, timeout, 0, 0, n) + data


def pack_task(
    out: bytearray, task_id: int, fid: int, kind: int, timeout: float, nbuf: int, nfd: int, data
) -> None:
    """Append one task record to a TASKS body."""
    out += TASK_HEAD.pack(task_id, fid, kind, timeout, nbuf, nfd, len(data))
    out += data


def pack_result(
    out: bytearray, task_id: int, status: int, duration: float, nbuf: int, nfd: int, data
) -> None:
    """Append one result record to a RESULTS body."""
    out += RESULT_HEAD.pack(task_id, status, duration, nbuf, nfd, len(data))
    out += data


def pack_inodes(inodes: list[int]) -> bytes:
    """A RELEASED body."""
    return struct.pack(f"<{len(inodes)}Q", *inodes)


def unpack_inodes(body: memoryview) -> list[int]:
    return list(struct.unpack(f"<{len(body) // INODE.size}Q", body))


def map_frame(key: int, name: str | None) -> bytes:
    """A whole MAP frame (its one fd goes beside it)."""
    return frame(MAP, MAP_HEAD.pack(key) + (name or "").encode(), 1)


def unsent_frame(key: int, reason: str) -> bytes:
    """A MAP frame without its fd: the region could not be sent (*reason*)."""
    return frame(MAP, MAP_HEAD.pack(key) + reason.encode(), 0)


def forget_frame(keys: list[int]) -> bytes:
    """A whole FORGET frame."""
    return frame(FORGET, struct.pack(f"<{len(keys)}Q", *keys))


def unpack_keys(body: memoryview) -> list[int]:
    return list(struct.unpack(f"<{len(body) // KEY.size}Q", body))


def iter_tasks(body: memoryview) -> Iterator[TaskRecord]:
    """The task records of a TASKS body, in order."""
    unpack, size, offset, end = TASK_HEAD.unpack_from, TASK_HEAD.size, 0, len(body)
    while offset < end:
        task_id, fid, kind, timeout, nbuf, nfd, n = unpack(body, offset)
        offset += size
        yield (task_id, fid, kind, timeout, nbuf, nfd, body[offset : offset + n])
        offset += n


def iter_results(body: memoryview) -> Iterator[ResultRecord]:
    """The result records of a RESULTS body, in order."""
    unpack, size, offset, end = RESULT_HEAD.unpack_from, RESULT_HEAD.size, 0, len(body)
    while offset < end:
        task_id, status, duration, nbuf, nfd, n = unpack(body, offset)
        offset += size
        yield (task_id, status, duration, nbuf, nfd, body[offset : offset + n])
        offset += n
