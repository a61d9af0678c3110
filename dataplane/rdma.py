"""RDMA RC transport between two arenas through pyverbs: a ring of one arena (the sender's) is
carried into a ring of another (the receiver's), frames and descriptors written by the NIC.

    rx = RdmaReceiver(arena, ring=0, port=18515)       # registers ring + slots once, listens
    while ...: rx.poll()                                # accept, publish, return credits
    tx = RdmaSender(local_arena, ring=0, host="10.9.9.1", port=18515)
    while ...: tx.poll()                                # peek a batch, WRITE it, release it
    tx.stats()   # batches, packets, bytes, credits_wait, wc_errors, peer_errors, reconnects

Connection set-up: a small TCP exchange, not rdma_cm.  The receiver listens; per connection it
makes a new RC QP and sends one JSON line (QPN, GID, rkey, virtual addresses of its ring's
descriptor array and slot 0, the slots' arena offset, ring size, slot size, its prod and cons);
the sender answers with its QPN and GID, both move their QP to RTS, the receiver says "ready".
Why TCP: rdma_cm does not work on lo (and needs an IP route to an RDMA device even when both
ends are in one host); a TCP socket works everywhere the control plane already does, it is ~40
lines, and the same socket then carries the credits and tells each side when the other is gone
(EOF/RST arrives at once, a dead QP only after the retry timeout).

Data path, per batch of n descriptors (RingReader.peek, a contiguous batch):
  - frames: RDMA WRITE into the receiver's slots of ring positions tail..tail+n-1 (slot i <->
    ring position i, as in copy mode).  A run of frames that sit slot_size apart locally and land
    in consecutive remote slots (the usual case: a copy-mode arena with the same slot size) is ONE
    work request with one SGE; otherwise one WR per frame (an SGE list would pack the frames
    back to back remotely, not slot-aligned).  WRs are unsignaled except the last.
  - descriptors: copied to a registered staging buffer with `addr` rewritten to the receiver's
    slot offsets (numpy, no per-packet Python), then RDMA WRITE into the receiver's descriptor
    array at the same positions (two WRs when the batch wraps the remote ring); the last one is
    WRITE_WITH_IMM, imm = n.  RC delivers in order, so when the receiver sees the immediate the
    frames and descriptors are in place: it validates the descriptors (addr is the slot of its
    position, len <= slot_size) and publishes them (prod += n).
  - the sender waits for the signaled WR's completion, then releases the batch locally.  A batch
    whose WRs did not complete is not released: after a reconnect it is sent again (at least
    once; the new receiver's ring starts from its own prod).
Publishing prod from Python is a plain store through cffi after the descriptors were written by
the HCA: on x86 (TSO) stores are not reordered with earlier stores, which is what the C
producer's release store guarantees elsewhere.

Credits: the sender may write positions [tail, cons + ring_size) only, where cons is the
receiver's consumer index: it never overwrites a slot the receiver's consumer has not given
back.  The receiver sends its cons (8 bytes, '<Q') on the TCP socket whenever it moved; at zero
credits the sender waits (counted once per stall in credits_wait) for such a message.

Errors: a work completion with an error status (wc_errors), a post that fails, the TCP peer
gone or a completion timeout (peer_errors): the error is kept in `last_error`, the QP and CQ are
destroyed and the sender reconnects (new QPs through a new TCP exchange; `reconnects`), retrying
until the peer is back.  The receiver drops a broken connection and accepts the next one.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from typing import Any

import numpy as np

from dataplane._native import ffi, lib
from dataplane.arena import DESC_DTYPE, Arena
from dataplane.mr_cache import MRCache

CREDIT = struct.Struct("<Q")
MAX_BATCH = 64


class RdmaError(Exception):
    """A broken connection: WC error, failed post, peer gone, timeout."""


class WCError(RdmaError):
    """A work completion with an error status (the QP is in the error state now)."""


def _verbs() -> Any:
    import pyverbs.enums as e
    return e


def _gid_index(ctx: Any) -> int:
    """The first IPv4-mapped GID (RoCEv2), else 0."""
    port = ctx.query_port(1)
    for i in range(port.gid_tbl_len):
        try:
            g = str(ctx.query_gid(1, i))
        except Exception:   # noqa: BLE001,S112 - holes in the table
            continue
        if g == "0000:0000:0000:0000:0000:0000:0000:0000":
            break
        if g.startswith("0000:0000:0000:0000:0000:ffff"):
            return i
    return 0


class _Link:
    """One RC QP and its CQ in a device context."""

    def __init__(self, ctx: Any, pd: Any, depth: int) -> None:
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPCap, QPInitAttr
        e = _verbs()
        self.e = e
        self.ctx = ctx
        self.gidx = _gid_index(ctx)
        self.gid = ctx.query_gid(1, self.gidx)
        self.cq = CQ(ctx, 2 * depth)
        cap = QPCap(max_send_wr=depth, max_recv_wr=depth, max_send_sge=1, max_recv_sge=1)
        self.qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))
        from pyverbs.qp import QPAttr
        a = QPAttr(qp_state=e.IBV_QPS_INIT)
        a.qp_access_flags = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
        a.port_num, a.pkey_index = 1, 0
        self.qp.to_init(a)

    def info(self) -> dict[str, Any]:
        return {"qpn": self.qp.qp_num, "gid": str(self.gid)}

    def connect(self, remote: dict[str, Any]) -> None:
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr
        e = self.e
        a = QPAttr(qp_state=e.IBV_QPS_RTR)
        a.path_mtu, a.dest_qp_num, a.rq_psn = e.IBV_MTU_1024, remote["qpn"], 0
        a.max_dest_rd_atomic, a.min_rnr_timer = 1, 12
        a.ah_attr = AHAttr(gr=GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gidx),
                           is_global=1, port_num=1)
        self.qp.to_rtr(a)
        a.qp_state, a.sq_psn, a.timeout, a.retry_cnt, a.rnr_retry = e.IBV_QPS_RTS, 0, 12, 3, 7
        a.max_rd_atomic = 1
        self.qp.to_rts(a)

    def close(self) -> None:
        for x in (self.qp, self.cq):
            try:
                x.close()
            except Exception:   # noqa: BLE001,S110 - best effort on a broken link
                pass


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _recv_line(sock: socket.socket, timeout: float) -> dict[str, Any]:
    sock.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            raise RdmaError("peer closed the connection during the exchange")
        buf += c
    return json.loads(buf)


class RdmaReceiver:
    """Registers one ring's descriptors and slots of `arena` once; accepts senders one at a time,
    publishes what they write and returns credits as the ring's consumer releases."""

    def __init__(self, arena: Arena, ring: int = 0, port: int = 18515, host: str = "0.0.0.0",
                 device: str = "rxe0", cache: MRCache | None = None) -> None:
        from pyverbs.device import Context
        from pyverbs.pd import PD
        self.arena = arena
        self.ring_index = ring
        h = arena.header
        self.size, self.slot_size = arena.ring_size, h.slot_size
        self.mask = self.size - 1
        self._ring = lib.dp_arena_ring(ffi.cast("void *", h), ring)
        self.desc_off = h.rings_off + ring * h.ring_stride + ffi.sizeof("struct dp_ring")
        self.slots_off = h.slots_off + ring * self.size * self.slot_size
        self.desc = arena.rings[ring].desc
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        self.cache = cache or MRCache(self.ctx, self.pd)
        lo = self.desc_off
        hi = self.slots_off + self.size * self.slot_size
        self.reg = self.cache.get(arena._mm, lo, hi - lo)     # once, for every connection
        from pyverbs.mr import MR
        self.sink = MR(self.pd, 64, _verbs().IBV_ACCESS_LOCAL_WRITE)   # RecvWRs need an SGE
        self.lsock = socket.create_server((host, port), reuse_port=False)
        self.lsock.setblocking(False)
        self.conn: socket.socket | None = None
        self.link: _Link | None = None
        self.last_credit = -1
        self.last_error = ""
        self.s = {"batches": 0, "packets": 0, "bytes": 0, "bad_batches": 0, "wc_errors": 0,
                  "peer_errors": 0, "connects": 0, "credits_sent": 0}

    def _accept(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        link = _Link(self.ctx, self.pd, 2 * MAX_BATCH)
        try:
            for i in range(MAX_BATCH):
                link.qp.post_recv(self._recv_wr(i))
            cons = int(self._ring.cons)
            _send_json(conn, {**link.info(), "rkey": self.reg.rkey,
                              "desc_addr": self.reg.addr,
                              "slot_addr": self.reg.addr + self.slots_off - self.desc_off,
                              "slots_off": self.slots_off, "ring_size": self.size,
                              "slot_size": self.slot_size, "prod": int(self._ring.prod),
                              "cons": cons})
            link.connect(_recv_line(conn, 10.0))
            _send_json(conn, {"ready": True})
        except Exception as err:   # noqa: BLE001 - OSError, RdmaError, pyverbs errors
            link.close()
            conn.close()
            self.last_error = f"exchange failed: {err}"
            return
        conn.setblocking(False)
        self.conn, self.link = conn, link
        self.last_credit = cons
        self.s["connects"] += 1

    def _recv_wr(self, i: int) -> Any:
        from pyverbs.wr import SGE, RecvWR
        return RecvWR(wr_id=i, num_sge=1, sg=[SGE(self.sink.buf, 8, self.sink.lkey)])

    def _drop(self, why: str, counter: str) -> None:
        self.last_error = why
        self.s[counter] += 1
        if self.link:
            self.link.close()
        if self.conn:
            self.conn.close()
        self.conn = self.link = None

    def poll(self) -> int:
        """One pass: accept, publish completed batches, send credits.  Returns descriptors
        published."""
        if self.conn is None:
            self._accept()
            return 0
        e = self.link.e
        published = 0
        n, wcs = self.link.cq.poll(num_entries=16)
        for wc in wcs[:n]:
            if wc.status != e.IBV_WC_SUCCESS:
                self._drop(f"work completion error status {wc.status} opcode {wc.opcode}",
                           "wc_errors")
                return published
            if wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:
                cnt = wc.imm_data
                if cnt > self.size:
                    cnt = socket.ntohl(cnt)
                published += self._publish(cnt)
                self.link.qp.post_recv(self._recv_wr(wc.wr_id))
        try:
            if self.conn is not None:
                if self.conn.recv(64) == b"":
                    self._drop("sender closed the connection", "peer_errors")
                    return published
        except BlockingIOError:
            pass
        except OSError as err:
            self._drop(f"sender connection: {err}", "peer_errors")
            return published
        cons = int(self._ring.cons)
        if cons != self.last_credit and self.conn is not None:
            try:
                self.conn.send(CREDIT.pack(cons))
                self.last_credit = cons
                self.s["credits_sent"] += 1
            except BlockingIOError:
                pass
            except OSError as err:
                self._drop(f"sender connection: {err}", "peer_errors")
        return published

    def _publish(self, n: int) -> int:
        prod = int(self._ring.prod)
        cons = int(self._ring.cons)
        if n <= 0 or prod + n - cons > self.size:
            self.s["bad_batches"] += 1
            self._drop(f"batch of {n} past the credits (prod {prod}, cons {cons})", "peer_errors")
            return 0
        idx = (prod + np.arange(n, dtype=np.uint64)) & np.uint64(self.mask)
        d = self.desc[idx]
        want = np.uint64(self.slots_off) + idx * np.uint64(self.slot_size)
        if not (np.array_equal(d["addr"], want) and (d["len"] <= self.slot_size).all()):
            self.s["bad_batches"] += 1
            self._drop("descriptors outside their slots", "peer_errors")
            return 0
        self._ring.prod = prod + n      # x86 TSO: a plain store publishes (see the docstring)
        self.s["batches"] += 1
        self.s["packets"] += n
        self.s["bytes"] += int(d["len"].sum())
        return n

    def stats(self) -> dict[str, Any]:
        return {**self.s, "connected": self.conn is not None, "last_error": self.last_error}

    def close(self) -> None:
        if self.link:
            self.link.close()
        if self.conn:
            self.conn.close()
        self.conn = self.link = None
        self.lsock.close()
        self.sink.close()
        self.cache.close()


class RdmaSender:
    """Consumes batches of one ring of a local arena and writes them into a receiver's ring."""

    def __init__(self, arena: Arena, ring: int = 0, host: str = "10.9.9.1", port: int = 18515,
                 device: str = "rxe0", max_batch: int = MAX_BATCH, cq_timeout: float = 10.0,
                 cache: MRCache | None = None) -> None:
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        self.arena = arena
        self.reader = arena.rings[ring]
        self.host, self.port = host, port
        self.max_batch = min(max_batch, MAX_BATCH)
        self.cq_timeout = cq_timeout
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        self.cache = cache or MRCache(self.ctx, self.pd)
        self.local = self.cache.get(arena._mm)          # frames are sent from where they are
        e = _verbs()
        self.e = e
        self.staging = MR(self.pd, MAX_BATCH * DESC_DTYPE.itemsize, e.IBV_ACCESS_LOCAL_WRITE)
        self.slot_size = arena.header.slot_size
        self.sock: socket.socket | None = None
        self.link: _Link | None = None
        self.peer: dict[str, Any] = {}
        self.tail = 0
        self.remote_cons = 0
        self._rxbuf = b""
        self._waiting = False
        self.last_error = ""
        self.s = {"batches": 0, "packets": 0, "bytes": 0, "credits_wait": 0, "wc_errors": 0,
                  "peer_errors": 0, "reconnects": 0, "connects": 0}

    # ---- connection ----

    def connect(self, timeout: float = 30.0) -> None:
        """TCP exchange and a new QP; retries until the receiver answers or timeout."""
        end = time.monotonic() + timeout
        while True:
            try:
                self._connect_once()
                break
            except (OSError, RdmaError, ValueError) as err:
                self._teardown()
                if time.monotonic() > end:
                    raise RdmaError(f"cannot connect to {self.host}:{self.port}: {err}") from err
                time.sleep(0.2)
        if self.s["connects"]:
            self.s["reconnects"] += 1
        self.s["connects"] += 1

    def _connect_once(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=5.0)
        self.sock = sock
        peer = _recv_line(sock, 10.0)
        if peer["slot_size"] < self.slot_size:
            raise RdmaError(f"receiver slots of {peer['slot_size']} B are smaller than the "
                            f"sender's {self.slot_size} B")
        self.link = _Link(self.ctx, self.pd, 2 * MAX_BATCH + 4)
        self.link.connect(peer)
        _send_json(sock, self.link.info())
        if not _recv_line(sock, 10.0).get("ready"):
            raise RdmaError("the receiver did not confirm the connection")
        sock.setblocking(False)
        self.peer = peer
        self.tail, self.remote_cons = peer["prod"], peer["cons"]
        self._rxbuf = b""

    def _teardown(self) -> None:
        if self.link:
            self.link.close()
        if self.sock:
            self.sock.close()
        self.link = self.sock = None

    def _fail(self, why: str, counter: str) -> None:
        self.last_error = why
        self.s[counter] += 1
        self._teardown()

    # ---- credits ----

    def _read_credits(self, wait: float) -> None:
        if wait > 0:
            select.select([self.sock], [], [], wait)
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as err:
            raise RdmaError(f"receiver connection: {err}") from err
        if not data:
            raise RdmaError("receiver closed the connection")
        self._rxbuf += data
        k = len(self._rxbuf) // CREDIT.size * CREDIT.size
        if k:
            self.remote_cons = CREDIT.unpack_from(self._rxbuf, k - CREDIT.size)[0]
            self._rxbuf = self._rxbuf[k:]

    def credits(self) -> int:
        return self.peer["ring_size"] - (self.tail - self.remote_cons) if self.peer else 0

    # ---- data ----

    def poll(self, wait: float = 0.05) -> int:
        """Send at most one batch (reconnecting first when needed); returns frames sent."""
        if self.link is None:
            self.connect()
        try:
            self._read_credits(0)
            batch = self.reader.peek(self.max_batch)
            if len(batch) == 0:
                return 0
            if self.credits() <= 0:
                if not self._waiting:
                    self.s["credits_wait"] += 1
                    self._waiting = True
                self._read_credits(wait)
                if self.credits() <= 0:
                    return 0
            self._waiting = False
            batch = batch[:self.credits()]
            self._write(batch)
        except WCError as err:
            self._fail(str(err), "wc_errors")
            return 0
        except RdmaError as err:
            self._fail(str(err), "peer_errors")
            return 0
        except Exception as err:   # noqa: BLE001 - pyverbs raises its own errors on a dead QP
            self._fail(f"post failed: {err}", "peer_errors")
            return 0
        n = len(batch)
        self.reader.release(n)
        self.tail += n
        self.s["batches"] += 1
        self.s["packets"] += n
        self.s["bytes"] += int(batch["len"].sum())
        return n

    def _write(self, batch: np.ndarray) -> None:
        from pyverbs.wr import SGE, SendWR
        e, p = self.e, self.peer
        n, size, ss = len(batch), p["ring_size"], p["slot_size"]
        rkey = p["rkey"]
        pos = (np.uint64(self.tail) + np.arange(n, dtype=np.uint64)) & np.uint64(size - 1)
        addr = batch["addr"].astype(np.int64)
        lens = batch["len"].astype(np.int64)
        # runs: locally slot_size apart AND consecutive remote positions (no wrap)
        brk = np.flatnonzero((np.diff(addr) != ss) | (np.diff(pos.astype(np.int64)) != 1)
                             | (lens[:-1] != ss)) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [n]))
        wrs = []
        base, lkey = self.local.addr, self.local.lkey
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            length = int((b - a - 1) * ss + lens[b - 1])
            wr = SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                        sg=[SGE(base + int(addr[a]), length, lkey)])
            wr.set_wr_rdma(rkey, p["slot_addr"] + int(pos[a]) * ss)
            wrs.append(wr)
        out = batch.copy()
        out["addr"] = np.uint64(p["slots_off"]) + pos * np.uint64(ss)
        raw = out.tobytes()
        self.staging.write(raw, len(raw))
        first = int(pos[0])
        spans = [(0, min(n, size - first))]
        if spans[0][1] < n:
            spans.append((spans[0][1], n))
        dsz = DESC_DTYPE.itemsize
        for i, (a, b) in enumerate(spans):
            last = i == len(spans) - 1
            wr = SendWR(wr_id=2 if last else 1,
                        opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM if last else e.IBV_WR_RDMA_WRITE,
                        num_sge=1, imm_data=n if last else 0,
                        sg=[SGE(self.staging.buf + a * dsz, (b - a) * dsz, self.staging.lkey)],
                        send_flags=e.IBV_SEND_SIGNALED if last else 0)
            wr.set_wr_rdma(rkey, p["desc_addr"] + int(pos[a]) * dsz)
            wrs.append(wr)
        for wr in wrs:
            self.link.qp.post_send(wr)
        end = time.monotonic() + self.cq_timeout
        while True:
            k, wcs = self.link.cq.poll(num_entries=4)
            for wc in wcs[:k]:
                if wc.status != e.IBV_WC_SUCCESS:
                    raise WCError(f"work completion error status {wc.status} "
                                    f"opcode {wc.opcode}")
                if wc.wr_id == 2:
                    return
            if time.monotonic() > end:
                raise RdmaError(f"no work completion within {self.cq_timeout} s")
            if k == 0:
                self._read_credits(0)       # a dead peer shows here first

    def stats(self) -> dict[str, Any]:
        return {**self.s, "credits": self.credits(), "connected": self.link is not None,
                "last_error": self.last_error, "pid": os.getpid()}

    def close(self) -> None:
        self._teardown()
        self.staging.close()
        self.cache.close()
