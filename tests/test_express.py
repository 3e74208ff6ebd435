"""apply's express lane (procpool._express): a lone call and its reply through the worker's
slot instead of the channel.

The handshake is tested in this process on a real shared mapping, step by step, for each
order of the racing stores (a second process adds nothing the orders do not cover); then
through real pools: calls that take the lane, replies it cannot carry, errors, a worker
killed while its call sits in the slot, and a Ctrl-C while the caller polls the slot.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
from conftest import wait_until
from tasks import add, fail, identity, record, recorded, set_all, square

import procpool
from procpool import _channel, _dispatch, _drive, _express
from procpool import _protocol as P
from procpool.errors import SerializationError, WorkerLostError

pytestmark = pytest.mark.timeout(120)

needs_lane = pytest.mark.skipif(
    not _express.AVAILABLE or len(os.sched_getaffinity(0)) < 2,
    reason="the express lane needs x86-64 and a worker that polls (two CPUs)",
)


def ends() -> tuple[_express.PoolSide, _express.WorkerSide]:
    slot = mmap.mmap(-1, _express.SLOT_SIZE)
    return _express.PoolSide(slot), _express.WorkerSide(slot)


def posted_call(x: int) -> bytes:
    return pickle.dumps(((x,), {}), 5)


# ---------------------------------------------------------------- the handshake, step by step
def test_a_call_posted_to_a_polling_worker_is_run_from_the_slot_and_answered_there():
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1  # (as linger sets it)
    assert pool.post(7, 3, posted_call(41))
    assert worker.leave() == _express.CALL
    tid, fid, data = worker.request()
    assert (tid, fid, pickle.loads(data)) == (7, 3, ((41,), {}))
    assert worker.answer(7, P.OK, 0.5, pickle.dumps(42)), "its caller waits for it"
    assert pool.wait(7, 1.0)
    reply = pool.reply(7)
    assert reply is not None
    rec, data = reply
    assert (rec[0], rec[1], rec[2], pickle.loads(data)) == (7, P.OK, 0.5, 42)
    body = _express.record(rec, data)
    assert [(r[0], pickle.loads(r[5])) for r in P.iter_results(body)] == [(7, 42)]
    assert worker.leave() == _express.NOTHING, "a call answered is not run again"


def test_a_call_posted_as_the_worker_stops_polling_is_seen_by_one_side_at_least():
    # the worker stopped first: the pool sees it asleep and sends the call by the channel
    pool, worker = ends()
    assert worker.leave() == _express.NOTHING
    assert not pool.post(8, 1, posted_call(1)), "asleep: the call goes by the channel"
    assert not pool.stop_waiting(8)
    pool.copied(8)
    assert not pool.copy_seen(8), "no more posts to this worker until it has read the copy"
    # ... whose copy the worker runs (once), marking the call as seen
    assert not worker.channel_copy(8)
    assert pool.copy_seen(8)
    assert worker.leave() == _express.NOTHING, "run from the channel: not from the slot too"
    # the pool posted first: the worker, stopping, finds the call and runs it from the slot;
    # the pool saw it stopping, so it sent the call by the channel too
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1
    assert pool.post(9, 1, posted_call(1))
    assert worker.leave() == _express.CALL
    assert worker.request()[0] == 9
    pool.copied(9)
    assert not worker.channel_copy(10), "another call is not a copy"
    assert worker.channel_copy(9), "a channel copy of a call run from the slot is skipped"
    assert pool.copy_seen(9)
    assert not worker.channel_copy(9), "... once: the same task again is a retry"


def test_a_call_run_from_the_slot_and_retried_by_the_channel_runs_again():
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1
    assert pool.post(4, 1, posted_call(1))
    assert worker.leave() == _express.CALL
    worker.request()
    assert not worker.channel_copy(4), "no copy was sent: this is the task again (retry_on)"


def test_a_reply_written_as_the_caller_stops_waiting_is_taken_by_one_side_at_least():
    # the caller stopped first: the worker is told to send the reply by the channel too
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1
    pool.post(5, 1, posted_call(1))
    worker.request()
    assert not pool.stop_waiting(5)
    assert not worker.answer(5, P.OK, 0.0, pickle.dumps(2)), "nobody waits: the channel too"
    # the worker answered first: the caller, stopping, finds the reply in the slot
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1
    pool.post(6, 1, posted_call(1))
    worker.request()
    assert worker.answer(6, P.OK, 0.0, pickle.dumps(2))
    assert pool.stop_waiting(6)
    assert pool.reply(6) is not None


def test_a_reply_too_large_for_the_slot_is_announced_as_sent_by_the_channel():
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1
    pool.post(11, 1, posted_call(1))
    worker.request()
    worker.answered_by_channel(11)
    assert pool.wait(11, 1.0), "the caller learns it at once..."
    assert pool.reply(11) is None, "... and reads the channel"


def test_a_wait_for_an_answer_that_does_not_come_ends_on_time():
    pool, worker = ends()
    worker.mv[_express.AWAKE] = 1
    pool.post(12, 1, posted_call(1))
    assert not pool.wait(12, 0.01)
    assert not pool.stop_waiting(12)


# ---------------------------------------------------------------- through a pool
def answered_in_slot(pool: procpool.Pool) -> int:
    """How many of the pool's workers have answered a call in their slot."""
    return sum(
        1
        for w in pool._sched._workers.values()
        if w.box is not None and _express._U64.unpack_from(w.box.mv, _express.ANSWERED)[0]
    )


@pytest.fixture
def polling(monkeypatch):
    """Both ends of the lane poll, whatever the load: a Spin on a loaded machine may stop
    polling, and a caller polls only for a task the pool estimates short -- then no call
    takes the lane, and a test of what happens there tests nothing.  Requested before any
    pool is made: its workers inherit it."""
    monkeypatch.setattr(_channel.Spin, "take", lambda self: 20e-3)
    monkeypatch.setattr(_channel.Spin, "done", lambda self, budget, got: None)
    monkeypatch.setattr(_drive, "DRIVE_SPIN", 10.0)


@pytest.fixture
def pool(leak_check):
    p = procpool.Pool(1)
    yield p
    p.terminate()
    p.join()


@needs_lane
def test_repeated_apply_calls_take_the_express_lane(polling, pool):
    def went_by_slot():
        for i in range(200):
            assert pool.apply(add, (i, 1)) == i + 1
        return answered_in_slot(pool)

    assert wait_until(went_by_slot, timeout=20, interval=0.0), "no call took the lane"


@needs_lane
def test_a_shared_array_passed_by_key_takes_the_lane_once_its_worker_maps_it(polling, pool):
    """A SharedArray goes by key once its worker maps it (the MAP frame went by the channel,
    before the first call): then by the lane too, and the worker writes it in place."""
    sa = procpool.SharedArray((64,), "int64")
    box = next(iter(pool._sched._workers.values())).box
    assert box is not None
    in_slot = []

    def took_the_lane():
        for v in range(100):
            before = _express._U64.unpack_from(box.mv, _express.ANSWERED)[0]
            assert pool.apply(set_all, (sa, v)) == v
            assert (sa[:] == v).all()
            after = _express._U64.unpack_from(box.mv, _express.ANSWERED)[0]
            in_slot.append(after != before)
        return any(in_slot[1:])

    assert wait_until(took_the_lane, timeout=20, interval=0.0), "no keyed call took the lane"


def slow_linger(self, seconds, ready):
    """WorkerSide.linger stretched to look at the channel only every 0.5 s (forked workers
    inherit it): a call posted in the slot is then run long before the channel is read."""
    mv = self.mv
    mv[_express.AWAKE] = 1
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        if _express._U64.unpack_from(mv, _express.POSTED)[0] != self.seen:
            return _express.CALL
    return self.leave()


def out_of_descriptors(fds):
    raise OSError(errno.EMFILE, "Too many open files")


@needs_lane
def test_a_call_by_key_waits_for_the_worker_to_read_its_map_frames(leak_check, monkeypatch):
    """A MAP frame left in the channel by a task that could not be sent (out of descriptors)
    marks the region as sent; a call naming it must not be posted in the slot before the
    worker has read that frame -- a third review made one fail so ("not mapped in this
    process"), the worker stretched to look at its channel only every 0.5 s."""
    monkeypatch.setattr(_express.WorkerSide, "linger", slow_linger)
    with procpool.Pool(1) as pool:
        other = procpool.SharedArray((4,), "int64")
        for i in range(200):
            pool.apply(square, (i,))
        for i in range(3):
            pool.apply(set_all, (other, i))
        sa = procpool.SharedArray((4,), "int64")
        w = next(iter(pool._sched._workers.values()))
        real = _dispatch._dup_all
        pool.apply(square, (1,))  # (the worker lingers on its slot now)
        monkeypatch.setattr(_dispatch, "_dup_all", out_of_descriptors)
        with pytest.raises(SerializationError, match="could not be sent"):
            pool.apply_async(set_all, (sa, np.zeros(100_000))).get(5)
        monkeypatch.setattr(_dispatch, "_dup_all", real)
        assert w.regions.get(sa._region._key), "the MAP frame was sent"
        assert pool.apply(set_all, (sa, 7)) == 7
        assert (sa[:] == 7).all()


@needs_lane
def test_a_call_waits_for_the_worker_to_read_its_function(leak_check, monkeypatch):
    """As for a MAP frame, so for a FUNC frame: a task that could not be sent left its
    function's FUNC frame in the channel, the function counted as known to the worker; the
    next call of it, posted in the slot before the worker read that frame, failed with
    "function N is not known to this worker" (a fourth review)."""
    monkeypatch.setattr(_express.WorkerSide, "linger", slow_linger)
    with procpool.Pool(1) as pool:
        for i in range(200):
            pool.apply(square, (i,))
        pool.apply(square, (1,))  # (the worker lingers on its slot now)
        monkeypatch.setattr(_dispatch, "_dup_all", out_of_descriptors)
        with pytest.raises(SerializationError, match="could not be sent"):
            pool.apply_async(identity, (np.zeros(100_000),)).get(5)
        monkeypatch.undo()
        assert pool.apply(identity, (7,)) == 7


@needs_lane
def test_a_region_that_could_not_be_sent_leaves_the_lane_open(polling, pool, monkeypatch):
    """A MAP frame without its descriptor (os.dup failed here) is read as any other: the
    worker counts it, and the next calls take the lane again (it was left uncounted, and
    no call by key took the lane to that worker any more)."""
    for i in range(100):
        pool.apply(square, (i,))
    sa = procpool.SharedArray((4,), "int64")
    real = os.dup
    monkeypatch.setattr(_dispatch.os, "dup", lambda fd: out_of_descriptors([fd]))
    with pytest.raises(Exception, match="Too many open files"):
        pool.apply(set_all, (sa, 1))
    monkeypatch.setattr(_dispatch.os, "dup", real)
    other = procpool.SharedArray((4,), "int64")
    box = next(iter(pool._sched._workers.values())).box
    assert box is not None
    answered = _express._U64.unpack_from(box.mv, _express.ANSWERED)[0]

    def went_by_slot():
        for v in range(50):
            assert pool.apply(set_all, (other, v)) == v
        return _express._U64.unpack_from(box.mv, _express.ANSWERED)[0] != answered

    assert wait_until(went_by_slot, timeout=20, interval=0.0), "no call by key took the lane"


@needs_lane
def test_every_call_runs_exactly_once_whichever_way_it_goes(leak_check, tmp_path):
    """A call the worker ran from the slot must not run again from its channel copy -- which
    a review saw in one call in ten of a tight loop, when a newer post had moved POSTED on
    before the worker read the copy -- nor a call run from the channel again from the slot."""
    path = str(tmp_path / "ran")
    n = 20_000
    with procpool.Pool(1) as pool:
        for i in range(n):
            assert pool.apply(record, (path, i)) == i
        pool.close()
        pool.join()  # (every copy left in the channel read: nothing runs after this)
    ran = recorded(path)
    assert sorted(ran) == list(range(n)), f"{len(ran) - len(set(ran))} calls ran twice"


@needs_lane
@pytest.mark.parametrize(
    "value",
    [b"x" * 10_000, list(range(5_000)), {"a": 1}, None, 1.5, "text"],
    ids=["large-bytes", "large-list", "dict", "none", "float", "str"],
)
def test_every_reply_comes_back_whole_whichever_way_it_goes(pool, value):
    for _ in range(100):
        pool.apply(identity, (1,))
    for _ in range(50):
        assert pool.apply(identity, (1,)) == 1
        assert pool.apply(identity, (value,)) == value


@needs_lane
def test_an_error_raised_by_a_call_in_the_lane_reaches_the_caller(pool):
    for i in range(100):
        pool.apply(square, (i,))
    for i in range(50):
        with pytest.raises(ValueError, match="boom"):
            pool.apply(fail, ("boom",))
        assert pool.apply(square, (i,)) == i * i


def fail_once(path: str) -> str:
    if not os.path.exists(path):
        open(path, "w").close()
        raise ConnectionError("transient")
    return "ok on retry"


@needs_lane
def test_a_call_of_the_lane_retried_by_retry_on_runs_again(polling, leak_check, tmp_path):
    with procpool.Pool(1, retries=1, retry_on=(ConnectionError,)) as pool:

        def went_by_slot():
            for i in range(200):
                assert pool.apply(add, (i, 1)) == i + 1
            return answered_in_slot(pool)

        assert wait_until(went_by_slot, timeout=20, interval=0.0)
        for i in range(20):  # (the function known to the worker: the next call may go by the lane)
            marker = str(tmp_path / f"m{i}")
            assert pool.apply(fail_once, (marker,)) == "ok on retry"


def die_if(flag: bool) -> int:
    if flag:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@needs_lane
def test_a_worker_killed_while_its_call_sits_in_the_slot_fails_that_call_only(polling, pool):
    def went_by_slot():
        for _ in range(200):
            pool.apply(die_if, (False,))
        return answered_in_slot(pool)

    assert wait_until(went_by_slot, timeout=20, interval=0.0)
    with pytest.raises(WorkerLostError):
        pool.apply(die_if, (True,))
    assert pool.apply(square, (3,)) == 9, "a new worker serves the pool"
    pool.close()
    pool.join()


def sleep_briefly(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@needs_lane
def test_a_ctrl_c_while_the_caller_waits_on_the_lane_leaves_the_pool_working(pool):
    for i in range(300):
        pool.apply(square, (i,))
    main = threading.get_ident()
    for delay in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3) * 4:
        timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
        try:
            # (SerializationError: the interrupt cut the reply's unpickling -- a known gap,
            # docs/guarantees.md)
            with pytest.raises((KeyboardInterrupt, SerializationError)):
                timer.start()  # (which may be what the interrupt cuts: it waits)
                for i in range(1_000_000):  # (interrupted long before the end)
                    assert pool.apply(square, (i,)) == i * i
        finally:
            if timer.is_alive() or timer.ident is not None:
                timer.join()
        for i in range(20):  # whatever the interrupt cut short, the pool goes on
            assert pool.apply(square, (i,)) == i * i
    pool.close()
    pool.join()  # (a call whose reply was left in the slot would hang this)


def test_a_pool_whose_workers_cannot_poll_never_posts(monkeypatch, leak_check):
    monkeypatch.setattr(procpool._scheduler, "can_spin", lambda: False)
    with procpool.Pool(1) as pool:
        for i in range(50):
            assert pool.apply(square, (i,)) == i * i
        assert all(w.box is None for w in pool._sched._workers.values())


# ---------------------------------------------------------------- found by a second review
@needs_lane
@pytest.mark.parametrize("retries", [0, 1])
def test_a_reply_left_in_the_slot_of_a_worker_killed_before_its_caller_took_it_counts(
    polling, leak_check, tmp_path, monkeypatch, retries
):
    """The worker answered in its slot and died before its caller settled the reply: the
    reply counts, as one it wrote in its channel would (it was lost -- WorkerLostError -- or,
    with retries, the call ran twice)."""
    path = str(tmp_path / "ran")
    with procpool.Pool(1, retries=retries) as pool:
        for _ in range(300):
            pool.apply(record, (path, -5))
        waited = _drive.Driving._wait_posted
        armed = [True]

        def kill_after_the_answer(self, w, box, task, spin):
            came, reply = waited(self, w, box, task, spin)
            if armed[0] and reply is not None:  # (the caller holds the reply: kill, bury)
                armed[0] = False
                os.kill(w.proc.pid, signal.SIGKILL)
                assert wait_until(lambda: w.wid not in self._workers, timeout=10)
            return came, reply

        monkeypatch.setattr(_drive.Driving, "_wait_posted", kill_after_the_answer)
        deadline = time.monotonic() + 30
        i = -1
        while armed[0] and time.monotonic() < deadline:
            i += 1
            assert pool.apply(record, (path, i)) == i
        assert not armed[0], "no call took the lane"
        monkeypatch.undo()
        ran = [x for x in recorded(path) if x >= 0]
        assert ran == list(range(i + 1)), "every call ran once"


@needs_lane
def test_two_ctrl_cs_while_a_reply_sits_in_the_slot_leave_no_call_in_flight(
    polling, pool, monkeypatch
):
    """A first Ctrl-C as the caller polls the slot (its reply there), a second as the caller
    stops waiting there: the reply is still settled, so close() and join() return."""
    for i in range(300):
        pool.apply(square, (i,))
    state = {"phase": 0}
    wait, stop_waiting = _express.PoolSide.wait, _express.PoolSide.stop_waiting

    def first(self, tid, seconds):
        got = wait(self, tid, 5.0)
        if state["phase"] == 1:
            state["phase"] = 2
            raise KeyboardInterrupt
        return got

    def second(self, tid):
        answered = stop_waiting(self, tid)
        if state["phase"] == 2:
            state["phase"] = 3
            raise KeyboardInterrupt
        return answered

    monkeypatch.setattr(_express.PoolSide, "wait", first)
    monkeypatch.setattr(_express.PoolSide, "stop_waiting", second)
    for _ in range(2000):
        state["phase"] = 1
        try:
            pool.apply(square, (5,))
        except KeyboardInterrupt:
            pass
        if state["phase"] == 3:
            break
    monkeypatch.undo()
    assert state["phase"] == 3, "the two interrupts never landed"
    assert pool.apply(square, (3,)) == 9
    pool.close()
    joiner = threading.Thread(target=pool.join, daemon=True)
    joiner.start()
    joiner.join(15)
    assert not joiner.is_alive(), "join() hung: a call stayed in flight"


@needs_lane
def test_a_ctrl_c_as_a_retiring_workers_exit_is_queued_leaves_a_working_pool(
    polling, leak_check, monkeypatch
):
    """maxtasksperchild: a Ctrl-C as the EXIT frame is queued, while the caller settles a
    reply it took from the slot, abandons that worker (as the channel path does) -- it hung
    the pool, the worker retiring and never told to exit."""
    main = threading.get_ident()
    with procpool.Pool(1, maxtasksperchild=5) as pool:
        sched = pool._sched
        armed, fired = [False], []
        push = _channel.Channel.push

        def interrupted_push(self, data, fds=None):
            push(self, data, fds)
            if armed[0] and threading.get_ident() == main and data[4] == P.EXIT:
                armed[0] = False
                fired.append(any(w.posted is not None for w in sched._workers.values()))
                raise KeyboardInterrupt

        monkeypatch.setattr(_channel.Channel, "push", interrupted_push)
        for _ in range(400):
            armed[0] = True
            try:
                while armed[0]:
                    pool.apply(square, (2,))
            except KeyboardInterrupt:
                if fired[-1]:
                    break
        armed[0] = False
        monkeypatch.undo()
        assert fired and fired[-1], "the interrupt never landed on a reply from the slot"
        deadline = time.monotonic() + 20
        assert pool.apply_async(square, (7,)).get(timeout=20) == 49
        assert time.monotonic() < deadline


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@needs_lane
def test_a_retired_workers_slot_is_unmapped_at_once(polling, leak_check):
    """A worker buried (here retired by maxtasksperchild) after calls by the lane: its slot
    is unmapped then -- a view of it left alive in _bury kept close_progress from unmapping
    it until the worker's record went, seconds later, and every worker forked meanwhile
    inherited the mapping (a fourth review: 200 mappings more after 600 calls)."""
    with procpool.Pool(2, maxtasksperchild=3) as pool:
        pool.apply(square, (0,))
        before = _maps()
        for i in range(600):
            assert pool.apply(square, (i,)) == i * i
        grown = _maps() - before
    assert grown < 20, f"{grown} more mappings after 200 workers retired"


def _apply_in_a_child(pool: procpool.Pool) -> int:
    """Fork; the child calls ``pool.apply`` (SIGALRM after 5 s: a hang kills it).  The
    child's exit code: 0 if apply raised ValueError, as for a pool not running."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(5)
            pool.apply(square, (2,))
        except ValueError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_apply_in_a_child_forked_while_another_thread_applies_raises(leak_check):
    """os.fork() while a thread of the parent is inside apply, maybe holding the pool's lock:
    the child's copy of the pool is not running, and its apply raises ValueError -- it took
    that lock first and hung for good (a fourth review: about 1 child in 10)."""
    stop = threading.Event()
    with procpool.Pool(1) as pool:
        pool.apply(square, (1,))

        def loop():
            while not stop.is_set():
                pool.apply(square, (3,))

        t = threading.Thread(target=loop)
        t.start()
        try:
            codes = []
            for _ in range(40):
                time.sleep(0.002)
                codes.append(_apply_in_a_child(pool))
        finally:
            stop.set()
            t.join(30)
    hung = codes.count(-signal.SIGALRM)
    assert hung == 0, f"{hung} of {len(codes)} children hung in apply"
    assert codes == [0] * len(codes), codes


@needs_lane
def test_a_reply_the_caller_stopped_waiting_for_in_the_slot_takes_the_quick_path(
    leak_check, monkeypatch
):
    """A call posted in the slot of a worker that polls it, whose caller does not poll for
    the reply (a task not expected short): the worker answers by the channel, an ALSO frame,
    which the caller reads as it reads a RESULTS frame -- it went the general way, a delivery
    and a wake-up more (≈ 15 µs an ``apply`` of a 0.05-1 ms task)."""
    monkeypatch.setattr(_channel.Spin, "take", lambda self: 20e-3)  # (the worker polls...)
    monkeypatch.setattr(_channel.Spin, "done", lambda self, budget, got: None)
    monkeypatch.setattr(_drive, "DRIVE_SPIN", 0.0)  # (...the caller does not)
    posted = []
    post = _express.PoolSide.post

    def counting_post(self, tid, fid, data):
        ok = post(self, tid, fid, data)
        posted.append(ok)
        return ok

    monkeypatch.setattr(_express.PoolSide, "post", counting_post)
    with procpool.Pool(1) as pool:
        for _ in range(20):
            pool.apply(sleep_briefly, (0.001,))
        general = []
        on_results = pool._sched._on_results
        monkeypatch.setattr(
            pool._sched, "_on_results", lambda *a: (general.append(a[1]), on_results(*a))
        )
        del posted[:]
        for _ in range(30):
            assert pool.apply(sleep_briefly, (0.001,)) == 0.001
        assert any(posted), "no call was posted in the slot"
        assert general == [], f"{len(general)} of 30 replies went the general way"
