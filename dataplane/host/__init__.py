"""The host control plane: changes to the machine (hugepages, NIC binding, sysctl, qdisc),
each one planned, journaled before it is made, and undone by `down`.

A change is a small object (see `Change`); `dataplane.host.plan` builds the list for a config;
`apply()` journals and makes them; `undo()` reverses a journal newest first.  Every kind of
change registers how to undo its journal entries in UNDO, so a journal written by a killed `up`
can be undone by a fresh process that has only the entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dataplane.host.journal import Journal, JournalError

log = logging.getLogger("dataplane.host")

__all__ = ["Change", "Journal", "JournalError", "UNDO", "apply", "undo", "PlanLine"]


@dataclass
class PlanLine:
    what: str        # "sysctl net.core.rmem_max", "bind 0000:00:03.0", ...
    current: str
    desired: str
    note: str = ""   # why, or what is missing

    def __str__(self) -> str:
        same = self.current == self.desired
        arrow = "(no change)" if same else f"{self.current} -> {self.desired}"
        return f"{self.what}: {arrow}" + (f"  [{self.note}]" if self.note else "")


class Change(Protocol):
    kind: str

    def describe(self) -> PlanLine:
        """What it would change, read from the host now; changes nothing."""

    def needed(self) -> bool:
        """False when the host already has the desired state."""

    def journal_entry(self) -> dict[str, Any]:
        """What undo needs (the old value), read now; recorded before apply()."""

    def apply(self) -> None:
        """Make the change; raise with a clear message if the host refuses."""


# kind -> function that undoes one journal entry (idempotent: undoing twice is harmless)
UNDO: dict[str, Callable[[dict[str, Any]], None]] = {}


def apply(changes: list[Change], journal: Journal) -> list[str]:
    """Journal then make each needed change, in order.  Returns a line per change made.
    On failure the changes already made stay journaled: `down` undoes them."""
    done = []
    for c in changes:
        if not c.needed():
            continue
        line = str(c.describe())          # before: afterwards current == desired
        entry = {"kind": c.kind, **c.journal_entry()}
        journal.record(entry)
        c.apply()
        done.append(f"applied {line}")
        log.debug("applied %s", line)
    return done


def undo(journal: Journal) -> list[str]:
    """Undo every journaled change, newest first; each entry leaves the journal once undone."""
    done = []
    while journal.entries:
        e = journal.entries[-1]
        fn = UNDO.get(e["kind"])
        if fn is None:
            raise JournalError(f"{journal.path}: an entry of kind {e['kind']!r} that this "
                               "dataplane cannot undo; undo it by hand, then remove the entry")
        fn(e)
        journal.drop_last()
        done.append(f"undone {e['kind']} {e.get('key', '')}".rstrip())
        log.debug("undone %s", e)
    return done
