"""Which native worker runs a configured worker: "dpdk" (EAL and its PMDs) or "uring"
(io_uring over sockets the worker opens itself, no DPDK).  `backend = "auto"` picks DPDK where it
can run and otherwise io_uring, and records why, so `dataplane config show` and the log say it.

Real reasons only: a UDP port (DPDK has no UDP-socket PMD) needs uring; af_xdp, memif and PCI
need DPDK; af_packet runs on both and goes to DPDK when its PMD plugin is installed.
"""

from __future__ import annotations

import logging
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING

from dataplane.config.tables import Table

if TYPE_CHECKING:
    from dataplane.config.workers import Worker

log = logging.getLogger("dataplane.config.loader")

BACKENDS = ("auto", "dpdk", "uring")
# What each driver runs on: af_packet on both; a UDP socket only on io_uring (DPDK has no
# UDP-socket PMD); af_xdp, memif and PCI only through DPDK's PMDs.
DRIVER_BACKENDS = {"af_packet": ("dpdk", "uring"), "af_xdp": ("dpdk",), "memif": ("dpdk",),
                   "pci": ("dpdk",), "udp": ("uring",)}
# The DPDK PMD plugin each vdev driver needs (EAL loads them from the pmds directory).
PMD_FILES = {"af_packet": "librte_net_af_packet.so", "af_xdp": "librte_net_af_xdp.so",
             "memif": "librte_net_memif.so"}
PMD_DIRS = "/usr/lib/*/dpdk/pmds-*"


def dpdk_pmds_missing(drivers: list[str], pmd_dirs: str = PMD_DIRS) -> list[str]:
    """The DPDK PMD plugins these drivers need that no pmds directory holds ([] = all there)."""
    dirs = [Path(d) for d in glob(pmd_dirs)]
    return [PMD_FILES[d] for d in sorted(set(drivers)) if d in PMD_FILES and
            not any((x / PMD_FILES[d]).exists() for x in dirs)]


def resolve(t: Table, w: Worker) -> None:
    """Resolve w.backend ("auto" -> dpdk or uring) and say why; refuse drivers it cannot run."""
    only = {b: [p for p in w.ports if p.driver and DRIVER_BACKENDS[p.driver] == (b,)]
            for b in ("dpdk", "uring")}
    if only["dpdk"] and only["uring"]:
        t.error("port", None, f'driver {only["uring"][0].driver} (port "{only["uring"][0].name}") '
                f'needs backend "uring" and driver {only["dpdk"][0].driver} (port '
                f'"{only["dpdk"][0].name}") needs "dpdk": put them in separate workers')
        return
    if w.backend != "auto":
        other = "uring" if w.backend == "dpdk" else "dpdk"
        if only[other]:
            pt = only[other][0]
            why = " (DPDK has no UDP-socket PMD)" if pt.driver == "udp" else ""
            t.error("backend", w.backend, f'port "{pt.name}" has driver = "{pt.driver}", which '
                    f'needs backend = "{other}"{why}')
        w.backend_reason = "set in the config"
        return
    if only["uring"]:
        w.backend = "uring"
        w.backend_reason = (f'port "{only["uring"][0].name}" is driver = "udp": DPDK has no '
                            "UDP-socket PMD")
    elif only["dpdk"]:
        w.backend = "dpdk"
        w.backend_reason = f'port "{only["dpdk"][0].name}" is driver = "{only["dpdk"][0].driver}"'
    else:
        missing = dpdk_pmds_missing([p.driver for p in w.ports], PMD_DIRS)
        if missing:
            w.backend = "uring"
            w.backend_reason = (f"DPDK PMD {', '.join(missing)} not found in {PMD_DIRS} "
                                "(libdpdk not installed?)")
        else:
            w.backend = "dpdk"
            w.backend_reason = "DPDK and its af_packet PMD are installed"
    g = w.generate
    gp = next((p for p in w.ports if g is not None and p.name == g.port), None)
    if w.backend == "uring" and gp is not None and gp.driver != "af_packet":
        t.error("generate.port", gp.name, 'backend "uring" generates on an af_packet port only')
    if w.backend == "uring":
        log.warning('worker "%s": backend auto -> uring: %s', w.name, w.backend_reason)
    else:
        log.info('worker "%s": backend auto -> dpdk: %s', w.name, w.backend_reason)
