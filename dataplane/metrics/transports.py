"""The transports at scrape time: dataplane_transport_* of every TCP or RDMA end of a run, read
from their control files (dataplane/shm/control.py) by TransportCollector."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from dataplane.metrics.families import ScrapeCollector, Table, families
from dataplane.shm.control import Control
from dataplane.transport.auth import REASONS
from dataplane.transport.spec import TransportSpec

LABELS = ("transport", "role", "peer", "mode")
FAMILIES: Table = {
    "batches": ("c", "dataplane_transport_batches_total",
                "Batches sent whole (send) or published on the ring (recv).", LABELS),
    "packets": ("c", "dataplane_transport_packets_total", "Packets in those batches.", LABELS),
    "bytes": ("c", "dataplane_transport_bytes_total", "Frame bytes in those batches.", LABELS),
    "completions": ("c", "dataplane_transport_completions_total",
                    "Zero-copy send completions from the kernel.", LABELS),
    "copied_completions": ("c", "dataplane_transport_copied_completions_total",
                           "Zero-copy completions where the kernel copied anyway "
                           "(always so on loopback and veth).", LABELS),
    "reconnects": ("c", "dataplane_transport_reconnects_total",
                   "Connections made after the first.", LABELS),
    "lost_batches": ("c", "dataplane_transport_lost_batches_total",
                     "Batches taken from the ring that the receiver never published.", LABELS),
    "lost_packets": ("c", "dataplane_transport_lost_packets_total",
                     "Packets in the lost batches.", LABELS),
    "bad_frames": ("c", "dataplane_transport_bad_frames_total",
                   "Frames or messages that failed validation (connection closed).", LABELS),
    "short_reads": ("c", "dataplane_transport_short_reads_total",
                    "Connections that ended in the middle of a frame.", LABELS),
    "acks": ("c", "dataplane_transport_acks_total", "Batches acknowledged.", LABELS),
    "ring_waits": ("c", "dataplane_transport_ring_waits_total",
                   "Frames that waited for ring room (TCP backpressure).", LABELS),
    "disconnects": ("c", "dataplane_transport_disconnects_total", "Connections that ended.",
                    LABELS),
    "slow_peers": ("c", "dataplane_transport_slow_peers_total",
                   "Peers dropped for not taking acknowledgements (or greetings) in time.",
                   LABELS),
}
# the connection handshake (dataplane/transport/auth.py), from struct dp_auth_counters
AUTH_FAMILIES: Table = {
    "ok": ("c", "dataplane_transport_auth_ok_total", "Handshakes a peer passed.", LABELS),
    "failures": ("c", "dataplane_transport_auth_failures_total",
                 "Handshakes that failed, by reason (timeout, closed, bad_magic, "
                 "mode_mismatch, bad_name, bad_proof, busy).", (*LABELS, "reason")),
    "insecure": ("g", "dataplane_transport_insecure",
                 "1 when the transport runs without a key (config insecure = true): any peer "
                 "that reaches it is served.", LABELS),
}


class TransportCollector(ScrapeCollector):
    """dataplane_transport_* from the control files, read at scrape time; a closed or foreign
    source is skipped (partial scrape)."""

    def __init__(self, sources: Iterable[tuple[TransportSpec, Control]]):
        self.sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        fams, auth = families(FAMILIES), families(AUTH_FAMILIES)
        up = GaugeMetricFamily("dataplane_transport_connected",
                               "1 while the transport has a peer connection.",
                               labels=list(LABELS))
        zc = GaugeMetricFamily("dataplane_transport_zero_copy_effective",
                               "1 when the kernel sent without copying (no copied completions "
                               "among the completions so far), 0 when it copied.",
                               labels=list(LABELS))
        for spec, ctl in self.sources:
            try:
                snap, connected = ctl.snapshot(), ctl.hdr.connected
                a = ctl.hdr.auth
                ok, fails, insecure = a.ok, [a.failures[i] for i in range(len(REASONS))], \
                    a.insecure
            except (AttributeError, TypeError, ValueError):
                continue
            lab = [spec.name, spec.role, f"{spec.host}:{spec.tcp_port}",
                   spec.mode if spec.role == "send" or spec.mode == "rdma" else ""]
            for k in FAMILIES:
                fams[k].add_metric(lab, float(snap[k]))
            up.add_metric(lab, float(connected))
            auth["ok"].add_metric(lab, float(ok))
            for reason, n in zip(REASONS, fails, strict=True):
                auth["failures"].add_metric([*lab, reason], float(n))
            auth["insecure"].add_metric(lab, float(insecure))
            if snap["completions"]:
                zc.add_metric(lab, float(snap["copied_completions"] == 0))
        yield from fams.values()
        yield from auth.values()
        yield up
        if zc.samples:
            yield zc
