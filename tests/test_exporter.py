"""The exporter over real HTTP: values equal the shared-memory counters, promtool accepts the
text, a closed arena gives a partial scrape, and scrapes do not stall the consumer."""

from __future__ import annotations

import gzip
import inspect
import threading
import time
import urllib.request

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from scapy.layers.inet import IP, TCP, UDP

from dataplane.consumers.loop import ConsumerLoop, drain, ring_sources
from dataplane.consumers.stats import TrafficStats
from dataplane.metrics.arenas import ArenaCollector
from dataplane.metrics.consumers import ConsumerCollector
from dataplane.metrics.families import exposition
from dataplane.metrics.server import serve
from dataplane.shm.layout import PORT_COUNTERS, RING_COUNTERS
from tests.helpers.frames import RingFiller, frame
from tests.helpers.metrics import promtool_check, samples, scrape


@pytest.fixture
def arenas(new_arena):
    return [new_arena("exp"), new_arena("exp")]


def collectors(workers, stats, loop=None) -> tuple[ArenaCollector, ConsumerCollector]:
    """What a run serves of its arenas and consumers (transports aside)."""
    arenas = ArenaCollector(workers)
    return arenas, ConsumerCollector(stats, loop, arenas)


def set_counters(arena, base: int) -> None:
    """Play the worker: distinct values in every shared-memory counter."""
    for i, ring in enumerate(arena.rings):
        ring.counters[:len(RING_COUNTERS)] = [base + 10 * i + k for k in range(len(RING_COUNTERS))]
    for p in range(arena.n_ports):
        arena.port_counters[p, :len(PORT_COUNTERS)] = [base + 100 * p + k + 50
                                                       for k in range(len(PORT_COUNTERS))]
    h = arena.header
    h.state, h.heartbeat_ns, h.restarts, h.zero_copy = 2, time.monotonic_ns(), 3, 1
    h.loops, h.busy_cycles, h.total_cycles = base + 1, 250, 1000


def test_scrape_equals_shared_memory_and_passes_promtool(arenas):
    a, b = arenas
    set_counters(a, 1000)
    set_counters(b, 2000)
    b.header.heartbeat_ns = time.monotonic_ns() - 5 * 10**9    # stale: not up
    filler = RingFiller(a, 1)
    now = time.time_ns()
    filler.put([frame(IP() / UDP(), 100, seq=i, tx_ns=now) for i in range(10)], rx_ns=now + 30_000)
    filler.put([frame(IP() / TCP(), 1400)] * 3)
    stats = TrafficStats()
    drain(ring_sources([a]), [stats])
    both = collectors([("w0", a, ["wan", "lan"]), ("w1", b, ["p0", "p1"])], stats)
    with serve(*both, port=0) as server:
        assert server.address[0] == "127.0.0.1"
        text = scrape(server.address)
    promtool_check(text)
    got = samples(text)

    def v(name, **labels):
        return got[(name, tuple(sorted(labels.items())))]

    assert v("dataplane_rx_packets_total", worker="w0", port="wan", queue="0") == 1000
    assert v("dataplane_ring_full_drops_total", worker="w0", port="lan", queue="0") == 1012
    assert v("dataplane_copied_packets_total", worker="w1", port="p1", queue="0") == 2015
    assert v("dataplane_tx_dropped_packets_total", worker="w0", port="lan") == 1152
    assert v("dataplane_rx_nombuf_total", worker="w1", port="p0") == 2055
    assert v("dataplane_ring_occupancy_ratio", worker="w0", port="lan", queue="0") == 0
    assert v("dataplane_worker_up", worker="w0") == 1 and v("dataplane_worker_up", worker="w1") == 0
    assert v("dataplane_worker_state", worker="w0", state="running") == 1
    assert v("dataplane_worker_restarts_total", worker="w0") == 3
    assert v("dataplane_worker_busy_ratio", worker="w0") == 0.25
    lan = {"worker": "w0", "port": "lan", "queue": "0"}
    assert v("dataplane_consumer_ethertype_packets_total", ethertype="ipv4", **lan) == 13
    assert v("dataplane_consumer_l4_bytes_total", l4proto="tcp", **lan) == 4200
    assert v("dataplane_packet_size_bytes_bucket", le="128.0", **lan) == 10
    assert v("dataplane_packet_size_bytes_count", **lan) == 13
    assert v("dataplane_packet_size_bytes_sum", **lan) == 5200
    assert v("dataplane_latency_seconds_bucket", le="2.5e-05", **lan) == 0
    assert v("dataplane_latency_seconds_bucket", le="5e-05", **lan) == 10
    assert v("dataplane_latency_seconds_sum", **lan) == pytest.approx(10 * 30e-6)
    assert v("dataplane_sequence_unique_total", stream="1") == 10
    assert v("dataplane_sequence_missing_packets", stream="1") == 0


class Awkward(Collector):
    """Families with what a formatter gets wrong: escapes, odd numbers, a timestamp, an info
    family and an OpenMetrics-only sample (the last three take prometheus_client's path)."""

    def collect(self):
        g = GaugeMetricFamily("odd_values", 'doc with \\ and\nnewline "quoted"', labels=["v"])
        for v in ('back\\slash', 'new\nline', 'quo"te', "ünï", ""):
            g.add_metric([v], 1.0)
        for i, x in enumerate((0.0, -0.0, -1.5, 1e-9, 123456.0, 1234567.0, 2**64 - 1, 1e22,
                               float("inf"), float("-inf"), float("nan"), 7, 1 / 3)):
            g.add_metric([f"n{i}"], x)
        yield g
        c = CounterMetricFamily("stamped", "with a timestamp", labels=["a"])
        c.add_metric(["x"], 3, timestamp=1700000000.5)
        yield c
        yield InfoMetricFamily("some", "an info family", value={"k": "v"})
        h = HistogramMetricFamily("lat", "a histogram", labels=["z", "a"])
        h.add_metric(["1", "2"], [("0.5", 1.0), ("+Inf", 2.0)], 0.7)
        yield h
        u = Metric("odd", "unknown type", "unknown")
        u.add_sample("odd", {}, 4.0)
        yield u
        om = CounterMetricFamily("made", "a _created sample", labels=[])
        om.add_metric([], 1, created=1700000000.0)
        yield om


def test_exposition_is_prometheus_clients_byte_for_byte(arenas):
    """Ours writes the text format instead of prometheus_client (for the CPU a scrape takes
    from the run): the very same bytes, straight and over HTTP, gzip too, and an OpenMetrics
    request still answered by prometheus_client."""
    a, b = arenas
    set_counters(a, 10**7)
    set_counters(b, 3)
    filler = RingFiller(a, 1)
    now = time.time_ns()
    filler.put([frame(IP() / UDP(), 100, seq=i, tx_ns=now) for i in range(10)], rx_ns=now + 30_000)
    stats = TrafficStats()
    drain(ring_sources([a]), [stats])
    both = collectors([("w0", a, ['wa"n', "la\\n"]), ("w1", b, ["p0", "p1"])], stats)
    with serve(*both, Awkward(), port=0) as server:
        want = generate_latest(server.registry)
        ours = exposition(server.registry.collect())
        assert b"dataplane_rx_packets_total" in want and b'wa\\"n' in want
        host, port = server.address
        url = f"http://{host}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
            body = r.read()
        zipped = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(zipped, timeout=5) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            unzipped = gzip.decompress(r.read())
        om = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(om, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().endswith(b"# EOF\n")
    # every byte alike but the heartbeat ages, which time moved between the reads
    def stable(text: bytes) -> list[bytes]:
        return [ln for ln in text.splitlines(keepends=True) if b"heartbeat_age_seconds{" not in ln]
    assert stable(ours) == stable(want) == stable(body) == stable(unzipped)
    assert len(stable(want)) == len(want.splitlines()) - 2


def test_default_bind_is_loopback():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_closed_arena_gives_partial_scrape(arenas):
    a, b = arenas
    set_counters(a, 1000)
    both = collectors([("w0", a, []), ("w1", b, [])], TrafficStats())
    b.close()
    with serve(*both, port=0) as server:
        got = samples(scrape(server.address))
    assert got[("dataplane_rx_packets_total", (("port", "0"), ("queue", "0"),
                                               ("worker", "w0")))] == 1000
    assert not any(dict(labels).get("worker") == "w1" for _, labels in got)
    assert got[("dataplane_exporter_source_errors_total", (("source", "w1"),))] == 1


class ConsumerWatch:
    """A collector that, in the middle of a scrape, waits until the consumer has taken more
    descriptors: it proves consumption goes on while a scrape is in progress (a scrape holding
    anything the consumer needs would never see progress). No wall-clock threshold: the
    timeout only bounds how long a broken build takes to fail."""

    def __init__(self, loop: ConsumerLoop) -> None:
        self.loop = loop
        self.progressed: list[bool] = []

    def collect(self):
        before = self.loop.descriptors
        deadline = time.monotonic() + 30
        while self.loop.descriptors <= before and time.monotonic() < deadline:
            time.sleep(0.001)
        self.progressed.append(self.loop.descriptors > before)
        return iter(())


def test_scrapes_do_not_stall_the_consumer(arenas):
    a = arenas[0]
    filler = RingFiller(a)
    filler.put([frame(IP() / UDP(), 64)] * filler.r.size)
    stop = threading.Event()

    def produce():   # keep the ring busy: re-publish the same descriptors as they are freed
        while not stop.is_set():
            filler.prod = filler.r.cons + filler.r.size
            filler.publish()
            time.sleep(0.0002)

    stats = TrafficStats()
    loop = ConsumerLoop(ring_sources([a]), [stats], max_batch=256)
    watch = ConsumerWatch(loop)
    both = collectors([("w0", a, [])], stats, loop)
    producer = threading.Thread(target=produce)
    with loop, serve(*both, watch, port=0) as server:
        producer.start()
        try:
            for _ in range(20):
                got = samples(scrape(server.address))
                assert got[("dataplane_consumer_loop_batches_total", ())] > 0
                assert got[("dataplane_consumer_batches_total", (("consumer", "stats"),))] > 0
        finally:
            stop.set()
            producer.join()
    assert watch.progressed == [True] * 20
    assert stats.rings[(a.path, 0, 0)].marginals()["l4_packets"].sum() > 0
    assert loop.errors == 0
