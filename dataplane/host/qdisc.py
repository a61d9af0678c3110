"""The root qdisc of an interface, as `tc qdisc replace dev eth1 root fq` sets it.

`net.core.default_qdisc` only affects qdiscs the kernel attaches from then on (new interfaces,
or a root qdisc deleted); an interface that is already up keeps what it has.  So the profile's
`fq` is also put on each configured interface here, and taken off by `down`.

Only a kernel-attached default root qdisc (handle 0:, e.g. noqueue on veth, pfifo_fast, mq) is
replaced.  Undo is `tc qdisc del dev IFACE root`, after which the kernel attaches its default
again: the same one, provided net.core.default_qdisc is what it was (so `profile_changes` puts
the default_qdisc sysctl *after* the interfaces: undone first, newest first).  A root qdisc an
operator configured (handle != 0:, maybe with classes and filters that a replace would destroy
and this module could not rebuild) is left alone and reported as the reason.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from dataplane.host import UNDO, PlanLine
from dataplane.host.sysctl import TuningError, qdisc_problem


def tc(args: list[str], netns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["tc"] + (["-n", netns] if netns else []) + args
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def show(iface: str, netns: str | None = None) -> list[dict[str, Any]] | None:
    """`tc -j qdisc show dev IFACE` as a list, or None when the interface does not exist."""
    r = tc(["-j", "qdisc", "show", "dev", iface], netns)
    if r.returncode != 0:
        if "Cannot find device" in r.stderr:
            return None
        raise TuningError(f"tc qdisc show dev {iface}: {r.stderr.strip()}")
    return json.loads(r.stdout or "[]")


def root(qdiscs: list[dict[str, Any]]) -> dict[str, Any]:
    return next((q for q in qdiscs if q.get("root")), {"kind": "noop", "handle": "0:"})


def shape(qdiscs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a round trip must preserve: kinds and parameters, not the handles the kernel
    numbers afresh (mq's children are ':1'..':n' under 0: and '8001:1'.. under 8001:)."""
    return [{"kind": q["kind"], "root": bool(q.get("root")), "options": q.get("options", {})}
            for q in qdiscs]


def where(iface: str, netns: str | None) -> str:
    return f"{iface} (netns {netns})" if netns else iface


class RootQdisc:
    """The root qdisc of one interface set to `qdisc` (default fq)."""

    kind = "qdisc"

    def __init__(self, iface: str, qdisc: str = "fq", netns: str | None = None):
        self.iface, self.qdisc, self.netns = iface, qdisc, netns

    def __repr__(self) -> str:
        return f"RootQdisc({self.iface!r}, {self.qdisc!r}, netns={self.netns!r})"

    def problem(self) -> str:
        qs = show(self.iface, self.netns)
        if qs is None:
            return f"no interface {where(self.iface, self.netns)}"
        if (why := qdisc_problem(self.qdisc)):
            return why
        r = root(qs)
        if r["kind"] != self.qdisc and r.get("handle") != "0:":
            return (f"{where(self.iface, self.netns)} has root qdisc {r['kind']} "
                    f"{r.get('handle')} set up by someone else; replacing it would destroy its "
                    "classes and filters, which down could not rebuild: remove it (tc qdisc del "
                    f"dev {self.iface} root) or leave {self.iface} out of fq_interfaces")
        return ""

    def describe(self) -> PlanLine:
        qs = show(self.iface, self.netns)
        current = root(qs)["kind"] if qs is not None else "(no interface)"
        return PlanLine(f"qdisc {where(self.iface, self.netns)} root", current, self.qdisc,
                        self.problem())

    def needed(self) -> bool:
        qs = show(self.iface, self.netns)
        return qs is None or root(qs)["kind"] != self.qdisc

    def journal_entry(self) -> dict[str, Any]:
        qs = show(self.iface, self.netns)
        if qs is None:
            raise TuningError(f"no interface {where(self.iface, self.netns)}")
        return {"key": self.iface, "netns": self.netns, "old": shape(qs)}

    def apply(self) -> None:
        if (why := self.problem()):
            raise TuningError(why)
        r = tc(["qdisc", "replace", "dev", self.iface, "root", self.qdisc], self.netns)
        if r.returncode != 0:
            raise TuningError(f"tc qdisc replace dev {where(self.iface, self.netns)} root "
                              f"{self.qdisc}: {r.stderr.strip()}")


def undo_qdisc(entry: dict[str, Any]) -> None:
    iface, netns = entry["key"], entry.get("netns")
    qs = show(iface, netns)
    if qs is None or shape(qs) == entry["old"]:
        return      # the interface is gone (its qdisc with it), or it was never changed
    if root(qs).get("handle") != "0:":
        r = tc(["qdisc", "del", "dev", iface, "root"], netns)
        if r.returncode != 0:
            raise TuningError(f"tc qdisc del dev {where(iface, netns)} root: {r.stderr.strip()}")
        qs = show(iface, netns) or []
    if shape(qs) != entry["old"]:
        raise TuningError(
            f"{where(iface, netns)}: the kernel's default root qdisc is now {root(qs)['kind']}, "
            f"it was {entry['old'][0]['kind'] if entry['old'] else 'none'} "
            "(net.core.default_qdisc changed since?); set it back with tc by hand")


UNDO["qdisc"] = undo_qdisc
