"""The DPDK worker against real PMDs: memif between two workers, af_packet and af_xdp on a veth
pair across two network namespaces, copy mode, and counters across a restart.

Each test starts `python -m dataplane.workers.process SPEC_JSON` processes, reads the receiver's
rings with RingReader (whole batches, numpy gathers) and accounts for every generated sequence
number: received exactly once, or counted as dropped.  Rates are modest: these check
correctness, not speed.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.workers.spec import GenSpec, PortSpec, WorkerSpec

pytestmark = [
    pytest.mark.root, pytest.mark.dpdk,
    pytest.mark.skipif(os.geteuid() != 0, reason="DPDK vdevs, veth and netns need root"),
]

REPO = Path(__file__).resolve().parent.parent
F_COPIED, F_GENERATED = 0x0040, 0x0080
TRAILER = 24
COUNT, RATE = 3000, 10000


def udp_template(size: int = 128) -> str:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    hdr = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / \
        IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=1234, dport=5678)
    return bytes(hdr / (b"\0" * (size - len(hdr)))).hex()


def worker_spec(tag: str, port: PortSpec, gen: GenSpec | None = None, **kw) -> WorkerSpec:
    uid = uuid.uuid4().hex[:8]
    kw = {"ring_size": 2048, "pool_mb": 16, "n_mbufs": 4095, "idle_sleep_us": 200,
          "eal_memory_mb": 128, "log_level": "error", **kw}
    port.rxd = port.txd = 512
    return WorkerSpec(name=f"dpw{tag}{uid}", worker_id=0, ports=[port], gen=gen,
                      arena_path=f"/dev/shm/dpw-test-{tag}-{uid}", **kw)


def gen_spec(count: int = COUNT, rate: int = RATE) -> GenSpec:
    return GenSpec(rate_pps=rate, count=count, burst=16, stream=7, template=udp_template(),
                   vary_off=34, vary_min=1000, vary_max=1999)   # UDP source port


@dataclass
class Worker:
    spec: WorkerSpec
    arena: Arena
    proc: subprocess.Popen
    seqs: list[np.ndarray] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)
    descs: list[np.ndarray] = field(default_factory=list)

    def wait_running(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.arena.worker_state() != "running":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate(timeout=5) if self.proc.poll() is not None \
                    else ("", "")
                pytest.fail(f"{self.spec.name} not running (state {self.arena.worker_state()}, "
                            f"exit {self.proc.poll()}): {self.arena.worker_error()} {err}")
            time.sleep(0.02)

    def drain(self) -> int:
        """Read every ready batch: trailer seq gathered from the frames in place, then release."""
        n = 0
        buf = self.arena.buf
        for ring in self.arena.rings:
            for b in ring.batches():
                gen = (b["flags"] & F_GENERATED) != 0
                at = (b["addr"][gen] + b["len"][gen] - TRAILER).astype(np.int64)
                raw = buf[at[:, None] + np.arange(8)]          # one gather per batch
                self.seqs.append(raw.view("<u8").ravel().copy())
                self.flags.append(b["flags"].copy())
                self.descs.append(b.copy())
                n += len(b)
        return n

    def stop(self) -> None:
        self.arena.request_stop()
        try:
            rc = self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert rc == 0, f"{self.spec.name} exited {rc}: {err}"
        assert self.arena.worker_state() == "stopped"

    def ring_counter(self, name: str) -> int:
        return sum(r.counter(name) for r in self.arena.rings)

    def port_counter(self, name: str) -> int:
        from dataplane.shm.arena import PORT_COUNTERS
        return int(self.arena.port_counters[0][PORT_COUNTERS.index(name)])


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(spec: WorkerSpec, netns: str | None = None, arena: Arena | None = None) -> Worker:
        if arena is None:
            geo = ArenaGeometry(len(spec.ports), spec.rings(), spec.ring_size, spec.slot_size,
                                spec.pool_mb << 20)
            arena = Arena.create(Path(spec.arena_path), geo)
        cmd = [sys.executable, "-m", "dataplane.workers.process", spec.to_json()]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        w = Worker(spec, arena, proc)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.arena.request_stop()
            try:
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        path = w.arena.path
        w.arena.close()
        path.unlink(missing_ok=True)


def run_until_done(tx: Worker, rx: Worker, count: int, timeout: float = 30) -> None:
    """Drain the receiver until the generator has sent count and nothing more arrives."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        got = rx.drain()
        done = tx.arena.port_counters[0][6] >= count   # gen_seq
        if got or not done:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.5:
            return
        time.sleep(0.01)
    pytest.fail(f"generator sent {tx.port_counter('tx_packets')} of {count} in {timeout} s")


def check_accounting(tx: Worker, rx: Worker, first_seq: int, count: int) -> np.ndarray:
    """Every seq received exactly once, or the missing ones counted as drops somewhere."""
    seqs = np.concatenate(rx.seqs) if rx.seqs else np.empty(0, np.uint64)
    uniq, dup = np.unique(seqs, return_counts=True)
    assert (dup == 1).all(), f"duplicated seqs: {uniq[dup > 1][:10]}"
    assert ((uniq >= first_seq) & (uniq < first_seq + count)).all(), "seq out of range"
    missing = count - len(uniq)
    dropped = (rx.ring_counter("ring_full_drops") + rx.port_counter("nic_missed")
               + rx.port_counter("rx_nombuf") + tx.port_counter("nic_errors"))
    assert missing <= dropped, (f"{missing} seqs missing, only {dropped} drops counted "
                                f"(received {len(uniq)} of {count})")
    assert tx.port_counter("tx_packets") >= count
    descs = np.concatenate(rx.descs)
    gen = descs[(descs["flags"] & F_GENERATED) != 0]
    assert len(gen) == len(seqs)
    assert (gen["ethertype"] == 0x0800).all(), np.unique(gen["ethertype"])
    assert (gen["l4proto"] == 17).all(), np.unique(gen["l4proto"])
    check_frames(rx, gen[:: max(1, len(gen) // 20)])
    return gen


def check_frames(rx: Worker, sample: np.ndarray) -> None:
    """A sample decoded with scapy (tests only): checksums the generator recomputed are right,
    the varied UDP source port stays in its range, the trailer carries stream and magic."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    for d in sample:
        raw = bytes(rx.arena.frame(int(d["addr"]), int(d["len"])))
        pkt = Ether(raw)
        ip_ck, udp_ck = pkt[IP].chksum, pkt[UDP].chksum
        del pkt[IP].chksum, pkt[UDP].chksum
        again = Ether(bytes(pkt))
        assert (ip_ck, udp_ck) == (again[IP].chksum, again[UDP].chksum)
        assert 1000 <= pkt[UDP].sport <= 1999
        seq, _, stream, magic = struct.unpack("<QQII", raw[-TRAILER:])
        assert (stream, magic) == (7, 0x31475044)
        assert pkt[UDP].sport == 1000 + seq % 1000


# ---- memif: two workers, no kernel in the path ----

def memif_pair(workers, tmp: Path, rx_kw: dict | None = None, **gen_kw) -> tuple[Worker, Worker]:
    sock = tmp / "memif.sock"
    dev = f"socket={sock},socket-abstract=no,id=0"
    tx = workers(worker_spec("ms", PortSpec("net_memif0", f"net_memif0,role=server,{dev}"),
                             gen_spec(**gen_kw)))
    tx.wait_running()
    rx = workers(worker_spec("mc", PortSpec("net_memif1", f"net_memif1,role=client,{dev}"),
                             **(rx_kw or {})))
    rx.wait_running()
    return tx, rx


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dpw-") as d:   # mkdtemp: mode 0700
        yield Path(d)


def test_memif_every_seq_once(workers, sockdir):
    tx, rx = memif_pair(workers, sockdir, {"copybreak": 0})   # 0: every frame left in place
    run_until_done(tx, rx, COUNT)
    gen = check_accounting(tx, rx, 0, COUNT)
    assert rx.arena.header.zero_copy == 1
    assert (gen["flags"] & F_COPIED == 0).all()
    assert rx.ring_counter("rx_packets") >= len(gen)
    tx.stop()
    rx.stop()


def test_memif_copy_mode(workers, sockdir):
    tx, rx = memif_pair(workers, sockdir, {"zero_copy": False}, count=1000)
    run_until_done(tx, rx, 1000)
    gen = check_accounting(tx, rx, 0, 1000)
    assert rx.arena.header.zero_copy == 0
    assert (gen["flags"] & F_COPIED != 0).all()
    assert rx.ring_counter("copied") == rx.ring_counter("rx_packets")
    ring = rx.arena.rings[0]
    slots = rx.arena.header.slots_off
    size = rx.arena.header.slot_size
    assert ((gen["addr"] - slots) % size == 0).all()   # each frame sits at its slot
    assert (gen["addr"] < slots + ring.size * size).all()
    tx.stop()
    rx.stop()


def test_copybreak_copies_small_frames_only(workers, sockdir):
    """Zero copy with copybreak = 128: the 128-byte generated frames (<= 128) are copied into
    their slots and their mbufs recycled at once; the worker stays in zero-copy mode."""
    tx, rx = memif_pair(workers, sockdir, {"copybreak": 128}, count=1000)
    run_until_done(tx, rx, 1000)
    gen = check_accounting(tx, rx, 0, 1000)
    assert rx.arena.header.zero_copy == 1
    assert (gen["flags"] & F_COPIED != 0).all()
    slots, size = rx.arena.header.slots_off, rx.arena.header.slot_size
    assert ((gen["addr"] - slots) % size == 0).all()
    assert (gen["addr"] < rx.arena.header.pool_off).all()
    assert rx.ring_counter("copied") == rx.ring_counter("rx_packets")
    tx.stop()
    rx.stop()


def test_full_ring_is_a_counted_drop(workers, sockdir):
    tx, rx = memif_pair(workers, sockdir, {"ring_size": 256}, count=1000)
    rx_ring = rx.arena.rings[0]
    deadline = time.monotonic() + 20
    while tx.port_counter("gen_seq") < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)    # nobody consumes: the ring fills, the worker must not block
    time.sleep(0.3)
    size = rx_ring.size
    assert rx_ring.occupancy() == size
    assert rx.ring_counter("rx_packets") == size
    assert rx.ring_counter("ring_full_drops") == 1000 - size
    rx.drain()              # the first ring-full of seqs, each once, never overwritten
    assert np.array_equal(np.sort(np.concatenate(rx.seqs)), np.arange(size, dtype=np.uint64))
    tx.stop()
    rx.stop()


def test_restart_continues_counters_and_seq(workers, sockdir):
    tx, rx = memif_pair(workers, sockdir, count=1000)
    run_until_done(tx, rx, 1000)
    check_accounting(tx, rx, 0, 1000)
    tx.stop()
    rx.stop()
    rx_first = rx.ring_counter("rx_packets")
    seq_first = tx.port_counter("gen_seq")
    assert seq_first == 1000
    # restart both on their own arenas: the supervisor clears stop before a restart
    for w in (tx, rx):
        w.arena.header.stop = 0
    tx2 = workers(tx.spec, arena=tx.arena)
    tx2.wait_running()
    rx2 = workers(rx.spec, arena=rx.arena)
    rx2.wait_running()
    run_until_done(tx2, rx2, seq_first + 1000)
    check_accounting(tx2, rx2, seq_first, 1000)     # no seq repeated across the restart
    assert rx2.ring_counter("rx_packets") >= rx_first + 1000 - rx2.ring_counter("ring_full_drops")
    assert tx2.port_counter("tx_packets") >= 2000
    tx2.stop()
    rx2.stop()


# ---- veth pair across two namespaces ----

@pytest.fixture
def veth() -> Iterator[tuple[str, str, str, str]]:
    uid = uuid.uuid4().hex[:6]
    ns_a, ns_b, if_a, if_b = f"dpwa{uid}", f"dpwb{uid}", f"dpwa{uid}", f"dpwb{uid}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, ifn in ((ns_a, if_a), (ns_b, if_b)):
            # no IPv6 chatter (router solicitations, MLD) among the frames under test
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            f"net.ipv6.conf.{ifn}.disable_ipv6=1"], check=True)
            ip("-n", ns, "link", "set", ifn, "up")
        yield ns_a, ns_b, if_a, if_b
    finally:
        for ns in (ns_a, ns_b):   # deleting a namespace deletes its veth end, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def veth_pair(workers, veth, rx_port: PortSpec, tag: str) -> tuple[Worker, Worker]:
    ns_a, ns_b, if_a, _ = veth
    # receiver first: af_packet's link is always up, so the generator starts at once
    rx = workers(worker_spec(f"{tag}r", rx_port), netns=ns_b)
    rx.wait_running()
    tx = workers(worker_spec(f"{tag}t", PortSpec("net_af_packet0", f"net_af_packet0,iface={if_a}"),
                             gen_spec()), netns=ns_a)
    tx.wait_running()
    return tx, rx


@pytest.mark.parametrize("pmd", ["af_packet", "af_xdp"])
def test_veth_receiver(workers, veth, pmd):
    """Generator on af_packet in one namespace; the receiver's PMD in the other."""
    devargs = {"af_packet": f"net_af_packet1,iface={veth[3]}",
               # af_xdp: the kernel writes frames straight into the arena pool (its UMEM)
               "af_xdp": f"net_af_xdp0,iface={veth[3]},start_queue=0,queue_count=1"}[pmd]
    tx, rx = veth_pair(workers, veth, PortSpec(devargs.split(",")[0], devargs), pmd[3])
    run_until_done(tx, rx, COUNT)
    check_accounting(tx, rx, 0, COUNT)
    assert rx.arena.header.zero_copy == 1
    tx.stop()
    rx.stop()


# ---- set-up: waiting for a predecessor's ring, failing fast, stopping on a signal ----

def test_waits_for_leftover_ring_then_stops_on_sigterm(workers, sockdir):
    spec = worker_spec("lw", PortSpec("net_memif0", f"net_memif0,role=server,"
                                      f"socket={sockdir / 'm.sock'},socket-abstract=no,id=0"))
    geo = ArenaGeometry(1, spec.rings(), spec.ring_size, spec.slot_size, spec.pool_mb << 20)
    arena = Arena.create(Path(spec.arena_path), geo)
    ring = arena.rings[0]
    ring._ring.prod = 5      # a dead predecessor published 5 descriptors nobody consumed
    w = workers(spec, arena=arena)
    deadline = time.monotonic() + 10
    while arena.worker_state() != "starting" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert arena.worker_state() == "starting"   # never writes cons, never reuses the slots
    hb = arena.header.heartbeat_ns
    time.sleep(0.1)
    assert arena.header.heartbeat_ns > hb       # but keeps its heartbeat while waiting
    ring.release(5)
    w.wait_running()
    w.proc.send_signal(15)
    assert w.proc.wait(timeout=20) == 0
    assert arena.worker_state() == "stopped"


def test_setup_fails_fast_naming_the_port(workers):
    spec = worker_spec("bad", PortSpec("net_nosuch0", "net_null0"))
    w = workers(spec)
    rc = w.proc.wait(timeout=30)
    err = w.proc.stderr.read()
    assert rc == 2, err
    assert w.arena.worker_state() == "failed"
    assert "net_nosuch0" in w.arena.worker_error()
    assert "net_nosuch0" in err
