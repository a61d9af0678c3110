"""Ring consumers: hand every batch of descriptors to a set of consumers, then release it.

A consumer sees a batch as the numpy structured view RingReader.peek() returns (no copy) and
must be done with it when consume() returns: the batch is released right after, and the worker
reuses the slots.  ConsumerLoop.sweep() is one pass over the rings; drain() sweeps until nothing
is ready.  What consumers make of the batches is theirs (stats.py: TrafficStats).

The loop's progress counters are plain ints written by its thread only; readers copy them
without a lock (docs/design.md, invariant 7).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from dataplane.shm.arena import Arena
from dataplane.shm.ring import RingCorrupted, RingReader

log = logging.getLogger(__name__)


class Consumer(Protocol):
    def consume(self, batch: np.ndarray, arena: Arena) -> None:
        """Fold one batch in; the batch (and its frames) is released when this returns."""


def flush_all(consumers: Iterable[Consumer]) -> None:
    """Let consumers that stage batches (an optional `flush()`) fold in what they hold."""
    for c in consumers:
        flush = getattr(c, "flush", None)
        if flush is not None:
            flush()


Source = tuple[Arena, RingReader]


def ring_sources(arenas: Iterable[Arena]) -> list[Source]:
    """Every ring of every arena, as the (arena, ring) pairs ConsumerLoop drains."""
    return [(a, r) for a in arenas for r in a.rings]


class ConsumerLoop:
    """Drain rings into consumers, in a thread of the main process.

    Each pass takes, from each ring in turn, everything ready up to one ring's worth (so a busy
    ring cannot starve the others), in batches of at most max_batch.  When a whole pass finds
    nothing, or flush_interval seconds went by, consumers flush what they staged; an empty pass
    then naps idle_sleep seconds on the stop event, so stop() is prompt.
    """

    def __init__(self, sources: Iterable[Source], consumers: Sequence[Consumer],
                 max_batch: int = 4096, idle_sleep: float = 0.0005, flush_interval: float = 0.1):
        self.sources = list(sources)
        self.consumers = list(consumers)
        self.max_batch = max_batch
        self.idle_sleep = idle_sleep
        self.flush_interval = flush_interval
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        # progress, read by anyone at any time
        self.passes = 0
        self.batches = 0
        self.descriptors = 0
        self.errors = 0
        self.last_error = ""
        self.ring_faults: list[str] = []   # rings dropped as corrupted, why (also in errors)

    def set_sources(self, sources: Iterable[Source]) -> None:
        """Swap the rings drained (after a worker's arena was replaced): takes effect at the
        next pass; the list is replaced, never mutated, so the loop needs no lock."""
        self.sources = list(sources)

    def sweep(self) -> int:
        """One pass over all rings; returns how many descriptors were consumed."""
        total = 0
        for arena, ring in self.sources:
            budget = ring.size
            while budget > 0:
                try:
                    batch = ring.peek(min(self.max_batch, budget))
                except RingCorrupted as e:   # that ring stops; the others go on
                    self._ring_failed(ring, e)
                    break
                n = len(batch)
                if n == 0:
                    break
                for c in self.consumers:
                    try:
                        c.consume(batch, arena)
                    except Exception as e:   # a bad consumer must not stop the others
                        self._failed(c, e)
                # everything consumers needed from the frames is copied: give the slots back
                ring.release(n)
                self.batches += 1
                budget -= n
                total += n
        self.passes += 1
        self.descriptors += total
        return total

    def _ring_failed(self, ring: RingReader, e: RingCorrupted) -> None:
        """Drop a corrupted ring from the sweep (replacing the list, as set_sources does), count
        it and log it; its worker stops on its own check of the same indices."""
        self.sources = [s for s in self.sources if s[1] is not ring]
        self.ring_faults.append(str(e))
        self.errors += 1
        self.last_error = str(e)
        log.error("ring stopped: %s", e)

    def _failed(self, consumer: Consumer, e: Exception) -> None:
        self.errors += 1
        msg = f"{type(consumer).__name__}: {type(e).__name__}: {e}"
        if msg != self.last_error:   # log each new kind once, not once per batch
            log.exception("consumer failed: %s", msg)
        self.last_error = msg

    def flush(self) -> None:
        try:
            flush_all(self.consumers)
        except Exception as e:
            self._failed(self, e)

    def run(self) -> None:
        next_flush = time.monotonic() + self.flush_interval
        while not self.stop_event.is_set():
            n = self.sweep()
            if n == 0 or time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + self.flush_interval
            if n == 0:
                self.stop_event.wait(self.idle_sleep)
        self.flush()

    def start(self) -> threading.Thread:
        self.stop_event.clear()
        self.thread = threading.Thread(target=self.run, name="dp-consumer", daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None

    def __enter__(self) -> ConsumerLoop:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def drain(sources: Iterable[Source], consumers: Sequence[Consumer], max_batch: int = 4096) -> int:
    """Consume everything ready now on the given rings, once; returns the descriptor count."""
    loop = ConsumerLoop(sources, consumers, max_batch)
    total = n = loop.sweep()
    while n:
        total += (n := loop.sweep())
    flush_all(consumers)
    return total
