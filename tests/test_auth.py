"""The transports' handshake (dataplane/transport/auth.py) over real sockets: both ends prove the
key, a wrong key, a recorded handshake replayed, a trickling or silent peer, garbage and a
mode mismatch all fail with their reason and nothing revealed; key files are checked; the
parser is fuzzed."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from dataplane._native import lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.transport import auth
from dataplane.transport.auth import (
    AuthError,
    KeyFileError,
    authenticate_client,
    authenticate_server,
    generate_key,
    load_key,
    write_key,
)


def handshake(client_key, server_key, timeout: float = 5.0):
    """Both ends over a real TCP connection on loopback: (client's result, server's result),
    each the peer's name or the AuthError raised."""
    ls = socket.create_server(("127.0.0.1", 0))
    out: dict[str, object] = {}

    def serve() -> None:
        conn, _ = ls.accept()
        with conn:
            try:
                out["server"] = authenticate_server(conn, server_key, "collector", timeout)
            except AuthError as e:
                out["server"] = e

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(ls.getsockname()) as c:
        try:
            out["client"] = authenticate_client(c, client_key, "to-collector", timeout)
        except AuthError as e:
            out["client"] = e
    t.join()
    ls.close()
    return out["client"], out["server"]


class Recorder:
    """A man in the middle that records what each side sent (to replay it later)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent, self.got = sock, b"", b""

    def sendall(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.got += data
        return data

    def settimeout(self, t) -> None:
        self.sock.settimeout(t)


def test_both_ends_prove_the_key():
    key = generate_key()
    assert handshake(key, key) == ("collector", "to-collector")


def test_wrong_key_fails_on_both_ends():
    client, server = handshake(generate_key(), generate_key())
    assert isinstance(client, AuthError) and client.reason == "bad_proof"
    # the client saw the receiver's proof fail first and never sent its own
    assert isinstance(server, AuthError) and server.reason in ("closed", "bad_proof")


def test_a_client_without_the_key_learns_nothing_past_the_challenge():
    """A peer that does not hold the key gets the challenge (a nonce and a MAC it cannot use)
    and then nothing: the server closes without an OK."""
    key = generate_key()
    ls = socket.create_server(("127.0.0.1", 0))
    result: list[object] = []

    def serve() -> None:
        conn, _ = ls.accept()
        with conn:
            try:
                authenticate_server(conn, key, "collector")
            except AuthError as e:
                result.append(e)

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(ls.getsockname()) as c:
        c.sendall(auth._hello(0, os.urandom(auth.NONCE), "rogue"))
        challenge = auth.recv_exact(c, auth.CHALLENGE_SIZE, time.monotonic() + 5)
        assert challenge.startswith(auth.MAGIC)
        c.sendall(bytes(auth.MAC))                       # a guessed proof
        c.settimeout(5)
        assert c.recv(4096) == b""                       # closed: no OK, no session, nothing
    t.join()
    ls.close()
    assert [getattr(e, "reason", e) for e in result] == ["bad_proof"]


def test_a_recorded_handshake_replays_to_nothing():
    key = generate_key()
    ls = socket.create_server(("127.0.0.1", 0))
    results: list[object] = []

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = ls.accept()
            with conn:
                try:
                    results.append(authenticate_server(conn, key, "collector"))
                except AuthError as e:
                    results.append(e)

    t = threading.Thread(target=serve, args=(2,))
    t.start()
    with socket.create_connection(ls.getsockname()) as c:
        rec = Recorder(c)
        authenticate_client(rec, key, "to-collector")   # type: ignore[arg-type]
    # the attacker has every byte the real client sent: HELLO then PROOF
    with socket.create_connection(ls.getsockname()) as c:
        c.sendall(rec.sent[:auth.HELLO_SIZE])
        auth.recv_exact(c, auth.CHALLENGE_SIZE, time.monotonic() + 5)   # a fresh nonce
        c.sendall(rec.sent[auth.HELLO_SIZE:])
        c.settimeout(5)
        assert c.recv(4096) == b""
    t.join()
    ls.close()
    assert results[0] == "to-collector"
    assert isinstance(results[1], AuthError) and results[1].reason == "bad_proof"


def test_a_trickling_peer_is_cut_off_at_the_deadline():
    key = generate_key()
    a, b = socket.socketpair()
    hello = auth._hello(0, os.urandom(auth.NONCE), "slow")
    stop = threading.Event()

    def trickle() -> None:          # one byte every 50 ms: each recv succeeds, the whole is late
        for byte in hello:
            if stop.wait(0.05):
                return
            try:
                b.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(AuthError) as e:
        authenticate_server(a, key, "collector", timeout=0.5)
    stop.set()
    t.join()
    assert e.value.reason == "timeout"
    assert time.monotonic() - t0 < 5     # bounded by the deadline, not by the peer
    a.close()
    b.close()


def test_insecure_and_keyed_ends_refuse_each_other():
    client, server = handshake(None, generate_key())
    assert isinstance(server, AuthError) and server.reason == "mode_mismatch"
    assert isinstance(client, AuthError)
    assert handshake(None, None) == ("collector", "to-collector")


def test_garbage_is_not_a_peer():
    a, b = socket.socketpair()
    b.sendall(b"GET / HTTP/1.1\r\n" + bytes(auth.HELLO_SIZE))
    with pytest.raises(AuthError) as e:
        authenticate_server(a, generate_key(), "collector")
    assert e.value.reason == "bad_magic"
    a.close()
    b.close()


def test_reasons_fit_the_control_file():
    assert len(auth.REASONS) <= lib.DP_AUTH_REASONS


def test_key_files(tmp_path: Path):
    k = tmp_path / "link.key"
    key = generate_key()
    write_key(k, key)
    assert (k.stat().st_mode & 0o777) == 0o600 and load_key(k) == key
    with pytest.raises(FileExistsError):
        write_key(k, key)
    os.chmod(k, 0o640)
    with pytest.raises(KeyFileError, match="mode 0640"):
        load_key(k)
    os.chmod(k, 0o600)
    link = tmp_path / "via-link.key"
    link.symlink_to(k)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_key(link)
    short = tmp_path / "short.key"
    write_key(short, b"x" * 8)
    with pytest.raises(KeyFileError, match="at least 32"):
        load_key(short)
    if os.geteuid() == 0:
        os.chown(k, 65534, 65534)
        with pytest.raises(KeyFileError, match="owned by uid 65534"):
            load_key(k)


@settings(max_examples=10000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=auth.CHALLENGE_SIZE + 8), st.sampled_from([0, auth.INSECURE]))
def test_fuzz_hello_parser(msg: bytes, flags: int):
    """Any bytes: a (nonce, name) or an AuthError with a known reason, never another error."""
    try:
        nonce, name = auth.parse_hello(msg, flags)
    except AuthError as e:
        assert e.reason in auth.REASONS
    else:
        assert len(nonce) == auth.NONCE and name.isprintable()


@settings(max_examples=10000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, auth.HELLO_SIZE - 1), st.integers(0, 255))
def test_fuzz_hello_mutations(pos: int, value: int):
    """A valid HELLO with one byte changed: parsed as it is, or refused with a reason."""
    msg = bytearray(auth._hello(0, os.urandom(auth.NONCE), "to-collector"))
    msg[pos] = value
    try:
        auth.parse_hello(bytes(msg), 0)
    except AuthError as e:
        assert e.reason in auth.REASONS


def test_acceptor_serves_an_authenticated_peer_while_others_stall():
    """Silent peers fill the pending handshakes (the next is refused as busy), yet a peer with
    the key that comes once one expired is handed over; nothing reaches the transport unproven."""
    from dataplane._native import ffi

    key = generate_key()
    counts = ffi.new("struct dp_auth_counters *")
    lines: list[str] = []
    ls = socket.create_server(("127.0.0.1", 0))
    acc = auth.Acceptor(ls, key, "collector", auth.AuthBook(counts, "collector", lines.append),
                        max_pending=2, timeout=1.0).start()
    silent = [socket.create_connection(ls.getsockname()) for _ in range(3)]
    try:
        with pytest.raises(Exception):          # noqa: B017 - nothing comes out unproven
            acc.ready.get(timeout=0.3)
        deadline = time.monotonic() + 10
        while counts.failures[auth.REASONS.index("busy")] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counts.failures[auth.REASONS.index("busy")] == 1
        while counts.failures[auth.REASONS.index("timeout")] < 2 and \
                time.monotonic() < deadline:   # the two silent ones time out, freeing slots
            time.sleep(0.01)
        with socket.create_connection(ls.getsockname()) as c:
            assert authenticate_client(c, key, "to-collector") == "collector"
            sock, peer, _ = acc.ready.get(timeout=10)
            assert peer == "to-collector"
            sock.close()
        assert counts.ok == 1
        assert counts.failures[auth.REASONS.index("timeout")] == 2   # the two that held a slot
    finally:
        for s in silent:
            s.close()
        acc.close()
        ls.close()
    assert any("busy" in ln for ln in lines)
