"""The TCP transport attacked, on the real kernel with real transport processes: while the real
sender (holding the key) streams to the receiver, a rogue peer in the sender's namespace tries
without the key, with a wrong key, with a recorded handshake, by trickling bytes, by sending a
forged frame with batch_seq = 2^64-1 unauthenticated, by flooding the port with silent
connections; a peer WITH the key stalls mid-frame or never reads its acknowledgements.  In each
case the real sender keeps delivering (every sequence number once, in order), nothing forged is
published, the books are exact (sender's acks = receiver's batches, nothing lost) and the
failure is counted under its reason.  Then: a hung end is killed and restarted by the
watchdog until the restart limit, no key and not insecure refuses to start, insecure runs and
says so.  The receiver's frame check is fuzzed in tests/test_transport_fuzz.py."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dataplane._native import ffi, lib
from dataplane._testing import lib as testing

from dataplane.shm.arena import Arena
from dataplane.transport import auth
from dataplane.transport.process import TransportProcess
from dataplane.transport.spec import EXIT_SETUP_FAILED, TransportSpec
from tests.helpers import rogue
from tests.test_transport import (
    ROOT,
    TRAILER,
    Lab,
    _read_all,
    _scrape,
    _wait,
    receiver,
    sender,
    source_arena,
    two_namespaces,
)

PORT = 7100


@pytest.fixture
def lab():
    with two_namespaces() as lb:
        yield lb


class Stream:
    """The real sender's traffic while an attack runs: a producer thread putting chunks on the
    source ring until finish(), a consumer thread draining the receiver's ring, keeping the
    trailers' seqs of generated packets and counting any other packet (foreign)."""

    def __init__(self, src: Arena, rx: Arena):
        self.src, self.rx = src, rx
        self.produced = self.consumed = self.foreign = 0
        self.seqs: list[np.ndarray] = []
        self._stop_producing = threading.Event()
        self._stop_draining = threading.Event()
        self._threads = [threading.Thread(target=self._produce),
                         threading.Thread(target=self._drain)]
        for t in self._threads:
            t.start()

    def _produce(self) -> None:
        # A chunk only when the ring has room for it all: dp_transport_produce waits in C for
        # room, and a sender that never started (an attack that failed first) would leave it
        # waiting for ever, and finish() joining it.  This thread is the ring's only producer,
        # so the room seen can only grow.
        base = ffi.from_buffer(self.src.mapping)
        ring = self.src.rings[0].shared
        size = self.src.rings[0].size
        while not self._stop_producing.is_set():
            if size - (ring.prod - ring.cons) >= 200:
                self.produced += testing.dp_transport_produce(base, 0, 200, 300, 32, 7)
            time.sleep(0.01)

    def _drain(self) -> None:
        ring = self.rx.rings[0]
        while not self._stop_draining.is_set():
            b = ring.peek()
            if len(b) == 0:
                time.sleep(0.002)
                continue
            gen = (b["flags"] & lib.DP_F_GENERATED) != 0
            self.foreign += int((~gen).sum())
            g = b[gen]
            ends = g["addr"].astype(np.int64) + g["len"].astype(np.int64)
            idx = (ends - TRAILER)[:, None] + np.arange(8)[None, :]
            self.seqs.append(self.rx.buf[idx].copy().view("<u8").ravel())
            self.consumed += len(b)
            ring.release(len(b))

    def generated(self) -> np.ndarray:
        return np.concatenate(self.seqs) if self.seqs else np.zeros(0, "<u8")

    def finish(self, timeout: float = 60.0) -> np.ndarray:
        """Stop producing, wait until every produced packet arrived: their seqs."""
        self._stop_producing.set()
        self._threads[0].join()
        try:
            _wait(lambda: len(self.generated()) >= self.produced, "the stream arrived", timeout)
        finally:
            self._stop_draining.set()
            self._threads[1].join()
        return self.generated()


def reason(name: str) -> int:
    return auth.REASONS.index(name)


def failures(tp: TransportProcess) -> dict[str, int]:
    a = tp.control.hdr.auth
    return {r: int(a.failures[i]) for i, r in enumerate(auth.REASONS) if a.failures[i]}


def key_of(lab: Lab) -> bytes:
    return auth.load_key(Path(lab.key))


# -- the attacks by unauthenticated peers: each returns the failure reasons it must cause --

def attack_without_key(lab: Lab) -> dict[str, int]:
    """A peer with no key speaks the handshake as an insecure end: refused before any reply."""
    with rogue.connect_in(lab.a, lab.peer, PORT) as s:
        s.sendall(auth._hello(auth.INSECURE, os.urandom(auth.NONCE), "rogue"))
        assert _read_all(s) == b""
    return {"mode_mismatch": 1}


def attack_wrong_key(lab: Lab) -> dict[str, int]:
    """A peer with another key answers the challenge with its own MAC: refused, it saw only the
    challenge (the receiver's nonce and name), never the session or an ack."""
    other = auth.generate_key()
    with rogue.connect_in(lab.a, lab.peer, PORT) as s:
        hello = auth._hello(0, os.urandom(auth.NONCE), "rogue")
        s.sendall(hello)
        challenge = _recv(s, auth.CHALLENGE_SIZE)
        s.sendall(auth._mac(other, b"client", hello, challenge))
        rest = _read_all(s)
        assert rest == b"" and not rogue.acks_in(challenge)
    return {"bad_proof": 1}


def attack_replay(lab: Lab) -> dict[str, int]:
    """A handshake recorded between ends holding the right key, under the real ends' names,
    replayed: the receiver's fresh nonce makes the recorded proof worthless."""
    hello, proof = rogue.record_handshake(key_of(lab), client="tx", server="rx")
    with rogue.connect_in(lab.a, lab.peer, PORT) as s:
        s.sendall(hello)
        _recv(s, auth.CHALLENGE_SIZE)
        s.sendall(proof)
        assert _read_all(s) == b""
    with rogue.connect_in(lab.a, lab.peer, PORT) as s:   # all at once, without listening
        s.sendall(hello + proof)
        assert not rogue.acks_in(_read_all(s))
    return {"bad_proof": 2}


def attack_trickle(lab: Lab) -> dict[str, int]:
    """A peer sending its HELLO a byte every 100 ms is cut off at the handshake's deadline."""
    hello = auth._hello(0, os.urandom(auth.NONCE), "rogue")
    t0 = time.monotonic()
    with rogue.connect_in(lab.a, lab.peer, PORT) as s:
        try:
            for b in hello:
                s.sendall(bytes([b]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _read_all(s) == b""
    assert time.monotonic() - t0 < auth.DEFAULT_TIMEOUT + 5   # cut off, not waited out
    return {"timeout": 1}


def attack_forged_max_seq(lab: Lab) -> dict[str, int]:
    """The attack of the issue: a frame with batch_seq = 2^64-1 sent straight at the port (the
    session it would need is never revealed before the handshake; use anything)."""
    with rogue.connect_in(lab.a, lab.peer, PORT) as s:
        s.sendall(rogue.frame([100], 2**64 - 1, 0x1234) * 3)
        assert _read_all(s) == b""
    return {"bad_magic": 1}


def attack_silent_flood(lab: Lab) -> dict[str, int]:
    """20 connections that say nothing: 8 hold a pending handshake until its deadline, the rest
    are refused at once as busy; the connected sender is not disturbed."""
    socks = [rogue.connect_in(lab.a, lab.peer, PORT) for _ in range(20)]
    try:
        for s in socks:
            assert _read_all(s) == b""
    finally:
        for s in socks:
            s.close()
    return {"busy": 12, "timeout": 8}


@ROOT
@pytest.mark.parametrize("attack", [attack_without_key, attack_wrong_key, attack_replay,
                                    attack_trickle, attack_forged_max_seq, attack_silent_flood],
                         ids=lambda f: f.__name__.removeprefix("attack_"))
def test_unauthenticated_peer_changes_nothing(lab: Lab,
                                              attack: Callable[[Lab], dict[str, int]]) -> None:
    src = source_arena(lab)
    with receiver(lab) as rx, sender(lab, src, "copy", max_batch=32) as tx:
        rx.start()
        rx.wait_running()
        tx.start()
        tx.wait_running()
        _wait(lambda: rx.control.hdr.connected == 1, "the real sender connected")
        stream = Stream(src, rx.arena)
        try:
            expected = attack(lab)
            _wait(lambda: failures(rx) == expected, f"failures {expected}", 15)
        finally:
            seqs = stream.finish()
        _wait(lambda: tx.control.counter("acks") == tx.control.counter("batches"), "all acks")
        s, r = tx.control.snapshot(), rx.control.snapshot()
        assert failures(rx) == expected, failures(rx)
        assert failures(tx) == {}
        # only the real sender ever proved the key, once, to a receiver that proved it back
        assert rx.control.hdr.auth.ok == 1 and tx.control.hdr.auth.ok == 1
    src.close()
    assert (seqs == np.arange(stream.produced)).all(), "a seq missing, repeated or reordered"
    assert stream.foreign == 0 and stream.consumed == stream.produced, "something forged"
    # books exact: every batch taken from the ring acknowledged, the receiver published just
    # those, its last batch is the real sender's; the real sender was never displaced
    assert s["acks"] == s["batches"] == r["batches"] and s["lost_batches"] == 0, (s, r)
    assert r["packets"] == s["packets"] == stream.produced
    assert r["last_seq"] == s["batches"] and r["bad_frames"] == 0
    assert s["reconnects"] == 0 and r["reconnects"] == 0 and r["disconnects"] == 0, (s, r)


@ROOT
def test_authenticated_peer_that_stalls_or_does_not_read_is_dropped(lab: Lab) -> None:
    """Peers WITH the key: one stops half-way through a frame, one sends frames and never reads
    its acknowledgements.  Each is dropped and counted (short_reads, slow_peers) and the real
    sender is then served; what those peers sent whole was theirs to send (published, counted
    apart from the real stream), what they sent half was not published."""
    key = key_of(lab)
    src = source_arena(lab)
    with receiver(lab) as rx, sender(lab, src, "zerocopy", max_batch=32) as tx:
        rx.start()
        rx.wait_running()
        stream = Stream(src, rx.arena)
        try:
            with rogue.connect_in(lab.a, lab.peer, PORT) as s:
                auth.authenticate_client(s, key, "staller")
                whole = rogue.frame([100, 100], 1, 0xBAD)
                s.sendall(whole[:len(whole) - 50])
                t0 = time.monotonic()
                _wait(lambda: rx.control.counter("short_reads") == 1, "stall cut off", 15)
                assert time.monotonic() - t0 > 2      # not before the deadline (3 s)
            slow_frames = flood_without_reading(lab, key)
            assert rx.control.counter("slow_peers") == 1
            rogue_batches = rx.control.counter("batches")
            assert 0 < rogue_batches <= slow_frames
            tx.start()
            tx.wait_running()
            _wait(lambda: len(stream.generated()) >= 1000, "the real sender served", 30)
        finally:
            seqs = stream.finish()
        _wait(lambda: tx.control.counter("acks") == tx.control.counter("batches"), "all acks")
        s, r = tx.control.snapshot(), rx.control.snapshot()
        assert rx.control.hdr.auth.ok == 3 and failures(rx) == {}
    src.close()
    assert (seqs == np.arange(stream.produced)).all()
    assert stream.foreign == rogue_batches            # one 60-byte packet per rogue frame
    assert s["acks"] == s["batches"] == r["batches"] - rogue_batches and s["lost_batches"] == 0
    assert r["slow_peers"] == 1 and r["short_reads"] == 1 and r["bad_frames"] == 0


def flood_without_reading(lab: Lab, key: bytes) -> int:
    """Authenticate, then send one-packet frames and never read, until the receiver drops us:
    how many frames went out."""
    with rogue.connect_in(lab.a, lab.peer, PORT, rcvbuf=4096) as s:
        auth.authenticate_client(s, key, "deaf")
        s.settimeout(20)
        n = 0
        try:
            while n < 1_000_000:
                n += 1
                s.sendall(rogue.frame([60], n, 0xDEAF))
        except (BrokenPipeError, ConnectionResetError):
            return n - 1
    raise AssertionError("the receiver never dropped a peer that does not read")


def _recv(s: socket.socket, n: int) -> bytes:
    s.settimeout(10)
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


@ROOT
def test_a_hung_transport_is_killed_and_restarted_until_the_limit(lab: Lab) -> None:
    """The watchdog: a receiver frozen (SIGSTOP: alive, no heartbeat) is killed and restarted,
    and once it has started max_restarts times within the window the run gives up, saying
    why."""
    with receiver(lab) as rx:
        rx.heartbeat_timeout, rx.max_restarts = 1.0, 3
        rx.start()
        events: list[str] = []

        def watch(n: int) -> bool:
            if e := rx.check():
                events.append(e)
            return len(events) >= n

        for i in range(3):
            rx.wait_running()
            assert rx.check() is None             # running and beating: nothing to do
            os.kill(rx.proc.pid, signal.SIGSTOP)
            _wait(lambda n=i + 1: watch(n), "the watchdog", 15)
        assert all("heartbeat" in e and "s old: killed" in e for e in events), events
        assert "restarted (restart #1)" in events[0] and "restart #2" in events[1], events
        assert "gave up" in events[2] and "3 starts in 60 s" in events[2], events
        assert rx.gave_up and rx.proc.poll() is not None and rx.check() is None
        assert rx.control.hdr.restarts == 2


# -- without a key --

@ROOT
def test_without_key_or_with_an_unsafe_key_the_transport_does_not_start(lab: Lab) -> None:
    with receiver(lab, key_file="") as rx:
        rx.start()
        assert rx.proc.wait(20) == EXIT_SETUP_FAILED
        assert "no key_file and not insecure" in rx.control.error()
        assert rx.control.state() == "failed"
        event = rx.check()
        assert event and "set-up failed" in event and "not restarted" in event
        assert rx.check() is None and rx.proc.returncode == EXIT_SETUP_FAILED
    os.chmod(lab.key, 0o644)
    src = source_arena(lab)
    with sender(lab, src, "copy") as tx:
        tx.start()
        assert tx.proc.wait(20) == EXIT_SETUP_FAILED
        assert "mode 0644" in tx.control.error()
    src.close()


WORKER = '[[worker]]\nname = "w"\n[[worker.port]]\nname = "p"\ndriver = "udp"\nudp_port = 9000\n'


def recv_table(name: str, extra: str) -> str:
    return (f'[[transport]]\nname = "{name}"\nrole = "recv"\nlisten = "0.0.0.0:{PORT}"\n'
            f'label = "far"\n{extra}')


def test_config_without_key_is_refused_unless_insecure() -> None:
    from dataplane import config
    from dataplane.config.tables import ConfigError

    with pytest.raises(ConfigError, match="key_file: missing"):
        config.loads(WORKER + recv_table("col", ""))
    assert config.loads(WORKER + recv_table("col", "insecure = true\n")).transports[0].insecure
    keyed = config.loads(WORKER + recv_table("col", 'key_file = "/etc/dataplane/k.key"\n'))
    assert keyed.transports[0].key_file == "/etc/dataplane/k.key"


@ROOT
def test_insecure_runs_and_says_so(lab: Lab) -> None:
    from dataplane import config
    from dataplane.run.status import transport, transport_lines
    from dataplane.shm.control import control_path

    name = f"insec{os.getpid() % 100000}"
    # where `dataplane status` looks for a transport's control file: by its name
    spec = TransportSpec(name=name, role="recv", control_path=control_path(name),
                         arena_path=lab.path("rx"), host="0.0.0.0", tcp_port=PORT,
                         netns=lab.b, label="far", insecure=True)
    src = source_arena(lab)
    with TransportProcess(spec) as rx, \
            sender(lab, src, "copy", key_file="", insecure=True) as tx:
        rx.start()
        rx.wait_running()
        tx.start()
        tx.wait_running()
        stream = Stream(src, rx.arena)
        _wait(lambda: len(stream.generated()) >= 1000, "delivery without a key", 30)
        stream.finish()
        assert rx.control.hdr.auth.insecure == 1 and tx.control.hdr.auth.insecure == 1
        assert rx.control.hdr.auth.ok == 1 and failures(rx) == {}
        text = _scrape([(tx.spec, tx.control), (rx.spec, rx.control)])
        assert (f'dataplane_transport_insecure{{mode="",peer="0.0.0.0:{PORT}",role="recv",'
                f'transport="{name}"}} 1.0') in text, text
        cfg = config.loads(WORKER + recv_table(name, "insecure = true\n"))
        line = next(transport_lines(transport(cfg.transports[0])))
        assert "state=running" in line and "INSECURE (no key)" in line, line
    src.close()
