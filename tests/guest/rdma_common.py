"""What the RDMA check scripts share (tests/guest/rdma_checks.py on rxe0,
tests/guest/rdma_pair_checks.py on rxh across two guests): arenas with a test producer, the
sender's loops, and the receiver role, a process of its own:

    python tests/guest/rdma_common.py recv PORT RING_SIZE LAST_SEQ STALL OUT [DEVICE]

which receives until LAST_SEQ has arrived and the sender ended the stream, and writes OUT (JSON):
the seqs its ring saw in order, bad descriptors, what a STALL (ms, once the ring is full)
showed, and the receiver's stats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from dataplane._native import lib

from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.layout import TRAILER_DTYPE as TRAILER
from dataplane.transport.auth import REASONS
from dataplane.transport.rdma import RdmaReceiver, RdmaSender

MAGIC = lib.DP_GEN_MAGIC
FRAME = 256
HOST = "10.9.9.1"
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def make_arena(name: str, ring_size: int) -> Arena:
    p = SHM / f"rdma-{name}-{os.getpid()}"
    p.unlink(missing_ok=True)
    a = Arena.create(p, ArenaGeometry(n_ports=1, rings=((0, 0),), ring_size=ring_size,
                                      slot_size=FRAME, pool_bytes=0))
    a.unlink()
    return a


def trailers(a: Arena, batch: np.ndarray) -> np.ndarray:
    at = (batch["addr"] + batch["len"] - TRAILER.itemsize).astype(np.int64)
    raw = a.buf[at[:, None] + np.arange(TRAILER.itemsize)]
    return np.ascontiguousarray(raw).view(TRAILER).reshape(-1)


def fill(a: Arena, seq0: int, n: int, length: int = FRAME) -> None:
    """Produce n frames with seqs seq0.. on ring 0 (the test's own producer)."""
    r = a.rings[0]
    ring = r.shared
    prod = int(ring.prod)
    assert prod - int(ring.cons) + n <= r.size
    idx = (prod + np.arange(n)) & r.mask
    slots = r.slots(idx).astype(np.int64)    # arena offsets, to index a.buf with
    d = r.desc[idx]
    d["addr"], d["len"], d["rx_ns"] = slots, length, time.time_ns()
    d["flags"] = lib.DP_F_GENERATED
    r.desc[idx] = d
    t = np.zeros(n, TRAILER)
    t["seq"], t["tx_ns"] = np.arange(seq0, seq0 + n), time.time_ns()
    t["stream"], t["magic"] = 7, MAGIC
    at = slots + length - TRAILER.itemsize
    a.buf[at[:, None] + np.arange(TRAILER.itemsize)] = t.view(np.uint8).reshape(n, -1)
    ring.prod = prod + n


# The key of the test links: both ends (one guest or two) run these files.  Every check runs
# authenticated, as a configured transport must; tests/guest/rdma_checks.py also tries without.
KEY = bytes(range(32))


# ---- the receiver role ----

def receiver(port: int, ring_size: int, last: int, stall: int, out: Path,
             device: str = "rxe0") -> None:
    a = make_arena("rx", ring_size)
    rx = RdmaReceiver(a, port=port, device=device, key=KEY)
    r = a.rings[0]
    seqs: list[int] = []
    bad: list[str] = []
    info: dict[str, Any] = {}
    stalled = stall > 0
    end = time.monotonic() + 240
    print(f"recv {port}: listening", flush=True)
    while time.monotonic() < end:
        rx.poll()
        if stalled:
            occ = r.occupancy()
            if occ < ring_size:
                continue
            # full: the sender is out of credits.  Hold, then check nothing was overwritten.
            held = r.desc[:].copy()
            before = trailers(a, held)["seq"].copy()
            t = time.monotonic()
            while time.monotonic() - t < stall / 1000:
                rx.poll()
            after = trailers(a, held)["seq"]
            info = {"held": occ, "occupancy_after": r.occupancy(),
                    "unchanged": bool(np.array_equal(before, after)),
                    "published_while_full": rx.stats()["packets"]}
            stalled = False
        b = r.peek()
        if len(b) == 0:
            continue
        t = trailers(a, b)
        if not (t["magic"] == MAGIC).all():
            bad.append(f"bad magic at seq index {len(seqs)}")
        seqs.extend(t["seq"].tolist())
        r.release(len(b))
        if seqs and seqs[-1] >= last:
            break
    # the last packet is here; the sender ends the stream (END, acknowledged) once it has seen
    # its last completion: stopping before that would be a peer error on its side
    end = time.monotonic() + 60
    while rx.conn is not None and time.monotonic() < end:
        rx.poll()
    book = rx.acceptor.book.auth
    auth = {"ok": int(book.ok), **{r: int(book.failures[i]) for i, r in enumerate(REASONS)}}
    out.write_text(json.dumps({"seqs": seqs, "bad": bad, "stall": info, "stats": rx.stats(),
                               "auth": auth}))
    rx.close()


def spawn(port: int, ring_size: int, last: int, stall: int, out: Path,
          device: str = "rxe0") -> subprocess.Popen:
    """A receiver process (the role above) on `device`, returned once it listens: a sender that
    connects before gives up after its connect timeout (starting Python with pyverbs took over
    30 s once in the emulated guest on a busy host)."""
    p = subprocess.Popen([sys.executable, __file__, "recv", str(port), str(ring_size),
                          str(last), str(stall), str(out), device], stdout=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline()      # "recv PORT: listening", or "" when it died first
    assert line.startswith("recv"), f"receiver on port {port} ended before listening: {p.wait()}"
    return p


# ---- the sender ----

def run_sender(tx: RdmaSender, until: Callable[[], bool], timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not until():
        tx.poll()
        assert time.monotonic() < end, f"sender timed out: {tx.stats()}"


def send_all(tx: RdmaSender, a: Arena, timeout: float = 180) -> None:
    """Send everything on ring 0, then end the stream explicitly (END, acknowledged): the
    receiver has published every batch, and neither side counts the close as an error."""
    run_sender(tx, lambda: a.rings[0].occupancy() == 0, timeout)
    assert tx.finish(), f"end of stream not acknowledged: {tx.stats()}"


def in_order(seqs: list[int], first: int, last: int) -> bool:
    return seqs == list(range(first, last + 1))


if __name__ == "__main__" and sys.argv[1:2] == ["recv"]:
    port, ring_size, last, stall = (int(x) for x in sys.argv[2:6])
    receiver(port, ring_size, last, stall, Path(sys.argv[6]), *sys.argv[7:8])
