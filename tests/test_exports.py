"""The public surface is intended and documented: every name in __all__ exists and has a
docstring, and nothing private leaks into it (as trio's test_exports does)."""

from __future__ import annotations

import inspect
import os

from conftest import run_python

import procpool


def test_every_public_name_exists_and_is_documented():
    for name in procpool.__all__:
        obj = getattr(procpool, name)
        if getattr(obj, "__module__", "").startswith("multiprocessing"):
            continue  # re-exported from the stdlib for drop-in use; documented there
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def test_no_private_names_are_exported():
    assert not [n for n in procpool.__all__ if n.startswith("_")]
    assert len(set(procpool.__all__)) == len(procpool.__all__)


def test_pool_methods_are_documented():
    # (DaskPool shares PoolAPI; importing it here would load dask into the whole test run)
    for cls in (procpool.Pool, procpool.ProcessPoolExecutor):
        for name in dir(cls):  # inherited ones too (the shared PoolAPI)
            member = getattr(cls, name)
            if not name.startswith("_") and callable(member):
                assert member.__doc__, f"{cls.__name__}.{name} has no docstring"


def _printed_by_a_fresh_python(code: str) -> str:
    """What *code* prints, run by a fresh interpreter (nothing imported by the tests)."""
    out = run_python(code, 60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip() + out.stderr


def test_importing_procpool_and_running_a_pool_does_not_import_typing():
    # typing would sit in every forked worker (~0.5 MB of the idle-worker RSS target); the
    # modules read its names only under `if TYPE_CHECKING:` (see procpool/_typing.py)
    code = (
        "import sys, procpool\n"
        "with procpool.Pool(1) as p:\n"
        "    assert p.apply(abs, (-2,)) == 2 and p.map(abs, [-1]) == [1]\n"
        "    assert list(p.imap(abs, [-3])) == [3] and p.submit(abs, -4).result() == 4\n"
        "import procpool.pipe, procpool.queue, procpool.shared, procpool.signals, procpool.sync\n"
        "print(sorted(m for m in sys.modules if m == 'typing' or m.startswith('typing.')))\n"
    )
    assert _printed_by_a_fresh_python(code) == "[]"


def test_generic_classes_can_still_be_subscripted():
    assert procpool.AsyncResult[int].__origin__ is procpool.AsyncResult
    assert procpool.IMapIterator[str].__args__ == (str,)


def test_a_pool_of_small_tasks_does_not_import_ctypes():
    # ctypes (≈ 0.35 MB) would sit in every forked worker: forked workers die with the pool
    # through a pipe (procpool._start.die_with_pipe) and the parent reads progress slots with
    # pread; ctypes comes only with a large buffer (on Python < 3.13) or shared memory
    code = (
        "import sys, procpool\n"
        "with procpool.Pool(2) as p:\n"
        "    assert p.map(abs, range(-50, 50)) == [abs(x) for x in range(-50, 50)]\n"
        "    assert p.apply(abs, (-2,)) == 2 and p.submit(abs, -4).result() == 4\n"
        "    in_worker = p.apply(eval, (\"'ctypes' in __import__('sys').modules\",))\n"
        "print('ctypes' in sys.modules, in_worker)\n"
    )
    assert _printed_by_a_fresh_python(code) == "False False"


def test_every_name_of_multiprocessing_is_there():
    # `import procpool as multiprocessing` must run a classic program from its first line
    import multiprocessing

    assert [n for n in multiprocessing.__all__ if not hasattr(procpool, n)] == []


def test_start_methods_contexts_and_raw_objects_as_multiprocessing():
    code = """
import sys
sys.path.insert(0, TESTS)
from tasks import fill
import procpool as multiprocessing
multiprocessing.freeze_support()
assert multiprocessing.get_start_method(allow_none=True) is None
multiprocessing.set_start_method("spawn")
try:
    multiprocessing.set_start_method("fork")
except RuntimeError:
    pass
else:
    raise AssertionError("set twice without force")
assert multiprocessing.get_start_method() == "spawn"
with multiprocessing.Pool(1) as pool:
    assert pool.start_method == "spawn" and pool.apply(abs, (-2,)) == 2
ctx = multiprocessing.get_context("forkserver")
assert ctx.get_start_method() == "forkserver" and ctx.Queue is multiprocessing.Queue
with ctx.Pool(1) as pool:
    assert pool.start_method == "forkserver"
with multiprocessing.ProcessPoolExecutor(1, mp_context=ctx) as ex:
    assert ex.submit(abs, -3).result() == 3
raw = multiprocessing.RawValue("i", 3)
arr = multiprocessing.RawArray("d", 4)
assert raw.value == 3 and list(arr) == [0.0] * 4
# ctypes objects, as multiprocessing's (numpy, memoryview, byref), that travel by reference
import ctypes, numpy
assert numpy.frombuffer(arr).shape == (4,) and ctypes.sizeof(arr) == 32
ctypes.byref(raw)
with multiprocessing.Pool(1) as pool:  # (spawn, set above)
    pool.apply(fill, (arr, raw))
assert list(arr) == [1.0, 2.0, 3.0, 4.0] and raw.value == 7
ctx = multiprocessing.get_context("spawn")
assert ctx.Process is __import__("multiprocessing").get_context("spawn").Process
assert ctx.get_context() is ctx and ctx.get_context("fork").get_start_method() == "fork"
import copy  # a copy is private, as multiprocessing's
twin, deep = copy.copy(arr), copy.deepcopy(arr)
twin[0] = deep[0] = 42.0
assert arr[0] == 1.0 and twin[0] == deep[0] == 42.0
for obj in (raw, arr):
    try:
        obj.get_lock()
    except AttributeError:
        pass
    else:
        raise AssertionError("a raw object has no lock")
print("ok")
"""
    tests = os.path.dirname(os.path.abspath(__file__))
    assert _printed_by_a_fresh_python(code.replace("TESTS", repr(tests))) == "ok"


def test_a_context_of_a_named_method_refuses_set_start_method_and_the_default_one_sets_it():
    """As multiprocessing's: ``get_context("fork").set_start_method("spawn")`` raised nothing
    and changed the start method of every pool (review, CPython's TestStartMethod); the
    default context follows and sets the current start method."""
    code = """
import procpool
ctx = procpool.get_context("fork")
try:
    ctx.set_start_method("spawn")
except ValueError as exc:
    assert "concrete context" in str(exc)
else:
    raise AssertionError("set through a concrete context")
assert procpool.get_start_method(allow_none=True) is None and ctx.get_start_method() == "fork"
default = procpool.get_context()
assert default is procpool.get_context() and default.get_start_method() == "fork"
default.set_start_method("spawn")
assert procpool.get_start_method() == "spawn" == default.get_start_method()
assert default.get_context().get_start_method() == "spawn"
with default.Pool(1) as pool:
    assert pool.start_method == "spawn" and pool.apply(abs, (-1,)) == 1
print("ok")
"""
    assert _printed_by_a_fresh_python(code) == "ok"


def test_the_standard_executor_and_pool_run_on_a_procpool_context():
    """The standard library's ProcessPoolExecutor(mp_context=) and multiprocessing.pool.Pool
    (context=) read the internals of the queues they make: procpool's context gives their
    own code multiprocessing's objects (the executor's thread died on a procpool
    SimpleQueue, and its caller waited for good), and its own to everyone else."""
    code = """
import concurrent.futures, multiprocessing.pool, procpool
for method in ("fork", "spawn"):
    ctx = procpool.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
    with multiprocessing.pool.Pool(1, context=ctx) as pool:
        assert pool.map(abs, [-4, -5]) == [4, 5]
    assert type(ctx.SimpleQueue()).__module__ == "procpool.queue"  # (asked by this code)
import copy, pickle
twin = copy.copy(ctx)  # (its __getattr__ looked for _mp before it had one: RecursionError)
assert twin.get_start_method() == ctx.get_start_method() and twin.Queue is procpool.Queue
assert pickle.loads(pickle.dumps(ctx)).get_start_method() == ctx.get_start_method()
assert not hasattr(ctx, "__path__")  # (procpool's own module attributes are not the context's)
print("ok")
"""
    assert _printed_by_a_fresh_python(code) == "ok"
