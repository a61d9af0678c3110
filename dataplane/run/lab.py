"""The veth/netns lab: create and remove exactly the namespaces and links a config names.

Everything goes through the `ip` command with argv lists (never a shell), and every change is
made by name, inside the lab's own namespaces: `up` creates each veth pair directly in its
namespaces (no transient link on the host), `down` deletes only the names the config lists, so
it also cleans up after a crash.  Both are idempotent.  Sysctls are written inside a lab
namespace only (`ip netns exec NS sysctl`), never on the host.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from dataplane.config.loader import Config, Lab, Veth
from dataplane.host.proc import poll
from dataplane.run import dut
from dataplane.run.lock import RUN_LOCK, HostLock

log = logging.getLogger(__name__)
NETNS_DIR = Path("/run/netns")     # where `ip netns add` bind-mounts a namespace


class LabError(RuntimeError):
    """An `ip` command failed: carries the command and what it printed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS...`; raise LabError with the command and stderr when it fails."""
    return _run(["ip", *args], check)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    log.debug("run: %s", " ".join(argv))
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link(name: str, netns: str) -> dict[str, Any] | None:
    """`ip -j addr show dev NAME` inside netns: the link's JSON, or None if it is not there."""
    if not netns_exists(netns):
        return None
    res = ip("-n", netns, "-j", "addr", "show", "dev", name, check=False)
    if res.returncode != 0:
        return None
    found = json.loads(res.stdout or "[]")
    return found[0] if found else None


def _ends(v: Veth) -> list[tuple[str, str, str | None, str | None]]:
    return [(v.name, v.netns, v.address, v.mac), (v.peer, v.peer_netns, v.peer_address,
                                                  v.peer_mac)]


def _lab(cfg: Config) -> Lab:
    if cfg.lab is None:
        raise LabError(f"{cfg.source}: no [lab] table: this config has no lab to bring up or down")
    return cfg.lab


def up(cfg: Config) -> None:
    """Create the lab's namespaces and veth pairs, address them and bring them up.  Idempotent.
    Refused (lock.Locked) while another process runs: its lab is not ours to change."""
    lab = _lab(cfg)
    with HostLock(RUN_LOCK, "dataplane lab up", cfg.source):
        _up(lab)


def _up(lab: Lab) -> None:
    for ns in lab.namespaces:
        if not netns_exists(ns):
            log.info("netns add %s", ns)
            ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "dev", "lo", "up")
    for v in lab.veths:
        if link(v.name, v.netns) is None:
            log.info("veth %s (%s) <-> %s (%s)", v.name, v.netns, v.peer, v.peer_netns)
            ip("link", "add", "name", v.name, "netns", v.netns, "type", "veth",
               "peer", "name", v.peer, "netns", v.peer_netns)
        for name, ns, address, mac in _ends(v):
            if not lab.ipv6:
                # Before the link goes up, so it never gets a link-local address or sends DAD.
                _sysctl(ns, f"net.ipv6.conf.{name}.disable_ipv6", "1")
            ip("-n", ns, "link", "set", "dev", name, "mtu", str(v.mtu))
            if mac:
                ip("-n", ns, "link", "set", "dev", name, "address", mac)
            if address:
                ip("-n", ns, "addr", "replace", address, "dev", name)   # replace: idempotent
            ip("-n", ns, "link", "set", "dev", name, "up")
    for v in lab.veths:
        for name, ns, _, _ in _ends(v):
            # A veth reports UP once both ends are up; wait, so traffic can flow on return.
            poll(lambda n=name, s=ns: (link(n, s) or {}).get("operstate") == "UP",
                 what=f"{name} in {ns} to come up")
    dut.up(lab)      # [lab.dut]: forwarding, bridge or command, once its links are up


def down(cfg: Config) -> None:
    """Delete the lab's veth pairs and namespaces, by name only.  Idempotent; safe after a crash.
    Refused (lock.Locked) while another process runs: it would lose its links mid-run."""
    lab = _lab(cfg)
    with HostLock(RUN_LOCK, "dataplane lab down", cfg.source):
        _down(lab)


def _down(lab: Lab) -> None:
    dut.down(lab)    # its processes first: a namespace with processes in it outlives `netns del`
    for v in lab.veths:
        for name, ns, _, _ in _ends(v):
            if link(name, ns) is not None:     # deleting one end deletes its peer too
                log.info("link del %s (%s)", name, ns)
                ip("-n", ns, "link", "del", "dev", name)
    for ns in lab.namespaces:
        if netns_exists(ns):
            log.info("netns del %s", ns)
            ip("netns", "del", ns)
    poll(lambda: not any(netns_exists(ns) for ns in lab.namespaces), what="namespaces to go")


def exists(cfg: Config) -> bool:
    """True when every namespace and link of the lab is there, and its DUT is set up."""
    st = status(cfg)
    return (all(st["namespaces"].values()) and all(lk["present"] for lk in st["links"])
            and (st["dut"] is None or st["dut"]["present"]))


def built(cfg: Config) -> bool:
    """True when any namespace of the lab is there: someone made it (a DUT command that exited
    leaves it built, not up), so whoever brings it up now did not make it and must not take it
    down."""
    return any(netns_exists(ns) for ns in _lab(cfg).namespaces)


def bring_up(cfg: Config) -> bool:
    """Up when not already up (idempotent: also restarts a DUT command that exited); True when
    this call made the lab, which is then its caller's to take down.  A failed up takes down
    what it made."""
    if exists(cfg):
        return False
    made = not built(cfg)
    try:
        up(cfg)
    except BaseException:
        if made:
            down(cfg)
        raise
    return made


def status(cfg: Config) -> dict[str, Any]:
    """What of the lab is there: namespaces by name, and each link's state and addresses."""
    lab = _lab(cfg)
    links = []
    for v in lab.veths:
        for name, ns, _, _ in _ends(v):
            j = link(name, ns)
            addrs = [f"{a['local']}/{a['prefixlen']}" for a in (j or {}).get("addr_info", [])]
            links.append({"name": name, "netns": ns, "present": j is not None,
                          "state": (j or {}).get("operstate", "absent"), "addresses": addrs,
                          "mac": (j or {}).get("address", "")})
    return {"namespaces": {ns: netns_exists(ns) for ns in lab.namespaces}, "links": links,
            "dut": dut.status(lab)}


def _sysctl(netns: str, key: str, value: str) -> None:
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}"])
