"""The child side of bench_pool.py: each function measures one library on one scenario.

``bench_pool.py`` runs every (library, scenario) pair as ``bench_pool.py --child <spec-json>`` in a
fresh process; that process calls ``child_main(spec)`` here, which prints one JSON result line
(``_common.emit_result``). Keeping the measuring code apart from the orchestration and printing
keeps each file to one job.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from typing import Any

import _tasks
from _common import (
    LIBS,
    STANDIN_ENV,
    child_watchdog,
    descendants,
    emit_result,
    median,
    percentile,
    pss_bytes,
    rss_bytes,
    uss_bytes,
)

# Each function below runs inside a fresh subprocess and measures one library on one scenario.


def _preimport(key: str) -> None:
    """Import the library before any timer starts: start-up is the pool's, not the import's."""
    mods = {
        "procpool": "procpool",
        "mp": "multiprocessing.pool",
        "cf": "concurrent.futures.process",
        "loky": "loky",
        "mpire": "mpire",
        "pebble": "pebble",
    }
    if key == "procpool" and os.environ.get(STANDIN_ENV):
        key = "mp"
    __import__(mods[key])


def child_startup(lib: Any, spec: dict) -> dict:
    n = spec["workers"]
    out: dict[str, Any] = {"import_s": spec["import_s"]}
    for phase in ("cold", "warm"):
        t0 = time.perf_counter()
        pool = lib.open(n)
        lib.apply(pool, _tasks.noop, None)
        t1 = time.perf_counter()
        lib.close(pool)
        t2 = time.perf_counter()
        out[f"{phase}_s"] = t1 - t0
        out[f"{phase}_close_s"] = t2 - t1
    return out


def _timed_runs(repeats: int, run: Any, check: Any) -> list[float]:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run()
        samples.append(time.perf_counter() - t0)
        check(res)
        res = None  # (not alive through the next run: a caller drops what it has used)
    return samples


def _check_incremented(n: int, ordered: bool) -> Any:
    """Every result of x+1 over range(n) once, in order where the call promises order."""
    want = list(range(1, n + 1))

    def check(res: Any) -> None:
        got = list(res) if ordered else sorted(res)
        if got != want:
            bad = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), n),
            )
            raise AssertionError(
                f"wrong results: {len(got)} of them, item {bad}: {got[bad : bad + 1]}"
            )

    return check


def _numbers(n: int) -> Any:
    """A generator: an input nobody can cut or size ahead (a file's lines, a query's rows)."""
    yield from range(n)


MAP_INPUTS = {"range": range, "list": lambda n: list(range(n)), "gen": _numbers}


def child_map(lib: Any, spec: dict) -> dict:
    """The library's default map (or procpool's / multiprocessing's imap) over *items* of
    the kind spec["input"] names: a list (made before the timer starts), a generator, or a
    range (which procpool sends as ranges, uncut)."""
    n, items, method = spec["workers"], spec["items"], spec.get("method", "map")
    make = MAP_INPUTS[spec.get("input", "list")]
    pool = lib.open(n)
    try:
        if method == "map":

            def run_on(source: Any) -> Any:
                return lib.map(pool, _tasks.inc, source)

        else:  # imap / imap_unordered with default arguments (multiprocessing.Pool's API)

            def run_on(source: Any) -> Any:
                return list(getattr(pool, method)(_tasks.inc, source))

        run_on(make(1000))  # warm-up
        samples = []
        for _ in range(spec["repeats"]):
            source = make(items)
            t0 = time.perf_counter()
            res = run_on(source)
            samples.append(time.perf_counter() - t0)
            _check_incremented(items, method != "imap_unordered")(res)
    finally:
        lib.close(pool)
    return {"samples_s": samples}


def child_per_item(lib: Any, spec: dict) -> dict:
    """One apply_async (or submit) per item, then collect every result."""
    n, items = spec["workers"], spec["items"]
    pool = lib.open(n)
    try:
        if spec.get("api") == "submit":  # procpool.Pool.submit -> concurrent.futures.Future

            def one(i: int) -> Any:
                return pool.submit(_tasks.inc, i)

            def get(h: Any) -> Any:
                return h.result(60)
        else:

            def one(i: int) -> Any:
                return lib.submit(pool, _tasks.inc, i)

            def get(h: Any) -> Any:
                return lib.result(h, 60)

        def run() -> list:
            handles = [one(i) for i in range(items)]
            return [get(h) for h in handles]

        run_small = [get(h) for h in [one(i) for i in range(500)]]
        del run_small
        samples = _timed_runs(spec["repeats"], run, _check_incremented(items, True))
    finally:
        lib.close(pool)
    return {"samples_s": samples}


def child_latency(lib: Any, spec: dict) -> dict:
    n = spec["workers"]
    pool = lib.open(n)
    p50s, p99s = [], []
    try:
        for _ in range(spec["warmup"]):
            lib.apply(pool, _tasks.inc, 1)
        for _ in range(spec["repeats"]):
            lat = []
            for i in range(spec["calls"]):
                t0 = time.perf_counter_ns()
                r = lib.apply(pool, _tasks.inc, i)
                lat.append(time.perf_counter_ns() - t0)
                if r != i + 1:
                    raise AssertionError(f"apply returned {r!r}, expected {i + 1}")
            p50s.append(percentile(lat, 50) / 1e9)
            p99s.append(percentile(lat, 99) / 1e9)
    finally:
        lib.close(pool)
    return {"p50_s": p50s, "p99_s": p99s}


def _read_spinning(fd: int, n: int) -> bytes:
    """os.read on a non-blocking fd, retried without sleeping (a busy-polling reader)."""
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            pass


def child_rawpipe(spec: dict) -> dict:
    """The floor: an 8-byte message to a forked Python process over os.pipe and back, with
    blocking reads or (spec["spin"]) with both ends polling without sleeping, as procpool's
    caller and worker do for a while before they sleep: the floor is the faster of the two."""
    spin = bool(spec.get("spin"))
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    if spin:
        os.set_blocking(down_r, False)
        os.set_blocking(up_r, False)
    read = _read_spinning if spin else os.read
    pid = os.fork()
    if pid == 0:  # the echo process
        os.close(down_w)
        os.close(up_r)
        while True:
            msg = read(down_r, 8)
            if not msg:
                os._exit(0)
            os.write(up_w, msg)
    os.close(down_r)
    os.close(up_w)
    p50s, p99s = [], []
    msg = b"12345678"
    for _ in range(spec["warmup"]):
        os.write(down_w, msg)
        read(up_r, 8)
    for _ in range(spec["repeats"]):
        lat = []
        for _ in range(spec["calls"]):
            t0 = time.perf_counter_ns()
            os.write(down_w, msg)
            read(up_r, 8)
            lat.append(time.perf_counter_ns() - t0)
        p50s.append(percentile(lat, 50) / 1e9)
        p99s.append(percentile(lat, 99) / 1e9)
    os.close(down_w)
    os.waitpid(pid, 0)
    return {"p50_s": p50s, "p99_s": p99s}


def child_arrays(lib: Any, spec: dict) -> dict:
    import numpy as np

    n, size, count = spec["workers"], spec["nbytes"], spec["count"]
    as_bytes = spec.get("kind") == "bytes"
    # "vary": each map's buffers 4 KiB larger than the last one's (sizes that change from call
    # to call), where a sender that reuses its buffers only at one size would gain nothing
    vary = bool(spec.get("vary"))
    sizes = (size + 4096 * k * vary for k in itertools.count())  # (the first: the warm-up's)
    pool = lib.open(n)
    try:
        if spec["direction"] == "args":

            def inputs(nbytes: int) -> list:
                if as_bytes:
                    return [bytes([i]) * nbytes for i in range(count)]
                return [np.full(nbytes // 8, float(i)) for i in range(count)]

            # every map's inputs made before the timers start (one list if the size is fixed;
            # else one for the checksums, one for the warm-up, one for each timed map)
            made = [inputs(next(sizes)) for _ in range(1 + (spec["repeats"] + 1) * vary)]
            runs = iter(made[1:])
            current = made[0]

            def run() -> Any:
                nonlocal current
                current = next(runs, current)
                return lib.map(pool, _tasks.nbytes, current)

            def check(res: Any) -> None:
                want = [len(memoryview(a).cast("B")) for a in current]
                if list(res) != want:
                    raise AssertionError(f"wrong results: {list(res)[:3]}...")

            # every byte arrived (once, outside the timer: the timed task only reads the size)
            sums = lib.map(pool, _tasks.checksum, made[0])
            if list(sums) != [_tasks.checksum(a) for a in made[0]]:
                raise AssertionError("an argument arrived altered")
        else:
            make = _tasks.make_bytes if as_bytes else _tasks.make_array
            if vary and not as_bytes:  # (a view of one cached array: no new
                make = _tasks.make_array_view  # array's page faults in the timed call)
            asked = next(sizes)

            def run() -> Any:
                nonlocal asked
                asked = next(sizes)
                return lib.map(pool, make, [asked] * count)

            def check(res: Any) -> None:  # (every byte of every result; outside the timer)
                res = list(res)
                want = _tasks.checksum(make(asked))
                if len(res) != count or any(_tasks.checksum(a) != want for a in res):
                    raise AssertionError("wrong results")

        check(run())  # warm-up: workers build (and cache) their result arrays here
        samples = _timed_runs(spec["repeats"], run, check)
    finally:
        lib.close(pool)
    return {"samples_s": samples, "bytes": size * count}


def child_memcpy(spec: dict) -> dict:
    import numpy as np

    size = spec["nbytes"]
    src = np.ones(size // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    samples = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        samples.append(time.perf_counter() - t0)
    return {"samples_s": samples, "bytes": size}


def _make_shared_array(cls: Any, nitems: int) -> Any:
    """procpool.SharedArray's constructor is still settling: try the likely spellings."""
    import numpy as np

    attempts = [
        lambda: cls((nitems,), np.float64),
        lambda: cls(shape=(nitems,), dtype=np.float64),
        lambda: cls(np.float64, nitems),
        lambda: cls("d", nitems),
        lambda: cls.zeros((nitems,), np.float64),
    ]
    errors = []
    for make in attempts:
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - try the next spelling
            errors.append(repr(exc))
    raise RuntimeError("could not construct procpool.SharedArray: " + "; ".join(errors))


def child_shared_array(spec: dict) -> dict:
    import procpool

    where = "procpool.SharedArray"
    cls = getattr(procpool, "SharedArray", None)
    if cls is None:  # written but not exported yet: measure it, and say so
        try:
            from procpool.shared import SharedArray as cls

            where = "procpool.shared.SharedArray (not exported from procpool yet)"
        except ImportError:
            return {"skipped": "procpool.SharedArray does not exist yet"}
    n = spec["workers"]
    sa = _make_shared_array(cls, spec["nbytes"] // 8)
    lib = LIBS["procpool"]
    pool = lib.open(n)
    out: dict[str, Any] = {"type": where}
    # The two kinds of call alternate, the order flipping each round: this VM's wake-up time
    # swings between phases within seconds (a raw pipe round trip 5 or 90 us), so blocks of
    # one kind then the other measured the phases as much as the argument.
    lat: dict[str, list[int]] = {"int": [], "shared": []}
    try:
        for _ in range(spec["warmup"]):
            lib.apply(pool, _tasks.noop, 1)
            lib.apply(pool, _tasks.noop, sa)
        for i in range(2 * spec["calls"]):
            pair = (("int", 1), ("shared", sa)) if i % 2 else (("shared", sa), ("int", 1))
            for label, arg in pair:
                t0 = time.perf_counter_ns()
                lib.apply(pool, _tasks.noop, arg)
                lat[label].append(time.perf_counter_ns() - t0)
        for label, samples in lat.items():
            out[label] = [median(samples) / 1e9]
    finally:
        lib.close(pool)
    return out


def child_memory_imap(lib: Any, spec: dict) -> dict:
    """Parent RSS growth while imap consumes a lazy generator of ``items`` ints."""
    n, items = spec["workers"], spec["items"]
    pool = lib.open(n)
    try:
        sum(pool.imap(_tasks.inc, range(1000)))
        base = rss_bytes()
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        kw = {"chunksize": spec["chunksize"]} if spec.get("chunksize") else {}
        t0 = time.perf_counter()
        count = 0
        total = 0
        for r in pool.imap(_tasks.inc, (i for i in range(items)), **kw):
            count += 1
            total += r
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], rss_bytes())
        if count != items or total != items * (items + 1) // 2:
            raise AssertionError(f"imap returned {count} results, checksum {total}")
    finally:
        lib.close(pool)
    return {"base_rss": base, "peak_rss": peak[0], "elapsed_s": elapsed}


def child_idle_rss(lib: Any, spec: dict) -> dict:
    n = spec["workers"]
    # 5c: a function of the main script (this child's __main__ is bench_pool.py)
    func = sys.modules["__main__"].main_inc if spec.get("main_func") else _tasks.inc
    parent_before = rss_bytes()
    pool = lib.open(n)
    try:
        for i in range(4 * n):  # make sure lazily started workers exist
            lib.apply(pool, func, i)
        time.sleep(0.5)  # let workers settle to idle (no condition to wait on: we only observe)
        kids = descendants(os.getpid())
        rss = [rss_bytes(p) for p in kids]
        pss = [pss_bytes(p) for p in kids]
        uss = [uss_bytes(p) for p in kids]
        parent_after = rss_bytes()
    finally:
        lib.close(pool)
    return {
        "procs": len(kids),
        "rss": rss,
        "pss": pss,
        "uss": uss,
        "parent_growth": parent_after - parent_before,
    }


def child_main(spec: dict) -> None:
    child_watchdog(spec)
    scen = spec["scenario"]
    if scen == "rawpipe":
        emit_result(child_rawpipe(spec))
        return
    if scen == "memcpy":
        emit_result(child_memcpy(spec))
        return
    if scen == "shared_array":
        _preimport("procpool")
        emit_result(child_shared_array(spec))
        return
    lib = LIBS[spec["lib"]]
    t0 = time.perf_counter()
    _preimport(lib.key)
    spec["import_s"] = time.perf_counter() - t0
    fn = {
        "startup": child_startup,
        "map": child_map,
        "per_item": child_per_item,
        "latency": child_latency,
        "arrays": child_arrays,
        "memory_imap": child_memory_imap,
        "idle_rss": child_idle_rss,
    }[scen]
    emit_result(fn(lib, spec))
