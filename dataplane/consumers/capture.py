"""Live capture: the consumer every run has, serving `dataplane capture` (dataplane.run.capture)
on a unix socket of the run.

While nobody captures, a batch costs one attribute check.  A client connects to SOCKET (0600 in
the run directory, root's 0700), is checked with SO_PEERCRED (root or the run's own uid) before
anything is read, sends one bounded JSON request (worker, port, filter, snaplen, count,
duration) and gets OKAY (the interfaces: one per worker:port) or FAIL (why).  From then on
on_batch runs the compiled BPF filter over each batch in C (dataplane.consumers.bpf), copies
what matched out of the arena and queues it for the client's sender thread; a full queue drops
the batch's matches and counts them: the consumer thread never waits for a client
(docs/design.md, invariant 2).  The capture ends at its count, its duration, when the client
half-closes (Ctrl-C) or goes away, or when the run stops; the sender then flushes the queue and
ends with DONE (the counts, per interface).  The wire format is capture_wire's.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dataplane.config.workers import RUN_DIR
from dataplane.consumers.api import Batch, ConsumerBase, RingSource
from dataplane.consumers.bpf import MAX_SNAPLEN, BpfFilter, FilterError
from dataplane.consumers.capture_wire import (
    HEAD,
    MAX_REQUEST,
    PKTS_HEAD,
    QUEUE_BYTES,
    SOCKET,
    message,
    recv_message,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

MAX_CAPTURES = 4              # at once: each runs its filter over every batch it reads
HANDSHAKE_TIMEOUT = 5.0       # for the request to arrive
SEND_TIMEOUT = 30.0           # a client that takes nothing for this long is given up


class Request:
    """A client's request, checked: any problem is a ValueError naming the field."""

    def __init__(self, doc: Any):
        if not isinstance(doc, dict):
            raise ValueError("the request is not a JSON object")
        self.worker = self._get(doc, "worker", str, "")
        self.port = self._get(doc, "port", str, "")
        self.filter = self._get(doc, "filter", str, "")
        self.snaplen = self._get(doc, "snaplen", int, 0)
        self.count = self._get(doc, "count", int, 0)
        self.duration = float(self._get(doc, "duration", (int, float), 0))
        if not 0 <= self.snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snaplen {self.snaplen}: expected 0 (whole frames) to "
                             f"{MAX_SNAPLEN}")
        if self.count < 0 or self.duration < 0:
            raise ValueError("count and duration: expected 0 (no limit) or more")

    @staticmethod
    def _get(doc: dict, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        v = doc.get(key, default)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError(f"{key} = {v!r}: wrong type")
        return v


def interfaces(sources: Sequence[RingSource], worker: str, port: str) -> list[tuple[str, str]]:
    """The (worker, port label) pairs a capture of worker/port ("" for all) reads, in ring order;
    a ValueError naming what there is when none matches."""
    have = list(dict.fromkeys((s.name, s.port_label) for s in sources))
    want = [h for h in have if worker in ("", h[0]) and port in ("", h[1])]
    if not want:
        names = ", ".join(f"{w}:{p}" for w, p in have) or "none yet"
        raise ValueError(f"no ring of worker {worker or '*'} port {port or '*'} in this run "
                         f"(its rings: {names})")
    return want


class Capture:
    """One client's capture: what it reads, its filter, its queue and its books.  offer() runs
    in the consumer thread, the sender in the capture's own thread; the queue and the books
    are shared under `cond`, held only to append or pop."""

    def __init__(self, owner: CaptureConsumer, req: Request, flt: BpfFilter,
                 ifaces: list[tuple[str, str]], sources: Sequence[RingSource]):
        self.owner, self.req, self.filter = owner, req, flt
        self.ifaces = {key: i for i, key in enumerate(ifaces)}
        self.cond = threading.Condition()
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.ended = ""                           # why it takes no more packets
        self.captured = self.dropped = self.not_matching = self.bad = 0
        k = len(ifaces)
        self.seen, self.iface_dropped = [0] * k, [0] * k
        self._rings = [[s for s in sources if (s.name, s.port_label) == key] for key in ifaces]
        self._ring_drops0 = self._ring_drops()
        self.deadline = time.monotonic() + req.duration if req.duration else None

    def _ring_drops(self) -> list[int]:
        return [sum(s.ring.counter("ring_full_drops") for s in rings) for rings in self._rings]

    def offer(self, batch: Batch) -> None:
        """The consumer thread: filter the batch, copy the matches out, queue them or count
        them dropped.  Never waits for the client."""
        i = self.ifaces.get((batch.source.name, batch.source.port_label))
        if i is None or self.ended:
            return
        m = self.filter.match(batch.desc, batch.source.arena.buf)
        n, k = len(batch), len(m)
        if self.req.count:                        # never more than asked for
            k = min(k, self.req.count - self.captured)
        msg = b""
        if k:
            idx, caplen = m.idx[:k], m.caplen[:k]
            d = batch.desc[idx]
            orig = np.maximum(d["len"].astype(np.uint32), caplen)
            parts = [PKTS_HEAD.pack(i, k), d["rx_ns"].astype("<u8"), caplen.astype("<u4"),
                     orig.astype("<u4"), memoryview(m.data)[:int(caplen.sum(dtype=np.uint64))]]
            msg = b"".join([HEAD.pack(b"PKTS", sum(memoryview(x).nbytes for x in parts)),
                            *parts])              # the frames copied once more, not per part
        with self.cond:
            if self.ended:
                return
            self.seen[i] += n
            self.not_matching += n - len(m) - m.bad
            self.bad += m.bad
            if not k:
                return
            # full; an empty queue takes one batch of any size, so a big one is not lost
            if self.queued and self.queued + len(msg) > self.owner.queue_bytes:
                self.dropped += k
                self.iface_dropped[i] += k
                self.owner.dropped += k
                return
            self.queue.append(msg)
            self.queued += len(msg)
            self.captured += k
            self.owner.captured += k
            if self.req.count and self.captured >= self.req.count:
                self.ended = f"count {self.req.count} reached"
            self.cond.notify()

    def end(self, why: str) -> None:
        with self.cond:
            self.ended = self.ended or why
            self.cond.notify()

    def done(self) -> bytes:
        """The DONE message: the books, once nothing more is taken."""
        drops = [max(0, b - a) for a, b in zip(self._ring_drops0, self._ring_drops(),
                                               strict=True)]
        doc = {"ended": self.ended, "captured": self.captured, "dropped": self.dropped,
               "not_matching": self.not_matching, "bad": self.bad,
               "interfaces": [{"seen": s, "dropped": d, "ring_full_drops": r}
                              for s, d, r in zip(self.seen, self.iface_dropped, drops,
                                                 strict=True)]}
        return message(b"DONE", json.dumps(doc).encode())

    def serve(self, sock: socket.socket) -> None:
        """The sender thread: the queue to the client until the capture ends, then DONE."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        sock.settimeout(SEND_TIMEOUT)
        try:
            while True:
                if poller.poll(0):                # the client half-closed or went away
                    self.end("stopped by the client")
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.end(f"{self.req.duration:g} s elapsed")
                with self.cond:
                    if not self.queue and not self.ended:
                        self.cond.wait(0.1)
                    items = list(self.queue)
                    self.queue.clear()
                    self.queued = 0
                    ended = self.ended
                for item in items:
                    sock.sendall(item)
                if ended and not items:
                    sock.sendall(self.done())
                    return
        except OSError as e:                      # gone: its capture ends with it
            self.end(f"client gone ({e.strerror or e})")


class CaptureConsumer(ConsumerBase):
    """The run's capture service (see the module docstring).  `sources` tells it, at each
    request, the rings the run drains; the socket is made at the first tick."""

    def __init__(self, sources: Callable[[], Sequence[RingSource]], path: Path = SOCKET,
                 name: str = "capture", queue_bytes: int = QUEUE_BYTES):
        super().__init__(name)
        self.sources = sources
        self.path = Path(path)
        self.queue_bytes = queue_bytes            # per capture
        self.captures: tuple[Capture, ...] = ()   # replaced, never mutated: read without a lock
        self.captured = self.dropped = 0          # written by the consumer thread only
        self._lock = threading.Lock()             # the server threads' changes to captures
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._failed = False

    # -- the consumer thread --
    def on_batch(self, batch: Batch) -> None:
        for c in self.captures:                   # () while nobody captures: nothing to do
            try:
                c.offer(batch)
            except Exception as e:   # noqa: BLE001 - one capture's fault ends that capture only
                log.error("capture %r failed: %s: %s", c.req.filter, type(e).__name__, e,
                          exc_info=(type(e), e, e.__traceback__))
                c.end(f"failed in the run: {type(e).__name__}: {e}")

    def tick(self, now: float) -> None:
        if self._listener is None and not self._failed:
            self._listen()

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("dataplane_capture_active", "Live captures attached now.",
                                value=len(self.captures))
        yield CounterMetricFamily("dataplane_capture_packets", "Packets copied to captures.",
                                  value=self.captured)
        yield CounterMetricFamily("dataplane_capture_dropped_packets",
                                  "Packets a capture matched but dropped: its client did not "
                                  "keep up.", value=self.dropped)

    def close(self) -> None:
        """Every capture ended (its books sent), the socket removed.  Not final: when the loop
        makes this consumer again after an error (Running), the next tick serves anew."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        for c in self.captures:
            c.end("the capture service closed (the run is stopping)")
        deadline = time.monotonic() + 5.0        # for all: a stuck client is not waited for
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self.path.unlink(missing_ok=True)
            self._listener = None
        self._stopping.clear()

    # -- the server --
    def _listen(self) -> None:
        try:
            from dataplane.config import ensure_run_dir
            if self.path.parent == RUN_DIR:
                ensure_run_dir()
            self.path.unlink(missing_ok=True)     # a dead run's: the run lock says it is ours
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            # bound under a private name, made 0600, then renamed into place: bind() creates
            # the file with the umask's mode, and no one may see it before the chmod (a test
            # once stat'ed it at 0755 in that window); the umask is the whole process's, so
            # it is not changed from this thread
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            s.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.path)
            s.listen(8)
            s.settimeout(0.5)
        except OSError as e:
            self._failed = True                   # once: a run without capture still runs
            log.warning("capture: cannot serve %s: %s; `dataplane capture` will not work",
                        self.path, e)
            return
        self._listener = s
        self._spawn(self._accept, s)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name="dp-capture", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:                       # closed by close()
                return
            self._spawn(self._client, conn)

    def _client(self, conn: socket.socket) -> None:
        with conn:
            try:
                cap = self._handshake(conn)
            except (OSError, ValueError) as e:
                log.info("capture: a client refused: %s", e)
                try:
                    conn.sendall(message(b"FAIL", json.dumps({"error": str(e)}).encode()))
                except OSError:
                    pass
                return
            try:
                cap.serve(conn)
            finally:
                with self._lock:
                    self.captures = tuple(c for c in self.captures if c is not cap)
                log.info("capture %r ended: %s; %d captured, %d dropped", cap.req.filter,
                         cap.ended, cap.captured, cap.dropped)

    def _handshake(self, conn: socket.socket) -> Capture:
        """The peer checked, its request read and checked, its filter compiled, its capture
        added: a ValueError says why not (sent to it as FAIL)."""
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            raise ValueError(f"refused: uid {uid} (pid {pid}) is neither root nor the run's "
                             f"user; run as root")
        conn.settimeout(HANDSHAKE_TIMEOUT)
        got = recv_message(conn, MAX_REQUEST)
        if got is None or got[0] != b"CAPT":
            raise ValueError("expected a CAPT request")
        try:
            req = Request(json.loads(got[1]))
        except json.JSONDecodeError as e:
            raise ValueError(f"the request is not JSON: {e}") from None
        try:
            flt = BpfFilter(req.filter, req.snaplen)
        except FilterError as e:
            raise ValueError(str(e)) from None
        sources = list(self.sources())
        ifaces = interfaces(sources, req.worker, req.port)
        cap = Capture(self, req, flt, ifaces, sources)
        with self._lock:
            if self._stopping.is_set():
                raise ValueError("the run is stopping")
            if len(self.captures) >= MAX_CAPTURES:
                raise ValueError(f"{MAX_CAPTURES} captures are running already (at most "
                                 f"{MAX_CAPTURES} at once)")
            conn.sendall(message(b"OKAY", json.dumps(
                {"interfaces": [f"{w}:{p}" for w, p in ifaces]}).encode()))
            self.captures = (*self.captures, cap)
        return cap
