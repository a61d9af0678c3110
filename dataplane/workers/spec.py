"""What one native worker is told to do: the contract between the plan, the supervisor and the
worker process.  Plain dataclasses that travel to the worker process as JSON on its argv.

`dataplane.config.loader` validates a TOML config and `dataplane.config.specs` turns it into a
list of WorkerSpec (the one place that does so); `dataplane.workers.supervisor` creates each
worker's arena and starts `python -m dataplane.workers.process SPEC_JSON`;
`dataplane.workers.process` fills struct dp_worker_config from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class PortSpec:
    name: str                 # ethdev name DPDK knows it by: "net_af_packet0" or "0000:00:03.0"
    devargs: str = ""         # --vdev argument ("net_af_packet0,iface=veth0"); "" for PCI
    pci: str = ""             # PCI address passed as -a; "" for a vdev
    rxq: int = 1
    txq: int = 1
    rxd: int = 1024
    txd: int = 1024
    label: str = ""           # name shown in metrics (config's port name); defaults to name
    # backend "uring" only: what the worker opens itself, with no DPDK
    iface: str = ""           # AF_PACKET socket on this interface (raw frames)
    udp_port: int = 0         # or a UDP socket bound to this port (payloads as packets)


@dataclass
class StreamSpec:
    """One generator stream: its template, size cycle, rate and trailer id."""
    stream: int = 1           # the id its trailers carry
    rate_pps: int = 0         # 0: as fast as the port takes them
    count: int = 0            # 0: until stopped
    template: str = ""        # hex of the largest frame (scapy-built), trailer space included
    vary_off: int = 0         # 16-bit big-endian field varied per packet (0: none)
    vary_min: int = 0
    vary_max: int = 0
    csum: int = 1             # 1: recompute IP lengths, IPv4 and L4 checksums per packet
    sizes: list[int] = field(default_factory=list)   # frame k is sizes[k % len]; []: template's
    # pcap replay instead of the template: the worker process loads the file once
    pcap: str = ""            # absolute path of a pcap or pcapng (Ethernet)
    speed: float = 0.0        # times the capture's own pace; 0: paced by rate_pps
    loops: int = 1            # 0: until stopped
    trailer: bool = True      # append the trailer to its UDP/TCP frames
    max_frame: int = 1514


@dataclass
class GenSpec(StreamSpec):
    """The generator: its port, burst, and its streams; its own StreamSpec fields are the first
    stream's (what one [worker.generate] table gives), `more` holds the others."""
    port: int = 0             # index into WorkerSpec.ports
    queue: int = 0
    burst: int = 32           # per stream and burst
    more: list[StreamSpec] = field(default_factory=list)

    def streams(self) -> list[StreamSpec]:
        first = StreamSpec(**{f.name: getattr(self, f.name) for f in fields(StreamSpec)})
        return [first, *self.more]


@dataclass
class WorkerSpec:
    name: str
    worker_id: int
    backend: str = "dpdk"     # "dpdk" (EAL, ethdev PMDs) or "uring" (io_uring over sockets)
    backend_reason: str = ""  # why config chose this backend (backend = "auto"), for show/logs
    core: int | None = None   # CPU to pin to; None: leave to the scheduler
    netns: str | None = None  # network namespace the worker runs in
    arena_path: str = ""      # filled by the supervisor
    ring_size: int = 4096
    slot_size: int = 2048
    pool_mb: int = 64
    n_mbufs: int = 8191
    burst: int = 32
    zero_copy: bool = True
    idle_sleep_us: int = 0    # 0: busy poll; else nap after ~1 ms of empty polls (lab boxes)
    copybreak: int = 256      # zero copy: frames up to this many bytes are copied (0: never)
    hugepages: bool = False   # True: EAL uses hugetlbfs (huge_dir); False: --no-huge
    huge_dir: str = ""
    eal_memory_mb: int = 256  # -m with --no-huge
    log_level: str = "notice"
    ports: list[PortSpec] = field(default_factory=list)
    gen: GenSpec | None = None

    def rings(self) -> tuple[tuple[int, int], ...]:
        """(port, queue) of every ring, in the order the worker fills them: port-major."""
        return tuple((p, q) for p, ps in enumerate(self.ports) for q in range(ps.rxq))

    def geometry(self):
        """The arena this worker needs (dataplane.shm.arena.ArenaGeometry)."""
        from dataplane.shm.arena import ArenaGeometry  # here: spec.py stays importable without cffi
        return ArenaGeometry(len(self.ports), self.rings(), self.ring_size, self.slot_size,
                             self.pool_mb << 20)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        d = json.loads(text)
        d["ports"] = [PortSpec(**p) for p in d["ports"]]
        g = d.get("gen")
        if g:
            g["more"] = [StreamSpec(**m) for m in g.get("more", [])]
        d["gen"] = GenSpec(**g) if g else None
        return cls(**d)
