"""Shared fixtures for the whole test suite (kept small and generic).

``leak_check``: snapshot this process's child processes, open file descriptors and ``/dev/shm``
entries before a test; after it, wait (polling, up to a few seconds) for the test's pools to
settle and fail if anything new is left.  ``wait_until`` is the polling helper every test uses
instead of sleeping; ``run_python`` runs code in a fresh interpreter, bounded in time.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

SETTLE_S = 5.0  # how long leftovers may take to disappear (workers exiting, threads joining)


def run_python(
    code: str, timeout: float = 60.0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run *code* with a fresh interpreter (``python -c``): its exit code, stdout and stderr,
    as text.  After *timeout* seconds (``subprocess.TimeoutExpired``), or if the test is
    interrupted, it is killed with every process it started (it runs in a session of its
    own): a hung child's own children -- a standard library executor's workers, say --
    would outlive it otherwise."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def importing_tests(code: str) -> str:
    """*code* for :func:`run_python`, able to import the tests' modules (``conftest``...)."""
    return f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n" + code


def use_up_descriptors() -> list[int]:
    """Open /dev/null until this process has no descriptor left; the caller closes them.
    (Lower RLIMIT_NOFILE first: a few hundred fill at once.)"""
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    return held


@contextmanager
def held_by_another_thread(lock) -> Iterator[None]:
    """Another thread of this process holds *lock* for the block's duration -- what a fork
    in the block then finds (the child's copy of the lock stays held for good)."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()
        t.join(30)


def wait_until(condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.01):
    """Poll *condition* until it returns a truthy value (returned) or *timeout* passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of *pid* from ``/proc/<pid>/stat``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the command name may contain spaces and ')'
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def is_alive(pid: int, starttime: int | None = None) -> bool:
    """True while *pid* exists and is not a zombie (and, given *starttime*, is the same process:
    a recycled pid does not count)."""
    st = proc_stat(pid)
    if st is None or st[0] in ("Z", "X", "x"):
        return False
    return starttime is None or st[3] == starttime


def child_processes() -> dict[int, str]:
    """This process's children, zombies included (an unreaped child is a leak too): pid -> state."""
    me = os.getpid()
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[1] == me:
                children[int(name)] = st[0]
    return children


def open_fds() -> dict[int, str]:
    """This process's open descriptors -> what they point to (the listing's own fd excluded)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory fd os.listdir used, already closed
            pass
    return fds


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _descendants(root: int) -> set[int]:
    """*root* and every process below it (by ppid), live or zombie."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                parent[int(name)] = st[1]
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= more
        grew = bool(more)
    return tree


def _shm_in_use_elsewhere(names: set[str]) -> set[str]:
    """The entries among *names* that a process outside this process's tree has open or mapped.

    Other jobs share this machine's ``/dev/shm`` (e.g. a benchmark's loky semaphores): an entry
    somebody else is using is theirs, not a leak of ours.  A leaked entry is used by nobody.
    """
    mine = _descendants(os.getpid())
    paths = {f"/dev/shm/{n}": n for n in names}
    used: set[str] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        try:
            with open(f"/proc/{name}/maps") as f:
                for line in f:
                    path = line.rstrip("\n").split(None, 5)[-1]
                    if path.endswith(" (deleted)"):
                        continue
                    if path in paths:
                        used.add(paths[path])
            for fd in os.listdir(f"/proc/{name}/fd"):
                target = os.readlink(f"/proc/{name}/fd/{fd}")
                if target in paths:
                    used.add(paths[target])
        except OSError:
            continue
    return used


class LeakSnapshot:
    """What existed before; :meth:`leftovers` says what is new (empty when nothing leaked)."""

    def __init__(self) -> None:
        gc.collect()
        self.children = set(child_processes())
        self.fds = open_fds()
        self.shm = shm_entries()

    def leftovers(self) -> dict[str, object]:
        gc.collect()  # a pool dropped without close() is finalized here
        new_children = {p: s for p, s in child_processes().items() if p not in self.children}
        new_fds = {
            fd: target
            for fd, target in open_fds().items()
            if fd not in self.fds or self.fds[fd] != target
        }
        new_shm = shm_entries() - self.shm
        if new_shm:
            new_shm -= _shm_in_use_elsewhere(new_shm)
        found: dict[str, object] = {}
        if new_children:
            found["child processes (pid: state)"] = new_children
        if new_fds:
            found["file descriptors (fd: target)"] = new_fds
        if new_shm:
            found["/dev/shm entries"] = sorted(new_shm)
        return found

    def assert_clean(self, timeout: float = SETTLE_S) -> None:
        last: dict[str, object] = {}

        def clean() -> bool:
            nonlocal last
            last = self.leftovers()
            return not last

        if not wait_until(clean, timeout, interval=0.02):
            pytest.fail(f"leaked after {timeout}s: {last}")


@pytest.fixture
def leak_check():
    """Fail the test if it leaves child processes, descriptors or /dev/shm entries behind.

    The fixture's value is the snapshot: a test may call ``leak_check.assert_clean()`` itself at
    a point of its choosing (the check runs again at teardown).
    """
    snap = LeakSnapshot()
    yield snap
    snap.assert_clean()
