"""The one place that turns a config's [host] table into the ordered list of host changes.

Order matters and `down` undoes it newest first: pages before the mount that uses them, NICs
bound before the dataplane starts, tuning last.  Importing this module also imports every kind
of change, so each registers how to undo its journal entries (host.UNDO) before any undo runs.
"""

from __future__ import annotations

from dataplane.host import Change, PlanLine, hugepages, nic, profile


def host_changes(cfg) -> list[Change]:
    h = cfg.host
    changes: list[Change] = list(hugepages.hugepage_changes(h.hugepages))
    changes += [nic.BindDevice(b) for b in h.bind]
    if h.profile:
        changes += profile.profile_changes(profile.load_profile(h.profile), h.fq_interfaces)
    return changes


def problems(changes: list[Change]) -> list[str]:
    """What stops `up` before anything is changed (each change's own problem(), if any)."""
    return profile.problems(changes)


def plan_lines(cfg) -> list[PlanLine]:
    """What `up` would do, current -> desired, read from the host now.  Changes nothing."""
    return [c.describe() for c in host_changes(cfg)]
