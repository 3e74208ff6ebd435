"""The run-time part of the ``typing`` names procpool uses, without importing :mod:`typing`.

``import typing`` takes about 0.5 MB in the parent and so, through fork, in every worker (the
issue-5 target: an idle worker no larger than a ``multiprocessing`` one).  Annotations are never
evaluated (``from __future__ import annotations``), so the modules import typing's names only
``if TYPE_CHECKING:``, a module constant set to False that type checkers read as True.  What
remains at run time is a generic base class; it lives here.
"""

from __future__ import annotations

import types


class Generic:
    """Stands in for ``typing.Generic``: ``class C(Generic[T])`` derives from this class, and
    ``C[int]`` is a :class:`types.GenericAlias`, as for the standard library's generic classes
    (``concurrent.futures.Future[int]``)."""

    __slots__ = ()

    def __class_getitem__(cls, params: object) -> object:
        return Generic if cls is Generic else types.GenericAlias(cls, params)


T = None  # a type variable's stand-in: only ever written inside ``Generic[...]``
