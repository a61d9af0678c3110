"""The consumer side of a ring (native/include/dp_ring.h) from Python: peek a batch as a numpy view,
release it, with a cached producer index; and slot_address(), where ring position i's slot is.

The producer index is another process's shared memory and is never taken on its word: each read
must not go back and must stay within one ring of the consumer index (dp_ring.h checks the same
in C).  An impossible value raises RingCorrupted; the reader stays stopped from then on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from dataplane._native import ffi, lib
from dataplane.shm.claim import claim, release
from dataplane.shm.layout import DESC_DTYPE, RING_COUNTERS, U64, u64_words

if TYPE_CHECKING:
    from dataplane.shm.arena import Arena


def slot_address(slots_off: int, slot_size: int, pos: np.ndarray | int) -> np.ndarray:
    """Arena offsets of the copy-mode slots of ring positions `pos` (already masked): slot i <->
    ring position i, slot_size apart from the ring's slots_off (native/include/dp_layout.h)."""
    return np.uint64(slots_off) + np.asarray(pos, dtype=np.uint64) * np.uint64(slot_size)


class RingCorrupted(RuntimeError):
    """A ring's shared indices are impossible (prod behind what was seen, or more than the ring
    ahead of cons): corrupted memory or a foreign writer.  Nothing more is read from that ring."""


class RingReader:
    """Consumer side of one ring: peek a batch as a numpy view, release it when done.

    peek/release mean what they mean in dp_ring.h: the producer index is cached and read again
    (an acquire, through C) only when the cache has nothing more; the consumer index is stored
    (a release, through C) once per batch, so the barriers are the same as in the workers.
    A consumer that keeps batches in flight before releasing them (the RDMA sender) peeks from
    its own position with `start`.
    """

    def __init__(self, arena: Arena, index: int):
        self.arena = arena
        self.index = index
        self._ring = lib.dp_arena_ring(ffi.cast("void *", arena.header), index)
        h = arena.header
        off = h.rings_off + index * h.ring_stride
        self.port = self._ring.port
        self.queue = self._ring.queue
        self.size = self._ring.size
        self.mask = self.size - 1
        self.slots_off = self._ring.slots_off
        self.slot_size = h.slot_size
        self.desc_off = off + ffi.sizeof("struct dp_ring")    # desc[] follows the header
        self.desc = np.ndarray((self.size,), dtype=DESC_DTYPE, buffer=arena.mapping,
                               offset=self.desc_off)
        self.counters = np.ndarray((u64_words("struct dp_ring_counters"),), dtype=U64,
                                   buffer=arena.mapping,
                                   offset=off + ffi.offsetof("struct dp_ring", "c"))
        self.cons = self._ring.cons
        self._prod_cache = self.cons
        self.fault = ""        # why the ring was found corrupted; sticky
        self.claimed = 0       # our claim word while this process claims the ring

    def where(self) -> str:
        return f"{self.arena.path} ring {self.index} (port {self.port} queue {self.queue})"

    def claim(self) -> None:
        """Claim the ring for this process (dataplane.shm.claim): RingClaimed when another
        live process consumes it."""
        self.claimed = claim(self._ring, self.where())

    def unclaim(self) -> None:
        if self.claimed:
            release(self._ring, self.claimed)
            self.claimed = 0

    def _corrupted(self, why: str) -> RingCorrupted:
        self.fault = f"{self.where()}: {why} (corrupted or foreign writer)"
        return RingCorrupted(self.fault)

    @property
    def shared(self):
        """The struct dp_ring * itself (its producer side is the RDMA receiver's to write)."""
        return self._ring

    def refresh(self) -> int:
        """Read the producer index (acquire: the descriptors before it are visible), check it
        (never back, at most size ahead of cons: else RingCorrupted), cache it."""
        if self.fault:
            raise RingCorrupted(self.fault)
        prod = lib.dp_ring_load_prod(self._ring)
        if prod < self.cons:
            raise self._corrupted(f"producer index {prod} behind consumer {self.cons}")
        if prod < self._prod_cache:
            raise self._corrupted(f"producer index {prod} went back from {self._prod_cache} "
                                  f"(consumer {self.cons})")
        if prod - self.cons > self.size:
            raise self._corrupted(f"producer index {prod} more than the ring's {self.size} "
                                  f"ahead of consumer {self.cons}")
        self._prod_cache = prod
        return prod

    def ready(self, start: int | None = None) -> int:
        """Descriptors ready from ring index `start` (default: the oldest not released); the
        shared producer index is read only when the cached one has nothing more."""
        at = self.cons if start is None else start
        if self._prod_cache == at or self.fault:
            self.refresh()
        return self._prod_cache - at

    def peek(self, max_n: int = 1 << 30, start: int | None = None) -> np.ndarray:
        """Up to max_n ready descriptors from `start` (default: the oldest not released),
        contiguous (a batch never wraps): a view, not a copy."""
        at = self.cons if start is None else start
        avail = self.ready(at)
        pos = at & self.mask
        n = min(avail, self.size - pos, max_n)
        return self.desc[pos:pos + n]

    def release(self, n: int) -> None:
        """Give n descriptors (and their frames) back to the worker."""
        self.cons += n
        lib.dp_ring_store_cons(self._ring, self.cons)

    def batches(self, max_n: int = 1 << 30) -> Iterator[np.ndarray]:
        """Every ready batch, each released after the caller's loop body has run."""
        while True:
            b = self.peek(max_n)
            if len(b) == 0:
                return
            yield b
            self.release(len(b))

    def slots(self, idx: np.ndarray | int) -> np.ndarray:
        """Arena offsets of the slots of ring indexes `idx` (free-running, masked here)."""
        return slot_address(self.slots_off, self.slot_size,
                            np.asarray(idx, dtype=np.uint64) & np.uint64(self.mask))

    def occupancy(self) -> int:
        return int(lib.dp_ring_load_prod(self._ring) - self._ring.cons)

    def counter(self, name: str) -> int:
        return int(self.counters[RING_COUNTERS.index(name)])
