"""Shared helpers for the IPC primitive tests: leak checks and child-process plumbing."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time

import pytest

from procpool import _ipc_bulk

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


def _stdlib_singletons() -> set[int]:
    """Descriptors the stdlib keeps for the life of the process once started (not leaks):
    the resource tracker's pipe (spawn) and the resource sharer's listening socket."""
    from multiprocessing import resource_sharer, resource_tracker

    fds = set()
    tracker_fd = getattr(resource_tracker._resource_tracker, "_fd", None)
    if tracker_fd is not None:
        fds.add(tracker_fd)
    listener = getattr(resource_sharer._resource_sharer, "_listener", None)
    if listener is not None:
        try:
            fds.add(listener._listener._socket.fileno())
        except AttributeError:
            pass
    return fds


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")} - _stdlib_singletons()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def child_pids() -> set[int]:
    from multiprocessing import resource_tracker

    me = str(os.getpid())
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z" and int(name) != tracker:
            pids.add(int(name))
    return pids


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves descriptors, /dev/shm entries or child processes behind."""
    gc.collect()
    fds, shm, children = open_fds(), shm_entries(), child_pids()
    yield
    deadline = time.monotonic() + 5
    _ipc_bulk.clear_cache()  # the per-process cache of out-of-band buffers is not a leak
    while True:
        gc.collect()
        extra_fds = open_fds() - fds
        extra_shm = shm_entries() - shm
        extra_children = child_pids() - children
        if not (extra_fds or extra_shm or extra_children) or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # processes exiting / the GC: poll the condition, bounded
    details = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in extra_fds
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not details, f"leaked descriptors: {details}"
    assert not extra_shm, f"leaked /dev/shm entries: {extra_shm}"
    assert not extra_children, f"child processes left: {extra_children}"


def run_child(target, *args, ctx=FORK, timeout: float = 10.0) -> int:
    """Run ``target(*args)`` in a child process; return its exit code (fails on timeout)."""
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"child {target.__name__} did not finish within {timeout} s")
    return p.exitcode


def join_or_kill(procs, timeout: float = 10.0) -> None:
    """Join each process; kill (and reap) one still alive after *timeout* seconds."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
