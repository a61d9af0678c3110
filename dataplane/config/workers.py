"""The [[worker]] tables of a config: a worker's ports (one PMD or socket each) and its
generator, validated key by key (dataplane/config/loader.py loads the file and plans the result).

    [[worker]]
    name = "rx"
    core = 1
    netns = "dp-rx"
      [[worker.port]]
      name = "in"
      driver = "af_xdp"            # af_packet | af_xdp (iface); memif (role, socket, id);
      iface = "dprx0"              # pci (pci); udp (udp_port)
      [worker.generate]            # optional: replay a scapy-built template at a rate
      port = "in"
        [[worker.generate.streams]] # optional: more streams (dataplane/config/streams.py)
        stream = 20
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dataplane._native import lib
from dataplane.config import streams
from dataplane.config.backends import BACKENDS, resolve
from dataplane.config.tables import Table, checks
from dataplane.host.settings import normalise_pci

DRIVERS = ("af_packet", "af_xdp", "memif", "pci", "udp")
DRIVER_KEYS = {"af_packet": ("iface",), "af_xdp": ("iface",), "memif": ("role", "socket", "id"),
               "pci": ("pci",), "udp": ("udp_port",)}
RUN_DIR = Path("/run/dataplane")        # 0700: memif sockets live here unless a config says not


@dataclass
class Port:
    name: str
    driver: str
    queues: int = 1
    iface: str | None = None
    pci: str | None = None
    role: str = "server"
    socket: str | None = None
    id: int = 0
    udp_port: int | None = None


@dataclass
class Generate:
    port: str
    burst: int = 32
    checksum: bool = True
    streams: list[streams.Stream] = field(default_factory=list)   # the first is the table's own

    @property
    def size(self) -> int:
        """The largest frame of any stream."""
        return max(s.size for s in self.streams)


@dataclass
class WorkerTable:
    name: str
    ports: list[Port]
    core: int | None = None
    netns: str | None = None
    poll: str = "busy"
    idle_sleep_us: int = 0
    zero_copy: bool = True
    copybreak: int = 256
    burst: int = 32
    generate: Generate | None = None
    backend: str = "auto"         # parse() resolves "auto" (backends.resolve)
    backend_reason: str = ""


def _port(t: Table) -> Port:
    p = Port(
        name=t.get("name", str, check=checks.label),
        driver=t.get("driver", str, choices=DRIVERS),
        queues=t.get("queues", int, 1, check=checks.between(1, 16)),
        iface=t.get("iface", str, None, check=checks.ifname),
        pci=t.get("pci", str, None, check=checks.pci),
        role=t.get("role", str, "server", choices=("server", "client")),
        socket=t.get("socket", str, None, check=checks.socket_path),
        id=t.get("id", int, 0, check=checks.between(0, 255)),
        udp_port=t.get("udp_port", int, None, check=checks.between(1, 65535)))
    # Each driver takes some keys and refuses the others, so a misplaced key is not ignored.
    wants = DRIVER_KEYS.get(p.driver or "", ())
    for key in ("iface", "pci", "udp_port"):
        if key in wants and key not in t.data:
            t.error(key, None, f'missing; driver = "{p.driver}" needs it')
    for key in ("iface", "pci", "role", "socket", "id", "udp_port"):
        if p.driver and key in t.data and key not in wants:
            owners = [d for d, keys in DRIVER_KEYS.items() if key in keys]
            t.error(key, t.data[key], f"only for driver = {' or '.join(owners)}, not {p.driver}")
    if p.pci:
        p.pci = normalise_pci(p.pci)            # DPDK names a PCI port with its domain
    if p.driver == "memif" and p.socket is None:
        p.socket = str(RUN_DIR / "memif.sock")
    t.close()
    return p


def _generate(t: Table) -> Generate:
    """[worker.generate]: one stream, plus one per [[worker.generate.streams]] table, each taking
    the keys it does not set from [worker.generate] (dataplane/config/streams.py)."""
    g = Generate(
        port=t.get("port", str),
        burst=t.get("burst", int, 32, check=checks.between(1, 1024)),
        checksum=t.get("checksum", bool, True))
    first = streams.parse(t, streams.Stream(), needs_id=False)
    more = []
    for st in t.tables("streams"):
        more.append(streams.parse(st, first, needs_id=True))
        st.close()
    g.streams = [first, *more]
    if len(g.streams) > lib.DP_GEN_MAX_STREAMS:
        t.error("streams", None, f"{len(more)} tables, at most {lib.DP_GEN_MAX_STREAMS - 1} "
                "besides [worker.generate] itself")
    ids = [s.stream for s in g.streams if s.stream is not None]
    if len(set(ids)) != len(ids):
        t.error("stream", None, f"stream ids {ids} repeat; each stream's trailers need their own")
    if not g.checksum and any(len(set(s.sizes)) > 1 for s in g.streams):
        t.error("checksum", False, "a stream whose frame sizes vary needs checksum = true (the "
                "generator sets each frame's IP lengths and checksums)")
    t.close()
    return g


def parse(t: Table, backend: str = "auto") -> WorkerTable:
    """One [[worker]] table, with its ports and generator."""
    w = WorkerTable(
        name=t.get("name", str, check=checks.label),
        backend=t.get("backend", str, backend, choices=BACKENDS),
        core=t.get("core", int, None, check=checks.cpu),
        netns=t.get("netns", str, None, check=checks.name),
        poll=t.get("poll", str, "busy", choices=("busy", "adaptive")),
        zero_copy=t.get("zero_copy", bool, True),
        copybreak=t.get("copybreak", int, 256, check=checks.between(0, 9000)),
        burst=t.get("burst", int, 32, check=checks.between(1, 1024)),
        ports=[_port(p) for p in t.tables("port", required=True)])
    if w.poll == "adaptive":
        w.idle_sleep_us = t.get("idle_sleep_us", int, 50, check=checks.between(1, 100_000))
    else:
        t.refuse("idle_sleep_us", 'only with poll = "adaptive"; busy polling never sleeps')
    gen = t.table("generate")
    if "generate" in t.data:
        w.generate = _generate(gen)
    w.backend, w.backend_reason = resolve(
        t, w.name, w.backend, [(p.name, p.driver) for p in w.ports],
        w.generate.port if w.generate is not None else None)
    t.close()
    return w
