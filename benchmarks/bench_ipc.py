"""IPC primitives side by side: procpool vs multiprocessing vs faster-fifo vs raw os.pipe.

Every row of the issue's target table is measured in the same run, on the same machine: the
rates are medians of a few repeats, the ratio is procpool's rate over the reference's.

    python benchmarks/bench_ipc.py            # full run (~1-2 minutes on 2 cores)
    python benchmarks/bench_ipc.py --quick    # a short run

Process start-up is excluded: producers are started, report ready, and wait for a "go" before
the clock starts; the clock stops when the consumer has everything.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import procpool  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_header  # noqa: E402

try:
    from faster_fifo import Queue as FFQueue
except ImportError:  # pragma: no cover - optional
    FFQueue = None

CTX = mp.get_context("fork")
MIB = 1 << 20
PAYLOAD_1MIB = os.urandom(MIB)


# ---------------------------------------------------------------------------- harness
def _run(producer: Callable, nprod: int, consumer: Callable | None, args: tuple) -> float:
    """Start *nprod* producers (waiting for go), run *consumer* here; return seconds."""
    ready, go = CTX.Semaphore(0), CTX.Event()

    def body(i: int) -> None:
        ready.release()
        go.wait()
        producer(i, *args)

    procs = [CTX.Process(target=body, args=(i,)) for i in range(nprod)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    go.set()
    t0 = time.perf_counter()
    if consumer is not None:
        consumer(*args)
    for p in procs:  # without a consumer, the clock runs until the producers are done
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark producer failed: exit {p.exitcode}")
        if consumer is None:
            elapsed = time.perf_counter() - t0
    if consumer is not None:
        elapsed = time.perf_counter() - t0
    return elapsed


def _median_rate(amount: float, run: Callable[[], float], repeats: int) -> float:
    return statistics.median(amount / run() for _ in range(repeats))


# ---------------------------------------------------------------------------- queues
def q_put_each(i, q, n, nprod):
    put = q.put
    for k in range(n // nprod):
        put(k)


def q_get_each(q, n, nprod):
    get = q.get
    for _ in range(n // nprod * nprod):
        get()


def ff_get_each(q, n, nprod):
    get = q.get
    for _ in range(n // nprod * nprod):
        get(True, 60)


def q_put_batches(i, q, n, nprod, batch=1000):
    items = list(range(batch))
    put_many = q.put_many
    for _ in range(n // batch):
        put_many(items)


def pp_get_batches(q, n, nprod):
    got = 0
    while got < n:
        got += len(q.get_many(max_messages=1000))


def ff_get_batches(q, n, nprod):
    got = 0
    while got < n:
        got += len(q.get_many(True, 60, max_messages_to_get=1000))


def q_put_big(i, q, n, nprod):
    for _ in range(n):
        q.put(PAYLOAD_1MIB)


def q_get_big(q, n, nprod):
    for _ in range(n):
        q.get()


def ff_get_big(q, n, nprod):
    for _ in range(n):
        q.get(True, 60)


# ---------------------------------------------------------------------------- pipes
def pipe_send_each(i, conns, n, nprod):
    send = conns[1].send
    for k in range(n):
        send(k)


def pipe_recv_each(conns, n, nprod):
    recv = conns[0].recv
    for _ in range(n):
        recv()


def pipe_send_big(i, conns, n, nprod):
    send_bytes = conns[1].send_bytes
    for _ in range(n):
        send_bytes(PAYLOAD_1MIB)


def pipe_recv_big(conns, n, nprod):
    recv_bytes = conns[0].recv_bytes
    for _ in range(n):
        recv_bytes()


def raw_write_big(i, fds, n, nprod):
    w = fds[1]
    for _ in range(n):
        view = memoryview(PAYLOAD_1MIB)
        while view:
            view = view[os.write(w, view) :]


def tuned_pipe() -> tuple[int, int]:
    """An ``os.pipe`` whose buffer is 1 MiB (``F_SETPIPE_SZ``; Linux's default is 64 KiB):
    a tuned floor, next to the default one (where the kernel refuses, the default)."""
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MIB)
    except (OSError, AttributeError):
        pass
    return r, w


def raw_read_big(fds, n, nprod):
    r, left = fds[0], n * MIB
    while left:
        left -= len(os.read(r, min(left, MIB)))


# ---------------------------------------------------------------------------- values
def mp_value_incr(i, v, n, nprod):
    lock = v.get_lock()
    for _ in range(n):
        with lock:
            v.value += 1


def pp_value_add(i, v, n, nprod):
    add = v.add
    for _ in range(n):
        add(1)


def _value_rate(incr, make, n, repeats):
    def run():
        v = make()
        t = _run(incr, 2, None, (v, n, 2))  # both incrementers are children
        assert v.value == 2 * n, (v.value, 2 * n)
        return t

    return _median_rate(2 * n, run, repeats)


# ---------------------------------------------------------------------------- the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (fewer messages)")
    parser.add_argument("--repeats", type=int, default=None)
    opts = parser.parse_args()
    print_header(
        "procpool IPC benchmarks (bench_ipc.py)", ["benchmarks/bench_ipc.py", *sys.argv[1:]]
    )
    quick = opts.quick
    repeats = opts.repeats or (1 if quick else 3)
    small = 50_000 if quick else 200_000
    big = 100 if quick else 500
    incr = 50_000 if quick else 300_000
    ff_bytes = 64 * MIB

    def queue_rate(make, prod, cons, n, nprod, amount=None):
        def run():
            q = make()
            try:
                return _run(prod, nprod, cons, (q, n, nprod))
            finally:
                if hasattr(q, "close"):
                    q.close()

        return _median_rate(amount or n // nprod * nprod, run, repeats)

    def pipe_rate(make, prod, cons, n, amount=None):
        def run():
            conns = make()
            try:
                return _run(prod, 1, cons, (conns, n, 1))
            finally:
                for c in conns:
                    c.close() if hasattr(c, "close") else os.close(c)

        return _median_rate(amount or n, run, repeats)

    rows: list[tuple[str, str, float, str, float, float]] = []

    def row(name, unit, ours, ref_name, ref, target):
        rows.append((name, unit, ours, ref_name, ref, target))
        ratio = ours / ref if ref else float("nan")
        print(f"  measured: {name} vs {ref_name}: {ratio:.2f}x", file=sys.stderr, flush=True)

    ff_small = (lambda: FFQueue(max_size_bytes=ff_bytes)) if FFQueue else None

    pp = queue_rate(procpool.Queue, q_put_each, q_get_each, small, 1)
    mpq = queue_rate(CTX.Queue, q_put_each, q_get_each, small, 1)
    row("Queue 1->1, put/get each", "msg/s", pp, "mp.Queue", mpq, 3.0)
    if ff_small:
        ff = queue_rate(ff_small, q_put_each, ff_get_each, small, 1)
        row("Queue 1->1, put/get each", "msg/s", pp, "faster-fifo", ff, 3.0)

    # bounded (maxsize=1000): the producer waits for room; procpool's bounded queue also
    # keeps its slot ledger (docs/ipc.md, "Guarantees under SIGKILL").  No target.
    ppm = queue_rate(lambda: procpool.Queue(1000), q_put_each, q_get_each, small, 1)
    mpm = queue_rate(lambda: CTX.Queue(1000), q_put_each, q_get_each, small, 1)
    row("Queue(1000) 1->1, put/get each", "msg/s", ppm, "mp.Queue(1000)", mpm, 0.0)

    pp2 = queue_rate(procpool.Queue, q_put_each, q_get_each, small, 2)
    mpq2 = queue_rate(CTX.Queue, q_put_each, q_get_each, small, 2)
    row("Queue 2->1, put/get each", "msg/s", pp2, "mp.Queue", mpq2, 3.0)

    ppb = queue_rate(procpool.Queue, q_put_batches, pp_get_batches, small, 1)
    if ff_small:
        ffb = queue_rate(ff_small, q_put_batches, ff_get_batches, small, 1)
        row("Queue put_many/get_many", "msg/s", ppb, "faster-fifo", ffb, 2.0)

    ppbig = queue_rate(procpool.Queue, q_put_big, q_get_big, big, 1, big * MIB) / 1e9
    mpbig = queue_rate(CTX.Queue, q_put_big, q_get_big, big, 1, big * MIB) / 1e9
    row("Queue 1 MiB messages", "GB/s", ppbig, "mp.Queue", mpbig, 0.0)
    if FFQueue:
        ffbig = (
            queue_rate(
                lambda: FFQueue(max_size_bytes=ff_bytes), q_put_big, ff_get_big, big, 1, big * MIB
            )
            / 1e9
        )
        row("Queue 1 MiB messages", "GB/s", ppbig, "faster-fifo", ffbig, 1.5)

    ppp = pipe_rate(procpool.Pipe, pipe_send_each, pipe_recv_each, small)
    mpp = pipe_rate(CTX.Pipe, pipe_send_each, pipe_recv_each, small)
    row("Pipe small messages", "msg/s", ppp, "mp.Pipe", mpp, 2.0)

    ppbigp = pipe_rate(procpool.Pipe, pipe_send_big, pipe_recv_big, big, big * MIB) / 1e9
    mpbigp = pipe_rate(CTX.Pipe, pipe_send_big, pipe_recv_big, big, big * MIB) / 1e9
    rawp = pipe_rate(os.pipe, raw_write_big, raw_read_big, big, big * MIB) / 1e9
    row("Pipe 1 MiB messages", "GB/s", ppbigp, "mp.Pipe", mpbigp, 0.0)
    row("Pipe 1 MiB messages", "GB/s", ppbigp, "raw os.pipe", rawp, 1.0)
    # the same floor with a 1 MiB pipe buffer: faster than procpool's Pipe here (no target)
    tuned = pipe_rate(tuned_pipe, raw_write_big, raw_read_big, big, big * MIB) / 1e9
    row("Pipe 1 MiB messages", "GB/s", ppbigp, "os.pipe 1MiB buf", tuned, 0.0)

    ppv = _value_rate(pp_value_add, lambda: procpool.Value("q", 0), incr, repeats)
    mpv = _value_rate(mp_value_incr, lambda: CTX.Value("q", 0), incr, repeats)
    row("Value, 2 procs incrementing", "incr/s", ppv, "mp.Value+lock", mpv, 2.0)

    print()
    print(f"procpool IPC benchmarks ({os.cpu_count()} CPUs, repeats={repeats}, median rates)")
    header = (
        f"{'benchmark':31} {'unit':7} {'procpool':>11} {'reference':>14} {'ref rate':>11} "
        f"{'ratio':>7} {'target':>7}  ok"
    )
    print(header)
    print("-" * len(header))
    for name, unit, ours, ref_name, ref, target in rows:
        ratio = ours / ref if ref else float("nan")
        fmt = (lambda x: f"{x:11.2f}") if unit == "GB/s" else (lambda x: f"{x:11,.0f}")
        ok = "" if not target else ("yes" if ratio >= target else "NO")
        tgt = f"{target:6.1f}x" if target else "      -"
        print(f"{name:31} {unit:7} {fmt(ours)} {ref_name:>14} {fmt(ref)} {ratio:6.2f}x {tgt}  {ok}")


if __name__ == "__main__":
    main()
