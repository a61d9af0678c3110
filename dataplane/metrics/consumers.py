"""The consumers' statistics at scrape time: traffic by ethertype, L4 protocol, size, flags and
latency per ring, the generator streams' sequence accounting, the top-flows table and the
consumer loop's own counters, copied from the consumer thread's numpy arrays without a lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import Metric

from dataplane.consumers.loop import ConsumerLoop, Running
from dataplane.consumers.stats import (
    ETHERTYPES,
    FLAGS,
    L4PROTOS,
    LATENCY_EDGES,
    SIZE_EDGES,
    TrafficStats,
)
from dataplane.metrics.arenas import RQ, ArenaCollector, WorkerSource
from dataplane.metrics.families import ScrapeCollector, Table, buckets, families

S = ("stream",)
C = ("consumer",)

FAMILIES: Table = {
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
    "stream_latency": ("h", "dataplane_stream_latency_seconds",
                       "End-to-end latency of a generator stream's packets, from its HDR "
                       "histogram (3 significant digits), on a 1-2-5 ladder.", S),
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
    "rings_untracked": ("c", "dataplane_consumer_untracked_ring_packets_total",
                        "Packets of (arena, port, queue) rings beyond the rings the consumer "
                        "keeps statistics for (MAX_RINGS): counted here only.", ()),
    "flow_entries": ("g", "dataplane_flow_table_entries", "Flows in the top-flows table.", ()),
    "flow_untracked": ("c", "dataplane_flow_untracked_bytes_total",
                       "Bytes of new flows that did not fit the top-flows table.", ()),
    "loop_descriptors": ("c", "dataplane_consumer_loop_descriptors_total",
                         "Descriptors the consumer loop took from the rings.", ()),
    "loop_batches": ("c", "dataplane_consumer_loop_batches_total",
                     "Batches the consumer loop took from the rings.", ()),
    "ring_faults": ("c", "dataplane_consumer_ring_faults_total",
                    "Rings the consumer loop stopped reading: impossible shared indices.", ()),
    # per consumer (dataplane.consumers.loop.Running)
    "c_batches": ("c", "dataplane_consumer_batches_total", "Batches given to the consumer.", C),
    "c_packets": ("c", "dataplane_consumer_packets_total",
                  "Descriptors in the batches given to the consumer.", C),
    "c_seconds": ("c", "dataplane_consumer_seconds_total",
                  "Time spent in the consumer's calls (on_batch and tick): its cost.", C),
    "c_errors": ("c", "dataplane_consumer_errors_total", "Exceptions the consumer raised.", C),
    "c_remakes": ("c", "dataplane_consumer_remakes_total",
                  "Times the consumer was made again after an error (on_error = restart).", C),
    "c_up": ("g", "dataplane_consumer_up", "1 while the consumer runs; 0 once disabled.", C),
}


class ConsumerCollector(ScrapeCollector):
    """TrafficStats and the ConsumerLoop, fresh at each scrape.  A ring's statistics carry the
    labels of the arena it came from, as `arenas` names them; a failed read counts in its
    source errors as "consumer"."""

    def __init__(self, stats: TrafficStats | None, loop: ConsumerLoop | None,
                 arenas: ArenaCollector):
        self.stats = stats
        self.loop = loop
        self.arenas = arenas

    def collect(self) -> Iterator[Metric]:
        fams = families(FAMILIES)
        if self.stats is not None:
            self.arenas.errors.guard("consumer", self._stats, fams, self.stats,
                                     self.arenas.by_path())
        own: list[Metric] = []
        if self.loop is not None:
            fams["loop_descriptors"].add_metric([], self.loop.descriptors)
            fams["loop_batches"].add_metric([], self.loop.batches)
            fams["ring_faults"].add_metric([], self.loop.errors)
            for r in list(self.loop.consumers):
                self._running(fams, r)
                # the consumer's own families: its code, so a failure skips it, counted
                collect = getattr(r.consumer, "collect", None)
                if collect is not None and not r.disabled:
                    self.arenas.errors.guard(f"consumer:{r.name}",
                                             lambda c=collect: own.extend(c()))
        yield from (f for f in fams.values() if f.samples)
        yield from own

    @staticmethod
    def _running(fams: dict[str, Metric], r: Running) -> None:
        lab = [r.name]
        fams["c_batches"].add_metric(lab, r.batches)
        fams["c_packets"].add_metric(lab, r.packets)
        fams["c_seconds"].add_metric(lab, r.ns / 1e9)
        fams["c_errors"].add_metric(lab, r.errors)
        fams["c_remakes"].add_metric(lab, r.remakes)
        fams["c_up"].add_metric(lab, 0 if r.disabled else 1)

    @staticmethod
    def _stats(fams: dict[str, Metric], stats: TrafficStats,
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
            fams["size"].add_metric(labels, buckets(SIZE_EDGES, m["size_counts"]),
                                    float(m["bytes"]))
            fams["latency"].add_metric(labels, buckets(LATENCY_EDGES, rs.latency.copy()),
                                       rs.latency_sum)
            fams["lat_negative"].add_metric(labels, rs.latency_negative)
            fams["lat_absurd"].add_metric(labels, rs.latency_absurd)
            fams["bad_trailer"].add_metric(labels, rs.bad_trailer)
        for sid, st in list(stats.streams.streams.items()):
            lab = [str(sid)]
            for key in ("received", "unique", "duplicates", "out_of_order", "late", "missing",
                        "max"):
                fams["seq_" + key].add_metric(lab, float(getattr(st, key)))
        for sid, hist in list(stats.stream_latency.items()):
            # computed from the books' counts at scrape time: the collector keeps no copy
            fams["stream_latency"].add_metric([str(sid)], *hist.snapshot().prometheus())
        fams["seq_untracked"].add_metric([], stats.streams.untracked)
        fams["rings_untracked"].add_metric([], stats.untracked_packets)
        fams["flow_entries"].add_metric([], stats.flows.used)
        fams["flow_untracked"].add_metric([], stats.flows.untracked_bytes)
