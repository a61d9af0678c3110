"""The sending end of the RDMA transport: the protocol, credits and error semantics are in
dataplane/transport/rdma/receiver.py; this is how the sender keeps the link busy from Python.

Pipelined: up to `window` batches are posted and not yet completed.  Each batch is ONE
ibv_post_send of a chain of work requests (frames, then descriptors, the last WR signaled);
its local ring positions are released strictly in ring order, each only after its own signaled
completion (RC completes in order, so completions are matched to the oldest batch in flight).
Completions are reaped without blocking at each poll.  The send queue holds window *
(max_batch + 2) WRs, the most `window` batches can take, so the window bounds it too.

What Python does per batch is bounded, not per frame: the frame runs and the remote addresses
come from numpy on the batch's descriptor view; the work requests and their SGEs are built once
and rewritten in place (a pyverbs SendWR costs a constructor, a logger lookup and a malloc; the
verbs copy a WR into the send queue at post time, so one set serves every batch).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from typing import Any, NamedTuple

import numpy as np

from dataplane._native import lib
from dataplane.shm.arena import DESC_DTYPE, Arena
from dataplane.transport.rdma.link import (
    CREDIT,
    END,
    END_ACK,
    MAX_BATCH,
    MSG,
    Link,
    RdmaError,
    WCError,
    recv_json,
    send_json,
    split_msgs,
    verbs,
)
from dataplane.transport.rdma.mr_cache import MRCache

WINDOW = 8      # batches in flight: enough that the HCA (rxe: the kernel) never waits for us
# a run of frames is split into WRs of at most this: rxe (measured in the guest, 64 KB frames)
# moved 4 MB WRs at about half the rate of 256 KB ones, and 64 KB WRs cost more posts
MAX_WR_BYTES = 256 << 10


class _Batch(NamedTuple):
    seq: int        # the signaled WR's wr_id
    n: int          # descriptors (local ring positions released on completion)
    nbytes: int
    end: int        # remote ring position after it


class _WRs:
    """The send WRs, built once: `frames[i]` writes frame run i, `desc` the descriptors before a
    remote wrap, `imm` the (rest of the) descriptors with the immediate, signaled."""

    def __init__(self, n_frames: int, lkey: int, desc_lkey: int) -> None:
        from pyverbs.wr import SGE, SendWR
        e = verbs()

        def make(opcode: int, lk: int, flags: int = 0) -> tuple[Any, Any]:
            sge = SGE(0, 0, lk)
            return SendWR(wr_id=0, opcode=opcode, num_sge=1, sg=[sge], send_flags=flags), sge

        self.frames = [make(e.IBV_WR_RDMA_WRITE, lkey) for _ in range(n_frames)]
        self.desc = make(e.IBV_WR_RDMA_WRITE, desc_lkey)
        self.imm = make(e.IBV_WR_RDMA_WRITE_WITH_IMM, desc_lkey, e.IBV_SEND_SIGNALED)

    @staticmethod
    def fill(pair: tuple[Any, Any], addr: int, length: int, rkey: int, raddr: int) -> Any:
        wr, sge = pair
        sge.addr, sge.length = addr, length
        wr.sg_list = sge            # the WR's own copy of the SGE: set again after each change
        wr.set_wr_rdma(rkey, raddr)
        return wr


class RdmaSender:
    """Consumes batches of one ring of a local arena and writes them into a receiver's ring."""

    def __init__(self, arena: Arena, ring: int = 0, host: str = "10.9.9.1", port: int = 18515,
                 device: str = "rxe0", max_batch: int = MAX_BATCH, cq_timeout: float = 10.0,
                 cache: MRCache | None = None, window: int = WINDOW) -> None:
        from pyverbs.device import Context
        from pyverbs.pd import PD
        self.arena = arena
        self.reader = arena.rings[ring]
        self._ring = self.reader._ring
        self.host, self.port, self.device = host, port, device
        self.max_batch = max(1, min(max_batch, MAX_BATCH))
        self.window = max(1, window)
        self.cq_timeout = cq_timeout
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        self.cache = cache or MRCache(self.ctx, self.pd)
        self.local = self.cache.get(arena._mm)          # frames are sent from where they are
        # per batch in flight (row seq % window), its descriptors as the receiver must see them
        self._staging = np.zeros((self.window, self.max_batch), DESC_DTYPE)
        self._sreg = self.cache.get(self._staging)
        self._wrs = _WRs(self.max_batch, self.local.lkey, self._sreg.lkey)
        self.slot_size = arena.header.slot_size
        self.sock: socket.socket | None = None
        self.link: Link | None = None
        self.peer: dict[str, Any] = {}
        self.tail = 0               # remote ring position of the next descriptor posted
        self.remote_cons = 0
        self.sent = self.reader.cons    # local ring position of the next descriptor posted
        self._prod = self.sent
        self.inflight: deque[_Batch] = deque()
        self._seq = 0
        self._progress = 0.0        # when the oldest batch in flight last had a chance to move
        self._raddr = np.zeros(0, np.uint64)
        self._rxbuf = b""
        self._end_ack: int | None = None
        self._waiting = False
        self.last_error = ""
        # remote ring end of each batch seen completed, for the loss count after a reconnect
        self._ring_id = ""
        self._completed: deque[tuple[int, int]] = deque()
        self.s = {"batches": 0, "packets": 0, "bytes": 0, "credits_wait": 0, "wc_errors": 0,
                  "peer_errors": 0, "reconnects": 0, "connects": 0, "lost_batches": 0,
                  "lost_packets": 0, "ends": 0}

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
        peer = recv_json(sock, 10.0)
        if peer["slot_size"] < self.slot_size:
            raise RdmaError(f"receiver slots of {peer['slot_size']} B are smaller than the "
                            f"sender's {self.slot_size} B")
        self.link = Link(self.ctx, self.pd, self.device,
                         sq_depth=self.window * (self.max_batch + 2), rq_depth=1)
        self.link.connect(peer)
        send_json(sock, self.link.info())
        if not recv_json(sock, 10.0).get("ready"):
            raise RdmaError("the receiver did not confirm the connection")
        sock.setblocking(False)
        self.peer = peer
        self._settle(peer)
        self.tail, self.remote_cons = peer["prod"], peer["cons"]
        # the receiver's ring continues from its own prod; ours from the oldest unreleased
        # position: what was in flight on the old QP and not published is sent again
        self.sent = self._prod = self.reader.cons
        self.inflight.clear()
        self._raddr = (np.uint64(peer["slots_off"])
                       + np.arange(peer["ring_size"], dtype=np.uint64) * np.uint64(
                           peer["slot_size"]))
        self._rxbuf, self._end_ack = b"", None

    def _settle(self, peer: dict[str, Any]) -> None:
        """Back on the same ring (a receiver process restarted on its arena, or the same one
        after a link failure), its prod says exactly what it published: batches in flight that
        it published are released now, not sent twice; batches seen completed that it did not
        publish (it died between the write and its poll) are counted lost.  On another ring
        nothing is known: everything in flight is sent again."""
        prod = peer["prod"]
        if peer.get("ring_id") == self._ring_id:
            lost = [(end, n) for end, n in self._completed if end > prod]
            self.s["lost_batches"] += len(lost)
            self.s["lost_packets"] += sum(min(n, end - prod) for end, n in lost)
            while self.inflight and self.inflight[0].end <= prod:
                b = self.inflight.popleft()
                self.reader.release(b.n)
                self.s["batches"] += 1
                self.s["packets"] += b.n
                self.s["bytes"] += b.nbytes
        self._ring_id = peer.get("ring_id", "")
        # unpublished positions are fewer than a ring: so many batches are enough to remember
        self._completed = deque(maxlen=peer["ring_size"])

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

    def _read_msgs(self, wait: float) -> None:
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
        msgs, self._rxbuf = split_msgs(self._rxbuf + data)
        for kind, value in msgs:
            if kind == CREDIT:
                self.remote_cons = value
            elif kind == END_ACK and self._end_ack is None:
                self._end_ack = value
            else:
                raise RdmaError(f"unexpected message {kind} from the receiver")

    def credits(self) -> int:
        return self.peer["ring_size"] - (self.tail - self.remote_cons) if self.peer else 0

    # ---- data ----

    def poll(self, wait: float = 0.05, post: bool = True) -> int:
        """Reap completions (releasing what they acknowledge) and post as many batches as the
        window and the credits allow, reconnecting first when needed.  Returns descriptors
        moved (posted + acknowledged): 0 means there was nothing to do right now.  `wait`: how
        long to wait for a credit when out of credits with nothing in flight; `post`: False
        only reaps and reads (finish, once what it must send is posted)."""
        if self.link is None:
            self.connect()
        try:
            moved = self._reap()
            self._read_msgs(0)
            if post:
                moved += self._post(wait)
        except WCError as err:
            self._fail(str(err), "wc_errors")
            return 0
        except RdmaError as err:
            self._fail(str(err), "peer_errors")
            return 0
        except Exception as err:   # noqa: BLE001 - pyverbs raises its own errors on a dead QP
            self._fail(f"post failed: {err}", "peer_errors")
            return 0
        return moved

    def _reap(self) -> int:
        if not self.inflight:
            return 0
        k, wcs = self.link.cq.poll(num_entries=self.window)
        if k == 0:
            if time.monotonic() - self._progress > self.cq_timeout:
                raise RdmaError(f"no work completion within {self.cq_timeout} s")
            return 0
        ok = self.link.e.IBV_WC_SUCCESS
        done = 0
        for wc in wcs[:k]:
            if wc.status != ok:
                raise WCError(f"work completion error status {wc.status} opcode {wc.opcode}")
            b = self.inflight.popleft() if self.inflight else None
            if b is None or b.seq != wc.wr_id:
                raise RdmaError(f"completion of batch {wc.wr_id} out of order (expected "
                                f"{b.seq if b else 'none'})")
            self.reader.release(b.n)
            self._completed.append((b.end, b.n))
            done += b.n
            self.s["batches"] += 1
            self.s["packets"] += b.n
            self.s["bytes"] += b.nbytes
        self._progress = time.monotonic()
        return done

    def _next_batch(self) -> np.ndarray:
        """The contiguous descriptors from `sent` on, up to max_batch and the credits."""
        avail = self._prod - self.sent
        if avail == 0:
            self._prod = lib.dp_ring_load_prod(self._ring)
            avail = self._prod - self.sent
        start = self.sent & self.reader.mask
        n = min(avail, self.reader.size - start, self.max_batch, max(self.credits(), 0))
        return self.reader.desc[start:start + n]

    def _post(self, wait: float) -> int:
        posted = 0
        while len(self.inflight) < self.window:
            if self.credits() <= 0:
                if self._prod - self.sent or lib.dp_ring_load_prod(self._ring) - self.sent:
                    if not self._waiting:
                        self.s["credits_wait"] += 1
                        self._waiting = True
                    if self.inflight:
                        break           # reaping comes first; credits arrive meanwhile
                    self._read_msgs(wait)
                    if self.credits() <= 0:
                        break
                else:
                    break
            batch = self._next_batch()
            if len(batch) == 0:
                break
            self._waiting = False
            self._write(batch)
            posted += len(batch)
        return posted

    def _write(self, batch: np.ndarray) -> None:
        """Post one batch as one chain of WRs: frame runs, descriptors, the immediate."""
        p, w = self.peer, self._wrs
        n, size, ss, rkey = len(batch), p["ring_size"], p["slot_size"], p["rkey"]
        first = self.tail & (size - 1)
        cut = min(n, size - first)      # descriptors before the remote ring wraps
        addr, lens = batch["addr"], batch["len"]
        # a run: frames slot_size apart locally, consecutive remote slots, each but the last
        # filling its slot to within 1/8 (the run writes whole slots: the padding goes too)
        brk = np.flatnonzero((np.diff(addr) != ss) | (lens[:-1] < ss - ss // 8)) + 1
        starts = brk.tolist()
        if cut < n and cut not in starts:
            starts = sorted([*starts, cut])
        per_wr = max(1, MAX_WR_BYTES // ss)
        ends = []
        a = 0
        for b in [*starts, n]:
            ends.extend(range(a + per_wr, b, per_wr))
            ends.append(b)
            a = b
        chain = []
        base, slot_addr = self.local.addr, p["slot_addr"]
        a = 0
        for i, b in enumerate(ends):
            length = (b - a - 1) * ss + int(lens[b - 1])
            rpos = (first + a) & (size - 1)
            chain.append(w.fill(w.frames[i], base + int(addr[a]), length, rkey,
                                slot_addr + rpos * ss))
            a = b
        seq = self._seq
        self._seq += 1
        row = self._staging[seq % self.window]
        row[:n] = batch
        row["addr"][:cut] = self._raddr[first:first + cut]
        row["addr"][cut:n] = self._raddr[:n - cut]
        dsz = DESC_DTYPE.itemsize
        sbase = self._sreg.addr + (seq % self.window) * self.max_batch * dsz
        if cut < n:
            chain.append(w.fill(w.desc, sbase, cut * dsz, rkey, p["desc_addr"] + first * dsz))
        imm_from = 0 if cut == n else cut
        imm_pos = (first + imm_from) & (size - 1)
        last = w.fill(w.imm, sbase + imm_from * dsz, (n - imm_from) * dsz, rkey,
                      p["desc_addr"] + imm_pos * dsz)
        last.wr_id, last.imm_data = seq, n
        chain.append(last)
        for x, y in zip(chain, chain[1:], strict=False):
            x.next_wr = y
        if not self.inflight:
            self._progress = time.monotonic()
        self.link.qp.post_send(chain[0])
        self.sent += n
        self.tail += n
        self.inflight.append(_Batch(seq, n, int(lens.sum()), self.tail))

    def finish(self, timeout: float = 10.0) -> bool:
        """End the stream on the current connection, explicitly: send what the ring holds now, wait
        until every batch completed, send END with the remote position after the last one, and
        wait for the receiver's END_ACK saying it published up to there; then close.  True when
        the receiver confirmed everything; False, with last_error set and counted, when it did
        not within `timeout` or the connection failed meanwhile (it is not reconnected: what
        the ring still holds is the caller's to count)."""
        deadline = time.monotonic() + timeout
        target = lib.dp_ring_load_prod(self._ring)     # what a producer adds meanwhile stays
        while self.link is not None and (self.inflight or self.sent < target):
            self.poll(wait=0.01, post=self.sent < target)
            if time.monotonic() > deadline:
                self._fail(f"end of stream: not everything completed within {timeout:g} s",
                           "peer_errors")
                return False
        if self.link is None:
            return False
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(max(deadline - time.monotonic(), 0.1))
            self.sock.sendall(MSG.pack(END, self.tail))
            self.sock.setblocking(False)
            while self._end_ack is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RdmaError(f"end of stream: no acknowledgement within {timeout:g} s")
                self._read_msgs(min(left, 0.1))
        except OSError as err:
            self._fail(f"end of stream: {err}", "peer_errors")
            return False
        except RdmaError as err:
            self._fail(str(err), "peer_errors")
            return False
        if self._end_ack != self.tail:
            self._fail(f"end of stream: the receiver published up to {self._end_ack}, the "
                       f"sender wrote up to {self.tail}", "peer_errors")
            return False
        self.s["ends"] += 1
        self._teardown()
        return True

    def stats(self) -> dict[str, Any]:
        return {**self.s, "credits": self.credits(), "connected": self.link is not None,
                "inflight_batches": len(self.inflight), "last_error": self.last_error,
                "pid": os.getpid()}

    def close(self) -> None:
        self._teardown()
        self.cache.close()
