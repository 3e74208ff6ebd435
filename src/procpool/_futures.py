"""Load ``concurrent.futures`` without importing ``logging`` until something is logged.

procpool's ``Pool`` is a ``concurrent.futures.Executor`` and its futures are that module's
``Future`` (DESIGN.md), so ``concurrent.futures`` is loaded with procpool. Its ``_base`` module
imports ``logging`` at its top (≈ 0.4 MB of heap) for one logger, used only when a done-callback
raises or a future is found in an impossible state. Every forked worker holds its parent's heap,
so in a program that does not use ``logging`` an idle procpool worker was 0.3–0.4 MB larger than
a ``multiprocessing.Pool`` worker, whose modules never import it (docs/benchmarks.md, table 5a).

When neither ``concurrent.futures`` nor ``logging`` is loaded yet, :func:`load` runs the
standard ``concurrent/futures/_base.py``, unchanged, as the real ``concurrent.futures._base``
module, but its ``import logging`` gets a stand-in whose ``getLogger(name)`` returns a
:class:`_DeferredLogger`: the first use of that logger imports ``logging`` and puts the real
logger in ``_base.LOGGER``, so a logged callback error reads and goes exactly as before. The
stand-in is given to that one ``import`` statement through the module's own ``__builtins__``,
not through ``sys.modules``: another thread importing ``logging`` meanwhile gets the real one.
Anything unexpected (a ``_base`` that is not a plain source or bytecode module) falls back to a
plain import.
"""

from __future__ import annotations

import builtins
import sys

_BASE = "concurrent.futures._base"


class _DeferredLogger:
    """Stands for ``logging.getLogger(name)`` in ``concurrent.futures._base`` until first used."""

    __slots__ = ("_name",)
    _name: str

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _logger(self) -> object:
        import logging

        logger = logging.getLogger(self._name)
        base = sys.modules.get(_BASE)
        if base is not None and getattr(base, "LOGGER", None) is self:
            vars(base)["LOGGER"] = logger  # later uses go straight to the logger
        return logger

    def __getattr__(self, attr: str) -> object:
        return getattr(self._logger(), attr)

    def __setattr__(self, attr: str, value: object) -> None:
        setattr(self._logger(), attr, value)

    def __repr__(self) -> str:
        return repr(self._logger())


class _DeferredLogging:
    """What ``import logging`` gives ``_base`` while it runs: ``getLogger`` defers the import."""

    @staticmethod
    def getLogger(name: str) -> _DeferredLogger:  # noqa: N802 (logging's name)
        return _DeferredLogger(name)

    def __getattr__(self, attr: str) -> object:
        import logging

        return getattr(logging, attr)


def _base_getattr(name: str) -> object:
    """``_base.logging`` read later (PEP 562): the real module, imported then."""
    if name == "logging":
        import logging

        return logging
    raise AttributeError(f"module {_BASE!r} has no attribute {name!r}")


def load() -> None:
    """Import ``concurrent.futures``, deferring ``logging`` if neither is loaded yet."""
    if _BASE in sys.modules or "logging" in sys.modules:
        import concurrent.futures  # noqa: F401

        return
    base = _run_base()
    import concurrent.futures  # its __init__ takes the _base module loaded above

    if base is not None and sys.modules.get(_BASE) is base:
        # what the import system sets on a package for a submodule it loads itself
        vars(concurrent.futures)["_base"] = base


def _run_base() -> object | None:
    """Run ``_base``'s own code as ``sys.modules[_BASE]``; None (nothing done) where that fails."""
    import concurrent  # the namespace package, empty
    import importlib._bootstrap
    import importlib.machinery  # not importlib.util: it loads 3 more modules, kept by every worker

    try:
        path = importlib.machinery.PathFinder.find_spec("concurrent.futures", concurrent.__path__)
        spec = importlib.machinery.PathFinder.find_spec(
            _BASE, path.submodule_search_locations if path else None
        )
        code = spec.loader.get_code(_BASE) if spec is not None else None  # type: ignore[union-attr]
    except Exception:
        return None
    if code is None or spec is None:
        return None
    real_import = builtins.__import__
    stand_in = _DeferredLogging()

    def import_(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if name == "logging" and level == 0 and not fromlist and "logging" not in sys.modules:
            return stand_in
        return real_import(name, globals, locals, fromlist, level)

    module = importlib._bootstrap.module_from_spec(spec)
    namespace = module.__dict__
    namespace["__builtins__"] = {**vars(builtins), "__import__": import_}
    sys.modules[_BASE] = module
    try:
        exec(code, namespace)  # noqa: S102 (the standard library's own module code)
    except Exception:
        sys.modules.pop(_BASE, None)
        return None  # load() imports it the plain way, which raises whatever this was
    finally:
        namespace["__builtins__"] = builtins.__dict__  # the module's functions keep the copy
    if namespace.get("logging") is stand_in:
        del namespace["logging"]
        namespace["__getattr__"] = _base_getattr
    return module


load()  # on import: procpool/__init__.py imports this module before any other of its own
