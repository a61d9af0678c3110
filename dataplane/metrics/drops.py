"""Every way a packet is lost, in one family: dataplane_dropped_packets_total{reason, worker,
port, transport}, so one panel and one alert cover all of them.  DropsCollector sums, at scrape
time, the same u64s the per-cause families export (those stay): it reads the workers' arenas
through the ArenaCollector (whose list a restart replaces) and the transports' control files.

What counts as a loss, and what does not, is argued in docs/metrics.md ("Lost packets, in one
family"); in short, a packet a reason counts never reached a consumer (or a peer), and each lost
packet is counted by exactly one reason on one end:
  ring_full       the worker had it and the ring was full (per port, the ring's queues summed)
  nic_missed      dropped before the worker saw it (NIC imissed, kernel socket drops)
  nic_errors      frames the NIC received bad or failed to send
  rx_nombuf       the NIC had no receive buffer for it
  tx_dropped      the TX burst did not take it
  transport_lost  a sender took it from the ring and the receiver never published it
Not losses: malformed and truncated packets (put on the ring, flagged), io_uring's ENOBUFS (the
packets wait in the socket; what overflows is nic_missed), a receiver's bad frames and RDMA bad
descriptors (the sender counts their batch in transport_lost; counting them again would count
one packet twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

from dataplane.metrics.arenas import ArenaCollector, WorkerSource
from dataplane.metrics.families import ScrapeCollector
from dataplane.shm.control import Control
from dataplane.shm.layout import PORT_COUNTERS, RING_COUNTERS
from dataplane.transport.spec import TransportSpec

NAME = "dataplane_dropped_packets_total"
LABELS = ("reason", "worker", "port", "transport")
# reason -> the port counter it sums (struct dp_port_counters)
PORT_REASONS = {"nic_missed": "nic_missed", "nic_errors": "nic_errors",
                "rx_nombuf": "rx_nombuf", "tx_dropped": "tx_drops"}
REASONS = ("ring_full", *PORT_REASONS, "transport_lost")


class DropsCollector(ScrapeCollector):
    """dataplane_dropped_packets_total from the workers' arenas (as `arenas` lists them now) and
    the transport senders' control files.  A source that cannot be read is skipped, and counted
    by the arenas' source errors for an arena (a partial scrape, never a failed one)."""

    def __init__(self, arenas: ArenaCollector,
                 transports: Iterable[tuple[TransportSpec, Control]] = ()):
        self.arenas = arenas
        # only a sender counts lost packets (native/transport/transport_send.c, rdma/sender.py)
        self.senders = [(s, c) for s, c in transports if s.role == "send"]

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(NAME, "Packets lost, by reason (the sum of the per-cause "
                                  "counters that lose a packet; see docs/metrics.md).",
                                  labels=list(LABELS))
        for w in list(self.arenas.workers):
            self.arenas.errors.guard(w.name, self._worker, fam, w)
        by_path = self.arenas.by_path()
        for spec, ctl in self.senders:
            try:
                n = ctl.snapshot()["lost_packets"]
            except (AttributeError, TypeError, ValueError):
                continue            # closed: a partial scrape, as TransportCollector's
            w = by_path.get(Path(spec.arena_path))
            worker, port = ("", "") if w is None else (w.name, self._ring_port(w, spec.ring))
            fam.add_metric(["transport_lost", worker, port, spec.name], float(n))
        yield fam

    @staticmethod
    def _ring_port(w: WorkerSource, ring: int) -> str:
        rings = list(w.arena.rings)
        return w.port_label(rings[ring].port) if ring < len(rings) else ""

    @staticmethod
    def _worker(fam: CounterMetricFamily, w: WorkerSource) -> None:
        a = w.arena
        if a.header is None:
            raise RuntimeError(f"arena of {w.name} is closed")
        full = RING_COUNTERS.index("ring_full_drops")
        ring_full = [0] * a.n_ports
        for ring in list(a.rings):
            if ring.port < a.n_ports:
                ring_full[ring.port] += int(ring.counters[full])
        pc = a.port_counters[:a.n_ports].copy()
        for p in range(a.n_ports):
            port = w.port_label(p)
            fam.add_metric(["ring_full", w.name, port, ""], float(ring_full[p]))
            for reason, key in PORT_REASONS.items():
                fam.add_metric([reason, w.name, port, ""],
                               float(pc[p, PORT_COUNTERS.index(key)]))
