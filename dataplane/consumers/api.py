"""The consumer API: what a consumer of the run's rings is given, and what it gives back.

This is the protocol users write against (docs/consumers.md); it is kept stable: new members
are added with defaults, none is removed or changes meaning within a major version.

A consumer is an object made by a factory, `factory(name, options) -> consumer`, named in a
`[[consumer]]` table (`entry = "package.module:factory"`, or the name of an entry point in the
`dataplane.consumers` group).  In the run's consumer loop it is given:

- on_batch(batch): each batch of the rings it reads, in ring order, after the consumers before
  it in the config and before those after it.  The batch is released to the worker when the
  last consumer returns: what a consumer keeps must be copied out (numpy does it in one call).
- tick(now): about every 0.1 s (periodic work: flush, expire, export).
- collect(): Prometheus metric families, called at scrape time from the exporter's thread (read
  what the loop's thread wrote, copy-on-write; never take a lock the loop waits on).
- close(): once, at the end of the run, or when it is disabled or replaced after an error.

Everything runs in the loop's one thread: a slow consumer slows the rings it reads (the loop
times each one: dataplane_consumer_seconds_total{consumer}), an exception is counted and the
consumer disabled or made again (`on_error`), never seen by the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from dataplane.shm.arena import Arena
    from dataplane.shm.ring import RingReader


@dataclass
class RingSource:
    """One ring the loop drains: its arena, its reader, and what to call it.  `name` is the
    worker (or transport receiver) whose arena it is, `port_label` its port's label."""
    arena: Arena
    ring: RingReader
    name: str = ""
    port_label: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or self.arena.path.name
        self.port_label = self.port_label or str(self.ring.port)

    @property
    def port(self) -> int:
        return int(self.ring.port)

    @property
    def queue(self) -> int:
        return int(self.ring.queue)


class Batch:
    """Descriptors of one ring, ready, in order, not yet released: `desc` is a numpy view of
    the ring (DESC_DTYPE, docs/design.md), valid only until on_batch returns.

    A descriptor's `addr` is an offset into the arena and `len` the bytes stored there; frames
    are read in place (frame()), gathered with numpy (heads()), or handed to C with `arena_base`
    and `arena_size` (a C function must check addr + len <= arena_size: the descriptors are the
    worker's shared memory, never trusted)."""

    __slots__ = ("desc", "source")

    def __init__(self, desc: np.ndarray, source: RingSource):
        self.desc = desc
        self.source = source

    def __len__(self) -> int:
        return len(self.desc)

    @property
    def arena(self) -> Arena:
        return self.source.arena

    @property
    def arena_size(self) -> int:
        return self.source.arena.buf.size

    def frame(self, i: int) -> memoryview:
        """Descriptor i's frame, in place (zero-copy), cut to the arena if the descriptor lies."""
        d = self.desc[i]
        addr = min(int(d["addr"]), self.arena_size)
        return self.source.arena.frame(addr, min(int(d["len"]), self.arena_size - addr))

    def heads(self, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `nbytes` of every frame, as an (n, nbytes) uint8 copy (zero past a frame's
        end), and each frame's stored length: one numpy gather for the whole batch."""
        buf = self.source.arena.buf
        n = len(self.desc)
        lens = self.desc["len"].astype(np.int64)
        addr = np.minimum(self.desc["addr"], np.uint64(buf.size)).astype(np.int64)
        lens = np.minimum(lens, buf.size - addr)       # a lying descriptor is cut, not read
        idx = addr[:, None] + np.arange(nbytes, dtype=np.int64)[None, :]
        inside = np.arange(nbytes)[None, :] < lens[:, None]
        out = np.zeros((n, nbytes), dtype=np.uint8)
        out[inside] = buf[idx[inside]]
        return out, lens


class Consumer(Protocol):
    """What a factory returns (tick, collect and close may be left to ConsumerBase)."""
    name: str

    def on_batch(self, batch: Batch) -> None: ...

    def tick(self, now: float) -> None: ...

    def collect(self) -> Iterable[Metric]: ...

    def close(self) -> None: ...


class ConsumerBase:
    """Defaults for a consumer's optional members: subclass it and write on_batch."""

    def __init__(self, name: str, options: dict[str, Any] | None = None):
        self.name = name
        self.options = dict(options or {})

    def on_batch(self, batch: Batch) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        return None

    def collect(self) -> Iterable[Metric]:
        return ()

    def close(self) -> None:
        return None
