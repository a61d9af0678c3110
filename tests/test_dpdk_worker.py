"""The DPDK worker against real PMDs: memif between two workers, af_packet and af_xdp on a veth
pair across two network namespaces, copy mode, and counters across a restart.

Each test starts `python -m dataplane.workers.process SPEC_JSON` processes (the `workers`
fixture, tests/conftest.py), reads the receiver's rings with RingReader (whole batches, numpy
gathers) and accounts for every generated sequence number (tests/helpers/workers.py): received
exactly once, or counted as dropped.  Rates are modest: these check correctness, not speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.workers.spec import PortSpec
from tests.helpers.workers import (
    COUNT,
    F_COPIED,
    Worker,
    check_accounting,
    gen_spec,
    run_until_done,
    worker_spec,
)

pytestmark = [pytest.mark.root("DPDK vdevs, veth and netns"), pytest.mark.dpdk]


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
    # each seq issued once: what the port took and what it refused
    assert seq_first == tx.port_counter("tx_packets") + tx.port_counter("tx_drops") >= 1000
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


def test_memif_server_survives_clients_that_leave(workers, sockdir):
    """A memif client killed while the server sends and polls: the PMD unmaps the shared regions
    in the EAL's interrupt thread, which a worker inside a burst must never see (it died of
    SIGSEGV before native/dpdk/intr_guard.c).  Twelve clients come and go; the server keeps
    running and sending to each."""
    dev = f"socket={sockdir / 'memif.sock'},socket-abstract=no,id=0"
    tx = workers(worker_spec("ks", PortSpec("net_memif0", f"net_memif0,role=server,{dev}"),
                             gen_spec(count=0, rate=5000)))
    tx.wait_running()
    sent = []
    for i in range(12):
        rx = memif_client(workers, dev, f"kc{i}", tx)
        deadline = time.monotonic() + 20
        while rx.ring_counter("rx_packets") < 10:
            assert tx.proc.poll() is None, f"server died ({tx.proc.poll()}) with client {i}"
            assert time.monotonic() < deadline, f"client {i} received nothing"
            time.sleep(0.005)
        rx.proc.kill()                         # gone mid-stream, no goodbye
        rx.proc.wait(10)
        sent.append(tx.port_counter("tx_packets"))
    time.sleep(0.5)
    assert tx.proc.poll() is None, f"server died ({tx.proc.poll()})"
    assert sent == sorted(set(sent))           # it sent to every client
    tx.stop()


def memif_client(workers, dev: str, tag: str, server: Worker) -> Worker:
    """A memif client of `server`, started again while the server still holds its previous
    client (its start fails until the server saw that one leave)."""
    deadline = time.monotonic() + 10
    while True:
        rx = workers(worker_spec(tag, PortSpec("net_memif1", f"net_memif1,role=client,{dev}")))
        while rx.arena.worker_state() != "running" and rx.proc.poll() is None:
            time.sleep(0.01)
        if rx.proc.poll() is None:
            return rx
        assert server.proc.poll() is None, f"server died ({server.proc.poll()})"
        assert time.monotonic() < deadline, f"{tag}: {rx.arena.worker_error()}"
        time.sleep(0.05)


# ---- veth pair across two namespaces ----

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
