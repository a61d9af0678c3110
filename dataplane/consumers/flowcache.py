"""The flow cache: packets folded into flows keyed by the full 5-tuple plus VLAN, exported as
IPFIX when they end (dataplane.consumers.ipfix).  The built-in consumer "flows":

    [[consumer]]
    name = "flows"
    entry = "flows"
    [consumer.options]
    collectors = ["127.0.0.1:4739"]

A flow's key is (source and destination address, source and destination port, IP protocol,
outer VLAN id, IP version), read from the frame bytes: the descriptor gives where the headers
are (ethertype, l4proto, l4_off), the addresses and ports are read from the bytes by one C call
per batch (native/core/flowkey.c), and the packets are folded into flows with numpy, so nothing
here loops over packets in Python (docs/design.md, invariant 1).  Bytes are IP-level (the IPv4
total length, the IPv6 payload length + 40), as IPFIX's octetDeltaCount defines them.

A flow ends on its idle timeout (no packet for inactive_timeout seconds), its active timeout
(active_timeout seconds after its first packet: long flows are reported as they go, a new
record starting with the next packet), when the table is full and it is the least recently
seen (an eviction, counted), or at close.  An ended flow is exported, never dropped.

The table is plain numpy arrays of fixed size, written by the loop's thread only; the exporter
thread (collect(), top_flows()) reads them without a lock (invariant 7).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dataplane._native import ffi, lib
from dataplane.consumers import ipfix
from dataplane.consumers.api import Batch

log = logging.getLogger(__name__)

OPTIONS = {"collectors": [], "active_timeout": 60.0, "inactive_timeout": 15.0,
           "max_flows": 65536, "template_interval": 60.0, "observation_domain": 0,
           "mtu": 1400}
# a key is DP_FLOW_KEY_LEN = 40 bytes (native/core/flowkey.c): src 16, dst 16, ports 4, proto,
# version, vlan 2 (IPv4 addresses in the first 4 bytes of their 16); numpy sees 5 u64 words
KEY_WORDS = lib.DP_FLOW_KEY_LEN // 8
FLOW_DTYPE = np.dtype([("key", "<u8", (KEY_WORDS,)), ("packets", "<i8"), ("bytes", "<i8"),
                       ("first", "<i8"), ("last", "<i8"), ("tcpflags", "u1"),
                       ("reason", "u1")])


def packet_keys(batch: Batch) -> tuple[dict[str, np.ndarray] | None, int]:
    """Per IP packet of the batch: key (n, 5) u64, hash, IP bytes, rx_ns, TCP flags (None
    when none is IP); and how many packets were left out (not IP, malformed, outside the
    arena).  One call to C (native/core/flowkey.c) for the whole batch."""
    d = np.ascontiguousarray(batch.desc)
    n = len(d)
    keys = np.empty((n, KEY_WORDS), dtype="<u8")
    h = np.empty(n, dtype=np.uint64)
    check = np.empty(n, dtype=np.uint64)
    iplen = np.empty(n, dtype=np.uint32)
    tcpflags = np.empty(n, dtype=np.uint8)
    index = np.empty(n, dtype=np.uint32)
    buf = batch.arena.buf
    k = lib.dp_flow_keys(ffi.cast("const uint8_t *", buf.ctypes.data), buf.size,
                         ffi.cast("const struct dp_desc *", d.ctypes.data), n,
                         ffi.cast("uint8_t *", keys.ctypes.data),
                         ffi.cast("uint64_t *", h.ctypes.data),
                         ffi.cast("uint64_t *", check.ctypes.data),
                         ffi.cast("uint32_t *", iplen.ctypes.data),
                         ffi.cast("uint8_t *", tcpflags.ctypes.data),
                         ffi.cast("uint32_t *", index.ctypes.data))
    if k == 0:
        return None, n
    return {"key": keys[:k], "hash": h[:k], "check": check[:k], "bytes": iplen[:k].astype(np.int64),
            "rx": d["rx_ns"][index[:k]].astype(np.int64), "tcpflags": tcpflags[:k]}, n - k


def fold(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """The packets of one batch folded into flows: (hashes, FLOW_DTYPE records, packets left
    out because their key shared the first hash with another key's but not the second: counted,
    never seen in practice).  Grouping by the first hash and comparing the second costs a
    fraction of comparing whole keys."""
    order = np.argsort(p["hash"])
    hs = p["hash"][order]
    new = np.concatenate(([True], hs[1:] != hs[:-1]))
    starts = np.flatnonzero(new)
    cs = p["check"][order]
    same = cs == cs[starts][np.cumsum(new) - 1]
    lost = len(order) - int(np.count_nonzero(same))
    if lost:       # a group's first packet is always kept: the groups stay, smaller
        order, hs = order[same], hs[same]
        starts = np.flatnonzero(new[same])
    f = np.zeros(len(starts), dtype=FLOW_DTYPE)
    f["key"] = p["key"][order[starts]]
    f["packets"] = np.diff(np.append(starts, len(order)))
    f["bytes"] = np.add.reduceat(p["bytes"][order], starts)
    f["first"] = np.minimum.reduceat(p["rx"][order], starts)
    f["last"] = np.maximum.reduceat(p["rx"][order], starts)
    f["tcpflags"] = np.bitwise_or.reduceat(p["tcpflags"][order], starts)
    return hs[starts], f, lost


class FlowTable:
    """At most `capacity` flows, looked up by 64-bit key hash in a sorted index."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.h = np.zeros(capacity, dtype=np.uint64)
        self.f = np.zeros(capacity, dtype=FLOW_DTYPE)
        self.used = 0
        self._sorted = np.zeros(0, dtype=np.uint64)
        self._order = np.zeros(0, dtype=np.intp)

    def _reindex(self) -> None:
        order = np.argsort(self.h[:self.used], kind="stable")
        self._sorted, self._order = self.h[:self.used][order], order

    def add(self, h: np.ndarray, f: np.ndarray) -> list[np.ndarray]:
        """Fold flows `f` (distinct hashes h) in; returns the flows this ended (evicted)."""
        ended: list[np.ndarray] = []
        slot = np.full(len(h), -1, dtype=np.intp)
        if self.used:
            pos = np.minimum(np.searchsorted(self._sorted, h), self.used - 1)
            hit = self._sorted[pos] == h
            slot[hit] = self._order[pos[hit]]
        hit = slot >= 0
        if hit.any():
            s, g = slot[hit], f[hit]
            clash = (self.f["key"][s] != g["key"]).any(axis=1)
            if clash.any():      # another key with the same hash: the old flow ends here
                ended.append(self._take(s[clash], ipfix.LACK_OF_RESOURCES))
                self.f[s[clash]] = g[clash]
                s, g = s[~clash], g[~clash]
            t = self.f
            t["packets"][s] += g["packets"]
            t["bytes"][s] += g["bytes"]
            t["first"][s] = np.minimum(t["first"][s], g["first"])
            t["last"][s] = np.maximum(t["last"][s], g["last"])
            t["tcpflags"][s] |= g["tcpflags"]
        miss = np.flatnonzero(~hit)
        if len(miss):
            ended += self._insert(h[miss], f[miss])
        return ended

    def _insert(self, h: np.ndarray, f: np.ndarray) -> list[np.ndarray]:
        ended = []
        if len(f) > self.capacity:       # more new flows than the table: the excess ends now
            over = f[self.capacity:].copy()
            over["reason"] = ipfix.LACK_OF_RESOURCES
            ended.append(over)
            h, f = h[:self.capacity], f[:self.capacity]
        need = self.used + len(f) - self.capacity
        if need > 0:                     # the least recently seen flows make room
            victims = np.argpartition(self.f["last"][:self.used], need - 1)[:need]
            ended.append(self._take(victims, ipfix.LACK_OF_RESOURCES))
            self._drop(victims)
        n = self.used
        self.h[n:n + len(f)] = h
        self.f[n:n + len(f)] = f
        self.used = n + len(f)
        self._reindex()
        return ended

    def _take(self, idx: np.ndarray, reason: int) -> np.ndarray:
        out = self.f[idx].copy()
        out["reason"] = reason
        return out

    def _drop(self, idx: np.ndarray) -> None:
        keep = np.ones(self.used, dtype=bool)
        keep[idx] = False
        n = int(np.count_nonzero(keep))
        self.h[:n] = self.h[:self.used][keep]
        self.f[:n] = self.f[:self.used][keep]
        self.used = n
        self._reindex()

    def expire(self, now_ns: int, active_ns: int, inactive_ns: int) -> np.ndarray:
        """Flows past a timeout, taken out of the table, each with its flowEndReason."""
        t = self.f[:self.used]
        idle = now_ns - t["last"] >= inactive_ns
        active = (now_ns - t["first"] >= active_ns) & ~idle
        done = np.flatnonzero(idle | active)
        if not len(done):
            return t[:0].copy()
        out = t[done].copy()
        out["reason"] = np.where(idle[done], ipfix.IDLE_TIMEOUT, ipfix.ACTIVE_TIMEOUT)
        self._drop(done)
        return out

    def drain(self, reason: int) -> np.ndarray:
        out = self._take(np.arange(self.used), reason)
        self._drop(np.arange(self.used))
        return out


def records(flows: np.ndarray) -> dict[int, np.ndarray]:
    """Ended flows as IPFIX data records, by template id."""
    kb = flows["key"].view(np.uint8).reshape(len(flows), 8 * KEY_WORDS)
    out = {}
    for tid, version, alen in ((ipfix.TEMPLATE_V4, 4, 4), (ipfix.TEMPLATE_V6, 6, 16)):
        sel = kb[:, 37] == version
        if not sel.any():
            continue
        k, f = kb[sel], flows[sel]
        r = np.zeros(len(f), dtype=ipfix.RECORD[tid])
        r["src"] = np.ascontiguousarray(k[:, 0:alen]).view(f"V{alen}").ravel()
        r["dst"] = np.ascontiguousarray(k[:, 16:16 + alen]).view(f"V{alen}").ravel()
        r["ports"] = np.ascontiguousarray(k[:, 32:36]).view("V4").ravel()
        r["proto"] = k[:, 36]
        r["tcpflags"] = f["tcpflags"]
        r["vlan"] = k[:, 38].astype(np.uint16) << 8 | k[:, 39]
        r["packets"], r["bytes"] = f["packets"], f["bytes"]
        r["start"], r["end"] = f["first"] // 1_000_000, f["last"] // 1_000_000
        r["reason"] = f["reason"]
        out[tid] = r
    return out


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """OPTIONS with `options` over them, each checked; ValueError naming the option."""
    for k in options:
        if k not in OPTIONS:
            raise ValueError(f'option "{k}": unknown (known: {", ".join(OPTIONS)})')
    o = {**OPTIONS, **options}
    cols = o["collectors"]
    if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise ValueError(f'option "collectors": {cols!r}: expected a list of "host:port"')
    try:
        o["collectors"] = [ipfix.parse_collector(c) for c in cols]
    except ValueError as e:
        raise ValueError(f'option "collectors": {e}') from None
    for k in ("active_timeout", "inactive_timeout", "template_interval"):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 86400:
            raise ValueError(f'option "{k}": {v!r}: expected seconds, above 0, at most 86400')
    for k, lo, hi in (("max_flows", 1, 1 << 24), ("observation_domain", 0, (1 << 32) - 1),
                      ("mtu", 100, 65507)):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f'option "{k}": {v!r}: expected an integer, {lo}..{hi}')
    return o


class FlowCache:
    """The "flows" consumer: a FlowTable, its timeouts, and an IPFIX Exporter (when there are
    collectors; without, ended flows are only counted, and the active ones are still seen at
    /flows and with `dataplane flows`)."""

    def __init__(self, name: str, options: dict[str, Any] | None = None):
        self.name = name
        o = self.options = check_options(dict(options or {}))
        self.table = FlowTable(o["max_flows"])
        self.active_ns = int(o["active_timeout"] * 1e9)
        self.inactive_ns = int(o["inactive_timeout"] * 1e9)
        self.ended = dict.fromkeys(ipfix.REASONS, 0)
        self.skipped = self.clashes = 0
        self.exporter = (ipfix.Exporter(o["collectors"], o["observation_domain"], o["mtu"])
                         if o["collectors"] else None)
        self.next_templates = 0.0
        self._templates(time.monotonic())

    def _templates(self, now: float) -> None:
        """Templates at start and every template_interval: a UDP collector that started after
        us (or lost them) can decode data only once it has them."""
        if self.exporter is not None and now >= self.next_templates:
            self.exporter.send_templates()
            self.next_templates = now + self.options["template_interval"]

    def on_batch(self, batch: Batch) -> None:
        p, skipped = packet_keys(batch)
        self.skipped += skipped
        if p is None:
            return
        h, f, clashes = fold(p)
        self.clashes += clashes
        for ended in self.table.add(h, f):
            self._export(ended)

    def tick(self, now: float) -> None:
        self._export(self.table.expire(time.time_ns(), self.active_ns, self.inactive_ns))
        self._templates(now)

    def close(self) -> None:
        self._export(self.table.drain(ipfix.FORCED_END))
        if self.exporter is not None:
            self.exporter.close()

    def _export(self, flows: np.ndarray) -> None:
        if not len(flows):
            return
        reasons, counts = np.unique(flows["reason"], return_counts=True)
        for r, c in zip(reasons.tolist(), counts.tolist(), strict=True):
            self.ended[r] = self.ended.get(r, 0) + c
        if self.exporter is not None:
            for tid, recs in records(flows).items():
                self.exporter.send(tid, recs)

    def top_flows(self, n: int = 10) -> list[dict]:
        """The n biggest active flows by bytes (read from the exporter's thread: a copy)."""
        used = self.table.used
        f = self.table.f[:used].copy()
        top = f[np.argsort(-f["bytes"], kind="stable")[:n]]
        return [describe(x) for x in top]

    def collect(self) -> Iterator[Metric]:
        lab = [self.name]
        g = GaugeMetricFamily("dataplane_flows_active", "Flows in the flow cache now.",
                              labels=["consumer"])
        g.add_metric(lab, self.table.used)
        yield g
        e = CounterMetricFamily("dataplane_flows_ended_total", "Flows the flow cache ended (and "
                                "exported, when it has collectors), by flowEndReason.",
                                labels=["consumer", "reason"])
        for r, c in list(self.ended.items()):
            e.add_metric(lab + [ipfix.REASONS.get(r, str(r))], c)
        yield e
        s = CounterMetricFamily("dataplane_flow_skipped_packets_total", "Packets in no flow: "
                                "not IP, malformed or outside the arena (not_ip), or whose key "
                                "shared its 64-bit hash with another's in a batch (hash_clash).",
                                labels=["consumer", "reason"])
        s.add_metric(lab + ["not_ip"], self.skipped)
        s.add_metric(lab + ["hash_clash"], self.clashes)
        yield s
        x = self.exporter
        for attr, name, what in (
                ("records", "dataplane_flow_export_records_total",
                 "IPFIX data records sent (one per ended flow)."),
                ("messages", "dataplane_flow_export_messages_total",
                 "IPFIX messages sent, template messages included."),
                ("templates", "dataplane_flow_export_templates_total",
                 "IPFIX template messages sent (at start, then every template_interval)."),
                ("send_errors", "dataplane_flow_export_send_errors_total",
                 "IPFIX messages a collector's socket refused (per collector).")):
            c = CounterMetricFamily(name, what, labels=["consumer"])
            c.add_metric(lab, getattr(x, attr) if x is not None else 0)
            yield c


def describe(f: np.void) -> dict:
    """One flow record as JSON-able fields (addresses as text)."""
    import ipaddress
    kb = f["key"].view(np.uint8)
    v6 = int(kb[37]) == 6
    alen = 16 if v6 else 4
    addr = ipaddress.IPv6Address if v6 else ipaddress.IPv4Address
    return {"src": str(addr(bytes(kb[0:alen]))), "dst": str(addr(bytes(kb[16:16 + alen]))),
            "sport": int(kb[32]) << 8 | int(kb[33]), "dport": int(kb[34]) << 8 | int(kb[35]),
            "proto": int(kb[36]), "vlan": int(kb[38]) << 8 | int(kb[39]),
            "packets": int(f["packets"]), "bytes": int(f["bytes"]),
            "tcp_flags": int(f["tcpflags"]), "first_ns": int(f["first"]),
            "last_ns": int(f["last"])}


def factory(name: str, options: dict[str, Any]) -> FlowCache:
    """The built-in "flows" consumer (dataplane.consumers.registry)."""
    return FlowCache(name, options)
