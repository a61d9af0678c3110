"""Run inside `scripts/guest --rdma` (see tests/test_rdma.py): the RDMA transport on rxe0 with
its two ends in two processes.  This process is the sender; each receiver is this script run
again with the role `recv`.  Writes RESULTS (JSON), one entry per check:
{"ok": bool, "detail": ..., "error": traceback or ""}.

    python tests/guest/rdma_checks.py RESULTS
    python tests/guest/rdma_checks.py recv PORT RING_SIZE LAST_SEQ STALL OUT [DEVICE]  (internal;
                                        also tests/guest/rdma_pair_checks.py's, on rxh)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dataplane._native import ffi, lib  # noqa: E402

from dataplane.shm.arena import Arena, ArenaGeometry  # noqa: E402
from dataplane.transport.rdma import RdmaReceiver, RdmaSender  # noqa: E402

TRAILER = np.dtype([("seq", "<u8"), ("tx_ns", "<u8"), ("stream", "<u4"), ("magic", "<u4")])
MAGIC = 0x31475044
FRAME = 256
HOST = "10.9.9.1"
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
RESULTS: dict[str, dict[str, Any]] = {}


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
    ring = lib.dp_arena_ring(ffi.cast("void *", a.header), 0)
    prod = int(ring.prod)
    assert prod - int(ring.cons) + n <= r.size
    idx = (prod + np.arange(n)) & r.mask
    slots = a.header.slots_off + idx * FRAME
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


# ---- the receiver role ----

def receiver(port: int, ring_size: int, last: int, stall: int, out: Path,
             device: str = "rxe0") -> None:
    a = make_arena("rx", ring_size)
    rx = RdmaReceiver(a, port=port, device=device)
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
    out.write_text(json.dumps({"seqs": seqs, "bad": bad, "stall": info, "stats": rx.stats()}))
    rx.close()


# ---- the sender (this process) ----

def check(fn: Callable[[], Any], out: Path) -> None:
    t = time.monotonic()
    try:
        RESULTS[fn.__name__] = {"ok": True, "detail": fn(), "error": ""}
    except Exception:   # noqa: BLE001 - every failure is reported, the next check runs
        RESULTS[fn.__name__] = {"ok": False, "detail": None, "error": traceback.format_exc()}
    RESULTS[fn.__name__]["seconds"] = round(time.monotonic() - t, 2)
    print(f"rdma-check {fn.__name__}: {'ok' if RESULTS[fn.__name__]['ok'] else 'FAILED'} "
          f"({RESULTS[fn.__name__]['seconds']} s)", flush=True)
    out.write_text(json.dumps(RESULTS, indent=1))


def spawn(port: int, ring_size: int, last: int, stall: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "recv", str(port), str(ring_size),
                             str(last), str(stall), str(out)])


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


def collect(tx: RdmaSender, out: Path, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The receiver's report and the sender's last stats (the sender is closed): every seq
    0..n-1 arrived once, in order, and no descriptor was bad."""
    got = json.loads(out.read_text())
    s = tx.stats()
    tx.close()
    assert not got["bad"], got["bad"][:3]
    assert in_order(got["seqs"], 0, n - 1), (len(got["seqs"]), got["seqs"][:5])
    return got, s


def end_to_end() -> dict[str, Any]:
    n = 2000
    out = Path(tempfile.mktemp(prefix="rx1-"))
    p = spawn(18601, 1024, n - 1, 0, out)
    a = make_arena("tx1", 2048)
    fill(a, 0, n)
    tx = RdmaSender(a, host=HOST, port=18601)
    t = time.monotonic()
    try:
        send_all(tx, a)
        took = time.monotonic() - t
        assert p.wait(120) == 0
    finally:
        p.kill()
    got, s = collect(tx, out, n)
    assert s["packets"] == n and s["bytes"] == n * FRAME, s
    return {"frames": n, "seconds": round(took, 2), "sender": s, "receiver": got["stats"]}


def credit_exhaustion() -> dict[str, Any]:
    n, ring = 512, 64
    out = Path(tempfile.mktemp(prefix="rx2-"))
    p = spawn(18602, ring, n - 1, 1500, out)
    a = make_arena("tx2", 512)
    fill(a, 0, n)
    tx = RdmaSender(a, host=HOST, port=18602)
    try:
        send_all(tx, a)
        assert p.wait(120) == 0
    finally:
        p.kill()
    got, s = collect(tx, out, n)
    st = got["stall"]
    assert st["held"] == ring and st["occupancy_after"] == ring and st["unchanged"], st
    assert s["credits_wait"] >= 1, s
    return {"sender": s, "stall": st, "receiver": got["stats"]}


def peer_killed() -> dict[str, Any]:
    n, port = 1200, 18603
    out_a, out_b = Path(tempfile.mktemp(prefix="rx3a-")), Path(tempfile.mktemp(prefix="rx3b-"))
    pa = spawn(port, 1024, 10 ** 9, 0, out_a)
    a = make_arena("tx3", 2048)
    fill(a, 0, n)
    tx = RdmaSender(a, host=HOST, port=port)
    pb = None
    try:
        run_sender(tx, lambda: tx.stats()["packets"] >= 400)
        pa.send_signal(signal.SIGKILL)
        pa.wait()
        killed_at = tx.stats()["packets"]
        # keep sending into the dead peer until the error shows
        end = time.monotonic() + 60
        while tx.link is not None:
            tx.poll()
            assert time.monotonic() < end, "no error after the peer was killed"
        err, before = tx.last_error, tx.stats()
        pb = spawn(port, 1024, n - 1, 0, out_b)
        send_all(tx, a)
        assert pb.wait(120) == 0
    finally:
        pa.kill()
        if pb:
            pb.kill()
    got = json.loads(out_b.read_text())
    s = tx.stats()
    tx.close()
    seqs = got["seqs"]
    assert not got["bad"], got["bad"][:3]
    assert seqs and in_order(seqs, seqs[0], n - 1), seqs[:5]
    # released = completed (the bytes reached the receiver's memory, which died with them);
    # batches in flight at the kill may complete after it: the rest is sent again, from the
    # first position not acknowledged when the error showed
    assert seqs[0] == before["packets"] >= killed_at, (seqs[0], before, killed_at)
    assert before["wc_errors"] + before["peer_errors"] >= 1 and err, before
    assert s["reconnects"] == 1, s
    return {"killed_at": killed_at, "error": err, "after_kill": before, "sender": s,
            "restarted_first_seq": seqs[0], "restarted_frames": len(seqs),
            "receiver": got["stats"]}


def wc_error_reconnect() -> dict[str, Any]:
    """A work completion error (a wrong rkey: remote access error, both QPs in error state),
    short frames (one WR per frame): counted, reconnected to the same receiver, every seq once."""
    n, port, short = 600, 18604, 200
    out = Path(tempfile.mktemp(prefix="rx4-"))
    p = spawn(port, 256, n - 1, 0, out)
    a = make_arena("tx4", 1024)
    fill(a, 0, n, short)
    tx = RdmaSender(a, host=HOST, port=port)
    try:
        run_sender(tx, lambda: tx.stats()["packets"] >= 192)
        tx.peer["rkey"] ^= 0x5A5A
        end = time.monotonic() + 60
        while tx.link is not None:
            tx.poll()
            assert time.monotonic() < end, "no error with a wrong rkey"
        err, before = tx.last_error, tx.stats()
        send_all(tx, a)
        assert p.wait(120) == 0
    finally:
        p.kill()
    got, s = collect(tx, out, n)
    assert before["wc_errors"] == 1 and "status" in err, before
    assert s["reconnects"] == 1 and s["bytes"] == n * short, s
    return {"error": err, "after_error": before, "sender": s, "receiver": got["stats"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "recv":
        port, ring_size, last, stall = (int(x) for x in sys.argv[2:6])
        receiver(port, ring_size, last, stall, Path(sys.argv[6]), *sys.argv[7:8])
        sys.exit(0)
    OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/lab/results.json")
    for step in (end_to_end, credit_exhaustion, peer_killed, wc_error_reconnect):
        check(step, OUT)
    sys.exit(0 if all(r["ok"] for r in RESULTS.values()) else 1)
