"""Who holds a bounded queue's slots, so that the slots a killed process held are given back.

A bounded :class:`~procpool.Queue` counts its free slots in a semaphore.  A producer takes one
before its datagram goes; a consumer gives one back after it has taken a datagram.  A process
SIGKILLed in between (about one kill in three of a consumer in a busy ``get`` loop: a kill
that arrives while ``recvmsg`` runs takes effect as it returns, datagram taken) holds its slot
for good, and enough such kills leave an empty queue refusing every ``put``.

The ledger, a table in the queue's shared region, says how many slots each process may hold.
Each process using the queue has one entry (pid, start time, a *held* word),
whatever number of threads and of ``Queue`` objects it uses the queue through.  Around each
step it counts itself in its held word (an aligned 8-byte store: a reader sees the old word or
the new; the word also counts its changes, so a step that came and went shows):

* a producer counts one as soon as it has taken a slot, until its message is counted; while
  it waits for one it counts none (and changes no word: a producer that keeps trying must not
  keep healers from their two looks);
* a consumer counts one from just before it takes a datagram until its slot is given back; it
  *waits* for a datagram in ``poll``, taking nothing and counting none (a ``get`` that found
  the queue empty last time first asks the kernel whether a datagram waits, and changes no
  word if none does: a consumer polling an empty queue must not keep healers from their two
  looks).

Every slot is then free, or in a datagram waiting in the socket, or held by a live process
that counts it -- or by a dead one.  :meth:`Ledger.heal` gives back the difference when it can
be measured: no datagram waits (the kernel says so exactly), and the held words, the free
count and the empty socket are the same over two looks ``HEAL_PAUSE`` apart (a live process
moves on within microseconds, so a state that lasts is no step in progress).  Then ``lost =
maxsize - free - held by the living``; when the living hold nothing, the message count
(``items - debt``) must be zero too, and is set so.  One healer at a time: the healer word names
it, set by an atomic compare-and-swap from no process or a dead one (no lock that a killed
process could hold); the others do not look.  Each process looks at its own times, spread at
random (consumers woken together do not stay in step) and kept across calls (a consumer that
polls with short timeouts looks too).  An entry is taken the same way, by compare-and-swap on
its pid word, by a process that has none: a free one, or a dead process's.

What is left: a process that does not run for longer than ``HEAL_PAUSE`` (stopped by SIGSTOP,
or a thread waiting that long for the GIL) between taking a slot and counting it may see that
slot given back: the queue then holds one message over ``maxsize`` until a
consumer gives a slot back when all are free (the semaphore's maximum drops the excess).
Beyond ``ENTRIES`` live processes on one queue, the others cannot count (they are counted in
``unnamed``) and healing stops for good.  Where atomics are not available (see
:mod:`._ipc_atomic`), entries are taken and the healer chosen under a semaphore: a process that
waited ``CLAIM_WAIT`` for it (a killed process holds it) goes unnamed, and healing stops.
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
_WORDS = 4  # per entry: pid (negative while being taken), start time, held word, (unused)
_HEALER = ENTRIES * _WORDS  # the word naming the healer (its pid), after the entries
TABLE_BYTES = (_HEALER + 1) * 8
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
        self._heal_at = 0.0  # when this process next looks to heal (0: not set)
        self._entry = -1  # this process's entry; -1: none yet, -2: unnamed
        self._at = -1  # where its held word is in the table
        self._word = 0  # its held word, as last written
        self._lock = threading.Lock()  # (threads counting in the same word)
        self._healing = threading.Lock()  # (one healer thread per process)

    # -- counting -----------------------------------------------------------------------------
    def enter(self, note: list[bool]) -> None:
        """Count one more slot this process may hold, and say so in *note* (with no call
        in between where a signal handler's exception could land: see leave)."""
        with self._lock:
            at = self._at
            if at < 0 and self._claim() < 0:
                return
            word = self._word + _ENTER
            self._word = word
            self._table[self._at] = word
            note.append(True)

    def leave(self, note: list[bool]) -> None:
        """Count one fewer, if *note* says one was counted (and clear it)."""
        with self._lock:
            if note:
                note.clear()
                word = self._word + _LEAVE
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
        held = False
        if OPS is None:  # (under the claim semaphore: unnamed if a killed process holds it)
            held = self._claim_lock.acquire(True, CLAIM_WAIT)
            if not held:
                return -1
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
    def due(self, now: float) -> float:
        """When this process looks to heal next (set on first ask: see heal_delay)."""
        if not self._heal_at:
            self._heal_at = heal_delay(now)
        return self._heal_at

    def heal(self, socket_empty: Callable[[], bool], items: SemLock, debt: SemLock) -> bool:
        """Give back the slots dead processes hold, if that can be measured now (see the
        module doc); True if any was.  Sleeps ``HEAL_PAUSE`` when the queue looks empty with
        slots missing.  The calling thread must hold nothing it has counted."""
        self._heal_at = heal_delay(time.monotonic())
        free = self._free
        if free._get_value() >= self._maxsize or not socket_empty():
            return False
        if not self._healing.acquire(False):
            return False
        try:
            with self._lock:
                mine = self._entry if self._entry >= 0 else self._claim()
            if mine < 0 or not self._elect():  # (unnamed: it cannot tell what others hold)
                return False
            try:
                return self._heal(socket_empty, items, debt)
            finally:
                self._unelect()
        finally:
            self._healing.release()

    def _elect(self) -> bool:
        """Become the one healer: the healer word names no process, or a dead one."""
        if OPS is None:  # (the claim semaphore: see the module doc)
            return bool(self._claim_lock.acquire(False))
        address = self._region.data_address + _HEALER * 8
        me = os.getpid()
        found = OPS.cas8(address, 0, me)
        if found == 0:
            return True
        return bool(_gone(found, 0) and OPS.cas8(address, found, me) == found)

    def _unelect(self) -> None:
        if OPS is None:
            self._claim_lock.release()
            return
        OPS.cas8(self._region.data_address + _HEALER * 8, os.getpid(), 0)

    def _heal(self, socket_empty: Callable[[], bool], items: SemLock, debt: SemLock) -> bool:
        free = self._free
        table = self._table
        first = (self._held_words(), free._get_value())
        time.sleep(HEAL_PAUSE)
        second = (self._held_words(), free._get_value())
        if second != first or not socket_empty() or self._unnamed._get_value():
            return False  # (something moved: not now)
        holders = 0
        for i in range(ENTRIES):
            pid = table[_WORDS * i]
            count = second[0][i] & _HELD
            if pid > 0 and count and not _gone(pid, table[_WORDS * i + 1]):
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
        ledger._heal_at = 0.0
        ledger._word = 0
        ledger._lock = threading.Lock()
        ledger._healing = threading.Lock()


os.register_at_fork(after_in_child=_forked)
