"""Per-stream books: what the receiver knows of each generator stream (from the trailers), as
one snapshot a reader can keep, subtract from a later one (a trial of a benchmark), and report.

A stream's books are its sequence accounting (dataplane.consumers.flows.StreamState) and its
latency histogram (dataplane.consumers.latency).  Both are written by the consumer thread only;
a snapshot copies them without a lock, so one may be a batch ahead of the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dataplane.consumers.flows import SeqTracker
from dataplane.consumers.latency import EMPTY, LatencyHistogram, Snapshot

# the sequence counters a snapshot keeps; all but `missing` are monotonic
SEQ = ("received", "unique", "duplicates", "out_of_order", "late", "missing")


@dataclass(frozen=True)
class StreamBooks:
    """One stream at one moment.  `later - earlier` is what happened between the two."""
    received: int = 0
    unique: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    late: int = 0
    missing: int = 0       # a gauge: a late packet filling a hole makes it go down
    latency: Snapshot = EMPTY

    def __sub__(self, earlier: StreamBooks) -> StreamBooks:
        return StreamBooks(*(getattr(self, k) - getattr(earlier, k) for k in SEQ),
                           latency=self.latency - earlier.latency)

    def report(self, sent: int | None = None) -> dict[str, Any]:
        """sent (when the caller knows it: the generator's counters), received, lost,
        duplicated, reordered, late, and the latency (seconds: count, min, mean, p50, p90,
        p99, p99_9, max).  lost is sent - unique when sent is given, else the holes between
        the lowest and highest sequence numbers seen."""
        return {"sent": sent, "received": self.received, "unique": self.unique,
                "lost": (sent - self.unique) if sent is not None else self.missing,
                "duplicated": self.duplicates, "reordered": self.out_of_order,
                "late": self.late, "latency": self.latency.report()}


assert [f.name for f in fields(StreamBooks)][:len(SEQ)] == list(SEQ)


def snapshot(seq: SeqTracker, latency: Mapping[int, LatencyHistogram]) -> dict[int, StreamBooks]:
    """Every tracked stream's books, copied now."""
    out = {}
    for sid, st in list(seq.streams.items()):
        hist = latency.get(sid)
        out[sid] = StreamBooks(*(int(getattr(st, k)) for k in SEQ),
                               latency=hist.snapshot() if hist is not None else EMPTY)
    return out


def difference(later: Mapping[int, StreamBooks],
               earlier: Mapping[int, StreamBooks]) -> dict[int, StreamBooks]:
    """Per stream, what happened between two snapshots (a stream new since `earlier` counts
    from zero)."""
    return {sid: b - earlier.get(sid, StreamBooks()) for sid, b in later.items()}
