"""Process-shared synchronisation: Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition,
Barrier -- the names and behaviour of :mod:`multiprocessing`'s, in anonymous memory.

Each primitive is one or more POSIX semaphores in a small anonymous shared-memory region (see
:mod:`procpool._ipc_mem`), run by the standard library's own C ``SemLock``: acquiring an
uncontended lock never enters the kernel, a blocked ``acquire`` sleeps in the kernel (no
polling), and ``timeout`` and Ctrl-C behave exactly as in :mod:`multiprocessing`.

What is different from the stdlib:

* nothing is created in ``/dev/shm``: a process killed at any moment leaks nothing (the stdlib's
  named ``sem.mp-*`` files leak on SIGKILL and make the resource tracker complain);
* every primitive can be passed as an argument to a pool task or a Process, or sent through a
  procpool Queue or Pipe -- not only inherited (the stdlib raises ``RuntimeError``).

Example::

    import procpool

    def work(lock, counter):
        for _ in range(1000):
            with lock:
                counter.value += 1

    lock = procpool.Lock()
    counter = procpool.Value("i", 0, lock=False)
    procs = [procpool.Process(target=work, args=(lock, counter)) for _ in range(4)]
    for p in procs: p.start()
    for p in procs: p.join()
    assert counter.value == 4000

As with the stdlib, a lock held by a process that is killed stays held: procpool cannot know that
the data the lock protects is consistent.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Callable

from ._ipc_mem import RECURSIVE_MUTEX, SEM_VALUE_MAX, SEMAPHORE, Region

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "Lock",
    "RLock",
    "Semaphore",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "Barrier",
]


class _SemBased:
    """A primitive made of one semaphore in its own region."""

    _kind = SEMAPHORE

    def __init__(self, value: int = 1, maxvalue: int = 1, *, _region: Region | None = None):
        value = operator.index(value)  # (a float: ctypes' "argument 3: wrong type" otherwise)
        fresh = _region is None
        if _region is None:
            _region = Region.create(0, {"kind": type(self).__name__})
        self._region = _region
        self._maxvalue = maxvalue
        self._semlock = _region.semaphore(0, self._kind, value, maxvalue, init=fresh)
        # bind the C methods directly: ``lock.acquire()`` costs what the stdlib's does
        self.acquire: Callable[..., bool] = self._semlock.acquire
        self.release: Callable[[], None] = self._semlock.release

    def __enter__(self) -> bool:
        return self._semlock.__enter__()

    def __exit__(self, *args: object) -> None:
        self._semlock.release()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_sem, (type(self), self._region, self._maxvalue))


def _rebuild_sem(cls: type[_SemBased], region: Region, maxvalue: int) -> _SemBased:
    obj = cls.__new__(cls)
    _SemBased.__init__(obj, 0, maxvalue, _region=region)
    return obj


class Lock(_SemBased):
    """A non-recursive lock shared between processes (:class:`multiprocessing.Lock`).

    ``acquire(block=True, timeout=None) -> bool``; ``release()`` raises ``ValueError`` when the
    lock is not held.  Any process may release it.  Usable as a context manager.
    """

    def __init__(self) -> None:
        super().__init__(1, 1)

    def __repr__(self) -> str:
        try:
            if self._semlock._is_mine():
                owner = (
                    "MainThread"
                    if threading.current_thread() is threading.main_thread()
                    else threading.current_thread().name
                )
            elif self._semlock._get_value() == 1:
                owner = "None"
            elif self._semlock._count() > 0:
                owner = "SomeOtherThread"
            else:
                owner = "SomeOtherProcess"
        except Exception:
            owner = "unknown"
        return f"<procpool.Lock(owner={owner})>"


class RLock(_SemBased):
    """A recursive lock shared between processes (:class:`multiprocessing.RLock`).

    The thread that holds it may acquire it again; it must release it as many times.  Releasing
    an RLock the caller does not hold raises ``AssertionError`` (as the stdlib).
    """

    _kind = RECURSIVE_MUTEX

    def __init__(self) -> None:
        super().__init__(1, 1)

    def __repr__(self) -> str:
        try:
            count = self._semlock._count()
            if self._semlock._is_mine():
                owner = threading.current_thread().name
            elif self._semlock._get_value() == 1:
                owner = "None"
            else:
                owner = "SomeOtherThread" if count > 0 else "SomeOtherProcess"
        except Exception:
            owner, count = "unknown", "unknown"
        return f"<procpool.RLock({owner}, {count})>"


class Semaphore(_SemBased):
    """A counting semaphore shared between processes (:class:`multiprocessing.Semaphore`).

    ``acquire()`` waits while the counter is zero, then decrements it; ``release()`` increments
    it.  ``get_value()`` returns the counter.  Raises ``ValueError`` for a negative *value*.
    """

    def __init__(self, value: int = 1) -> None:
        value = operator.index(value)  # ("3", None: the stdlib's TypeError, not a comparison's)
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        if value > SEM_VALUE_MAX:  # (sem_init would wrap it, or refuse it with EINVAL)
            raise OverflowError(f"semaphore initial value must be <= {SEM_VALUE_MAX}")
        super().__init__(value, SEM_VALUE_MAX)

    def get_value(self) -> int:
        """The current counter value."""
        return self._semlock._get_value()

    def __repr__(self) -> str:
        return f"<procpool.{type(self).__name__}(value={self.get_value()})>"


class BoundedSemaphore(Semaphore):
    """A semaphore whose counter may not rise above its initial value.

    ``release()`` beyond the initial value raises ``ValueError``
    (:class:`multiprocessing.BoundedSemaphore`).
    """

    def __init__(self, value: int = 1) -> None:
        value = operator.index(value)
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        if value > SEM_VALUE_MAX:
            raise OverflowError(f"semaphore initial value must be <= {SEM_VALUE_MAX}")
        _SemBased.__init__(self, value, value)

    def __repr__(self) -> str:
        return f"<procpool.BoundedSemaphore(value={self.get_value()}, maxvalue={self._maxvalue})>"


#: sleepers a Condition tracks by process (see Condition): one page of (pid, start time)
SLEEPER_SLOTS = 256
#: seconds ``notify`` waits for a woken sleeper before it looks whether the sleepers still live
ACK_WAIT = 0.05


class Condition:
    """A condition variable shared between processes (:class:`multiprocessing.Condition`).

    ``wait(timeout=None) -> bool``, ``wait_for(predicate, timeout=None)``, ``notify(n=1)``,
    ``notify_all()``; the caller must hold the lock (an :class:`RLock` by default, or the
    *lock* given).  ``wait`` on a lock the caller does not hold raises ``AssertionError``.

    Built like the stdlib's: three semaphores count sleepers, wakers and woken processes (a
    fourth, the sleepers the table below has no slot for), and
    ``notify`` waits for each sleeper it wakes to say so.  Unlike the stdlib's, a sleeper killed
    in ``wait`` does not make the next ``notify`` (``Event.set``, ``Barrier.wait``,
    ``JoinableQueue.task_done``) wait for good: each sleeper writes its pid and start time in
    the region's table while it waits, and a ``notify`` whose sleepers do not answer within
    :data:`ACK_WAIT` looks there -- when none of them lives, it stops waiting.  (A pid's start
    time tells a recycled pid from the sleeper.  Beyond :data:`SLEEPER_SLOTS` sleepers at once,
    the others are counted, not named: while any of them waits, ``notify`` waits as the
    stdlib's does.)
    """

    def __init__(self, lock: Lock | RLock | None = None, *, _region: Region | None = None):
        fresh = _region is None
        self._lock = RLock() if lock is None else lock
        if fresh:
            _region = Region.create(SLEEPER_SLOTS * 16, {"kind": "Condition"})
        assert _region is not None
        self._region = _region
        self._sleeping_count = _region.semaphore(0, SEMAPHORE, 0, SEM_VALUE_MAX, init=fresh)
        self._woken_count = _region.semaphore(1, SEMAPHORE, 0, SEM_VALUE_MAX, init=fresh)
        self._wait_semaphore = _region.semaphore(2, SEMAPHORE, 0, SEM_VALUE_MAX, init=fresh)
        self._unnamed = _region.semaphore(3, SEMAPHORE, 0, SEM_VALUE_MAX, init=fresh)
        self._sleepers = _region.data(0, SLEEPER_SLOTS * 16).cast("q")  # [pid, start, ...]
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_condition, (self._lock, self._region))

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *args: object) -> None:
        self._lock.__exit__(*args)

    def __repr__(self) -> str:
        try:
            num_waiters = self._sleeping_count._get_value() - self._woken_count._get_value()
        except Exception:
            num_waiters = "unknown"
        return f"<procpool.Condition({self._lock}, {num_waiters})>"

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify (or *timeout*), re-acquire; True unless timed out."""
        assert self._lock._semlock._is_mine(), "must acquire() condition before using wait()"
        slot = self._name_sleeper()
        try:
            self._sleeping_count.release()
        except BaseException:  # (a Ctrl-C: not a sleeper after all)
            self._forget_sleeper(slot)
            raise
        count = self._lock._semlock._count()
        for _ in range(count):  # release the lock fully (RLock)
            self._lock.release()
        try:
            return self._wait_semaphore.acquire(True, timeout)
        finally:
            self._woken_count.release()  # (before the slot is cleared: see notify)
            self._forget_sleeper(slot)
            for _ in range(count):
                self._lock.acquire()

    def _name_sleeper(self) -> int:
        """Write this process in a free slot of the sleepers' table (the caller holds the
        lock: no other sleeper writes there meanwhile); -1, counted in ``_unnamed``, when
        the table is full even of the dead's slots."""
        pid, start = _this_process()
        table = self._sleepers
        slots = len(table) // 2
        first = pid % slots
        for reclaim in (False, True):
            for i in range(slots):
                slot = (first + i) % slots
                other = table[2 * slot]
                if not other or (reclaim and not _alive(other, table[2 * slot + 1])):
                    table[2 * slot + 1] = start
                    table[2 * slot] = pid
                    return slot
        self._unnamed.release()
        return -1

    def _forget_sleeper(self, slot: int) -> None:
        if slot < 0:
            self._unnamed.acquire(False)
        else:
            self._sleepers[2 * slot] = 0  # (the pid: last in, first out)

    def _live_sleepers(self) -> bool:
        """Whether a process named in the sleepers' table still lives (or some are unnamed)."""
        if self._unnamed._get_value():
            return True
        table = self._sleepers
        for slot in range(len(table) // 2):
            pid = table[2 * slot]
            if pid and _alive(pid, table[2 * slot + 1]):
                return True
        return False

    def _clear_sleepers(self) -> None:
        """Empty the table of the dead (the caller holds the lock, and no sleeper lives)."""
        table = self._sleepers
        for slot in range(len(table) // 2):
            table[2 * slot] = 0

    def notify(self, n: int = 1) -> None:
        """Wake up to *n* processes waiting on the condition (the caller holds the lock)."""
        assert self._lock._semlock._is_mine(), "lock is not owned"
        assert not self._wait_semaphore.acquire(False)
        # to take account of timeouts since last notify*() we subtract woken_count from
        # sleeping_count and rezero woken_count
        while self._woken_count.acquire(False):
            res = self._sleeping_count.acquire(False)
            assert res, "notify: Bug in sleeping_count.acquire - res should not be False"
        sleepers = 0
        while sleepers < n and self._sleeping_count.acquire(False):
            self._wait_semaphore.release()  # wake up one sleeper
            sleepers += 1
        if sleepers:
            answered = 0
            while answered < sleepers:  # wait for each sleeper to wake -- while one may
                if self._woken_count.acquire(True, ACK_WAIT):
                    answered += 1
                elif not self._live_sleepers():  # the others were killed in wait
                    # (a sleeper posts before it clears its slot: those that answered while
                    # the table was read are counted here, not left to the next notify)
                    while answered < sleepers and self._woken_count.acquire(False):
                        answered += 1
                    self._clear_sleepers()
                    break
            # rezero wait_semaphore in case some timeouts just happened
            while self._wait_semaphore.acquire(False):
                pass

    def notify_all(self) -> None:
        """Wake every process waiting on the condition."""
        self.notify(n=SEM_VALUE_MAX)

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until ``predicate()`` is true (or *timeout*); return its last value."""
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = timeout
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


_this: tuple[int, int] = (0, 0)


def _this_process() -> tuple[int, int]:
    """This process's pid and start time (see _started), found once per process; a start
    time that could not be read is 0 (then the pid alone says whether it lives), and read
    again next time."""
    global _this
    pid = os.getpid()
    if _this[0] != pid:
        start = _started(pid)
        if not start:
            return pid, 0
        _this = (pid, start)
    return _this


def _alive(pid: int, start: int) -> bool:
    """Whether the process named (*pid*, *start*) in a sleepers' table still lives: when it
    cannot be told (no /proc for it here: another pid namespace, ``hidepid``), it does."""
    now = _started(pid)
    return now is None or now == start or (not start and now != 0)


def _started(pid: int) -> int | None:
    """When process *pid* started (clock ticks since boot, from /proc): 0 when it is gone,
    None when that cannot be told (then it counts as living)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:  # gone -- or hidden from us (hidepid): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        except OSError:
            pass
        return None
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # (the name in parentheses may hold spaces)
    try:
        if fields[0] == b"Z":  # a zombie: killed, not yet reaped
            return 0
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _rebuild_condition(lock: Lock | RLock, region: Region) -> Condition:
    return Condition(lock, _region=region)


class Event:
    """A flag processes can set, clear and wait for (:class:`multiprocessing.Event`).

    ``set()``, ``clear()``, ``is_set()``, ``wait(timeout=None) -> bool`` (True when the flag is
    set, False on timeout).
    """

    def __init__(self, *, _parts: tuple[Condition, Semaphore] | None = None) -> None:
        if _parts is None:
            _parts = (Condition(Lock()), Semaphore(0))
        self._cond, self._flag = _parts

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_event, (self._cond, self._flag))

    def is_set(self) -> bool:
        """True when the flag is set."""
        with self._cond:
            if self._flag.acquire(False):
                self._flag.release()
                return True
            return False

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        with self._cond:
            self._flag.acquire(False)
            self._flag.release()
            self._cond.notify_all()

    def clear(self) -> None:
        """Reset the flag."""
        with self._cond:
            self._flag.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set or *timeout* seconds pass; return the flag."""
        with self._cond:
            if self._flag.acquire(False):
                self._flag.release()
            else:
                self._cond.wait(timeout)
            if self._flag.acquire(False):
                self._flag.release()
                return True
            return False

    def __repr__(self) -> str:
        return f"<procpool.Event({'set' if self.is_set() else 'unset'})>"


def _rebuild_event(cond: Condition, flag: Semaphore) -> Event:
    return Event(_parts=(cond, flag))


class Barrier(threading.Barrier):
    """A barrier for *parties* processes (:class:`multiprocessing.Barrier`).

    ``wait(timeout=None)`` returns an index in ``range(parties)``; raises
    :class:`threading.BrokenBarrierError` when the barrier is reset, aborted or times out.
    ``action`` (a picklable callable) runs in one process when all arrive.
    """

    def __init__(
        self,
        parties: int,
        action: Callable[[], Any] | None = None,
        timeout: float | None = None,
        *,
        _parts: tuple[Condition, Region] | None = None,
    ) -> None:
        if _parts is None:
            region = Region.create(8, {"kind": "Barrier"})
            cond = Condition(Lock())
        else:
            cond, region = _parts
        self._region = region
        self._state_view = region.data(0, 8).cast("i")  # [state, count]
        self.__setstate((parties, action, timeout, cond, region))

    def __setstate(self, state: tuple[Any, ...]) -> None:
        (self._parties, self._action, self._timeout, self._cond, self._region) = state

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (
            _rebuild_barrier,
            (self._parties, self._action, self._timeout, self._cond, self._region),
        )

    @property  # type: ignore[override]
    def _state(self) -> int:
        return self._state_view[0]

    @_state.setter
    def _state(self, value: int) -> None:
        self._state_view[0] = value

    @property  # type: ignore[override]
    def _count(self) -> int:
        return self._state_view[1]

    @_count.setter
    def _count(self, value: int) -> None:
        self._state_view[1] = value

    def __repr__(self) -> str:
        return f"<procpool.Barrier(parties={self._parties}, waiting={self.n_waiting})>"


def _rebuild_barrier(
    parties: int, action: Any, timeout: float | None, cond: Condition, region: Region
) -> Barrier:
    return Barrier(parties, action, timeout, _parts=(cond, region))
