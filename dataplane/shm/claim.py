"""A ring has one consuming process: it claims the ring in the ring's header (dp_ring.claim).

The claim is one word, the claimant's start time << DP_CLAIM_PID_BITS | its pid, set with a
compare-and-swap (dp_ring_claim, native/core/arena.c): a second process that tries is refused
with the claimant's pid and command line; a dead claimant's claim (no such pid, or the pid now
belongs to a process started at another time) is taken over, said in the log.  Two consumers on
one ring would each release what the other has not read: the worker would overwrite frames
still being read, and each would see about half the packets, silently.

Start times are /proc/PID/stat's field 22 (clock ticks since boot): with the pid they name one
process for the life of the machine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dataplane._native import lib

log = logging.getLogger(__name__)

PID_BITS = int(lib.DP_CLAIM_PID_BITS)
PID_MASK = (1 << PID_BITS) - 1
_ROUNDS = 8     # compare-and-swap races lost in a row before giving up (each means a live rival)


class RingClaimed(RuntimeError):
    """The ring is consumed by another live process."""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields follow the last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def describe(pid: int) -> str:
    """pid and command line, for a message naming a claimant."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f" ({cmd[:120]})" if cmd else "")


def my_claim() -> int:
    pid = os.getpid()
    return (start_time(pid) or 0) << PID_BITS | pid


def holder(word: int) -> int | None:
    """The pid of a live claimant named by a claim word; None when the claim is stale."""
    pid, start = word & PID_MASK, word >> PID_BITS
    return pid if pid and start_time(pid) == start else None


def claim(ring: Any, where: str) -> int:
    """Claim `ring` (a struct dp_ring *) for this process; the claim word.  RingClaimed when
    another live process holds it; a dead one's claim is taken over."""
    mine, expect = my_claim(), 0
    for _ in range(_ROUNDS):
        found = int(lib.dp_ring_claim(ring, expect, mine))
        if found in (expect, mine):
            return mine
        pid = holder(found)
        if pid is not None:
            raise RingClaimed(f"{where} is consumed by {describe(pid)}: a ring has one "
                              "consuming process (stop that one first)")
        log.warning("%s: the claim of pid %d (gone) is taken over by pid %d", where,
                    found & PID_MASK, os.getpid())
        expect = found
    raise RingClaimed(f"{where}: claim contested {_ROUNDS} times in a row; giving up")


def release(ring: Any, word: int) -> None:
    """Give the claim up, if it is still ours."""
    lib.dp_ring_claim(ring, word, 0)
