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
    are restored on exit.  Main thread only (``ValueError`` elsewhere).

    Example::

        with signals.timeout(2.5):
            slow_call()              # SignalTimeout after 2.5 s
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("signals.timeout() works only in the main thread")
    if seconds <= 0:
        raise SignalTimeout(message or "timed out")

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise SignalTimeout(message or f"timed out after {seconds} s")

    old_handler = _signal.signal(_signal.SIGALRM, _raise)
    started = time.monotonic()
    old_delay, old_interval = _signal.setitimer(_signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, old_handler)
        if old_delay > 0:
            # Re-arm the outer timer with what it had left less the time the block really took
            # (not less *seconds*: a block that ends early must not bring the outer alarm
            # forward), and with its interval, so a repeating timer keeps repeating.  If it
            # expired during the block, it fires now rather than never.
            left = old_delay - (time.monotonic() - started)
            _signal.setitimer(_signal.ITIMER_REAL, max(left, _ALMOST_NOW), old_interval)


def wait(signals: int | Iterable[int], timeout: float | None = None) -> int | None:
    """Wait for one of *signals*; return its number, or None after *timeout* seconds.

    The signals are blocked in the calling thread while waiting and taken with
    ``sigtimedwait``, so their handlers do not run for the signal returned.  A signal that
    arrived before the call (while blocked) is returned at once.

    Example::

        sig = signals.wait({signal.SIGUSR1, signal.SIGTERM}, timeout=10)
        if sig is None: print("nothing in 10 s")
    """
    sigs = {signals} if isinstance(signals, int) else set(signals)
    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    try:
        if timeout is None:
            return _signal.sigwait(sigs)
        info = _signal.sigtimedwait(sigs, max(timeout, 0))
        return None if info is None else info.si_signo
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)


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
