"""Count DNS queries by name: an example consumer of a dataplane run (docs/consumers.md).

The rings carry every packet the workers receive; this consumer picks the DNS queries out of
each batch with numpy (one pass over the descriptors and the first bytes of the frames, no
Python per packet), decodes only those with scapy, and serves its counts to Prometheus as
dataplane_dns_queries_total{consumer, qname}.

    [[consumer]]
    name = "dns"
    entry = "dns_count:factory"
    path = "/opt/dataplane/consumers"    # the directory this file is in
    [consumer.options]
    port = 53          # UDP destination port of the queries
    max_names = 1000   # names counted apart; the rest are counted as "(other)"
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric
from scapy.layers.dns import DNS

from dataplane.consumers.api import Batch, ConsumerBase

UDP = 17
HEAD = 512          # bytes of each frame looked at: an Ethernet, VLAN, IP and UDP header and
                    # a DNS question fit; a longer question is counted as malformed


class DnsQueries(ConsumerBase):
    def __init__(self, name: str, options: dict[str, Any]):
        super().__init__(name, options)
        self.port = int(options.get("port", 53))
        self.max_names = int(options.get("max_names", 1000))
        if not 0 < self.port < 65536 or self.max_names < 1:
            raise ValueError(f"port {self.port} (1..65535), max_names {self.max_names} (>= 1)")
        self.counts: dict[str, int] = {}
        self.malformed = 0

    def on_batch(self, batch: Batch) -> None:
        d = batch.desc
        # UDP frames with a transport header: their destination port, from the frame bytes
        udp = np.flatnonzero((d["l4proto"] == UDP) & (d["l4_off"] > 0))
        if udp.size == 0:
            return
        heads, lens = Batch(d[udp], batch.source).heads(HEAD)
        off = d["l4_off"][udp].astype(np.intp)
        rows = np.arange(udp.size)
        at = np.minimum(off, HEAD - 8)          # a header past HEAD is refused just below
        dport = heads[rows, at + 2].astype(np.int64) << 8 | heads[rows, at + 3]
        query = (off + 8 <= np.minimum(lens, HEAD)) & (dport == self.port)
        for i in np.flatnonzero(query):         # Python only for the queries: few per batch
            self._count(heads[i, off[i] + 8:lens[i]].tobytes())

    def _count(self, payload: bytes) -> None:
        try:
            msg = DNS(payload)
            if msg.qr != 0 or not msg.qd:
                return              # an answer, or no question
            qname = msg.qd[0].qname.decode("ascii", errors="replace")
        except Exception:           # noqa: BLE001 - whatever a stranger's bytes make scapy do
            self.malformed += 1
            return
        if qname not in self.counts and len(self.counts) >= self.max_names:
            qname = "(other)"
        self.counts[qname] = self.counts.get(qname, 0) + 1

    def collect(self) -> Iterable[Metric]:
        fam = CounterMetricFamily("dataplane_dns_queries", "DNS queries seen, by name.",
                                  labels=["consumer", "qname"])
        # the exporter's thread: list() copies the dict in one step under the GIL, so the
        # loop's thread may add names meanwhile
        for qname, n in list(self.counts.items()):
            fam.add_metric([self.name, qname], n)
        bad = CounterMetricFamily("dataplane_dns_malformed",
                                  "Frames to the DNS port that did not decode as a query.",
                                  labels=["consumer"])
        bad.add_metric([self.name], self.malformed)
        return [fam, bad]


def factory(name: str, options: dict[str, Any]) -> DnsQueries:
    return DnsQueries(name, options)
