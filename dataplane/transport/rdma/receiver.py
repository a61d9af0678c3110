"""RDMA RC transport between two arenas through pyverbs: a ring of one arena (the sender's) is
carried into a ring of another (the receiver's), frames and descriptors written by the NIC.

    rx = RdmaReceiver(arena, ring=0, port=18515)       # registers slots + staging, listens
    while ...: rx.poll()                                # accept, publish, return credits
    tx = RdmaSender(local_arena, ring=0, host="10.9.9.1", port=18515)
    while ...: tx.poll()                                # reap, post batches, release in order
    tx.stats()   # batches, packets, bytes, credits_wait, wc_errors, peer_errors, reconnects

The receiver is here; the sender is in dataplane/transport/rdma/sender.py (how it pipelines), what
both
share (QP, errors, the QP budget) in dataplane/transport/rdma/link.py; all are importable from here.

Connection set-up: a small TCP exchange, not rdma_cm.  The receiver listens; per connection it
makes a new RC QP and sends one JSON line (QPN, GID, the rkey and address of its ring's slots
and of its descriptor staging area, ring size, slot size, its prod and cons, ring id);
the sender answers with its QPN and GID, both move their QP to RTS, the receiver says "ready".
Why TCP: rdma_cm does not work on lo (and needs an IP route to an RDMA device even when both
ends are in one host); a TCP socket works everywhere the control plane already does, it is ~40
lines, and the same socket then carries the credits and tells each side when the other is gone
(EOF/RST arrives at once, a dead QP only after the retry timeout).  Each end refuses to create
a QP past its device's max_qp (RdmaError naming the device, the limit and the count).

Data path, per batch of n descriptors (contiguous in the sender's ring), ONE ibv_post_send of a
chain of work requests:
  - frames: RDMA WRITE into the receiver's slots of ring positions tail..tail+n-1 (slot i <->
    ring position i, as in copy mode).  A run of frames that sit slot_size apart locally and land
    in consecutive remote slots, each but the last filling its slot to within 1/8, is ONE WR with
    one SGE (whole slots: the padding is written too) up to 256 KB, the next WR after that;
    otherwise one WR per frame (an SGE list would pack the frames back to back remotely, not
    slot-aligned).  Unsignaled.
  - descriptors: RDMA WRITE straight from the sender's ring into the receiver's staging area at
    the same positions as the frames' slots (two WRs when the batch wraps the remote ring); the
    last one is WRITE_WITH_IMM, imm = n, signaled.  RC delivers in order, so when the receiver
    sees the immediate the frames and descriptors are in place: it copies the descriptors into
    its ring, checks them there (len <= slot_size, flags; dataplane/transport/rdma/staging.py),
    writes addr, port, queue and rx_ns itself, and publishes them (prod += n).
Least privilege: the peer's rkeys cover the ring's slots and the staging area, each registered
to the byte with remote write only (no remote read); the arena header, the ring's indexes and
counters and its published descriptors are in no MR a peer has a key to.  rxe does not enforce
memory windows (a remote write outside a bound window but inside its MR lands), so the
isolation comes from what is registered.  The sender registers what it sends with local access
only.
  - the sender keeps up to `window` batches in flight and releases each batch's local ring
    positions, strictly in order, only after that batch's signaled completion.  Batches that
    did not complete are not released: after a reconnect they are sent again (at least once;
    the new receiver's ring continues from its own prod).  A completion means the bytes are in
    the receiver's memory, not that it published them: a receiver that dies just after loses
    those batches (up to `window` of them), as with any RDMA WRITE.  They are counted: the
    receiver names its ring (`ring_id`: the arena file's device and inode, the ring), and a
    sender reconnecting to the same ring (a restarted receiver process on the same arena)
    counts the positions it saw completed past the receiver's prod in lost_batches and
    lost_packets, so the books stay exact: published + lost = completed.
Publishing prod is a release store (dp_ring_store_prod), as the C producers do.

Credits: the sender may write positions [tail, cons + ring_size) only, where cons is the
receiver's consumer index: it never overwrites a slot the receiver's consumer has not given
back.  Posting a batch spends its credits at once (tail moves at post time).  The receiver
sends its cons (8 bytes, '<Q') on the TCP socket whenever it moved; at zero credits the sender
reaps what is in flight, or with nothing in flight waits for such a message (counted once per
stall in credits_wait).

End of stream: an explicit, acknowledged step.  The sender's finish() posts what its ring holds,
waits for every batch's completion, then sends END with the remote ring position after its last
batch; the receiver, once it has published up to there (the last completions may still be on
their way into its CQ), answers END_ACK with its prod and both close the connection.  Neither
counts it as an error (`ends` in both stats); a receiver that stops on its own, or a sender that
closes without END, is a peer error on the other side, as before.

Errors: a work completion with an error status (wc_errors), a post that fails, the TCP peer
gone or no completion within cq_timeout while batches are in flight (peer_errors): the error is
kept in `last_error`, the QP and CQ are destroyed and the sender reconnects (new QPs through a
new TCP exchange; `reconnects`), retrying until the peer is back.  The receiver drops a broken
connection and accepts the next one; a new connection while one is up replaces it (the sender
reconnected after a failure this side has not seen).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any

import numpy as np

from dataplane._native import lib
from dataplane.shm.arena import Arena
from dataplane.shm.layout import DESC_DTYPE
from dataplane.shm.ring import RingCorrupted, slot_address
from dataplane.transport.auth import Acceptor, AuthBook
from dataplane.transport.rdma.link import (
    CREDIT,
    END,
    END_ACK,
    MAX_BATCH,
    MSG,
    QP_INFO,
    Link,
    RdmaError,
    recv_json,
    send_json,
    split_msgs,
    verbs,
)
from dataplane.transport.rdma.mr_cache import MRCache
from dataplane.transport.rdma.staging import accept

END_WAIT_S = 5.0    # after END, how long the receiver waits for the batches END says are there


def _ring_id(arena: Arena, ring: int) -> str:
    """Names the ring across receiver processes: a new arena file is another ring.  An unlinked
    arena cannot be opened by another process: a name of this process's own will do."""
    try:
        st = os.stat(arena.path)
    except OSError:
        return f"{os.getpid()}:{uuid.uuid4()}:{ring}"
    return f"{st.st_dev}:{st.st_ino}:{ring}"


class RdmaReceiver:
    """Registers one ring's slots of `arena` and a staging area for its descriptors once; accepts
    senders one at a time, checks and publishes what they write and returns credits as the
    ring's consumer releases."""

    def __init__(self, arena: Arena, ring: int = 0, port: int = 18515, host: str = "0.0.0.0",
                 device: str = "rxe0", *, key: bytes | None, name: str = "rdma-recv",
                 book: AuthBook | None = None) -> None:
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.wr import SGE, RecvWR
        self.arena = arena
        self.ring_index = ring
        self.device = device
        reader = arena.rings[ring]
        self.size, self.slot_size = reader.size, reader.slot_size
        self.mask = reader.mask
        self._ring = reader.shared        # this end is the ring's producer
        self.slots_off, self.desc = reader.slots_off, reader.desc
        self.port_index, self.queue = int(self._ring.port), int(self._ring.queue)
        self.ring_id = _ring_id(arena, ring)
        # this end is the ring's only producer: its own prod, checked once against cons here
        self._prod, self._cons_seen = int(self._ring.prod), int(self._ring.cons)
        if not 0 <= self._prod - self._cons_seen <= self.size:
            raise RingCorrupted(f"{arena.path} ring {ring}: producer index {self._prod} and "
                                f"consumer index {self._cons_seen} are impossible for a ring "
                                f"of {self.size} (corrupted or foreign writer)")
        # what a valid descriptor's addr is at each position: compared by slices, per batch
        self._want = slot_address(self.slots_off, self.slot_size, np.arange(self.size))
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        # What a peer may write, registered once for every connection, each region to the
        # byte and nothing else (rxe checks an rkey against its MR's range, and does not enforce
        # memory windows): the ring's slots, and a staging area the sender writes descriptors
        # into (checked and copied into the ring by _publish).  Never the arena header, the
        # ring's indexes and counters or its published descriptors; no remote read.
        e = verbs()
        self.cache = MRCache(self.ctx, self.pd, exact=True,
                             access=e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
        self.slots_reg = self.cache.get(arena.mapping, self.slots_off, self.size * self.slot_size)
        self.staging = np.zeros(self.size, DESC_DTYPE)    # position i <-> ring position i
        self.stage_reg = self.cache.get(self.staging)
        self.sink = MR(self.pd, 64, verbs().IBV_ACCESS_LOCAL_WRITE)   # RecvWRs need an SGE
        # built once: verbs copy a receive WR into the queue, so each can be posted again
        self._rwrs = [RecvWR(wr_id=i, num_sge=1, sg=[SGE(self.sink.buf, 8, self.sink.lkey)])
                      for i in range(MAX_BATCH)]
        self.lsock = socket.create_server((host, port), reuse_port=False)
        self.lsock.setblocking(False)
        # a sender proves the key before it learns anything (the greeting's rkeys) or displaces
        # the current one: the handshake runs off this loop, which sees proven peers only
        self.acceptor = Acceptor(self.lsock, key, name, book or AuthBook(name=name)).start()
        self.conn: socket.socket | None = None
        self.link: Link | None = None
        self.last_credit = -1
        self.last_error = ""
        self._rxbuf = b""
        self._end_at: int | None = None     # END's ring position, until it is acknowledged
        self._end_by = 0.0
        self.s = {"batches": 0, "packets": 0, "bytes": 0, "bad_batches": 0,
                  "bad_descriptors": 0, "wc_errors": 0, "peer_errors": 0, "connects": 0,
                  "credits_sent": 0, "ends": 0}

    def _cons(self) -> int:
        """The consumer's index, checked: it never goes back and never passes what this end
        published (its own copy of prod: the shared one is only written, never trusted).  A
        credit from an impossible index would let the sender overwrite unread slots."""
        cons = int(self._ring.cons)
        if not self._cons_seen <= cons <= self._prod:
            raise RingCorrupted(f"{self.arena.path} ring {self.ring_index}: consumer index "
                                f"{cons} outside [{self._cons_seen}, {self._prod}] (corrupted "
                                "or foreign writer)")
        self._cons_seen = cons
        return cons

    def _accept(self) -> None:
        """Set up the QP with the next authenticated sender, if one is waiting."""
        if self.acceptor.ready.empty():
            return
        conn, _, _ = self.acceptor.ready.get_nowait()
        conn.setblocking(True)
        try:
            link = Link(self.ctx, self.pd, self.device, sq_depth=1, rq_depth=MAX_BATCH,
                        remote_write=True)
        except RdmaError as err:        # no QP left on the device: say so to this sender
            conn.close()
            self.last_error = str(err)
            return
        try:
            for wr in self._rwrs:
                link.qp.post_recv(wr)
            cons = self._cons()
            send_json(conn, {**link.info(), "slot_rkey": self.slots_reg.rkey,
                             "slot_addr": self.slots_reg.addr,
                             "stage_rkey": self.stage_reg.rkey,
                             "stage_addr": self.stage_reg.addr, "ring_size": self.size,
                             "slot_size": self.slot_size, "prod": self._prod,
                             "cons": cons, "ring_id": self.ring_id})
            link.connect(recv_json(conn, 10.0, QP_INFO))
            send_json(conn, {"ready": True})
        except Exception as err:   # noqa: BLE001 - OSError, RdmaError, pyverbs errors
            link.close()
            conn.close()
            self.last_error = f"exchange failed: {err}"
            return
        conn.setblocking(False)
        self.conn, self.link = conn, link
        self.last_credit = cons
        self._rxbuf, self._end_at = b"", None
        self.s["connects"] += 1

    def _drop(self, why: str, counter: str | None) -> None:
        """Close the connection: an error (`counter` counts it) or, with None, a clean end."""
        if counter:
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
                if self.link is None:
                    return published
                self.link.qp.post_recv(self._rwrs[wc.wr_id])
        if n == 0:
            # a sender that is gone shows as EOF here; looked at only when nothing completed,
            # since a syscall per pass is most of an idle pass's cost.  A sender whose link
            # failed reconnects before this side's TCP notices anything (after a link outage
            # the old connection's FIN may come seconds later, or never): one sender per ring,
            # so a new connection replaces the old one
            if not self.acceptor.ready.empty():
                self._drop("a sender authenticated again: the old connection is dropped",
                           "peer_errors")
                self._accept()
                return published
            if not self._read_msgs() or (self._end_at is not None and self._end()):
                return published
        cons = self._cons()
        if cons != self.last_credit:
            try:
                self.conn.send(MSG.pack(CREDIT, cons))
                self.last_credit = cons
                self.s["credits_sent"] += 1
            except BlockingIOError:
                pass
            except OSError as err:
                self._drop(f"sender connection: {err}", "peer_errors")
        return published

    def _read_msgs(self) -> bool:
        """What the sender said (END only); False when the connection was dropped."""
        try:
            data = self.conn.recv(4096)
        except BlockingIOError:
            return True
        except OSError as err:
            self._drop(f"sender connection: {err}", "peer_errors")
            return False
        if data == b"":
            self._drop("sender closed the connection", "peer_errors")
            return False
        msgs, self._rxbuf = split_msgs(self._rxbuf + data)
        for kind, value in msgs:
            if kind != END or self._end_at is not None:
                self._drop(f"unexpected message {kind} from the sender", "peer_errors")
                return False
            self._end_at, self._end_by = value, time.monotonic() + END_WAIT_S
        return True

    def _end(self) -> bool:
        """The sender ended its stream: once everything up to END's position is published (its
        completions may still be on their way into this CQ), acknowledge and close.  True when
        the connection is gone."""
        prod = self._prod
        if prod < self._end_at:
            if time.monotonic() < self._end_by:
                return False
            self._drop(f"the sender ended its stream at {self._end_at} but only {prod} "
                       f"arrived within {END_WAIT_S:g} s", "peer_errors")
            return True
        try:
            self.conn.setblocking(True)
            self.conn.settimeout(1.0)
            self.conn.sendall(MSG.pack(END_ACK, prod))
        except OSError as err:
            self._drop(f"acknowledging the end of stream: {err}", "peer_errors")
            return True
        self.s["ends"] += 1
        self._drop("", None)
        return True

    def _publish(self, n: int) -> int:
        prod = self._prod
        cons = self._cons()
        if n <= 0 or prod + n - cons > self.size:
            self.s["bad_batches"] += 1
            self._drop(f"batch of {n} past the credits (prod {prod}, cons {cons})", "peer_errors")
            return 0
        first = prod & self.mask
        cut = min(n, self.size - first)     # positions before the ring wraps
        nbytes, bad, rx_ns = 0, 0, time.time_ns()    # one receive time per batch, as TCP's
        for lo, hi in ((first, first + cut), (0, n - cut)):
            if hi > lo:     # staged -> ring, checked in the ring (dataplane/.../staging.py)
                bad += accept(self.staging[lo:hi], self.desc[lo:hi], self._want[lo:hi],
                              self.slot_size, self.port_index, self.queue, rx_ns)
                nbytes += int(self.desc[lo:hi]["len"].sum())
        if bad:
            # nothing of the batch is published: a sender that lies about one descriptor is
            # not trusted with the others (the TCP receiver drops a bad frame whole too)
            self.s["bad_batches"] += 1
            self.s["bad_descriptors"] += bad
            self._drop(f"batch of {n} at {prod}: {bad} bad descriptors (len over the slot "
                       f"size {self.slot_size} or flags a sender may not set)", "peer_errors")
            return 0
        c = self._ring.c            # the ring's own counters, as a worker keeps them: the
        c.rx_packets += n           # scrape shows these packets like local ones
        c.rx_bytes += nbytes
        c.copied += n               # the frames sit in slots (the TCP receiver counts so too)
        c.bursts += 1
        self._prod = prod + n
        lib.dp_ring_store_prod(self._ring, self._prod)
        self.s["batches"] += 1
        self.s["packets"] += n
        self.s["bytes"] += nbytes
        return n

    def stats(self) -> dict[str, Any]:
        return {**self.s, "connected": self.conn is not None, "last_error": self.last_error}

    def close(self) -> None:
        if self.link:
            self.link.close()
        if self.conn:
            self.conn.close()
        self.conn = self.link = None
        self.acceptor.close()
        self.lsock.close()
        self.sink.close()
        self.cache.close()
