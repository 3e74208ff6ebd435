"""Shared memory: ``Value``, ``Array`` (the stdlib's), ``SharedArray`` (numpy), atomics.

Memory is anonymous (a ``memfd``) unless you give a ``name``: the kernel frees it when the last
process using it exits -- a SIGKILLed program leaves nothing in ``/dev/shm``.  With ``name=``,
the object lives in ``/dev/shm/<name>`` (mode 0600) until :meth:`unlink`, and unrelated
processes attach with ``Value.open(name)``, ``Array.open(name)`` or ``SharedArray.open(name)``.

Every object can be inherited, passed to a pool task or Process, or sent through a Queue/Pipe.

Example::

    import procpool

    hits = procpool.Value("q", 0)
    hits.add(1)                     # atomic, no lock taken
    with hits.get_lock():           # the stdlib way still works
        hits.value += 1

    arr = procpool.Array("d", 1_000_000)
    view = arr.numpy()              # zero-copy numpy view of the shared memory
    view[:] = 1.0
"""

from __future__ import annotations

import ctypes
import json
import math
import operator
import struct
import sys
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.sharedctypes import typecode_to_type  # type: ignore[attr-defined]

from . import _ipc_atomic, _serialize
from ._ipc_mem import DATA_OFFSET, META_SIZE, Region, by_key
from .sync import Lock, RLock

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Value", "Array", "SharedArray"]

_LockType = Lock | RLock


def _ctype_of(typecode_or_type: Any) -> Any:
    if isinstance(typecode_or_type, str):
        try:
            return typecode_to_type[typecode_or_type]
        except KeyError:
            raise TypeError(f"unknown typecode {typecode_or_type!r}") from None
    return typecode_or_type


def _typename(ctype: Any) -> str:
    for code, t in typecode_to_type.items():
        if t is ctype:
            return code
    raise ValueError(
        f"a named shared object needs a typecode, not {ctype!r} (custom ctypes cannot be described)"
    )


def _discard(region: Region) -> None:
    """A new region whose object could not be made (bad input): its name goes, so that
    nothing is left in /dev/shm and the name can be used again."""
    if region.name is not None:
        try:
            region.unlink()
        except OSError:
            pass
    region.close()


def _make_lock(lock: Any) -> _LockType | None:
    """multiprocessing's rule (``sharedctypes.Value``/``Array``), exactly: ``lock is False``: no
    lock; ``lock in (True, None)`` (so 1 too): a new RLock; else anything with ``acquire``."""
    if lock is False:
        return None
    if lock in (True, None):
        return RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


class _Shared:
    """What Value and Array have in common: a region, a ctypes object over it, a lock."""

    _region: Region
    _obj: Any
    _lock: _LockType | None

    def get_obj(self) -> Any:
        """The ctypes object in shared memory (no locking)."""
        return self._obj

    def get_lock(self) -> _LockType:
        """The lock guarding this object (raises ``AttributeError`` when made with lock=False)."""
        if self._lock is None:
            raise AttributeError("this shared object was created with lock=False")
        return self._lock

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Acquire the lock (``get_lock().acquire(block, timeout)``)."""
        lock = self.get_lock()
        # (a threading lock of the caller's takes no timeout=None)
        return lock.acquire(block) if timeout is None else lock.acquire(block, timeout)

    def release(self) -> None:
        self.get_lock().release()

    def __enter__(self) -> bool:
        return self.get_lock().__enter__()

    def __exit__(self, *args: object) -> None:
        self.get_lock().__exit__(*args)

    @property
    def name(self) -> str | None:
        """The name in ``/dev/shm``, or None for anonymous memory."""
        return self._region.name

    def unlink(self) -> None:
        """Remove the name (named objects only); attached processes keep working."""
        self._region.unlink()

    def _locked(self) -> Any:
        return self._lock if self._lock is not None else _NO_LOCK


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


_NO_LOCK = _NoLock()


class Value(_Shared):
    """A ctypes value in shared memory (:func:`multiprocessing.Value`).

    ``Value(typecode_or_type, *args, lock=True, name=None)``: *typecode* as the :mod:`array`
    module ('i', 'd', 'q'...) or a ctypes type; *args* initialise it.  ``.value`` reads and
    writes it under the lock (an :class:`~procpool.RLock`, or the *lock* given, or none with
    ``lock=False``).  ``value += 1`` is *not* atomic: hold ``get_lock()``, or use the atomic
    methods below on integer and float values.

    Atomics (4- and 8-byte integers, 'f' and 'd'; no lock taken, much faster than the lock):
    ``add(n)`` returns the new value, ``fetch_add(n)`` the old one, ``exchange(v)`` the old one,
    ``compare_exchange(expected, desired)`` stores *desired* only if the value equals
    *expected* and returns whether it did, ``load()`` and ``store(v)``.  Integer arithmetic
    wraps around as in C.  Raises ``TypeError`` for other types, and for an argument that is not
    an integer (integer Values) or a real number (float Values); ``OverflowError`` for a float
    a 'f' Value cannot hold.  Nothing is written then.

    Example::

        v = procpool.Value("i", 0)
        v.add(5)                           # 5
        v.compare_exchange(5, 7)           # True; v.value == 7

    A ``ctypes.Structure`` has no ``.value``: as with the stdlib, its fields are attributes of
    the Value, each read and written under the lock (``p = Value(Point, 1, 2); p.x += 1``).
    Fields whose name starts with ``_`` are reached through ``get_obj()``.

    An array type (``Value(ctypes.c_int * 3, 1, 2)``) gives an :class:`Array` of its element
    type and length, its items set from *args* as ctypes sets them -- what the stdlib's
    ``SynchronizedArray``/``SynchronizedString`` are: ``len``, indexing, slicing, ``.value``
    and ``.raw`` for chars, ``get_lock()`` (with ``lock=False``, the ctypes array itself).
    """

    def __new__(cls, typecode_or_type: Any, *args: Any, **kwargs: Any) -> Value:
        ctype = _ctype_of(typecode_or_type)
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Array) and "_attach" not in kwargs:
            # (multiprocessing: RawValue(ctype, *args), then a SynchronizedArray/String over it)
            array_type: Any = ctype
            shared = Array(array_type._type_, array_type._length_, _init_args=args, **kwargs)
            return shared  # type: ignore[return-value]  # (not a Value: no __init__ follows)
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            cls = _structure_value_class(cls, ctype)
        self = super().__new__(cls)
        if kwargs.get("lock", True) is False and kwargs.get("_attach") is None:
            self.__init__(typecode_or_type, *args, **kwargs)  # type: ignore[misc]
            return _raw(self)  # (not a Value: Python does not call __init__ again)
        return self

    def __init__(
        self,
        typecode_or_type: Any,
        *args: Any,
        lock: Any = True,
        name: str | None = None,
        _attach: tuple[Region, _LockType | None] | None = None,
    ) -> None:
        ctype = _ctype_of(typecode_or_type)
        if _attach is not None:
            self._region, self._lock = _attach
            self._obj = ctype.from_buffer(self._region.mmap, DATA_OFFSET)
        else:
            meta = {"kind": "Value", "typecode": _typename(ctype) if name else None}
            self._region = Region.create(ctypes.sizeof(ctype), meta, name)
            try:
                self._lock = _make_lock(lock)
                self._obj = ctype.from_buffer(self._region.mmap, DATA_OFFSET)
                if args:
                    self._obj.__init__(*args)
            except BaseException:
                _discard(self._region)
                raise
        self._ctype = ctype
        self._setup_atomics()

    @classmethod
    def open(cls, name: str, *, lock: Any = False) -> Value:
        """Attach to the named Value *name* (``FileNotFoundError`` if there is none).

        The lock of a named Value is not shared by name; pass a lock you share otherwise, or
        use the atomic methods.
        """
        region = Region.open(name)
        meta = region.read_meta()
        if meta.get("kind") != "Value":
            raise ValueError(f"{name!r} is a {meta.get('kind')}, not a Value")
        return cls(meta["typecode"], lock=lock, _attach=(region, _make_lock(lock)))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        token = self._region.token()
        if token is None:
            return (_rebuild_value, (self._ctype, self._region, self._lock))
        return (_attach_value, (self._ctype, token, self._region.name, self._lock))

    # -- the stdlib API ---------------------------------------------------------------------
    @property
    def value(self) -> Any:
        with self._locked():
            return self._obj.value

    @value.setter
    def value(self, new: Any) -> None:
        with self._locked():
            self._obj.value = new

    def __repr__(self) -> str:
        if isinstance(self._obj, ctypes.Structure):
            shown = ", ".join(f"{f}={getattr(self._obj, f)!r}" for f in _field_names(self._ctype))
        else:
            shown = repr(self._obj.value)
        return f"<procpool.Value {self._ctype.__name__}({shown})>"

    # -- atomics ----------------------------------------------------------------------------
    def _setup_atomics(self) -> None:
        ops = _ipc_atomic.OPS
        self._addr = self._region.data_address
        size = ctypes.sizeof(self._ctype)
        self._atomic_kind: str | None = None
        code = getattr(self._ctype, "_type_", None)
        if ops is None or size not in (4, 8) or not isinstance(code, str):
            return  # (an array or pointer type's ``_type_`` is a ctypes type)
        if code in "iIlLqQ":
            self._atomic_kind = "int"
        elif code in "fd":
            self._atomic_kind = "float"
            self._bits_fmt = "<i" if size == 4 else "<q"
            self._float_fmt = "<f" if size == 4 else "<d"
        else:
            return
        self._fadd = ops.fetch_add8 if size == 8 else ops.fetch_add4
        self._cas = ops.cas8 if size == 8 else ops.cas4
        self._xchg = ops.xchg8 if size == 8 else ops.xchg4
        self._unsigned = code in "ILQ"
        self._bits = size * 8
        if self._atomic_kind == "int":
            self._bind_int_fast_paths()

    def _bind_int_fast_paths(self) -> None:
        # ``v.add(1)`` is the hot call: bind a closure with everything precomputed (one ctypes
        # call and one comparison), shadowing the documented method of the same name.
        # The closures hold the region (a kept ``v.add`` keeps the memory it writes mapped),
        # never ``self``: a Value referring to itself would outlive its last reference until
        # the cycle collector ran (its memory and descriptors with it, in a worker too).
        fadd, addr, bits, unsigned = self._fadd, self._addr, self._bits, self._unsigned
        region, ctype = self._region, self._ctype
        mask = (1 << bits) - 1
        lo, hi = (0, mask) if unsigned else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        half = 1 << (bits - 1)

        def add(delta: int = 1) -> int:
            _ = region  # (held: see above)
            try:
                new = fadd(addr, delta) + delta
            except ctypes.ArgumentError:
                raise _not_an_int("add", ctype, delta) from None
            if unsigned:
                return new & mask
            return new if lo <= new <= hi else ((new + half) & mask) - half

        def fetch_add(delta: int = 1) -> int:
            _ = region
            try:
                old = fadd(addr, delta)
            except ctypes.ArgumentError:
                raise _not_an_int("fetch_add", ctype, delta) from None
            return old & mask if unsigned else old

        self.add = add  # type: ignore[method-assign,assignment]
        self.fetch_add = fetch_add  # type: ignore[method-assign,assignment]

    def _need_atomic(self) -> str:
        if self._atomic_kind is None:
            if _ipc_atomic.OPS is None:
                raise TypeError("atomic operations are not available on this machine")
            raise TypeError(
                f"atomic operations need a 4- or 8-byte int or float, not {self._ctype.__name__}"
            )
        return self._atomic_kind

    # The atomics check their arguments before any bits are computed: an ``int`` (integer
    # Value) or a ``float`` (float Value) goes straight on, anything else through _int_arg or
    # _float_arg (the slow path), which converts it or says what is wrong.
    def _int_arg(self, method: str, v: Any) -> int:
        """*v*, not an int, for an integer Value's *method*: anything with ``__index__``
        (``True``, numpy's integers), else a ``TypeError`` naming *method*."""
        try:
            return operator.index(v)
        except TypeError:
            raise _not_an_int(method, self._ctype, v) from None

    def _float_arg(self, method: str, v: Any) -> float:
        """*v*, not a float, for a float Value's *method*: a real number (an int, numpy's
        scalars, ``Fraction``, ``Decimal``: what has ``__float__`` or ``__index__``, as ctypes
        takes for ``.value``) as a float, else a ``TypeError`` naming *method*."""
        kind = type(v)
        if hasattr(kind, "__float__") or hasattr(kind, "__index__"):
            try:
                return float(v)
            except OverflowError:  # (an int past the largest float)
                raise self._out_of_range(method, v) from None
            except (TypeError, ValueError):
                pass
        verb = "adds" if method in ("add", "fetch_add") else "holds"
        raise TypeError(
            f"{method}(): a {self._ctype.__name__} Value {verb} real numbers, "
            f"not {kind.__name__} {v!r}"
        )

    def _out_of_range(self, method: str, v: Any) -> OverflowError:
        size = ctypes.sizeof(self._ctype)
        return OverflowError(
            f"{method}(): {v!r} is out of range for a {self._ctype.__name__} Value "
            f"(a {size}-byte float)"
        )

    def _to_signed(self, v: int) -> int:
        v &= (1 << self._bits) - 1
        return v - (1 << self._bits) if v >> (self._bits - 1) else v

    def _from_raw(self, raw: int) -> int:
        return raw & ((1 << self._bits) - 1) if self._unsigned else raw

    def _float_bits(self, f: float, method: str) -> int:
        try:
            return struct.unpack(self._bits_fmt, struct.pack(self._float_fmt, f))[0]
        except OverflowError:  # (past a 4-byte float's largest)
            raise self._out_of_range(method, f) from None

    def _bits_float(self, b: int) -> float:
        return struct.unpack(self._float_fmt, struct.pack(self._bits_fmt, b))[0]

    def _float_fetch_add(self, delta: float, method: str) -> float:
        while True:  # a compare-and-swap loop on the bit pattern
            old_bits = self._to_signed(self._raw_load())
            old = self._bits_float(old_bits)
            if self._cas(self._addr, old_bits, self._float_bits(old + delta, method)) == old_bits:
                return old

    def fetch_add(self, delta: int | float = 1) -> Any:
        """Atomically add *delta*; return the previous value."""
        if self._need_atomic() == "int":
            if type(delta) is not int:
                delta = self._int_arg("fetch_add", delta)
            return self._from_raw(self._fadd(self._addr, self._to_signed(delta)))
        if type(delta) is not float:
            delta = self._float_arg("fetch_add", delta)
        return self._float_fetch_add(delta, "fetch_add")

    def add(self, delta: int | float = 1) -> Any:
        """Atomically add *delta* (may be negative); return the new value."""
        if self._need_atomic() == "int":
            if type(delta) is not int:
                delta = self._int_arg("add", delta)
            old = self._from_raw(self._fadd(self._addr, self._to_signed(delta)))
            return self._from_raw(self._to_signed(old + delta))
        if type(delta) is not float:
            delta = self._float_arg("add", delta)
        return self._ctype(self._float_fetch_add(delta, "add") + delta).value

    def exchange(self, new: Any) -> Any:
        """Atomically store *new*; return the previous value."""
        return self._exchange(new, "exchange")

    def _exchange(self, new: Any, method: str) -> Any:
        if self._need_atomic() == "int":
            if type(new) is not int:
                new = self._int_arg(method, new)
            return self._from_raw(self._xchg(self._addr, self._to_signed(new)))
        if type(new) is not float:
            new = self._float_arg(method, new)
        return self._bits_float(self._xchg(self._addr, self._float_bits(new, method)))

    def compare_exchange(self, expected: Any, desired: Any) -> bool:
        """Atomically: if the value equals *expected*, store *desired* and return True."""
        if self._need_atomic() == "int":
            if type(expected) is not int:
                expected = self._int_arg("compare_exchange", expected)
            if type(desired) is not int:
                desired = self._int_arg("compare_exchange", desired)
            exp = self._to_signed(expected)
            return self._cas(self._addr, exp, self._to_signed(desired)) == exp
        if type(expected) is not float:
            expected = self._float_arg("compare_exchange", expected)
        if type(desired) is not float:
            desired = self._float_arg("compare_exchange", desired)
        exp = self._float_bits(expected, "compare_exchange")
        return self._cas(self._addr, exp, self._float_bits(desired, "compare_exchange")) == exp

    def _raw_load(self) -> int:
        return self._fadd(self._addr, 0)

    def load(self) -> Any:
        """Atomically read the value (with a full memory barrier)."""
        if self._need_atomic() == "int":
            return self._from_raw(self._raw_load())
        return self._bits_float(self._to_signed(self._raw_load()))

    def store(self, new: Any) -> None:
        """Atomically write the value (with a full memory barrier)."""
        self._exchange(new, "store")


def _not_an_int(method: str, ctype: Any, v: Any) -> TypeError:
    """What an integer Value's atomic *method* raises for *v*, which is not an integer."""
    verb = "adds" if method in ("add", "fetch_add") else "holds"
    return TypeError(
        f"{method}(): a {ctype.__name__} Value {verb} integers, not {type(v).__name__} {v!r}"
    )


def _field_names(ctype: Any) -> list[str]:
    """The field names of a ctypes Structure, its bases' first (``_fields_`` lists only its own)."""
    names: list[str] = []
    for klass in reversed(ctype.__mro__):
        names.extend(field[0] for field in klass.__dict__.get("_fields_", ()))
    return names


# one Value subclass per (Value class, Structure type), made on first use
_structure_classes: weakref.WeakKeyDictionary[Any, dict[type[Value], type[Value]]] = (
    weakref.WeakKeyDictionary()
)


def _structure_value_class(cls: type[Value], ctype: Any) -> type[Value]:
    """A subclass of *cls* with one property per field of *ctype*, read and written under the
    lock: what :func:`multiprocessing.sharedctypes.synchronized` does for a Structure.

    Properties rather than ``__getattr__``/``__setattr__``: they cost nothing to the other
    Values and their attribute writes.
    """
    by_cls = _structure_classes.setdefault(ctype, {})
    sub = by_cls.get(cls)
    if sub is None:
        props: dict[str, Any] = {}
        for field in _field_names(ctype):
            # a leading underscore could shadow the Value's own attributes (_obj, _lock...)
            if not field.startswith("_"):
                props[field] = _field_property(field)
        sub = type(cls.__name__, (cls,), props)
        by_cls[cls] = sub
    return sub


def _field_property(field: str) -> property:
    def getter(self: Value) -> Any:
        with self._locked():
            return getattr(self._obj, field)

    def setter(self: Value, new: Any) -> None:
        with self._locked():
            setattr(self._obj, field, new)

    return property(getter, setter, doc=f"The structure's field {field!r} (under the lock).")


def _rebuild_value(ctype: Any, region: Region, lock: _LockType | None) -> Value:
    return Value(ctype, _attach=(region, lock))


def _attach_value(ctype: Any, token: int, name: str | None, lock: _LockType | None) -> Value:
    return Value(ctype, _attach=(Region.received(token, name), lock))


class Array(_Shared):
    """A ctypes array in shared memory (:func:`multiprocessing.Array`).

    ``Array(typecode_or_type, size_or_initializer, lock=True, name=None)``: an int gives a
    zero-filled array of that length, a sequence (or ``bytes`` for 'c') initialises it.
    Supports ``len``, indexing and slicing (under the lock), iteration, ``get_obj()``,
    ``get_lock()``; char arrays ('c') have ``.value`` and ``.raw``.  :meth:`numpy` returns a
    zero-copy numpy view.

    Example::

        a = procpool.Array("i", [1, 2, 3])
        a[0] = 10; a[1:3] = [20, 30]
        s = procpool.Array("c", b"hello")
        s.value                             # b'hello'
    """

    def __new__(cls, typecode_or_type: Any, *args: Any, **kwargs: Any) -> Array:
        self = super().__new__(cls)
        if kwargs.get("lock", True) is False and kwargs.get("_attach") is None:
            self.__init__(typecode_or_type, *args, **kwargs)  # type: ignore[misc]
            return _raw(self)  # (see Value.__new__)
        return self

    def __init__(
        self,
        typecode_or_type: Any,
        size_or_initializer: int | Iterable[Any],
        *,
        lock: Any = True,
        name: str | None = None,
        _attach: tuple[Region, _LockType | None] | None = None,
        _init_args: tuple[Any, ...] = (),
    ) -> None:
        ctype = _ctype_of(typecode_or_type)
        if isinstance(size_or_initializer, int):
            length, init = size_or_initializer, None
        else:
            init = (
                list(size_or_initializer)
                if not isinstance(size_or_initializer, bytes)
                else size_or_initializer
            )
            length = len(init)
        if length < 0:
            raise ValueError("array size must be >= 0")
        array_type = ctype * length
        if _attach is not None:
            self._region, self._lock = _attach
        else:
            meta = {
                "kind": "Array",
                "typecode": _typename(ctype) if name else None,
                "length": length,
            }
            self._region = Region.create(ctypes.sizeof(array_type), meta, name)
        try:
            if _attach is None:
                self._lock = _make_lock(lock)
            self._obj = array_type.from_buffer(self._region.mmap, DATA_OFFSET)
            if init is not None and _attach is None:
                self._obj[:] = init
            if _init_args:  # (Value(array type, *args): as ctypes' array(*args))
                self._obj.__init__(*_init_args)
        except BaseException:
            if _attach is None:
                _discard(self._region)
            raise
        self._ctype = ctype

    @classmethod
    def open(cls, name: str, *, lock: Any = False) -> Array:
        """Attach to the named Array *name* (``FileNotFoundError`` if there is none)."""
        region = Region.open(name)
        meta = region.read_meta()
        if meta.get("kind") != "Array":
            raise ValueError(f"{name!r} is a {meta.get('kind')}, not an Array")
        return cls(meta["typecode"], meta["length"], _attach=(region, _make_lock(lock)))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        token = self._region.token()
        if token is None:
            return (_rebuild_array, (self._ctype, len(self._obj), self._region, self._lock))
        return (
            _attach_array,
            (self._ctype, len(self._obj), token, self._region.name, self._lock),
        )

    def __len__(self) -> int:
        return len(self._obj)

    def __getitem__(self, i: Any) -> Any:
        with self._locked():
            return self._obj[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        with self._locked():
            self._obj[i] = value

    def __iter__(self) -> Iterator[Any]:
        with self._locked():  # (a slice of a char array is bytes: its items would be ints)
            items = list(self._obj)
        return iter(items)

    @property
    def value(self) -> bytes:
        """For a char array: the bytes up to the first NUL."""
        with self._locked():
            return self._obj.value

    @value.setter
    def value(self, new: bytes) -> None:
        with self._locked():
            self._obj.value = new

    @property
    def raw(self) -> bytes:
        """For a char array: all the bytes."""
        with self._locked():
            return self._obj.raw

    @raw.setter
    def raw(self, new: bytes) -> None:
        with self._locked():
            self._obj.raw = new

    def numpy(self) -> Any:
        """A zero-copy numpy view of the array's memory (no locking: synchronise yourself)."""
        import numpy as np

        return np.ctypeslib.as_array(self._obj)

    def __repr__(self) -> str:
        return f"<procpool.Array {self._ctype.__name__}[{len(self)}]>"


def _rebuild_array(ctype: Any, length: int, region: Region, lock: _LockType | None) -> Array:
    return Array(ctype, length, _attach=(region, lock))


def _attach_array(
    ctype: Any, length: int, token: int, name: str | None, lock: _LockType | None
) -> Array:
    return Array(ctype, length, _attach=(Region.received(token, name), lock))


# ---------------------------------------------------------------- lock=False: ctypes itself
#: ctypes type -> its subclass whose objects pickle as the shared object under them
_RAW_TYPES: dict[Any, Any] = {}

#: what a raw object adds to its ctypes type: procpool's own methods, from the object under it
_RAW_EXTRAS = frozenset(
    {"add", "fetch_add", "exchange", "compare_exchange", "load", "store", "numpy", "name", "unlink"}
)


def _raw(shared: Value | Array) -> Any:
    """What ``Value``/``Array(..., lock=False)`` return, as :mod:`multiprocessing`'s do (and
    ``RawValue``/``RawArray``): the ctypes object in shared memory itself (``ctypes.byref``,
    ``memoryview``, ``numpy.frombuffer`` take it), of a subclass that pickles by reference --
    as *shared*, rebuilt into the same kind of object on arrival -- and that has procpool's
    atomics, ``numpy()``, ``name`` and ``unlink()`` from *shared*."""
    base = type(shared.get_obj())
    raw_type: Any = _RAW_TYPES.get(base)
    if raw_type is None:
        raw_type = _RAW_TYPES[base] = type(
            base.__name__,
            (base,),
            {
                "__reduce__": _reduce_raw,
                "__copy__": _copy_raw,  # (a private copy, as multiprocessing's)
                "__deepcopy__": lambda obj, memo: _copy_raw(obj),
                "__getattr__": _raw_extra,
                "__module__": __name__,
            },
        )
    obj = raw_type.from_buffer(shared._region.mmap, DATA_OFFSET)
    obj._procpool_shared = shared  # (keeps the mapping, and says how to travel)
    return obj


def _raw_extra(obj: Any, attr: str) -> Any:
    if attr in _RAW_EXTRAS:
        return getattr(obj._procpool_shared, attr)
    raise AttributeError(f"{type(obj).__name__!r} object has no attribute {attr!r}")


def _reduce_raw(obj: Any) -> tuple[Any, tuple[Any, ...]]:
    return (_raw, (obj._procpool_shared,))


def _copy_raw(obj: Any) -> Any:
    """``copy.copy`` of a raw object: a plain ctypes object holding a copy of its data."""
    base: Any = type(obj).__mro__[1]
    return base.from_buffer_copy(obj)


class SharedArray:
    """A numpy array in shared memory: pass it to other processes, they see the same data.

    ``SharedArray(shape, dtype="float64", *, name=None)`` is zero-filled;
    ``SharedArray.from_array(a)`` copies an existing array.  ``.array`` is the numpy view
    (also ``np.asarray(sa)``); indexing, ``shape``, ``dtype``, ``size``, ``nbytes`` go to it.
    Passing a SharedArray to a task or process sends a descriptor, never the data.  There is no
    lock: use a :class:`~procpool.Lock` or give each process its own slice.  A named array's
    shape and dtype are written in its header for :meth:`open` (2 KiB: a structured dtype of
    more than some 60-150 fields does not fit, a ``ValueError`` says so); an anonymous one
    carries its dtype wherever it goes, any dtype.

    Example::

        sa = procpool.SharedArray((1000, 3), "float32")
        pool.map(fill_rows, [(sa, i) for i in range(1000)])   # workers write sa.array[i]
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        dtype: Any = "float64",
        *,
        name: str | None = None,
        _region: Region | None = None,
    ) -> None:
        import numpy as np

        dt = np.dtype(dtype)
        if dt.hasobject:
            raise TypeError("a SharedArray cannot hold Python objects")
        # (an int, or anything with __index__ as numpy's sizes: np.int64(5), arr.shape[0])
        dims = (
            (operator.index(shape),)
            if hasattr(shape, "__index__")
            else tuple(operator.index(n) for n in shape)
        )
        if dt.subdtype is not None:  # ('f8', (3,)): a trailing axis, as numpy makes it
            dt, sub = dt.subdtype
            dims += sub
        if _region is None:
            nbytes = _checked_nbytes(dims, dt.itemsize)
            meta = {"kind": "SharedArray", "shape": list(dims), "dtype": None}
            if name is not None:  # (only open() reads it: a passed array carries its dtype)
                meta["dtype"] = _described(dt, meta)
            _region = Region.create(nbytes, meta, name)
            try:
                self._attach(_region, dims, dt)
            except BaseException:
                _discard(_region)
                raise
            return
        self._attach(_region, dims, dt)

    def _attach(self, region: Region, shape: tuple[int, ...], dtype: Any) -> None:
        """Become the view of *region*'s data as *shape* and *dtype* (anything ``numpy.dtype``
        takes).  Used by every constructor, so keep it lean: a worker runs it per task."""
        import numpy as np

        dtype = np.dtype(dtype)
        self.dtype = dtype
        self.shape = shape
        self._region = region
        self.array = np.ndarray(shape, dtype, region.mmap, DATA_OFFSET)

    _ref: tuple | None = None

    def _task_ref(self) -> tuple | None:
        """This array as apply's quick path passes it (``_serialize.dumps_refs``): plain values
        ``(key, shape, dtype, name)``, its region mapped in the worker beforehand (see
        ``_dispatch._map_regions``); None for a dtype its ``str`` does not describe."""
        ref = self._ref
        region = self._region
        if region.fd < 0:
            raise ValueError("cannot pass a closed shared object")
        if ref is None or ref[1] is not self.shape:
            dt = self.dtype
            if dt.fields is not None or dt.subdtype is not None:
                return None
            ref = self._ref = (region._key or region.key(), self.shape, dt.str, region.name)
        return ref

    @classmethod
    def from_array(cls, a: Any, *, name: str | None = None) -> SharedArray:
        """A new SharedArray holding a copy of *a*."""
        import numpy as np

        a = np.asarray(a)
        sa = cls(a.shape, a.dtype, name=name)
        sa.array[...] = a
        return sa

    @classmethod
    def open(cls, name: str) -> SharedArray:
        """Attach to the named SharedArray *name* (``FileNotFoundError`` if there is none)."""
        region = Region.open(name)
        meta = region.read_meta()
        if meta.get("kind") != "SharedArray":
            raise ValueError(f"{name!r} is a {meta.get('kind')}, not a SharedArray")
        dtype = meta["dtype"]
        if isinstance(dtype, list):  # structured
            from numpy.lib.format import descr_to_dtype

            dtype = descr_to_dtype(_descr_from_json(dtype))
        return cls(tuple(meta["shape"]), dtype, _region=region)

    @property
    def name(self) -> str | None:
        """The name in ``/dev/shm``, or None for anonymous memory."""
        return self._region.name

    def unlink(self) -> None:
        """Remove the name (named arrays only); attached processes keep working."""
        self._region.unlink()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Passing a SharedArray is on the hot path (a pool task's argument): when procpool
        # pickles, one global and four small values -- no nested Region and FdHandle reductions
        # (see Region.token).  A structured or subarray dtype travels whole: its ``str``
        # ('|V12') has lost the fields.
        dt = self.dtype
        dtype = dt.str if dt.fields is None and dt.subdtype is None else dt
        token = self._region.token()
        if token is None:
            return (_rebuild_shared_array, (self.shape, dtype, self._region))
        return (_attach_shared_array, (self.shape, dtype, token, self._region.name))

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        import numpy as np

        return self.array if dtype is None else np.asarray(self.array, dtype=dtype)

    def __getitem__(self, key: Any) -> Any:
        return self.array[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.array[key] = value

    def __len__(self) -> int:
        return len(self.array)

    @property
    def size(self) -> int:
        return self.array.size

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def __repr__(self) -> str:
        return f"<procpool.SharedArray shape={self.shape} dtype={self.dtype}>"


def _checked_nbytes(dims: tuple[int, ...], itemsize: int) -> int:
    """The bytes of a new array of shape *dims*, or numpy's ``ValueError`` for a shape it
    refuses: ``np.ndarray`` over a buffer reads -1 as "whatever fits", ``ftruncate`` a size
    past the largest file as ``OverflowError``."""
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed (shape {dims})")
    nbytes = math.prod(dims) * itemsize
    if nbytes > sys.maxsize or any(n > sys.maxsize for n in dims):
        raise ValueError(
            f"array is too big: shape {dims} of {itemsize}-byte items is more than the "
            f"largest possible size ({sys.maxsize} bytes)"
        )
    return nbytes


def _described(dt: Any, meta: dict[str, Any]) -> Any:
    """*dt* as a named array's header describes it for ``open`` (a structured one by its
    fields: numpy's .npy header form), or a clear ``ValueError`` when *meta* with it does not
    fit in the header (checked before the file exists)."""
    described: Any = dt.str
    if dt.fields is not None:
        from numpy.lib.format import dtype_to_descr

        described = dtype_to_descr(dt)
    # (as Region.write_meta encodes it)
    size = len(json.dumps({**meta, "dtype": described}, separators=(",", ":")).encode())
    if size >= META_SIZE:
        what = (
            f"dtype's {len(dt.names)} fields"
            if dt.names
            else f"shape's {len(meta['shape'])} dimensions"
        )
        raise ValueError(
            f"a named SharedArray's dtype and shape are too long to describe: its {what} take "
            f"{size} bytes in the header that SharedArray.open reads, which holds "
            f"{META_SIZE - 1}; use fewer or shorter field names, or leave out name= (an "
            "anonymous SharedArray has no such limit: it passes to pool tasks, Processes, "
            "Queues and Pipes with its whole dtype)"
        )
    return described


def _descr_from_json(descr: list) -> list:
    """numpy's field list (``dtype_to_descr``) back from JSON, which made its tuples lists:
    ``[name or [title, name], format or a nested list, [shape]]`` per field."""
    fields = []
    for field in descr:
        name = tuple(field[0]) if isinstance(field[0], list) else field[0]
        fmt = field[1] if isinstance(field[1], str) else _descr_from_json(field[1])
        fields.append((name, fmt, tuple(field[2])) if len(field) > 2 else (name, fmt))
    return fields


def _rebuild_shared_array(shape: tuple[int, ...], dtype: Any, region: Region) -> SharedArray:
    sa = SharedArray.__new__(SharedArray)
    sa._attach(region, shape, dtype)
    return sa


def _attach_shared_array(
    shape: tuple[int, ...], dtype: Any, token: int, name: str | None
) -> SharedArray:
    sa = SharedArray.__new__(SharedArray)
    sa._attach(Region.received(token, name), shape, dtype)
    return sa


def from_ref(key: int, shape: tuple[int, ...], dtype: str, name: str | None) -> SharedArray:
    """The SharedArray a task's argument refers to (see ``SharedArray._task_ref``): what
    ``_attach`` does, inlined (once per task)."""
    import numpy as np

    region = by_key(key)
    sa = SharedArray.__new__(SharedArray)
    sa.dtype = dt = np.dtype(dtype)
    sa.shape = shape
    sa._region = region
    sa.array = np.ndarray(shape, dt, region.mmap, DATA_OFFSET)
    return sa


# apply's quick path takes these arguments as it takes scalars: they pickle as a region's key
_serialize.KEYED.update((Value, Array, SharedArray))
