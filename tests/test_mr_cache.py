"""The MR cache (dataplane/transport/rdma/mr_cache.py).

On the host (no RDMA in this kernel): the cache's bookkeeping with a stand-in for ibv_reg_mr.
On rxe0: one guest booted for the module (scripts/guest --rdma) runs one Python process,
tests/guest/mr_checks.py, which does every check with real registrations and writes the results
to the lab share: sub-range hits, LRU eviction under a small budget (exact counters), a low
RLIMIT_MEMLOCK refused before ibv_reg_mr, a buffer freed and a new one mapped at the same
address (a miss, and the peer receives the new bytes over an RC QP), threads.
"""

from __future__ import annotations

import mmap
import time
from typing import Any

import pytest

from dataplane.transport.rdma.mr_cache import MRCache, MRCacheError
from scripts.guest_run import GuestRun
from tests.helpers.fake_mr import FakeMR, fake_cache

P = mmap.PAGESIZE


# ---- host: the bookkeeping, with a stand-in for ibv_reg_mr ----

def test_sub_range_hit_and_other_object_misses():
    c, made = fake_cache()
    m = bytearray(4 * P)
    r = c.get(m, 100, 50)
    assert made[0].length == 4 * P and r.addr == made[0].address + 100
    assert c.get(m, 3 * P).lkey == r.lkey
    c.get(bytearray(m))        # same bytes, another object: a miss
    s = c.stats()
    assert (s["hits"], s["misses"], s["entries"]) == (1, 2, 2)
    c.close()
    c.close()
    assert all(x.closed for x in made)


def test_entry_holds_the_export_until_released():
    c, made = fake_cache()
    m = mmap.mmap(-1, P)
    c.get(m)
    with pytest.raises(BufferError):
        m.close()
    assert c.release(m) == 1 and made[0].closed
    m.close()


def test_lru_and_refusals():
    c, made = fake_cache(budget=2 * P, max_entries=10)
    a, b, d = (mmap.mmap(-1, P) for _ in range(3))
    c.get(a), c.get(b), c.get(a), c.get(d)
    s = c.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 3, 1) and made[1].closed
    with pytest.raises(MRCacheError, match="read-only"):
        c.get(b"bytes")
    with pytest.raises(MRCacheError, match="outside"):
        c.get(a, P - 1, 2)
    assert c.stats()["registration_seconds"]["count"] == 3
    c.close()


def test_whole_object_hits_follow_eviction_and_release():
    """The hit path keyed by the object (no memoryview) never returns an evicted MR's keys."""
    c, made = fake_cache(budget=P, max_entries=10)
    a, b = mmap.mmap(-1, P), mmap.mmap(-1, P)
    ka = c.get(a).lkey
    assert c.get(a, 10, 20) == (ka, ka, made[0].address + 10, 20)
    c.get(b)                   # evicts a
    again = c.get(a)
    assert made[0].closed and again.lkey != ka and c.stats()["misses"] == 3
    assert c.release(a) == 1 and c.get(a).lkey not in (ka, again.lkey)
    c.close()


def test_threads_wait_for_room_held_by_registrations_in_flight():
    import threading

    made: list[FakeMR] = []

    def slow(pd: Any, length: int, access: int, address: int) -> FakeMR:
        time.sleep(0.001)
        made.append(FakeMR(length, address))
        return made[-1]

    c = MRCache(None, None, access=0, register=slow, budget=8 * P)
    bufs = [mmap.mmap(-1, 4 * P) for _ in range(3)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(50):
                c.get(bufs[(i + k) % 3], (i * 997) % (3 * P), P)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = c.stats()
    assert not errors, errors
    assert s["hits"] + s["misses"] == 200 and s["entries"] <= 2
    assert s["misses"] - s["races"] - s["evictions"] == s["entries"]
    assert sum(not m.closed for m in made) == s["entries"]
    c.close()
    assert all(m.closed for m in made)


# ---- rxe0 in the guest ----

@pytest.fixture(scope="module")
def guest(guest_lab) -> GuestRun:
    return guest_lab.checks("mr_checks.py", flags=("--rdma",))


def test_rxe_sub_range_hits(guest):
    d = guest.ok("sub_range_hits")
    assert d["counts"] == {"hits": 2, "misses": 2, "evictions": 0, "entries": 2,
                           "registered_bytes": 17 * P}
    assert "exported" in d["close_refused"]


def test_rxe_lru_eviction(guest):
    d = guest.ok("lru_eviction")
    assert d["counts"] == {"hits": 3, "misses": 5, "evictions": 2, "entries": 3,
                           "registered_bytes": 3 * P}
    assert d["by_count"]["evictions"] == 1 and d["max_mr"] > 0


def test_rxe_low_memlock(guest):
    d = guest.ok("low_memlock")
    print(d["message"])
    assert "RLIMIT_MEMLOCK" in d["message"] and str(16 * P) in d["message"]
    assert str(256 * P) in d["message"]
    print(d["kernel"])      # what ibv_reg_mr itself says without CAP_IPC_LOCK: ENOMEM
    assert "Cannot allocate memory" in d["kernel"] or "12" in d["kernel"], d["kernel"]


def test_rxe_stale_address_is_a_miss_and_sends_new_bytes(guest):
    d = guest.ok("stale_address")
    print(d)
    assert d["after"]["misses"] == d["before"]["misses"] + 1


def test_rxe_threads(guest):
    d = guest.ok("threads")
    print(d)
    assert d["hits"] + d["misses"] == 240
