"""How procpool.Pool scales with the number of workers, next to multiprocessing.Pool,
concurrent.futures.ProcessPoolExecutor and loky.

For workers in 1, 2, 4, 8, 16 (capped at the CPUs this process may use; ``--workers`` overrides):

a. CPU-bound tasks of about 1 ms (a calibrated busy loop, not a sleep), one ``apply_async`` /
   ``submit`` per task. Parallel efficiency = throughput(n) / (n * throughput(1)), each library
   against its own single worker; and useful-work efficiency = the tasks' CPU time, measured in
   the workers, / (n * wall time), which shared machines' uneven clocks do not skew.
b. One ``apply_async``/``submit`` per ``x + 1`` item (tasks/s): where the parent's dispatch, not
   the workers, is the limit.

Every (library, worker count, scenario) runs in a fresh subprocess with a hard timeout. Made for
the 16-core machine (a few minutes); ``--quick`` runs in about a minute on 2 cores.

    python benchmarks/bench_scaling.py [--quick] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tasks  # noqa: E402
from _common import (  # noqa: E402
    LIBS,
    STANDIN_ENV,
    child_watchdog,
    emit_result,
    fmt,
    median,
    print_header,
    print_table,
    procpool_available,
    run_child,
)

SCRIPT = os.path.abspath(__file__)
SCALING_LIBS = ["procpool", "mp", "cf", "loky"]

# ====================================================================== child side


def child_main(spec: dict) -> None:
    child_watchdog(spec)
    if spec["scenario"] == "inprocess":
        samples = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            for _ in range(spec["tasks"]):
                _tasks.spin(spec["spin"])
            samples.append(time.perf_counter() - t0)
        emit_result({"samples_s": samples})
        return
    lib = LIBS[spec["lib"]]
    n = spec["workers"]
    if spec["scenario"] == "cpu":
        fn, arg, tasks = _tasks.spin_timed, spec["spin"], spec["tasks"]
    elif spec["scenario"] == "timeline":
        fn, arg, tasks = _tasks.spin_stamped, spec["spin"], spec["tasks"]
    else:
        fn, arg, tasks = _tasks.inc, None, spec["tasks"]
    pool = lib.open(n)
    samples, busy, timelines = [], [], []
    try:
        # Warm-up: every worker started and has run the function (loky and mpire start lazily).
        warm = [lib.submit(pool, fn, arg if arg is not None else i) for i in range(4 * n)]
        for h in warm:
            lib.result(h, 60)
        for _ in range(spec["repeats"]):
            cpu0 = parent_cpu()
            t0 = time.perf_counter()
            handles = [lib.submit(pool, fn, arg if arg is not None else i) for i in range(tasks)]
            submitted = time.perf_counter()
            results = [lib.result(h, 120) for h in handles]
            t1 = time.perf_counter()
            wall = t1 - t0
            samples.append(wall)
            if spec["scenario"] == "timeline":
                timelines.append(timeline(results, n, t0, submitted, t1))
                timelines[-1]["parent_cpu"] = (parent_cpu() - cpu0) / tasks
            elif arg is None and sum(results) != tasks * (tasks + 1) // 2:
                raise AssertionError("wrong results")
            elif arg is not None:  # fraction of the n workers' wall time spent in the task itself
                busy.append(sum(results) / (n * wall))
    finally:
        lib.close(pool)
    emit_result({"samples_s": samples, "busy": busy, "timelines": timelines})


def parent_cpu() -> float:
    """CPU seconds used so far by this process, all its threads (not its children)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timeline(stamps: list, n: int, t0: float, submitted: float, t1: float) -> dict[str, float]:
    """Where the n workers' time (n * wall) went during one run of stamped tasks.

    ``ramp``: from the first submission to each worker's first task; ``gaps``: between one task's
    end and the worker's next start (the dispatch round trip); ``tail``: from each worker's
    last task to the last result in the parent's hands; ``task``: inside the tasks (wall),
    ``cpu``: the tasks' CPU time.  The four wall shares add up to 1.
    """
    per_pid: dict[int, list[tuple[float, float]]] = {}
    cpu = 0.0
    for pid, start, end, used in stamps:
        per_pid.setdefault(pid, []).append((start, end))
        cpu += used
    total = n * (t1 - t0)
    ramp = gaps = tail = in_task = 0.0
    between: list[float] = []
    for runs in per_pid.values():
        runs.sort()
        ramp += runs[0][0] - t0
        tail += t1 - runs[-1][1]
        for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
            between.append(start - end)
        in_task += sum(end - start for start, end in runs)
    gaps = sum(between)
    ramp += (n - len(per_pid)) * (t1 - t0)  # workers that ran nothing idled throughout
    between.sort()
    return {
        "ramp": ramp / total,
        "gaps": gaps / total,
        "tail": tail / total,
        "task": in_task / total,
        "cpu": cpu / total,
        "gap_p50": between[len(between) // 2] if between else 0.0,
        "gap_p99": between[int(len(between) * 0.99)] if between else 0.0,
        "submit": submitted - t0,
        "wall": t1 - t0,
    }


# ====================================================================== parent side


def label(key: str) -> str:
    stand_in = key == "procpool" and os.environ.get(STANDIN_ENV)
    return LIBS[key].label + (" [STAND-IN]" if stand_in else "")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def print_timeline(
    counts: list[int], libs: list[str], spin: int, per_worker: int, repeats: int, problems: list
) -> None:
    """(a) again with stamped tasks: the shares of n * wall, medians over the repeats."""
    headers = [
        "library",
        "workers",
        "in tasks",
        "CPU",
        "ramp",
        "gaps",
        "tail",
        "gap p50",
        "gap p99",
        "submit loop",
        "wall",
        "parent CPU/task",
    ]
    rows = []
    for key in libs:
        for n in counts:
            spec = {
                "scenario": "timeline",
                "lib": key,
                "workers": n,
                "spin": spin,
                "tasks": per_worker * n,
                "repeats": repeats,
            }
            res = run_child(SCRIPT, spec, 120)
            if "error" in res:
                problems.append(f"timeline / {key} / {n} workers: {res['error']}")
                continue
            tl = res["timelines"]

            def med(field: str, tl: list = tl) -> float:
                return median([t[field] for t in tl])

            rows.append(
                [
                    label(key),
                    str(n),
                    *[f"{100 * med(f):.1f} %" for f in ("task", "cpu", "ramp", "gaps", "tail")],
                    fmt(med("gap_p50"), "s"),
                    fmt(med("gap_p99"), "s"),
                    fmt(med("submit"), "s"),
                    fmt(med("wall"), "s"),
                    fmt(med("parent_cpu"), "s"),
                ]
            )
    print_table(
        "a. where the workers' time went (shares of n * wall; in tasks + ramp + gaps + tail = "
        "100 %): ramp = submission to each worker's first task, gaps = between a worker's "
        "tasks, tail = its last task to the last result",
        headers,
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="*",
        help="worker counts (default 1 2 4 8 16, capped at the usable CPUs)",
    )
    ap.add_argument("--libs", nargs="*", default=SCALING_LIBS, choices=SCALING_LIBS)
    ap.add_argument(
        "--standin",
        action="store_true",
        help="fill procpool's rows with multiprocessing.Pool (harness test only)",
    )
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="add where the workers' time went in (a): ramp-up, gaps between tasks, tail",
    )
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # run_all passes it
    args = ap.parse_args(argv)
    if args.standin:
        os.environ[STANDIN_ENV] = "1"
    cpus = usable_cpus()
    counts = args.workers or [n for n in (1, 2, 4, 8, 16) if n <= cpus]
    if 1 not in counts:
        counts = [1, *counts]  # efficiency needs the single-worker figure
    libs = [k for k in args.libs if k != "procpool" or procpool_available()]
    print_header(
        "procpool scaling benchmarks (bench_scaling.py)", ["benchmarks/bench_scaling.py", *argv]
    )
    print(f"- usable CPUs: {cpus}; worker counts: {counts}")
    t_start = time.perf_counter()

    per_worker = 100 if args.quick else 500
    repeats = 3 if args.quick else 5
    # A machine just started (or busy a moment ago) can run the calibration several times
    # slower than the benchmark later: check the count in a fresh process, and correct it.
    spin, t_task, tries = _tasks.calibrate_spin(0.001), None, 0
    while True:
        tries += 1
        inproc = run_child(
            SCRIPT, {"scenario": "inprocess", "spin": spin, "tasks": 500, "repeats": 5}, 60
        )
        if "samples_s" not in inproc:
            break
        t_task = median(inproc["samples_s"]) / 500
        if 0.8e-3 <= t_task <= 1.25e-3 or tries == 3:  # (the count used is one measured)
            break
        spin = max(1, round(spin * 1e-3 / t_task))
    print(
        f"- busy loop: {spin} iterations ≈ {fmt(t_task, 's')} per task in-process "
        f"(calibrated at start, checked {tries}x in a fresh process; {per_worker} tasks per "
        f"worker, {repeats} repeats, median)"
    )
    print()
    problems: list[str] = []

    busy: dict[tuple[str, int], float | None] = {}

    def measure(scenario: str, key: str, n: int, tasks: int) -> float | None:
        spec = {
            "scenario": scenario,
            "lib": key,
            "workers": n,
            "spin": spin,
            "tasks": tasks,
            "repeats": repeats,
        }
        res = run_child(SCRIPT, spec, 120)
        if "error" in res:
            problems.append(f"{scenario} / {key} / {n} workers: {res['error']}")
            busy[key, n] = None
            return None
        busy[key, n] = median(res["busy"]) if res.get("busy") else None
        return tasks / median(res["samples_s"])

    # a. CPU-bound 1 ms tasks
    cpu: dict[tuple[str, int], float | None] = {}
    for n in counts:
        for key in libs:
            cpu[key, n] = measure("cpu", key, n, per_worker * n)
    headers = ["library", *[f"{n} w" for n in counts]]
    rows_thr, rows_eff, rows_ideal = [], [], []
    for key in libs:
        base = cpu.get((key, 1))
        rows_thr.append([label(key), *[fmt(cpu[key, n], "/s") for n in counts]])
        rows_eff.append(
            [
                label(key),
                *[
                    "—"
                    if cpu[key, n] is None or not base
                    else f"{100 * cpu[key, n] / (n * base):.0f} %"
                    for n in counts
                ],
            ]
        )
        rows_ideal.append(
            [
                label(key),
                *["—" if busy[key, n] is None else f"{100 * busy[key, n]:.0f} %" for n in counts],
            ]
        )
    if "procpool" not in libs:
        for rows in (rows_thr, rows_eff, rows_ideal):
            rows.insert(0, ["procpool.Pool", *["not available"] * len(counts)])
    print_table(
        "a. 1 ms CPU-bound tasks, one apply_async/submit each: throughput (tasks/s)",
        headers,
        rows_thr,
    )
    print_table(
        "a. parallel efficiency vs the library's own 1 worker: throughput(n) / (n * throughput(1))",
        headers,
        rows_eff,
    )
    print_table(
        "a. useful-work efficiency: sum of the tasks' CPU time (measured in the workers) / "
        "(n * wall time)",
        headers,
        rows_ideal,
    )

    if args.timeline:
        print_timeline(counts, libs, spin, per_worker, repeats, problems)

    # b. x+1 one apply_async/submit per item
    items = 5_000 if args.quick else 10_000
    tiny = {(key, n): measure("tiny", key, n, items) for n in counts for key in libs}
    rows = [[label(key), *[fmt(tiny[key, n], "tasks/s") for n in counts]] for key in libs]
    if "mp" in libs:
        rows.extend(
            [
                f"{label(key)} ÷ mp",
                *[
                    "—"
                    if tiny[key, n] is None or not tiny["mp", n]
                    else f"{tiny[key, n] / tiny['mp', n]:.2f}x"
                    for n in counts
                ],
            ]
            for key in libs
            if key != "mp"
        )
    if "procpool" not in libs:
        rows.insert(0, ["procpool.Pool", *["not available"] * len(counts)])
    print_table(f"b. One apply_async/submit per x+1 item, {items:,} items (tasks/s)", headers, rows)

    if problems:
        print("### Problems (errors and timeouts)\n")
        for p in problems:
            print(f"- {p}")
        print()
    print(f"(bench_scaling.py finished in {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
