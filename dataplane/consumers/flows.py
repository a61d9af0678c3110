"""Batch-wise flow accounting for the consumers: top flows by bytes and sequence tracking.

Both work on whole batches with numpy (docs/design.md, invariant 1) and keep bounded memory:
the flow table has
a fixed number of entries (space-saving: a new flow evicts the smallest one and inherits its
count as its error bound), and each stream's sequence bitmap is a fixed window that slides.
Their state is plain numpy arrays and ints, written by the consumer thread only; readers
(the exporter, the CLI) copy what they need and never take a lock the consumer waits on.
"""

from __future__ import annotations

import numpy as np


def group_sums(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct keys with, per key, the sum of values and the count.  A batch of one flow (the
    lab's usual case) costs one comparison instead of a sort."""
    if len(keys) == 0 or (keys == keys[0]).all():
        return keys[:1].copy(), np.array([values.sum(dtype=np.float64)]), np.array([len(keys)])
    order = keys.argsort()
    ks = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1])))
    sums = np.add.reduceat(values[order].astype(np.float64), starts)
    return ks[starts], sums, np.diff(np.append(starts, len(ks)))


class TopFlows:
    """The heaviest flows by bytes, keyed by the descriptor's 5-tuple hash, in K entries.

    update() takes descriptors only (they may be staged copies).  Frames are sampled apart:
    after each update `need` lists the top `sampled` flows that have no sample yet, and
    sample() copies the first `sample_bytes` bytes of one of their frames from a live batch,
    before it is released (the arena slot is reused right after).  So a copy happens about
    once per heavy flow, and decoding (scapy) happens in top(), on demand, never on the data
    path.
    """

    def __init__(self, capacity: int = 1024, sampled: int = 32, sample_bytes: int = 128):
        self.capacity = capacity
        self.sampled = sampled
        self.keys = np.zeros(capacity, dtype=np.uint32)
        self.bytes = np.zeros(capacity, dtype=np.float64)
        self.packets = np.zeros(capacity, dtype=np.int64)
        self.error = np.zeros(capacity, dtype=np.float64)   # bytes possibly not this flow's
        self.samples = np.zeros((capacity, sample_bytes), dtype=np.uint8)
        self.sample_len = np.zeros(capacity, dtype=np.int64)
        self.has_sample = np.zeros(capacity, dtype=bool)
        self.used = 0
        self.untracked_bytes = 0.0   # flows of a batch with more new flows than entries
        self.need = np.zeros(0, dtype=np.uint32)   # hashes of top flows still without sample
        self._sorted = np.zeros(0, dtype=np.uint32)
        self._order = np.zeros(0, dtype=np.intp)
        self._cols = np.arange(sample_bytes)

    def slots(self, flows: np.ndarray) -> np.ndarray:
        """Table index of each flow hash, -1 when it has no entry."""
        slot = np.full(len(flows), -1, dtype=np.intp)
        if self.used:
            pos = np.minimum(np.searchsorted(self._sorted, flows), self.used - 1)
            hit = self._sorted[pos] == flows
            slot[hit] = self._order[pos[hit]]
        return slot

    def update(self, desc: np.ndarray) -> None:
        flows, sums, counts = group_sums(desc["hash"], desc["len"])
        slot = self.slots(flows)
        hit = slot >= 0
        # flows are distinct, so the slots are too: plain fancy += is exact here
        self.bytes[slot[hit]] += sums[hit]
        self.packets[slot[hit]] += counts[hit]
        if not hit.all():
            self._insert(np.flatnonzero(~hit), flows, sums, counts, slot)
        top = np.arange(self.used)
        if self.used > self.sampled:
            top = np.argpartition(self.bytes[:self.used], self.used - self.sampled)[
                self.used - self.sampled:]
        self.need = self.keys[top[~self.has_sample[top]]]

    def _insert(self, miss: np.ndarray, flows: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                slot: np.ndarray) -> None:
        n_free = min(len(miss), self.capacity - self.used)
        # entries this batch already hit are kept: a batch never evicts its own flows
        n_evict = min(len(miss) - n_free, self.used - int(np.count_nonzero(slot >= 0)))
        if len(miss) > n_free:
            miss = miss[np.argsort(-sums[miss], kind="stable")]   # heaviest new flows first
            self.untracked_bytes += float(sums[miss[n_free + n_evict:]].sum())
        victims = np.zeros(0, dtype=np.intp)
        if n_evict:
            # space-saving: a newcomer replaces one of the smallest entries and takes its count
            # as its error bound
            old = self.bytes[:self.used].copy()
            old[slot[slot >= 0]] = np.inf
            victims = np.argpartition(old, n_evict - 1)[:n_evict]
            self.error[victims] = self.bytes[victims]
        fresh = np.arange(self.used, self.used + n_free)
        self.error[fresh] = 0.0
        self.bytes[fresh] = 0.0
        dest = np.concatenate((fresh, victims))
        src = miss[:len(dest)]
        self.keys[dest] = flows[src]
        self.bytes[dest] += sums[src]
        self.packets[dest] = counts[src]
        self.has_sample[dest] = False
        slot[src] = dest
        self.used += n_free
        order = np.argsort(self.keys[:self.used], kind="stable")
        self._sorted, self._order = self.keys[order], order

    def sample(self, batch: np.ndarray, buf: np.ndarray) -> None:
        """Copy one frame of each needed flow found in this live batch."""
        h = batch["hash"]
        hit = np.isin(h, self.need)
        if not hit.any():
            return
        flows, first = np.unique(h[hit], return_index=True)
        d = batch[np.flatnonzero(hit)[first]]
        dest = self.slots(flows)
        d, dest = d[dest >= 0], dest[dest >= 0]
        length = np.minimum(d["len"].astype(np.int64), self._cols.size)
        idx = d["addr"].astype(np.int64)[:, None] + self._cols
        inside = (self._cols < length[:, None]) & (idx < buf.size)
        self.samples[dest] = np.where(inside, buf[np.minimum(idx, buf.size - 1)], 0)
        self.sample_len[dest] = length
        self.has_sample[dest] = True
        self.need = self.need[~np.isin(self.need, flows)]

    def top(self, n: int = 10) -> list[dict]:
        """The n heaviest flows, each with one frame decoded by scapy (on demand, here)."""
        used = self.used
        keys, nbytes = self.keys[:used].copy(), self.bytes[:used].copy()
        packets, error = self.packets[:used].copy(), self.error[:used].copy()
        out = []
        for i in np.argsort(-nbytes, kind="stable")[:n]:
            flow = {"hash": int(keys[i]), "bytes": int(nbytes[i]), "packets": int(packets[i]),
                    "error_bytes": int(error[i])}
            frame = bytes(self.samples[i, :self.sample_len[i]]) if self.has_sample[i] else b""
            if self.keys[i] == keys[i]:   # the slot was not reused while we copied
                flow.update(decode_frame(frame))
            out.append(flow)
        return out


def decode_frame(frame: bytes) -> dict:
    """src/dst/ports/proto of one sampled frame, by scapy.  Not for the data path."""
    if not frame:
        return {"summary": "(no sample yet)"}
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    info: dict = {"summary": pkt.summary()}
    for l3 in (IP, IPv6):
        if l3 in pkt:
            info.update(src=pkt[l3].src, dst=pkt[l3].dst,
                        proto=pkt[l3].proto if l3 is IP else pkt[l3].nh)
    for l4 in (TCP, UDP):
        if l4 in pkt:
            info.update(sport=pkt[l4].sport, dport=pkt[l4].dport)
    return info


class StreamState:
    """One generator stream: a window of `window` sequence numbers as a byte map."""

    def __init__(self, window: int):
        self.seen = np.zeros(window, dtype=np.uint8)   # calloc: pages appear as they are used
        self.base = -1           # lowest sequence number inside the window
        self.min = -1
        self.max = -1
        self.received = 0        # packets with a valid trailer of this stream
        self.unique = 0          # distinct sequence numbers inside the window
        self.duplicates = 0
        self.out_of_order = 0    # arrived after a higher sequence number
        self.late = 0            # below the window: cannot tell duplicate from late

    @property
    def missing(self) -> int:
        """Sequence numbers between the lowest and highest seen that never arrived.  Can go
        down when a late packet fills a hole, so it is a gauge, not a counter."""
        return 0 if self.max < 0 else self.max - self.min + 1 - self.unique


class SeqTracker:
    """Per-stream received/unique/duplicate/out-of-order/late counts, a batch at a time."""

    def __init__(self, window: int = 1 << 22, max_streams: int = 64):
        if window & (window - 1):
            raise ValueError(f"sequence window must be a power of two, not {window}")
        self.window = window
        self.max_streams = max_streams
        self.streams: dict[int, StreamState] = {}
        self.untracked = 0       # packets of streams beyond max_streams

    def update(self, stream: np.ndarray, seq: np.ndarray) -> None:
        seq = seq.astype(np.int64)   # a garbage seq >= 2**63 turns negative: counted late
        if (stream == stream[0]).all():
            self._one(int(stream[0]), seq)
            return
        ids, inverse = np.unique(stream, return_inverse=True)
        for i, sid in enumerate(ids):   # per stream, not per packet: a handful at most
            self._one(int(sid), seq[inverse == i])

    def _one(self, sid: int, s: np.ndarray) -> None:
        st = self.streams.get(sid)
        if st is None:
            if len(self.streams) >= self.max_streams:
                self.untracked += len(s)
                return
            st = StreamState(self.window)
            # copy-on-write: a reader iterating the old dict is never disturbed
            self.streams = {**self.streams, sid: st}
        st.received += len(s)
        rising = len(s) == 1 or bool((s[1:] > s[:-1]).all())
        smax = int(s[-1] if rising else s.max())
        if rising:
            st.out_of_order += int(np.searchsorted(s, st.max))
        else:
            before = np.maximum.accumulate(np.concatenate(([st.max], s[:-1])))
            st.out_of_order += int(np.count_nonzero(s < before))
        if st.base < 0:
            st.base = max(0, int(s.min()) - self.window // 4)
        if smax >= st.base + self.window:
            self._slide(st, smax - self.window // 2)
        ok = s >= st.base
        if not ok.all():
            st.late += int(np.count_nonzero(~ok))
            s = s[ok]
            if len(s) == 0:
                return
        distinct = s if rising else np.unique(s)
        pos = distinct & (self.window - 1)
        new = len(distinct) - int(np.count_nonzero(st.seen[pos]))
        st.seen[pos] = 1
        st.unique += new
        st.duplicates += len(s) - new
        st.max = max(st.max, smax)
        low = int(distinct[0])   # sorted in both cases
        st.min = low if st.min < 0 else min(st.min, low)

    def _slide(self, st: StreamState, new_base: int) -> None:
        """Forget sequence numbers below new_base: their bytes are cleared for reuse."""
        w = self.window
        if new_base - st.base >= w:
            st.seen[:] = 0
        else:
            a, b = st.base & (w - 1), new_base & (w - 1)
            if a <= b:
                st.seen[a:b] = 0
            else:
                st.seen[a:] = 0
                st.seen[:b] = 0
        st.base = new_base
