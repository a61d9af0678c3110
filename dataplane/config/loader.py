"""The TOML config: load and validate it (dataplane.config.specs plans the result).

Validation reads every table through `dataplane.config.tables.Table` (the [[worker]] tables in
workers.py, the [[transport]] tables in transports.py), which records each key it is asked
for, so an unknown key (a typo) is reported rather than silently ignored.  Every problem names
its key path, the bad value and what is allowed, and all of them are raised together in one
ConfigError so a user fixes a file in one pass.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dataplane.config import consumers as consumer_cfg
from dataplane.config import dut as dut_cfg
from dataplane.config import host as host_cfg
from dataplane.config import limits
from dataplane.config import transports as transport_cfg
from dataplane.config import workers as worker_cfg
from dataplane.config.backends import BACKENDS
from dataplane.config.tables import ConfigError, Problems, Table, checks
from dataplane.config.workers import WorkerTable
from dataplane.host.settings import Host

log = logging.getLogger(__name__)

MBUF_FOOTPRINT = 2560   # bytes per mbuf in the pool: 2048 data + headroom + rte_mbuf + mempool


@dataclass
class Veth:
    name: str
    netns: str
    peer: str
    peer_netns: str
    address: str | None = None        # "10.77.0.1/24": interface address with prefix
    peer_address: str | None = None
    mac: str | None = None
    peer_mac: str | None = None
    mtu: int = 1500


@dataclass
class Lab:
    namespaces: list[str]
    veths: list[Veth]
    ipv6: bool = False     # False: no link-local addresses, DAD or router solicitations to count
    dut: dut_cfg.Dut | None = None     # [lab.dut]: a device under test (config/dut.py)


@dataclass
class Metrics:
    listen: str = "127.0.0.1:9477"
    host: str = "127.0.0.1"
    port: int = 9477
    web_config: str | None = None     # TLS and basic auth: docs/metrics.md
    web: Any = None                   # dataplane.metrics.webconfig.WebConfig, read at load
    max_connections: int = 8          # served at once; more are closed and counted


@dataclass
class ArenaCfg:
    ring_size: int = 4096
    slot_size: int = 2048
    pool_mb: int = 64
    mbufs: int = 8191
    hugepages: str = "auto"


@dataclass
class Config:
    source: str
    metrics: Metrics
    arena: ArenaCfg
    workers: list[WorkerTable]
    lab: Lab | None = None
    host: Host = field(default_factory=Host)
    warnings: list[str] = field(default_factory=list)
    transports: list[transport_cfg.TransportCfg] = field(default_factory=list)
    consumers: list[consumer_cfg.ConsumerCfg] = field(default_factory=list)


def load(path: str | os.PathLike | None = None) -> Config:
    """Read and validate a config file; None: the embedded default lab."""
    if path is None:
        text = resources.files("dataplane").joinpath("default.toml").read_text()
        return loads(text, source="<embedded default.toml>")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror}"]) from None
    return loads(text, source=str(path))


def loads(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"not valid TOML: {e}"]) from None
    return from_data(data, source)


def from_data(data: dict[str, Any], source: str) -> Config:
    """A parsed TOML document -> a checked Config (`dataplane bench` edits one per trial)."""
    p = Problems()
    top = Table(p, "", data)
    lab_table = top.table("lab")        # read even when absent, so "lab" is a known key
    backend = top.get("backend", str, "auto", choices=BACKENDS)   # default of every worker
    lab = _lab(lab_table) if "lab" in data else None
    metrics = _metrics(top.table("metrics"))
    arena = _arena(top.table("arena"))
    host = host_cfg.parse(top.table("host"))
    # a config may only prepare the host ([host] and no workers); otherwise it runs workers
    workers = [worker_cfg.parse(t, backend)
               for t in top.tables("worker", required="host" not in data)]
    transports = [transport_cfg.parse(t) for t in top.tables("transport")]
    transport_cfg.cross_check(transports, workers, p)
    consumers = [consumer_cfg.parse(t) for t in top.tables("consumer")]
    top.close()
    cfg = Config(source, metrics, arena, workers, lab, host, transports=transports,
                 consumers=consumers)
    consumer_cfg.cross_check(consumers, cfg, p)
    _cross_check(cfg, p)
    limits.cross_check(cfg, p)          # names across kinds, the workers' native limits
    if p.errors:
        raise ConfigError(source, p.errors)
    cfg.warnings = p.warnings
    for w in p.warnings:
        log.warning("%s: %s", source, w)
    return cfg


def _lab(t: Table) -> Lab:
    namespaces = t.get("namespaces", list, [], check=checks.names_list)
    veths = []
    for v in t.tables("veth"):
        veths.append(Veth(
            name=v.get("name", str, check=checks.ifname), netns=v.get("netns", str),
            peer=v.get("peer", str, check=checks.ifname), peer_netns=v.get("peer_netns", str),
            address=v.get("address", str, None, check=checks.ip_interface),
            peer_address=v.get("peer_address", str, None, check=checks.ip_interface),
            mac=v.get("mac", str, None, check=checks.mac),
            peer_mac=v.get("peer_mac", str, None, check=checks.mac),
            mtu=v.get("mtu", int, 1500, check=checks.between(68, 65535))))
        for k in ("netns", "peer_netns"):
            ns = getattr(veths[-1], k)
            if ns is not None and ns not in namespaces:
                v.error(k, ns, f"expected one of lab.namespaces ({', '.join(namespaces)})")
    lab = Lab(namespaces, veths, t.get("ipv6", bool, False))
    dut = t.table("dut")        # read even when absent, so "dut" is a known key
    if "dut" in t.data:
        lab.dut = dut_cfg.parse(dut, namespaces, veths)
    t.close()
    return lab


def _metrics(t: Table) -> Metrics:
    listen = t.get("listen", str, Metrics.listen, check=checks.host_port)
    web_config = t.get("web_config", str, None)
    max_connections = t.get("max_connections", int, Metrics.max_connections,
                            check=checks.between(1, 1024))
    t.close()
    web = None
    if web_config is not None:
        from dataplane.metrics import webconfig  # here: only a config that names one pays
        try:
            web = webconfig.load(web_config)
        except ConfigError as e:
            for problem in e.problems:
                t.error("web_config", web_config, problem)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost") and not (web and web.authenticates):
        t.p.warning(f"metrics.listen = \"{listen}\": not loopback; anyone who can reach it "
                    "reads the counters (metrics.web_config can require a password or a "
                    "client certificate)")
    if web and web.users and web.tls is None:
        t.p.warning(f"metrics.web_config = \"{web_config}\": basic auth without TLS sends "
                    "the password in clear")
    return Metrics(listen, host, int(port), web_config, web, max_connections)


def _arena(t: Table) -> ArenaCfg:
    a = ArenaCfg(
        ring_size=t.get("ring_size", int, 4096, check=checks.power_of_two(64, 1 << 20)),
        slot_size=t.get("slot_size", int, 2048, check=checks.multiple_of(64, 64, 16384)),
        pool_mb=t.get("pool_mb", int, 64, check=checks.multiple_of(2, 2, 65536)),
        mbufs=t.get("mbufs", int, 8191, check=checks.between(512, 1 << 24)),
        hugepages=t.get("hugepages", str, "auto", choices=("auto", "yes", "no")))
    if a.mbufs * MBUF_FOOTPRINT > a.pool_mb << 20:
        t.error("mbufs", a.mbufs, f"needs about {a.mbufs * MBUF_FOOTPRINT >> 20} MB, more than "
                f"pool_mb = {a.pool_mb}; raise pool_mb or lower mbufs")
    t.close()
    return a


def _cross_check(cfg: Config, p: Problems) -> None:
    """Checks that span tables: names, references between them, shared cores and sockets."""
    from dataplane._native import lib
    p.unique("worker", [w.name for w in cfg.workers], "name")
    cores: dict[int, str] = {}
    servers: dict[str, str] = {}
    lab_ns = cfg.lab.namespaces if cfg.lab else []
    for i, w in enumerate(cfg.workers):
        where = f"worker[{i}]"
        p.unique(f"{where}.port", [pt.name for pt in w.ports], "name")
        if len(w.ports) > lib.DP_MAX_PORTS:
            p.error(f"{where}.port: {len(w.ports)} ports; at most {lib.DP_MAX_PORTS} per worker")
        if sum(pt.queues for pt in w.ports) > lib.DP_MAX_RINGS:
            p.error(f"{where}.port: {sum(pt.queues for pt in w.ports)} queues in all; at most "
                    f"{lib.DP_MAX_RINGS} per worker (one ring each)")
        if w.core is not None:
            if w.core in cores:
                p.warning(f"{where}.core = {w.core}: also the core of worker "
                          f"\"{cores[w.core]}\"; two poll loops on one core halve each other")
            cores.setdefault(w.core, w.name)
        if w.netns and w.netns not in lab_ns:
            p.warning(f"{where}.netns = \"{w.netns}\": not one of lab.namespaces; it must exist "
                      "before run")
        for j, pt in enumerate(w.ports):
            if pt.driver == "memif" and pt.role == "server" and pt.socket:
                if pt.socket in servers:
                    p.error(f"{where}.port[{j}].socket = \"{pt.socket}\": already served by "
                            f"{servers[pt.socket]}; one server per socket")
                servers[pt.socket] = f"{where}.port[{j}]"
        g = w.generate
        if g is not None:   # ids as the plan gives them: a first stream without one is i + 1
            ids = [s.stream or i + 1 for s in g.streams]
            for sid in sorted({x for x in ids if ids.count(x) > 1}):
                p.error(f"{where}.generate: stream id {sid} is used by {ids.count(sid)} of its "
                        "streams (the first one's default is the worker's index + 1); each "
                        "stream's trailers need their own")
        if g is not None and g.port is not None:
            names = [pt.name for pt in w.ports]
            if g.port not in names:
                p.error(f"{where}.generate.port = \"{g.port}\": expected one of this worker's "
                        f"ports ({', '.join(str(n) for n in names)})")
            if g.size > cfg.arena.slot_size:
                p.warning(f"{where}.generate.size = {g.size}: larger than arena.slot_size = "
                          f"{cfg.arena.slot_size}; receivers in copy mode will truncate")
