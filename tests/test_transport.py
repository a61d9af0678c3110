"""The TCP transport on the real kernel: a sender in one namespace ships a ring to a receiver in
another over a veth; every sequence number arrives once and in order, in each send mode; the
kernel's "copied" flag is counted and exported; a receiver killed mid-stream leaves the books
exact (taken from the ring = acknowledged + lost); garbage on the port fails the handshake,
counted, and the receiver carries on; a frame that fails validation after the handshake is a
counted bad frame.  Both ends share a key (dataplane/transport/auth.py); the attacks on it are
in tests/test_transport_attacks.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from dataplane._native import ffi, lib
from dataplane._testing import lib as testing
from prometheus_client.registry import CollectorRegistry

from dataplane.metrics.transports import TransportCollector
from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.control import Control
from dataplane.shm.layout import TRAILER_DTYPE
from dataplane.transport import auth
from dataplane.transport.process import TransportProcess
from dataplane.transport.spec import TransportSpec
from tests.helpers import rogue

ROOT = pytest.mark.root("netns, veth")     # the transport tests; the layout check runs as anyone

TRAILER = TRAILER_DTYPE.itemsize


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Lab:
    """Two namespaces joined by a veth pair: sender side .1, receiver side .2."""

    def __init__(self, tag: str):
        self.a, self.b = f"dpt-{tag}-s", f"dpt-{tag}-r"
        self.tag = tag
        self.peer = "10.79.0.2"
        self.shm = Path("/dev/shm")
        self.key = self.path("key")

    def make_key(self) -> None:
        auth.write_key(Path(self.key), auth.generate_key())

    def up(self) -> None:
        ip("netns", "add", self.a)
        ip("netns", "add", self.b)
        ip("link", "add", f"dpts{self.tag}", "netns", self.a, "type", "veth", "peer", "name",
           f"dptr{self.tag}", "netns", self.b)
        for ns, dev, addr in ((self.a, f"dpts{self.tag}", "10.79.0.1/24"),
                              (self.b, f"dptr{self.tag}", "10.79.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def path(self, what: str) -> str:
        return str(self.shm / f"dataplane-test-{self.tag}-{what}")


@contextmanager
def two_namespaces() -> Iterator[Lab]:
    """A Lab up, with a key for both ends; torn down with its files."""
    lb = Lab(f"{os.getpid() % 100000}")
    lb.down()
    lb.up()
    lb.make_key()
    try:
        yield lb
    finally:
        lb.down()
        for p in lb.shm.glob(f"dataplane-test-{lb.tag}-*"):
            p.unlink(missing_ok=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with two_namespaces() as lb:
        yield lb


def source_arena(lab: Lab) -> Arena:
    return Arena.create(Path(lab.path("src")), ArenaGeometry(1, ((0, 0),), 4096, 2048, 0))


def receiver(lab: Lab, port: int = 7100, **kw) -> TransportProcess:
    kw.setdefault("key_file", lab.key)
    spec = TransportSpec(name="rx", role="recv", control_path=lab.path("rxctl"),
                         arena_path=lab.path("rx"), host="0.0.0.0", tcp_port=port,
                         netns=lab.b, label="remote-a", **kw)
    return TransportProcess(spec)


def sender(lab: Lab, src: Arena, mode: str, port: int = 7100, **kw) -> TransportProcess:
    kw.setdefault("key_file", lab.key)
    spec = TransportSpec(name="tx", role="send", control_path=lab.path("txctl"),
                         arena_path=str(src.path), host=lab.peer, tcp_port=port, mode=mode,
                         netns=lab.a, **kw)
    return TransportProcess(spec)


def produce(src: Arena, n: int, frame_len: int = 300) -> threading.Thread:
    t = threading.Thread(target=testing.dp_transport_produce,
                         args=(ffi.from_buffer(src.mapping), 0, n, frame_len, 32, 7))
    t.start()
    return t


def drain(rx: Arena, seqs: list[np.ndarray], want: int, timeout: float = 30.0) -> int:
    """Consume the receiver's ring into seqs (the trailers' seq numbers) until want arrived."""
    ring, got = rx.rings[0], 0
    deadline = time.monotonic() + timeout
    while got < want and time.monotonic() < deadline:
        b = ring.peek()
        if len(b) == 0:
            time.sleep(0.005)
            continue
        assert (b["port"] == 0).all() and (b["flags"] & lib.DP_F_GENERATED).all()
        ends = b["addr"].astype(np.int64) + b["len"].astype(np.int64)
        idx = (ends - TRAILER)[:, None] + np.arange(8)[None, :]
        seqs.append(rx.buf[idx].copy().view("<u8").ravel())
        got += len(b)
        ring.release(len(b))
    return got


@ROOT
@pytest.mark.parametrize("mode", ["zerocopy", "send_zc", "copy"])
def test_every_seq_arrives_once_in_order(lab: Lab, mode: str) -> None:
    n = 20000
    src = source_arena(lab)
    with receiver(lab) as rx, sender(lab, src, mode, max_batch=64) as tx:
        rx.start()
        rx.wait_running()
        tx.start()
        tx.wait_running()
        p = produce(src, n)
        seqs: list[np.ndarray] = []
        got = drain(rx.arena, seqs, n)
        p.join()
        assert got == n, f"{got}/{n} arrived; sender {tx.control.snapshot()}"
        allseq = np.concatenate(seqs)
        assert (allseq == np.arange(n)).all(), "a sequence number missing, repeated or reordered"
        # the descriptors' own fields survived the trip too
        assert rx.arena.rings[0].counter("rx_packets") == n
        _wait(lambda: tx.control.counter("acks") == tx.control.counter("batches"), "all acks")
        s = tx.control.snapshot()
        assert s["lost_batches"] == 0 and s["packets"] == n
        if mode == "copy":
            assert s["completions"] == 0
        else:
            # veth: the kernel copies anyway and says so; we count it, not hide it
            assert s["completions"] > 0
            assert s["copied_completions"] > 0, s
            text = _scrape([(tx.spec, tx.control), (rx.spec, rx.control)])
            sample = (f'dataplane_transport_copied_completions_total{{mode="{mode}",'
                      f'peer="{lab.peer}:7100",role="send",transport="tx"}}')
            assert sample in text, text
            assert "dataplane_transport_zero_copy_effective" in text
        # every slot given back to the producer: the ring is empty on the sender's side
        _wait(lambda: src.rings[0].occupancy() == 0, "sender released every batch")
    src.close()


@ROOT
def test_receiver_restart_books_balance(lab: Lab, tmp_path: Path) -> None:
    n = 200000
    src = source_arena(lab)
    errlog = open(tmp_path / "sender.log", "w+")
    with receiver(lab) as rx, sender(lab, src, "zerocopy", max_batch=32) as tx:
        rx.start()
        rx.wait_running()
        tx.start(stderr=errlog)
        tx.wait_running()
        p = produce(src, n, frame_len=200)
        seqs: list[np.ndarray] = []
        drain(rx.arena, seqs, 20000)
        rx.kill()                      # mid-stream, no goodbye
        time.sleep(0.5)
        rx.start()
        rx.wait_running()
        _wait(lambda: tx.control.counter("reconnects") >= 1, "sender reconnected", 15)
        deadline = time.monotonic() + 60
        while p.is_alive() and time.monotonic() < deadline:
            drain(rx.arena, seqs, 1 << 62, timeout=0.2)
        p.join(1)
        assert not p.is_alive(), "producer stuck: the sender stopped taking batches"
        _wait(lambda: src.rings[0].occupancy() == 0 or
              (drain(rx.arena, seqs, 1 << 62, timeout=0.05) and False), "sender caught up", 30)
        tx.stop()
        drain(rx.arena, seqs, 1 << 62, timeout=0.3)
        s = tx.control.snapshot()
        r = rx.control.snapshot()
    src.close()
    errlog.seek(0)
    log_text = errlog.read()
    allseq = np.concatenate(seqs)
    assert (np.diff(allseq.astype(np.int64)) > 0).all(), "a seq repeated or reordered"
    # every batch taken from the ring was acknowledged or counted lost; nothing else happened
    assert s["acks"] == r["batches"], (s, r)
    assert len(allseq) + s["lost_packets"] == n, (len(allseq), s)
    assert s["reconnects"] >= 1 and s["disconnects"] >= 1
    assert "ended" in log_text and "connected to" in log_text, log_text
    assert s["lost_batches"] == 0 or " lost: " in log_text, log_text


@ROOT
def test_garbage_fails_the_handshake_a_bad_frame_is_counted_and_receiver_carries_on(
        lab: Lab) -> None:
    src = source_arena(lab)
    key = auth.load_key(Path(lab.key))
    with receiver(lab) as rx, sender(lab, src, "send_zc") as tx:
        rx.start()
        rx.wait_running()
        # garbage as long as a handshake's first message: refused, counted, closed on us
        with rogue.connect_in(lab.a, lab.peer, 7100) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 5)
            assert _read_all(s) == b""
        bad_magic = auth.REASONS.index("bad_magic")
        _wait(lambda: rx.control.hdr.auth.failures[bad_magic] == 1, "bad magic counted")
        # a peer with the key whose frame fails validation: a bad frame, counted, closed
        with rogue.connect_in(lab.a, lab.peer, 7100) as s:
            auth.authenticate_client(s, key, "test-peer")
            s.settimeout(10)
            s.sendall(rogue.header(2, 100, 1, 99) + bytes(64) + bytes(100))
            assert rogue.acks_in(_read_all(s))      # the HELLO came, no ack, then EOF
        _wait(lambda: rx.control.counter("bad_frames") == 1, "bad frame counted")
        assert rx.proc.poll() is None and rx.control.state() == "running"
        assert rx.control.counter("batches") == 0 and rx.control.hdr.auth.ok == 1
        tx.start()
        tx.wait_running()
        p = produce(src, 1000)
        seqs: list[np.ndarray] = []
        assert drain(rx.arena, seqs, 1000) == 1000
        p.join()
        assert (np.concatenate(seqs) == np.arange(1000)).all()
        assert rx.control.hdr.auth.ok == 2 and tx.control.hdr.auth.ok == 1
    src.close()


@ROOT
def test_a_sender_with_another_key_is_refused_on_both_ends(lab: Lab, tmp_path: Path) -> None:
    """Each end checks the other: a sender holding another key finds the receiver's proof
    wrong and says nothing more (bad_proof on its side, closed on the receiver's); it retries
    with backoff, and nothing is published."""
    other = tmp_path / "other.key"
    auth.write_key(other, auth.generate_key())
    src = source_arena(lab)
    with receiver(lab) as rx, sender(lab, src, "copy", key_file=str(other),
                                     backoff_max_ms=200) as tx:
        rx.start()
        rx.wait_running()
        tx.start()
        tx.wait_running()
        p = produce(src, 100)
        bad_proof, closed = auth.REASONS.index("bad_proof"), auth.REASONS.index("closed")
        _wait(lambda: tx.control.hdr.auth.failures[bad_proof] >= 3, "three refusals", 20)
        _wait(lambda: rx.control.hdr.auth.failures[closed] >= 3, "counted by the receiver")
        assert tx.control.hdr.auth.ok == 0 and rx.control.hdr.auth.ok == 0
        assert rx.control.counter("batches") == 0 and rx.arena.rings[0].occupancy() == 0
        assert tx.control.counter("batches") == 0 and tx.control.hdr.connected == 0
        p.join()
    src.close()


def _read_all(s) -> bytes:
    """Everything the peer sends until it closes (RST included: it closes with data unread)."""
    s.settimeout(10)
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_control_file_layout_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "ctl"
    bad.write_bytes(b"\0" * ffi.sizeof("struct dp_transport"))
    with pytest.raises(Exception, match="not a version"):
        Control(bad)


def _scrape(sources) -> str:
    from prometheus_client.exposition import generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TransportCollector(sources))
    return generate_latest(reg).decode()


def _wait(fn, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
