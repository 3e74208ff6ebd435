"""Who holds a bounded queue's slots, so that the slots a killed process held are given back.

A bounded :class:`~procpool.Queue` counts its free slots in a semaphore.  A producer takes one
before its datagram goes; a consumer gives one back after it has taken a datagram.  A process
SIGKILLed in between (about one kill in three of a consumer in a busy ``get`` loop: a kill
that arrives while ``recvmsg`` runs takes effect as it returns, datagram taken) holds its slot
for good, and enough such kills leave an empty queue refusing every ``put``.

The ledger, a table in the queue's shared region, says how many slots each process may hold.
Each process using the queue has one entry (pid, start time, a *held* word, a healer flag),
whatever number of threads and of ``Queue`` objects it uses the queue through.  Around each
step it counts itself in its held word (an aligned 8-byte store: a reader sees the old word or
the new; the word also counts its changes, so a step that came and went shows):

* a producer counts one as soon as it has taken a slot, until its message is counted; while
  it waits for one it counts none (and changes no word: a producer that keeps trying must not
  keep healers from their two looks);
* a consumer counts one from just before it takes a datagram until its slot is given back; it
  *waits* for a datagram in ``poll``, taking nothing and counting none (a ``get`` that does
  not wait first asks the kernel whether a datagram waits, and changes no word if none does).

Every slot is then free, or in a datagram waiting in the socket, or held by a live process
that counts it -- or by a dead one.  :meth:`Ledger.heal` gives back the difference when it can
be measured: no datagram waits (the kernel says so exactly), and the held words, the free
count and the empty socket are the same over two looks ``HEAL_PAUSE`` apart (a live process
moves on within microseconds, so a state that lasts is no step in progress).  Then ``lost =
maxsize - free - held by the living``; when the living hold nothing, the message count
(``items - debt``) must be zero too, and is set so.  One healer at a time: a healer raises its
flag, looks twice, and gives up if another live process's flag is raised (two at once both give
up; each looks again after a slice of its own random length).  An entry is taken with an
atomic compare-and-swap on its pid word (no lock that a killed process could hold), by a
process that has none: a free one, or a dead process's.

What is left: a process that does not run for longer than ``HEAL_PAUSE`` (stopped by SIGSTOP,
or a thread waiting that long for the GIL) between taking a slot and counting it may see that
slot given back: the queue then holds one message over ``maxsize`` until a
consumer gives a slot back when all are free (the semaphore's maximum drops the excess).
Beyond ``ENTRIES`` live processes on one queue, the others cannot count (they are counted in
``unnamed``) and healing stops for good.  Where atomics are not available (see
:mod:`._ipc_atomic`), entries are taken under a semaphore, waited for at most ``CLAIM_WAIT``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

from ._ipc_atomic import OPS
from ._ipc_mem import Region, SemLock
from .sync import _alive, _this_process

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Ledger", "ledger_for", "heal_delay", "ENTRIES", "TABLE_BYTES", "HEAL_SLICE"]

ENTRIES = 256  # processes that can count what they hold (then "unnamed")
_WORDS = 4  # per entry: pid (negative while being taken), start time, held word, healer flag
TABLE_BYTES = ENTRIES * _WORDS * 8
_HELD = 0xFFFF  # (the count's bits in a held word; the rest counts the changes)
_STEP = _HELD + 1
_ENTER, _LEAVE = _STEP + 1, _STEP - 1
HEAL_PAUSE = 0.05  # seconds between the two looks of a heal
HEAL_SLICE = 0.25  # mean seconds a waiting put or get waits before it looks to heal
CLAIM_WAIT = 1.0  # seconds to wait for the claim semaphore (without atomics)

_LEDGERS: weakref.WeakValueDictionary[int, Ledger] = weakref.WeakValueDictionary()
_LEDGERS_LOCK = threading.Lock()


def ledger_for(
    region: Region, maxsize: int, free: SemLock, claim: SemLock, unnamed: SemLock
) -> Ledger:
    """This process's ledger of the queue in *region*: one per process, shared by every
    ``Queue`` object of that queue here (and by their threads)."""
    key = os.fstat(region.fd).st_ino  # (memfds: one inode each)
    with _LEDGERS_LOCK:
        ledger = _LEDGERS.get(key)
        if ledger is None:
            ledger = Ledger(region, maxsize, free, claim, unnamed)
            _LEDGERS[key] = ledger
        return ledger


def heal_delay(now: float) -> float:
    """When a waiting put or get next looks to heal: HEAL_SLICE on average, spread out
    (healers woken together by the same datagram must not stay in step)."""
    spread = (time.monotonic_ns() * 2654435761 + os.getpid()) % 1000 / 1000  # (no `random`)
    return now + HEAL_SLICE * (0.5 + spread)


class Ledger:
    """The slot ledger of one bounded queue, as seen by one process (see the module doc)."""

    def __init__(
        self, region: Region, maxsize: int, free: SemLock, claim: SemLock, unnamed: SemLock
    ) -> None:
        self._region = region  # (keeps the mapping)
        self._table = region.data(0, TABLE_BYTES).cast("q")
        self._maxsize = maxsize
        self._free = free
        self._claim_lock = claim
        self._unnamed = unnamed
        self._entry = -1  # this process's entry; -1: none yet, -2: unnamed
        self._at = -1  # where its held word is in the table
        self._word = 0  # its held word, as last written
        self._lock = threading.Lock()  # (threads counting in the same word)
        self._healing = threading.Lock()  # (one healer thread per process)

    # -- counting -----------------------------------------------------------------------------
    def enter(self) -> None:
        """Count one more slot this process may hold."""
        with self._lock:
            at = self._at
            if at < 0:
                if self._claim() < 0:
                    return
                at = self._at
            word = self._word + _ENTER
            self._word = word
            self._table[at] = word

    def leave(self) -> None:
        """Count one fewer."""
        with self._lock:
            word = self._word
            if word & _HELD:  # (counted: so it has an entry)
                word += _LEAVE
                self._word = word
                self._table[self._at] = word

    def _claim(self) -> int:
        """Take an entry for this process (see the module doc): its own if it has one (a
        ledger of this queue that died here before), else a free one or a dead process's."""
        if self._entry == -2:
            return -2
        pid, start = _this_process()
        table = self._table
        entry = -1
        for i in range(ENTRIES):  # (its own: every held word of it is back to zero)
            if table[_WORDS * i] == pid and table[_WORDS * i + 1] == start:
                entry = i
                break
        else:
            entry = self._take_entry(pid, start)
        if entry < 0:
            self._unnamed.release()
            self._entry = -2
            return -2
        self._word = table[_WORDS * entry + 2] & ~_HELD
        table[_WORDS * entry + 2] = self._word
        self._at = _WORDS * entry + 2
        self._entry = entry
        return entry

    def _take_entry(self, pid: int, start: int) -> int:
        table = self._table
        held = False if OPS is not None else self._claim_lock.acquire(True, CLAIM_WAIT)
        try:
            for reclaim in (False, True):
                for i in range(ENTRIES):
                    other = table[_WORDS * i]
                    if other == 0 or (reclaim and _gone(other, table[_WORDS * i + 1])):
                        if self._swap_pid(i, other, -pid):
                            table[_WORDS * i + 1] = start
                            table[_WORDS * i + 3] = 0
                            table[_WORDS * i] = pid  # (last: then it is whole)
                            return i
            return -1
        finally:
            if held:
                self._claim_lock.release()

    def _swap_pid(self, i: int, expected: int, desired: int) -> bool:
        if OPS is None:  # (under the claim semaphore)
            if self._table[_WORDS * i] != expected:
                return False
            self._table[_WORDS * i] = desired
            return True
        address = self._region.data_address + _WORDS * 8 * i
        return bool(OPS.cas8(address, expected, desired) == expected)

    # -- healing ------------------------------------------------------------------------------
    def heal(self, socket_empty: Callable[[], bool], items: SemLock, debt: SemLock) -> bool:
        """Give back the slots dead processes hold, if that can be measured now (see the
        module doc); True if any was.  Sleeps ``HEAL_PAUSE`` when the queue looks empty with
        slots missing.  The calling thread must hold nothing it has counted."""
        free = self._free
        if free._get_value() >= self._maxsize or not socket_empty():
            return False
        if not self._healing.acquire(False):
            return False
        try:
            with self._lock:
                mine = self._entry if self._entry >= 0 else self._claim()
            if mine < 0:  # (unnamed: it cannot tell what the others hold)
                return False
            table = self._table
            flag = _WORDS * mine + 3
            table[flag] = 1
            try:
                first = (self._held_words(), free._get_value())
                time.sleep(HEAL_PAUSE)  # (also a barrier: raised flags are seen after it)
                second = (self._held_words(), free._get_value())
                if second != first or not socket_empty() or self._unnamed._get_value():
                    return False  # (something moved: not now)
                holders = 0
                for i in range(ENTRIES):
                    pid = table[_WORDS * i]
                    if pid <= 0:
                        continue
                    flagged = i != mine and table[_WORDS * i + 3]
                    count = second[0][i] & _HELD
                    if (flagged or count) and not _gone(pid, table[_WORDS * i + 1]):
                        if flagged:
                            return False  # (another healer: both give up, look again later)
                        holders += count
                # once more, just before: nothing moved since the second look
                if free._get_value() != second[1] or not socket_empty():
                    return False
                if holders == 0:  # no message waits, none is on its way: the count is zero
                    count = items._get_value() - debt._get_value()
                    fix = items if count > 0 else debt
                    for _ in range(abs(count)):
                        if not fix.acquire(False):
                            break
                given = 0
                for _ in range(self._maxsize - second[1] - holders):
                    try:
                        free.release()
                    except ValueError:  # (at maxsize)
                        break
                    given += 1
                return given > 0
            finally:
                table[flag] = 0
        finally:
            self._healing.release()

    def _held_words(self) -> list[int]:
        return self._table[2::_WORDS].tolist()


def _gone(pid: int, start: int) -> bool:
    """Whether the process of an entry is dead (a negative pid: being taken by -pid)."""
    if pid < 0:
        try:
            os.kill(-pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False
    return not _alive(pid, start)


def _forked() -> None:
    """A forked child is another process: it takes an entry of its own when it first counts
    (the parent's entry stays the parent's, with what the parent's threads hold)."""
    global _LEDGERS_LOCK
    _LEDGERS_LOCK = threading.Lock()
    for ledger in list(_LEDGERS.values()):
        ledger._entry = ledger._at = -1
        ledger._word = 0
        ledger._lock = threading.Lock()
        ledger._healing = threading.Lock()


os.register_at_fork(after_in_child=_forked)
