"""Consumers against real arenas in /dev/shm, filled by a Python producer (the test harness
plays the C worker: tests/helpers/frames.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from dataplane._native import lib
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP
from scapy.packet import Raw

from dataplane.consumers.flows import SeqTracker
from dataplane.consumers.loop import ConsumerLoop, Running, drain, ring_sources
from dataplane.consumers.stats import ETHERTYPES, L4PROTOS, TrafficStats
from tests.helpers.frames import RingFiller, frame

MIX = [  # (frame, count, ethertype bucket, l4 bucket, size bucket index)
    (frame(IP() / TCP(), 60), 5, "ipv4", "tcp", 0),
    (frame(IP() / UDP(), 200), 4, "ipv4", "udp", 2),
    (frame(IPv6() / UDP(), 1000), 3, "ipv6", "udp", 4),
    (frame(IPv6() / ICMPv6EchoRequest(), 100), 2, "ipv6", "icmpv6", 1),
    (frame(IP() / ICMP(), 1500), 2, "ipv4", "icmp", 5),
    (frame(ARP(), 42), 3, "arp", "none", 0),
    (frame(Raw(b"x" * 20), 1600), 1, "other", "none", 6),   # Ether type 0x9000 (loopback)
    (frame(IP(proto=47), 300), 1, "ipv4", "other", 3),
    (frame(IP() / UDP(), 64, vlan=True), 2, "ipv4", "udp", 0),   # innermost ethertype counts
]


def test_counts_by_ethertype_l4_size_and_flags(arena):
    filler = RingFiller(arena)
    for data, count, *_ in MIX:
        filler.put([data] * count)
    filler.put([frame(IP() / UDP(), 128)], flags=lib.DP_F_MALFORMED)
    filler.put([frame(IP() / UDP(), 129)] * 2, flags=lib.DP_F_TRUNCATED | lib.DP_F_MALFORMED)
    stats = TrafficStats()
    assert drain(ring_sources([arena]), [stats], max_batch=7) == 26
    rs = stats.rings[(arena.path, 0, 0)]
    m = rs.marginals()
    want_eth, want_l4 = {}, {}
    want_size = [0] * 8
    for data, count, eth, l4, size in MIX + [(b"x" * 128, 1, "ipv4", "udp", 1),
                                             (b"x" * 129, 2, "ipv4", "udp", 2)]:
        want_eth[eth] = want_eth.get(eth, 0) + count
        want_l4[l4] = want_l4.get(l4, 0) + count * len(data)
        want_size[size] += count
    assert m["eth_packets"].tolist() == [want_eth.get(k, 0) for k in ETHERTYPES]
    assert m["l4_bytes"].tolist() == [want_l4.get(k, 0) for k in L4PROTOS]
    assert m["size_counts"].tolist() == want_size
    assert m["flags"].tolist() == [3, 2]   # malformed, truncated
    assert m["bytes"] == sum(len(d) * c for d, c, *_ in MIX) + 128 + 2 * 129
    assert arena.rings[0].occupancy() == 0   # everything released


def test_latency_histogram_and_bad_trailers(arena):
    now = 1_700_000_000 * 10**9
    lat_ns = [5_000, 10_000, 30_000, 2_000_000, 2 * 10**9, -1, 7200 * 10**9]
    filler = RingFiller(arena)
    filler.put([frame(IP() / UDP(), 100, seq=i, tx_ns=now) for i in range(len(lat_ns))],
               rx_ns=[now + x for x in lat_ns])
    # flagged generated but no valid trailer: wrong magic, too short for one
    filler.put([frame(IP() / UDP(), 100, seq=99, tx_ns=now, magic=0xdead)],
               flags=lib.DP_F_GENERATED)
    filler.put([b"\x02" * 20], flags=lib.DP_F_GENERATED)
    filler.put([frame(IP() / UDP(), 100)], rx_ns=now)   # not generated: no latency
    stats = TrafficStats()
    drain(ring_sources([arena]), [stats])
    rs = stats.rings[(arena.path, 0, 0)]
    # buckets le 10us, 25us, 50us, ... 2.5ms ... 1s, +Inf
    want = np.zeros(17, dtype=int)
    want[0] = 2          # 5 us, and 10 us exactly (le is inclusive)
    want[2] = 1          # 30 us <= 50 us
    want[7] = 1          # 2 ms <= 2.5 ms
    want[16] = 1         # 2 s: +Inf
    assert rs.latency.tolist() == want.tolist()
    assert rs.latency_sum == pytest.approx((5_000 + 10_000 + 30_000 + 2_000_000 + 2e9) * 1e-9)
    assert (rs.latency_negative, rs.latency_absurd, rs.bad_trailer) == (1, 1, 2)


def test_sequence_gaps_duplicates_out_of_order(arena):
    seqs = [s for s in range(100) if not 10 <= s < 15]
    seqs.insert(30, 20)                        # duplicate of 20
    seqs.remove(50)
    seqs.insert(seqs.index(60) + 1, 50)       # 50 arrives after 60
    filler = RingFiller(arena)
    frames = [frame(IP() / UDP(), 80, seq=s, stream=7) for s in seqs]
    frames[5:5] = [frame(IP() / UDP(), 80, seq=s, stream=8) for s in (0, 1, 3)]  # second stream
    stats = TrafficStats()
    for i in range(0, len(frames), 16):        # several batches, one of them mixes streams
        filler.put(frames[i:i + 16])
        drain(ring_sources([arena]), [stats], max_batch=16)
    s7, s8 = stats.streams.streams[7], stats.streams.streams[8]
    assert (s7.received, s7.unique, s7.duplicates, s7.out_of_order) == (96, 95, 1, 2)
    assert (s7.min, s7.max, s7.missing, s7.late) == (0, 99, 5, 0)   # 10..14 never came
    assert (s8.received, s8.unique, s8.missing) == (3, 3, 1)


def test_sequence_window_slides_and_counts_late():
    t = SeqTracker(window=64)
    for start in range(0, 1000, 10):
        seq = np.arange(start, start + 10, dtype=np.uint64)
        t.update(np.full(10, 3, dtype=np.uint32), seq[seq != 500])
    t.update(np.full(1, 3, dtype=np.uint32), np.array([3], dtype=np.uint64))      # far too old
    t.update(np.full(1, 3, dtype=np.uint32), np.array([999], dtype=np.uint64))    # duplicate
    st = t.streams[3]
    assert (st.received, st.unique, st.duplicates, st.late, st.missing) == (1001, 999, 1, 1, 1)
    assert st.seen.size == 64   # bounded, whatever the sequence range


def test_top_flows_decoded_on_demand(arena):
    a = frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1111, dport=2222), 1000)
    b = frame(IP(src="10.0.0.3", dst="10.0.0.4") / TCP(sport=3333, dport=80), 100)
    c = frame(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5, dport=6), 60)
    arp = frame(ARP(), 60)
    filler = RingFiller(arena)
    stats = TrafficStats()
    # a flow is sampled lazily: at its first appearance after it became a top flow
    for frames in ([a] * 10 + [b] * 20 + [c] * 5, [a, b, c] + [arp] * 35, [arp]):
        filler.put(frames)
        drain(ring_sources([arena]), [stats])
    # the slots of a, b, c were reused (by the ARP frames): the samples must be copies
    top = stats.top_flows(3)
    assert [(f["bytes"], f["packets"]) for f in top] == [(11000, 11), (2160, 36), (2100, 21)]
    assert (top[0]["src"], top[0]["dst"], top[0]["sport"], top[0]["dport"], top[0]["proto"]) \
        == ("10.0.0.1", "10.0.0.2", 1111, 2222, 17)
    assert "ARP" in top[1]["summary"]
    assert (top[2]["src"], top[2]["dport"], top[2]["proto"]) == ("10.0.0.3", 80, 6)
    filler.put([frame(IP() / UDP(sport=9, dport=9), 64)])
    drain(ring_sources([arena]), [stats])
    new = [f for f in stats.top_flows(10) if f["packets"] == 1]
    assert new[0]["summary"] == "(no sample yet)"


def test_top_flows_memory_is_bounded():
    stats = TrafficStats(flow_capacity=8)
    rng = np.random.default_rng(1)
    heavy = np.zeros(64, dtype=stats.flows.keys.dtype)
    for _ in range(50):
        batch = np.zeros(64, dtype=[("hash", "<u4"), ("len", "<u2"), ("addr", "<u8")])
        batch["hash"] = rng.integers(100, 1 << 31, 64)
        batch["hash"][:4] = heavy[:4] + 7         # one heavy flow in every batch
        batch["len"] = 60
        batch["len"][:4] = 1500
        stats.flows.update(batch)
    assert stats.flows.used == 8
    top = stats.flows.top(1)[0]
    assert top["hash"] == 7 and top["bytes"] - top["error_bytes"] <= 50 * 4 * 1500 <= top["bytes"]


def test_loop_thread_drains_across_wrap_and_survives_a_bad_consumer(new_arena):
    arena = new_arena("loop", ring_size=64)

    class Boom:
        name = "boom"

        def on_batch(self, batch):
            raise ValueError("boom")

    stats = TrafficStats()
    loop = ConsumerLoop(ring_sources([arena]), [Boom(), stats], max_batch=32)
    filler = RingFiller(arena)
    with loop:
        for _ in range(10):
            while filler.free() < 50:
                time.sleep(0.001)
            filler.put([frame(IP() / UDP(), 64)] * 50)
        deadline = time.monotonic() + 5
        while loop.descriptors < 500 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert loop.thread is None and loop.descriptors == 500
    assert arena.rings[0].cons == filler.prod == 500
    assert stats.rings[(arena.path, 0, 0)].marginals()["l4_packets"][1] == 500
    boom, st = loop.consumers
    # no factory to make it again: disabled at its first error, the others never noticed
    assert boom.errors == 1 and boom.batches == 1 and "ValueError: boom" in boom.disabled
    assert st.errors == 0 and st.packets == 500 and loop.errors == 0


def test_a_fold_that_fails_does_not_count_its_sequence_numbers_twice(arena):
    """A failure while folding staged descriptors (here: the flow table raising once) loses
    that fold's flow figures, never turns its packets into duplicates at the next fold."""
    stats = TrafficStats()
    update, calls = stats.flows.update, []

    def fails_once(d):
        calls.append(len(d))
        if len(calls) == 1:
            raise ValueError("flow table")
        update(d)

    stats.flows.update = fails_once
    filler = RingFiller(arena)
    # "made again" as the same object, so its books carry on past the error
    kept = Running(stats, remake=lambda: stats)
    for i in range(0, 64, 16):
        filler.put([frame(IP() / UDP(), 80, seq=s, stream=3) for s in range(i, i + 16)])
        drain(ring_sources([arena]), [kept], max_batch=16)
    s = stats.streams.streams[3]
    assert (s.received, s.unique, s.duplicates) == (64, 64, 0) and len(calls) == 4
    assert kept.errors == 1 and kept.remakes == 1 and not kept.disabled
