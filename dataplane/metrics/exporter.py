"""Prometheus exporter: one custom collector reading the arenas and the consumers at scrape time.

Nothing is mirrored into Counter objects per event (prometheus_client's custom-collector
model): collect() builds fresh metric families from the workers' shared-memory u64s and the
consumer's numpy arrays, and holds nothing the workers or the consumer thread wait on
(docs/design.md, invariant 7).  A missing, closed or foreign arena gives a partial scrape,
counted in
dataplane_exporter_source_errors_total, never a failed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from dataplane.consumers.loop import ConsumerLoop
from dataplane.consumers.stats import (
    ETHERTYPES,
    FLAGS,
    L4PROTOS,
    LATENCY_EDGES,
    SIZE_EDGES,
    TrafficStats,
)
from dataplane.shm.arena import PORT_COUNTERS, RING_COUNTERS, URING_COUNTERS, WORKER_STATES, Arena

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"   # counters describe the host's traffic: not for the whole network
DEFAULT_PORT = 9477

RQ = ("worker", "port", "queue")
WP = ("worker", "port")
W = ("worker",)
S = ("stream",)

# family key -> (kind, metric name, help, labels).  Counter names end in _total here; the
# client library strips and re-adds the suffix.
FAMILIES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
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
    "eth_packets": ("c", "dataplane_consumer_ethertype_packets_total",
                    "Packets consumed, by ethertype.", RQ + ("ethertype",)),
    "eth_bytes": ("c", "dataplane_consumer_ethertype_bytes_total",
                  "Bytes consumed, by ethertype.", RQ + ("ethertype",)),
    "l4_packets": ("c", "dataplane_consumer_l4_packets_total",
                   "Packets consumed, by L4 protocol.", RQ + ("l4proto",)),
    "l4_bytes": ("c", "dataplane_consumer_l4_bytes_total", "Bytes consumed, by L4 protocol.",
                 RQ + ("l4proto",)),
    "flags": ("c", "dataplane_consumer_flagged_packets_total",
              "Packets consumed with a parser flag.", RQ + ("flag",)),
    "size": ("h", "dataplane_packet_size_bytes", "Size of consumed packets.", RQ),
    "latency": ("h", "dataplane_latency_seconds",
                "End-to-end latency of generated packets (trailer tx time to rx time).", RQ),
    "lat_negative": ("c", "dataplane_latency_negative_total",
                     "Generated packets received before they were sent (clock skew).", RQ),
    "lat_absurd": ("c", "dataplane_latency_absurd_total",
                   "Generated packets with a latency over a minute (clock skew).", RQ),
    "bad_trailer": ("c", "dataplane_generated_bad_trailer_total",
                    "Packets flagged generated without a valid trailer.", RQ),
    "seq_received": ("c", "dataplane_sequence_received_total",
                     "Generated packets received, by stream.", S),
    "seq_unique": ("c", "dataplane_sequence_unique_total",
                   "Distinct sequence numbers received.", S),
    "seq_duplicates": ("c", "dataplane_sequence_duplicates_total",
                       "Sequence numbers received again.", S),
    "seq_out_of_order": ("c", "dataplane_sequence_out_of_order_total",
                         "Packets that arrived after a higher sequence number.", S),
    "seq_late": ("c", "dataplane_sequence_late_total",
                 "Packets older than the tracking window (duplicate or late).", S),
    "seq_missing": ("g", "dataplane_sequence_missing_packets",
                    "Sequence numbers between the lowest and highest seen that never arrived.",
                    S),
    "seq_max": ("g", "dataplane_sequence_max", "Highest sequence number received.", S),
    "seq_untracked": ("c", "dataplane_sequence_untracked_packets_total",
                      "Generated packets of streams beyond the tracked number.", ()),
    "flow_entries": ("g", "dataplane_flow_table_entries", "Flows in the top-flows table.", ()),
    "flow_untracked": ("c", "dataplane_flow_untracked_bytes_total",
                       "Bytes of new flows that did not fit the top-flows table.", ()),
    "loop_descriptors": ("c", "dataplane_consumer_descriptors_total",
                         "Descriptors the consumer loop handed to its consumers.", ()),
    "loop_batches": ("c", "dataplane_consumer_batches_total", "Batches consumed.", ()),
    "loop_errors": ("c", "dataplane_consumer_errors_total", "Exceptions raised by consumers.", ()),
    # io_uring worker only (struct dp_uring_counters); absent for a worker whose are all zero
    "uring_cqes": ("c", "dataplane_uring_cqes_total", "Receive completions reaped.", RQ),
    "uring_enobufs": ("c", "dataplane_uring_enobufs_total",
                      "Multishot receives ended by -ENOBUFS: the consumer held every slot (packets"
                      " wait in the socket; its overflow is dataplane_nic_missed_total).", RQ),
    "uring_rearms": ("c", "dataplane_uring_rearms_total",
                     "Multishot receives submitted again after one ended.", RQ),
    "uring_recv_errors": ("c", "dataplane_uring_recv_errors_total",
                          "Receive completions with an error other than ENOBUFS.", RQ),
    "source_errors": ("c", "dataplane_exporter_source_errors_total",
                      "Scrapes that could not read a source (partial scrape).", ("source",)),
}
_KINDS = {"c": CounterMetricFamily, "g": GaugeMetricFamily, "h": HistogramMetricFamily}


@dataclass
class WorkerSource:
    name: str
    arena: Arena
    ports: Sequence[str]   # metric label of each worker-local port index (PortSpec.label)

    def port_label(self, i: int) -> str:
        return self.ports[i] if i < len(self.ports) and self.ports[i] else str(i)


def _buckets(edges: Sequence[float], counts: np.ndarray) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, le=edge, then +Inf) from per-bucket counts."""
    cum = np.cumsum(counts)
    return ([(floatToGoString(e), float(c)) for e, c in zip(edges, cum[:-1], strict=True)] +
            [("+Inf", float(cum[-1]))])


class DataplaneCollector(Collector):
    """Reads every worker's arena and the consumer state, fresh at each scrape."""

    def __init__(self, workers: Iterable[tuple[str, Arena, Sequence[str]]],
                 stats: TrafficStats | None = None, loop: ConsumerLoop | None = None,
                 heartbeat_timeout: float = 1.0):
        self.set_workers(workers)
        self.stats = stats
        self.loop = loop
        self.heartbeat_timeout_ns = int(heartbeat_timeout * 1e9)
        self.source_errors: dict[str, int] = {}

    def set_workers(self, workers: Iterable[tuple[str, Arena, Sequence[str]]]) -> None:
        """Replace the sources (after a restart mapped a new arena); replaced, never mutated,
        so a scrape in progress keeps a consistent list."""
        self.workers = [WorkerSource(n, a, list(p)) for n, a, p in workers]

    def describe(self) -> list[Metric]:
        return []   # families vary with the sources; no collect() at registration

    def collect(self) -> Iterator[Metric]:
        fams = {k: _KINDS[kind](name, doc, labels=list(labels))
                for k, (kind, name, doc, labels) in FAMILIES.items()}
        by_path: dict[Path, WorkerSource] = {}
        for w in self.workers:
            by_path[w.arena.path] = w
            self._guard(w.name, self._worker, fams, w)
        if self.stats is not None:
            self._guard("consumer", self._consumer, fams, self.stats, by_path)
        if self.loop is not None:
            fams["loop_descriptors"].add_metric([], self.loop.descriptors)
            fams["loop_batches"].add_metric([], self.loop.batches)
            fams["loop_errors"].add_metric([], self.loop.errors)
        for source, n in list(self.source_errors.items()):
            fams["source_errors"].add_metric([source], n)
        yield from (f for f in fams.values() if f.samples)

    def _guard(self, source: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:   # closed or foreign arena: skip it, say so, keep scraping
            self.source_errors[source] = self.source_errors.get(source, 0) + 1
            log.debug("scrape of %s failed: %r", source, e)

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
        state, hb = WORKER_STATES.get(h.state, "unknown"), h.heartbeat_ns
        age = time.monotonic_ns() - hb
        fams["up"].add_metric([w.name], float(
            state == "running" and 0 <= age < self.heartbeat_timeout_ns))
        for s in WORKER_STATES.values():
            fams["state"].add_metric([w.name, s], float(s == state))
        if hb:
            fams["heartbeat_age"].add_metric([w.name], age / 1e9)
        fams["restarts"].add_metric([w.name], h.restarts)
        fams["zero_copy"].add_metric([w.name], h.zero_copy)
        fams["loops"].add_metric([w.name], h.loops)
        busy, total = h.busy_cycles, h.total_cycles
        fams["busy_cycles"].add_metric([w.name], busy)
        fams["total_cycles"].add_metric([w.name], total)
        fams["busy_ratio"].add_metric([w.name], busy / total if total else 0.0)

    def _consumer(self, fams: dict[str, Metric], stats: TrafficStats,
                  by_path: dict[Path, WorkerSource]) -> None:
        for rs in list(stats.rings.values()):
            w = by_path.get(rs.path)
            name = w.name if w else rs.path.name
            labels = [name, w.port_label(rs.port) if w else str(rs.port), str(rs.queue)]
            m = rs.marginals()
            for i, e in enumerate(ETHERTYPES):
                fams["eth_packets"].add_metric(labels + [e], float(m["eth_packets"][i]))
                fams["eth_bytes"].add_metric(labels + [e], float(m["eth_bytes"][i]))
            for i, p in enumerate(L4PROTOS):
                fams["l4_packets"].add_metric(labels + [p], float(m["l4_packets"][i]))
                fams["l4_bytes"].add_metric(labels + [p], float(m["l4_bytes"][i]))
            for i, (f, _) in enumerate(FLAGS):
                fams["flags"].add_metric(labels + [f], float(m["flags"][i]))
            fams["size"].add_metric(labels, _buckets(SIZE_EDGES, m["size_counts"]),
                                    float(m["bytes"]))
            fams["latency"].add_metric(labels, _buckets(LATENCY_EDGES, rs.latency.copy()),
                                       rs.latency_sum)
            fams["lat_negative"].add_metric(labels, rs.latency_negative)
            fams["lat_absurd"].add_metric(labels, rs.latency_absurd)
            fams["bad_trailer"].add_metric(labels, rs.bad_trailer)
        for sid, st in list(stats.streams.streams.items()):
            lab = [str(sid)]
            for key in ("received", "unique", "duplicates", "out_of_order", "late", "missing",
                        "max"):
                fams["seq_" + key].add_metric(lab, float(getattr(st, key)))
        fams["seq_untracked"].add_metric([], stats.streams.untracked)
        fams["flow_entries"].add_metric([], stats.flows.used)
        fams["flow_untracked"].add_metric([], stats.flows.untracked_bytes)


class MetricsServer:
    """The HTTP endpoint serve() started; close() stops it and frees the port."""

    def __init__(self, server, thread, registry: CollectorRegistry):
        self.server, self.thread, self.registry = server, thread, registry

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return host, port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(collector: Collector, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, *more: Collector) -> MetricsServer:
    """Serve /metrics for these collectors alone (no process/platform collectors) on host:port;
    port 0 picks a free one (see .address)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    for c in (collector, *more):
        registry.register(c)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, registry)


class MRCacheCollector(Collector):
    """The RDMA memory-registration caches' counters, read from cache.stats() at scrape time."""

    def __init__(self, caches: dict[str, Any]):
        self.caches = caches          # name -> dataplane.transport.rdma.mr_cache.MRCache

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        fams = {
            "hits": CounterMetricFamily("dataplane_mr_cache_hits",
                                        "Lookups served by an existing registration.",
                                        labels=["cache"]),
            "misses": CounterMetricFamily("dataplane_mr_cache_misses",
                                          "Lookups that registered memory (ibv_reg_mr).",
                                          labels=["cache"]),
            "evictions": CounterMetricFamily("dataplane_mr_cache_evictions",
                                             "Registrations dropped to stay in budget.",
                                             labels=["cache"]),
            "registered_bytes": GaugeMetricFamily("dataplane_mr_cache_registered_bytes",
                                                  "Bytes registered now.", labels=["cache"]),
            "budget": GaugeMetricFamily("dataplane_mr_cache_budget_bytes",
                                        "Byte budget (from RLIMIT_MEMLOCK).", labels=["cache"]),
        }
        seconds = HistogramMetricFamily("dataplane_mr_cache_registration_seconds",
                                        "Time spent in ibv_reg_mr.", labels=["cache"])
        for name, cache in list(self.caches.items()):
            try:
                s = cache.stats()
            except Exception:   # a closed cache: a partial scrape, not a failed one
                continue
            for k, fam in fams.items():
                fam.add_metric([name], s[k])
            reg = s["registration_seconds"]
            edges = [e for e in reg["buckets"] if e != float("inf")]
            counts = np.array([reg["buckets"][e] for e in reg["buckets"]], dtype=np.int64)
            seconds.add_metric([name], _buckets(edges, counts), reg["sum"])
        yield from fams.values()
        yield seconds
