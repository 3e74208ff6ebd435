"""Signals: the tutorial's ``kill``, ``alarm``, ``pause``, and what people need on top.

The classic calls, documented::

    signals.kill(pid, signal.SIGTERM)   # send a signal to a process (os.kill)
    signals.alarm(5)                    # SIGALRM in 5 s; returns seconds left of the previous
    signals.pause()                     # sleep until a signal handler runs

What is usually missing:

* :func:`handler` -- install a handler for a block, restore the previous one after;
* :func:`timeout` -- raise :class:`SignalTimeout` (a ``TimeoutError``) inside a block that runs
  too long (``SIGALRM`` timer, main thread only);
* :func:`wait` -- a ``pause()`` that can time out and tells *which* signal came
  (``sigtimedwait``), without running handlers;
* :func:`kill_pool` -- send a signal to every worker of a pool.

Handlers run in the main thread only, between Python bytecodes (a handler cannot interrupt a
long C call such as a big numpy operation until it returns).
"""

from __future__ import annotations

import contextlib
import os
import signal as _signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

    Handler = Callable[[int, FrameType | None], Any] | int | _signal.Handlers | None

__all__ = [
    "kill",
    "alarm",
    "pause",
    "handler",
    "timeout",
    "wait",
    "kill_pool",
    "SignalTimeout",
]


# the smallest delay that still arms a timer (0 would disarm it): "fire as soon as possible"
_ALMOST_NOW = 1e-6


class SignalTimeout(TimeoutError):
    """Raised inside a :func:`timeout` block when its time is up."""


def kill(pid: int, sig: int = _signal.SIGTERM) -> None:
    """Send signal *sig* to process *pid* (:func:`os.kill`).

    Raises ``ProcessLookupError`` when there is no such process and ``PermissionError`` when it
    belongs to another user.  ``sig=0`` sends nothing and only checks that *pid* exists.
    """
    os.kill(pid, sig)


def alarm(seconds: int) -> int:
    """Deliver ``SIGALRM`` to this process after *seconds* (0 cancels); return the seconds that
    were left of the previous alarm.  Without a handler, SIGALRM terminates the process."""
    return _signal.alarm(seconds)


def pause() -> None:
    """Sleep until a signal is delivered and its handler has run (:func:`signal.pause`).

    Waits forever if no signal comes; prefer :func:`wait` which can time out.
    """
    _signal.pause()


@contextlib.contextmanager
def handler(signals: int | Iterable[int], func: Handler) -> Iterator[None]:
    """Install *func* for *signals* during the block, then restore the previous handlers.

    Example::

        with signals.handler(signal.SIGTERM, lambda s, f: print("asked to stop")):
            serve()
    """
    sigs = [signals] if isinstance(signals, int) else list(signals)
    previous = {}
    try:
        for sig in sigs:
            previous[sig] = _signal.signal(sig, func)  # type: ignore[arg-type]
        yield
    finally:
        for sig, old in previous.items():
            _signal.signal(sig, old if old is not None else _signal.SIG_DFL)


def timeout(seconds: float, message: str | None = None) -> _Timeout:
    """Raise :class:`SignalTimeout` inside the block if it runs longer than *seconds*.

    Uses ``SIGALRM`` and ``setitimer`` (sub-second precision); the previous handler and timer
    are restored on exit.  Main thread only (``ValueError`` elsewhere).  Blocks nest: an outer
    timer (an outer ``timeout``, or any ``setitimer``/``alarm``) still fires on time, with its
    own handler (which may set or stop the timer, as a watchdog does), also after the block
    caught its own ``SignalTimeout`` and went on.  *seconds* of ``inf`` (or over 1e9) sets no
    limit of its own; ``nan`` raises ``ValueError``.  Also a decorator.

    Example::

        with signals.timeout(2.5):
            slow_call()              # SignalTimeout after 2.5 s
    """
    if seconds != seconds:
        raise ValueError("signals.timeout() needs a number of seconds, not nan")
    return _Timeout(seconds, message)


#: the longest limit setitimer takes everywhere (time_t seconds); beyond it: no limit
_MAX_SECONDS = 1e9


class _Timeout(contextlib.ContextDecorator):
    """What :func:`timeout` returns.  One timer per process: it is armed for whichever comes
    first, the block's deadline or the outer timer's next expiry (``_outer_due``, None without
    one), and :meth:`_raise` gives the outer timer's expiries to the outer handler, with the
    timer as that handler would find it.  A class rather than a generator: a signal handled as
    ``__exit__`` begins is recognised there (its frame), where a generator's cleanup could be
    cut short before it ran."""

    def __init__(self, seconds: float, message: str | None) -> None:
        self._seconds, self._message = seconds, message
        self._state = "new"  # then "entering", "running", "expired" (caught, going on), "done"
        self._came = False  # an expiry while the handler and timer changed hands
        self._in_outer = False  # the outer handler is running
        self._armed = False  # the timer is set (by _arm)
        self._late = False  # a signal handled after the block (see __exit__)
        self._old_handler: Any = None
        self._deadline = float("inf")
        self._outer_due: float | None = None
        self._outer_interval = 0.0

    def _recreate_cm(self) -> _Timeout:  # (as a decorator: one per call)
        return _Timeout(self._seconds, self._message)

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("signals.timeout() works only in the main thread")
        if self._state != "new":  # used again: afresh (while in use: refused)
            if self._state != "done":
                raise RuntimeError("this signals.timeout() block is already running")
            self.__init__(self._seconds, self._message)  # type: ignore[misc]
        seconds = self._seconds
        if seconds <= 0:
            raise SignalTimeout(self._message or "timed out")
        own = seconds <= _MAX_SECONDS
        # an outer timer pending now: an expiry while the handler changes hands is its
        pending = _signal.getitimer(_signal.ITIMER_REAL) != (0.0, 0.0)
        self._state = "entering"
        self._old_handler = _signal.signal(_signal.SIGALRM, self._raise)
        try:
            old_delay, old_interval = _signal.setitimer(
                _signal.ITIMER_REAL, seconds if own else 0.0
            )
            started = time.monotonic()
            if own:
                self._deadline = started + seconds
            self._outer_interval = old_interval
            # (a repeating timer within a microsecond of its expiry reads (0, interval))
            if old_delay > 0 or old_interval > 0:
                self._outer_due = started + old_delay
            self._state = "running"
            if self._came:  # an expiry while the handler changed hands: the outer timer's,
                # if it has expired (a one-shot one reads 0 then); else a late signal of an
                # earlier block's timer, nobody's now
                if (pending and old_delay == 0) or old_interval > 0:
                    self._outer_due = started  # its handler's turn first
                elif time.monotonic() >= self._deadline:  # ours (a limit shorter than this)
                    raise self._timed_out()
            self._arm(time.monotonic())
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        # First thing: from here _raise does nothing (a signal handled as this method began
        # is recognised by its frame, see _raise), and this cleanup cannot be cut short.
        self._state = "done"
        left = _signal.setitimer(_signal.ITIMER_REAL, 0)[0]
        _signal.pthread_sigmask(_signal.SIG_BLOCK, ())  # (runs a handler already due: ours)
        if self._armed and left == 0 and not self._late:
            # it expired as the block ended, and its signal may still be on its way: the
            # kernel gives it to any thread that does not block it, whose handler tells Python
            # only once that thread runs -- after the restore below, it would reach the
            # previous handler.  Wait for it (briefly: the kernel rounds a timer within a
            # microsecond of its expiry to 0, and that one never fires).
            until = time.monotonic() + _LATE_WAIT
            while not self._late and time.monotonic() < until:
                time.sleep(_LATE_POLL)
                _signal.pthread_sigmask(_signal.SIG_BLOCK, ())
        old = self._old_handler
        _signal.signal(_signal.SIGALRM, old if old is not None else _signal.SIG_DFL)
        if self._outer_due is not None:
            # The outer timer, with the time it has left since it was set aside (a block that
            # ends early does not bring it forward), and its interval, so a repeating timer
            # keeps repeating.  If it came due in these last instants, it fires now.
            left = self._outer_due - time.monotonic()
            _signal.setitimer(_signal.ITIMER_REAL, max(left, _ALMOST_NOW), self._outer_interval)

    def _timed_out(self) -> SignalTimeout:
        return SignalTimeout(self._message or f"timed out after {self._seconds} s")

    def _arm(self, now: float) -> None:
        """The timer, for the block's deadline (while it runs) or the outer's next expiry."""
        first = self._outer_due
        if self._state == "running" and (first is None or self._deadline < first):
            first = self._deadline
        if first is None or first == float("inf"):
            self._armed = False
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        else:
            self._armed = True
            _signal.setitimer(_signal.ITIMER_REAL, max(first - now, _ALMOST_NOW))

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        state = self._state
        if state == "done":  # (a signal of this timer handled after the block)
            self._late = True
            return
        if state == "entering":
            self._came = True
            return
        if frame is not None and frame.f_code is _EXIT_CODE and frame.f_locals.get("self") is self:
            return  # the block is over; __exit__ re-arms the outer timer from its due time
        if self._in_outer:  # the outer handler's own timer, fired while that handler runs
            _call_handler(self._old_handler, signum, frame)
            return
        now = time.monotonic()
        due = self._outer_due
        if due is not None and now >= due - _EARLY:
            self._outer_expiry(signum, frame, due, now)
        elif state == "running" and now >= self._deadline - _EARLY:
            self._state = "expired"  # (the block may catch it and go on: the outer's timer)
            self._arm(now)
            raise self._timed_out()
        else:  # early (clocks' rounding), or a SIGALRM sent by someone: not an expiry
            self._arm(now)

    def _outer_expiry(self, signum: int, frame: FrameType | None, due: float, now: float) -> None:
        """The outer timer's expiry: its handler runs with the timer as it would find it
        (reloaded if it repeats; a one-shot one spent), and what it leaves there is the outer
        timer from then on (set again, stopped)."""
        # from here to the end, an expiry is the outer timer's own, for its handler (the timer
        # set below may fire at once: handled at the very next call, this method's own state
        # must not be changed under it)
        self._in_outer = True
        try:
            interval = self._outer_interval
            if interval > 0:  # (missed periods are one signal, as the kernel merges them)
                due += interval * (int((now - due) / interval) + 1)
                _signal.setitimer(_signal.ITIMER_REAL, max(due - now, _ALMOST_NOW), interval)
            else:
                _signal.setitimer(_signal.ITIMER_REAL, 0)
            _call_handler(self._old_handler, signum, frame)
        finally:
            left, interval = _signal.getitimer(_signal.ITIMER_REAL)
            now = time.monotonic()
            # (a repeating timer within a microsecond of its expiry reads (0, interval))
            self._outer_due = now + left if left > 0 or interval > 0 else None
            self._outer_interval = interval
            self._in_outer = False
            if self._state != "done":
                self._arm(now)


_EXIT_CODE = _Timeout.__exit__.__code__


#: how early a timer may fire (the kernel's and the clocks' rounding)
_EARLY = 1e-3
#: how long a block's end waits for the signal of a timer that expired as it ended, polling
_LATE_WAIT = 0.1
_LATE_POLL = 0.0002


def _call_handler(handler: Any, signum: int, frame: FrameType | None) -> None:
    """Do what *handler* (a previous ``signal.signal`` value) does for *signum*."""
    if callable(handler):
        handler(signum, frame)
    elif handler != _signal.SIG_IGN:  # SIG_DFL (or a handler set outside Python): terminate
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def wait(signals: int | Iterable[int], timeout: float | None = None) -> int | None:
    """Wait for one of *signals*; return its number, or None after *timeout* seconds.

    The signals are blocked in the calling thread while waiting and taken with
    ``sigtimedwait``, so their handlers do not run for the signal returned.  A signal that
    arrived before the call (while blocked) is returned at once.  Other signals' handlers run
    as usual (Ctrl-C raises ``KeyboardInterrupt``).  Call it from the main thread, or block
    *signals* in every other thread first: a signal sent to the process goes to a thread that
    does not block it (the main thread, whose default action for most signals is to end the
    process).

    Example::

        sig = signals.wait({signal.SIGUSR1, signal.SIGTERM}, timeout=10)
        if sig is None: print("nothing in 10 s")
    """
    sigs = {signals} if isinstance(signals, int) else set(signals)
    if timeout is not None and timeout == float("inf"):
        timeout = None
    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    try:
        if timeout is not None:
            # in slices of a day at most: a longer one overflowed time_t (OverflowError)
            deadline = time.monotonic() + max(timeout, 0)
            while True:
                left = max(deadline - time.monotonic(), 0)
                info = _signal.sigtimedwait(sigs, min(left, _FOREVER))
                if info is not None:
                    return info.si_signo
                if left <= _FOREVER:
                    return None
        # not sigwait: the C library restarts it after another signal's handler, so Python
        # could not run that handler (Ctrl-C would do nothing) until one of *sigs* came
        while True:
            info = _signal.sigtimedwait(sigs, _FOREVER)
            if info is not None:
                return info.si_signo
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)


_FOREVER = 86400.0


def kill_pool(pool: Any, sig: int = _signal.SIGTERM) -> list[int]:
    """Send *sig* to every worker of *pool* (a procpool ``Pool``, or a stdlib one); return
    the pids signalled.  Workers that already exited are skipped.  Raises ``ValueError`` for
    a number that is no signal (before signalling any), ``TypeError`` for what is no pool."""
    if hasattr(pool, "signal_workers"):
        return list(pool.signal_workers(sig) or [])
    if not hasattr(pool, "_pool"):
        raise TypeError(f"kill_pool() needs a procpool or multiprocessing Pool, not {pool!r}")
    if sig != 0 and sig not in _signal.valid_signals():
        raise ValueError(f"signal number {sig} out of range")
    pids = [p.pid for p in pool._pool]  # multiprocessing.Pool
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent
