"""Helpers for the pool tests: holding a pool's I/O thread, and a Ctrl-C at a chosen place."""

from __future__ import annotations

import contextlib
import threading

from tasks import identity


@contextlib.contextmanager
def io_thread_held(pool):
    """The pool's I/O thread held in a callback: calls submitted meanwhile wait in its inbox
    (with no task of their own yet, for apply_async's quick calls: they go as runs once it is
    let go), and nothing is delivered by it."""
    inside, gate = threading.Event(), threading.Event()

    def hold(_):
        inside.set()
        gate.wait(30)

    pool.apply_async(identity, (0,), callback=hold)
    assert inside.wait(10)
    try:
        yield
    finally:
        gate.set()


def interrupt_on_entering(*names: str):
    """A trace function raising KeyboardInterrupt once, on entering the first of procpool's
    functions *names*: where a Ctrl-C's handler would run (CPython runs pending handlers on
    function entry)."""
    armed = [True]

    def tracer(frame, event, arg):
        code = frame.f_code
        if (
            event == "call"
            and armed[0]
            and code.co_name in names
            and "procpool" in code.co_filename
        ):
            armed[0] = False
            raise KeyboardInterrupt
        return None

    return tracer


@contextlib.contextmanager
def traced(tracer):
    """Run the block under ``sys.settrace(tracer)`` (removed on the way out, whatever happens)."""
    import sys

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)
