"""The TCP transport's process entry: `python -m dataplane.transport.tcp SPEC_JSON` runs one
end (send or recv, per the spec's role) on the files dataplane.transport.process made.

A sender consumes one ring of a local arena (some worker's) and ships its batches to a receiver
in another namespace or host; the receiver writes them into its own arena's ring 0, as packets
of port 0, whose label is the remote's name (so consumers and metrics see a named remote port).
The loops are C (native/transport/); the wire format and the ack/loss rules are in
native/include/dp_transport.h.

Authentication (dataplane/transport/auth.py) is Python, one implementation for both
transports, and comes before anything else on a connection:
- the receiver listens here, not in C: auth.Acceptor accepts and authenticates each connection
  in a thread of its own (a bounded number at once), and only an authenticated connection's fd
  is written into the pipe the C loop polls (cfg.handoff_fd);
- the sender's C loop connects and calls cfg.authenticate (a cffi callback into
  _client_auth) on the fresh socket before its first byte; a failure is retried after the
  backoff.
Both ends count handshakes in the control file (auth.AuthBook).  The key is loaded at start;
a key file that cannot be used is a set-up failure (EXIT_SETUP_FAILED, reason in the file).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from dataplane._native import ffi, lib
from dataplane.shm.claim import RingClaimed, claim
from dataplane.shm.control import Control
from dataplane.transport import auth
from dataplane.transport.process import TCP_MODULE
from dataplane.transport.spec import EXIT_SETUP_FAILED, MODES, TransportSpec, parse_spec

# An ack not taken, or a frame stalled mid-way, for this long drops the receiver's peer.
IO_TIMEOUT_MS = 3000
_FD = struct.Struct("i")     # an fd in the handoff pipe: what C reads as an int


def _config(spec: TransportSpec):
    cfg = ffi.new("struct dp_transport_config *")
    # char arrays: each runs up to the field after it (their length may be open in the cdef)
    for field, nxt, value in (("name", "host", spec.name), ("host", "tcp_port", spec.host)):
        room = ffi.offsetof("struct dp_transport_config", nxt) - \
            ffi.offsetof("struct dp_transport_config", field)
        b = value.encode()
        if len(b) >= room:
            raise ValueError(f"transport {field} {value!r} longer than {room - 1} bytes")
        setattr(cfg, field, b)
    if spec.mode not in MODES:
        raise ValueError(f"transport mode {spec.mode!r}: expected one of {', '.join(MODES)}")
    cfg.tcp_port, cfg.mode, cfg.port_index = spec.tcp_port, MODES[spec.mode], 0
    cfg.max_batch, cfg.max_bytes, cfg.max_inflight = spec.max_batch, spec.max_bytes, \
        spec.max_inflight
    cfg.backoff_min_ms, cfg.backoff_max_ms = spec.backoff_min_ms, spec.backoff_max_ms
    cfg.handoff_fd, cfg.io_timeout_ms = -1, IO_TIMEOUT_MS
    return cfg


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fail(ctl: Control, spec: TransportSpec, why: str) -> int:
    """A set-up failure before the C loop ran: in the control file, as C records its own."""
    ctl.hdr.error = why.encode()[:255]
    ctl.hdr.state = lib.DP_W_FAILED
    print(f"transport {spec.name}: set-up failed: {why}", file=sys.stderr)
    return EXIT_SETUP_FAILED


def _client_auth(spec: TransportSpec, key: bytes | None, book: auth.AuthBook):
    """cfg.authenticate: the sender's handshake on the C loop's freshly connected fd (a dup of
    it, closed here; the connection stays C's).  Kept alive by the caller while C runs."""
    where = f"{spec.host}:{spec.tcp_port}"

    def authenticate(fd: int) -> int:
        with socket.socket(fileno=os.dup(fd)) as s:
            try:
                peer = auth.authenticate_client(s, key, spec.name)
            except auth.AuthError as e:
                book.failed(e, where)
                return -1
        book.ok(peer, where)
        return 0

    # onerror: an unexpected exception is a failed handshake (closed, retried), not a crash
    return ffi.callback("int(int)", authenticate, onerror=lambda *exc: -1)


class _Front:
    """The receiver's front door: its listening socket, the auth.Acceptor on it and the pipe
    that hands authenticated fds to the C loop.  close() closes fds never taken."""

    def __init__(self, spec: TransportSpec, key: bytes | None, book: auth.AuthBook):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind((spec.host, spec.tcp_port))
            self.lsock.listen(16)
        except OSError:
            self.lsock.close()
            raise
        self.rfd, self.wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.acceptor = auth.Acceptor(self.lsock, key, spec.name, book, on_ready=self._hand)

    def _hand(self, sock: socket.socket, peer: str, addr: str) -> None:
        fd = sock.detach()
        try:
            os.write(self.wfd, _FD.pack(fd))
        except OSError:      # a full pipe: C is far behind; this peer may try again
            os.close(fd)

    def close(self) -> None:
        self.acceptor.close()
        self.lsock.close()
        while True:
            try:
                b = os.read(self.rfd, _FD.size)
            except BlockingIOError:
                break
            if len(b) < _FD.size:
                break
            os.close(_FD.unpack(b)[0])
        os.close(self.rfd)
        os.close(self.wfd)


def _claim(base, length: int, ring: int, path: str) -> str:
    """Claim the shipped ring for this process (dataplane.shm.claim); why not, or ''.  The
    header is checked first: the ring's address comes from it."""
    a = ffi.cast("struct dp_arena *", base)
    if length < ffi.sizeof("struct dp_arena") or a.magic != lib.DP_MAGIC or \
            a.version != lib.DP_LAYOUT_VERSION:
        return f"{path}: not an arena of layout {lib.DP_LAYOUT_VERSION}"
    if ring >= a.n_rings:
        return f"{path}: no ring {ring} (it has {a.n_rings})"
    if a.ring_stride < ffi.sizeof("struct dp_ring") or \
            a.rings_off + (ring + 1) * a.ring_stride > length:
        return f"{path}: ring {ring} lies outside the file (corrupted header)"
    try:
        claim(lib.dp_arena_ring(base, ring), f"{path} ring {ring}")
    except RingClaimed as e:
        return str(e)
    return ""


def run(spec: TransportSpec) -> int:
    """Map the arena and the control file, run the C loop until stopped: the exit code."""
    length = ffi.new("uint64_t *")
    base = lib.dp_arena_map(spec.arena_path.encode(), length)
    if base == ffi.NULL:
        print(f"transport {spec.name}: cannot map arena {spec.arena_path}: "
              f"{os.strerror(ffi.errno)}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    ctl = Control(Path(spec.control_path))
    cfg = _config(spec)
    cfg.arena_len = length[0]
    hdr = ctl.hdr
    if spec.role == "send":
        why = _claim(base, length[0], spec.ring, spec.arena_path)
        if why:
            return _fail(ctl, spec, why)
    try:
        key = spec.load_key()
    except auth.KeyFileError as e:
        return _fail(ctl, spec, str(e))
    hdr.auth.insecure = int(key is None)
    if key is None:
        _log(f"transport {spec.name}: INSECURE: no key, any peer that reaches "
             f"{spec.host}:{spec.tcp_port} is served")
    book = auth.AuthBook(hdr.auth, spec.name, _log)
    front: _Front | None = None
    if spec.role == "send":
        callback = _client_auth(spec, key, book)
        cfg.authenticate = callback
    else:
        try:
            front = _Front(spec, key, book)
        except OSError as e:
            return _fail(ctl, spec, f"listen on {spec.host}:{spec.tcp_port}: {e.strerror or e}")
        cfg.handoff_fd = front.rfd
        _log(f"transport {spec.name}: listening on {spec.host}:{spec.tcp_port}")
        front.acceptor.start()

    def on_signal(signum: int, frame: object) -> None:
        hdr.stop = 1

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fn: Callable = lib.dp_transport_send_run if spec.role == "send" \
        else lib.dp_transport_recv_run
    result: list[int] = []
    # the C loop in a thread (cffi drops the GIL), the main thread free for signal handlers
    t = threading.Thread(target=lambda: result.append(fn(base, spec.ring, hdr, cfg)))
    t.start()
    while t.is_alive():
        t.join(0.2)
    if front is not None:
        front.close()
    if not result or result[0] != 0:
        print(f"transport {spec.name}: set-up failed: {ctl.error()}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_spec(argv, f"python -m {TCP_MODULE}", rdma=False))


if __name__ == "__main__":
    sys.exit(main())
