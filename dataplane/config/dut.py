"""[lab.dut]: a device under test between the generator and the receiver (docs/lab.md).

    [lab.dut]
    netns = "dpr-dut"        # one of lab.namespaces: the DUT's own namespace
    mode = "router"          # router | bridge | command
    ingress = "dutin0"       # the DUT's end of the veth toward the generator
    egress = "dutout0"       # the DUT's end of the veth toward the receiver
    # bridge = "dutbr0"      # mode = "bridge": the bridge the lab makes of ingress and egress
    # command = ["..."]      # mode = "command": argv started in netns at up, stopped at down

Both ends are `[[lab.veth]]` ends that live in `netns`; their peers (the "far" ends) live in
other namespaces of the lab.  A router needs addresses on all four ends and the MACs of the far
ends, because the lab writes permanent neighbour entries: a receiver that takes every frame
(af_xdp) never answers ARP, so the router could not resolve it otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dataplane.config.tables import Table, checks

if TYPE_CHECKING:
    from dataplane.config.loader import Veth

MODES = ("router", "bridge", "command")


@dataclass
class DutEnd:
    """One side of the DUT: its interface in the DUT namespace and the veth end facing it."""
    name: str
    address: str | None
    mac: str | None
    far: str
    far_netns: str
    far_address: str | None
    far_mac: str | None


@dataclass
class Dut:
    netns: str
    mode: str
    ingress: DutEnd
    egress: DutEnd
    bridge: str | None = None
    command: list[str] = field(default_factory=list)


def _command(v: list) -> str | None:
    ok = 0 < len(v) <= 256 and all(isinstance(x, str) and x and "\0" not in x for x in v)
    return None if ok else "expected an argv list of 1..256 non-empty strings"


def _end(t: Table, key: str, netns: str, veths: list[Veth]) -> DutEnd | None:
    name = t.get(key, str, check=checks.ifname)
    if name is None:
        return None
    for v in veths:
        ends = [(v.name, v.netns, v.address, v.mac, v.peer, v.peer_netns, v.peer_address,
                 v.peer_mac),
                (v.peer, v.peer_netns, v.peer_address, v.peer_mac, v.name, v.netns, v.address,
                 v.mac)]
        for end, ns, addr, mac, far, far_ns, far_addr, far_mac in ends:
            if end != name or ns != netns:
                continue
            if far_ns == netns:
                t.error(key, name, f"its peer {far} is in {netns} too; one end of each DUT veth "
                        "lives outside the DUT")
                return None
            return DutEnd(name, addr, mac, far, far_ns, far_addr, far_mac)
    t.error(key, name, f"expected a [[lab.veth]] end (name or peer) in netns \"{netns}\"")
    return None


def parse(t: Table, namespaces: list[str], veths: list[Veth]) -> Dut | None:
    """The [lab.dut] table, checked against the lab's namespaces and veths; None when wrong."""
    netns = t.get("netns", str, check=checks.name)
    mode = t.get("mode", str, choices=MODES)
    if netns is not None and netns not in namespaces:
        t.error("netns", netns, f"expected one of lab.namespaces ({', '.join(namespaces)})")
        netns = None
    ingress = _end(t, "ingress", netns, veths) if netns else None
    egress = _end(t, "egress", netns, veths) if netns else None
    bridge = command = None
    if mode == "bridge":
        bridge = t.get("bridge", str, check=checks.ifname)
    else:
        t.refuse("bridge", 'only with mode = "bridge"')
    if mode == "command":
        command = t.get("command", list, check=_command)
    else:
        t.refuse("command", 'only with mode = "command"')
    t.close()
    if ingress and egress and ingress.name == egress.name:
        t.error("egress", egress.name, "the same interface as ingress; the DUT needs two")
        return None
    if ingress is None or egress is None or mode is None or netns is None:
        return None
    if mode == "router":
        _check_router(t, ingress, egress)
    if bridge is not None and bridge in (ingress.name, egress.name):
        t.error("bridge", bridge, "the name of one of the DUT's veth ends")
    return Dut(netns, mode, ingress, egress, bridge, command or [])


def _check_router(t: Table, ingress: DutEnd, egress: DutEnd) -> None:
    """A router forwards between two subnets: every end addressed, the far ends' MACs known."""
    nets = []
    for key, e in (("ingress", ingress), ("egress", egress)):
        missing = [what for what, v in ((f"address of {e.name}", e.address),
                                        (f"address of {e.far}", e.far_address),
                                        (f"mac of {e.far}", e.far_mac)) if v is None]
        if missing:
            t.error(key, e.name, f'mode = "router" needs the {", ".join(missing)} in its '
                    "[[lab.veth]] table (the lab routes and writes neighbour entries with them)")
            return
        net = ipaddress.ip_interface(e.address).network
        if ipaddress.ip_address(e.far_address.split("/")[0]) not in net:
            t.error(key, e.name, f"{e.far}'s address {e.far_address} is not in {e.name}'s "
                    f"subnet {net}")
            return
        nets.append(net)
    if nets[0].version != nets[1].version or nets[0].overlaps(nets[1]):
        t.error("egress", egress.name, f"subnets {nets[0]} and {nets[1]}: a router needs two "
                "separate subnets of one IP version")
