"""How worker processes are created, watched and reaped.

Three start methods, one interface (:class:`Launcher`): ``start()`` returns a :class:`Proc` —
pid, a *pidfd* (readable the moment the process dies, so the scheduler sees a death in the same
epoll set as the channels) and the parent's end of the worker's socketpair; ``reap()`` returns
the exit code (negative: killed by that signal, as ``multiprocessing.Process.exitcode``).

``fork`` (default)
    ``os.fork()`` called from the pool's own I/O thread.  Fastest start (the worker inherits the
    parent's imported modules), and the pool's *death pipe* ties the worker's life to the pool
    (see :func:`die_with_pipe`).  Between ``fork`` and the first line of user code, the child
    touches only what is safe after a fork (``fcntl``, sockets, pickle): locks that other
    parent threads held are never taken by procpool.  User code in tasks runs with the same
    caveat as ``multiprocessing``'s fork method.
``spawn``
    ``posix_spawn`` of a fresh interpreter (vfork+exec: safe whatever threads the parent has).
    Slower start; functions from ``__main__`` travel by value (cloudpickle).
``forkserver``
    A fresh single-threaded interpreter (spawned once) that forks workers on request: the
    safety of ``spawn`` with much of the speed of ``fork`` for replacements.
"""

from __future__ import annotations

import _signal
import array
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import warnings

from . import _express

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from typing import Any

# ---------------------------------------------------------------- fds the children must not keep
#: every parent-side fd of every live pool in this process.  A forked worker closes them all
#: first thing, so that a pool's sockets and pidfds are never kept open by another pool's worker
#: (which would hide EOFs and keep dead workers' resources alive).
INTERNAL_FDS: set[int] = set()

#: both ends of the fork launchers' death pipes (see die_with_pipe): only the pool's own
#: process may hold them, so every child forked by ``os.fork()`` -- a worker, a
#: ``multiprocessing`` worker, the program's own -- closes them first thing.  (A child that
#: another thread forks in the instant between a pipe's creation and its registration keeps
#: it: the pool's workers then outlive a dead pool as long as that child lives.  A lock every
#: fork would take closes that window, at the price of one more way for a fork to hang.)
DEATH_ENDS: set[int] = set()


def _close_death_ends() -> None:
    for fd in DEATH_ENDS:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover - open in the parent as it forked
            pass
    DEATH_ENDS.clear()


os.register_at_fork(after_in_child=_close_death_ends)

PR_SET_PDEATHSIG = 1
_prctl: Any = None  # prctl, once _resolve_prctl has found it (False: there is none)


_FORK_LOCK = threading.Lock()  # see ForkLauncher.start


def _new_fork_lock() -> None:
    global _FORK_LOCK
    _FORK_LOCK = threading.Lock()  # a child forked while it was held must not inherit that


os.register_at_fork(after_in_child=_new_fork_lock)

#: the signals a program may catch: procpool's own threads block them, so the kernel delivers
#: them to the main thread, where Python runs its handlers.  A Ctrl-C delivered to a pool thread
#: would only set a flag while the main thread slept on, unwoken, in a lock or a wait.
_ASYNC_SIGNALS = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGABRT,
}
_thread_state = threading.local()  # .mask: the signal mask the program gave the pool's thread


def start_thread(
    target: Any, name: str, args: tuple = (), *, quiet: bool = True, made: Any = None
) -> threading.Thread:
    """Start a daemon thread of procpool's.  *quiet*: with the program's signals blocked (see
    _ASYNC_SIGNALS), for threads that run no user code; otherwise with the program's mask, as
    for a feeder that runs the caller's generator.  Processes started from the thread, and
    threads it starts, get the program's mask: the mask of the first thread outside procpool.
    *made*: called with the thread before it starts (a Ctrl-C held back meanwhile is raised
    here once it has started: the caller may never see the return value).
    """
    # (``_signal``'s sigmask: sets of ints; ``signal``'s builds an enum per signal, ≈ 0.16 ms
    # for the full mask restored below -- once per imap, which starts a feeder)
    caller = _signal.pthread_sigmask(signal.SIG_BLOCK, ())  # (reads the mask)
    program = program_mask()
    base: set[int] = set(caller if program is None else program)

    def run() -> None:
        _thread_state.mask = base
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    if made is not None:
        made(thread)
    try:  # (a Ctrl-C anywhere in here must not leave the caller's signals blocked)
        _signal.pthread_sigmask(signal.SIG_SETMASK, base | _ASYNC_SIGNALS if quiet else base)
        thread.start()
    finally:
        _signal.pthread_sigmask(signal.SIG_SETMASK, caller)
    return thread


def program_mask() -> set[int] | None:
    """The signal mask a child started from this thread should have (None: this thread's)."""
    return getattr(_thread_state, "mask", None)


class program_signals:  # noqa: N801 - used as a function: ``with program_signals():``
    """Run user code (a callback) on a quiet procpool thread with the program's signal mask,
    so that the processes it starts (``subprocess``...) can be signalled.

    A class, and ``_signal``'s sigmask (sets of ints), not ``signal``'s (which builds an enum
    per signal): the I/O thread enters this once per delivery."""

    __slots__ = ("_quiet",)

    def __enter__(self) -> None:
        mask = program_mask()
        self._quiet = None if mask is None else _signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def __exit__(self, *exc: object) -> None:
        if self._quiet is not None:
            _signal.pthread_sigmask(signal.SIG_SETMASK, self._quiet)


_HELD = frozenset({signal.SIGINT})


class interrupts_held:  # noqa: N801 - used as a function: ``with interrupts_held():``
    """Hold a Ctrl-C back from this thread for a stretch of bookkeeping that must not be cut
    in the middle (a caller's thread moving tasks between the scheduler's queues): SIGINT is
    blocked, and a Ctrl-C that comes meanwhile is raised as the stretch ends.  Only this
    thread's mask: a thread of the program that does not block SIGINT may still take it (then
    Python raises it in the main thread all the same).  Two system calls: for rare paths."""

    __slots__ = ("_mask",)

    def __enter__(self) -> None:
        self._mask = _signal.pthread_sigmask(signal.SIG_BLOCK, ())  # (reads it)
        try:  # (a Ctrl-C raised as this returns must not leave SIGINT blocked)
            _signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        except BaseException:
            _signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            raise

    def __exit__(self, *exc: object) -> None:
        _signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)


START_METHODS = ("fork", "forkserver", "spawn")
DEFAULT_START_METHOD = "fork"


class Proc:
    """A started worker process as the scheduler sees it."""

    __slots__ = ("pid", "pidfd", "sock", "progress")

    def __init__(
        self, pid: int, pidfd: int, sock: socket.socket, progress: mmap.mmap | None = None
    ) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        # the worker's progress slot (see _protocol.PROGRESS) when the launcher gave it one
        # (fork: shared memory mapped before the fork); None: the scheduler sends a memfd
        self.progress = progress


_NO_PIDFD = bool(os.environ.get("PROCPOOL_NO_PIDFD"))  # force the fallback (tests)


def open_pidfd(pid: int) -> int:
    """A pidfd for *pid*, or -1 where the kernel has none (Linux < 5.3, gVisor, seccomp):
    the scheduler then learns of a death from the EOF on the worker's channel instead."""
    if _NO_PIDFD:
        return -1
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def send_signal(proc: Proc, signum: int) -> None:
    """Signal a worker through its pidfd (no pid-reuse race), or by pid without one."""
    try:
        if proc.pidfd >= 0:
            signal.pidfd_send_signal(proc.pidfd, signum)
        else:
            os.kill(proc.pid, signum)
    except (ProcessLookupError, OSError):
        pass


def die_with_parent(expected_ppid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent (thread) dies; exit if it already has.

    ``PR_SET_PDEATHSIG`` through ``ctypes``, imported here and not at procpool's import: a
    forked worker holds every page of its parent's memory, and ctypes is ≈ 0.35 MB of it
    (the fork start method uses :func:`die_with_pipe` instead).  Called in fresh
    interpreters (``spawn``, the fork server and its single-threaded children), where loading
    a library is safe; in a forked worker only where the death pipe cannot serve, having been
    resolved in the parent before the fork (death_end) -- or, if the kernel refuses
    ``O_ASYNC`` to the worker alone, imported there."""
    _resolve_prctl()
    if _prctl:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_ppid:
        os._exit(1)


def _resolve_prctl(fork_lock_held: bool = False) -> None:
    """Import ctypes and find ``prctl`` (once), with no fork of ours in the middle of the
    import (see _serialize._cloudpickle): under _FORK_LOCK, unless the caller holds it."""
    global _prctl
    if _prctl is None:
        try:
            if fork_lock_held:
                import ctypes
            else:
                with _FORK_LOCK:
                    import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            _prctl = False


def death_pipe() -> tuple[int, int]:
    """A pool's death pipe: (read end, write end).  Nothing is ever written; the pool's process
    holds the write end until its I/O thread ends (see ForkLauncher.close), and the kernel
    closes it if the process dies.  Every forked child closes both ends (DEATH_ENDS)."""
    r, w = os.pipe()
    DEATH_ENDS.add(r)
    DEATH_ENDS.add(w)
    return r, w


#: errors of death_end that are raised (a passing shortage of fds or memory), where any other
#: means no death pipe here (no ``/proc``, no ``F_SETSIG``...) and PR_SET_PDEATHSIG instead:
#: falling back for a shortage would load ctypes into the parent for good (die_with_parent)
_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def death_end(r: int) -> int:
    """In the parent, under _FORK_LOCK, for the worker about to be forked: an open file of its
    own on the death pipe's read end *r* (the owner of a signal belongs to an open file, and
    workers must not share one), set to raise SIGKILL when the pipe ends (``F_SETSIG``).  -1
    where that cannot be had (no ``/proc``, not Linux): the worker then uses
    ``PR_SET_PDEATHSIG``, resolved here.  Closed in the parent once the worker is forked,
    under the same lock: no other pool's worker inherits it.

    ``F_SETSIG`` takes an int, and ``fcntl`` given an int first fails to parse it as a buffer:
    the error message it formats (then drops) pages ≈ 0.2 MB of libc's printf into the
    process.  Paid here, in the parent, not in every worker."""
    own = -1
    if _FIOASYNC is not None:
        try:
            own = os.open(f"/proc/self/fd/{r}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.fcntl(own, fcntl.F_SETSIG, signal.SIGKILL)
        except (OSError, AttributeError) as exc:  # (AttributeError: no F_SETSIG, not Linux)
            if own >= 0:
                os.close(own)
            if isinstance(exc, OSError) and exc.errno in _SHORTAGES:
                raise
            own = -1
    if own < 0:
        _resolve_prctl(fork_lock_held=True)  # now, not in the worker: see die_with_parent
    return own


def die_with_pipe(own: int, expected_ppid: int) -> int:
    """In a forked worker: be SIGKILLed by the kernel the moment the death pipe's write end
    closes, i.e. when the pool's I/O thread ends or its process dies, even in the middle of a
    task -- what ``PR_SET_PDEATHSIG`` on the forking thread gives, without ``ctypes`` (see
    die_with_parent).

    *own* is this worker's open file of the pipe's read end (see death_end; -1: none).  The
    worker makes itself its owner and asks for ``O_ASYNC`` notice, which ``F_SETSIG`` made a
    SIGKILL; then exits at once if the end came before.  Buffer arguments only (see
    death_end).  Where the kernel refuses (a seccomp filter...), ``PR_SET_PDEATHSIG``.
    Returns the fd kept open for the worker's life (-1: none)."""
    if own >= 0:
        try:
            fcntl.fcntl(own, _F_SETOWN_EX, _F_OWNER.pack(_F_OWNER_PID, os.getpid()))
            fcntl.ioctl(own, _FIOASYNC, bytearray(_ON))  # type: ignore[arg-type]
        except OSError:  # pragma: no cover - refused
            os.close(own)
            own = -1
    if own < 0:
        die_with_parent(expected_ppid)
        return -1
    # the write end closed before O_ASYNC was on (no signal then): its EOF is already there
    poller = select.poll()
    poller.register(own, select.POLLIN)
    if poller.poll(0):
        os._exit(1)
    return own


_F_SETOWN_EX = 15  # fcntl: struct f_owner_ex {int type; pid_t pid;}
_F_OWNER = struct.Struct("ii")
_F_OWNER_PID = 1  # F_OWNER_PID: the signal goes to this process, not its group
_ON = struct.pack("i", 1)
#: ioctl FIOASYNC where it has the generic value (termios, which has it, is a large module to
#: import); elsewhere (powerpc, mips, sparc...) the workers use PR_SET_PDEATHSIG
_FIOASYNC = (
    0x5452
    if os.uname().machine
    in ("x86_64", "i686", "i386", "aarch64", "armv7l", "armv6l", "riscv64", "s390x", "loongarch64")
    else None
)


# ---------------------------------------------------------------- the main script in new workers
#: True while a spawned worker runs the parent's main script (see import_main)
IMPORTING_MAIN = False


def main_preparation() -> dict[str, Any]:
    """What a worker started afresh (spawn, forkserver) needs to run the parent's main script,
    as :mod:`multiprocessing` prepares it: the script's module name or path, ``sys.argv``,
    and the process's authentication key (a ``multiprocessing`` Manager's proxy passed to a
    task connects back with it: without it, "digest sent was rejected")."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("procpool-worker")
    keep = ("init_main_from_name", "init_main_from_path", "sys_argv")
    path = data.get("init_main_from_path")
    if path is not None and not os.path.isfile(path):  # a script piped in (`python - < f`)
        del data["init_main_from_path"]  # cannot be run again: its functions go by value
    kept = {key: data[key] for key in keep if key in data}
    # (an AuthenticationString refuses pickling outside multiprocessing's own spawning: the
    # bytes travel, as multiprocessing sends them, and spawn.prepare wraps them again)
    kept["authkey"] = bytes(data["authkey"])
    return kept


def import_main(data: dict[str, Any]) -> None:
    """Run the parent's main script in this worker as ``__mp_main__`` (aliased ``__main__``),
    as multiprocessing's spawn does, so its functions and classes can be found by name: an
    initializer, a task's function and arguments' classes defined there.  Its top level runs
    (not what ``if __name__ == "__main__":`` guards); a pool or process started there raises
    ``RuntimeError`` instead of spawning workers that would do the same."""
    from multiprocessing import process, spawn

    global IMPORTING_MAIN
    current = process.current_process()
    IMPORTING_MAIN = True
    current._inheriting = True  # type: ignore[attr-defined]  # multiprocessing's own guard
    try:
        spawn.prepare(data)
    finally:
        IMPORTING_MAIN = False
        del current._inheriting  # type: ignore[attr-defined]


def check_not_importing_main() -> None:
    if IMPORTING_MAIN:
        raise RuntimeError(
            "a pool was started while a worker ran the main script: guard the program's entry"
            " point with `if __name__ == \"__main__\":` (workers started with 'spawn' or"
            " 'forkserver' run the main script, as in multiprocessing)"
        )


def child_setup(keep: int) -> None:
    """Common set-up in a new worker: close other pools' fds, die with the parent, ignore ^C.

    Ctrl-C in a terminal reaches the whole foreground process group; the caller gets one clean
    ``KeyboardInterrupt`` and the pool is torn down from there, so workers ignore SIGINT (a task
    may install its own handler).
    """
    for fd in list(INTERNAL_FDS):
        if fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
    INTERNAL_FDS.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exitcode(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def describe_exit(code: int | None) -> str:
    """Human words for an exit code: 'killed by signal 9 (SIGKILL)' / 'exited with code 3'."""
    if code is None:
        return "died (exit status unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


class Launcher:
    """Creates worker processes for one pool."""

    method = ""
    #: the pool's initializer and its arguments, for forked workers to inherit (else None)
    init: Any = None

    def start(self) -> Proc:
        raise NotImplementedError

    def reap(self, proc: Proc) -> int | None:
        """Collect the exit code of a dead worker (blocking only if it is not dead yet)."""
        try:
            _, status = os.waitpid(proc.pid, 0)
        except ChildProcessError:
            return None
        return exitcode(status)

    def close(self) -> None:
        """Release the launcher's own resources (the fork server, if any)."""


class ForkLauncher(Launcher):
    method = "fork"

    def __init__(self) -> None:
        self._death: tuple[int, int] | None = None  # the pool's death pipe (see die_with_pipe)

    def start(self) -> Proc:
        ppid = os.getpid()
        # the progress slot: shared memory the worker inherits (no fd, no memfd to send: a
        # slot the parent maps with no fd kept would need ctypes < 3.13).  One page: the rest
        # is apply's express lane (see _express).  Not MADV_DONTFORK: a process forked later
        # inherits the mmap object, and one still open there (the express lane's views keep
        # it from closing for a while) unmapped, as it was freed, a range the child had reused
        # -- a worker's SIGSEGV deep in a task, in one full test run in two.
        slot = mmap.mmap(-1, _express.SLOT_SIZE)
        own = pid = -1
        parent_sock: socket.socket | None = None
        child_sock: socket.socket | None = None
        try:
            # One pool's I/O thread at a time from here to the fork: another pool forking in
            # between would let its worker inherit this socketpair (or the worker's end of the
            # death pipe) before it is in INTERNAL_FDS (or closed).
            with _FORK_LOCK:
                if self._death is None:
                    self._death = death_pipe()
                own = death_end(self._death[0])
                parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                INTERNAL_FDS.update((parent_sock.fileno(), child_sock.fileno()))
                with warnings.catch_warnings():
                    # Python >= 3.12 warns about fork() with threads (ours is the I/O thread,
                    # see the module docstring); under -W error that warning would orphan the
                    # child
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
                if pid:
                    if own >= 0:  # the worker's, from now on
                        os.close(own)
                    INTERNAL_FDS.discard(child_sock.fileno())
                    child_sock.close()
        except BaseException:
            if pid == 0:  # the worker: never into the parent's code (see the finally below)
                os._exit(1)
            if pid > 0:  # forked, but what followed failed: the worker goes, reaped
                os.kill(pid, signal.SIGKILL)  # (ours, not reaped: the pid cannot be reused)
                os.waitpid(pid, 0)
            elif own >= 0:
                os.close(own)
            for sock in (parent_sock, child_sock):
                if sock is not None:
                    INTERNAL_FDS.discard(sock.fileno())
                    sock.close()
            slot.close()
            raise
        if pid == 0:  # the worker (its _FORK_LOCK is new: see _new_fork_lock)
            code = 1
            try:
                # out of the set first: child_setup closes the rest, and a second close's
                # EBADF would build an OSError, whose strerror() loads libc's message catalog
                # machinery (≈ 0.4 MB of code pages more in every idle worker)
                assert parent_sock is not None and child_sock is not None
                INTERNAL_FDS.discard(parent_sock.fileno())
                parent_sock.close()
                own = die_with_pipe(own, ppid)
                child_setup(child_sock.fileno())  # SIGINT ignored from here...
                if own >= 0:  # (a pool started by a task: its workers need not keep it)
                    INTERNAL_FDS.add(own)
                mask = program_mask()
                if mask is not None:  # ...so a Ctrl-C pending since the fork is dropped
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                from . import _worker

                # (batch=False: the parent puts us under SCHED_BATCH, below)
                code = _worker.main(child_sock, batch=False, progress=slot, init=self.init)
            finally:
                os._exit(code)
        from ._worker import batch_scheduling

        batch_scheduling(pid)
        assert parent_sock is not None
        return Proc(pid, open_pidfd(pid), parent_sock, slot)

    def close(self) -> None:
        """Close the death pipe (the I/O thread is ending): a worker still alive is killed."""
        if self._death is not None:
            r, w = self._death
            self._death = None
            # The write end goes at once (dup2 closes it as it reuses its number); both numbers
            # stay in DEATH_ENDS until closed, so a child forked meanwhile closes them too.
            # (Not under _FORK_LOCK: the I/O thread holds its pool's lock here, and a thread
            # holding _FORK_LOCK may run that pool's finalizer in a garbage collection.)
            os.dup2(r, w, inheritable=False)
            DEATH_ENDS.difference_update((r, w))
            os.close(w)
            os.close(r)


def _spawn_python(code: str, sock: socket.socket) -> int:
    """posix_spawn ``python -c code`` with *sock* as fd 3.

    It starts with SIGINT blocked, on top of the program's mask: a Ctrl-C while it imports
    (≈ 0.1 s) would print a traceback there; the process ignores SIGINT, then unblocks it
    unless the program had it blocked (:func:`ignore_sigint`), and the held Ctrl-C is dropped.
    """
    env = dict(os.environ)
    env["PROCPOOL_PARENT_PID"] = str(os.getpid())
    mask = program_mask()
    if mask is None:  # (this thread's)
        mask = set(_signal.pthread_sigmask(signal.SIG_BLOCK, ()))
    if signal.SIGINT not in mask:
        env["PROCPOOL_UNBLOCK_SIGINT"] = "1"
    # the interpreter's options (-O, -X dev, -W...) as multiprocessing passes them, and this
    # procpool found first: the code runs before the worker gets the parent's sys.path
    from subprocess import _args_from_interpreter_flags  # type: ignore[attr-defined]

    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {home!r}); {code}"
    argv = [sys.executable, *_args_from_interpreter_flags(), "-c", code]
    actions = [(os.POSIX_SPAWN_DUP2, sock.fileno(), 3)]
    return os.posix_spawn(
        sys.executable, argv, env, file_actions=actions, setsigmask=set(mask) | {signal.SIGINT}
    )


def ignore_sigint() -> None:
    """In a process _spawn_python started: ignore SIGINT, then unblock it as the program had
    it (a Ctrl-C held since the start is dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.pop("PROCPOOL_UNBLOCK_SIGINT", ""):
        _signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT,))


class SpawnLauncher(Launcher):
    method = "spawn"

    def start(self) -> Proc:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = _spawn_python("from procpool._worker import spawn_main; spawn_main()", child_sock)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        return Proc(pid, open_pidfd(pid), parent_sock)


# ------------------------------------------------------------------------------ fork server
_REQ = struct.Struct("<ci")  # command, pid
_REPLY = struct.Struct("<ii")  # pid or status, flag


class _Refused(OSError):
    """No new worker from the fork server, which is fine: it could not make one (its fork or
    socketpair failed: out of processes, memory or descriptors there -- it says so and goes
    on), or the worker came without its descriptors (this process is out of them: the
    worker, its channel gone, ends at once)."""


class ForkServerLauncher(Launcher):
    """Workers forked by a single-threaded server process spawned once per pool."""

    method = "forkserver"

    def __init__(self) -> None:
        # started by the first start(), in the pool's I/O thread: the server dies with the
        # thread that started it (PR_SET_PDEATHSIG), and Pool() may be called by a thread
        # that ends long before its pool (its running task was lost with the server)
        self._ctl: socket.socket | None = None
        self._pid = 0

    def _start_server(self) -> None:
        ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (ctl, child):  # blocking, whatever socket.setdefaulttimeout() says here
            sock.settimeout(None)  # (else the server's end, too, is O_NONBLOCK)
        try:
            pid = _spawn_python(
                "from procpool._start import forkserver_main; forkserver_main()", child
            )
        except BaseException:
            ctl.close()
            raise
        finally:
            child.close()
        self._ctl, self._pid = ctl, pid  # (only now: close() waits for this pid alone)
        INTERNAL_FDS.add(ctl.fileno())

    def start(self) -> Proc:
        if self._ctl is None:
            self._start_server()
        try:
            return self._fork()
        except _Refused:  # (the server is fine)
            raise
        except OSError:  # the server died (OOM killer, a stray kill): start a new one, once
            self.close()
            self._start_server()
            return self._fork()

    def _fork(self) -> Proc:
        assert self._ctl is not None
        self._ctl.sendall(_REQ.pack(b"S", 0))
        data, anc, _, _ = self._ctl.recvmsg(_REPLY.size, socket.CMSG_SPACE(2 * 4))
        if len(data) < _REPLY.size:
            raise OSError("the fork server is gone")
        pid, has_pidfd = _REPLY.unpack(data)
        if pid < 0:  # (-errno: see forkserver_main)
            why = os.strerror(-pid)
            raise _Refused(-pid, f"the fork server could not start a worker: {why}")
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(arr)
        if len(fds) < 1 + bool(has_pidfd):  # this process had no room for them (MSG_CTRUNC)
            for fd in fds:
                os.close(fd)
            raise _Refused(
                errno.EMFILE, f"the new worker's descriptors: {os.strerror(errno.EMFILE)}"
            )
        pidfd = fds.pop(0) if has_pidfd else -1
        return Proc(pid, pidfd, socket.socket(fileno=fds[0]))

    def reap(self, proc: Proc) -> int | None:
        if self._ctl is None:
            return None
        try:
            self._ctl.sendall(_REQ.pack(b"R", proc.pid))
            data = self._ctl.recv(_REPLY.size)
        except OSError:
            return None
        if len(data) < _REPLY.size:
            return None
        status, known = _REPLY.unpack(data)
        return exitcode(status) if known else None

    def close(self) -> None:
        if self._ctl is None:
            return
        INTERNAL_FDS.discard(self._ctl.fileno())
        self._ctl.close()  # the server sees EOF and exits; its workers die with it
        self._ctl = None
        pid, self._pid = self._pid, 0
        if pid > 0:  # (never 0: waitpid(0) would reap any child of this process group)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def forkserver_main() -> None:
    """The fork server's loop (runs in its own fresh interpreter, single-threaded)."""
    die_with_parent(int(os.environ.pop("PROCPOOL_PARENT_PID", "0")) or os.getppid())
    ignore_sigint()  # (its workers inherit that)
    ctl = socket.socket(fileno=3)
    from . import _worker  # noqa: F401  (preloaded once, inherited by every worker)

    me = os.getpid()
    while True:
        data = ctl.recv(_REQ.size)
        if len(data) < _REQ.size:
            os._exit(0)
        cmd, pid = _REQ.unpack(data)
        if cmd == b"S":
            # out of processes, memory or descriptors here: say so and serve on (dying would
            # take every worker of the pool with it)
            try:
                parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:
                ctl.sendall(_REPLY.pack(-(exc.errno or errno.EMFILE), 0))
                continue
            try:
                child = os.fork()
            except OSError as exc:
                parent_sock.close()
                child_sock.close()
                ctl.sendall(_REPLY.pack(-(exc.errno or errno.EAGAIN), 0))
                continue
            if child == 0:
                code = 1
                try:
                    ctl.close()
                    parent_sock.close()
                    die_with_parent(me)
                    code = _worker.main(child_sock)
                finally:
                    os._exit(code)
            child_sock.close()
            pidfd = open_pidfd(child)
            fds = [pidfd, parent_sock.fileno()] if pidfd >= 0 else [parent_sock.fileno()]
            ctl.sendmsg(
                [_REPLY.pack(child, int(pidfd >= 0))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
            )
            if pidfd >= 0:
                os.close(pidfd)
            parent_sock.close()
        elif cmd == b"R":
            ctl.sendall(_reap_in_server(pid))


#: seconds the fork server waits for a worker it is asked to reap to end
REAP_WAIT = 2.0


def _reap_in_server(pid: int) -> bytes:
    """The fork server's answer to a reap request: the worker's wait status, once it has
    ended -- or "unknown" after REAP_WAIT seconds.  (With a blocking ``waitpid``, a pool was
    once seen waiting for good in a CI run: this server in ``waitpid`` on a live worker, the
    pool's I/O thread reading this answer.  Whatever asked, the pool then goes on; the worker,
    its channel closed by the pool, exits.)"""
    deadline = time.monotonic() + REAP_WAIT
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return _REPLY.pack(0, 0)
        if done:
            return _REPLY.pack(status, 1)
        if time.monotonic() > deadline:
            return _REPLY.pack(0, 0)
        time.sleep(0.001)


def make_launcher(method: str | None) -> Launcher:
    method = method or DEFAULT_START_METHOD
    if method == "fork":
        return ForkLauncher()
    if method == "spawn":
        return SpawnLauncher()
    if method == "forkserver":
        return ForkServerLauncher()
    raise ValueError(f"start_method must be one of {START_METHODS}, not {method!r}")
