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


@contextlib.contextmanager
def timeout(seconds: float, message: str | None = None) -> Iterator[None]:
    """Raise :class:`SignalTimeout` inside the block if it runs longer than *seconds*.

    Uses ``SIGALRM`` and ``setitimer`` (sub-second precision); the previous handler and timer
    are restored on exit.  Main thread only (``ValueError`` elsewhere).  Blocks nest: an outer
    timer (an outer ``timeout``, or any ``setitimer``/``alarm``) due before this one still
    fires on time, with its own handler (which may set the timer again, as a watchdog does).

    Example::

        with signals.timeout(2.5):
            slow_call()              # SignalTimeout after 2.5 s
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("signals.timeout() works only in the main thread")
    if seconds <= 0:
        raise SignalTimeout(message or "timed out")
    # One timer per process: it is armed for whichever comes first, the block's deadline or
    # the outer timer's next expiry (``outer``: that time, None without one, and its interval),
    # and _raise gives the outer timer's expiries to the outer handler.
    outer: list[Any] = [None, 0.0]
    deadline = 0.0
    done = False
    # While the handler and timer change hands, an expiry is the outer timer's (the block has
    # not begun): _raise notes it, and the outer handler runs once the timer is known.  (Not a
    # signal mask: another thread of the process takes a signal the main thread blocks, and
    # Python runs the handler in the main thread all the same.)
    handing_over = True
    came: list[bool] = [False]

    def _arm(now: float) -> None:
        due = outer[0]
        first = deadline if due is None or due > deadline else due
        _signal.setitimer(_signal.ITIMER_REAL, max(first - now, _ALMOST_NOW))

    def _raise(signum: int, frame: FrameType | None) -> None:
        if done:  # (a signal of this timer handled after the block: nothing to interrupt)
            return
        if handing_over:
            came[0] = True
            return
        due = outer[0]
        if due is None or time.monotonic() < due - _EARLY:
            raise SignalTimeout(message or f"timed out after {seconds} s")
        # the outer timer's expiry: its handler runs with the timer free, as it would have it
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        interval = outer[1]
        outer[0] = due + interval if interval > 0 else None
        try:
            _call_handler(old_handler, signum, frame)
        finally:
            left, interval = _signal.getitimer(_signal.ITIMER_REAL)
            if left > 0:  # it set the timer itself (a watchdog re-arming): its next expiry
                outer[0], outer[1] = time.monotonic() + left, interval
            _arm(time.monotonic())

    old_handler = _signal.signal(_signal.SIGALRM, _raise)
    try:
        old_delay, old_interval = _signal.setitimer(_signal.ITIMER_REAL, seconds)
        started = time.monotonic()
        deadline = started + seconds
        outer[1] = old_interval
        if old_delay > 0:
            outer[0] = started + old_delay
        handing_over = False
        if came[0]:  # an expiry meanwhile
            if time.monotonic() >= deadline - _EARLY:  # (ours, may be: a tiny limit)
                raise SignalTimeout(message or f"timed out after {seconds} s")
            outer[0] = started  # the outer timer's: its handler's turn, at once
        if outer[0] is not None and outer[0] < deadline:
            _arm(started)
        yield
    finally:
        # First thing (no call before it, so no signal handler can run between the block and
        # it): from here _raise does nothing, and this cleanup cannot be cut short by it.
        done = True
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.pthread_sigmask(_signal.SIG_BLOCK, ())  # (runs a handler already due: _raise)
        _signal.signal(_signal.SIGALRM, old_handler if old_handler is not None else _SIG_DFL)
        if outer[0] is not None:
            # The outer timer, with the time it has left since it was set aside (a block that
            # ends early does not bring it forward), and its interval, so a repeating timer
            # keeps repeating.  If it came due in these last instants, it fires now.
            left = outer[0] - time.monotonic()
            _signal.setitimer(_signal.ITIMER_REAL, max(left, _ALMOST_NOW), outer[1])


#: how early a timer may fire (the kernel's and the clocks' rounding)
_EARLY = 1e-3
_SIG_DFL = _signal.SIG_DFL


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
    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    try:
        if timeout is not None:
            info = _signal.sigtimedwait(sigs, max(timeout, 0))
            return None if info is None else info.si_signo
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
    the pids signalled.  Workers that already exited are skipped."""
    if hasattr(pool, "signal_workers"):
        return list(pool.signal_workers(sig) or [])
    pids = [p.pid for p in getattr(pool, "_pool", [])]  # multiprocessing.Pool
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent
