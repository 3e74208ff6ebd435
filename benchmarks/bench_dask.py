"""DaskPool on a local Dask cluster next to procpool.Pool and multiprocessing.Pool.

What a program pays for moving from the local pool to the Dask backend on one machine (the
scale-out path costs something even before the network): every library with the same number of
workers (2 by default), measured one after the other in this process, medians of repeats.

1. start-up to first result (for DaskPool: starting its own LocalCluster);
2. ``map`` of 10,000 tiny items (``x + 1``) with the default chunksize;
3. 1,000 ``apply_async`` calls, one task each (DaskPool: one Dask task each);
4. one ``apply`` round trip, p50.

    python benchmarks/bench_dask.py              # about a minute on 2 cores
    python benchmarks/bench_dask.py --workers 4

Prints; asserts nothing.  Ratios are against procpool.Pool measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt, fmt_ratio, median, print_header, print_table, ratio  # noqa: E402

import procpool  # noqa: E402
from procpool.backends.dask import DaskPool  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def measure(make: Callable[[], Any], repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    pool = make()
    try:
        pool.apply(inc, (1,))
        startup = time.perf_counter() - t0
        items = list(range(10_000))
        maps, applies, rtts = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            assert pool.map(inc, items)[-1] == 10_000
            maps.append(time.perf_counter() - t)
            t = time.perf_counter()
            results = [pool.apply_async(inc, (i,)) for i in range(1000)]
            assert [r.get(60) for r in results][-1] == 1000
            applies.append(time.perf_counter() - t)
            for i in range(50):
                t = time.perf_counter()
                pool.apply(inc, (i,))
                rtts.append(time.perf_counter() - t)
    finally:
        pool.terminate()
        pool.join()
    return {
        "startup": startup,
        "map10k": median(maps),
        "apply1k": median(applies),
        "rtt": median(rtts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_header("DaskPool (local cluster) vs procpool.Pool vs multiprocessing.Pool", sys.argv)
    n = args.workers
    libs: dict[str, Callable[[], Any]] = {
        "procpool.Pool": lambda: procpool.Pool(n),
        "multiprocessing.Pool": lambda: multiprocessing.Pool(n),
        "DaskPool (own LocalCluster)": lambda: DaskPool(n),
    }
    figures = {name: measure(make, args.repeats) for name, make in libs.items()}
    base = figures["procpool.Pool"]
    rows = []
    for name, f in figures.items():
        rows.append(
            [
                name,
                fmt(f["startup"], "s"),
                f"{fmt(f['map10k'], 's')} ({fmt(10_000 / f['map10k'], 'items/s')})",
                f"{fmt(f['apply1k'], 's')} ({fmt(1000 / f['apply1k'], 'tasks/s')})",
                fmt(f["rtt"], "s"),
                fmt_ratio(ratio(f["map10k"], base["map10k"])),
                fmt_ratio(ratio(f["apply1k"], base["apply1k"])),
            ]
        )
    print_table(
        f"{n} workers, tiny tasks (x + 1)",
        [
            "library",
            "start-up",
            "map 10k items",
            "1k apply_async",
            "apply p50",
            "map time vs procpool",
            "apply_async time vs procpool",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
