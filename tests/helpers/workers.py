"""Worker processes under test, either backend (DPDK, io_uring): their specs, what the test
reads from their rings, and the accounting both backends are held to: every sequence number
received exactly once, or its loss counted.  Started and stopped by the `workers` fixture
(tests/conftest.py)."""

from __future__ import annotations

import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from dataplane._native import lib

from dataplane.shm.arena import Arena
from dataplane.shm.layout import PORT_COUNTERS, TRAILER_DTYPE
from dataplane.workers.spec import GenSpec, PortSpec, WorkerSpec
from tests.helpers.processes import stop_process

F_COPIED, F_GENERATED = lib.DP_F_COPIED, lib.DP_F_GENERATED
TRAILER = TRAILER_DTYPE.itemsize
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
    # rx_packets when this process started: a restarted worker continues its arena's counters
    rx_base: int = field(init=False)

    def __post_init__(self) -> None:
        self.rx_base = self.ring_counter("rx_packets")

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
        rc = stop_process(self.proc, self.arena.request_stop, 20)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert rc == 0, f"{self.spec.name} exited {rc}: {err}"
        assert self.arena.worker_state() == "stopped"

    def ring_counter(self, name: str) -> int:
        return sum(r.counter(name) for r in self.arena.rings)

    def port_counter(self, name: str) -> int:
        return int(self.arena.port_counters[0][PORT_COUNTERS.index(name)])


def run_until_done(tx: Worker, rx: Worker, count: int, timeout: float = 30) -> None:
    """Drain the receiver until the generator has sent count and nothing more arrives."""
    if not drain_until_quiet(rx.drain, lambda: tx.arena.port_counters[0][6] >= count, timeout):
        pytest.fail(f"generator sent {tx.port_counter('tx_packets')} of {count} in {timeout} s")


def drain_until_quiet(drain: Callable[[], int], done: Callable[[], bool],
                      timeout: float) -> bool:
    """Call drain() until done() and drain() has found nothing for 0.5 s: True; False when
    timeout ran out first."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        got = drain()
        if got or not done():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.5:
            return True
        time.sleep(0.01)
    return False


def check_accounting(tx: Worker, rx: Worker, first_seq: int, count: int) -> np.ndarray:
    """Every seq the generator issued received exactly once, or the missing ones counted as
    drops somewhere.  The generator issues each seq once, taken by its port or not: `count` is
    what its port took, so a burst the port refused in part (tx_drops) makes it issue more
    than `count` numbers."""
    seqs = np.concatenate(rx.seqs) if rx.seqs else np.empty(0, np.uint64)
    uniq, dup = np.unique(seqs, return_counts=True)
    assert (dup == 1).all(), f"duplicated seqs: {uniq[dup > 1][:10]}"
    issued = tx.port_counter("gen_seq") - first_seq
    assert issued >= count and tx.port_counter("tx_packets") >= count
    out = uniq[(uniq < first_seq) | (uniq >= first_seq + issued)]
    assert len(out) == 0, (f"seq out of range [{first_seq}, {first_seq + issued}): "
                           f"{len(out)} of {len(uniq)}, e.g. {out[:8].tolist()}")
    missing = issued - len(uniq)
    dropped = (rx.ring_counter("ring_full_drops") + rx.port_counter("nic_missed")
               + rx.port_counter("rx_nombuf") + tx.port_counter("nic_errors")
               + tx.port_counter("tx_drops"))
    assert missing <= dropped, (f"{missing} seqs missing, only {dropped} drops counted "
                                f"(received {len(uniq)} of {issued} issued)")
    descs = np.concatenate(rx.descs)
    # the test read every descriptor the worker counted into its ring, no more, no fewer
    assert len(descs) == rx.ring_counter("rx_packets") - rx.rx_base, \
        (len(descs), rx.ring_counter("rx_packets"), rx.rx_base)
    gen = descs[(descs["flags"] & F_GENERATED) != 0]
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
