"""Atomic read-modify-write on shared memory, without a C extension.

Python has no atomic instructions, and a lock around ``value += 1`` costs two semaphore
operations.  This module reaches the CPU's own atomics through :mod:`ctypes`, in order of
preference:

1. on x86-64, a few bytes of machine code (``lock xadd``, ``lock cmpxchg``, ``xchg``) placed in
   an executable page -- no dependency at all;
2. elsewhere (or where the kernel refuses executable anonymous memory), GCC's ``libatomic``
   (``__atomic_fetch_add_8`` ...), present on most Linux systems;
3. otherwise :data:`OPS` is ``None`` and callers fall back to their lock.

Both paths are lock-free hardware atomics on naturally aligned 4- and 8-byte words, so they are
correct between processes mapping the same memory.  One call costs about a microsecond (the
ctypes call), far less than taking and releasing a contended process-shared lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
from collections.abc import Callable

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["AtomicOps", "OPS", "load_ops"]

_SEQ_CST = 5

# x86-64 System V: rdi = address, rsi = operand / expected, rdx = desired; result in rax/eax.
_X86_64_CODE = {
    "fetch_add8": bytes.fromhex("4889f0f0480fc107c3"),  # mov rax,rsi; lock xadd [rdi],rax
    "fetch_add4": bytes.fromhex("89f0f00fc107c3"),  # mov eax,esi; lock xadd [rdi],eax
    "cas8": bytes.fromhex("4889f0f0480fb117c3"),  # mov rax,rsi; lock cmpxchg [rdi],rdx
    "cas4": bytes.fromhex("89f0f00fb117c3"),  # mov eax,esi; lock cmpxchg [rdi],edx
    "xchg8": bytes.fromhex("4889f0488707c3"),  # mov rax,rsi; xchg [rdi],rax
    "xchg4": bytes.fromhex("89f08707c3"),  # mov eax,esi; xchg [rdi],eax
}


class AtomicOps:
    """Atomic operations on 4- and 8-byte words at raw addresses.

    ``fetch_add(addr, delta)`` and ``exchange(addr, value)`` return the previous value;
    ``compare_exchange(addr, expected, desired)`` returns the value found (the exchange happened
    when it equals *expected*).  Arithmetic wraps around like C's.
    """

    def __init__(self, kind: str, funcs: dict[str, Callable[..., int]]) -> None:
        self.kind = kind
        self.fetch_add8 = funcs["fetch_add8"]
        self.fetch_add4 = funcs["fetch_add4"]
        self.cas8 = funcs["cas8"]
        self.cas4 = funcs["cas4"]
        self.xchg8 = funcs["xchg8"]
        self.xchg4 = funcs["xchg4"]
        self._keep: object = None  # the executable page, when there is one


def _machine_code_ops() -> AtomicOps | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:  # W+X anonymous memory refused (SELinux execmem, PaX...)
        return None
    funcs: dict[str, Callable[..., int]] = {}
    offset = 0
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    for name, code in _X86_64_CODE.items():
        page[offset : offset + len(code)] = code
        res: Any = ctypes.c_int64 if name.endswith("8") else ctypes.c_int32
        arg = res
        if name.startswith("cas"):
            proto = ctypes.CFUNCTYPE(res, ctypes.c_void_p, arg, arg)
        else:
            proto = ctypes.CFUNCTYPE(res, ctypes.c_void_p, arg)
        funcs[name] = proto(base + offset)
        offset += (len(code) + 15) & ~15
    ops = AtomicOps("x86-64 machine code", funcs)
    ops._keep = page
    return ops


def _libatomic_ops() -> AtomicOps | None:
    path = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    funcs: dict[str, Callable[..., int]] = {}
    for width, ctype in ((8, ctypes.c_int64), (4, ctypes.c_int32)):
        fadd = getattr(lib, f"__atomic_fetch_add_{width}")
        fadd.argtypes = [ctypes.c_void_p, ctype, ctypes.c_int]
        fadd.restype = ctype
        xchg = getattr(lib, f"__atomic_exchange_{width}")
        xchg.argtypes = [ctypes.c_void_p, ctype, ctypes.c_int]
        xchg.restype = ctype
        cas = getattr(lib, f"__atomic_compare_exchange_{width}")
        cas.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctype, ctypes.c_int, ctypes.c_int]
        cas.restype = ctypes.c_bool

        def _cas(addr: int, expected: int, desired: int, _cas=cas, _ctype=ctype) -> int:
            box = _ctype(expected)  # libatomic writes the value it found into *expected
            _cas(addr, ctypes.byref(box), desired, _SEQ_CST, _SEQ_CST)
            return box.value

        funcs[f"fetch_add{width}"] = lambda a, d, _f=fadd: _f(a, d, _SEQ_CST)
        funcs[f"xchg{width}"] = lambda a, v, _f=xchg: _f(a, v, _SEQ_CST)
        funcs[f"cas{width}"] = _cas
    return AtomicOps("libatomic", funcs)


def load_ops(prefer: str | None = None) -> AtomicOps | None:
    """Find a way to run atomics here (``prefer``: "machine-code" or "libatomic")."""
    order = [_machine_code_ops, _libatomic_ops]
    if prefer == "libatomic":
        order.reverse()
    for make in order:
        ops = make()
        if ops is not None:
            return ops
    return None


#: the atomics used by procpool (None: not available, callers use their lock).
OPS: AtomicOps | None = (
    None if os.environ.get("PROCPOOL_NO_ATOMICS") else load_ops(os.environ.get("PROCPOOL_ATOMICS"))
)
