"""A peer of the TCP transport under the test's control (tests/test_transport.py,
tests/test_transport_attacks.py): sockets connected from inside a network namespace (setns in
a thread of their own, so the test process stays where it is), frames of the wire format
(native/include/dp_transport.h) packed from the compiled structs, and a recorded handshake."""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import numpy as np
from dataplane._native import ffi, lib

from dataplane.shm.layout import DESC_DTYPE
from dataplane.transport import auth

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def connect_in(netns: str, host: str, port: int, rcvbuf: int = 0,
               timeout: float = 10.0) -> socket.socket:
    """A TCP connection to host:port made from inside netns (rcvbuf: a small receive buffer,
    set before the connect so the window stays small)."""
    out: list[socket.socket | BaseException] = []

    def inside() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(timeout)
            try:
                s.connect((host, port))
            except BaseException:
                s.close()
                raise
            out.append(s)
        except BaseException as e:       # noqa: BLE001 - handed to the caller's thread
            out.append(e)

    t = threading.Thread(target=inside)  # its netns dies with it; the socket stays where it is
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def header(count: int, payload_len: int, batch_seq: int, session: int, **fields: int) -> bytes:
    """A struct dp_tw_frame; fields override magic, version or header_len."""
    h = ffi.new("struct dp_tw_frame *")
    h.magic, h.version, h.header_len = lib.DP_TW_MAGIC, lib.DP_TW_VERSION, \
        ffi.sizeof("struct dp_tw_frame")
    h.count, h.payload_len, h.batch_seq, h.session = count, payload_len, batch_seq, session
    for k, v in fields.items():
        setattr(h, k, v)
    return bytes(ffi.buffer(h))


def frame(lens: list[int], batch_seq: int, session: int, fill: int = 0x5A) -> bytes:
    """A whole valid frame: header, descriptors (no flags), payloads of `fill` bytes."""
    d = np.zeros(len(lens), dtype=DESC_DTYPE)
    d["len"] = lens
    return header(len(lens), sum(lens), batch_seq, session) + d.tobytes() + \
        bytes([fill]) * sum(lens)


def acks_in(data: bytes) -> bool:
    """Whether data holds anything the receiver says after a handshake (HELLO, ACK)."""
    return int(lib.DP_TW_ACK_MAGIC).to_bytes(4, "little") in data


def record_handshake(key: bytes, client: str, server: str) -> tuple[bytes, bytes]:
    """What a client holding key sends in a whole, successful handshake (HELLO, PROOF)."""
    a, b = socket.socketpair()
    sent: list[bytes] = []

    class Recording:
        def __init__(self, sock: socket.socket):
            self.sock = sock

        def sendall(self, data: bytes) -> None:
            sent.append(bytes(data))
            self.sock.sendall(data)

        def __getattr__(self, name: str):
            return getattr(self.sock, name)

    t = threading.Thread(target=auth.authenticate_server, args=(b, key, server))
    t.start()
    try:
        assert auth.authenticate_client(Recording(a), key, client) == server  # type: ignore
    finally:
        t.join()
        a.close()
        b.close()
    assert len(sent) == 2
    return sent[0], sent[1]
