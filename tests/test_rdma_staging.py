"""Least privilege on the receiving side, on the host (no RDMA needed): the RDMA receiver's
descriptor check (dataplane/transport/rdma/staging.py) on a real arena's ring, its counter
through a control file to the scrape, and the bound on the rings a consumer keeps statistics
for (dataplane/consumers/stats.py).  What a rogue peer
can and cannot write over real rxe is tests/test_rdma_rogue.py."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from dataplane._native import lib

from dataplane.consumers.stats import MAX_RINGS, TrafficStats
from dataplane.metrics.arenas import ArenaCollector
from dataplane.metrics.consumers import ConsumerCollector
from dataplane.metrics.rdma import RdmaCollector, status_line
from dataplane.shm.control import Control
from dataplane.shm.layout import DESC_DTYPE
from dataplane.shm.ring import slot_address
from dataplane.transport.rdma.mr_cache import MRCache
from dataplane.transport.rdma.process import _Books
from dataplane.transport.rdma.staging import SENDER_FLAGS, accept
from dataplane.transport.spec import TransportSpec


def staged_batch(n: int, length: int = 100) -> np.ndarray:
    """What a peer writes into the staging area: its own idea of addr, port, queue, rx_ns."""
    s = np.zeros(n, DESC_DTYPE)
    s["addr"] = 0                     # the arena header, were it believed
    s["len"], s["port"], s["queue"], s["rx_ns"] = length, 7, 200, 12345
    s["hash"], s["ethertype"], s["l4proto"] = 0xABCD, 0x0800, 17
    s["flags"] = lib.DP_F_GENERATED | lib.DP_F_VLAN
    return s


def test_accept_writes_addr_port_queue_rx_ns_itself(arena):
    r = arena.rings[1]                # port 1, queue 0 (tests/helpers/frames.py make_arena)
    want = slot_address(r.slots_off, r.slot_size, np.arange(r.size))
    staged = staged_batch(8)
    lo, hi = 100, 108
    assert accept(staged, r.desc[lo:hi], want[lo:hi], r.slot_size, int(r.shared.port),
                  int(r.shared.queue), 999) == 0
    d = r.desc[lo:hi]
    assert d["addr"].tolist() == want[lo:hi].tolist()
    assert set(d["port"].tolist()) == {1} and set(d["queue"].tolist()) == {0}
    assert set(d["rx_ns"].tolist()) == {999}
    assert set(d["flags"].tolist()) == {lib.DP_F_GENERATED | lib.DP_F_VLAN | lib.DP_F_COPIED}
    # what describes the frame stays as sent
    assert set(d["hash"].tolist()) == {0xABCD} and set(d["len"].tolist()) == {100}
    assert set(d["l4proto"].tolist()) == {17}
    # the check is on the copy: the staging area changing afterwards changes nothing
    staged["len"] = 60000
    assert set(r.desc[lo:hi]["len"].tolist()) == {100}


def test_accept_refuses_len_over_slot_and_unknown_flags(arena):
    r = arena.rings[0]
    want = slot_address(r.slots_off, r.slot_size, np.arange(r.size))
    for field, value in (("len", r.slot_size + 1), ("flags", 0x8000)):
        staged = staged_batch(16)
        staged[field][[3, 9]] = value
        assert accept(staged, r.desc[0:16], want[0:16], r.slot_size, 0, 0, 1) == 2, field
    staged = staged_batch(4, length=r.slot_size)       # a full slot is fine
    staged["flags"] = SENDER_FLAGS
    assert accept(staged, r.desc[0:4], want[0:4], r.slot_size, 0, 0, 1) == 0


def test_consumer_rings_are_capped_and_the_rest_counted(arena):
    """A producer that names a new (port, queue) in every batch (as a peer could) grows neither
    the per-ring state nor the series past the cap; the packets past it are counted."""
    assert MAX_RINGS == 1024
    cap = 5
    stats = TrafficStats(max_rings=cap)
    batch = arena.rings[0].desc[:3].copy()
    batch["len"] = 64
    for i in range(12):
        batch["port"], batch["queue"] = i, i % 256
        stats.consume(batch, arena)
    batch["port"], batch["queue"] = 0, 0      # a ring already tracked is still counted
    stats.consume(batch, arena)
    stats.flush()
    assert len(stats.rings) == cap
    assert stats.untracked_packets == (12 - cap) * 3
    assert int(stats.rings[(arena.path, 0, 0)].packets.sum()) == 6
    fams = {m.name: m for m in ConsumerCollector(stats, None, ArenaCollector([])).collect()}
    untracked = fams["dataplane_consumer_untracked_ring_packets"].samples
    assert [s.value for s in untracked] == [(12 - cap) * 3]
    ethertype = fams["dataplane_consumer_ethertype_packets"].samples
    assert len({s.labels["port"] for s in ethertype}) == cap


def test_bad_descriptors_reach_the_control_file_and_the_scrape(tmp_path):
    """The receiver's count goes through its control file (written as the RDMA end process does)
    to dataplane_rdma_bad_descriptors_total, on top of what the file held before a restart."""
    path = Path("/dev/shm") / f"dptest-rdma-ctl-{uuid.uuid4().hex[:8]}"
    ctl = Control(path, create=True)
    try:
        cache = MRCache(None, None, access=0, register=lambda *a: None).stats()
        _Books(ctl).publish({"bad_descriptors": 3, "bad_batches": 1}, cache, 8)
        _Books(ctl).publish({"bad_descriptors": 2}, cache, 8)     # a restarted process
        spec = TransportSpec(name="col", role="recv", control_path=str(path),
                             arena_path=str(tmp_path / "a"), mode="rdma", device="rxe0")
        fams = {m.name: m for m in RdmaCollector([(spec, ctl)]).collect()}
        assert [s.value for s in fams["dataplane_rdma_bad_descriptors"].samples] == [5]
        assert "bad descriptors 5" in status_line("recv", "rxe0", ctl)
    finally:
        ctl.close()
        path.unlink()
