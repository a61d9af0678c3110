"""The one place that turns a config's [host] table into the ordered list of host changes.

Order matters and is the reverse of what `down` does: pages before the mount that uses them,
NICs bound before the dataplane starts, tuning last.
"""

from __future__ import annotations

from dataplane.host import Change, PlanLine


def host_changes(cfg) -> list[Change]:
    from dataplane.host import hugepages, nic, profile

    h = cfg.host
    changes: list[Change] = []
    for hp in h.hugepages:
        changes.append(hugepages.Reserve(hp.size_kb, hp.count, hp.node))
    for hp in h.hugepages:
        if hp.mount:
            changes.append(hugepages.Mount(hp.mount, hp.size))
    for b in h.bind:
        changes.append(nic.BindDevice(b))
    if h.profile:
        changes += profile.profile_changes(profile.load_profile(h.profile), h.fq_interfaces)
    return changes


def plan_lines(cfg) -> list[PlanLine]:
    """What `up` would do, current -> desired, read from the host now.  Changes nothing."""
    return [c.describe() for c in host_changes(cfg)]
