"""Large arguments and results under a SIGKILL storm: the reused memfd segments
(``procpool._buffers``) never show a task another task's bytes, nor a caller (or a child it
forked) a result changing under it, whatever dies when, and nothing is left behind.

Each task gets an array filled with its own index and checks it (and returns it): a segment
rewritten while a worker still maps it, or a retry sent someone else's segment, would show as a
wrong value.  ``PROCPOOL_STRESS=1`` runs it longer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import pytest
from conftest import open_fds, wait_until

import procpool

FULL = os.environ.get("PROCPOOL_STRESS") == "1"
N = 64 * 1024  # float64 items: about 512 KiB, above the out-of-band threshold


def check(a):
    first, last, mid = float(a[0]), float(a[-1]), float(a[len(a) // 2])
    if first != last or mid != first:
        raise AssertionError(f"torn argument: {first} {mid} {last}")
    return first


def sized(i: int) -> int:
    """Sizes that change from call to call: a free segment is cut or grown to the next
    buffer (``_buffers.Segment.fill``), never while anyone maps it."""
    return N + 512 * (i % 7) - 1024


def _kill_a_worker(pool, rng) -> bool:
    """SIGKILL one of *pool*'s workers, chosen with *rng*: True if one was killed."""
    pids = pool.pids()
    if not pids:
        return False
    try:
        os.kill(rng.choice(pids), signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _mappings(name: str = "procpool-arg") -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if name in line]


@pytest.mark.stress
@pytest.mark.timeout(900 if FULL else 120)
def test_reused_argument_segments_under_a_sigkill_storm():
    seconds = 120 if FULL else 5
    before = open_fds()
    stop = threading.Event()
    kills = 0
    checked = 0
    with procpool.Pool(2, retries=8) as pool:

        def killer():
            nonlocal kills
            while not stop.wait(0.1):
                kills += _kill_a_worker(pool, random)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + seconds
            r = 0
            while time.monotonic() < deadline:
                base = r * 1000
                arrays = [np.full(sized(base + i), float(base + i)) for i in range(50)]
                results = pool.map_async(check, arrays, chunksize=1).get(60)
                assert results == [float(base + i) for i in range(50)]
                for i in range(0, 50, 10):  # single calls too (the idle fast path)
                    assert pool.apply_async(check, (arrays[i],)).get(60) == float(base + i)
                checked += 55
                r += 1
        finally:
            stop.set()
            thread.join(5)
    print(f"{checked} large arguments checked, {kills} workers killed")
    assert kills >= 10 and checked >= 500
    assert wait_until(lambda: not _mappings(), 5.0), _mappings()
    assert wait_until(lambda: set(open_fds()) <= set(before), 5.0), set(open_fds()) - set(before)


def tagged(tag):
    """A large result filled with *tag* (the caller checks it as long as it keeps it)."""
    return np.full(sized(tag), float(tag))


def _intact(kept: dict) -> list:
    return [t for t, a in list(kept.items()) if not (float(a[0]) == float(a[-1]) == t)]


@pytest.mark.stress
@pytest.mark.timeout(900 if FULL else 120)
def test_reused_result_segments_under_keeps_drops_forks_and_kills():
    """Results kept at random, dropped at random, by two threads, while workers are killed
    and the process forks children that check the results they inherited: a result never
    changes while anyone can see it (the worker rewrites only segments the pool said it
    unmapped, and never those a child may hold)."""
    seconds = 120 if FULL else 6
    before = open_fds()
    rng = random.Random(5)
    kept: dict = {}
    lock = threading.Lock()
    children: list = []
    kills = checked = 0
    tags = iter(range(1, 10**9))
    with procpool.Pool(2, retries=8) as pool:

        def caller(seed):
            nonlocal checked
            r = random.Random(seed)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with lock:
                    batch = [next(tags) for _ in range(r.randint(1, 6))]
                how = r.choice(("apply", "map", "imap", "imap_unordered", "async"))
                if how == "apply":
                    got = {batch[0]: pool.apply(tagged, (batch[0],))}
                elif how == "async":
                    got = {t: pool.apply_async(tagged, (t,)).get(60) for t in batch}
                elif how == "map":
                    got_list = pool.map(tagged, batch, chunksize=r.randint(1, 3))
                    got = dict(zip(batch, got_list, strict=True))
                else:
                    got = {float(a[0]): a for a in getattr(pool, how)(tagged, batch)}
                assert not _intact(got), "a result arrived torn"
                with lock:
                    for t, a in got.items():
                        if r.random() < 0.3:
                            kept[t] = a
                    for t in [t for t in kept if r.random() < 0.2]:
                        del kept[t]
                    assert not _intact(kept), f"kept results changed: {_intact(kept)[:5]}"
                    checked += len(got)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.3)
            if rng.random() < 0.3:
                kills += _kill_a_worker(pool, rng)
            if rng.random() < 0.3 and len(children) < 5:
                with lock:
                    inherited = dict(kept)
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:  # check what it inherited once the parent has moved on
                    try:
                        os.close(w)
                        os.read(r, 1)
                        os._exit(3 if _intact(inherited) else 0)
                    finally:
                        os._exit(4)
                os.close(r)
                del inherited
                children.append((pid, w))
        for t in threads:
            t.join(120)
        for pid, w in children:
            os.write(w, b"x")
            os.close(w)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "a forked child saw a result change"
        assert not _intact(kept)
    print(f"{checked} large results checked, {kills} workers killed, {len(children)} forks")
    assert checked >= 100
    kept.clear()
    assert wait_until(lambda: not _mappings("procpool-result"), 5.0), _mappings("procpool-result")
    assert wait_until(lambda: set(open_fds()) <= set(before), 5.0), set(open_fds()) - set(before)
