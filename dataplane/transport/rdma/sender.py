"""The sending end of the RDMA transport: the protocol, credits and error semantics are in
dataplane/transport/rdma/receiver.py; this is how the sender keeps the link busy from Python.

Pipelined: up to `window` batches are posted and not yet completed.  Each batch is ONE
ibv_post_send of a chain of work requests (frames, then descriptors, the last WR signaled);
its local ring positions are released strictly in ring order, each only after its own signaled
completion (RC completes in order, so completions are matched to the oldest batch in flight).
Completions are reaped without blocking at each poll.  The send queue holds window *
(max_batch + 2) WRs, the most `window` batches can take, so the window bounds it too.

The ring is consumed through its RingReader (dataplane/shm/ring.py): batches are peeked from
`sent`, the next position to post, ahead of the reader's `cons`, and released in order as they
complete.  What Python does per batch is bounded, not per frame: the frame runs and the remote
addresses come from numpy on the batch's descriptor view; the work requests
(dataplane/transport/rdma/wrs.py) are built once and rewritten in place.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from typing import Any, NamedTuple

import numpy as np

from dataplane.shm.arena import Arena
from dataplane.transport.auth import AuthBook, AuthError, authenticate_client
from dataplane.transport.rdma.link import (
    CREDIT,
    END,
    END_ACK,
    GREETING,
    MAX_BATCH,
    MAX_REMOTE_RING,
    MAX_REMOTE_SLOT,
    MSG,
    Link,
    RdmaError,
    WCError,
    recv_json,
    send_json,
    split_msgs,
)
from dataplane.transport.rdma.mr_cache import MRCache
from dataplane.transport.rdma.wrs import WorkRequests

WINDOW = 8      # batches in flight: enough that the HCA (rxe: the kernel) never waits for us


class _Batch(NamedTuple):
    seq: int        # the signaled WR's wr_id
    n: int          # descriptors (local ring positions released on completion)
    nbytes: int
    end: int        # remote ring position after it


class RdmaSender:
    """Consumes batches of one ring of a local arena and writes them into a receiver's ring."""

    def __init__(self, arena: Arena, ring: int = 0, host: str = "10.9.9.1", port: int = 18515,
                 device: str = "rxe0", max_batch: int = MAX_BATCH, cq_timeout: float = 10.0,
                 cache: MRCache | None = None, window: int = WINDOW, *, key: bytes | None,
                 name: str = "rdma-send", book: AuthBook | None = None) -> None:
        from pyverbs.device import Context
        from pyverbs.pd import PD
        self.arena = arena
        self.reader = arena.rings[ring]
        self.reader.claim()      # first: a ring has one consuming process (RingClaimed)
        self.host, self.port, self.device = host, port, device
        self.max_batch = max(1, min(max_batch, MAX_BATCH))
        self.window = max(1, window)
        self.cq_timeout = cq_timeout
        self.key, self.name, self.book = key, name, book or AuthBook(name=name)
        self.ctx = Context(name=device)
        self.pd = PD(self.ctx)
        # local access only (the cache's default): nothing of this end is remotely accessible
        self.cache = cache or MRCache(self.ctx, self.pd)
        # frames and descriptors are sent from where they are: the receiver writes each
        # descriptor's addr (and port, queue, rx_ns) itself, nothing needs rewriting here
        self.local = self.cache.get(arena.mapping)
        self._wrs = WorkRequests(self.max_batch, self.local.lkey, self.local.lkey)
        self.slot_size = arena.header.slot_size
        self.sock: socket.socket | None = None
        self.link: Link | None = None
        self.peer: dict[str, Any] = {}
        self.tail = 0               # remote ring position of the next descriptor posted
        self.remote_cons = 0
        self.sent = self.reader.cons    # local ring position of the next descriptor posted
        self.inflight: deque[_Batch] = deque()
        self._seq = 0
        self._progress = 0.0        # when the oldest batch in flight last had a chance to move
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
        where = f"{self.host}:{self.port}"
        try:    # both ends prove the key before the receiver says anything of its ring
            peer_name = authenticate_client(sock, self.key, self.name)
        except AuthError as e:
            self.book.failed(e, where)
            raise RdmaError(f"authentication with {where}: {e}") from None
        self.book.ok(peer_name, where)
        peer = recv_json(sock, 10.0, GREETING)
        size = peer["ring_size"]
        if size & (size - 1) or not 2 <= size <= MAX_REMOTE_RING or \
                not 0 < peer["slot_size"] <= MAX_REMOTE_SLOT:
            raise RdmaError(f"receiver's ring of {size} slots of {peer['slot_size']} B: "
                            f"expected a power of two <= {MAX_REMOTE_RING} slots of at most "
                            f"{MAX_REMOTE_SLOT} B")
        if peer["slot_size"] < self.slot_size:
            raise RdmaError(f"receiver slots of {peer['slot_size']} B are smaller than the "
                            f"sender's {self.slot_size} B")
        self.link = Link(self.ctx, self.pd, self.device,
                         sq_depth=self.window * (self.max_batch + 2), rq_depth=1,
                         remote_write=False)
        self.link.connect(peer)
        send_json(sock, self.link.info())
        if not recv_json(sock, 10.0, {"ready": bool}).get("ready"):
            raise RdmaError("the receiver did not confirm the connection")
        sock.setblocking(False)
        self.peer = peer
        self._settle(peer)
        self.tail, self.remote_cons = peer["prod"], peer["cons"]
        # the receiver's ring continues from its own prod; ours from the oldest unreleased
        # position: what was in flight on the old QP and not published is sent again
        self.sent = self.reader.cons
        self.inflight.clear()
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
        return self.reader.peek(min(self.max_batch, max(self.credits(), 0)), start=self.sent)

    def _post(self, wait: float) -> int:
        posted = 0
        while len(self.inflight) < self.window:
            if self.credits() <= 0:
                if self.reader.ready(self.sent):
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
        p = self.peer
        n, size = len(batch), p["ring_size"]
        first = self.tail & (size - 1)
        seq = self._seq
        self._seq += 1
        # the batch is a view of this ring's descriptors (contiguous: peek never wraps)
        chain = self._wrs.chain(batch, self.local.addr, batch.ctypes.data, first, seq, p)
        if not self.inflight:
            self._progress = time.monotonic()
        self.link.qp.post_send(chain)
        self.sent += n
        self.tail += n
        self.inflight.append(_Batch(seq, n, int(batch["len"].sum()), self.tail))

    def finish(self, timeout: float = 10.0) -> bool:
        """End the stream on the current connection, explicitly: send what the ring holds now, wait
        until every batch completed, send END with the remote position after the last one, and
        wait for the receiver's END_ACK saying it published up to there; then close.  True when
        the receiver confirmed everything; False, with last_error set and counted, when it did
        not within `timeout` or the connection failed meanwhile (it is not reconnected: what
        the ring still holds is the caller's to count)."""
        deadline = time.monotonic() + timeout
        target = self.reader.refresh()     # what a producer adds meanwhile stays
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
        self.reader.unclaim()
