"""The io_uring worker (backend "uring") on the real kernel: AF_PACKET ingest on a veth pair,
UDP ingest from a Python sender, provided buffers exhausted by a stalled consumer and
recovered, two queues in a fanout, and `auto` choosing uring with its reason.

The helpers are the DPDK worker tests' (tests/helpers/workers.py, the `workers` and `veth`
fixtures): the same Worker/drain/accounting, so both backends are held to the same rule:
every sequence number received exactly once, or its loss counted.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from dataplane._native import lib

from dataplane import config
from dataplane.shm.layout import PORT_COUNTERS, URING_COUNTERS
from dataplane.workers.spec import GenSpec, PortSpec
from tests.helpers.workers import (
    COUNT,
    F_COPIED,
    F_GENERATED,
    TRAILER,
    Worker,
    check_accounting,
    gen_spec,
    run_until_done,
    worker_spec,
)

# what starts workers needs root; the config tests below run as any user
ROOT = pytest.mark.root("AF_PACKET, veth and netns")

GEN_MAGIC = lib.DP_GEN_MAGIC


def uring_spec(tag: str, port: PortSpec, gen: GenSpec | None = None, **kw):
    return worker_spec(tag, port, gen, backend="uring", **kw)


def uring_counter(w: Worker, name: str) -> int:
    i = URING_COUNTERS.index(name)
    return int(w.arena.uring_counters[:w.arena.n_rings, i].sum())


def raw_pair(workers, veth, tag: str, rx_kw: dict | None = None, queues: int = 1,
             count: int = COUNT, rate: int = 10000) -> tuple[Worker, Worker]:
    ns_a, ns_b, if_a, if_b = veth
    rx = workers(uring_spec(f"{tag}r", PortSpec("in", iface=if_b, rxq=queues, txq=queues),
                            **(rx_kw or {})), netns=ns_b)
    rx.wait_running()
    tx = workers(uring_spec(f"{tag}t", PortSpec("out", iface=if_a),
                            gen_spec(count=count, rate=rate)), netns=ns_a)
    tx.wait_running()
    return tx, rx


@ROOT
def test_af_packet_every_seq_once(workers, veth):
    """uring generator -> veth -> uring receiver: frames written by the kernel into slots."""
    tx, rx = raw_pair(workers, veth, "ra")
    run_until_done(tx, rx, COUNT)
    gen = check_accounting(tx, rx, 0, COUNT)    # also checks the generator's checksums
    assert rx.arena.header.zero_copy == 0
    assert (gen["flags"] & F_COPIED == 0).all()  # the kernel's write is the only one
    slots, size = rx.arena.header.slots_off, rx.arena.header.slot_size
    assert ((gen["addr"] - slots) % size == 0).all()
    assert uring_counter(rx, "cqes") >= len(gen)
    assert tx.port_counter("tx_packets") + tx.port_counter("tx_drops") == COUNT
    tx.stop()
    rx.stop()


@ROOT
def test_dpdk_generator_to_uring_receiver(workers, veth):
    """Frames from the DPDK worker's generator (same rules, gen.c) parse and account alike."""
    ns_a, ns_b, if_a, if_b = veth
    rx = workers(uring_spec("dur", PortSpec("in", iface=if_b)), netns=ns_b)
    rx.wait_running()
    tx = workers(worker_spec("dut", PortSpec("net_af_packet0", f"net_af_packet0,iface={if_a}"),
                             gen_spec()), netns=ns_a)
    tx.wait_running()
    run_until_done(tx, rx, COUNT)
    check_accounting(tx, rx, 0, COUNT)
    tx.stop()
    rx.stop()


@ROOT
def test_two_queues_fanout(workers, veth):
    """Two AF_PACKET sockets in a PACKET_FANOUT_HASH group, one ring each; a flow stays put."""
    tx, rx = raw_pair(workers, veth, "fq", queues=2)
    run_until_done(tx, rx, COUNT)
    gen = check_accounting(tx, rx, 0, COUNT)
    per_ring = [r.counter("rx_packets") for r in rx.arena.rings]
    assert all(n > 0 for n in per_ring), per_ring     # 1000 source ports spread over both
    by_flow: dict[int, set[int]] = {}
    for d in gen:
        by_flow.setdefault(int(d["hash"]), set()).add(int(d["queue"]))
    assert all(len(q) == 1 for q in by_flow.values())
    tx.stop()
    rx.stop()


@ROOT
def test_stalled_consumer_enobufs_then_recovers(workers, veth):
    """Nobody releases: the kernel runs out of slots, the multishot ends with ENOBUFS (counted),
    nothing is overwritten; once the consumer drains, the receive is re-armed and traffic flows.
    Every seq is still received once or counted (socket overflow -> nic_missed)."""
    count = 3000
    tx, rx = raw_pair(workers, veth, "eb", rx_kw={"ring_size": 256}, count=count, rate=5000)
    deadline = time.monotonic() + 20
    while uring_counter(rx, "enobufs") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uring_counter(rx, "enobufs") >= 1
    ring = rx.arena.rings[0]
    assert ring.occupancy() == ring.size             # every slot published, none overwritten
    assert rx.ring_counter("rx_packets") == ring.size
    assert rx.ring_counter("ring_full_drops") == 0
    rearms = uring_counter(rx, "rearms")
    run_until_done(tx, rx, count)                    # drain: slots go back, receive re-armed
    assert uring_counter(rx, "rearms") > rearms
    assert rx.ring_counter("rx_packets") > ring.size  # traffic flowed again
    check_accounting(tx, rx, 0, count)
    tx.stop()
    rx.stop()


def udp_sender(ns: str, dst: str, port: int, count: int, stream: int) -> subprocess.Popen:
    """A plain Python sender in the other namespace: payload ends with our trailer layout."""
    code = (
        "import socket,struct,sys,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"for i in range({count}):\n"
        f"    s.sendto(b'x'*40+struct.pack('<QQII',i,time.time_ns(),{stream},{GEN_MAGIC}),"
        f"('{dst}',{port}))\n"
        "    if i % 50 == 49: time.sleep(0.002)\n")
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code])


@ROOT
def test_udp_every_datagram_accounted(workers, veth):
    ns_a, ns_b, if_a, if_b = veth
    for ns, ifn, addr in ((ns_a, if_a, "10.91.0.1/24"), (ns_b, if_b, "10.91.0.2/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", ifn], check=True)
    count, port = 2000, 40000 + os.getpid() % 20000
    rx = workers(uring_spec("ud", PortSpec("udp", udp_port=port, rxq=2, txq=2)), netns=ns_b)
    rx.wait_running()
    snd = udp_sender(ns_a, "10.91.0.2", port, count, 9)
    assert snd.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while rx.drain() or (rx.ring_counter("rx_packets") + rx.port_counter("nic_missed") < count
                         and time.monotonic() < deadline):
        time.sleep(0.02)
    descs = np.concatenate(rx.descs)
    seqs = np.concatenate(rx.seqs)
    assert (descs["l4proto"] == 17).all() and (descs["ethertype"] == 0).all()
    assert (descs["flags"] & F_GENERATED != 0).all()
    assert (descs["len"] == 40 + TRAILER).all()       # the payload only
    uniq = np.unique(seqs)
    assert len(uniq) == len(seqs)
    assert count - len(uniq) <= rx.port_counter("nic_missed")
    assert len(uniq) > 0
    rx.stop()


@ROOT
def test_udp_socket_reachable_from_python_send(workers):
    """Loopback, no namespaces: a datagram's payload lands in a slot, described as UDP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rx = workers(uring_spec("lo", PortSpec("udp", udp_port=port)))
    rx.wait_running()
    payload = b"hello" + struct.pack("<QQII", 42, 0, 3, GEN_MAGIC)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(payload, ("127.0.0.1", port))
    deadline = time.monotonic() + 5
    while not rx.drain() and time.monotonic() < deadline:
        time.sleep(0.01)
    d = np.concatenate(rx.descs)[0]
    assert bytes(rx.arena.frame(int(d["addr"]), int(d["len"]))) == payload
    assert int(np.concatenate(rx.seqs)[0]) == 42
    rx.stop()


@ROOT
def test_setup_fails_fast_naming_the_interface(workers):
    w = workers(uring_spec("bad", PortSpec("in", iface="nosuch0if")))
    rc = w.proc.wait(timeout=30)
    err = w.proc.stderr.read()
    assert rc == 2, err
    assert w.arena.worker_state() == "failed"
    assert "nosuch0if" in w.arena.worker_error()


AUTO_UDP = """
[[worker]]
name = "u"
  [[worker.port]]
  name = "feed"
  driver = "udp"
  udp_port = 5555
"""


def test_auto_falls_back_to_uring_for_a_udp_port():
    cfg = config.loads(AUTO_UDP)
    (spec,) = config.plan(cfg)
    assert spec.backend == "uring"
    assert "udp" in cfg.workers[0].backend_reason
    assert spec.ports[0].udp_port == 5555


def test_udp_port_refused_on_dpdk_backend():
    with pytest.raises(config.ConfigError, match="backend"):
        config.loads(AUTO_UDP.replace('name = "u"', 'name = "u"\nbackend = "dpdk"'))


@ROOT
def test_default_lab_end_to_end_on_uring():
    """The embedded default lab with both workers on io_uring, through dataplane.run.runner.Run:
    every generated seq received once or counted; uring metrics exported."""
    from dataplane.run import lab
    from dataplane.run.runner import Run
    from tests.helpers.default_lab import lab_config
    from tests.helpers.metrics import metric, scrape

    tag = f"{os.getpid() % 10000}u"
    cfg = lab_config(tag, count=5000, rate=10000, rx_driver="af_packet")
    for w in cfg.workers:
        w.backend, w.backend_reason = "uring", "set by the test"
    assert {s.backend for s in config.plan(cfg)} == {"uring"}
    out = io.StringIO()
    with Run(cfg, out) as r:
        r.start()
        gen = r.sup.workers[f"gen{tag}"]
        deadline = time.monotonic() + 30
        while gen.arena.port_counters[0][6] < 5000 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        text = scrape(r.metrics.address)
        res = r.finish()
        # the generator's own count of what its port sent, apart from the run's books
        sent = int(gen.arena.port_counters[0][PORT_COUNTERS.index("tx_packets")])
        assert metric(text, "dataplane_worker_up", worker=f"rx{tag}") == 1
        assert metric(text, "dataplane_rx_packets_total", worker=f"rx{tag}", port="in") > 0
        assert metric(text, "dataplane_uring_cqes_total", worker=f"rx{tag}", port="in") > 0
    assert not lab.exists(cfg), "run left its namespaces behind"
    s = res.streams[gen.spec.gen.stream]
    assert s["sent"] - s["tx_drops"] == 5000 == sent, (s, sent)
    assert s["duplicates"] == 0
    # every packet the port sent arrived once, or its loss is in a drop counter
    assert s["unique"] <= sent and sent - s["unique"] <= res.totals.drops, r.report(res)
    assert res.ok, r.report(res)


def test_config_show_says_backend_and_reason(tmp_path, capsys):
    from dataplane import cli

    f = tmp_path / "u.toml"
    f.write_text(AUTO_UDP)
    assert cli.main(["config", "show", str(f)]) == 0
    out = capsys.readouterr().out
    assert "backend uring" in out and "UDP-socket PMD" in out


def test_auto_falls_back_to_uring_without_dpdk_pmds(monkeypatch, tmp_path):
    """af_packet runs on both: auto takes DPDK only when its PMD plugin is really there."""
    from dataplane.config import backends as backend

    monkeypatch.setattr(backend, "PMD_DIRS", str(tmp_path / "pmds-*"))
    cfg = config.loads(AUTO_UDP.replace('driver = "udp"\n  udp_port = 5555',
                                        'driver = "af_packet"\n  iface = "eth0"'))
    assert cfg.workers[0].backend == "uring"
    assert "librte_net_af_packet.so not found" in cfg.workers[0].backend_reason
    (tmp_path / "pmds-23.0").mkdir()
    (tmp_path / "pmds-23.0" / "librte_net_af_packet.so").touch()
    assert config.loads(AUTO_UDP.replace('driver = "udp"\n  udp_port = 5555',
                                         'driver = "af_packet"\n  iface = "eth0"')
                        ).workers[0].backend == "dpdk"
