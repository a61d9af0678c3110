"""Arenas on hugetlbfs: with 2 MB pages reserved and a hugetlbfs mounted, `hugepages = "auto"`
puts the arenas there, the EAL runs on hugepages, af_xdp still receives zero copy, and the host's
reservation and mounts are put back exactly as they were."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from dataplane.host.hugepages import free_hugepages_2m
from dataplane.run.runner import Run
from dataplane.shm.layout import PORT_COUNTERS
from tests.helpers.default_lab import lab_config

NR = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")

pytestmark = [pytest.mark.root("hugepages, netns"), pytest.mark.dpdk,
              pytest.mark.skipif(not NR.exists(), reason="kernel without 2 MB hugepages")]


@pytest.fixture
def hugetlbfs():
    """Reserve 200 more 2 MB pages and mount a private hugetlbfs; undo both afterwards."""
    before = int(NR.read_text())
    mnt = Path(tempfile.mkdtemp(prefix="dptest-huge-"))
    NR.write_text(str(before + 200))
    try:
        got = free_hugepages_2m()
        if got < 100:
            pytest.fail(f"asked the kernel for 200 more 2 MB pages, {got} are free: memory is "
                        "too fragmented on this machine for this test")
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M,mode=0700", "none",
                        str(mnt)], check=True)
        yield mnt
    finally:
        try:
            subprocess.run(["umount", str(mnt)], check=False)
            mnt.rmdir()
        finally:    # the pool goes back even when the mount could not be removed
            NR.write_text(str(before))
    assert int(NR.read_text()) == before


def test_arena_on_hugetlbfs_zero_copy(hugetlbfs: Path) -> None:
    tag = f"{os.getpid() % 10000}h"
    cfg = lab_config(tag, count=3000, rate=10000, rx_driver="af_xdp")
    next(w for w in cfg.workers if w.name == f"rx{tag}").copybreak = 0   # every frame in place
    with Run(cfg, io.StringIO()) as r:
        rx = next(s for s in r.specs if s.name == f"rx{tag}")
        assert rx.hugepages and Path(rx.arena_path).parent == hugetlbfs, rx.arena_path
        r.start()
        w = r.sup.workers[f"rx{tag}"]
        assert Path(w.spec.arena_path).stat().st_mode & 0o777 == 0o600
        assert w.arena.header.page_size == 2 << 20
        assert w.arena.header.zero_copy == 1, "af_xdp on a hugetlbfs arena should be zero copy"
        gen = r.sup.workers[f"gen{tag}"]
        tx_packets = PORT_COUNTERS.index("tx_packets")
        end = time.monotonic() + 30
        while gen.arena.port_counters[0][tx_packets] < 3000 and time.monotonic() < end:
            time.sleep(0.1)
        res = r.finish()
        sent = int(gen.arena.port_counters[0][tx_packets])     # the generator's own count
        h, ring = w.arena.header, w.arena.rings[0]
        n = min(ring.counter("rx_packets"), ring.size)
        addr = ring.desc["addr"][:n]
        assert n > 0 and ((addr >= h.pool_off) & (addr < h.arena_size)).all(), \
            "frames should sit in the mbuf pool (the UMEM), not in copy slots"
        assert ring.counter("copied") == 0
    s = next(iter(res.streams.values()))
    assert sent == 3000 and s["duplicates"] == 0, (sent, s)
    # every packet the port sent arrived once, or its loss is in a drop counter
    assert 0 < s["unique"] <= sent and sent - s["unique"] <= res.totals.drops, r.report(res)
    assert res.ok, r.report(res)
    assert not list(hugetlbfs.iterdir()), "arena files left on hugetlbfs"
