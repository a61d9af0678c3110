"""The lab's device under test ([lab.dut], dataplane/config/dut.py): what `lab up` adds once
the veths are up, and what `lab down` stops before the namespaces go.

Everything is made inside the lab's own namespaces, by the names the config lists: the DUT's
forwarding sysctls, neighbour entries and routes live in namespaces `down` deletes, so they go
with them; the bridge is deleted by name; a user's command is every process in the DUT's
namespace (`ip netns pids`), so `down` stops it even after a crash of whoever started it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import tempfile
import time
from typing import Any

from dataplane.config.dut import Dut, DutEnd
from dataplane.config.loader import Lab
from dataplane.host.proc import poll

log = logging.getLogger(__name__)


def up(lab: Lab) -> None:
    """Make the DUT forward between ingress and egress.  Idempotent."""
    from dataplane.run.lab import _sysctl, ip  # lab imports this module: no cycle at load
    d = lab.dut
    if d is None:
        return
    if d.mode == "router":
        _sysctl(d.netns, "net.ipv4.ip_forward", "1")
        if lab.ipv6:
            _sysctl(d.netns, "net.ipv6.conf.all.forwarding", "1")
    if d.mode == "router" or (d.mode == "command" and _routable(d)):
        # a command that routes gets the same neighbours and routes; it forwards by itself
        for e, other in ((d.ingress, d.egress), (d.egress, d.ingress)):
            # the router's side and the far side know each other without ARP (the receiver may
            # take every frame and never answer), and the far side reaches the other subnet
            ip("-n", d.netns, "neigh", "replace", _host(e.far_address), "lladdr", e.far_mac,
               "dev", e.name, "nud", "permanent")
            ip("-n", e.far_netns, "neigh", "replace", _host(e.address), "lladdr",
               _mac(e, d.netns), "dev", e.far, "nud", "permanent")
            ip("-n", e.far_netns, "route", "replace", str(_net(other.address)), "via",
               _host(e.address), "dev", e.far)
    if d.mode == "bridge":
        from dataplane.run.lab import link
        if link(d.bridge, d.netns) is None:
            log.info("bridge %s (%s): %s, %s", d.bridge, d.netns, d.ingress.name, d.egress.name)
            ip("-n", d.netns, "link", "add", "name", d.bridge, "type", "bridge")
        for e in (d.ingress, d.egress):
            ip("-n", d.netns, "link", "set", "dev", e.name, "master", d.bridge)
        ip("-n", d.netns, "link", "set", "dev", d.bridge, "up")
        a, b = d.ingress, d.egress
        if a.far_address and b.far_address and a.far_mac and b.far_mac:
            # the two ends talk through the bridge without ARP, for the same reason
            ip("-n", a.far_netns, "neigh", "replace", _host(b.far_address), "lladdr", b.far_mac,
               "dev", a.far, "nud", "permanent")
            ip("-n", b.far_netns, "neigh", "replace", _host(a.far_address), "lladdr", a.far_mac,
               "dev", b.far, "nud", "permanent")
    if d.mode == "command" and not pids(d.netns):
        _start(d)


def down(lab: Lab) -> None:
    """Stop what runs in the DUT's namespace and delete its bridge.  Idempotent."""
    from dataplane.run.lab import ip, link, netns_exists
    d = lab.dut
    if d is None or not netns_exists(d.netns):
        return
    stop(d.netns)
    if d.mode == "bridge" and link(d.bridge, d.netns) is not None:
        log.info("link del %s (%s)", d.bridge, d.netns)
        ip("-n", d.netns, "link", "del", "dev", d.bridge)


def present(lab: Lab) -> bool:
    """The DUT is set up: its bridge is there, or its command runs."""
    from dataplane.run.lab import link, netns_exists
    d = lab.dut
    if d is None:
        return True
    if not netns_exists(d.netns):
        return False
    if d.mode == "router":
        return True
    if d.mode == "bridge":
        return link(d.bridge, d.netns) is not None
    return bool(pids(d.netns))


def status(lab: Lab) -> dict[str, Any] | None:
    d = lab.dut
    if d is None:
        return None
    return {"netns": d.netns, "mode": d.mode, "ingress": d.ingress.name,
            "egress": d.egress.name, "present": present(lab), "pids": pids(d.netns),
            "counters": counters(d)}


def counters(d: Dut) -> dict[str, dict[str, int]]:
    """The DUT's interface counters (`ip -s -j link`): {"ingress"/"egress": rx_packets,
    rx_dropped, tx_packets, tx_dropped, ...}; {} for an end that is not there."""
    import json

    from dataplane.run.lab import ip, netns_exists
    out: dict[str, dict[str, int]] = {}
    if not netns_exists(d.netns):
        return out
    for side, e in (("ingress", d.ingress), ("egress", d.egress)):
        res = ip("-n", d.netns, "-s", "-j", "link", "show", "dev", e.name, check=False)
        found = json.loads(res.stdout or "[]") if res.returncode == 0 else []
        if found:
            st = found[0].get("stats64", {})
            out[side] = {f"{way}_{k}": int(v) for way in ("rx", "tx")
                         for k, v in st.get(way, {}).items() if isinstance(v, int)}
    return out


def pids(netns: str) -> list[int]:
    from dataplane.run.lab import ip, netns_exists
    if not netns_exists(netns):
        return []
    res = ip("netns", "pids", netns, check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def stop(netns: str, timeout: float = 5.0) -> None:
    """SIGTERM every process in the DUT's namespace, SIGKILL what is left after timeout."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids(netns):
            log.info("DUT %s: %s pid %d", netns, sig.name, pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            poll(lambda: not pids(netns), timeout, interval=0.05, what=f"{netns}'s processes")
            return
        except TimeoutError:
            continue


def _start(d: Dut, grace: float = 0.5) -> None:
    """Start the user's command in the DUT's namespace, detached from us: it outlives `lab up`
    and `down` stops it.  One that exits within `grace` seconds failed: its output is raised."""
    from dataplane.run.lab import LabError
    log.info("DUT %s: starting %s", d.netns, d.command)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", d.netns, *d.command],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
        time.sleep(grace)
        if proc.poll() is not None:
            out.seek(0)
            raise LabError(f"lab.dut.command {d.command} in {d.netns}: exited "
                           f"{proc.returncode} at once: {out.read()[-2000:].strip()}")


def _routable(d: Dut) -> bool:
    """Every end addressed in two subnets and the far MACs known: what a router needs."""
    ends = (d.ingress, d.egress)
    if not all(e.address and e.far_address and e.far_mac for e in ends):
        return False
    return not _net(d.ingress.address).overlaps(_net(d.egress.address))


def _host(address: str | None) -> str:
    return str(ipaddress.ip_interface(address).ip)


def _net(address: str | None) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_interface(address).network


def _mac(e: DutEnd, netns: str) -> str:
    """The DUT end's MAC: as configured, else as the kernel chose it."""
    from dataplane.run.lab import link
    return e.mac or (link(e.name, netns) or {}).get("address", "")
