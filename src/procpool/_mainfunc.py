"""Functions of the main script: sent by name, with a fingerprint of their definition and a copy.

multiprocessing sends a task's function by reference; a worker -- forked, or one that ran
the main script (spawn) -- looks it up in its own ``__main__``, so the function sees the
worker's module globals: what the pool's initializer or an earlier task set there.  A copy
by value (cloudpickle) would see copies of the parent's globals instead, and a program that
keeps state in its globals would silently get other results than with multiprocessing.  But
the worker's ``__main__`` may lack the function (defined after the worker started) or hold an
older definition (redefined in a REPL): so a ``__main__`` function travels as its name, a
fingerprint of its definition and its copy by value, and the worker uses its own function
when the fingerprints match (filling in the globals it lacks from the copy), the copy if not.

``_serialize.dumps_function`` makes a :class:`_MainFunction` for such a function; it pickles
as a call of :func:`_load_main_function`, which the worker runs as it unpickles it.
"""

from __future__ import annotations

import pickle
import sys
import types

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any


def _main_qualname(func: Any) -> str | None:
    """*func*'s name in ``__main__`` if it is a plain function found there under it."""
    if type(func) is not types.FunctionType or func.__module__ != "__main__":
        return None
    qualname = func.__qualname__
    if "<" in qualname:  # <lambda>, <locals>
        return None
    return qualname if _lookup_main(qualname) is func else None


def _lookup_main(qualname: str) -> Any:
    obj = sys.modules.get("__main__")
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _fingerprint(func: Any, depth: int = 0) -> tuple:
    """What tells two definitions of a function apart: the same in a forked or a spawned
    worker for the same definition (an address in a default's repr makes a mismatch: the
    safe side, the copy is used).  The functions in its closure count too: a decorated
    function is the decorator's wrapper, the same code whatever it wraps."""
    code = func.__code__
    cells: list[Any] = []
    for cell in func.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # (an empty cell)
            value = None
        if isinstance(value, types.FunctionType):
            cells.append(_fingerprint(value, depth + 1) if depth < 8 else value.__qualname__)
        else:  # (not its repr: an address there would never match)
            cells.append(type(value).__qualname__)
    return (
        code.co_filename,
        code.co_firstlineno,
        _code_print(code),
        repr(func.__defaults__),
        repr(func.__kwdefaults__),
        tuple(cells),
    )


def _code_print(code: types.CodeType) -> tuple:
    # nested code (comprehensions, lambdas, inner functions) by content, not by its repr (an
    # address); a frozenset's elements sorted (their order follows the per-process str hash)
    return (code.co_code, code.co_names, tuple(_const_print(c) for c in code.co_consts))


def _code_names(code: types.CodeType) -> set[str]:
    """The names *code* and the code nested in it may look up as globals (with attribute
    names: a superset, as cloudpickle takes them to find the globals a copy carries)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _const_print(const: Any) -> Any:
    if isinstance(const, types.CodeType):
        return _code_print(const)
    if isinstance(const, tuple):
        return tuple(_const_print(c) for c in const)
    if isinstance(const, frozenset):
        return ("frozenset", tuple(sorted(repr(c) for c in const)))
    return repr(const)


class _MainFunction:
    """Pickles as a call of :func:`_load_main_function` (see above)."""

    __slots__ = ("qualname", "fingerprint", "blob", "needed")

    def __init__(
        self, qualname: str, fingerprint: tuple, blob: bytes | str, needed: tuple = ()
    ) -> None:
        self.qualname, self.fingerprint, self.blob = qualname, fingerprint, blob
        self.needed = needed  # the parent's globals the function may use (their names)

    def __reduce__(self) -> tuple:
        args = (self.qualname, self.fingerprint, self.blob, self.needed)
        return (_load_main_function, args)


def _load_main_function(
    qualname: str, fingerprint: tuple, blob: bytes | str, needed: tuple | None = None
) -> Any:
    """The worker's own function when it is the parent's (same fingerprint), with the globals
    it needs that the worker lacks taken from the copy -- unpickled only then: unpickling it
    imports cloudpickle, ≈ 2 MB in every worker that runs a ``__main__`` function; else the
    copy.  (*needed*: the names of the parent's globals the function may use; None: look.)"""
    own = _lookup_main(qualname)
    if (
        needed is not None
        and type(own) is types.FunctionType
        and all(name in own.__globals__ for name in needed)
        and _fingerprint(own) == fingerprint
    ):
        return own  # nothing to fill in: no copy needed
    copy = pickle.loads(blob) if isinstance(blob, bytes) else None
    if type(own) is not types.FunctionType or _fingerprint(own) != fingerprint:
        if isinstance(blob, str):  # (then there is no copy: blob says why)
            raise AttributeError(
                f"__main__.{qualname} is not in this worker's main module as the parent defines"
                " it (defined or changed after the worker started, or only under"
                ' `if __name__ == "__main__":` for spawn/forkserver workers), and it could not'
                f" be copied: {blob}"
            )
        return copy
    if copy is None:
        return own
    namespace = own.__globals__
    for name, value in copy.__globals__.items():  # what the parent defined after our start
        if name not in namespace and not (name.startswith("__") and name.endswith("__")):
            namespace[name] = value
    return own
