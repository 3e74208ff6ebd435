"""Errors travel intact: the same type in the caller, the worker's traceback as __cause__, and
exceptions or values that cannot make the trip fail their task clearly without harming the pool."""

from __future__ import annotations

import threading
import time

import pytest
from tasks import (
    CustomError,
    FailsWhenUnpickled,
    KillsWhenUnpickled,
    Unpicklable,
    fail,
    raise_bad_init,
    raise_custom,
    raise_keyboard_interrupt,
    raise_local_class,
    raise_system_exit,
    raise_unpicklable_attr,
    recorded,
    return_unpicklable,
    sleep_then,
    square,
)

import procpool


@pytest.fixture(scope="module")
def pool():
    with procpool.Pool(2) as p:
        yield p


def test_exception_keeps_its_type_and_carries_the_worker_traceback(pool):
    with pytest.raises(ValueError, match="boom") as info:
        pool.apply(fail)
    cause = info.value.__cause__
    assert isinstance(cause, procpool.RemoteTraceback)
    assert "in fail" in str(cause) and "ValueError: boom" in str(cause)


def test_custom_exception_attributes_survive(pool):
    with pytest.raises(CustomError) as info:
        pool.apply(raise_custom)
    assert info.value.code == 42 and info.value.detail == "detail"


def test_exception_whose_init_does_not_round_trip_is_reported_clearly(pool):
    with pytest.raises(procpool.RemoteError, match="BadInitError") as info:
        pool.apply(raise_bad_init)
    assert "raise_bad_init" in str(info.value.__cause__)
    assert pool.apply(square, (3,)) == 9


def test_exception_of_a_class_local_to_the_task(pool):
    with pytest.raises(Exception, match="from a local class") as info:
        pool.apply(raise_local_class)
    assert type(info.value).__name__ in ("LocalError", "RemoteError")
    assert pool.apply(square, (4,)) == 16


def test_exception_with_an_unpicklable_attribute(pool):
    with pytest.raises(procpool.RemoteError, match="has a lock"):
        pool.apply(raise_unpicklable_attr)
    assert pool.apply(square, (5,)) == 25


def test_exception_class_not_importable_in_the_parent(pool):
    # the class exists only in the worker: defined there by exec, pickled by reference
    def raise_worker_only():
        import sys
        import types

        mod = types.ModuleType("only_in_worker")
        exec("class WorkerOnlyError(Exception):\n    pass\n", mod.__dict__)
        mod.WorkerOnlyError.__module__ = "only_in_worker"
        sys.modules["only_in_worker"] = mod
        raise mod.WorkerOnlyError("cannot be imported by the caller")

    with pytest.raises(procpool.RemoteError, match="cannot be imported by the caller"):
        pool.apply(raise_worker_only)
    assert pool.apply(square, (6,)) == 36


def test_unpicklable_argument_is_reported_promptly_naming_it(pool):
    r = pool.apply_async(square, (threading.Lock(),))
    assert r.ready()  # failed at once, in the caller
    with pytest.raises(procpool.SerializationError, match=r"argument 0 .*lock"):
        r.get(0)
    with pytest.raises(procpool.SerializationError, match="Unpicklable"):
        pool.apply(square, (Unpicklable(),))
    assert pool.apply(square, (7,)) == 49


def test_a_serialization_error_is_caught_as_multiprocessings_pickling_errors_are(pool):
    # multiprocessing raises the pickler's TypeError ("cannot pickle '_thread.lock' object")
    # or PicklingError: code catching either must catch procpool's error too (review)
    import pickle

    for call in (
        lambda: pool.apply_async(square, (threading.Lock(),)).get(10),
        lambda: pool.map(square, [1, threading.Lock()]),
        lambda: pool.apply(return_unpicklable),
    ):
        with pytest.raises(TypeError) as info:
            call()
        assert isinstance(info.value, (procpool.SerializationError, pickle.PicklingError))
        assert isinstance(info.value, pickle.PicklingError)


def test_arguments_whose_unpickling_fails_fail_their_task_and_run_that_code_once(tmp_path):
    log = str(tmp_path / "unpickled")
    with procpool.Pool(1) as p:
        assert p.apply(square, (3,)) == 9  # the function is loaded: apply's quick path next
        with pytest.raises(procpool.SerializationError, match="arguments could not be"):
            p.apply(square, (FailsWhenUnpickled(log),))
        assert recorded(log) == [1]  # unpickled once: no second try runs the user's code
        assert p.apply(square, (4,)) == 16


def test_arguments_that_kill_the_worker_while_unpickled_fail_their_task_once():
    """The worker names the task running before it unpickles the arguments: the task fails
    (it is not resent as one that never started, killing a worker each time)."""
    with procpool.Pool(4) as p:
        p.map(sleep_then, [0.05] * 16, chunksize=1)  # the function loaded in every worker
        before = set(p.pids())
        with pytest.raises(procpool.WorkerLostError, match="while running"):
            p.apply(sleep_then, (KillsWhenUnpickled(),))
        assert p.apply(sleep_then, (0, 5)) == 5
        assert len(before - set(p.pids())) == 1


def test_unpicklable_item_in_map(pool):
    with pytest.raises(procpool.SerializationError):
        pool.map(square, [1, Unpicklable(), 3])
    assert pool.map(square, [1, 2]) == [1, 4]


def test_unpicklable_return_value_fails_that_task(pool):
    with pytest.raises(procpool.SerializationError, match="result"):
        pool.apply(return_unpicklable)
    assert pool.apply(square, (8,)) == 64


def test_system_exit_and_keyboard_interrupt_inside_a_task_fail_only_the_task(pool):
    with pytest.raises(SystemExit):
        pool.apply(raise_system_exit)
    with pytest.raises(KeyboardInterrupt):
        pool.apply_async(raise_keyboard_interrupt).get(10)
    assert pool.apply(square, (9,)) == 81


def test_initializer_that_raises_is_reported_and_not_respawned_forever():
    from tasks import failing_initializer

    with procpool.Pool(2, initializer=failing_initializer) as pool:
        r = pool.apply_async(square, (2,))
        with pytest.raises(procpool.InitializerError, match="initializer exploded") as info:
            r.get(20)
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(procpool.InitializerError):
            pool.apply(square, (3,))
        assert len(pool.pids()) <= 2  # no endless respawn loop


def test_an_initializer_killed_every_time_breaks_the_pool_instead_of_a_fork_storm(tmp_path):
    # a worker killed while starting says little about the next one (a stray kill), so such
    # deaths were never counted: an initializer the OOM killer ends every time had the pool
    # fork ≈ 350 workers a second for good
    from tasks import killed_initializer

    path = tmp_path / "starts"
    with procpool.Pool(2, initializer=killed_initializer, initargs=(str(path),)) as pool:
        with pytest.raises(procpool.WorkerLostError):
            pool.apply_async(square, (2,)).get(20)
        with pytest.raises(procpool.WorkerLostError, match="in a row died while starting"):
            pool.apply(square, (3,))
        time.sleep(0.5)
        starts = len(path.read_text().splitlines())
        time.sleep(0.5)
        assert len(path.read_text().splitlines()) == starts <= 12  # no more workers started
