"""The consumer loop: hand every batch of every ring to the consumers that read it, then
release it (dataplane.consumers.api is the protocol a consumer implements).

ConsumerLoop.sweep() is one pass over the rings; drain() sweeps until nothing is ready.  Each
consumer runs inside a Running: its books (batches, packets, seconds, errors) and what happens
when it raises (on_error: made again by its factory, at most MAX_REMAKES times a minute, or
disabled).  A consumer's exception never reaches the loop or the other consumers, and never
keeps a batch from being released.

The loop's progress counters and each Running's books are plain ints written by its thread
only; readers copy them without a lock (docs/design.md, invariant 7).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dataplane.consumers.api import Batch, Consumer, RingSource
from dataplane.shm.arena import Arena
from dataplane.shm.ring import RingCorrupted

log = logging.getLogger(__name__)

ON_ERROR = ("restart", "disable")
MAX_REMAKES = 5            # within REMAKE_WINDOW seconds; the next error disables
REMAKE_WINDOW = 60.0


class Running:
    """One consumer in the loop: which rings it reads, its books, its error policy."""

    def __init__(self, consumer: Consumer, rings: Iterable[str] = (),
                 on_error: str = "restart", remake: Callable[[], Consumer] | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error {on_error!r}: one of {', '.join(ON_ERROR)}")
        self.consumer = consumer
        self.name: str = getattr(consumer, "name", "") or type(consumer).__name__
        self.rings = frozenset(rings)      # empty: every ring the run consumes
        self.on_error = on_error if remake is not None else "disable"
        self.remake = remake
        self.batches = self.packets = self.errors = self.remakes = 0
        self.ns = 0                        # time spent in the consumer's calls
        self.disabled = ""                 # why it no longer runs
        self.last_error = ""
        self._remade_at: list[float] = []

    def wants(self, src: RingSource) -> bool:
        """A ring is named by its worker ("rx") or its worker and port label ("rx:p0")."""
        return not self.rings or src.name in self.rings or \
            f"{src.name}:{src.port_label}" in self.rings

    def call(self, method: str, *args: Any) -> None:
        """consumer.METHOD(*args), timed; an exception counted, logged and handled here."""
        t0 = time.perf_counter_ns()
        try:
            fn = getattr(self.consumer, method, None)
            if fn is not None:
                fn(*args)
        except Exception as e:     # noqa: BLE001 - a consumer's fault stays the consumer's
            self._failed(method, e)
        finally:
            self.ns += time.perf_counter_ns() - t0

    def _failed(self, method: str, e: Exception) -> None:
        self.errors += 1
        msg = f"{type(e).__name__}: {e}"
        if msg != self.last_error:      # each new kind logged once, not once per batch
            log.error("consumer %s: %s raised %s", self.name, method, msg,
                      exc_info=(type(e), e, e.__traceback__))
        self.last_error = msg
        now = time.monotonic()
        self._remade_at = [t for t in self._remade_at if now - t < REMAKE_WINDOW]
        if self.on_error == "restart" and len(self._remade_at) < MAX_REMAKES:
            self._close()
            try:
                self.consumer = self.remake()          # type: ignore[misc]
            except Exception as e2:   # noqa: BLE001 - a factory that fails disables it
                self.disabled = f"could not be made again: {type(e2).__name__}: {e2}"
                log.error("consumer %s disabled: %s", self.name, self.disabled)
                return
            self._remade_at.append(now)
            self.remakes += 1
            log.warning("consumer %s made again after %s (%d in %.0f s)", self.name, msg,
                        len(self._remade_at), REMAKE_WINDOW)
            return
        self.disabled = (f"{msg} ({self.remakes} times made again)" if self.remakes
                         else msg)
        log.error("consumer %s disabled after: %s", self.name, self.disabled)
        self._close()

    def _close(self) -> None:
        try:
            self.consumer.close()
        except Exception as e:     # noqa: BLE001 - closing a failed consumer may fail too
            log.warning("consumer %s: close raised %s: %s", self.name, type(e).__name__, e)

    def close(self) -> None:
        if not self.disabled:
            self._close()


def running(consumers: Iterable[Consumer | Running]) -> list[Running]:
    return [c if isinstance(c, Running) else Running(c) for c in consumers]


def ring_sources(arenas: Iterable[Arena]) -> list[RingSource]:
    """Every ring of every arena, named after its arena file."""
    return [RingSource(a, r) for a in arenas for r in a.rings]


def _claimed(sources: Iterable[RingSource | tuple]) -> list[RingSource]:
    """The sources, each ring claimed for this process (RingClaimed: another consumes it)."""
    out = [s if isinstance(s, RingSource) else RingSource(*s) for s in sources]
    for s in out:
        s.ring.claim()
    return out


class ConsumerLoop:
    """Drain rings into consumers, in a thread of the main process.

    Each pass takes, from each ring in turn, everything ready up to one ring's worth (so a busy
    ring cannot starve the others), in batches of at most max_batch.  When a whole pass finds
    nothing, the loop naps idle_sleep seconds on the stop event, so stop() is prompt; every
    tick_interval seconds every consumer gets tick() (not on every idle pass: at a light load
    that would be thousands of calls a second, each with its fixed cost).

    A pass that found fewer than min_batch descriptors naps too, for batch_wait seconds: each
    consumer call has a fixed cost (a few dozen numpy calls, some microseconds), so at a light
    load a pass per few packets would spend most of a core on per-batch overhead.  Waiting lets
    the batches grow; batch_wait stays far below the time a ring takes to fill at the workers'
    rates (4096 descriptors at 1 Mpps: 4 ms), and a ring that is filling gives a full pass,
    which never naps.
    """

    def __init__(self, sources: Iterable[RingSource | tuple],
                 consumers: Sequence[Consumer | Running], max_batch: int = 4096,
                 idle_sleep: float = 0.0005, tick_interval: float = 0.1,
                 min_batch: int = 256, batch_wait: float = 0.001):
        self.sources = _claimed(sources)
        self.consumers = running(consumers)
        self.max_batch = max_batch
        self.idle_sleep = idle_sleep
        self.min_batch, self.batch_wait = min_batch, batch_wait
        self.tick_interval = tick_interval
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        # progress, read by anyone at any time
        self.passes = 0
        self.batches = 0
        self.descriptors = 0
        self.errors = 0                    # rings dropped as corrupted
        self.ring_faults: list[str] = []   # why each was

    def set_sources(self, sources: Iterable[RingSource | tuple]) -> None:
        """Swap the rings drained (after a worker's arena was replaced): takes effect at the
        next pass; the list is replaced, never mutated, so the loop needs no lock.  Rings
        dropped keep their claim: their arenas are being closed, and a claim of a dead run's
        or a removed arena is taken over anyway."""
        self.sources = _claimed(sources)

    def sweep(self) -> int:
        """One pass over all rings; returns how many descriptors were consumed."""
        total = 0
        for src in self.sources:
            ring = src.ring
            readers = [c for c in self.consumers if not c.disabled and c.wants(src)]
            budget = ring.size
            while budget > 0:
                try:
                    desc = ring.peek(min(self.max_batch, budget))
                except RingCorrupted as e:   # that ring stops; the others go on
                    self._ring_failed(src, e)
                    break
                n = len(desc)
                if n == 0:
                    break
                batch = Batch(desc, src)
                for c in readers:
                    if not c.disabled:
                        c.call("on_batch", batch)
                        c.batches += 1
                        c.packets += n
                # everything consumers needed from the frames is copied: give the slots back
                ring.release(n)
                self.batches += 1
                budget -= n
                total += n
        self.passes += 1
        self.descriptors += total
        return total

    def _ring_failed(self, src: RingSource, e: RingCorrupted) -> None:
        """Drop a corrupted ring from the sweep (replacing the list, as set_sources does), count
        it and log it; its worker stops on its own check of the same indices."""
        self.sources = [s for s in self.sources if s.ring is not src.ring]
        self.ring_faults.append(str(e))
        self.errors += 1
        log.error("ring stopped: %s", e)

    def tick(self) -> None:
        now = time.monotonic()
        for c in self.consumers:
            if not c.disabled:
                c.call("tick", now)

    def run(self) -> None:
        next_tick = time.monotonic() + self.tick_interval
        while not self.stop_event.is_set():
            n = self.sweep()
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + self.tick_interval
            if n == 0:
                self.stop_event.wait(self.idle_sleep)
            elif n < self.min_batch:
                self.stop_event.wait(self.batch_wait)
        self.tick()

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

    def close(self) -> None:
        """Stop, close every consumer (once), give the rings' claims up."""
        self.stop()
        for c in self.consumers:
            c.close()
        for s in self.sources:
            s.ring.unclaim()
        self.sources = []

    def __enter__(self) -> ConsumerLoop:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def drain(sources: Iterable[RingSource | tuple], consumers: Sequence[Consumer | Running],
          max_batch: int = 4096) -> int:
    """Consume everything ready now on the given rings, once, then tick; the descriptor count."""
    loop = ConsumerLoop(sources, consumers, max_batch)
    total = n = loop.sweep()
    while n:
        total += (n := loop.sweep())
    loop.tick()
    return total
