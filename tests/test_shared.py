"""Value, Array, SharedArray: stdlib compatibility, atomics, zero-copy views, names, leaks."""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import signal
import time
import uuid
import weakref

import numpy as np
import pytest
from _ipc_helpers import FORK, SPAWN, no_leaks, run_child, shm_entries  # noqa: F401
from conftest import run_python, wait_until

import procpool
from procpool import _ipc_atomic

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_value_stdlib_api():
    v = procpool.Value("i", 7)
    assert v.value == 7
    v.value = 9
    assert v.get_obj().value == 9
    with v.get_lock():
        v.value += 1
    with v:
        assert v.value == 10
    d = procpool.Value(ctypes.c_double, 1.5)
    assert d.value == 1.5
    assert procpool.Value("i").value == 0
    raw = procpool.Value("i", 3, lock=False)
    with pytest.raises(AttributeError):
        raw.get_lock()
    shared_lock = procpool.Lock()
    assert procpool.Value("i", 0, lock=shared_lock).get_lock() is shared_lock
    with pytest.raises(TypeError):
        procpool.Value("nope")


class _Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_double)]


def _move_point(p):
    with p.get_lock():
        p.x += 10
    p.y = -1.5


@pytest.mark.timeout(60)
def test_value_of_a_structure_exposes_its_fields():
    p = procpool.Value(_Point, 1, 2.0)
    assert (p.x, p.y) == (1, 2.0)  # as multiprocessing.Value's synchronized wrapper
    p.x = 5
    assert p.get_obj().x == 5
    with pytest.raises(AttributeError):
        p.value  # noqa: B018  -- a structure has fields, no value (as in the stdlib)
    assert run_child(_move_point, p) == 0
    assert (p.x, p.y) == (15, -1.5)
    assert repr(p) == "<procpool.Value _Point(x=15, y=-1.5)>"
    q = procpool.Queue()
    q.put(p)
    received = q.get(timeout=5)  # unpickled: the same memory, the fields still there
    q.close()
    received.x = 42
    assert p.x == 42


def test_array_stdlib_api():
    a = procpool.Array("i", [1, 2, 3, 4])
    assert len(a) == 4 and a[0] == 1 and a[-1] == 4 and a[1:3] == [2, 3]
    a[0] = 10
    a[1:3] = [20, 30]
    assert list(a) == [10, 20, 30, 4]
    assert a.get_obj()[0] == 10
    with a.get_lock():
        a[3] = 40
    assert a[:] == [10, 20, 30, 40]
    z = procpool.Array("d", 3)
    assert z[:] == [0.0, 0.0, 0.0]


def test_char_array_value_and_raw():
    s = procpool.Array("c", b"hello")
    assert s.value == b"hello" and s.raw == b"hello"
    s.value = b"hi"
    assert s.value == b"hi" and s.raw == b"hi\0lo"
    big = procpool.Array("c", 10)
    big.raw = b"x" * 10
    assert big.value == b"x" * 10


def _tutorial_square(n, a):
    n.value = 3.1415927
    for i in range(len(a)):
        a[i] = -a[i]


@pytest.mark.parametrize("ctx", [FORK, SPAWN], ids=["fork", "spawn"])
def test_tutorial_value_and_array(ctx):
    num = procpool.Value("d", 0.0)
    arr = procpool.Array("i", range(10))
    assert run_child(_tutorial_square, num, arr, ctx=ctx, timeout=30) == 0
    assert num.value == pytest.approx(3.1415927)
    assert arr[:] == [-i for i in range(10)]


needs_atomics = pytest.mark.skipif(_ipc_atomic.OPS is None, reason="no atomics here")


@needs_atomics
@pytest.mark.parametrize("code", ["i", "I", "l", "q", "Q"])
def test_atomic_integer_ops(code):
    v = procpool.Value(code, 5)
    assert v.add(3) == 8
    assert v.fetch_add(2) == 8
    assert v.load() == 10
    assert v.compare_exchange(10, 1) is True
    assert v.compare_exchange(10, 2) is False
    assert v.exchange(4) == 1
    v.store(6)
    assert v.value == 6


@needs_atomics
def test_atomic_wraps_like_c():
    v = procpool.Value("i", 2**31 - 1)
    assert v.add(1) == -(2**31)
    u = procpool.Value("I", 0)
    assert u.add(-1) == 2**32 - 1


@needs_atomics
@pytest.mark.parametrize("code", ["f", "d"])
def test_atomic_float_ops(code):
    v = procpool.Value(code, 1.5)
    assert v.add(2.25) == 3.75
    assert v.compare_exchange(3.75, 0.5)
    assert v.load() == 0.5


def test_atomics_refuse_other_types():
    with pytest.raises(TypeError):
        procpool.Value("b", 1).add(1)
    with pytest.raises(TypeError):
        procpool.Value("c", b"x").add(1)


def test_atomics_of_an_integer_value_refuse_a_float_clearly():
    v = procpool.Value("q", 1)
    for op in (v.add, v.fetch_add):
        with pytest.raises(TypeError, match="adds integers, not float"):
            op(1.5)  # (ctypes' "argument 2: wrong type" before)
    assert v.add(np.int64(2)) == 3 and v.value == 3


@needs_atomics
def test_atomics_refuse_a_wrong_type_or_an_out_of_range_float_clearly():
    # before: "unsupported operand type(s) for &=", struct.error "required argument is not a
    # float", "float too large to pack with f format" (review)
    from fractions import Fraction

    v = procpool.Value("i", 3)
    for method, call in (
        ("exchange", lambda: v.exchange(1.5)),
        ("compare_exchange", lambda: v.compare_exchange("a", "b")),
        ("compare_exchange", lambda: v.compare_exchange(3, 2.0)),
        ("store", lambda: v.store(None)),
    ):
        with pytest.raises(TypeError, match=rf"^{method}\(\): a c_int Value holds integers, not"):
            call()
    assert v.value == 3
    assert v.exchange(np.int64(4)) == 3 and v.compare_exchange(4, True) and v.load() == 1
    d = procpool.Value("d", 1.0)
    for method, call in (
        ("store", lambda: d.store("x")),
        ("exchange", lambda: d.exchange(b"1")),
        ("compare_exchange", lambda: d.compare_exchange(1.0, "2")),
        ("add", lambda: d.add("x")),
        ("fetch_add", lambda: d.fetch_add(1j)),
    ):
        with pytest.raises(TypeError, match=rf"^{method}\(\): a c_double Value \w+ real numbers"):
            call()
    with pytest.raises(OverflowError, match=r"^store\(\): 10{400} is out of range"):
        d.store(10**400)
    assert d.value == 1.0
    f = procpool.Value("f", 1.0)
    with pytest.raises(OverflowError, match=r"^add\(\): 1e\+300 is out of range for a c_float"):
        f.add(1e300)
    with pytest.raises(OverflowError, match=r"^exchange\(\): 1e\+300 is out of range"):
        f.exchange(1e300)
    assert f.value == 1.0
    # real numbers of other types still go, as ctypes takes them for .value
    assert f.add(np.float32(0.5)) == 1.5 and d.add(Fraction(1, 4)) == 1.25
    assert d.exchange(2) == 1.25 and d.load() == 2.0


def test_a_dropped_integer_value_goes_without_the_cycle_collector():
    # its atomics' bound closures referred to the Value itself: a cycle, so its memory and
    # descriptors outlived it until the cycle collector ran -- in pool workers too (review:
    # 20 Values passed to tasks and dropped, 52-80 descriptors left in the worker)
    gc.disable()
    try:
        for code in ("i", "q", "Q", "d"):
            v = procpool.Value(code, 1)
            assert v.add(1) == 2
            gone = weakref.ref(v._region)
            del v
            assert gone() is None, code
    finally:
        gc.enable()


def _no_lock_kinds(v, a):
    return type(v).__name__, isinstance(v, ctypes.c_int), list(np.frombuffer(a)), v.add(1)


def test_lock_false_gives_the_ctypes_object_itself_as_multiprocessing():
    # multiprocessing's Value/Array(lock=False) are RawValue/RawArray: ctypes objects that
    # numpy, memoryview and ctypes.byref take (procpool gave a wrapper none of them took)
    v = procpool.Value("i", 5, lock=False)
    a = procpool.Array("d", [1.0, 2.0], lock=False)
    assert isinstance(v, ctypes.c_int) and isinstance(a, ctypes.Array)
    assert ctypes.cast(ctypes.byref(v), ctypes.POINTER(ctypes.c_int))[0] == 5
    assert list(np.frombuffer(a)) == [1.0, 2.0] and memoryview(a).nbytes == 16
    with pytest.raises(AttributeError):
        v.get_lock()
    assert v.add(2) == 7 and v.value == 7  # procpool's atomics stay
    with procpool.Pool(1) as pool:  # (by reference, both ways)
        assert pool.apply(_no_lock_kinds, (v, a)) == ("c_int", True, [1.0, 2.0], 8)
    assert v.value == 8
    assert type(procpool.RawValue("i", 1)) is type(v)


def test_acquire_of_a_value_or_array_takes_block_and_timeout_by_name():
    for obj in (procpool.Value("i", 0), procpool.Array("i", 2)):
        assert obj.acquire(block=False) is True
        assert obj.acquire(timeout=1) is True  # (an RLock)
        obj.release()
        obj.release()


def test_iterating_a_char_array_gives_one_byte_strings():
    s = procpool.Array("c", b"hi")
    assert list(s) == [b"h", b"i"] and b"h" in s  # (ints before: iterating a bytes slice)


def test_a_value_of_an_array_ctype():
    v = procpool.Value(ctypes.c_int * 2)  # (a TypeError in the atomics' setup before)
    v.get_obj()[1] = 3
    assert list(v.get_obj()) == [0, 3]


@pytest.mark.timeout(60)
def test_a_value_of_an_array_ctype_is_an_array_as_in_multiprocessing():
    # multiprocessing gives a SynchronizedString / SynchronizedArray there: procpool's Value
    # had no .raw, no indexing, no len (review)
    s = procpool.Value(ctypes.c_char * 5)
    assert s.raw == b"\0" * 5 and s.value == b"" and len(s) == 5
    s.value = b"hi"
    assert s.raw == b"hi\0\0\0" and s[0:2] == b"hi"
    a = procpool.Value(ctypes.c_int * 3, 1, 2)  # (its items from the args, as ctypes sets them)
    assert len(a) == 3 and a[1] == 2 and a[:] == [1, 2, 0] and list(a) == [1, 2, 0]
    with a.get_lock():
        a[2] = 5
    assert run_child(_set_first, a, 9) == 0  # (the same memory in a child)
    assert a[:] == [9, 2, 5]
    with pytest.raises(IndexError):  # (ctypes' own error: too many initializers)
        procpool.Value(ctypes.c_int * 2, 1, 2, 3)
    raw = procpool.Value(ctypes.c_int * 3, 7, lock=False)  # (RawValue: the ctypes array)
    assert isinstance(raw, ctypes.Array) and raw[:] == [7, 0, 0]
    name = f"pptest-{uuid.uuid4().hex[:8]}"
    named = procpool.Value(ctypes.c_double * 2, 1.5, name=name)
    try:
        assert procpool.Array.open(name)[:] == [1.5, 0.0]
    finally:
        named.unlink()


class _AcquireOnly:
    def acquire(self, *args):
        return True


def test_value_and_array_take_a_lock_argument_as_multiprocessing_does():
    # multiprocessing: lock is False -> none; lock in (True, None) -> a new RLock (so 1 too);
    # else it needs an acquire method.  lock=1 raised AttributeError (review)
    for make in (
        lambda lock: procpool.Value("i", 0, lock=lock),
        lambda lock: procpool.Array("i", 2, lock=lock),
    ):
        for new_rlock in (True, None, 1, 1.0):
            assert type(make(new_rlock).get_lock()) is procpool.RLock
        mine = _AcquireOnly()
        assert make(mine).get_lock() is mine
        for bad in (0, 2, "lock"):
            with pytest.raises(AttributeError, match=f"{bad!r} has no method 'acquire'"):
                make(bad)


def _atomic_adds(v, n):
    for _ in range(n):
        v.add(1)


@needs_atomics
def test_atomic_add_from_processes_loses_nothing():
    v = procpool.Value("q", 0)
    procs = [FORK.Process(target=_atomic_adds, args=(v, 20000)) for _ in range(3)]
    for p in procs:
        p.start()
    _atomic_adds(v, 20000)
    for p in procs:
        p.join(30)
    assert v.value == 80000


@needs_atomics
def test_libatomic_and_machine_code_agree():
    for prefer in ("machine-code", "libatomic"):
        ops = _ipc_atomic.load_ops(prefer)
        if ops is None:
            continue
        box = (ctypes.c_int64 * 1)(5)
        addr = ctypes.addressof(box)
        assert ops.fetch_add8(addr, 2) == 5
        assert ops.cas8(addr, 7, 1) == 7 and box[0] == 1
        assert ops.xchg8(addr, 9) == 1 and box[0] == 9


def test_array_numpy_view_is_zero_copy():
    a = procpool.Array("d", 100)
    view = a.numpy()
    view[:] = np.arange(100)
    assert a[5] == 5.0
    a[7] = -1
    assert view[7] == -1


def _fill_shared(sa, value):
    sa.array[:] = value


@pytest.mark.parametrize("ctx", [FORK, SPAWN], ids=["fork", "spawn"])
def test_shared_array_seen_by_child(ctx):
    sa = procpool.SharedArray((4, 5), "float32")
    assert sa.shape == (4, 5) and sa.dtype == np.float32 and not sa.array.any()
    assert run_child(_fill_shared, sa, 2.5, ctx=ctx, timeout=30) == 0
    assert (np.asarray(sa) == 2.5).all()
    copy = procpool.SharedArray.from_array(np.arange(6).reshape(2, 3))
    assert copy[1, 2] == 5 and copy.nbytes == 6 * copy.dtype.itemsize


def _double(sa):
    sa.array[:] *= 2
    return float(sa.array.sum())


def test_shared_objects_pass_to_pool_tasks():
    sa = procpool.SharedArray.from_array(np.ones(1000))
    v = procpool.Value("i", 0)
    with procpool.Pool(1) as pool:
        assert pool.apply_async(_double, (sa,)).get(20) == 2000.0
        pool.apply_async(_atomic_adds, (v, 10)).get(20)
    assert sa.array.sum() == 2000.0
    assert v.value == 10


def _die(v):
    v.value = 1
    os.kill(os.getpid(), signal.SIGKILL)


def test_anonymous_memory_leaves_nothing_after_sigkill():
    before = shm_entries()
    v = procpool.Value("i", 0)
    assert run_child(_die, v) == -signal.SIGKILL
    assert v.value == 1
    assert shm_entries() == before


def _attach_named(value_name, array_name, sa_name):
    v = procpool.Value.open(value_name)
    a = procpool.Array.open(array_name)
    sa = procpool.SharedArray.open(sa_name)
    v.value += 1
    a[0] = 99
    sa[...] = 7


def test_named_objects_open_by_name_in_unrelated_process():
    base = f"pptest-{uuid.uuid4().hex[:8]}"
    v = procpool.Value("i", 41, name=base + "-v")
    a = procpool.Array("i", 3, name=base + "-a")
    sa = procpool.SharedArray((2, 2), "int64", name=base + "-s")
    try:
        assert os.path.exists(f"/dev/shm/{base}-v")
        assert oct(os.stat(f"/dev/shm/{base}-v").st_mode & 0o777) == "0o600"
        with pytest.raises(FileExistsError):
            procpool.Value("i", name=base + "-v")
        # spawn: a fresh interpreter that only knows the names
        assert run_child(_attach_named, v.name, a.name, sa.name, ctx=SPAWN, timeout=30) == 0
        assert v.value == 42 and a[0] == 99 and (sa.array == 7).all()
        with pytest.raises(ValueError):
            procpool.Array.open(base + "-v")
    finally:
        for obj in (v, a, sa):
            obj.unlink()
    assert not any(name.startswith(base) for name in shm_entries())
    with pytest.raises(FileNotFoundError):
        procpool.Value.open(base + "-v")
    with pytest.raises(ValueError):
        procpool.Value("i", 0).unlink()  # anonymous: nothing to unlink


def test_bad_names_rejected():
    for bad in ("a/b", "", "..", "x" * 300):
        with pytest.raises(ValueError):
            procpool.Value("i", name=bad)


# -- passing shared objects: the lean fast path and the fallbacks ----------------------------


def _set_first(arr, value):
    arr[0] = value
    return len(arr)


def _structured_task(sa):
    sa.array["b"] += 1
    return sa.dtype.names, sa.shape


def test_shared_array_with_a_structured_dtype_passes_whole():
    dt = np.dtype([("a", "<f8"), ("b", "<i4")])
    sa = procpool.SharedArray((3,), dt)
    arr = procpool.Array("d", 4)
    with procpool.Pool(1) as pool:
        assert pool.apply_async(_structured_task, (sa,)).get(20) == (("a", "b"), (3,))
        assert pool.apply_async(_set_first, (arr, 2.5)).get(20) == 4
    assert sa.dtype == dt and (sa.array["b"] == 1).all()
    assert arr[0] == 2.5


@pytest.mark.parametrize(
    "dt",
    [
        {"names": ["x", "y"], "formats": ["u1", "<f4"], "offsets": [0, 4], "itemsize": 12},
        {"names": ["x", "y"], "formats": ["u1", "<f4"], "titles": ["X", "Y"]},  # (title, name)
        [("x", [("a", "i1"), ("b", "<f2", (2,))]), ("y", "<f4", (3,))],  # nested, subarrays
    ],
)
def test_a_named_structured_shared_array_opens_with_its_fields(dt):
    dt = np.dtype(dt)
    name = f"pptest-{uuid.uuid4().hex[:8]}"
    sa = procpool.SharedArray(5, dt, name=name)
    try:
        sa.array["y"] = 7
        other = procpool.SharedArray.open(name)
        assert other.dtype == dt and other.shape == (5,)
        assert (other.array["y"] == 7).all()
    finally:
        sa.unlink()


def test_a_subarray_dtype_becomes_a_trailing_axis_as_in_numpy():
    sa = procpool.SharedArray(4, ("<f8", (3,)))
    assert sa.shape == (4, 3) == np.empty(4, ("<f8", (3,))).shape
    assert sa.dtype == np.float64


def test_passing_a_shared_array_pickles_flat():
    """One global (the rebuild function) and one descriptor: what makes passing 1 GiB O(1)."""
    from procpool import _serialize

    sa = procpool.SharedArray((8, 1 << 14), "float32")
    payload = _serialize.dumps(sa)
    try:
        assert payload.nbuf == 0 and len(payload.fds) == 1
        assert payload.data.count(b"procpool") == 1, payload.data
        fds, payload.fds = payload.fds, []
        back = _serialize.loads(payload.data, payload.nbuf, fds)  # takes the fds
    finally:
        payload.close()
    assert type(back) is procpool.SharedArray
    assert back.shape == (8, 1 << 14) and back.dtype == np.float32 and back.name is None
    back[3, 5] = 7.0
    assert sa[3, 5] == 7.0  # the same memory


def _memfd_regions():
    """Mappings and descriptors of procpool regions in this process."""
    target = "/memfd:procpool (deleted)"
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if line.rstrip("\n").endswith(target))
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return maps, fds


def _first_values(*arrays):
    return [float(a.array[0]) for a in arrays]


def _add_one_to_each(*arrays):
    for a in arrays:
        a.array[0] += 1
    return _first_values(*arrays)


def test_a_worker_maps_a_shared_array_once_and_unmaps_it_once_the_parent_drops_it():
    """Each worker maps a SharedArray the first time a task names it (no mapping per task)
    and keeps it while the parent holds the array; once the parent drops it, so does the
    worker: its memory is not held by an idle pool."""
    arrays = [procpool.SharedArray.from_array(np.ones(1 << 16)) for _ in range(4)]
    with procpool.Pool(1) as pool:
        before = pool.apply(_memfd_regions)
        for _ in range(5):
            for sa in arrays:
                pool.apply(_double, (sa,))  # apply's quick path
                pool.apply_async(_double, (sa,)).get(20)  # the general one
                pool.map(_double, [sa, sa])  # a chunk
        maps, fds = pool.apply(_memfd_regions)
        assert maps == before[0] + 4 and fds > before[1]
        assert [sa.array[0] for sa in arrays] == [2.0**20] * 4  # the same memory, in place
        del arrays, sa
        gc.collect()
        assert wait_until(lambda: pool.apply(_memfd_regions) == before, timeout=10)


def test_many_shared_arrays_through_one_worker_each_reach_their_task(monkeypatch):
    """More arrays than a worker keeps mapped, several per task, in batches: the least used
    are dropped (FORGET) and mapped again when named, the tasks of a batch before them run
    first; beyond what one task names by key, the rest travel as descriptors."""
    from procpool import _serialize, _supervise

    monkeypatch.setattr(_supervise, "MAPPED_PER_WORKER", 6)
    monkeypatch.setattr(_serialize, "MAX_REGIONS", 3)
    arrays = [procpool.SharedArray.from_array(np.full(8, float(i))) for i in range(12)]
    rng = np.random.default_rng(7)
    picks = [tuple(rng.choice(12, size=rng.integers(1, 6), replace=False)) for _ in range(300)]
    with procpool.Pool(1) as pool:
        before = pool.apply(_memfd_regions)
        results = [
            pool.apply_async(_first_values, tuple(arrays[i] for i in pick)) for pick in picks
        ]
        for pick, r in zip(picks, results, strict=True):
            assert r.get(20) == [float(i) for i in pick]
        got = pool.starmap(_first_values, [tuple(arrays[i] for i in pick) for pick in picks], 7)
        assert got == [[float(i) for i in pick] for pick in picks]
        for pick in picks[:50]:
            args = tuple(arrays[i] for i in pick)
            assert pool.apply(_add_one_to_each, args) == [a.array[0] for a in args]
        assert pool.apply(_memfd_regions)[0] <= before[0] + 6 + 5  # (+ a task's descriptors)
    del arrays, results, args
    gc.collect()


def _count(*arrays):
    return len(arrays), float(sum(a.array[0] for a in arrays))


def test_one_call_naming_more_arrays_than_a_worker_keeps_still_runs():
    """apply's quick path names at most MAX_REGIONS arrays by key (more go as descriptors), so
    a task never makes its worker drop its own arrays -- nor fails the pool (before the
    review: 130 arrays in one apply killed the I/O thread)."""
    arrays = [procpool.SharedArray.from_array(np.full(2, float(i))) for i in range(130)]
    total = float(sum(range(130)))
    with procpool.Pool(1) as pool:
        assert pool.apply(_count, tuple(arrays[:20])) == (20, float(sum(range(20))))
        assert pool.apply(_count, tuple(arrays)) == (130, total)
        assert pool.apply_async(_count, tuple(arrays)).get(20) == (130, total)
        assert pool.starmap(_count, [tuple(arrays)] * 3) == [(130, total)] * 3
        assert pool.apply(_count, (arrays[0],)) == (1, 0.0)  # the pool goes on
    del arrays
    gc.collect()


def test_a_worker_keeps_only_as_many_arrays_as_its_descriptors_allow():
    """A forked worker inherits the parent's shared objects' descriptors (two each before
    Python 3.13); the arrays it keeps mapped must leave its tasks room (before the review:
    with 180 arrays under a limit of 512, tasks failed with EMFILE and workers died)."""
    code = """if True:
        import os, resource
        import numpy as np
        import procpool
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        arrays = [procpool.SharedArray.from_array(np.full(2, float(i))) for i in range(180)]
        with procpool.Pool(1) as pool:
            pids = set()
            for i, sa in enumerate(arrays):
                value, pid = pool.apply(_first_and_pid, (sa,))
                assert value == float(i), (value, i)
                pids.add(pid)
        print("workers", len(pids))
    """
    here = os.path.dirname(__file__)
    code = code.replace("_first_and_pid", "test_shared._first_and_pid")
    code = f"import sys; sys.path.insert(0, {here!r}); import test_shared\n" + code
    done = run_python(code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["workers", "1"]


def test_a_parent_out_of_descriptors_fails_only_the_task_whose_array_it_cannot_send():
    """The pool duplicates an array's descriptor to send it to a worker the first time; out
    of descriptors, that task fails saying so, the pool and its worker go on, and the array
    is sent when a later task names it (before the review: the pool's I/O thread died, or
    apply's worker was killed)."""
    code = """if True:
        import os, resource
        import procpool
        from conftest import use_up_descriptors, wait_until
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        with procpool.Pool(1) as pool:
            pid = pool.apply(os.getpid)
            sa = procpool.SharedArray(4, "i8")
            sa[0] = 7
            held = use_up_descriptors()
            for call in (pool.apply, lambda f, a: pool.apply_async(f, a).get(20)):
                try:
                    call(test_shared._first_and_pid, (sa,))
                except procpool.SerializationError as exc:
                    assert "could not be sent to this worker" in str(exc), exc
                else:
                    raise AssertionError("it was sent")
            for fd in held:
                os.close(fd)
            assert pool.apply(test_shared._first_and_pid, (sa,)) == (7.0, pid)
            assert pool.apply_async(test_shared._first_and_pid, (sa,)).get(20) == (7.0, pid)
            # an array never sent: the worker's note of why goes when the array does
            other = procpool.SharedArray(4, "i8")
            key = other._region.key()
            held = use_up_descriptors()
            try:
                pool.apply_async(test_shared._first_and_pid, (other,)).get(20)
            except procpool.SerializationError:
                pass
            for fd in held:
                os.close(fd)
            assert key in pool.apply(test_shared._mapped_keys)
            del other
            gone = lambda: key not in pool.apply(test_shared._mapped_keys)
            assert wait_until(gone, timeout=10), "the note stayed"
        print("ok")
    """
    here = os.path.dirname(__file__)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_shared\n" + code
    done = run_python(code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok"]


def _mapped_keys():
    from procpool import _ipc_mem

    return list(_ipc_mem._MAPPED)


def _first_and_pid(sa):
    return float(sa.array[0]), os.getpid()


def _same_object(a, b):
    return a is b


def test_an_array_passed_twice_to_one_call_is_one_object_in_the_worker():
    sa = procpool.SharedArray(3)
    with procpool.Pool(1) as pool:
        assert pool.apply(_same_object, (1, 2)) is False  # (apply's quick path from now on)
        assert pool.apply(_same_object, (sa, sa)) is True
        assert pool.apply_async(_same_object, (sa, sa)).get(20) is True
        assert pool.apply(_same_object, (sa, procpool.SharedArray(3))) is False


def test_two_threads_passing_a_fresh_array_give_it_one_key():
    import sys
    import threading

    from procpool._ipc_mem import Region

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            region = Region.create(8, {})
            keys = []
            both = threading.Barrier(2)

            def take(region=region, keys=keys, both=both):
                both.wait()
                keys.append(region.key())

            threads = [threading.Thread(target=take) for _ in "ab"]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert keys[0] == keys[1] == region.key()
            region.close()
    finally:
        sys.setswitchinterval(switch)


def test_a_child_forked_while_a_key_was_being_given_gives_keys():
    """The lock behind Region.key() is made anew in a forked child (a pool forks workers from
    its own thread while another thread may hold it: the child hung in its first key)."""
    from procpool import _ipc_mem

    with _ipc_mem._key_lock:  # as another thread giving a key at the fork
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            signal.alarm(10)  # a hang ends the child with SIGALRM
            try:
                region = _ipc_mem.Region.create(8, {})
                os._exit(0 if region.key() else 1)
            except BaseException:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_KEPT = None


def _keep(sa):
    global _KEPT
    _KEPT = sa


def _drop_kept_and_check_fds():
    """In a worker of a pool a task started: drop the array kept by the task that forked this
    process, with descriptors of our own open that may have taken a number it held."""
    global _KEPT
    ours = [fd for _ in range(8) for fd in os.pipe()]  # the lowest free numbers
    try:
        value = float(_KEPT.array[1])
        back = pickle.loads(pickle.dumps(_KEPT.array))  # (a copy: the memory is readable)
        _KEPT = None
        gc.collect()
        for fd in ours:
            os.fstat(fd)  # EBADF: closed behind our back
    finally:
        for fd in ours:
            os.close(fd)
    return value, float(back[1])


def _nested_pool_drops_the_kept_array():
    with procpool.Pool(1) as inner:
        return inner.apply(_drop_kept_and_check_fds)


def test_a_task_keeping_its_shared_array_then_starting_a_pool_loses_no_descriptor():
    """A worker's mapped region is the task's object: a pool the task starts inherits its
    descriptor as any other (before the review: closed in the new workers as the worker's
    own, and its number, reused, was closed again when the array went)."""
    sa = procpool.SharedArray.from_array(np.array([1.0, 2.0, 3.0]))
    with procpool.Pool(1) as pool:
        pool.apply(_keep, (sa,))
        assert pool.apply(_nested_pool_drops_the_kept_array) == (2.0, 2.0)
        assert pool.apply(_nested_double, (sa,)) == (12.0, 24.0)  # doubled twice, summed


def _limit_address_space(extra):
    import resource

    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, resource.RLIM_INFINITY))


def _unlimit_address_space():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def test_an_array_a_worker_could_not_map_is_tried_again_when_named_again():
    """The parent counts the array as mapped in the worker once it sent it; a mapping that
    failed there (the address space was short) is made when a later task names it."""
    sa = procpool.SharedArray(2**30 // 8)  # 1 GiB of address space
    with procpool.Pool(1) as pool:
        pool.apply(_limit_address_space, (256 * 2**20,))
        with pytest.raises(procpool.SerializationError, match="cannot be mapped here"):
            pool.apply(_double, (sa,))
        pool.apply(_unlimit_address_space)
        assert pool.apply(_double, (sa,)) == 0.0
        assert pool.apply_async(_double, (sa,)).get(20) == 0.0


def _nested_double(sa):
    with procpool.Pool(1) as inner:
        return inner.apply(_double, (sa,)), _double(sa)


def test_a_worker_passes_on_a_shared_array_it_was_given_by_key():
    """A task's SharedArray goes on to the task's own pool (keys of two parents meet in that
    pool's worker), back as a result, and into a retried task's new worker."""
    sa = procpool.SharedArray.from_array(np.ones(4))
    with procpool.Pool(1) as pool:
        assert pool.apply(_nested_double, (sa,)) == (8.0, 16.0)
        back = pool.apply(_identity, (sa,))
        back.array[1] = 5.0
        assert sa.array[1] == 5.0 and back.shape == (4,)
    del back


def _identity(x):
    return x


def _die_first_time_then_sum(marker, sa):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return float(sa.array.sum())


def test_a_retried_task_has_its_shared_array_mapped_in_the_new_worker(tmp_path):
    sa = procpool.SharedArray.from_array(np.arange(5.0))
    with procpool.Pool(1, retries=1) as pool:
        marker = str(tmp_path / "first")
        assert pool.apply(_die_first_time_then_sum, (marker, sa)) == 10.0
        marker = str(tmp_path / "second")
        assert pool.apply_async(_die_first_time_then_sum, (marker, sa)).get(20) == 10.0


def _locked_add(v, n):
    for _ in range(n):
        with v.get_lock():
            v.value += 1


def test_values_and_locks_passed_by_key_task_after_task_keep_their_semantics():
    v = procpool.Value("i", 0)
    arr = procpool.Array("d", 3)
    with procpool.Pool(2) as pool:
        for r in [pool.apply_async(_locked_add, (v, 50)) for _ in range(40)]:
            r.get(20)
        for _ in range(20):
            pool.apply(_locked_add, (v, 1))
        assert pool.apply(_set_first, (arr, 4)) == 3
    assert v.value == 40 * 50 + 20 and arr[0] == 4


def _write_or_hang_on_five(item):
    sa, x = item
    if x == 5:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # TaskTimeout never comes: a hard kill
        time.sleep(30)
    sa.array[x] = x
    return x


def test_a_chunk_of_shared_array_items_split_by_a_hard_timeout_runs_its_other_items():
    """The parent unpickles the chunk to send its other items again: the SharedArray in them,
    named by key, is found in the parent too."""
    sa = procpool.SharedArray(12)
    items = [(sa, i) for i in range(12)]
    out = []
    with procpool.Pool(2, grace=0.2) as pool:
        it = pool.imap(_write_or_hang_on_five, items, chunksize=4, timeout=0.3)
        for _ in items:
            try:
                out.append(next(it))
            except procpool.TaskTimeoutError as exc:
                out.append(str(exc).split(" of ")[0])
    assert out == [0, 1, 2, 3, 4, "item 5", 6, 7, 8, 9, 10, 11]
    assert sa.array.tolist() == [0, 1, 2, 3, 4, 0, 6, 7, 8, 9, 10, 11]


def _private_memory():
    """This process's resident memory less what it shares through files and shared memory."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def _touch_all(sa):
    sa.array[:] = 1.0
    return os.getpid()


def test_shared_memory_a_worker_maps_does_not_count_against_max_memory_per_child():
    """The worker keeps the arrays it was passed mapped, and the pages it touched count in its
    RSS; they are not its own memory, and it is not replaced for them."""
    sa = procpool.SharedArray(16 * 2**20 // 8)  # 16 MiB
    with procpool.Pool(1, max_memory_per_child=8 * 2**20 + _private_memory()) as pool:
        pids = {pool.apply(_touch_all, (sa,)) for _ in range(5)}
    assert len(pids) == 1 and sa.array.sum() == sa.size


def test_shared_objects_pass_to_a_stdlib_pool():
    """Through the stdlib's ForkingPickler (resource sharer): the fallback reduction."""
    import multiprocessing

    sa = procpool.SharedArray.from_array(np.ones(10))
    v = procpool.Value("i", 0)
    arr = procpool.Array("i", 3)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_double, (sa,)).get(20) == 20.0
        pool.apply_async(_atomic_adds, (v, 10)).get(20)
        assert pool.apply_async(_set_first, (arr, 5)).get(20) == 3
    assert sa.array.sum() == 20.0 and v.value == 10 and arr[0] == 5


def test_plain_pickle_refuses_shared_objects():
    import pickle

    for obj in (
        procpool.SharedArray(3),
        procpool.Value("i", 0, lock=False),
        procpool.Array("i", 2),
    ):
        with pytest.raises(RuntimeError, match="file descriptors"):
            pickle.dumps(obj)


def _rlock_child_cannot_release(rlock):
    try:
        rlock.release()
    except AssertionError:
        os._exit(0)
    os._exit(1)


def test_received_rlock_not_owned_in_forked_child():
    """A lock rebuilt from a message (the lean path) is reset after fork like a created one."""
    a, b = procpool.Pipe()
    try:
        a.send(procpool.Value("i", 0))  # its RLock travels with it
        v = b.recv()
    finally:
        a.close()
        b.close()
    v.acquire()
    try:
        assert run_child(_rlock_child_cannot_release, v.get_lock()) == 0
    finally:
        v.release()


def test_a_named_object_whose_construction_fails_leaves_no_file_and_frees_its_name():
    # bad input found after the region was made: nothing left in /dev/shm, the name reusable
    name = f"procpool_test_bad_{os.getpid()}"
    bad = [
        lambda: procpool.Value("i", "abc", name=name),
        lambda: procpool.Value("i", 0, lock="not a lock", name=name),
        lambda: procpool.Array("i", [1, "a"], name=name),
        lambda: procpool.Array("c", "text", name=name),
        lambda: procpool.SharedArray((-3,), name=name),
        # a description too long for the region's header (written after the file exists)
        lambda: procpool.SharedArray(
            3, np.dtype([(f"field{i}", "f8") for i in range(200)]), name=name
        ),
    ]
    for make in bad:
        with pytest.raises((TypeError, ValueError, AttributeError)):
            make()
        assert not os.path.exists(f"/dev/shm/{name}")
    v = procpool.Value("i", 7, name=name)
    try:
        assert procpool.Value.open(name).value == 7
    finally:
        v.unlink()


def test_a_shared_array_takes_numpy_integers_as_its_shape():
    assert procpool.SharedArray(np.int64(5)).shape == (5,)  # (a TypeError: not iterable)
    assert procpool.SharedArray((np.int64(2), 3)).shape == (2, 3)
    with pytest.raises(TypeError):
        procpool.SharedArray(2.5)


@pytest.mark.parametrize("shape", [-1, (-1,), (3, -1), (-1, 0), -5])
def test_a_shared_array_refuses_a_negative_shape_as_numpy(shape):
    # -1 was read by np.ndarray as "whatever fits": an empty array of shape (-1,) (review)
    with pytest.raises(ValueError, match="negative dimensions are not allowed"):
        np.zeros(shape)
    with pytest.raises(ValueError, match="negative dimensions are not allowed"):
        procpool.SharedArray(shape)
    name = f"pptest-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match="negative dimensions are not allowed"):
        procpool.SharedArray(shape, name=name)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_a_shared_array_too_big_for_any_machine_is_a_value_error():
    # (OverflowError: Python int too large to convert to C long, from ftruncate, before)
    for shape in ((2**40, 2**40), 2**62, (2**63, 0)):
        with pytest.raises(ValueError):
            np.zeros(shape)
        with pytest.raises(ValueError, match="too big"):
            procpool.SharedArray(shape)


def _long_record_task(sa, row):
    sa.array[row] = tuple(range(len(sa.dtype.names)))
    return len(sa.dtype.names), float(sa.array[sa.dtype.names[-1]].sum())


def _long_record_child(sa):
    _long_record_task(sa, 1)


@pytest.mark.timeout(90)
def test_an_anonymous_shared_array_takes_any_structured_dtype_and_travels_with_it():
    # its dtype was written into the header that only SharedArray.open reads, 2 KiB at most:
    # numpy's valid dtypes were refused ("shared object description too long", review)
    dt = np.dtype([(f"measurement_column_{i}", "f8") for i in range(100)])
    sa = procpool.SharedArray(4, dt)
    assert sa.dtype == dt and sa.shape == (4,)
    assert procpool.SharedArray(2, np.dtype([("", "f8")] * 200)).dtype.names[-1] == "f199"
    columns = [f"a_rather_long_column_name_for_a_record_array_{i:02d}" for i in range(40)]
    rec = np.rec.fromarrays([np.arange(3.0) + i for i in range(40)], names=columns)
    copy = procpool.SharedArray.from_array(rec)
    assert copy.dtype == rec.dtype and (copy.array == rec).all()
    with procpool.Pool(1) as pool:  # to a task (by key), and back in its result
        assert pool.apply(_long_record_task, (sa, 0)) == (100, 99.0)
        assert pool.starmap(_long_record_task, [(sa, 2), (sa, 3)]) == [(100, 198.0), (100, 297.0)]
    for ctx in (FORK, SPAWN):  # to a Process (the stdlib's pickler with spawn)
        sa.array[1] = 0
        assert run_child(_long_record_child, sa, ctx=ctx, timeout=60) == 0
        assert sa.array[1][dt.names[-1]] == 99.0
    q = procpool.Queue()
    q.put(copy)
    back = q.get(timeout=10)
    q.close()
    assert back.dtype == rec.dtype
    back.array[0] = tuple(range(40))
    assert copy.array[columns[-1]][0] == 39.0  # (the same memory)


def test_a_named_shared_array_whose_dtype_is_too_long_to_describe_says_so():
    dt = np.dtype([(f"measurement_column_{i}", "f8") for i in range(100)])
    name = f"pptest-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match=r"named SharedArray.*100 fields.*leave out name="):
        procpool.SharedArray(3, dt, name=name)
    assert not os.path.exists(f"/dev/shm/{name}")
    fits = np.dtype([(f"measurement_column_{i}", "f8") for i in range(20)])
    sa = procpool.SharedArray(3, fits, name=name)  # (what fits still opens by name)
    try:
        assert procpool.SharedArray.open(name).dtype == fits
    finally:
        sa.unlink()


def test_a_kept_atomic_add_outlives_its_value():
    # (the atomics' closures held the address only: once the Value went, a kept add()
    # wrote into unmapped memory -- a segfault -- in a review)
    done = run_python(
        "import procpool\n"
        "add = procpool.Value('q', 0).add\n"
        "raw_add = procpool.RawValue('i', 5).add\n"
        "import gc; gc.collect()\n"
        "print(add(1), add(2), raw_add(1))\n",
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "1 3 6\n", done.stderr


def test_acquire_with_a_threading_lock_of_the_callers():
    import threading

    for lock in (threading.Lock(), threading.RLock()):
        v = procpool.Value("i", 0, lock=lock)
        assert v.acquire() is True  # (TypeError: timeout=None, in a review)
        v.release()
        assert v.acquire(True, 1) is True
        v.release()
