"""Who holds a bounded queue's slots, so that the slots a killed process held are given back.

A bounded :class:`~procpool.Queue` counts its free slots in a semaphore.  A producer takes one
before its datagram goes; a consumer gives one back after it has taken a datagram.  A process
SIGKILLed in between (about one kill in three of a consumer in a busy ``get`` loop: a kill
that arrives while ``recvmsg`` runs takes effect as it returns, datagram taken) holds its slot
for good, and enough such kills leave an empty queue refusing every ``put``.

The ledger, a table in the queue's shared region, says which processes may hold a slot.  Each
process using the queue writes its pid and start time in an entry once, then a state word
before and after each step (an aligned 8-byte store: a reader sees the old word or the new):

* ``WAITING`` -- a producer about to take a slot, or waiting for one (holds none);
* ``HOLDING`` -- a producer that has its slot and has not yet counted its message;
* ``TAKING`` -- a consumer about to take a datagram, or that has taken one and not yet given
  its slot back (a consumer *waits* for a datagram in ``poll`` as ``IDLE``: taking nothing);
* ``HEALING`` -- looking for slots the dead hold (holds none; see below);
* ``IDLE`` -- none of that.

Every slot is then free, or in a datagram waiting in the socket, or held by a process that
says so (``HOLDING``/``TAKING``) -- or by a dead one.  :meth:`Ledger.heal` gives back the
difference when it can be measured: no datagram waits (the kernel says so exactly), and the
table, the free count and the empty socket are the same over two looks ``HEAL_PAUSE`` apart
(a live process moves on within microseconds, so a state that lasts is no step in progress;
the word carries a sequence number, so a step that came and went shows too).  Then
``lost = maxsize - free - live holders``; when no live process holds anything, the message
count (``items - debt``) must be zero too, and is set so.  One healer at a time: a healer says
``HEALING`` before its first look and gives up if its looks show another live one (two at
once both give up, and look again later); no lock, so none is left held by a killed healer.

What is left: a live process stopped (SIGSTOP) for longer than ``HEAL_PAUSE`` between taking
a slot and saying so (a few bytecodes) may see its slot given back: the queue then holds one
message over ``maxsize`` until a consumer takes one when every slot is free (the semaphore's
maximum drops the excess).  When every entry is taken by live processes, a process gets none
and is counted in ``unnamed``; healing then stops for good (it cannot know what they hold).
"""

from __future__ import annotations

import os
import time
import weakref

from ._ipc_mem import Region, SemLock
from .sync import _alive, _this_process

TYPE_CHECKING = False  # typing is not imported at run time: see _typing
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Ledger", "ENTRIES", "TABLE_BYTES", "IDLE", "WAITING", "HOLDING", "TAKING", "HEALING"]

IDLE, WAITING, HOLDING, TAKING, HEALING = range(5)
_STATE = 7  # (the state's bits in a state word; the rest counts the changes)
ENTRIES = 256  # processes that can say what they hold (then "unnamed")
TABLE_BYTES = ENTRIES * 24  # [pid, start time, state word] per entry
HEAL_PAUSE = 0.01  # seconds between the two looks of a heal
CLAIM_WAIT = 1.0  # seconds to wait for the claim lock (then go on: its holder was killed)

_LEDGERS: weakref.WeakSet[Ledger] = weakref.WeakSet()


class Ledger:
    """The slot ledger of one bounded queue, as seen by one process (see the module doc)."""

    def __init__(
        self,
        region: Region,
        maxsize: int,
        free: SemLock,
        claim: SemLock,
        unnamed: SemLock,
    ) -> None:
        self._table = region.data(0, TABLE_BYTES).cast("q")
        self._maxsize = maxsize
        self._free = free
        self._claim_lock = claim
        self._unnamed = unnamed
        self._word = -1  # index of this process's state word; -1: none yet, -2: unnamed
        self._seq = 0  # (a multiple of 8: the state is the low bits)
        _LEDGERS.add(self)

    def mark(self, state: int) -> None:
        """Say this process is now in *state* (one store in shared memory)."""
        word = self._word
        if word < 0:
            if word == -2:
                return
            word = self._claim()
            if word < 0:
                return
        seq = self._seq + 8
        self._seq = seq
        self._table[word] = seq | state

    def _claim(self) -> int:
        """Write this process in a free entry (or a dead process's); count it unnamed when
        every entry is a live process's."""
        pid, start = _this_process()
        table = self._table
        held = self._claim_lock.acquire(True, CLAIM_WAIT)
        try:
            for reclaim in (False, True):
                for i in range(ENTRIES):
                    other = table[3 * i]
                    if other == 0 or (reclaim and not _alive(other, table[3 * i + 1])):
                        table[3 * i + 2] = IDLE
                        table[3 * i + 1] = start
                        table[3 * i] = pid
                        self._word = 3 * i + 2
                        return self._word
            self._unnamed.release()
            self._word = -2
            return -2
        finally:
            if held:
                self._claim_lock.release()

    def heal(
        self, was: int, socket_empty: Callable[[], bool], items: SemLock, debt: SemLock
    ) -> bool:
        """Give back the slots dead processes hold, if that can be measured now (see the
        module doc); True if any was.  Sleeps ``HEAL_PAUSE`` when the queue looks empty with
        slots missing.  *was*: this process's state, said again after."""
        free = self._free
        if free._get_value() >= self._maxsize or not socket_empty():
            return False
        self.mark(HEALING)
        mine = self._word
        if mine < 0:  # (unnamed: it cannot tell what the others hold)
            return False
        try:
            table = self._table
            first = (bytes(table), free._get_value())
            time.sleep(HEAL_PAUSE)
            if not socket_empty() or (bytes(table), free._get_value()) != first:
                return False  # (something moved: not now)
            if self._unnamed._get_value():
                return False
            holders = 0
            for i in range(ENTRIES):
                pid = table[3 * i]
                state = table[3 * i + 2] & _STATE
                if pid and state in (HOLDING, TAKING, HEALING) and 3 * i + 2 != mine:
                    if _alive(pid, table[3 * i + 1]):
                        if state == HEALING:
                            return False  # (another healer: both give up, look again later)
                        holders += 1
            if holders == 0:  # no message waits, none is on its way: the count is zero
                count = items._get_value() - debt._get_value()
                fix = items if count > 0 else debt
                for _ in range(abs(count)):
                    if not fix.acquire(False):
                        break
            given = 0
            for _ in range(self._maxsize - first[1] - holders):
                try:
                    free.release()
                except ValueError:  # (at maxsize)
                    break
                given += 1
            return given > 0
        finally:
            self.mark(was)


def _forked() -> None:
    """A forked child is another process: it claims an entry of its own when it first uses
    a ledger (the parent's entry stays the parent's)."""
    for ledger in list(_LEDGERS):
        ledger._word = -1
        ledger._seq = 0


os.register_at_fork(after_in_child=_forked)
