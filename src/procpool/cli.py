"""The ``procpool`` command: ``procpool demo`` runs the tutorial's pool scenario for real."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from . import __version__
from .errors import WorkerLostError
from .pool import Pool


def _event(n: int) -> tuple[int, int, int, float]:
    """An 'event' of the tutorial: some work that takes a moment, done in a worker."""
    started = time.perf_counter()
    limit = 20_000 + n * 5_000
    total = sum(i * i for i in range(limit))
    time.sleep(0.05)
    return os.getpid(), limit, total, time.perf_counter() - started


def _square(x: int) -> int:
    return x * x


def _crash() -> None:
    os.kill(os.getpid(), 9)


def demo(processes: int, events: int) -> int:
    """Create a pool, queue events with apply_async, collect results, close and join."""
    print(f"procpool {__version__} demo: the tutorial's process pool, for real\n")
    t0 = time.perf_counter()
    pool = Pool(processes)
    print(f"1. created a pool of {processes} processes (start method: {pool.start_method})")
    results = [pool.apply_async(_event, (n,)) for n in range(events)]
    print(f"2. queued {events} events with apply_async")
    by_worker: dict[int, int] = {}
    for n, r in enumerate(results):
        pid, limit, total, took = r.get(timeout=30)
        by_worker[pid] = by_worker.get(pid, 0) + 1
        print(
            f"   event {n:2d}: sum of squares below {limit:,} = {total:,}"
            f"  (worker pid {pid}, {took * 1000:.1f} ms)"
        )
    shares = ", ".join(f"pid {pid}: {count}" for pid, count in sorted(by_worker.items()))
    print(f"3. the pool's processes handled the events in turn ({shares})")
    squares = pool.map(_square, range(10))
    print(f"   pool.map(square, range(10)) = {squares}")
    lost = pool.apply_async(_crash)
    try:
        lost.get(timeout=30)
    except WorkerLostError as exc:
        print(f"   a worker killed mid-task is reported, not hung on: {exc}")
    print(f"   ...and the pool goes on: apply(square, (12,)) = {pool.apply(_square, (12,))}")
    pool.close()
    pool.join()
    print(f"4. pool closed and joined; all workers exited ({time.perf_counter() - t0:.2f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="procpool", description=__doc__)
    parser.add_argument("--version", action="version", version=f"procpool {__version__}")
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run the tutorial's pool scenario and print what happens")
    d.add_argument("-n", "--processes", type=int, default=4, help="pool size (default 4)")
    d.add_argument("-e", "--events", type=int, default=10, help="events to queue (default 10)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            return demo(args.processes, args.events)
        except BrokenPipeError:  # `procpool demo | head`: the reader left, nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            return 0
    parser.print_help()
    return 0
