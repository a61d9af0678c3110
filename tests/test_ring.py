"""The descriptor ring: C producer (native/testing/ring_bench.c) against the Python RingReader.

Descriptor i carries i in `hash` (low 32 bits), len 60 + i % 1024 and the address of its slot,
so order, loss, duplication and wrap-around are all visible from the consumer side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from dataplane._native import ffi, lib
from dataplane._testing import lib as testing
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.layout import DESC_DTYPE, VIEWS, LayoutError, check_layout
from dataplane.shm.ring import RingReader, slot_address

SLOT = 64

# Runs in a separate process: maps the arena on its own, like a worker would.
PRODUCER = """
import sys
from dataplane._native import ffi, lib
from dataplane._testing import lib as testing
path, ring, n, burst = sys.argv[1], *map(int, sys.argv[2:])
size = ffi.new("uint64_t *")
base = lib.dp_arena_map(path.encode(), size)
if base == ffi.NULL:
    sys.exit(f"dp_arena_map {path}: errno {ffi.errno}")
print(testing.dp_bench_produce(base, ring, n, burst))
"""


@contextmanager
def temp_arena(ring_size: int = 1024, n_rings: int = 1) -> Iterator[Arena]:
    path = Path("/dev/shm") / f"dptest-ring-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    geo = ArenaGeometry(n_ports=1, rings=tuple((0, q) for q in range(n_rings)),
                        ring_size=ring_size, slot_size=SLOT, pool_bytes=0)
    arena = Arena.create(path, geo)
    try:
        yield arena
    finally:
        arena.close()
        path.unlink(missing_ok=True)


def base_of(arena: Arena) -> object:
    return ffi.cast("void *", arena.header)


def expect_len(first: int, n: int) -> int:
    return int((60 + (np.arange(first, first + n, dtype=np.uint64) & 1023)).sum())


def check_batch(r: RingReader, b: np.ndarray, seen: int) -> None:
    """b must be descriptors seen..seen+len(b)-1, contiguous in the ring, not wrapped."""
    start = seen & r.mask
    assert len(b) <= r.size - start, "a batch wrapped"
    idx = np.arange(seen, seen + len(b), dtype=np.uint64)
    assert np.array_equal(b["hash"], idx.astype(np.uint32))
    assert np.array_equal(b["addr"], r.slots(idx))
    assert np.array_equal(b["addr"], slot_address(r.shared.slots_off, SLOT, idx & r.mask))


@given(size_log=st.integers(0, 8), burst=st.integers(1, 700), batch=st.integers(1, 700),
       n=st.integers(0, 3000), order=st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_wraparound_and_batch_boundaries(size_log: int, burst: int, batch: int, n: int,
                                         order) -> None:
    with temp_arena(ring_size=1 << size_log) as arena:
        r, base = arena.rings[0], base_of(arena)
        produced = seen = 0
        while seen < n:
            # produce, consume or both, in an order hypothesis picks: every fill level occurs
            step = order.randrange(3)
            if step != 1 and produced < n:
                produced += testing.dp_bench_try_produce(base, 0, min(burst, n - produced))
            if step != 0:
                b = r.peek(batch)
                assert len(b) <= batch
                check_batch(r, b, seen)
                r.release(len(b))
                seen += len(b)
            assert 0 <= produced - seen <= r.size
            assert r.occupancy() == produced - seen
        # the shared indices, as the C producer and release() left them (the loop's own
        # counters equal n by construction)
        assert int(r.shared.prod) == int(r.shared.cons) == n
        assert len(r.peek(batch)) == 0


def spawn_producer(path: Path, n: int, burst: int, ring: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRODUCER, str(path), str(ring), str(n),
                             str(burst)], stdout=subprocess.PIPE, text=True)


def drain_python(r: RingReader, n: int, batch: int, proc: subprocess.Popen) -> tuple[int, int]:
    """Consume n in whole batches; per batch only numpy checks.  Returns (bytes, bad batches)."""
    seen = total = bad = 0
    deadline = time.monotonic() + 30
    while seen < n:
        b = r.peek(batch)
        k = len(b)
        if k == 0:
            assert proc.poll() is None or r.occupancy() > 0, "producer exited early"
            # no progress for 30 s is a stall; how long the whole takes is not checked (it
            # took over 60 s once with the other core busy)
            assert time.monotonic() < deadline, f"stalled at {seen} of {n}"
            continue
        deadline = time.monotonic() + 30
        h = b["hash"]
        # uint32 diff wraps like the counter does, so 0xffffffff -> 0 is still a step of 1
        bad += not (h[0] == np.uint32(seen & 0xFFFFFFFF) and (np.diff(h) == 1).all())
        total += int(b["len"].sum())
        r.release(k)
        seen += k
    return total, bad


@pytest.mark.parametrize("n,burst,batch,ring_size", [
    (2_000_000, 32, 1024, 4096),
    (1_000_000, 1, 37, 64),         # odd batch, tiny ring: constant wrap-around and waiting
])
def test_cross_process_python_consumer(n: int, burst: int, batch: int, ring_size: int) -> None:
    with temp_arena(ring_size=ring_size) as arena:
        proc = spawn_producer(arena.path, n, burst)
        try:
            total, bad = drain_python(arena.rings[0], n, batch, proc)
        finally:
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert bad == 0
        assert total == expect_len(0, n)
        assert arena.rings[0].occupancy() == 0
        print(f"producer found the ring full {out.strip()} times")


def test_cross_process_c_consumer() -> None:
    n = 5_000_000
    with temp_arena(ring_size=4096) as arena:
        proc = spawn_producer(arena.path, n, 32)
        total = testing.dp_bench_consume(base_of(arena), 0, n, 256)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert total == expect_len(0, n)


def test_full_ring_is_never_overwritten() -> None:
    with temp_arena(ring_size=64) as arena:
        r, base = arena.rings[0], base_of(arena)
        assert testing.dp_bench_try_produce(base, 0, 100) == 64
        assert testing.dp_bench_try_produce(base, 0, 1) == 0     # reserve gives nothing when full
        before = r.desc.copy()

        # A waiting producer must not write either: it spins until slots are released.
        full = []
        t = threading.Thread(target=lambda: full.append(testing.dp_bench_produce(base, 0, 3, 8)))
        t.start()
        time.sleep(0.1)
        assert t.is_alive()
        assert np.array_equal(r.desc, before)

        check_batch(r, r.peek(3), 0)
        r.release(3)
        t.join(timeout=5)
        assert not t.is_alive(), "producer did not take the 3 released slots"
        assert full[0] >= 1 and r.occupancy() == 64

        t = threading.Thread(target=testing.dp_bench_produce, args=(base, 0, 2, 8))
        t.start()
        time.sleep(0.05)
        arena.request_stop()
        t.join(timeout=5)
        assert not t.is_alive(), "arena->stop must end a waiting producer"
        assert np.array_equal(r.desc[3:], before[3:])      # unread descriptors untouched
        check_batch(r, r.peek(), 3)
        r.release(61)
        check_batch(r, r.peek(), 64)


def test_peek_ahead_of_release() -> None:
    """A consumer with batches in flight (the RDMA sender) peeks from its own position; the
    cached producer index is read again only when it has nothing more, release stays in order."""
    with temp_arena(ring_size=128) as arena:
        r, base = arena.rings[0], base_of(arena)
        assert testing.dp_bench_try_produce(base, 0, 40) == 40
        check_batch(r, r.peek(10), 0)
        check_batch(r, r.peek(10, start=10), 10)
        assert r.ready(30) == 10 and r.ready() == 40
        assert testing.dp_bench_try_produce(base, 0, 30) == 30
        assert r.ready(30) == 10, "the cache still has some: the shared index is not read"
        check_batch(r, r.peek(start=40), 40)        # cache exhausted: read again
        assert len(r.peek(start=40)) == 30
        assert r.ready(40) == 30 and r.refresh() == 70
        r.release(30)
        assert r.cons == 30 and r.shared.cons == 30
        check_batch(r, r.peek(), 30)
        assert len(r.peek()) == 40 and len(r.peek(start=64)) == 6


def _desc_view(**change: tuple[str, int]) -> np.dtype:
    """DESC_DTYPE with some fields' (format, offset) changed; a None drops the field."""
    fields = {n: (str(DESC_DTYPE.fields[n][0]), DESC_DTYPE.fields[n][1]) for n in DESC_DTYPE.names}
    fields.update(change)
    kept = {n: f for n, f in fields.items() if f is not None}
    return np.dtype({"names": list(kept), "formats": [f for f, _ in kept.values()],
                     "offsets": [o for _, o in kept.values()], "itemsize": DESC_DTYPE.itemsize})


def test_layout_check_names_the_field() -> None:
    check_layout()
    assert {"struct dp_desc", "struct dp_gen_trailer", "struct dp_ring_counters",
            "struct dp_port_counters", "struct dp_uring_counters", "struct dp_transport_counters",
            "struct dp_rdma_counters"} <= set(VIEWS)
    with pytest.raises(LayoutError, match=r"struct dp_desc\.hash: Python assumes offset 20"):
        check_layout({"struct dp_desc": _desc_view(hash=("<u4", 20))})
    with pytest.raises(LayoutError, match=r"struct dp_desc\.hash: Python reads <u2, compiled "
                                          r"layout has uint32_t"):
        check_layout({"struct dp_desc": _desc_view(hash=("<u2", 16))})
    with pytest.raises(LayoutError, match=r"struct dp_desc\.len: Python reads <i2"):
        check_layout({"struct dp_desc": _desc_view(len=("<i2", 20))})
    with pytest.raises(LayoutError, match=r"struct dp_desc: fields l4_off of the compiled layout "
                                          r"are not in Python's view"):
        check_layout({"struct dp_desc": _desc_view(l4_off=None)})
    with pytest.raises(LayoutError, match=r"struct dp_ring_counters: Python assumes 128 bytes"):
        check_layout({"struct dp_ring_counters": np.dtype({"names": ["rx_packets"],
                                                           "formats": ["<u8"],
                                                           "itemsize": 128})})


@pytest.mark.parametrize("offset,value,match", [
    (0, (0).to_bytes(8, "little"), "bad magic"),
    (8, (lib.DP_LAYOUT_VERSION + 1).to_bytes(4, "little"), "layout version"),
])
def test_foreign_arena_refused(offset: int, value: bytes, match: str) -> None:
    with temp_arena(ring_size=8) as arena:
        with open(arena.path, "r+b") as f:
            f.seek(offset)
            f.write(value)
        with pytest.raises(LayoutError, match=match):
            Arena.open(arena.path)


def test_world_readable_arena_refused() -> None:
    with temp_arena(ring_size=8) as arena:
        Arena.open(arena.path).close()
        os.chmod(arena.path, 0o644)
        with pytest.raises(LayoutError, match="mode 644"):
            Arena.open(arena.path)
