"""Task functions for the pool benchmarks.

They live in their own importable module (not in a ``__main__`` script) so that every library
under test -- fork, forkserver, spawn or loky's own start method -- pickles them by reference.
"""

from __future__ import annotations

import os
import time

_ARRAYS: dict[object, object] = {}


def inc(x: int) -> int:
    """The tiny task: ``x + 1``."""
    return x + 1


def noop(_x: object = None) -> None:
    """A task that does nothing (round-trip latency, start-up)."""
    return None


def getpid(_x: object = None) -> int:
    """The worker's pid (used to find worker processes for RSS)."""
    return os.getpid()


def nbytes(a: object) -> int:
    """Receive a buffer and return a small value: its size in bytes."""
    size = getattr(a, "nbytes", None)
    return int(size) if size is not None else len(a)  # type: ignore[arg-type]


def checksum(a: object) -> int:
    """CRC-32 of every byte of a buffer (an array or bytes): what arrived is what was sent."""
    import zlib

    return zlib.crc32(memoryview(a).cast("B"))  # type: ignore[arg-type]


def make_bytes(nbytes_: int) -> bytes:
    """Return ``nbytes_`` bytes, built once per worker process and cached (see make_array)."""
    data = _ARRAYS.get(("bytes", nbytes_))
    if data is None:
        data = _ARRAYS[("bytes", nbytes_)] = b"\x01" * nbytes_
    return data  # type: ignore[return-value]


def make_array(nbytes_: int) -> object:
    """Return a float64 array of ``nbytes_`` bytes.

    The array is built once per worker process and cached, so the timed part is the transport of
    the result, not page-faulting fresh memory in the worker.
    """
    import numpy as np

    arr = _ARRAYS.get(nbytes_)
    if arr is None:
        arr = np.ones(nbytes_ // 8, dtype=np.float64)
        _ARRAYS[nbytes_] = arr
    return arr


def make_array_view(nbytes_: int) -> object:
    """A float64 array of ``nbytes_`` bytes: a view of one array cached per worker, 1 MiB
    larger than the first size asked (grown if ever too small), so that sizes changing from
    call to call time the transport, not page-faulting a fresh array in the worker."""
    import numpy as np

    arr = _ARRAYS.get("view")
    if arr is None or arr.nbytes < nbytes_:
        arr = np.ones((nbytes_ + (1 << 20)) // 8, dtype=np.float64)
        _ARRAYS["view"] = arr
    return arr[: nbytes_ // 8]


def warm_array(nbytes_: int) -> int:
    """Build (and cache) the worker's result array ahead of the timed run."""
    return int(make_array(nbytes_).nbytes)  # type: ignore[attr-defined]


def spin(iterations: int) -> int:
    """A CPU-bound busy loop (no sleep): ``iterations`` additions."""
    total = 0
    for i in range(iterations):
        total += i
    return total


def spin_timed(iterations: int) -> float:
    """``spin`` that returns the CPU time it used in the worker (seconds).

    Summed over tasks this is the useful work done, measured where it ran: parallel efficiency
    from it does not depend on the parent's calibration or on per-core clock differences.
    """
    t0 = time.thread_time()
    spin(iterations)
    return time.thread_time() - t0


def spin_stamped(iterations: int) -> tuple[int, float, float, float]:
    """``spin`` that says where and when it ran: (pid, start, end, CPU seconds).

    ``start``/``end`` are ``time.perf_counter()`` readings (CLOCK_MONOTONIC, one clock for every
    process on the machine), so the parent can lay the tasks of all workers on one timeline and
    see where the workers' time went (``bench_scaling.py --timeline``).
    """
    c0, t0 = time.thread_time(), time.perf_counter()
    spin(iterations)
    return os.getpid(), t0, time.perf_counter(), time.thread_time() - c0


def calibrate_spin(target_s: float = 0.001, repeats: int = 7) -> int:
    """Return the ``spin`` iteration count that takes about ``target_s`` seconds here.

    A quarter second of spinning first lets the core reach its running clock.
    """
    warm_until = time.perf_counter() + 0.25
    while time.perf_counter() < warm_until:
        spin(1000)
    n = 10_000
    while True:
        t0 = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        n *= 2
    per_iter = dt / n
    n = max(1, int(target_s / per_iter))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        spin(n)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return max(1, int(n * target_s / samples[len(samples) // 2]))
