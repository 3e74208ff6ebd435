"""Chaos and soak: small tasks while a separate process SIGKILLs a random worker every 100 ms.

Counts every task's outcome (a result, or WorkerLostError once its retries are spent) through
the callbacks, so a task that ended twice or never is seen: zero lost, zero duplicated, zero
hangs is the bar. Prints throughput under chaos as a ratio of throughput without it (same run),
then runs pool lifecycles and counts what they leave behind (processes, fds, /dev/shm entries).

    python benchmarks/chaos.py                      # the full run: 1,000,000 tasks, 1,000 pools
    python benchmarks/chaos.py --tasks 20000 --lifecycles 50   # the short one CI runs

Exit status 1 if any task was lost or duplicated, or anything leaked.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import procpool  # noqa: E402

WINDOW = 20_000  # tasks in flight at once (bounds the parent's memory for a million tasks)


def inc(x: int) -> int:
    return x + 1


def killer(pids, interval: float, stop) -> None:
    """SIGKILL a random pool worker (from the shared *pids* array) every *interval* seconds."""
    rng = random.Random(1)
    while not stop.wait(interval):
        workers = [p for p in pids[:] if p]
        if workers:
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_tasks(n: int, processes: int, retries: int, publish=None) -> dict:
    """Run n tasks in windows; return outcome counts and the time taken.

    *publish*, if given, is a shared int array kept filled with the pool's worker pids.
    """
    seen = bytearray(n)  # callbacks per task: must end at exactly 1
    errors: list[BaseException] = []
    lock = threading.Lock()

    def on_result(value: int) -> None:
        with lock:
            seen[value - 1] += 1

    started = time.perf_counter()
    with procpool.Pool(processes, retries=retries) as pool:
        done = threading.Event()

        def publisher() -> None:
            while not done.wait(0.01):
                current = pool.pids()[: len(publish)]
                publish[:] = current + [0] * (len(publish) - len(current))

        if publish is not None:
            threading.Thread(target=publisher, daemon=True).start()
        for base in range(0, n, WINDOW):
            batch = []
            for i in range(base, min(n, base + WINDOW)):

                def on_error(exc: BaseException, i: int = i) -> None:
                    with lock:
                        seen[i] += 1
                        errors.append(exc)

                batch.append(
                    pool.apply_async(inc, (i,), callback=on_result, error_callback=on_error)
                )
            for r in batch:
                r.wait(120)  # a hang fails the run instead of blocking it
        done.set()
    took = time.perf_counter() - started
    lost = seen.count(0)
    dup = sum(1 for c in seen if c > 1)
    kinds: dict[str, int] = {}
    for e in errors:
        kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
    return {"time": took, "lost": lost, "duplicated": dup, "errors": kinds, "ok": n - len(errors)}


def snapshot() -> tuple[set[int], int, set[str]]:
    children = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        children.add(int(entry))
            except OSError:
                pass
    return children, len(os.listdir("/proc/self/fd")), set(os.listdir("/dev/shm"))


def lifecycles(count: int) -> dict:
    before = snapshot()
    started = time.perf_counter()
    for i in range(count):
        pool = procpool.Pool(2)
        assert pool.apply(inc, (i,)) == i + 1
        if i % 2:
            pool.close()
        else:
            pool.terminate()
        pool.join()
    took = time.perf_counter() - started
    deadline = time.monotonic() + 5
    while True:
        after = snapshot()
        leaked = (after[0] - before[0], after[1] - before[1], after[2] - before[2])
        if not (leaked[0] or leaked[1] > 0 or leaked[2]) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {
        "time": took,
        "processes": len(leaked[0]),
        "fds": max(0, leaked[1]),
        "shm": len(leaked[2]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--lifecycles", type=int, default=1_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between kills")
    parser.add_argument("--retries", type=int, default=1)
    args = parser.parse_args()

    print(f"chaos: {args.tasks:,} tasks of x+1 on {args.processes} workers, retries={args.retries}")
    calm = run_tasks(args.tasks, args.processes, args.retries)
    print(
        f"  without chaos: {args.tasks / calm['time']:,.0f} tasks/s, lost {calm['lost']},"
        f" duplicated {calm['duplicated']}, errors {calm['errors']}"
    )

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    pids = ctx.Array("i", 64, lock=False)
    proc = ctx.Process(target=killer, args=(pids, args.interval, stop), daemon=True)
    proc.start()
    try:
        storm = run_tasks(args.tasks, args.processes, args.retries, publish=pids)
    finally:
        stop.set()
        proc.join(10)
    ratio = calm["time"] / storm["time"]
    print(
        f"  under chaos (SIGKILL every {args.interval * 1000:.0f} ms):"
        f" {args.tasks / storm['time']:,.0f} tasks/s, lost {storm['lost']},"
        f" duplicated {storm['duplicated']}, ok {storm['ok']:,}, errors {storm['errors']}"
    )
    print(
        f"  throughput under chaos / without: {ratio:.2f}  (target >= 0.5:"
        f" {'PASS' if ratio >= 0.5 else 'MISS'})"
    )

    life = lifecycles(args.lifecycles)
    print(
        f"lifecycles: {args.lifecycles} pools created, used and closed/terminated in"
        f" {life['time']:.1f} s; leaked processes {life['processes']}, fds {life['fds']},"
        f" /dev/shm entries {life['shm']}"
    )
    bad = (
        calm["lost"]
        + calm["duplicated"]
        + storm["lost"]
        + storm["duplicated"]
        + life["processes"]
        + life["fds"]
        + life["shm"]
    )
    wrong_errors = set(storm["errors"]) - {"WorkerLostError"}
    if wrong_errors:
        print(f"unexpected error types under chaos: {wrong_errors}")
    return 1 if bad or wrong_errors or calm["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
