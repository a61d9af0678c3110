"""Latency with real resolution: an HDR-style log-linear histogram, recorded a batch at a time.

Why not a library: HdrHistogram_py records one value per Python call, which is per-packet Python
on the data path (docs/design.md, invariant 1).  The idea is small, so it is done here with
numpy: a value v (nanoseconds) goes to bucket

    e = max(bit_length(v) - SUB_BITS, 0)        the power of two it lies in, less the sub-bucket
    index = e * HALF + (v >> e)                 bits; contiguous, and exact below 2 * HALF

so each power of two above 2 * HALF ns is cut into HALF equal sub-buckets: a bucket is at most
1/HALF (0.098%) of its values wide, i.e. 3 significant digits, from 1 ns to MAX_NS.  A whole
batch is a float64 cast (its exponent field read as bits), a shift and one bincount; the
bincount is as long as the batch's largest index (a few thousand for microsecond latencies),
not the whole array.

Counts, sum, min and max are plain numpy arrays and ints written by the consumer thread only;
a reader copies them (snapshot()) without a lock, and may see a batch's counts before its sum:
percentiles come from the counts alone, so they are always self-consistent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SUB_BITS = 11                       # sub-buckets per power of two: 2**(SUB_BITS-1) = 1024
HALF = 1 << (SUB_BITS - 1)
MAX_NS = 1 << 37                    # ~137 s; larger values are clamped into the last bucket
N_BUCKETS = ((37 - SUB_BITS) + 2) * HALF
PRECISION = 1.0 / HALF              # a bucket's width relative to its lowest value, at most
# The Prometheus buckets: a 1-2-5 ladder from 1 us to 10 s (seconds), then +Inf
PROM_EDGES = tuple(float(f"{m}e{k}") for k in range(-6, 1) for m in (1, 2, 5)) + (10.0,)
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999))


def bucket_index(ns: np.ndarray) -> np.ndarray:
    """The bucket of each latency (int64 nanoseconds, >= 0)."""
    v = np.minimum(ns, MAX_NS - 1)
    # floor(log2 v) is the exponent field of v as a float64 (exact: every value < 2**53 is a
    # float exactly; 0's field is 0, clamped below): a cast and a shift, 4x faster than frexp
    e = v.astype(np.float64).view(np.int64)
    e >>= 52
    e -= 1023 + SUB_BITS - 1
    np.maximum(e, 0, out=e)
    v >>= e
    e *= HALF
    e += v
    return e


def bucket_low(index: np.ndarray) -> np.ndarray:
    """The lowest value (ns) of each bucket; the bucket holds [low, low + width)."""
    index = np.asarray(index, dtype=np.int64)
    e = np.maximum(index // HALF - 1, 0)
    return (index - e * HALF) << e


def bucket_width(index: np.ndarray) -> np.ndarray:
    index = np.asarray(index, dtype=np.int64)
    return np.int64(1) << np.maximum(index // HALF - 1, 0)


# A Prometheus edge E counts every bucket whose values are all <= E; the bucket that straddles
# E (its width is under 0.1% of E) counts above it.  Precomputed: the scrape is one cumsum.
_EDGE_NS = np.array([round(e * 1e9) for e in PROM_EDGES], dtype=np.int64)
_EDGE_CUT = bucket_index(_EDGE_NS + 1)   # buckets [0, cut) hold values <= E, to precision


@dataclass(frozen=True)
class Snapshot:
    """A copy of a histogram at one moment; `later - earlier` is what was recorded between.

    min_ns and max_ns are exact for a snapshot; for a difference they are the bounds of the
    lowest and highest buckets that changed (to the histogram's precision)."""
    counts: np.ndarray
    sum_ns: int
    min_ns: int
    max_ns: int

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def __sub__(self, earlier: Snapshot) -> Snapshot:
        a, b = _same_length(self.counts, earlier.counts)
        counts = a - b
        nz = np.flatnonzero(counts)
        if not nz.size:
            return Snapshot(counts, 0, -1, -1)
        lo = int(bucket_low(nz[0]))
        hi = int(bucket_low(nz[-1]) + bucket_width(nz[-1]) - 1)
        # the exact extremes still hold when they fall in those buckets
        return Snapshot(counts, self.sum_ns - earlier.sum_ns,
                        max(lo, self.min_ns) if self.min_ns >= 0 else lo,
                        min(hi, self.max_ns) if self.max_ns >= 0 else hi)

    def __add__(self, other: Snapshot) -> Snapshot:
        a, b = _same_length(self.counts, other.counts)
        counts = a + b
        mins = [m for m in (self.min_ns, other.min_ns) if m >= 0]
        return Snapshot(counts, self.sum_ns + other.sum_ns, min(mins) if mins else -1,
                        max(self.max_ns, other.max_ns))

    def quantile_ns(self, qs: Sequence[float]) -> list[int | None]:
        """For each q, the smallest recorded value v with count(<= v) >= q * count (as numpy's
        "inverted_cdf"), as the middle of its bucket: within PRECISION / 2 of the exact value,
        and clamped to the exact min and max.  None when nothing was recorded."""
        cum = np.cumsum(self.counts)
        n = int(cum[-1]) if cum.size else 0
        if n == 0:
            return [None for _ in qs]
        # q * n rounded first: 0.999 * 100000 is 99900.00000000001 in floating point, and
        # its ceiling would be the next order statistic, far off in a heavy tail
        ranks = np.maximum(np.ceil(np.round(np.asarray(qs, dtype=np.float64) * n, 6)), 1)
        idx = np.searchsorted(cum, ranks, side="left")
        mid = bucket_low(idx) + (bucket_width(idx) - 1) // 2
        lo, hi = (self.min_ns, self.max_ns)
        return [int(min(max(m, lo), hi) if lo >= 0 else m) for m in mid]

    def report(self) -> dict[str, float | int | None]:
        """count, min, mean, the QUANTILES and max, in seconds (None before any value)."""
        n = self.count
        qs = self.quantile_ns([q for _, q in QUANTILES])
        out: dict[str, float | int | None] = {"count": n}
        out["min"] = self.min_ns * 1e-9 if n else None
        out["mean"] = self.sum_ns / n * 1e-9 if n else None
        out |= {k: (v * 1e-9 if v is not None else None)
                for (k, _), v in zip(QUANTILES, qs, strict=True)}
        out["max"] = self.max_ns * 1e-9 if n else None
        return out

    def prometheus(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets (le = PROM_EDGES, then +Inf, the total count) and the sum, in
        seconds: what a histogram family's add_metric takes."""
        from prometheus_client.utils import floatToGoString
        cum = np.cumsum(self.counts)
        total = float(cum[-1]) if cum.size else 0.0
        at = np.minimum(_EDGE_CUT, len(cum)) - 1
        le = [float(cum[i]) if i >= 0 else 0.0 for i in at]
        return ([(floatToGoString(e), c) for e, c in zip(PROM_EDGES, le, strict=True)]
                + [("+Inf", total)]), self.sum_ns * 1e-9


def _same_length(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two snapshots' counts (trimmed to their highest bucket) padded to one length."""
    n = max(len(a), len(b))
    return np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))


class LatencyHistogram:
    """One stream's latencies: HDR counts, exact sum, min and max (nanoseconds)."""

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.sum_ns = 0
        self.min_ns = -1
        self.max_ns = -1

    def record(self, ns: np.ndarray) -> None:
        """Record a batch of latencies (int64 ns, none negative): one pass, no Python loop."""
        if ns.size == 0:
            return
        b = np.bincount(bucket_index(ns))
        self.counts[:b.size] += b
        self.sum_ns += int(ns.sum())
        lo, hi = int(ns.min()), int(ns.max())
        self.min_ns = lo if self.min_ns < 0 else min(self.min_ns, lo)
        self.max_ns = max(self.max_ns, hi)

    def snapshot(self) -> Snapshot:
        # the counts are trimmed to the highest used bucket: a snapshot a bench keeps per
        # trial costs what was recorded, not the whole array
        c = self.counts.copy()
        nz = np.flatnonzero(c)
        return Snapshot(c[:nz[-1] + 1] if nz.size else c[:0], self.sum_ns, self.min_ns,
                        self.max_ns)


EMPTY = Snapshot(np.zeros(0, dtype=np.int64), 0, -1, -1)
