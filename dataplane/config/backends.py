"""Which native worker runs a configured worker: "dpdk" (EAL and its PMDs) or "uring"
(io_uring over sockets the worker opens itself, no DPDK).  `backend = "auto"` picks DPDK where it
can run and otherwise io_uring, and records why, so `dataplane config show` and the log say it.

Real reasons only: a UDP port (DPDK has no UDP-socket PMD) needs uring; af_xdp, memif and PCI
need DPDK; af_packet runs on both and goes to DPDK when its PMD plugin is installed.  An install
built without the DPDK worker (no libdpdk at build time, or DATAPLANE_DPDK=0) runs everything it
can on uring, and a worker that needs DPDK there is a config error.
"""

from __future__ import annotations

import importlib.util
import logging
from glob import glob
from pathlib import Path

from dataplane.config.tables import Table

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


# Why "dpdk" cannot run in an install without the DPDK worker, for config errors and reasons.
NO_DPDK_WORKER = ("this install has no DPDK worker (the extension dataplane._dpdk is built only "
                  "where pkg-config finds libdpdk, and not with DATAPLANE_DPDK=0)")


def dpdk_worker_built() -> bool:
    """Whether this install carries the DPDK worker, dataplane._dpdk.  Looked up, not imported:
    importing it loads libdpdk, which only the worker process needs."""
    return importlib.util.find_spec("dataplane._dpdk") is not None


def dpdk_pmds_missing(drivers: list[str], pmd_dirs: str = PMD_DIRS) -> list[str]:
    """The DPDK PMD plugins these drivers need that no pmds directory holds ([] = all there)."""
    dirs = [Path(d) for d in glob(pmd_dirs)]
    return [PMD_FILES[d] for d in sorted(set(drivers)) if d in PMD_FILES and
            not any((x / PMD_FILES[d]).exists() for x in dirs)]


def resolve(t: Table, worker: str, backend: str, ports: list[tuple[str, str | None]],
            gen_port: str | None) -> tuple[str, str]:
    """The backend of a worker (name, configured backend, its ports as (name, driver), the port
    it generates on) and why: resolves "auto" to dpdk or uring, refuses drivers it cannot run.
    Plain values in, so this module needs nothing from the [[worker]] table's module."""
    only = {b: [(n, d) for n, d in ports if d and DRIVER_BACKENDS[d] == (b,)]
            for b in ("dpdk", "uring")}
    if only["dpdk"] and only["uring"]:
        (un, ud), (dn, dd) = only["uring"][0], only["dpdk"][0]
        t.error("port", None, f'driver {ud} (port "{un}") needs backend "uring" and driver '
                f'{dd} (port "{dn}") needs "dpdk": put them in separate workers')
        return backend, ""
    if backend != "auto":
        other = "uring" if backend == "dpdk" else "dpdk"
        if only[other]:
            name, driver = only[other][0]
            why = " (DPDK has no UDP-socket PMD)" if driver == "udp" else ""
            t.error("backend", backend, f'port "{name}" has driver = "{driver}", which '
                    f'needs backend = "{other}"{why}')
        if backend == "dpdk" and not dpdk_worker_built():
            t.error("backend", backend, f'{NO_DPDK_WORKER}: use backend = "uring" or "auto"')
        return backend, "set in the config"
    if only["uring"]:
        backend, reason = "uring", (f'port "{only["uring"][0][0]}" is driver = "udp": DPDK has '
                                    "no UDP-socket PMD")
    elif only["dpdk"]:
        backend, reason = "dpdk", f'port "{only["dpdk"][0][0]}" is driver = "{only["dpdk"][0][1]}"'
        if not dpdk_worker_built():
            t.error("port", None, f'driver {only["dpdk"][0][1]} (port "{only["dpdk"][0][0]}") '
                    f'needs backend "dpdk", and {NO_DPDK_WORKER}')
    elif not dpdk_worker_built():
        backend, reason = "uring", NO_DPDK_WORKER
    else:
        missing = dpdk_pmds_missing([d for _, d in ports if d], PMD_DIRS)
        if missing:
            backend, reason = "uring", (f"DPDK PMD {', '.join(missing)} not found in {PMD_DIRS} "
                                        "(libdpdk not installed?)")
        else:
            backend, reason = "dpdk", "DPDK and its af_packet PMD are installed"
    gen = [d for n, d in ports if gen_port is not None and n == gen_port][:1]
    if backend == "uring" and gen and gen[0] != "af_packet":
        t.error("generate.port", gen_port, 'backend "uring" generates on an af_packet port only')
    if backend == "uring":
        log.warning('worker "%s": backend auto -> uring: %s', worker, reason)
    else:
        log.info('worker "%s": backend auto -> dpdk: %s', worker, reason)
    return backend, reason
