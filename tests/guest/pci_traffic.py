"""The project's DPDK worker on real (emulated) PCI NICs inside the guest: a generating worker on
one e1000, a receiving worker on the other (a QEMU hub: what one sends the other receives).

uio_pci_generic gives no IOMMU, so EAL must use IOVA as PA, which needs hugepages (the guest tool
mounts them on /dev/hugepages).  The arena in /dev/shm has no physical addresses, so the worker
falls back to copy mode: zero_copy = 0 and every frame counted in `copied`.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from dataplane._native import lib

from dataplane.shm.arena import Arena
from dataplane.shm.layout import PORT_COUNTERS, TRAILER_DTYPE
from dataplane.workers.spec import GenSpec, PortSpec, WorkerSpec

REPO = Path(__file__).resolve().parents[2]
F_GENERATED = lib.DP_F_GENERATED
TRAILER = TRAILER_DTYPE.itemsize


def udp_template(size: int = 128) -> str:
    """Ether/IPv4/UDP with zero checksums (the generator recomputes them), by hand: importing
    scapy costs seconds under TCG."""
    eth = bytes.fromhex("020000000002" "020000000001" "0800")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0,
                     bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2]))
    udp = struct.pack("!HHHH", 1234, 5678, size - 34, 0)
    return (eth + ip + udp + b"\0" * (size - 42)).hex()


def spec(tag: str, pci: str, gen: GenSpec | None = None, copybreak: int = 256,
         zero_copy: bool = True) -> WorkerSpec:
    uid = uuid.uuid4().hex[:6]
    return WorkerSpec(name=f"g{tag}{uid}", worker_id=0, gen=gen, copybreak=copybreak,
                      zero_copy=zero_copy,
                      ports=[PortSpec(name=pci, pci=pci, rxd=512, txd=512)],
                      ring_size=2048, pool_mb=16, n_mbufs=4095, idle_sleep_us=200,
                      hugepages=True, huge_dir="/dev/hugepages", log_level="error",
                      arena_path=f"/dev/shm/guest-{tag}-{uid}")


class Worker:
    def __init__(self, s: WorkerSpec):
        self.spec = s
        self.arena = Arena.create(Path(s.arena_path), s.geometry())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataplane.workers.process", s.to_json()],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_state(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while self.arena.worker_state() in ("empty", "starting"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return self.arena.worker_state()

    def stop(self) -> tuple[int | None, str]:
        self.arena.request_stop()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return self.proc.returncode, err

    def close(self) -> None:
        self.arena.close()
        os.unlink(self.spec.arena_path)

    def port(self, name: str) -> int:
        return int(self.arena.port_counters[0][PORT_COUNTERS.index(name)])

    def ring(self, name: str) -> int:
        return sum(r.counter(name) for r in self.arena.rings)


def drain(w: Worker, seqs: list[np.ndarray]) -> int:
    n = 0
    for ring in w.arena.rings:
        for b in ring.batches():
            gen = (b["flags"] & F_GENERATED) != 0
            at = (b["addr"][gen] + b["len"][gen] - TRAILER).astype(np.int64)
            seqs.append(w.arena.buf[at[:, None] + np.arange(8)].view("<u8").ravel().copy())
            n += len(b)
    return n


def run_pair(tx_pci: str, rx_pci: str, count: int, rate: int, zero_copy: bool = False,
             ask_zero_copy: bool = True) -> dict[str, Any]:
    """zero_copy: expect the receiver to leave frames where the PMD wrote them (pool in the
    arena, copybreak off); else copy mode: uio_pci_generic's IOVA as PA forces it, or
    ask_zero_copy=False turns it off in the spec."""
    z = ask_zero_copy
    rx = Worker(spec("rx", rx_pci, copybreak=0 if zero_copy else 256, zero_copy=z))
    tx = None
    try:
        assert rx.wait_state(90) == "running", f"rx: {rx.arena.worker_error()} {rx.stop()}"
        gen = GenSpec(rate_pps=rate, count=count, burst=16, stream=7, template=udp_template(),
                      vary_off=34, vary_min=1000, vary_max=1999)
        tx = Worker(spec("tx", tx_pci, gen, zero_copy=z))
        assert tx.wait_state(90) == "running", f"tx: {tx.arena.worker_error()} {tx.stop()}"
        seqs: list[np.ndarray] = []
        deadline, quiet = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            got = drain(rx, seqs)
            if got or tx.port("gen_seq") < count:
                quiet = None
            elif quiet is None:
                quiet = time.monotonic()
            elif time.monotonic() - quiet > 1.0:
                break
            time.sleep(0.02)
        got_seqs = np.concatenate(seqs) if seqs else np.empty(0, np.uint64)
        uniq = np.unique(got_seqs)
        dropped = rx.ring("ring_full_drops") + rx.port("nic_missed") + rx.port("rx_nombuf")
        out = {"sent": tx.port("tx_packets"), "gen_seq": tx.port("gen_seq"),
               "received_generated": len(got_seqs), "unique": len(uniq),
               "rx_packets": rx.ring("rx_packets"), "copied": rx.ring("copied"),
               "zero_copy": int(rx.arena.header.zero_copy), "dropped_counted": dropped}
        assert out["sent"] >= count, out
        assert len(uniq) == len(got_seqs), f"duplicate seqs: {out}"
        assert ((uniq >= 0) & (uniq < count)).all(), f"seq out of range: {out}"
        assert count - len(uniq) <= dropped, f"missing seqs not counted as drops: {out}"
        assert len(uniq) > 0, out
        if zero_copy:
            assert out["zero_copy"] == 1 and out["copied"] == 0, out
        else:
            assert out["zero_copy"] == 0 and out["copied"] == out["rx_packets"], out
        out["rx_exit"], out["rx_stderr"] = rx.stop()
        out["tx_exit"], out["tx_stderr"] = tx.stop()
        assert out["rx_exit"] == 0 and out["tx_exit"] == 0, out
        return out
    finally:
        for w in (rx, tx):
            if w is not None:
                if w.proc.poll() is None:
                    w.stop()
                w.close()
