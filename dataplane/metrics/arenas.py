"""The workers' arenas at scrape time: ring, port, io_uring and worker-control counters, read
from shared memory (native/include/dp_layout.h) by ArenaCollector.

Nothing is mirrored into Counter objects per event: collect() builds fresh families from the
workers' u64s and holds nothing a worker waits on.  A missing, closed or foreign arena gives a
partial scrape, counted in dataplane_exporter_source_errors_total, never a failed one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import Metric

from dataplane.metrics.families import ScrapeCollector, SourceErrors, Table, families
from dataplane.shm.arena import Arena
from dataplane.shm.layout import PORT_COUNTERS, RING_COUNTERS, URING_COUNTERS, WORKER_STATES

RQ = ("worker", "port", "queue")
WP = ("worker", "port")
W = ("worker",)

FAMILIES: Table = {
    "rx_packets": ("c", "dataplane_rx_packets_total", "Packets put on the ring.", RQ),
    "rx_bytes": ("c", "dataplane_rx_bytes_total", "Bytes of packets put on the ring.", RQ),
    "ring_full_drops": ("c", "dataplane_ring_full_drops_total",
                        "Packets dropped because the ring was full.", RQ),
    "malformed": ("c", "dataplane_malformed_packets_total", "Packets the parser found malformed.",
                  RQ),
    "truncated": ("c", "dataplane_truncated_packets_total",
                  "Packets longer than what was stored.", RQ),
    "copied": ("c", "dataplane_copied_packets_total",
               "Packets copied into a slot (zero-copy unavailable).", RQ),
    "bursts": ("c", "dataplane_rx_bursts_total", "Non-empty receive bursts.", RQ),
    "occupancy": ("g", "dataplane_ring_occupancy_ratio", "Ring entries in use / ring size.", RQ),
    "tx_packets": ("c", "dataplane_tx_packets_total", "Packets transmitted.", WP),
    "tx_bytes": ("c", "dataplane_tx_bytes_total", "Bytes transmitted.", WP),
    "tx_drops": ("c", "dataplane_tx_dropped_packets_total",
                 "Packets the TX burst did not take.", WP),
    "nic_missed": ("c", "dataplane_nic_missed_total", "Packets the NIC dropped (imissed).", WP),
    "nic_errors": ("c", "dataplane_nic_errors_total", "NIC receive and transmit errors.", WP),
    "rx_nombuf": ("c", "dataplane_rx_nombuf_total", "Receive mbuf allocation failures.", WP),
    "gen_seq": ("g", "dataplane_generator_next_sequence",
                "Next sequence number the generator sends on this port.", WP),
    "up": ("g", "dataplane_worker_up", "1 when the worker runs and its heartbeat is fresh.", W),
    "state": ("g", "dataplane_worker_state", "1 for the worker's current state.",
              ("worker", "state")),
    "heartbeat_age": ("g", "dataplane_worker_heartbeat_age_seconds",
                      "Seconds since the worker's last heartbeat.", W),
    "restarts": ("c", "dataplane_worker_restarts_total", "Times the worker was restarted.", W),
    "zero_copy": ("g", "dataplane_worker_zero_copy",
                  "1 when descriptors point into the NIC's own buffers.", W),
    "loops": ("c", "dataplane_worker_loops_total", "Poll-loop iterations.", W),
    "busy_cycles": ("c", "dataplane_worker_busy_cycles_total",
                    "TSC cycles in iterations that moved packets.", W),
    "total_cycles": ("c", "dataplane_worker_cycles_total", "TSC cycles in the poll loop.", W),
    "busy_ratio": ("g", "dataplane_worker_busy_ratio",
                   "Busy cycles / loop cycles since start (rate the counters for recent).", W),
    # io_uring worker only (struct dp_uring_counters); absent for a worker whose are all zero
    "uring_cqes": ("c", "dataplane_uring_cqes_total", "Receive completions reaped.", RQ),
    "uring_enobufs": ("c", "dataplane_uring_enobufs_total",
                      "Multishot receives ended by -ENOBUFS: the consumer held every slot (packets"
                      " wait in the socket; its overflow is dataplane_nic_missed_total).", RQ),
    "uring_rearms": ("c", "dataplane_uring_rearms_total",
                     "Multishot receives submitted again after one ended.", RQ),
    "uring_recv_errors": ("c", "dataplane_uring_recv_errors_total",
                          "Receive completions with an error other than ENOBUFS.", RQ),
}


@dataclass
class WorkerSource:
    name: str
    arena: Arena
    ports: Sequence[str]   # metric label of each worker-local port index (PortSpec.label)

    def port_label(self, i: int) -> str:
        return self.ports[i] if i < len(self.ports) and self.ports[i] else str(i)


class ArenaCollector(ScrapeCollector):
    """Reads every worker's arena, fresh at each scrape.  Its `errors` are the endpoint's source
    errors: collectors that share them (ConsumerCollector) count into them, this one exports."""

    def __init__(self, workers: Iterable[tuple[str, Arena, Sequence[str]]],
                 heartbeat_timeout: float = 1.0, errors: SourceErrors | None = None):
        self.set_workers(workers)
        self.heartbeat_timeout_ns = int(heartbeat_timeout * 1e9)
        self.errors = errors or SourceErrors()

    def set_workers(self, workers: Iterable[tuple[str, Arena, Sequence[str]]]) -> None:
        """Replace the sources (after a restart mapped a new arena); replaced, never mutated,
        so a scrape in progress keeps a consistent list."""
        self.workers = [WorkerSource(n, a, list(p)) for n, a, p in workers]

    def by_path(self) -> dict[Path, WorkerSource]:
        """The sources by arena file: how the consumer statistics find their labels."""
        return {w.arena.path: w for w in self.workers}

    def collect(self) -> Iterator[Metric]:
        fams = families(FAMILIES)
        for w in self.workers:
            self.errors.guard(w.name, self._worker, fams, w)
        yield from (f for f in fams.values() if f.samples)
        errors = self.errors.family()
        if errors.samples:
            yield errors

    def _worker(self, fams: dict[str, Metric], w: WorkerSource) -> None:
        a, h = w.arena, w.arena.header
        if h is None:
            raise RuntimeError(f"arena of {w.name} is closed")
        for ring in list(a.rings):
            labels = [w.name, w.port_label(ring.port), str(ring.queue)]
            c = ring.counters.copy()
            for i, key in enumerate(RING_COUNTERS):
                fams[key].add_metric(labels, float(c[i]))
            fams["occupancy"].add_metric(labels, max(ring.occupancy(), 0) / ring.size)
        uc = a.uring_counters[:a.n_rings].copy()
        if uc.any():
            for ring in list(a.rings):
                labels = [w.name, w.port_label(ring.port), str(ring.queue)]
                for i, key in enumerate(URING_COUNTERS):
                    fams[f"uring_{key}"].add_metric(labels, float(uc[ring.index, i]))
        pc = a.port_counters[:a.n_ports].copy()
        for p in range(a.n_ports):
            for i, key in enumerate(PORT_COUNTERS):
                fams[key].add_metric([w.name, w.port_label(p)], float(pc[p, i]))
        self._control(fams, w.name, h)

    def _control(self, fams: dict[str, Metric], name: str, h) -> None:
        """The worker-control half of the header: state, heartbeat, loop cycles."""
        state, hb = WORKER_STATES.get(h.state, "unknown"), h.heartbeat_ns
        age = time.monotonic_ns() - hb
        fams["up"].add_metric([name], float(
            state == "running" and 0 <= age < self.heartbeat_timeout_ns))
        for s in WORKER_STATES.values():
            fams["state"].add_metric([name, s], float(s == state))
        if hb:
            fams["heartbeat_age"].add_metric([name], age / 1e9)
        fams["restarts"].add_metric([name], h.restarts)
        fams["zero_copy"].add_metric([name], h.zero_copy)
        fams["loops"].add_metric([name], h.loops)
        busy, total = h.busy_cycles, h.total_cycles
        fams["busy_cycles"].add_metric([name], busy)
        fams["total_cycles"].add_metric([name], total)
        fams["busy_ratio"].add_metric([name], busy / total if total else 0.0)
