"""Mutual authentication of a transport connection with a pre-shared key, before anything else
crosses it (the TCP transport's HELLO with its session and ring state; the RDMA greeting with
its rkeys).  Both transports run it on the connection's first bytes, the connecting end
(sender) as `authenticate_client`, the listening end (receiver) as `authenticate_server`.

    key = load_key(Path("/etc/dataplane/link.key"))      # 0600, owned by us: else KeyFileError
    authenticate_client(sock, key, "to-collector")       # raises AuthError(reason)

The exchange, three fixed-size messages (no length field to lie about, nothing to parse but
bytes at fixed offsets), HMAC-SHA256 over the whole transcript:

    client -> server  HELLO   magic, flags, name length, client nonce (32 random bytes), name
    server -> client  CHALLENGE  magic, flags, name length, server nonce, name,
                              mac_s = HMAC(key, "server" | HELLO | CHALLENGE without mac_s)
    client -> server  PROOF   mac_c = HMAC(key, "client" | HELLO | CHALLENGE)
    server -> client  OK

Each side proves it holds the key over a nonce the other just chose, so a recorded handshake
replays to nothing; the role label keeps the server's answer from serving as the client's
proof; the names of both ends are in the transcript, so the logs name an authenticated peer.
MACs are compared in constant time (hmac.compare_digest).  The whole exchange has one deadline
(a peer trickling bytes is cut off when it passes), and reads are exact sizes: nothing a peer
sends can make us buffer more than a message.

Without a key (the transport's config says `insecure = true`) the same messages carry flag
INSECURE and no MAC is checked; a secure end refuses an insecure peer and vice versa, so a
typo in one config cannot silently turn authentication off.

Why our own protocol: neither rdma_cm nor UCX nor libfabric authenticates its out-of-band
exchange, and kernel TLS refuses MSG_ZEROCOPY / io_uring SEND_ZC (so TLS would cost the zero
copy path).  Authentication of the set-up is what this gives; confidentiality and integrity of
the data stream are not (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import queue
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dataplane.host.files import UnsafePath, open_private

MAGIC = b"DPAUTH1\n"
INSECURE = 1
NONCE = 32
MAC = 32
NAME_MAX = 64
KEY_BYTES = 32
DEFAULT_TIMEOUT = 5.0
OK = b"DPAUTHOK"

_HEAD = struct.Struct("<8sBB6x")                 # magic, flags, name length
HELLO_SIZE = _HEAD.size + NONCE + NAME_MAX
CHALLENGE_SIZE = HELLO_SIZE + MAC

# the reasons a handshake fails, as counted (dataplane_transport_auth_failures_total{reason})
REASONS = ("timeout", "closed", "bad_magic", "mode_mismatch", "bad_name", "bad_proof", "busy")
# busy: refused unheard because too many handshakes were already pending


class AuthError(Exception):
    """The peer did not authenticate; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class KeyFileError(ValueError):
    """A key file that must not be used (missing, unsafe permissions, bad contents)."""


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode() + "\n"


def write_key(path: Path, key: bytes) -> None:
    """Create path (0600, never over an existing file or through a symlink) holding key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(key))


def load_key(path: Path) -> bytes:
    """The key in path; refused unless a regular file of ours (or root's) with no group/other
    access, like ssh's private keys: a key others can read authenticates them too."""
    try:
        fd = open_private(path, os.O_RDONLY, refused=0o077)
    except OSError as e:    # UnsafePath (a link, someone else's, readable by others) included
        raise KeyFileError(f"key file {e}" if isinstance(e, UnsafePath)
                           else f"key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        text = f.read(4096)
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise KeyFileError(f"key file {path}: not a base64 key "
                           "(make one with `dataplane transport keygen FILE`)") from None
    if len(key) < KEY_BYTES:
        raise KeyFileError(f"key file {path}: {len(key)} bytes of key, at least {KEY_BYTES} "
                           "needed (make one with `dataplane transport keygen FILE`)")
    return key


def _mac(key: bytes | None, label: bytes, *parts: bytes) -> bytes:
    if key is None:
        return bytes(MAC)
    return hmac.new(key, b"".join((label, *parts)), hashlib.sha256).digest()


def _hello(flags: int, nonce: bytes, name: str) -> bytes:
    raw = name.encode()
    if len(raw) > NAME_MAX:
        raise ValueError(f"transport name {name!r} longer than {NAME_MAX} bytes")
    return _HEAD.pack(MAGIC, flags, len(raw)) + nonce + raw.ljust(NAME_MAX, b"\0")


def parse_hello(msg: bytes, flags: int) -> tuple[bytes, str]:
    """(nonce, name) of a HELLO (or of the part of a CHALLENGE before its MAC), checked against
    our own flags; AuthError when it is not one."""
    if len(msg) < HELLO_SIZE:
        raise AuthError("closed", f"{len(msg)} bytes of a {HELLO_SIZE}-byte message")
    magic, peer_flags, n = _HEAD.unpack_from(msg)
    if magic != MAGIC:
        raise AuthError("bad_magic", "not a dataplane transport peer (or another version)")
    if peer_flags != flags:
        theirs = "insecure" if peer_flags & INSECURE else "keyed"
        raise AuthError("mode_mismatch", f"peer is {theirs}, we are "
                        + ("insecure" if flags & INSECURE else "keyed"))
    nonce = msg[_HEAD.size:_HEAD.size + NONCE]
    raw = msg[_HEAD.size + NONCE:HELLO_SIZE]
    if n > NAME_MAX or any(raw[n:]):
        raise AuthError("bad_name", "malformed peer name")
    try:
        name = raw[:n].decode()
    except UnicodeDecodeError:
        raise AuthError("bad_name", "peer name is not UTF-8") from None
    if not name.isprintable():
        raise AuthError("bad_name", "peer name has unprintable characters")
    return nonce, name


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AuthError("timeout", f"handshake not done in time ({len(buf)} of {n} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise AuthError("timeout", "handshake not done in time") from None
        except OSError as e:
            raise AuthError("closed", e.strerror or str(e)) from None
        if not chunk:
            raise AuthError("closed", f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise AuthError("timeout", "peer does not read") from None
    except OSError as e:
        raise AuthError("closed", e.strerror or str(e)) from None


def authenticate_client(sock: socket.socket, key: bytes | None, name: str,
                        timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run the connecting end's side; the server's name once both proved the key.  The socket's
    timeout is left at None (blocking) on success."""
    deadline = time.monotonic() + timeout
    flags = INSECURE if key is None else 0
    hello = _hello(flags, secrets.token_bytes(NONCE), name)
    send_all(sock, hello, deadline)
    challenge = recv_exact(sock, CHALLENGE_SIZE, deadline)
    _, peer = parse_hello(challenge, flags)
    body, mac_s = challenge[:HELLO_SIZE], challenge[HELLO_SIZE:]
    if key is not None and not hmac.compare_digest(mac_s, _mac(key, b"server", hello, body)):
        raise AuthError("bad_proof", f"receiver {peer!r} does not hold our key")
    send_all(sock, _mac(key, b"client", hello, challenge), deadline)
    if recv_exact(sock, len(OK), deadline) != OK:
        raise AuthError("bad_proof", f"receiver {peer!r} refused our proof")
    sock.settimeout(None)
    return peer


def authenticate_server(sock: socket.socket, key: bytes | None, name: str,
                        timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run the listening end's side; the client's name once it proved the key.  Nothing but
    the handshake's own messages is sent before that."""
    deadline = time.monotonic() + timeout
    flags = INSECURE if key is None else 0
    hello = recv_exact(sock, HELLO_SIZE, deadline)
    _, peer = parse_hello(hello, flags)
    body = _hello(flags, secrets.token_bytes(NONCE), name)
    challenge = body + _mac(key, b"server", hello, body)
    send_all(sock, challenge, deadline)
    proof = recv_exact(sock, MAC, deadline)
    if key is not None and not hmac.compare_digest(proof, _mac(key, b"client", hello, challenge)):
        raise AuthError("bad_proof", f"peer calling itself {peer!r} does not hold the key")
    send_all(sock, OK, deadline)
    sock.settimeout(None)
    return peer


class AuthBook:
    """Counts handshakes in a transport's control file (struct dp_auth_counters: a restarted
    process adds to the same counts) and logs failures rate-limited: a peer hammering the port
    costs one line per reason per `every` seconds, with the count of those not logged."""

    def __init__(self, auth=None, name: str = "", log=print, every: float = 10.0) -> None:
        if auth is None:            # counts of this process only (no control file)
            from dataplane._native import ffi
            auth = ffi.new("struct dp_auth_counters *")
        self.auth = auth            # the control file's struct dp_auth_counters (cffi)
        self.name = name
        self.log = log              # callable(str)
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def ok(self, peer: str, addr: str) -> None:
        self.auth.ok += 1
        self.log(f"transport {self.name}: {addr} authenticated as {peer!r}")

    def failed(self, err: AuthError, addr: str) -> None:
        self.auth.failures[REASONS.index(err.reason)] += 1
        now = time.monotonic()
        if now - self._last.get(err.reason, -self.every) < self.every:
            self._quiet[err.reason] = self._quiet.get(err.reason, 0) + 1
            return
        quiet = self._quiet.pop(err.reason, 0)
        self._last[err.reason] = now
        more = f" ({quiet} more like it not logged)" if quiet else ""
        self.log(f"transport {self.name}: {addr} failed authentication: {err}{more}")


Ready = Callable[[socket.socket, str, str], None]   # (authenticated socket, peer name, address)


class Acceptor:
    """The listening end's front door, shared by both transports: accepts on `lsock` in a
    thread of its own and authenticates each connection in a short-lived thread, at most
    `max_pending` at once (more are closed unheard and counted as "busy"), each within auth's
    deadline.  Only an authenticated connection reaches the transport: `on_ready(sock, peer,
    addr)` or, without one, the `ready` queue.  So a newcomer never displaces the current sender
    before it proved the key, and a peer that connects and says nothing holds one pending slot
    for `timeout` seconds, never the data path."""

    def __init__(self, lsock: socket.socket, key: bytes | None, name: str, book: AuthBook,
                 on_ready: Ready | None = None, max_pending: int = 8,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.lsock, self.key, self.name, self.book = lsock, key, name, book
        self.ready: queue.SimpleQueue[tuple[socket.socket, str, str]] = queue.SimpleQueue()
        self.on_ready = on_ready or (lambda sock, peer, addr: self.ready.put((sock, peer, addr)))
        self.max_pending, self.timeout = max_pending, timeout
        self._pending = threading.BoundedSemaphore(max_pending)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"auth-{name}", daemon=True)

    def start(self) -> Acceptor:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.lsock], [], [], 0.2)[0]:
                continue
            try:
                conn, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            where = f"{addr[0]}:{addr[1]}"
            if not self._pending.acquire(blocking=False):
                conn.close()
                self.book.failed(AuthError("busy", f"{self.max_pending} handshakes already "
                                           "pending"), where)
                continue
            threading.Thread(target=self._handshake, args=(conn, where), daemon=True).start()

    def _handshake(self, conn: socket.socket, where: str) -> None:
        try:
            conn.setblocking(True)
            peer = authenticate_server(conn, self.key, self.name, self.timeout)
        except AuthError as e:
            conn.close()
            self.book.failed(e, where)
            return
        finally:
            self._pending.release()
        if self._stop.is_set():
            conn.close()
            return
        self.book.ok(peer, where)
        self.on_ready(conn, peer, where)

    def close(self) -> None:
        """Stop accepting; connections authenticated but not taken are closed."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        while not self.ready.empty():
            self.ready.get_nowait()[0].close()
