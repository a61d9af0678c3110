"""The flow cache: packets folded into flows keyed by the full 5-tuple plus VLAN, exported as
IPFIX when they end (dataplane.consumers.ipfix).  The built-in consumer "flows":

    [[consumer]]
    name = "flows"
    entry = "flows"
    [consumer.options]
    collectors = ["127.0.0.1:4739"]

A flow's key is (source and destination address, source and destination port, IP protocol,
outer VLAN id, IP version), read from the frame bytes: the descriptor gives where the headers
are (ethertype, l4proto, l4_off), the addresses and ports are read from the bytes and the packets
folded into the table by two C calls per batch (native/core/flowkey.c), so nothing here loops
over packets in Python (docs/design.md, invariant 1).  Bytes are IP-level (the IPv4
total length, the IPv6 payload length + 40), as IPFIX's octetDeltaCount defines them.

A flow ends on its idle timeout (no packet for inactive_timeout seconds), its active timeout
(active_timeout seconds after its first packet: long flows are reported as they go, a new
record starting with the next packet), when the table is full and it is the least recently
seen (an eviction, counted), or at close.  An ended flow is exported, never dropped.

The table is numpy columns of fixed size, written by the loop's thread only (by C, through an
open-addressing index, in dp_flow_fold); the exporter thread (collect(), top_flows()) reads them
without a lock (invariant 7).
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


def _ptr(kind: str, a: np.ndarray) -> Any:
    return ffi.cast(kind, a.ctypes.data)


def packet_keys(batch: Batch) -> tuple[dict[str, np.ndarray] | None, int]:
    """Per IP packet of the batch: key (n, 5) u64, hash, IP bytes, TCP flags, rx_ns (None when
    none is IP); and how many packets were left out (not IP, malformed, outside the arena).
    One call to C (native/core/flowkey.c) for the whole batch."""
    d = np.ascontiguousarray(batch.desc)
    n = len(d)
    p = {"key": np.empty((n, KEY_WORDS), dtype=np.uint64), "hash": np.empty(n, dtype=np.uint64),
         "bytes": np.empty(n, dtype=np.uint32), "tcpflags": np.empty(n, dtype=np.uint8),
         "rx": np.empty(n, dtype=np.int64)}
    buf = batch.arena.buf
    k = lib.dp_flow_keys(_ptr("const uint8_t *", buf), buf.size,
                         _ptr("const struct dp_desc *", d), n, _ptr("uint8_t *", p["key"]),
                         _ptr("uint64_t *", p["hash"]), _ptr("uint32_t *", p["bytes"]),
                         _ptr("uint8_t *", p["tcpflags"]), _ptr("int64_t *", p["rx"]))
    if k == 0:
        return None, n
    return ({name: a[:k] for name, a in p.items()} if k < n else p), n - k


def fold(p: dict[str, np.ndarray], which: np.ndarray) -> np.ndarray:
    """Packets `which` of p folded into FLOW_DTYPE records by whole key, with numpy: for the
    rare batch that brings more new flows than the table holds."""
    keys, inverse = np.unique(p["key"][which], axis=0, return_inverse=True)
    inverse = inverse.ravel()
    f = np.zeros(len(keys), dtype=FLOW_DTYPE)
    f["key"] = keys
    f["packets"] = np.bincount(inverse, minlength=len(keys))
    f["bytes"] = np.bincount(inverse, weights=p["bytes"][which], minlength=len(keys))
    f["first"] = np.iinfo(np.int64).max
    np.minimum.at(f["first"], inverse, p["rx"][which])
    np.maximum.at(f["last"], inverse, p["rx"][which])
    np.bitwise_or.at(f["tcpflags"], inverse, p["tcpflags"][which])
    return f


class FlowTable:
    """At most `capacity` flows as numpy columns (entries 0..used-1), written by C
    (dp_flow_fold) through an open-addressing index of entry numbers; Python removes entries
    (timeouts, evictions) by compacting the columns, then has C rebuild the index."""

    COLUMNS = (("keys", np.uint64), ("h", np.uint64), ("packets", np.int64),
               ("bytes", np.int64), ("first", np.int64), ("last", np.int64),
               ("tcpflags", np.uint8))

    def __init__(self, capacity: int):
        self.capacity = capacity
        for name, dtype in self.COLUMNS:
            shape = (capacity, KEY_WORDS) if name == "keys" else (capacity,)
            setattr(self, name, np.zeros(shape, dtype=dtype))
        self._used = np.zeros(1, dtype=np.uint32)        # C counts new entries in here
        self.index = np.full(1 << max(4, (2 * capacity - 1).bit_length()), -1, dtype=np.int32)
        self._missed = np.zeros(0, dtype=np.uint32)
        # the columns never move: their pointers are made once, not per batch
        self._table_args = (
            _ptr("uint64_t *", self.keys), _ptr("uint64_t *", self.h),
            _ptr("int64_t *", self.packets), _ptr("int64_t *", self.bytes),
            _ptr("int64_t *", self.first), _ptr("int64_t *", self.last),
            _ptr("uint8_t *", self.tcpflags), _ptr("uint32_t *", self._used), self.capacity,
            _ptr("int32_t *", self.index), len(self.index) - 1)

    @property
    def used(self) -> int:
        return int(self._used[0])

    def add(self, p: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Fold the packets of packet_keys() in; returns the flows this ended (evicted, or
        new flows beyond the table's size, which are exported at once)."""
        missed = self._fold(p, None)
        if not len(missed):
            return []
        # full: the least recently seen make room, at least 1/16 of the table at once, so
        # a stream of new flows costs a reindex every capacity/16 of them, not every batch
        new = len(np.unique(p["hash"][missed]))
        room = min(self.used, max(new, self.capacity // 16))
        victims = np.argpartition(self.last[:self.used], room - 1)[:room] if room else []
        ended = [self._remove(np.asarray(victims, dtype=np.intp), ipfix.LACK_OF_RESOURCES)]
        missed = self._fold(p, missed)
        if len(missed):          # more new flows in one batch than the whole table
            over = fold(p, missed)
            over["reason"] = ipfix.LACK_OF_RESOURCES
            ended.append(over)
        return ended

    def _fold(self, p: dict[str, np.ndarray], which: np.ndarray | None) -> np.ndarray:
        n = len(p["hash"]) if which is None else len(which)
        if len(self._missed) < n:
            self._missed = np.zeros(max(n, 4096), dtype=np.uint32)
        m = lib.dp_flow_fold(
            n, _ptr("const uint8_t *", p["key"]), _ptr("const uint64_t *", p["hash"]),
            _ptr("const uint32_t *", p["bytes"]), _ptr("const uint8_t *", p["tcpflags"]),
            _ptr("const int64_t *", p["rx"]),
            ffi.NULL if which is None else _ptr("const uint32_t *", which), *self._table_args,
            _ptr("uint32_t *", self._missed))
        return self._missed[:m].copy()

    def records(self, idx: np.ndarray, reason: int | np.ndarray) -> np.ndarray:
        """Entries idx as FLOW_DTYPE records (a copy)."""
        f = np.zeros(len(idx), dtype=FLOW_DTYPE)
        f["key"] = self.keys[idx]
        for name in ("packets", "bytes", "first", "last", "tcpflags"):
            f[name] = getattr(self, name)[idx]
        f["reason"] = reason
        return f

    def _remove(self, idx: np.ndarray, reason: int | np.ndarray) -> np.ndarray:
        """Entries idx out of the table, as records; the columns compacted, the index rebuilt."""
        out = self.records(idx, reason)
        used = self.used
        keep = np.ones(used, dtype=bool)
        keep[idx] = False
        n = int(np.count_nonzero(keep))
        for name, _ in self.COLUMNS:
            col = getattr(self, name)
            col[:n] = col[:used][keep]
        self._used[0] = n
        lib.dp_flow_reindex(_ptr("const uint64_t *", self.h), n, _ptr("int32_t *", self.index),
                            len(self.index) - 1)
        return out

    def expire(self, now_ns: int, active_ns: int, inactive_ns: int) -> np.ndarray:
        """Flows past a timeout, taken out of the table, each with its flowEndReason."""
        used = self.used
        idle = now_ns - self.last[:used] >= inactive_ns
        active = (now_ns - self.first[:used] >= active_ns) & ~idle
        done = np.flatnonzero(idle | active)
        if not len(done):
            return np.zeros(0, dtype=FLOW_DTYPE)
        reason = np.where(idle[done], ipfix.IDLE_TIMEOUT, ipfix.ACTIVE_TIMEOUT)
        return self._remove(done, reason)

    def drain(self, reason: int) -> np.ndarray:
        return self._remove(np.arange(self.used), reason)


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
    for k, lo, hi in (("max_flows", 1, 1 << 22), ("observation_domain", 0, (1 << 32) - 1),
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
        self.skipped = 0
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
        if p is not None:
            for ended in self.table.add(p):
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
        t = self.table
        used = t.used
        top = np.argsort(-t.bytes[:used], kind="stable")[:n]
        return [describe(x) for x in t.records(top, 0)]

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
                                "not IP, malformed, or outside the arena.", labels=["consumer"])
        s.add_metric(lab, self.skipped)
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
