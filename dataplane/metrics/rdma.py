"""The RDMA transports at scrape time and in `dataplane status`: dataplane_rdma_* (QPs, credits,
errors) and each end's MR cache, read from the struct dp_rdma_counters of their control files,
which the transport processes (dataplane/transport/rdma/process.py) rewrite every few ms."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import Metric

from dataplane.metrics.families import ScrapeCollector, Table, families
from dataplane.shm.control import Control
from dataplane.transport.spec import TransportSpec

LABELS = ("transport", "role", "peer", "device")
FAMILIES: Table = {
    "wc_errors": ("c", "dataplane_rdma_wc_errors_total",
                  "Work completions with an error status (the QP was reconnected).", LABELS),
    "peer_errors": ("c", "dataplane_rdma_peer_errors_total",
                    "Peer gone, failed posts, completion timeouts, bad batches.", LABELS),
    "credit_waits": ("c", "dataplane_rdma_credit_waits_total",
                     "Times the sender stopped at zero credits (the receiver's ring full).",
                     LABELS),
    "bad_descriptors": ("c", "dataplane_rdma_bad_descriptors_total",
                        "Descriptors a sender wrote that the receiver refused (len over the slot "
                        "size, flags a sender may not set); their batch is not published.",
                        LABELS),
    "credit_updates": ("c", "dataplane_rdma_credit_updates_total",
                       "Consumer indexes the receiver sent back.", LABELS),
    "credits": ("g", "dataplane_rdma_credits",
                "Ring positions the sender may write now (send side).", LABELS),
    "qps": ("g", "dataplane_rdma_queue_pairs", "RC queue pairs open.", LABELS),
    "max_qp": ("g", "dataplane_rdma_device_max_qp", "The RDMA device's max_qp.", LABELS),
}


class _ControlCache:
    """An MR cache's stats() as MRCacheCollector wants it, read from a transport process's
    control file."""

    def __init__(self, ctl: Control) -> None:
        self.ctl = ctl

    def stats(self) -> dict[str, Any]:
        from dataplane.transport.rdma.mr_cache import SECONDS_BUCKETS
        r = self.ctl.rdma_snapshot()
        counts = r["mr_reg_buckets"][:len(SECONDS_BUCKETS)]
        return {"hits": r["mr_hits"], "misses": r["mr_misses"], "evictions": r["mr_evictions"],
                "registered_bytes": r["mr_registered_bytes"], "budget": r["mr_budget_bytes"],
                "registration_seconds": {"sum": r["mr_reg_ns"] / 1e9, "count": r["mr_reg_count"],
                                         "buckets": dict(zip(SECONDS_BUCKETS, counts,
                                                             strict=True))}}


def mr_caches(sources: Iterable[tuple[TransportSpec, Control]]) -> dict[str, _ControlCache]:
    """For MRCacheCollector: each RDMA transport's cache, by transport name."""
    return {spec.name: _ControlCache(ctl) for spec, ctl in sources if spec.mode == "rdma"}


class RdmaCollector(ScrapeCollector):
    """dataplane_rdma_* of the RDMA transports, from their control files at scrape time."""

    def __init__(self, sources: Iterable[tuple[TransportSpec, Control]]):
        self.sources = [(s, c) for s, c in sources if s.mode == "rdma"]

    def collect(self) -> Iterator[Metric]:
        fams = families(FAMILIES)
        for spec, ctl in self.sources:
            try:
                r = ctl.rdma_snapshot()
            except (AttributeError, TypeError, ValueError):
                continue            # closed: a partial scrape, not a failed one
            lab = [spec.name, spec.role, f"{spec.host}:{spec.tcp_port}", spec.device]
            for k, fam in fams.items():
                if k == "credits" and spec.role != "send":
                    continue
                fam.add_metric(lab, float(r[k]))
        yield from fams.values()


def status_line(role: str, device: str, ctl: Control) -> str:
    """One line for `dataplane status`: the QP, credits and the MR cache."""
    r, c = ctl.rdma_snapshot(), ctl.snapshot()
    credits = f"credits {r['credits']}, waits {r['credit_waits']}" if role == "send" \
        else f"credit updates {r['credit_updates']}"
    mr = r["mr_hits"] + r["mr_misses"]
    return (f"  rdma {device}: QPs {r['qps']}/{r['max_qp']}, {credits}; "
            f"batches {c['batches']}, packets {c['packets']}; wc errors {r['wc_errors']}, "
            f"peer errors {r['peer_errors']}, bad descriptors {r['bad_descriptors']}, "
            f"reconnects {c['reconnects']}, lost "
            f"{c['lost_packets']}; MR cache "
            f"{r['mr_hits']}/{mr} hits, {r['mr_registered_bytes'] >> 20} MiB registered of "
            f"{r['mr_budget_bytes'] >> 20} MiB, {r['mr_evictions']} evictions")
