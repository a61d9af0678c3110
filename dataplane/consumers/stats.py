"""Traffic statistics: what the batches are made of, folded with numpy, never per packet.

No per-packet Python anywhere (docs/design.md, invariant 1): TrafficStats folds a batch into
its counters with a handful of numpy calls whatever the batch size.

All state is plain numpy arrays and ints written by the consumer thread only.  Readers (the
exporter) copy it at scrape time without a lock (invariant 7); a scrape may see one counter a
batch ahead of another, never a torn single value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataplane._native import lib
from dataplane.consumers.api import Batch
from dataplane.consumers.flows import SeqTracker, TopFlows
from dataplane.consumers.latency import LatencyHistogram
from dataplane.consumers.streams import StreamBooks, difference, snapshot
from dataplane.shm.arena import Arena
from dataplane.shm.layout import DESC_DTYPE, TRAILER_DTYPE

ETHERTYPES = ("ipv4", "ipv6", "arp", "other")
L4PROTOS = ("tcp", "udp", "icmp", "icmpv6", "other", "none")
SIZE_EDGES = (64, 128, 256, 512, 1024, 1518, 9000)           # bytes; a last bucket is +Inf
FLAGS = (("malformed", lib.DP_F_MALFORMED), ("truncated", lib.DP_F_TRUNCATED))
LATENCY_EDGES = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                 0.05, 0.1, 0.25, 0.5, 1.0)                  # seconds; a last bucket is +Inf
LATENCY_ABSURD_NS = 60 * 10**9   # beyond this the clocks disagree: counted apart, not binned
# Rings (arena, port, queue) one TrafficStats keeps statistics for: a ring's (port, queue) is
# what its producer wrote into its descriptors, and a producer that writes a new one per batch
# (a remote peer, a corrupt ring) must not grow this state and the Prometheus series without
# bound.  A real run has a few rings per worker; batches of rings past the cap are counted.
MAX_RINGS = 1024
_TRAILER_RAW = np.dtype(f"V{TRAILER_DTYPE.itemsize}")
_DESC_RAW = np.dtype(f"V{DESC_DTYPE.itemsize}")

# Every descriptor gets one code = (ethertype, l4proto, size bucket, flags), and one bincount
# per batch counts them all; the per-label totals are marginals, computed at scrape time.
_SHAPE = (len(ETHERTYPES), len(L4PROTOS), len(SIZE_EDGES) + 1, 1 << len(FLAGS))
N_CODES = int(np.prod(_SHAPE))
_STRIDE = [int(np.prod(_SHAPE[i + 1:])) for i in range(len(_SHAPE))]


def _luts() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables from a descriptor field straight to its share of the code."""
    eth = np.full(1 << 16, ETHERTYPES.index("other"), dtype=np.intp)
    eth[[0x0800, 0x86DD, 0x0806]] = [0, 1, 2]
    l4 = np.full(256, L4PROTOS.index("other"), dtype=np.intp)
    l4[[6, 17, 1, 58, 0]] = [0, 1, 2, 3, 5]
    size = np.searchsorted(np.array(SIZE_EDGES), np.arange(1 << 16), side="left")
    flags = np.zeros(1 << 16, dtype=np.intp)
    for bit, (_, mask) in enumerate(FLAGS):
        flags[(np.arange(1 << 16) & mask) != 0] += 1 << bit
    return eth * _STRIDE[0], l4 * _STRIDE[1], size * _STRIDE[2], flags


_ETH_LUT, _L4_LUT, _SIZE_LUT, _FLAG_LUT = _luts()
_LATENCY_EDGES_NS = np.array([round(e * 1e9) for e in LATENCY_EDGES], dtype=np.int64)
# The histogram's edges with -1 in front and LATENCY_ABSURD_NS behind: searchsorted (side
# "left": bin i holds edge[i-1] < lat <= edge[i]) then puts a negative latency (the clocks
# disagree) in bin 0 and an absurd one in the last, so one searchsorted and one bincount sort
# every latency of a batch, the insane ones included, with no mask and no compaction.
_LATENCY_BINS_NS = np.concatenate(([-1], _LATENCY_EDGES_NS, [LATENCY_ABSURD_NS]))



class RingStats:
    """Counters of one (arena, port, queue), as filled by TrafficStats, and its staging area:
    descriptors (and the trailers of generated frames) wait here until a fold."""

    def __init__(self, path: Path, port: int, queue: int, stage: int):
        self.path, self.port, self.queue = path, port, queue
        self.packets = np.zeros(N_CODES, dtype=np.int64)
        self.bytes = np.zeros(N_CODES, dtype=np.float64)
        self.latency = np.zeros(len(LATENCY_EDGES) + 1, dtype=np.int64)
        self.latency_sum = 0.0       # seconds
        self.latency_negative = 0    # rx before tx: the two clocks disagree
        self.latency_absurd = 0      # more than LATENCY_ABSURD_NS
        self.bad_trailer = 0         # DP_F_GENERATED but no valid trailer (short, magic wrong)
        self.desc = np.zeros(stage, dtype=_DESC_RAW)        # raw copies: memcpy, not per field
        self.trailer = np.zeros(stage, dtype=_TRAILER_RAW)  # meaningful where DP_F_GENERATED
        self.staged = 0
        self.arena_size = 0
        self.sampled_at = -1         # TrafficStats.folds when this ring last looked for samples

    def marginals(self) -> dict[str, np.ndarray]:
        """Per-label totals from one copy of the code counters (consistent among themselves)."""
        p = self.packets.copy().reshape(_SHAPE)
        b = self.bytes.copy().reshape(_SHAPE)
        flags = p.sum(axis=(0, 1, 2))
        return {
            "eth_packets": p.sum(axis=(1, 2, 3)), "eth_bytes": b.sum(axis=(1, 2, 3)),
            "l4_packets": p.sum(axis=(0, 2, 3)), "l4_bytes": b.sum(axis=(0, 2, 3)),
            "size_counts": p.sum(axis=(0, 1, 3)), "bytes": np.array(b.sum()),
            "flags": np.array([flags[[i for i in range(len(flags)) if i >> bit & 1]].sum()
                               for bit in range(len(FLAGS))]),
        }


class TrafficStats:
    """Per (worker arena, port, queue): packets and bytes by ethertype and L4 protocol, flag
    counts, a size histogram, end-to-end latency of our generated traffic; per generator
    stream: sequence tracking and an HDR latency histogram (the stream's books: snapshot(),
    stream_report()); over all: the top flows by bytes.

    consume() only copies what it needs out of the arena (the descriptors, and the 24-byte
    trailers when the batch has generated frames: one gather) and folds `stage` descriptors at a
    time, so the fixed cost of each numpy call is paid per few thousand packets whatever the
    batch size.  It is a consumer (dataplane.consumers.api) like any other: on_batch() stages,
    tick() folds what is staged.
    """

    def __init__(self, flow_capacity: int = 1024, seq_window: int = 1 << 22, stage: int = 4096,
                 max_rings: int = MAX_RINGS):
        self.rings: dict[tuple[Path, int, int], RingStats] = {}
        self.max_rings = max_rings
        self.untracked_packets = 0   # in batches of rings past max_rings: not in any statistic
        self.flows = TopFlows(flow_capacity)
        self.streams = SeqTracker(seq_window)
        # per tracked stream: latency to 3 significant digits (dataplane.consumers.latency)
        self.stream_latency: dict[int, LatencyHistogram] = {}
        self.stage = stage
        self.folds = 0

    name = "stats"

    def on_batch(self, batch: Batch) -> None:
        self.consume(batch.desc, batch.arena)

    def tick(self, now: float) -> None:
        self.flush()

    def close(self) -> None:
        self.flush()

    def consume(self, batch: np.ndarray, arena: Arena) -> None:
        n = len(batch)
        if n == 0:
            return
        # a ring carries one (port, queue) (struct dp_ring): the first descriptor names it
        key = (arena.path, int(batch["port"][0]), int(batch["queue"][0]))
        rs = self.rings.get(key)
        if rs is None:
            if len(self.rings) >= self.max_rings:
                self.untracked_packets += n
                return
            rs = RingStats(*key, stage=max(self.stage, n))
            self.rings = {**self.rings, key: rs}   # copy-on-write for lock-free readers
        if rs.staged + n > len(rs.desc):
            self._fold(rs)
            if n > len(rs.desc):
                rs.desc = np.zeros(n, dtype=_DESC_RAW)
                rs.trailer = np.zeros(n, dtype=_TRAILER_RAW)
        k = rs.staged
        rs.desc[k:k + n] = batch.view(_DESC_RAW)
        if np.bitwise_or.reduce(batch["flags"]) & lib.DP_F_GENERATED:
            buf = arena.buf
            # every byte offset of the arena seen as a trailer, since trailers sit at any
            # alignment; gathered as opaque 24-byte items (6x faster than as a struct).  The
            # offset is clamped so a bad descriptor cannot fault; _fold() checks it properly.
            at = np.ndarray((buf.size - TRAILER_DTYPE.itemsize + 1,), dtype=_TRAILER_RAW,
                            buffer=buf, strides=(1,))
            start = batch["addr"] + batch["len"]
            start -= np.uint64(TRAILER_DTYPE.itemsize)
            np.minimum(start, np.uint64(at.size - 1), out=start)
            rs.trailer[k:k + n] = at[start.astype(np.intp)]
            rs.arena_size = buf.size
        rs.staged = k + n
        if rs.sampled_at != self.folds and self.flows.need.size:
            # top flows without a sample yet: look for them once per ring per fold, not in
            # every batch (the top set jitters among near-equal flows)
            rs.sampled_at = self.folds
            self.flows.sample(batch, arena.buf)

    def flush(self) -> None:
        for rs in list(self.rings.values()):
            if rs.staged:
                self._fold(rs)

    def _fold(self, rs: RingStats) -> None:
        # staged descriptors are folded once, even when folding fails part-way: folding them
        # again would count every sequence number in them again, as duplicates
        try:
            self._fold_staged(rs)
        finally:
            rs.staged = 0
            self.folds += 1

    def _fold_staged(self, rs: RingStats) -> None:
        d = rs.desc[:rs.staged].view(DESC_DTYPE)
        tr = rs.trailer[:rs.staged].view(TRAILER_DTYPE)
        length = d["len"]
        code = _ETH_LUT.take(d["ethertype"])
        code += _L4_LUT.take(d["l4proto"])
        code += _SIZE_LUT.take(length)
        code += _FLAG_LUT.take(d["flags"])
        rs.packets += np.bincount(code, minlength=N_CODES)
        rs.bytes += np.bincount(code, weights=length, minlength=N_CODES)
        gen = (d["flags"] & lib.DP_F_GENERATED) != 0
        n_gen = int(np.count_nonzero(gen))
        if n_gen:
            self._generated(d if n_gen == len(d) else d[gen], tr if n_gen == len(d) else tr[gen],
                            rs)
        self.flows.update(d)

    def _generated(self, g: np.ndarray, tr: np.ndarray, rs: RingStats) -> None:
        """Latency and sequence numbers of generated frames with a valid trailer."""
        length = g["len"]
        end = g["addr"] + length
        ok = ((length >= TRAILER_DTYPE.itemsize) & (end <= np.uint64(rs.arena_size))
              & (tr["magic"] == lib.DP_GEN_MAGIC))
        if not ok.all():
            rs.bad_trailer += int(np.count_nonzero(~ok))
            g, tr = g[ok], tr[ok]
            if len(g) == 0:
                return
        lat = g["rx_ns"].view(np.int64) - tr["tx_ns"].view(np.int64)
        counts = np.bincount(np.searchsorted(_LATENCY_BINS_NS, lat, side="left"),
                             minlength=len(_LATENCY_BINS_NS) + 1)
        stream = tr["stream"]
        if counts[0] or counts[-1]:
            rs.latency_negative += int(counts[0])
            rs.latency_absurd += int(counts[-1])
            # summed and recorded without them: garbage timestamps would wrap an int64 sum
            sane = (lat >= 0) & (lat <= LATENCY_ABSURD_NS)
            lat, stream = lat[sane], stream[sane]
        rs.latency += counts[1:-1]
        rs.latency_sum += float(lat.sum()) * 1e-9
        self.streams.update(tr["stream"], tr["seq"])
        if len(lat):
            self._record_latency(stream, lat)

    def _record_latency(self, stream: np.ndarray, lat: np.ndarray) -> None:
        """Each stream's latencies into its histogram: one record() per stream in the batch
        (a handful), for the streams the sequence tracker tracks (so both stay bounded)."""
        if (stream == stream[0]).all():
            groups = [(int(stream[0]), lat)]
        else:
            ids, inverse = np.unique(stream, return_inverse=True)
            groups = [(int(sid), lat[inverse == i]) for i, sid in enumerate(ids)]
        for sid, values in groups:
            hist = self.stream_latency.get(sid)
            if hist is None:
                if sid not in self.streams.streams:
                    continue
                hist = LatencyHistogram()
                # copy-on-write, as the other dicts here: a scrape iterating it is undisturbed
                self.stream_latency = {**self.stream_latency, sid: hist}
            hist.record(values)

    # -- the per-stream books, for a bench or a report (dataplane.consumers.streams) --
    def snapshot(self) -> dict[int, StreamBooks]:
        """Every tracked stream's sequence counts and latency, copied now: keep one before a
        trial, and stream_report(sid, since=it) after it gives that trial's figures only."""
        return snapshot(self.streams, self.stream_latency)

    def stream_report(self, stream: int, since: dict[int, StreamBooks] | None = None,
                      sent: int | None = None) -> dict:
        """One stream's books as a dict (StreamBooks.report: received, lost, duplicated,
        reordered, late, latency percentiles in seconds), since a snapshot() if given.  `sent`
        is what the generator sent in the same span: lost is then sent - unique."""
        now = self.snapshot()
        books = (difference(now, since) if since is not None else now).get(stream)
        return (books or StreamBooks()).report(sent)

    def stream_reports(self, since: dict[int, StreamBooks] | None = None) -> dict[int, dict]:
        """Every tracked stream's report, since a snapshot() or the start (what /streams and
        status show)."""
        now = self.snapshot()
        books = difference(now, since) if since is not None else now
        return {sid: b.report() for sid, b in sorted(books.items())}

    def top_flows(self, n: int = 10) -> list[dict]:
        """The n heaviest flows by bytes, decoded with scapy now (not on the data path)."""
        return self.flows.top(n)
