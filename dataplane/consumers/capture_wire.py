"""The capture socket's wire format, shared by the run's side (dataplane.consumers.capture) and
`dataplane capture` (dataplane.run.capture); light, so the CLI's parser can import it.

Both ways: a 4-byte kind and a u32 length, then that many bytes.  CAPT (client: the request,
JSON), OKAY (its interfaces, JSON) or FAIL (why, JSON), then PKTS (one batch's matches of one
interface: u32 interface, u32 n, then n u64 timestamps (rx_ns), n u32 captured lengths, n u32
original lengths, then the bytes) and at the end DONE (the books, JSON).
"""

from __future__ import annotations

import socket
import struct

from dataplane.config.workers import RUN_DIR

SOCKET = RUN_DIR / "capture.sock"
MAX_REQUEST = 4096            # bytes of a request's JSON
QUEUE_BYTES = 16 << 20        # per capture: matches waiting for a slow client beyond are dropped
MAX_MESSAGE = 1 << 30         # what a client takes: one batch of any slot size fits

HEAD = struct.Struct("<4sI")            # kind, body length
PKTS_HEAD = struct.Struct("<II")        # interface, n


def message(kind: bytes, body: bytes = b"") -> bytes:
    return HEAD.pack(kind, len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """n bytes, or fewer when the peer closed."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket, limit: int) -> tuple[bytes, bytes] | None:
    """The next (kind, body); None at the end of the stream.  A body over `limit` bytes is a
    protocol error (ValueError): a request is small, a batch is at most a queue's worth."""
    head = recv_exact(sock, HEAD.size)
    if len(head) < HEAD.size:
        return None
    kind, size = HEAD.unpack(head)
    if size > limit:
        raise ValueError(f"a {kind!r} message of {size} bytes (at most {limit})")
    body = recv_exact(sock, size)
    if len(body) < size:
        return None
    return kind, body
