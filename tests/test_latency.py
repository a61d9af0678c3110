"""Latency per stream: the HDR histogram against numpy's exact percentiles of the same values,
snapshots and their differences, the stats consumer's per-stream books from real arenas, the
Prometheus histogram a real exporter serves, and a live lab run's books (/streams, `status`,
the line a second, `run --json`)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.utils import floatToGoString
from scapy.layers.inet import IP, UDP

from dataplane.consumers.latency import (
    MAX_NS,
    PRECISION,
    PROM_EDGES,
    QUANTILES,
    LatencyHistogram,
    bucket_index,
    bucket_low,
    bucket_width,
)
from dataplane.consumers.loop import drain, ring_sources
from dataplane.consumers.stats import TrafficStats
from dataplane.metrics.arenas import ArenaCollector
from dataplane.metrics.consumers import ConsumerCollector
from dataplane.metrics.server import serve
from tests.helpers.frames import RingFiller, frame
from tests.helpers.metrics import promtool_check, samples, scrape

QS = [q for _, q in QUANTILES]
RNG = np.random.default_rng(14)
DISTRIBUTIONS = {   # nanoseconds, int64: bulk and heavy tails, 100 ns to 100 s
    "uniform_us": lambda n: RNG.integers(5_000, 60_000, n),
    "lognormal": lambda n: RNG.lognormal(10, 2, n),
    "pareto": lambda n: (RNG.pareto(1.1, n) + 1) * 2_000,
    "log_uniform_100ns_100s": lambda n: 10 ** RNG.uniform(2, 11, n),
    "exact_small": lambda n: RNG.integers(0, 2048, n),
    "bimodal": lambda n: np.where(RNG.random(n) < 0.995, RNG.normal(20_000, 500, n),
                                  RNG.normal(5e6, 1e5, n)),
    "constant": lambda n: np.full(n, 123_456_789),
}


def within(got: int | None, exact: int, buckets: float = 0.5) -> bool:
    """Within the histogram's stated precision: half a bucket (a percentile is its bucket's
    middle), a bucket being at most PRECISION of its values wide."""
    return got is not None and abs(got - exact) <= exact * PRECISION * buckets + 1


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_percentiles_match_numpy_within_precision(dist: str) -> None:
    values = np.clip(DISTRIBUTIONS[dist](200_000), 0, MAX_NS - 1).astype(np.int64)
    h = LatencyHistogram()
    for part in np.array_split(values, 37):   # batches of any size: the same histogram
        h.record(part)
    snap = h.snapshot()
    exact = np.quantile(values, QS, method="inverted_cdf")
    got = snap.quantile_ns(QS)
    for q, g, e in zip(QS, got, exact, strict=True):
        assert within(g, int(e)), (dist, q, g, int(e))
    assert snap.count == len(values) and snap.sum_ns == int(values.sum())
    assert (snap.min_ns, snap.max_ns) == (int(values.min()), int(values.max()))
    rep = snap.report()
    assert rep["min"] <= rep["p50"] <= rep["p90"] <= rep["p99"] <= rep["p99_9"] <= rep["max"]
    assert rep["mean"] == pytest.approx(values.mean() * 1e-9)


def test_buckets_tile_the_range_at_three_significant_digits() -> None:
    v = np.unique(np.concatenate((np.arange(0, 70_000), 10 ** RNG.uniform(4, 11, 100_000),
                                  [MAX_NS - 1]))).astype(np.int64)
    idx = bucket_index(v)
    assert (np.diff(idx) >= 0).all(), "monotonic"
    low, width = bucket_low(idx), bucket_width(idx)
    assert ((low <= v) & (v < low + width)).all(), "each value inside its bucket"
    big = low >= 1024        # below, a bucket is one value: exact
    assert (width[big] <= low[big] * PRECISION).all()
    assert (idx[v < 2048] == v[v < 2048]).all(), "exact below 2048 ns"
    # contiguous: every index from 0 up is some bucket's, and the next bucket starts where the
    # last one ended
    every = np.arange(int(idx.max()) + 1)
    assert (bucket_low(every[1:]) == bucket_low(every[:-1]) + bucket_width(every[:-1])).all()


def test_snapshot_difference_is_the_trial_alone() -> None:
    h = LatencyHistogram()
    before = RNG.lognormal(12, 1, 50_000).astype(np.int64)
    trial = RNG.lognormal(9, 0.5, 30_000).astype(np.int64)
    h.record(before)
    s0 = h.snapshot()
    h.record(trial)
    s1 = h.snapshot()
    d = s1 - s0
    alone = LatencyHistogram()
    alone.record(trial)
    a = alone.snapshot()
    n = max(len(d.counts), len(a.counts))
    assert (np.pad(d.counts, (0, n - len(d.counts))) ==
            np.pad(a.counts, (0, n - len(a.counts)))).all()
    assert d.sum_ns == int(trial.sum()) and d.count == len(trial)
    assert d.quantile_ns(QS) == a.quantile_ns(QS)
    # a difference's extremes are its extreme buckets' bounds: one bucket at most
    assert within(d.min_ns, int(trial.min()), 1) and within(d.max_ns, int(trial.max()), 1)
    assert d.min_ns <= int(trial.min()) and d.max_ns >= int(trial.max())
    both = s0 + d
    assert both.count == s1.count and both.quantile_ns(QS) == s1.quantile_ns(QS)
    assert (s1 - s1).count == 0 and (s1 - s1).report()["p50"] is None


def generated(n: int, stream: int, lat_ns: np.ndarray, seq0: int = 0, now: int = 10**18,
              skip: tuple[int, ...] = ()) -> tuple[list[bytes], list[int]]:
    seqs = [s for s in range(seq0, seq0 + n) if s not in skip]
    frames = [frame(IP() / UDP(), 80, seq=s, tx_ns=now, stream=stream) for s in seqs]
    return frames, [now + int(x) for x in lat_ns[:len(seqs)]]


def test_stream_books_from_real_arenas(arena) -> None:
    """Two streams interleaved in batches: each stream's books (counts, loss, reorder,
    duplicates) and latency are its own; a trial is a difference of snapshots."""
    filler = RingFiller(arena)
    stats = TrafficStats()
    lat7 = RNG.integers(10_000, 20_000, 300)
    lat8 = RNG.integers(1_000_000, 3_000_000, 300)
    f7, rx7 = generated(200, 7, lat7, skip=(5, 6))
    f8, rx8 = generated(100, 8, lat8)
    f8.append(f8[10])                                 # a duplicate
    rx8.append(rx8[10])
    for i in range(0, 200, 50):
        j = i // 2
        filler.put(f7[i:i + 50] + f8[j:j + 25], rx_ns=rx7[i:i + 50] + rx8[j:j + 25])
        drain(ring_sources([arena]), [stats])
    filler.put(f8[100:], rx_ns=rx8[100:])
    filler.put([frame(IP() / UDP(), 80, seq=300, tx_ns=10**18, stream=7)], rx_ns=[10**18 - 5])
    drain(ring_sources([arena]), [stats])
    stats.flush()
    r7, r8 = stats.stream_report(7), stats.stream_report(8, sent=100)
    # 0..199 but 5 and 6, then 300: 102 holes between the lowest and the highest
    assert (r7["received"], r7["unique"], r7["lost"]) == (199, 199, 102)
    assert r7["latency"]["count"] == 198, "the negative latency is not recorded"
    assert (r8["received"], r8["duplicated"], r8["lost"], r8["reordered"]) == (101, 1, 0, 1)
    for r, lat in ((r7, lat7[:198]), (r8, np.concatenate((lat8[:100], lat8[10:11])))):
        lr = r["latency"]
        assert lr["count"] == len(lat) and lr["max"] == pytest.approx(lat.max() * 1e-9)
        exact = np.quantile(lat, QS, method="inverted_cdf")
        for (k, _), e in zip(QUANTILES, exact, strict=True):
            assert within(round(lr[k] * 1e9), int(e)), (k, lr[k], e)
    # a trial: what came after a snapshot only
    mark = stats.snapshot()
    f, rx = generated(50, 8, np.full(50, 42_000), seq0=100)
    filler.put(f, rx_ns=rx)
    drain(ring_sources([arena]), [stats])
    stats.flush()
    t8 = stats.stream_report(8, since=mark, sent=50)
    assert (t8["received"], t8["lost"], t8["duplicated"]) == (50, 0, 0)
    assert t8["latency"]["count"] == 50
    assert within(round(t8["latency"]["p50"] * 1e9), 42_000)
    assert within(round(t8["latency"]["max"] * 1e9), 42_000, 1)
    assert stats.stream_report(7, since=mark)["latency"]["count"] == 0
    every = stats.stream_reports(since=mark)
    assert sorted(every) == [7, 8] and every[8] == {**t8, "sent": None, "lost": 0}
    assert stats.stream_report(99)["received"] == 0, "an unknown stream is empty, not an error"


def test_exporter_histogram_is_cumulative_and_matches_the_books(arena) -> None:
    filler = RingFiller(arena)
    lat = np.concatenate((RNG.integers(1_500, 900_000, 400), [3_000, 20_000_000, 3 * 10**9]))
    f, rx = generated(len(lat), 3, lat)
    stats = TrafficStats()
    for i in range(0, len(f), 100):
        filler.put(f[i:i + 100], rx_ns=rx[i:i + 100])
        drain(ring_sources([arena]), [stats])
    stats.flush()
    arenas = ArenaCollector([("w0", arena, ["in", "out"])])
    with serve(arenas, ConsumerCollector(stats, None, arenas), port=0) as server:
        text = scrape(server.address)
    promtool_check(text)
    got = samples(text)
    fam = "dataplane_stream_latency_seconds"
    le = [got[(fam + "_bucket", (("le", floatToGoString(e)), ("stream", "3")))]
          for e in PROM_EDGES]
    total = got[(fam + "_bucket", (("le", "+Inf"), ("stream", "3")))]
    assert le == sorted(le), "cumulative"
    assert total == got[(fam + "_count", (("stream", "3"),))] == len(lat)
    assert total == stats.stream_report(3)["received"]
    assert got[(fam + "_sum", (("stream", "3"),))] == pytest.approx(lat.sum() * 1e-9)
    for e, c in zip(PROM_EDGES, le, strict=True):
        # the bucket straddling an edge is 0.1% of it wide: only values that close may differ
        sure = np.count_nonzero(lat <= e * 1e9 * (1 - PRECISION))
        maybe = np.count_nonzero(lat <= e * 1e9)
        assert sure <= c <= maybe, (e, sure, c, maybe)


@pytest.mark.root("the lab: netns, veth")
def test_live_run_per_stream_percentiles(tmp_path) -> None:
    """A lab run: its per-stream books at /streams, in `status --json` and in the run's final
    books, with ordered percentiles and as many latencies as packets received."""
    from tests.helpers.live_run import dp, live_run

    tag = f"{os.getpid() % 10000}L"
    with live_run(tmp_path, tag, "--json", "--progress", rate=5000) as run:
        url = run.url.rsplit("/", 1)[0] + "/streams"
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(url, timeout=5) as r:
                books = json.load(r)["streams"]
            if books and next(iter(books.values()))["received"] > 1000:
                break
            assert time.monotonic() < deadline, books
            time.sleep(0.3)
        status = json.loads(dp("status", "--json", "--config", str(run.config)).stdout)
        text = dp("status", "--config", str(run.config)).stdout
    (sid, s), = status["streams"]["streams"].items()
    assert s["received"] >= 1000 and f"stream {sid}: received" in text, text
    for one in (s, next(iter(books.values()))):
        lat = one["latency"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"] < 1, lat
        assert lat["min"] <= lat["mean"] <= lat["max"]
        # every received packet of the stream has a latency (no clock skew on one host),
        # give or take the batch a copy may see between the two books
        assert abs(lat["count"] - one["received"]) <= 4096, one
    # the line a second: percentiles of the streams' histograms, not bucket edges
    assert re.search(r"latency p50 [\d.]+(us|ms|s) p99 [\d.]+(us|ms|s) \|", run.output())
    # the run's final books (`run --json`, after the last fold): exactly one latency per
    # packet received
    last = [ln for ln in run.output().splitlines() if ln.startswith("{")][-1]
    final = json.loads(last)["streams"][sid]
    lat = final["latency"]
    assert lat["count"] == final["received"] >= s["received"], final
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"], lat
    assert re.search(rf"stream {sid} from .* latency us: p50 [\d.]+ p99 [\d.]+ p99.9 [\d.]+ "
                     r"max [\d.]+", run.output()), run.output()
