"""Serialization: pickle protocol 5, large buffers out of band through memfd, cloudpickle fallback.

``dumps`` turns an object into a :class:`Payload`: the pickle stream plus a list of file
descriptors that travel beside it (``SCM_RIGHTS`` over the worker's socket):

* buffers of at least :data:`OOB_THRESHOLD` bytes that pickle hands out of band (numpy arrays,
  ``PickleBuffer``; large ``bytes``, ``bytearray``, ``array.array`` and memoryviews too, through
  :class:`_LiftingPickler`, when :func:`_holds_large_bytes` finds one; ``str`` stays in-band)
  are copied once into an
  anonymous ``memfd`` and their fd sent instead of their bytes.  The receiver maps the memfd
  (``_mapping``: which also tells the sender once the mapping is gone) and hands the mapping
  to the unpickler, so a numpy array arrives *without a second copy*.
  The kernel frees the memory when the last mapping and fd are gone, whichever process dies
  first: nothing can leak into ``/dev/shm``.
* objects that carry a file descriptor (procpool's Queue, Pipe, Value...) call :func:`send_fd`
  from their ``__reduce__``; the receiver gets a fresh descriptor back from :func:`recv_fd`.
* shared-memory regions (SharedArray, Value, Array, Lock...) in a pool task's arguments
  (``keyed``) travel *by key* instead (:func:`send_region`): the payload lists the regions, and
  the pool maps each one in a worker once, then names it (see ``_dispatch._map_regions``).

The plain C pickler is tried first (fast); where it fails (lambdas, closures, classes defined in
``__main__``), cloudpickle takes over.  A task's function goes by reference when it is a plain
module-level function of an importable module (the worker imports it), and through cloudpickle
otherwise, so that a function defined in ``__main__`` after the pool started is still found in
the worker (a ``__main__`` function also carries its name: see ``_mainfunc``).  cloudpickle is imported on first use: it costs ~2 MB in every process (each forked
worker included) and most programs never need it.
"""

from __future__ import annotations

import array
import copyreg
import io
import os
import pickle
import reprlib
import socket
import sys
import threading
import types
from collections import ChainMap
from collections.abc import Callable

from ._channel import MAX_FDS_PER_FRAME
from ._mainfunc import _code_names, _fingerprint, _main_qualname, _MainFunction
from ._mapping import _map_buffer, discard_received
from ._start import INTERNAL_FDS
from .errors import SerializationError

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

if TYPE_CHECKING:
    from ._buffers import BufferCache, Segment
    from ._ipc_mem import Region

#: buffers at least this large travel through shared memory instead of the socket.  Below it,
#: creating, mapping and closing a memfd (~20 us) costs more than copying through the socket.
OOB_THRESHOLD = 256 * 1024

PROTOCOL = 5

#: descriptors one payload may carry: they must fit one frame's SCM_RIGHTS message
MAX_FDS = MAX_FDS_PER_FRAME
#: fds a payload leaves free for objects that pass their own (Queue, Pipe...): large buffers
#: beyond ``MAX_FDS`` minus these travel in-band, in the pickle itself (slower, but they travel)
_FDS_KEPT_FOR_OBJECTS = 16
#: regions one keyed payload names by key (see send_region); more travel as descriptors.  At
#: most what a worker keeps mapped (``_supervise.mapping_cap``): a task's own regions never
#: evict one another
MAX_REGIONS = 16

_tls = threading.local()


class Payload:
    """One serialized object: the pickle stream, and the fds that travel with it.

    ``fds[:nbuf]`` are memfds holding out-of-band buffers in pickle order; ``fds[nbuf:]`` are
    descriptors registered by :func:`send_fd`.  The payload owns its fds until :meth:`close`,
    except those of ``segments``: memfds lent by a pool's :class:`~procpool._buffers.BufferCache`,
    which :meth:`close` gives back instead.
    """

    __slots__ = ("data", "nbuf", "fds", "cache", "segments", "regions")

    def __init__(
        self,
        data: bytes,
        nbuf: int = 0,
        fds: list[int] | None = None,
        cache: BufferCache | None = None,
        segments: list[Segment] | None = None,
        regions: list[Region] | None = None,
    ) -> None:
        self.data = data
        self.nbuf = nbuf
        self.fds = fds or []
        self.cache = cache
        self.segments = segments
        #: the regions the pickle names by key (see send_region): kept alive until the task
        #: is released (retries included), since a worker maps each from its descriptor the
        #: first time it is sent there
        self.regions = regions

    def close(self) -> None:
        """Close the fds this payload still owns (after they were sent, or if they never will be)."""
        self.regions = None
        fds, self.fds = self.fds, []
        segments, self.segments = self.segments, None
        lent = {seg.fd for seg in segments} if segments else ()
        for fd in fds:
            if fd in lent:
                continue
            INTERNAL_FDS.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        if segments and self.cache is not None:
            for seg in segments:
                self.cache.unlend(seg)


def _memfd_from_buffer(raw: memoryview) -> int:
    fd = os.memfd_create("procpool-buffer", os.MFD_CLOEXEC)
    INTERNAL_FDS.add(fd)  # a pool's worker forked meanwhile (from another thread) must not keep it
    try:
        view = raw.cast("B")
        total = len(view)
        done = 0
        while done < total:  # write(2) into tmpfs: one copy, no page faults on our side
            done += os.pwrite(fd, view[done:], done)
    except BaseException:
        INTERNAL_FDS.discard(fd)
        os.close(fd)
        raise
    return fd


class _Collector:
    """Collects the fds produced while one object is pickled."""

    __slots__ = ("oob", "cache", "buffer_fds", "passed_fds", "segments", "regions")

    def __init__(self, oob: bool, cache: BufferCache | None = None, keyed: bool = False) -> None:
        self.oob = oob
        self.cache = cache
        self.buffer_fds: list[int] = []
        self.passed_fds: list[int] = []
        self.segments: list[Segment] = []
        self.regions: list[Region] | None = [] if keyed else None

    def buffer_callback(self, pb: pickle.PickleBuffer) -> bool:
        if not self.oob:
            return True
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < OOB_THRESHOLD:
            return True
        if len(self.buffer_fds) + len(self.passed_fds) >= MAX_FDS - _FDS_KEPT_FOR_OBJECTS:
            return True  # no room for more fds in one frame: this one is copied in-band
        seg = self.cache.take(raw) if self.cache is not None else None
        if seg is not None:
            self.segments.append(seg)
            self.buffer_fds.append(seg.fd)
        else:
            self.buffer_fds.append(_memfd_from_buffer(raw))
        return False

    def payload(self, data: bytes) -> Payload:
        fds = self.buffer_fds + self.passed_fds
        segments = self.segments or None
        return Payload(data, len(self.buffer_fds), fds, self.cache, segments, self.regions or None)

    def discard(self) -> None:
        self.payload(b"").close()
        self.buffer_fds, self.passed_fds, self.segments = [], [], []
        if self.regions is not None:
            self.regions = []


def send_fd(fd: int) -> int:
    """Register *fd* to travel with the object being pickled; return the token to rebuild it.

    Call from an object's ``__reduce__`` while procpool pickles it (a pool task's arguments or
    result).  The descriptor is duplicated, so the caller keeps its own.  Outside procpool's
    pickling this raises ``RuntimeError``: the object then has to be inherited instead.
    """
    collector: _Collector | None = getattr(_tls, "collector", None)
    if collector is None:
        raise RuntimeError("file descriptors can only be sent through procpool's channels")
    collector.passed_fds.append(os.dup(fd))
    return len(collector.passed_fds) - 1


def send_region(region: Region) -> int:
    """Register the shared-memory *region* to travel with the object being pickled; return the
    token to rebuild it with (``Region.received``).

    In a pool task's arguments (a keyed pickling) the region goes by key: a negative token, no
    descriptor -- the pool maps it in the worker beforehand (see ``_dispatch._map_regions``);
    elsewhere, or beyond :data:`MAX_REGIONS`, its descriptor goes (:func:`send_fd`).  Raises
    ``RuntimeError`` outside procpool's pickling, as send_fd does.
    """
    collector: _Collector | None = getattr(_tls, "collector", None)
    if collector is None:
        raise RuntimeError("file descriptors can only be sent through procpool's channels")
    regions = collector.regions
    if regions is None or (len(regions) >= MAX_REGIONS and region not in regions):
        return send_fd(region.fd)
    key = region._key or region.key()
    if region not in regions:
        regions.append(region)
    return -key


# ------------------------------------------------- the standard library's objects with a descriptor
# Plain pickle refuses a socket, and copies a multiprocessing Connection as its descriptor's
# *number*: through a procpool Queue or Pipe, or to a pool task, it arrived pointing at nothing,
# or at another file.  multiprocessing's own pickler sends their descriptors; so does procpool's,
# with these reductions (``_ipc_fd``: SCM_RIGHTS while procpool pickles; elsewhere -- plain
# pickle, copy -- the TypeError plain pickle raises for a socket; multiprocessing's pickler
# uses its own).  The Connection's is registered once its
# module is imported -- importing it here would cost every process ≈ 1.2 MB (tempfile, shutil,
# random...) -- so the pickling paths call :func:`adopt_stdlib_connection` while
# ``stdlib_pending`` and ``MP_CONNECTION in sys.modules``.

MP_CONNECTION = "multiprocessing.connection"
stdlib_pending = True


def adopt_stdlib_connection() -> None:
    """Register the reduction of :mod:`multiprocessing.connection`'s ``Connection`` (once its
    module is imported: see above)."""
    global stdlib_pending
    module = sys.modules.get(MP_CONNECTION)
    if module is not None:
        copyreg.pickle(module.Connection, _reduce_stdlib_connection)
        stdlib_pending = False


def _reduce_stdlib_connection(conn: Any) -> tuple[Any, tuple[Any, ...]]:
    from ._ipc_fd import reduce_stdlib_connection

    return reduce_stdlib_connection(conn)


def _reduce_socket(sock: socket.socket) -> tuple[Any, tuple[Any, ...]]:
    from ._ipc_fd import reduce_socket

    return reduce_socket(sock)


copyreg.pickle(socket.socket, _reduce_socket)


def collecting() -> bool:
    """Whether procpool is pickling in this thread (descriptors can go with the pickle)."""
    return getattr(_tls, "collector", None) is not None


def recv_fd(token: int) -> int:
    """Return a new descriptor for *token* (see :func:`send_fd`); the caller owns it."""
    received: list[int] | None = getattr(_tls, "received", None)
    if received is None or not 0 <= token < len(received):
        raise RuntimeError("no file descriptor was received for this object")
    return os.dup(received[token])


#: types that can hold neither a large buffer nor a file descriptor (nor anything else)
PLAIN = frozenset({int, float, str, bool, type(None), complex})


#: types whose pickling is procpool's own code and passes only shared-memory regions (by key,
#: in a task's arguments): apply's quick path takes them as it takes PLAIN ones, and
#: dumps_call tries dumps_refs for them (shared.py registers its classes)
KEYED: set[type] = set()


#: the types pickle copies into its stream however large (its C code saves them before any
#: reducer could be asked; an array.array reduces to a bytes copy of itself): see
#: _LiftingPickler
_BYTES_LIKE = frozenset({bytes, bytearray, memoryview, array.array})
#: where :func:`_holds_large_bytes` looks for them: every item of tuples and value of dicts of
#: at most _LIFT_ITEMS items (not dict keys, nor sets), the first item of lists and of larger ones (a list of large buffers is
#: seldom mixed; a map's chunk of small items costs one look), _LIFT_DEPTH levels down (a
#: call's ``(args, kwds)``, an argument, its items).  Once a plain stream came out large,
#: every item of containers up to _LIFT_ITEMS_DEEP (see dumps)
_LIFT_CONTAINERS = frozenset({tuple, list, dict})
_LIFT_ITEMS = 8
_LIFT_ITEMS_DEEP = 1024
_LIFT_DEPTH = 3


def _holds_large_bytes(obj: Any, depth: int = _LIFT_DEPTH, deep: bool = False) -> bool:
    """Whether *obj* is, or holds where such things usually are, a ``bytes``, ``bytearray``,
    ``array.array`` or memoryview of at least :data:`OOB_THRESHOLD` bytes.  It runs before
    every payload that is not plain scalars is pickled: a few type checks for a call's
    arguments or a chunk of small items, no allocation.  *deep* (:func:`dumps`, once a stream
    came out large): every item of larger containers too."""
    t = type(obj)
    if t in _BYTES_LIKE:
        return _large(obj)
    if not depth or t not in _LIFT_CONTAINERS:
        return False
    items: Any = obj.values() if t is dict else obj
    if deep:
        if len(obj) > _LIFT_ITEMS_DEEP:
            return False
    elif t is list or len(obj) > _LIFT_ITEMS:
        if not obj:
            return False
        items = (next(iter(items)),)  # its first item stands for the rest
    for item in items:
        it = type(item)
        if it in _BYTES_LIKE:
            if _large(item):
                return True
        elif depth > 1 and it in _LIFT_CONTAINERS and _holds_large_bytes(item, depth - 1, deep):
            return True
    return False


def _large(obj: bytes | bytearray | memoryview | array.array) -> bool:
    if isinstance(obj, memoryview):
        return _liftable_view(obj) and obj.nbytes >= OOB_THRESHOLD
    if isinstance(obj, array.array):  # (it pickles as a bytes copy of itself, then lifted)
        return len(obj) * obj.itemsize >= OOB_THRESHOLD
    return len(obj) >= OOB_THRESHOLD


def _liftable_view(view: memoryview) -> bool:
    try:
        return view.c_contiguous
    except ValueError:  # released: pickling says so
        return False


class _Lifted:
    """A ``bytes``, ``bytearray`` or memoryview as :class:`_LiftingPickler` sends it: its
    contents as a :class:`pickle.PickleBuffer` (out of band, through shared memory, when large:
    see _Collector) and the type to rebuild from them, which copies them out of the received
    mapping once.  A memoryview arrives as ``bytes``, as cloudpickle has always sent it."""

    __slots__ = ("obj",)

    def __init__(self, obj: bytes | bytearray | memoryview) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> tuple:
        obj = self.obj
        rebuild = bytearray if type(obj) is bytearray else bytes
        return rebuild, (pickle.PickleBuffer(obj),)


class _LiftingPickler(pickle.Pickler):
    """A pickler that sends large ``bytes``/``bytearray`` (an ``array.array``'s bytes copy
    too) out of band, wherever they are, and contiguous memoryviews of any size, as bytes
    (small ones in-band): as persistent ids (the one hook pickle's C code calls before it
    copies them), each a :class:`_Lifted`.  The same object named twice is one :class:`_Lifted`, pickled once and
    memoized as any object: identity, cycles and sharing are pickle's own.  The stream then
    needs :func:`loads`' ``persistent_load``: :func:`dumps` keeps its stream only when a
    descriptor goes with it, so that its receiver calls :func:`loads`.  A Python call per object pickled: used only when
    :func:`_holds_large_bytes` says it is worth it."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable) -> None:
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self._lifted: dict[int, _Lifted] = {}

    def persistent_id(self, obj: Any) -> _Lifted | None:  # noqa: D102 - see the class
        t = type(obj)
        if t is bytes or t is bytearray:
            if len(obj) < OOB_THRESHOLD:
                return None
        elif t is not memoryview or not _liftable_view(obj):  # (any size: pickle refuses views)
            return None
        lifted = self._lifted.get(id(obj))
        if lifted is None:
            lifted = self._lifted[id(obj)] = _Lifted(obj)
        return lifted


def _dumps_lifting(obj: Any, collector: _Collector) -> bytes | None:
    """*obj* pickled by :class:`_LiftingPickler`, or None (having discarded what it collected)
    when no buffer went out of band: the stream must then be plain pickle (see there)."""
    stream = io.BytesIO()
    try:
        _LiftingPickler(stream, collector.buffer_callback).dump(obj)
    except BaseException:
        collector.discard()
        raise
    if collector.buffer_fds or collector.passed_fds:
        return stream.getvalue()
    collector.discard()
    return None


def _same(pid: Any) -> Any:
    """``persistent_load`` for :class:`_LiftingPickler`'s ids: each was rebuilt by its reduce."""
    return pid


def dumps_call(args: tuple, kwds: dict, cache: BufferCache | None = None) -> Payload | tuple:
    """Serialize a pool task's ``(args, kwds)``, shared-memory regions by key.  The common
    case, no keywords and every argument a plain scalar or string (immutable, always
    picklable), returns *args* as it is: the pool pickles those of a batch together, when it
    sends them (see ``_dispatch``)."""
    if not kwds:
        keyed = False
        for a in args:  # a plain loop: no generator to allocate, as all() would need
            if type(a) not in PLAIN:
                if type(a) not in KEYED:
                    break
                keyed = True
        else:
            if not keyed:
                return args
            try:  # SharedArrays as plain references, as apply's quick path sends them
                payload = dumps_refs(args)
            except Exception:  # noqa: BLE001 - dumps says what is wrong
                payload = None
            if payload is not None:
                return payload
    return dumps((args, kwds), cache=cache, keyed=True)


def dumps_refs(args: tuple) -> Payload | None:
    """A call's *args* made of PLAIN values and objects with a plain *reference*
    form (``_task_ref``: a SharedArray): the pickle of ``(args, {}, refs)``, plain data only,
    each such argument None in *args* and ``(index, *ref)`` in *refs* (the worker rebuilds it,
    see ``_worker.with_refs``).  No reduce and no global to pickle or unpickle: a third of a
    SharedArray round trip otherwise.  None when an argument has no such form."""
    out = list(args)
    refs = []
    regions: list[Region] = []
    i = 0
    for a in args:
        if type(a) not in PLAIN:
            task_ref = getattr(a, "_task_ref", None)
            ref = task_ref() if task_ref is not None else None
            if ref is None:
                return None
            for j in range(i):  # passed twice: one object in the worker too (pickle's memo)
                if out[j] is None and args[j] is a:
                    return None
            out[i] = None
            refs.append((i, *ref))
            region = a._region
            if region not in regions:
                if len(regions) == MAX_REGIONS:  # (a payload never evicts its own regions)
                    return None
                regions.append(region)
        i += 1
    return Payload(pickle.dumps((out, {}, refs), PROTOCOL), 0, None, None, None, regions)


def dumps_keyed(obj: Any) -> Payload:
    """``dumps(obj, keyed=True)``, lean, for *obj* made only of PLAIN values and KEYED objects
    (apply's quick path): no large buffers, no cloudpickle.  Raises what pickling raises."""
    collector = _Collector(False, None, True)
    previous = getattr(_tls, "collector", None)
    _tls.collector = collector
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except BaseException:
        collector.discard()
        raise
    finally:
        _tls.collector = previous
    return Payload(data, 0, collector.passed_fds, None, None, collector.regions)


def dumps(
    obj: Any, *, oob: bool = True, cache: BufferCache | None = None, keyed: bool = False
) -> Payload:
    """Serialize *obj*; raise :class:`SerializationError` naming it if it cannot be pickled.

    With *cache* (a pool's task arguments, a worker's results), large buffers are copied into
    reusable segments instead of fresh memfds (see ``_buffers``).  *keyed* (a pool's task arguments too):
    shared-memory regions go by key, listed in the payload's ``regions`` (see send_region).
    """
    if stdlib_pending and MP_CONNECTION in sys.modules:
        adopt_stdlib_connection()
    collector = _Collector(oob, cache, keyed)
    previous = getattr(_tls, "collector", None)
    _tls.collector = collector
    try:
        try:
            data = _dumps_lifting(obj, collector) if oob and _holds_large_bytes(obj) else None
            if data is None:
                data = pickle.dumps(obj, PROTOCOL, buffer_callback=collector.buffer_callback)
                if oob and len(data) >= OOB_THRESHOLD and _holds_large_bytes(obj, deep=True):
                    # large buffers one level further down (a chunk of (key, data) items):
                    # found once the stream says there is something large to look for
                    lifted = _Collector(oob, cache, keyed)
                    _tls.collector = lifted
                    try:
                        again = _dumps_lifting(obj, lifted)
                    except Exception:  # noqa: BLE001 - the plain stream stands
                        again = None
                    finally:
                        _tls.collector = collector
                    if again is not None:
                        collector.discard()
                        collector, data = lifted, again
                        _tls.collector = collector
        except Exception:
            collector.discard()
            try:
                data = _cloudpickle_dumps(obj, collector.buffer_callback)
            except Exception as exc:
                collector.discard()
                raise SerializationError(f"cannot pickle {describe(obj)}: {exc}") from exc
    except BaseException:  # SystemExit, KeyboardInterrupt...: no memfd may outlive the attempt
        collector.discard()
        raise
    finally:
        _tls.collector = previous
    if collector.buffer_fds or collector.passed_fds:
        nfds = len(collector.buffer_fds) + len(collector.passed_fds)
        if nfds > MAX_FDS:
            collector.discard()
            raise SerializationError(
                f"{describe(obj)} holds {nfds} large buffers or descriptors; at most"
                f" {MAX_FDS} travel with one task or result (pass them in several tasks, or"
                " put them in one SharedArray)"
            )
        return collector.payload(data)
    if collector.regions:
        return Payload(data, regions=collector.regions)
    return Payload(data)


_cloudpickle_module: Any = None
_pickler_class: Any = None


def _refuse_file(obj: Any) -> Any:
    raise TypeError(
        f"cannot send an open file ({obj!r}) to another process: pass its name and open it there"
    )


_STD_STREAMS = ("stdin", "stdout", "stderr", "__stdin__", "__stdout__", "__stderr__")


def _cloudpickle_dumps(obj: Any, buffer_callback: Callable | None = None) -> bytes:
    """cloudpickle, minus its copying of open files: a text file would arrive as a
    ``StringIO`` snapshot that the task reads or writes in vain (plain pickle and
    :mod:`multiprocessing` refuse them; so do we, with a clearer message)."""
    global _pickler_class
    if _pickler_class is None:
        base = _cloudpickle().Pickler
        by_reference = base.dispatch_table[io.TextIOWrapper]  # sys.stdout & co., by name

        def reduce_text_file(obj: Any) -> Any:
            if any(obj is getattr(sys, name, None) for name in _STD_STREAMS):
                return by_reference(obj)  # the worker's own sys.stdout: fine, as before
            return _refuse_file(obj)

        table = ChainMap({io.TextIOWrapper: reduce_text_file}, base.dispatch_table)
        _pickler_class = type("_Pickler", (base,), {"dispatch_table": table})
    out = io.BytesIO()
    _pickler_class(out, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


def _cloudpickle() -> Any:
    """The cloudpickle module, imported on first use -- and complete: another thread may be
    inside its import, with a half-initialised module already in ``sys.modules``."""
    global _cloudpickle_module
    if _cloudpickle_module is None:
        from . import _start

        # A pool's I/O thread forks workers (see _start): one forked while this thread is
        # inside the import would inherit the module's import lock, held, and deadlock when
        # it unpickles a function.  Forks take this lock, so none happens mid-import.  (An
        # import already under way in another thread is waited for by the import system.)
        with _start._FORK_LOCK:
            import cloudpickle

            _cloudpickle_module = cloudpickle
    return _cloudpickle_module


def dumps_function(func: Any) -> bytes:
    """Serialize a task's function: by reference when it is a module-level function of a module
    other than ``__main__`` (plain pickle checks the name leads back to it), by value through
    cloudpickle otherwise (lambdas, closures, ``__main__``, callable objects).  Once cloudpickle
    is imported -- a program that registered a module with ``register_pickle_by_value`` has --
    it pickles every function, as it knows which modules must travel by value.

    A classmethod of a class outside ``__main__`` goes as its class and name, as plain pickle
    sends it (the class by reference, unless cloudpickle was told to send its module by
    value): cloudpickle would send its function by value, to run against a copy of its
    module's globals as they were in this process, not the worker's own."""
    target: Any = func
    by_reference = type(func) in _BY_REFERENCE
    module = getattr(func, "__module__", "__main__")
    name = _classmethod_name(func)
    if name is not None:
        target, module, by_reference = (
            _ClassAttribute(func.__self__, name),
            func.__self__.__module__,
            True,
        )
    # (once imported, cloudpickle decides: it knows register_pickle_by_value's modules)
    if "cloudpickle" not in sys.modules and by_reference and module != "__main__":
        try:
            return pickle.dumps(target, PROTOCOL)
        except Exception:
            pass  # nested or renamed: cloudpickle knows how
    qualname = _main_qualname(func)
    try:
        blob: bytes | str = _cloudpickle_dumps(target)
    except Exception as exc:
        if qualname is None:
            raise SerializationError(f"cannot pickle the function {describe(func)}: {exc}") from exc
        # what it refers to cannot be copied (a lock, a socket...): by name alone, as
        # multiprocessing sends it -- a worker that has the same function in its __main__
        # runs it; the others say why there is no copy (a str in place of the copy)
        blob = f"{type(exc).__name__}: {exc}"
    if qualname is None:
        assert isinstance(blob, bytes)
        return blob
    needed = tuple(sorted(_code_names(func.__code__) & func.__globals__.keys()))
    return pickle.dumps(_MainFunction(qualname, _fingerprint(func), blob, needed), PROTOCOL)


_BY_REFERENCE = (types.FunctionType, types.BuiltinFunctionType)


def _classmethod_name(func: Any) -> str | None:
    """The name *func* is found by on its class, when it is a classmethod of a class outside
    ``__main__`` that gives it back under that name; else None."""
    owner = getattr(func, "__self__", None)
    if type(func) is not types.MethodType or not isinstance(owner, type):
        return None
    name = getattr(func.__func__, "__name__", None)  # (a partial made a classmethod has none)
    if not isinstance(name, str) or getattr(owner, "__module__", "__main__") == "__main__":
        return None
    try:
        return name if getattr(owner, name, None) == func else None
    except Exception:  # noqa: BLE001 - a metaclass's __getattr__, an __eq__ that raises
        return None


class _ClassAttribute:
    """A classmethod as :func:`dumps_function` sends it: unpickled, ``getattr(owner, name)``."""

    __slots__ = ("owner", "name")

    def __init__(self, owner: type, name: str) -> None:
        self.owner = owner
        self.name = name

    def __reduce__(self) -> tuple[Any, tuple[type, str]]:
        return (getattr, (self.owner, self.name))


def loads(data: bytes | memoryview, nbuf: int = 0, fds: list[int] | None = None) -> Any:
    """Rebuild an object from :func:`dumps`' output.  Takes ownership of *fds* (all closed)."""
    if not fds:
        return pickle.loads(data)
    try:
        buffers: list[Any] = []
        try:
            for fd in fds[:nbuf]:
                buffers.append(_map_buffer(fd))
        except BaseException:
            discard_received(nbuf, fds, len(buffers) + 1)  # the rest were never mapped
            raise
        if len(fds) == nbuf:
            return _load(data, buffers)
        previous = getattr(_tls, "received", None)
        _tls.received = fds[nbuf:]
        try:
            return _load(data, buffers)
        finally:
            _tls.received = previous
    finally:
        Payload(b"", 0, fds).close()


def _load(data: bytes | memoryview, buffers: list[Any]) -> Any:
    """Unpickle a stream that came with descriptors: it may hold _LiftingPickler's ids."""
    unpickler = pickle.Unpickler(io.BytesIO(data), buffers=buffers)
    unpickler.persistent_load = _same  # type: ignore[method-assign]
    return unpickler.load()


def describe(obj: Any) -> str:
    """A short, safe description of *obj* for error messages."""
    try:
        text = reprlib.repr(obj)
    except Exception:
        text = "<unrepresentable>"
    return f"{type(obj).__qualname__} object {text}"


def find_unpicklable(args: tuple, kwds: dict) -> str:
    """Name the first argument of a call that cannot be pickled (for a clearer error)."""
    for i, value in enumerate(args):
        try:
            dumps(value, oob=False).close()
        except SerializationError:
            return f"argument {i} ({describe(value)})"
    for key, value in kwds.items():
        try:
            dumps(value, oob=False).close()
        except SerializationError:
            return f"keyword argument {key!r} ({describe(value)})"
    return "the arguments"
