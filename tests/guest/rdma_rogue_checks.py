"""Run inside `scripts/guest --rdma` (see tests/test_rdma_rogue.py): a peer that holds the key
and so got a valid session (the greeting's rkeys and addresses) and then misbehaves, against
an RdmaReceiver on rxe0 in this same process (polled by a thread), so the check sees the
receiver's arena itself.  Writes RESULTS (JSON), one entry per check.

    python tests/guest/rdma_rogue_checks.py RESULTS

  - writes_outside: RDMA WRITE with each rkey of the greeting to the arena header's error
    field, the ring's prod and cons, its published descriptors, and the bytes just before and
    just after the slots: every one fails with a work completion error and the header, ring and
    descriptors are byte for byte what they were; a write into a slot and one into the staging
    area (what the keys are for) succeed;
  - descriptors_rewritten: descriptors sent with a foreign port, queue, rx_ns are published with
    the receiver's ring's port and queue, its slot addresses and its receive time;
  - bad_descriptors: a batch with one len over the slot size, another with a flag no worker sets:
    nothing of either published (prod, the header, the ring's counters unchanged), each counted
    in bad_descriptors.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import Checks  # tests/guest, the script's folder, is on sys.path
from dataplane._native import ffi, lib
from rdma_common import FRAME, HOST, KEY, SHM, fill, make_arena

from dataplane.consumers.stats import TrafficStats
from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.transport.rdma import RdmaReceiver, RdmaSender
from dataplane.transport.rdma.link import verbs

RING = 64
RX_PORT, RX_QUEUE = 1, 2        # the receiver's ring: what it must stamp on what it publishes
TEXT = b"ROGUE-WROTE-HERE" * 2


class Receiver:
    """An RdmaReceiver on its own arena (ring (RX_PORT, RX_QUEUE)), polled by a thread."""

    def __init__(self, port: int) -> None:
        p = SHM / f"rdma-rogue-rx-{os.getpid()}-{port}"
        p.unlink(missing_ok=True)
        self.a = Arena.create(p, ArenaGeometry(n_ports=2, rings=((RX_PORT, RX_QUEUE),),
                                               ring_size=RING, slot_size=FRAME, pool_bytes=0))
        self.a.unlink()
        self.ring = self.a.rings[0]
        self.rx = RdmaReceiver(self.a, port=port, key=KEY)
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            self.rx.poll()
            time.sleep(0.0005)

    def protected(self, upto: int = 0) -> bytes:
        """Header, ring (indexes, counters) and its descriptors: everything before the slots
        (`upto`: before that arena offset)."""
        return self.a.buf[:upto or self.ring.slots_off].tobytes()

    def close(self) -> None:
        self._stop = True
        self._t.join(10)
        self.rx.close()


def connected(tx: RdmaSender) -> RdmaSender:
    """tx on a new connection (the old one, if any, dropped first)."""
    tx._teardown()
    tx.connect(timeout=60)
    return tx


def write(tx: RdmaSender, src: int, rkey: int, raddr: int, length: int = len(TEXT)) -> int:
    """One signaled RDMA WRITE of `length` bytes at tx's arena offset `src`: its WC status."""
    from pyverbs.wr import SGE, SendWR
    e = verbs()
    wr = SendWR(wr_id=777, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                sg=[SGE(tx.local.addr + src, length, tx.local.lkey)],
                send_flags=e.IBV_SEND_SIGNALED)
    wr.set_wr_rdma(rkey, raddr)
    tx.link.qp.post_send(wr)
    end = time.monotonic() + 30
    while True:
        n, wcs = tx.link.cq.poll()
        if n:
            return int(wcs[0].status)
        assert time.monotonic() < end, "no completion for the rogue write"


def writes_outside() -> dict[str, Any]:
    e = verbs()
    rcv = Receiver(18701)
    a = make_arena("rogue-tx1", RING)
    src = int(a.rings[0].slots(0))
    a.buf[src:src + len(TEXT)] = np.frombuffer(TEXT, np.uint8)
    tx = RdmaSender(a, host=HOST, port=18701, key=KEY)
    try:
        connected(tx)
        peer = dict(tx.peer)
        base = rcv.a.buf.ctypes.data
        ring = rcv.ring
        ring_at = base + ring.desc_off - ffi.sizeof("struct dp_ring")
        slots_end = peer["slot_addr"] + RING * FRAME
        assert peer["slot_addr"] == base + ring.slots_off, peer
        targets = {"header_error": base + ffi.offsetof("struct dp_arena", "error"),
                   "ring_prod": ring_at, "ring_cons": ring_at + ffi.offsetof("struct dp_ring",
                                                                          "cons"),
                   "published_descriptors": base + ring.desc_off,
                   "just_before_slots": peer["slot_addr"] - len(TEXT),
                   "just_after_slots": slots_end}
        before = rcv.protected()
        status: dict[str, int] = {}
        for name, addr in targets.items():
            for key in ("slot_rkey", "stage_rkey"):
                status[f"{name} {key}"] = write(connected(tx), src, peer[key], addr)
        after = rcv.protected()
        # what the keys are for: a slot with the slots' key, the staging area with its own
        ok_slot = write(connected(tx), src, peer["slot_rkey"], peer["slot_addr"] + 3 * FRAME)
        ok_stage = write(tx, src, peer["stage_rkey"], peer["stage_addr"])
        landed = bytes(rcv.a.buf[ring.slots_off + 3 * FRAME:][:len(TEXT)])
    finally:
        tx.close()
        rcv.close()
    refused = {k: v for k, v in status.items() if v != e.IBV_WC_SUCCESS}
    assert refused == status, {k: v for k, v in status.items() if k not in refused}
    assert after == before and TEXT[:16] not in after, "a rogue write landed before the slots"
    assert ok_slot == ok_stage == e.IBV_WC_SUCCESS and landed == TEXT, (ok_slot, ok_stage)
    return {"status": status, "rem_access_err": int(e.IBV_WC_REM_ACCESS_ERR),
            "unchanged_bytes": len(before)}


def descriptors_rewritten() -> dict[str, Any]:
    n = 40
    rcv = Receiver(18702)
    a = make_arena("rogue-tx2", RING)
    fill(a, 0, n)
    d = a.rings[0].desc
    d["port"], d["queue"], d["rx_ns"], d["hash"] = 5, 3, 1, 0xBEEF
    tx = RdmaSender(a, host=HOST, port=18702, key=KEY)
    t0 = time.time_ns()
    try:
        connected(tx)
        end = time.monotonic() + 60
        while int(rcv.ring.shared.prod) < n:
            tx.poll()
            assert time.monotonic() < end, f"not published: {rcv.rx.stats()}"
        rcv.ring.refresh()
        got = rcv.ring.peek(n).copy()
        stats = TrafficStats()
        stats.consume(got, rcv.a)
        rings = sorted((p, q) for _, p, q in stats.rings)
    finally:
        tx.close()
        rcv.close()
    want_addr = rcv.ring.slots(np.arange(n))
    assert set(got["port"].tolist()) == {RX_PORT} and set(got["queue"].tolist()) == {RX_QUEUE}
    assert got["addr"].tolist() == want_addr.tolist()
    assert int(got["rx_ns"].min()) >= t0 and set(got["hash"].tolist()) == {0xBEEF}
    assert (got["flags"] & lib.DP_F_COPIED).all() and rings == [(RX_PORT, RX_QUEUE)], rings
    return {"published": len(got), "ports": sorted(set(got["port"].tolist())),
            "queues": sorted(set(got["queue"].tolist())), "consumer_rings": rings}


def bad_descriptors() -> dict[str, Any]:
    rcv = Receiver(18703)
    out: dict[str, Any] = {}
    try:
        for i, (field, value) in enumerate((("len", FRAME + 1), ("flags", 0x8000))):
            a = make_arena(f"rogue-tx3{i}", RING)
            fill(a, 0, 4)
            a.rings[0].desc[field][1] = value
            tx = RdmaSender(a, host=HOST, port=18703, key=KEY)
            try:
                connected(tx)
                # the header and the ring's indexes and counters (the descriptors of positions
                # not published are the receiver's to write: the staged ones are copied there)
                before = rcv.protected(rcv.ring.desc_off)
                end = time.monotonic() + 60
                while rcv.rx.stats()["bad_descriptors"] < i + 1:
                    tx.poll()
                    assert time.monotonic() < end, f"not refused: {rcv.rx.stats()}"
                out[field] = {"prod": int(rcv.ring.shared.prod),
                              "unchanged": rcv.protected(rcv.ring.desc_off) == before}
            finally:
                tx.close()
        s = rcv.rx.stats()
    finally:
        rcv.close()
    assert all(v == {"prod": 0, "unchanged": True} for v in out.values()), out
    assert s["bad_descriptors"] == 2 and s["bad_batches"] == 2 and s["packets"] == 0, s
    return {"cases": out, "receiver": s}


def corrupted_cons() -> dict[str, Any]:
    """The ring's consumer index is written by another process: one the receiver could not
    have seen (ahead of what it published) stops it with the reason, before any credit
    goes out from it; the same at start."""
    from dataplane.shm.ring import RingCorrupted
    a = make_arena("rogue-cons", RING)
    out: dict[str, Any] = {}
    a.rings[0].shared.cons = 5                    # ahead of prod 0
    try:
        RdmaReceiver(a, port=18704, key=KEY).close()
        out["at_start"] = "accepted"
    except RingCorrupted as e:
        out["at_start"] = str(e)
    a.rings[0].shared.cons = 0
    rx = RdmaReceiver(a, port=18704, key=KEY)
    try:
        a.rings[0].shared.cons = 3
        try:
            rx._cons()            # what poll() and _publish() read the consumer index through
            out["running"] = "accepted"
        except RingCorrupted as e:
            out["running"] = str(e)
    finally:
        rx.close()
    assert "impossible" in out["at_start"] and "outside [0, 0]" in out["running"], out
    return out


if __name__ == "__main__":
    checks = Checks(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/lab/results.json"),
                    "rdma-rogue")
    for step in (writes_outside, descriptors_rewritten, bad_descriptors, corrupted_cons):
        checks.run(step)
    sys.exit(checks.exit_code())
