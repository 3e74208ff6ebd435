"""4 producers and 4 consumers move messages while one of each is SIGKILLed at random.

Checked (the Queue's promise): every message whose ``put`` returned is received exactly once by
exactly one consumer, or is still in the queue; nothing is received twice, nothing is received
that was not put, nothing arrives damaged.  A consumer killed between taking a message and
recording it loses that one message with it ("delivered whole exactly once or not at all").

50,000 messages by default; ``PROCPOOL_STRESS=1`` runs the full 1,000,000.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import time

import numpy as np
import pytest

import procpool

PRODUCERS = 4
CONSUMERS = 4
TOTAL = 1_000_000 if os.environ.get("PROCPOOL_STRESS") == "1" else 50_000
PER_PRODUCER = TOTAL // PRODUCERS
BIG_EVERY = 997  # every so often a message that goes out of band (memfd)
BIG = 100_000

FORK = __import__("multiprocessing").get_context("fork")


def _payload(index: int) -> object:
    if index % BIG_EVERY == 0:
        return (index, bytes([index % 251]) * BIG)
    return index


def _produce(q, p, acked):
    base = p * PER_PRODUCER
    for seq in range(PER_PRODUCER):
        q.put(_payload(base + seq))
        acked[p] = seq + 1  # recorded after put returned


def _consume(q, c, received, progress):
    seen = received[c]
    while True:
        msg = q.get()
        if msg is None:
            return
        if isinstance(msg, tuple):
            index, blob = msg
            if blob != bytes([index % 251]) * BIG:
                os._exit(3)  # damaged message
        else:
            index = msg
        seen[index] += 1
        progress.add(1)


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("stress harness: condition not reached in time")
        time.sleep(0.001)  # polling a shared counter, bounded by the deadline


@pytest.mark.stress
@pytest.mark.timeout(600 if TOTAL > 100_000 else 120)
@pytest.mark.parametrize("maxsize", [0, 64])
def test_queue_survives_sigkilled_producer_and_consumer(maxsize):
    rng = random.Random(os.environ.get("PROCPOOL_STRESS_SEED"))
    q = procpool.Queue(maxsize)
    acked = procpool.Array("q", PRODUCERS, lock=False).numpy()
    received = procpool.SharedArray((CONSUMERS, TOTAL), "uint8")
    progress = procpool.Value("q", 0)
    consumers = [
        FORK.Process(target=_consume, args=(q, c, received.array, progress))
        for c in range(CONSUMERS)
    ]
    producers = [FORK.Process(target=_produce, args=(q, p, acked)) for p in range(PRODUCERS)]
    for proc in consumers + producers:
        proc.start()
    victim_p, victim_c = rng.randrange(PRODUCERS), rng.randrange(CONSUMERS)
    kill_p_at = rng.randrange(PER_PRODUCER // 10, PER_PRODUCER * 8 // 10)
    kill_c_at = rng.randrange(TOTAL // 10, TOTAL * 6 // 10)
    try:
        _wait_for(lambda: acked[victim_p] >= kill_p_at, 120)
        os.kill(producers[victim_p].pid, signal.SIGKILL)
        _wait_for(lambda: progress.load() >= kill_c_at, 120)
        os.kill(consumers[victim_c].pid, signal.SIGKILL)
        for proc in producers:
            proc.join(300)
        assert [p.exitcode for p in producers].count(-signal.SIGKILL) == 1
        assert all(p.exitcode == 0 for i, p in enumerate(producers) if i != victim_p)
        for _ in range(CONSUMERS - 1):
            q.put(None)  # one stop signal per surviving consumer
        for proc in consumers:
            proc.join(300)
        assert consumers[victim_c].exitcode == -signal.SIGKILL
        assert all(c.exitcode == 0 for i, c in enumerate(consumers) if i != victim_c)
        leftover = []
        while True:
            try:
                leftover.append(q.get(timeout=0.2))
            except queue.Empty:
                break
    finally:
        for proc in producers + consumers:
            if proc.is_alive():
                proc.kill()
                proc.join()
    counts = received.array.sum(axis=0, dtype=np.int64)
    for msg in leftover:
        index = msg[0] if isinstance(msg, tuple) else msg
        counts[index] += 1
    assert counts.max() <= 1, "a message was delivered twice"
    missing = []
    for p in range(PRODUCERS):
        base = p * PER_PRODUCER
        done = int(acked[p])
        block = counts[base : base + PER_PRODUCER]
        # nothing beyond the put in progress when a producer died was ever received
        assert not block[done + 1 :].any(), f"producer {p}: received messages never put"
        missing.extend(np.flatnonzero(block[:done] == 0) + base)
    # the only acknowledged message allowed to vanish: the one the killed consumer had taken
    # from the queue but not yet recorded when it died
    assert len(missing) <= 1, f"{len(missing)} acknowledged messages lost: {missing[:10]}"
    q.close()


KILLS = 300 if os.environ.get("PROCPOOL_STRESS") == "1" else 40


def _get_forever(q):
    while True:
        q.get()


def _keep_some_waiting(q, stop, most):
    i = 0
    while not stop.is_set():
        if q.qsize() >= most:
            time.sleep(0.0005)
            continue
        try:
            q.put(i, timeout=0.05)
        except queue.Full:
            pass
        i += 1


@pytest.mark.stress
@pytest.mark.timeout(180)
@pytest.mark.parametrize("maxsize", [0, 20])
def test_consumers_sigkilled_in_a_busy_get_loop_leave_no_count_or_slot_wrong(maxsize):
    # About one SIGKILL in three of a consumer in a busy get loop lands between the datagram
    # and the counters.  Before, 60 such kills left an empty Queue(maxsize=20) saying
    # qsize() == 20 and refusing every put, and `while not q.empty(): q.get()` waited for good.
    rng = random.Random(os.environ.get("PROCPOOL_STRESS_SEED"))
    q = procpool.Queue(maxsize)
    stop = procpool.Event()
    producer = FORK.Process(target=_keep_some_waiting, args=(q, stop, maxsize or 50))
    consumers = [FORK.Process(target=_get_forever, args=(q,)) for _ in range(2)]
    try:
        for proc in [producer, *consumers]:
            proc.start()
        for k in range(KILLS):
            time.sleep(rng.uniform(0.002, 0.02))
            victim = consumers[k % 2]
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            consumers[k % 2] = FORK.Process(target=_get_forever, args=(q,))
            consumers[k % 2].start()
        stop.set()
        producer.join(30)
        assert producer.exitcode == 0
    finally:
        for proc in [producer, *consumers]:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
    deadline = time.monotonic() + 30
    while not q.empty():  # what is left
        assert time.monotonic() < deadline, "empty() never came true"
        q.get(timeout=1)
    assert q.qsize() == 0 and not q.full()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.6)  # (a consumer that waits on the empty queue gives back what the
        # dead held: measured only while no message waits)
    if maxsize:  # every slot the killed consumers held came back, and no more
        for i in range(maxsize):
            q.put_nowait(i)
        assert q.qsize() == maxsize and q.full()
        with pytest.raises(queue.Full):
            q.put("over the bound", timeout=0.6)
        assert q.get_many(timeout=1) == list(range(maxsize))
    q.close()
