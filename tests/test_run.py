"""`dataplane run` end to end on the real kernel: the default lab with this test's own names,
a real Prometheus scrape, a killed worker restarted with its counters intact, and malformed
frames injected on the veth, counted and survived."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.run import lab
from dataplane.run.runner import Run
from dataplane.shm.layout import PORT_COUNTERS
from tests.helpers.default_lab import default_text, lab_config, ship_rx_ring
from tests.helpers.metrics import metric, promtool_check, scrape
from tests.helpers.wait import wait as _wait

pytestmark = [pytest.mark.root("netns, veth, DPDK"), pytest.mark.dpdk]


@pytest.mark.parametrize("rx_driver", ["af_xdp", "af_packet"])
def test_lab_every_generated_packet_received_or_counted(rx_driver: str) -> None:
    tag = f"{os.getpid() % 10000}{rx_driver[3]}"
    cfg = lab_config(tag, count=5000, rate=10000, rx_driver=rx_driver)
    out = io.StringIO()
    with Run(cfg, out) as r:
        r.start()
        deadline = time.monotonic() + 30
        gen = r.sup.workers[f"gen{tag}"]
        tx_packets = PORT_COUNTERS.index("tx_packets")
        while gen.arena.port_counters[0][tx_packets] < 5000 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = scrape(r.metrics.address)
        res = r.finish()
        # counted by the workers themselves, not by the run's books: what the generator's port
        # sent, what the receiver wrote into its rings
        sent = int(gen.arena.port_counters[0][tx_packets])
        rx = r.sup.workers[f"rx{tag}"]
        into_rings = sum(ring.counter("rx_packets") for ring in rx.arena.rings)
        # the scrape is real: parsed by prometheus_client, checked by promtool
        promtool_check(text)
        assert metric(text, "dataplane_worker_up", worker=f"rx{tag}") == 1
        assert metric(text, "dataplane_rx_packets_total", worker=f"rx{tag}", port="in") > 0
    assert not lab.exists(cfg), "run left its namespaces behind"
    s = res.streams[gen.spec.gen.stream]
    assert sent == 5000, "count = packets the port took"
    assert s["sent"] - s["tx_drops"] == sent, (s, sent)    # seqs issued: sent or tx-dropped
    assert s["duplicates"] == 0
    # the consumers saw no more than the receiver wrote into its rings
    assert s["received"] <= into_rings, (s, into_rings)
    # every packet the port sent arrived once, or its loss is visible in a drop counter
    assert s["unique"] <= sent and sent - s["unique"] <= res.totals.drops, r.report(res)
    assert res.ok, r.report(res)


def test_killed_worker_restarts_with_counters_intact() -> None:
    tag = f"{os.getpid() % 10000}k"
    cfg = lab_config(tag, rate=5000)
    with Run(cfg, io.StringIO()) as r:
        r.start()
        rx = r.sup.workers[f"rx{tag}"]
        ring = rx.arena.rings[0]
        _wait(lambda: ring.counter("rx_packets") > 1000, "rx traffic before the kill")
        before = ring.counter("rx_packets")
        old_pid = rx.proc.pid
        os.kill(old_pid, signal.SIGKILL)
        _wait(lambda: bool(r.sup.check()) or rx.proc.pid != old_pid, "supervisor noticed",
              timeout=10)
        _wait(lambda: rx.arena.worker_state() == "running" and rx.proc.pid != old_pid,
              "worker running again", timeout=60)
        assert ring.counter("rx_packets") >= before, "a restart reset a counter"
        _wait(lambda: ring.counter("rx_packets") > before + 500, "traffic after the restart")
        text = scrape(r.metrics.address)
        assert metric(text, "dataplane_worker_restarts_total", worker=f"rx{tag}") == 1
        assert metric(text, "dataplane_rx_packets_total", worker=f"rx{tag}") >= before + 500
        assert metric(text, "dataplane_worker_up", worker=f"rx{tag}") == 1
        assert not Path(f"/var/run/dpdk/dp-rx{tag}-{old_pid}").exists()


INJECT = r"""
import socket, sys
from scapy.layers.l2 import Ether, Dot1Q, Dot1AD
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
dst, src = "02:77:00:00:00:02", "02:77:00:00:00:01"
eth = Ether(dst=dst, src=src)
ip4 = bytes(eth / IP(src="10.77.0.1", dst="10.77.0.2") / UDP(sport=7, dport=9) / (b"x" * 40))
malformed = [
    bytes(Ether(dst=dst, src=src, type=0x0800)),                       # runt: no IPv4 header
    ip4[:14] + bytes([0x43]) + ip4[15:],                               # IHL 3 < 5
    bytes(eth / IPv6(src="fd00::1", dst="fd00::2", nh=60)) + bytes([17, 200]) + b"\0" * 14,
    bytes(eth / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / Dot1Q(vlan=4) / Dot1Q(vlan=5)
          / IP(src="10.77.0.1", dst="10.77.0.2") / UDP()),             # 5 tags: past our cap
]
truncated = [ip4[:16] + (1400).to_bytes(2, "big") + ip4[18:]]          # total length > frame
valid = [
    bytes(eth / Dot1AD(vlan=10) / Dot1Q(vlan=20) / IP(src="10.77.0.1", dst="10.77.0.2")
          / UDP(sport=5, dport=9) / (b"q" * 30)),                      # QinQ
    bytes(eth / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrDestOpt() / UDP() / b"v6"),
]
n = int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for _ in range(n):
    for f in malformed + truncated + valid:
        s.send(f.ljust(60, b"\0") if len(f) >= 14 else f)
print(len(malformed) * n, len(truncated) * n, len(valid) * n)
"""


def test_malformed_frames_counted_and_dropped_worker_survives() -> None:
    tag = f"{os.getpid() % 10000}m"
    cfg = lab_config(tag, gen=False, rx_driver="af_packet")
    with Run(cfg, io.StringIO()) as r:
        r.start()
        rx = r.sup.workers[f"rx{tag}"]
        ring = rx.arena.rings[0]
        sent = subprocess.run(["ip", "netns", "exec", f"dpe-{tag}-g", sys.executable, "-c",
                               INJECT, f"dpe{tag}g", "20"],
                              capture_output=True, text=True, check=True)
        n_bad, n_trunc, n_good = map(int, sent.stdout.split())
        _wait(lambda: ring.counter("malformed") >= n_bad, f"{n_bad} malformed counted")
        time.sleep(0.3)
        assert ring.counter("malformed") == n_bad
        assert rx.arena.worker_state() == "running" and rx.proc.poll() is None
        assert ring.counter("truncated") == n_trunc
        assert ring.counter("rx_packets") >= n_bad + n_trunc + n_good
        text = scrape(r.metrics.address)
        assert metric(text, "dataplane_malformed_packets_total", worker=f"rx{tag}") == n_bad
        # the valid stacked frames were parsed through their tags: inner IPv4 and IPv6 counted
        assert metric(text, "dataplane_consumer_ethertype_packets_total", worker=f"rx{tag}",
                      ethertype="ipv6") >= n_good // 2


@pytest.mark.parametrize("rx_driver", ["af_xdp", "af_packet"])
def test_frozen_receiver_losses_are_counted(rx_driver: str) -> None:
    """A receiver stopped for a second under load: the kernel socket drops what it cannot hold
    (DPDK 22.11 reports none of it); every lost sequence number must be in nic_missed."""
    tag = f"{os.getpid() % 10000}{rx_driver[3]}f"
    cfg = lab_config(tag, rate=20000, rx_driver=rx_driver)
    with Run(cfg, io.StringIO()) as r:
        r.start()
        rx = r.sup.workers[f"rx{tag}"]
        _wait(lambda: rx.arena.rings[0].counter("rx_packets") > 2000, "traffic")
        os.kill(rx.proc.pid, signal.SIGSTOP)
        time.sleep(1.0)
        os.kill(rx.proc.pid, signal.SIGCONT)
        time.sleep(0.5)
        res = r.finish()
    s = next(iter(res.streams.values()))
    assert s["missing"] > 1000, "the freeze lost nothing: the test did not test anything"
    assert res.totals.nic_missed >= s["missing"], r.report(res)
    assert res.ok, r.report(res)


def test_two_queues_af_packet_spread_flows_and_account_everything() -> None:
    """queues = 2: two rings, filled by the PMD's fanout; the generator varies the source
    port, so both rings see traffic, and together they account for every packet."""
    tag = f"{os.getpid() % 10000}q"
    cfg = lab_config(tag, count=4000, rate=10000, rx_driver="af_packet")
    rxw = next(w for w in cfg.workers if w.name == f"rx{tag}")
    rxw.ports[0].queues = 2
    with Run(cfg, io.StringIO()) as r:
        r.start()
        rx, gen = r.sup.workers[f"rx{tag}"], r.sup.workers[f"gen{tag}"]
        assert [(ring.port, ring.queue) for ring in rx.arena.rings] == [(0, 0), (0, 1)]
        _wait(lambda: gen.arena.port_counters[0][0] >= 4000, "4000 sent")
        res = r.finish()
        per_ring = [ring.counter("rx_packets") for ring in rx.arena.rings]
        # fewer packets than a ring holds: every descriptor is still in its ring's memory
        hashes = [set(ring.desc["hash"][:n].tolist()) for ring, n in zip(rx.arena.rings,
                                                                        per_ring, strict=True)]
    assert min(per_ring) > 0, f"one queue got nothing: {per_ring}"
    assert not hashes[0] & hashes[1], "a flow was split across queues"
    s = next(iter(res.streams.values()))
    assert s["duplicates"] == 0 and s["missing"] <= res.totals.drops, r.report(res)
    assert res.ok


def test_sigterm_stops_cleanly_and_leaves_nothing() -> None:
    """`dataplane run` with no duration, stopped by SIGTERM as systemd would."""
    tag = f"{os.getpid() % 10000}t"
    path = Path(f"/tmp/dpe-{tag}.toml")
    path.write_text(default_text(tag))
    try:
        # --progress: the line a second is printed on a pipe too (only a terminal gets it
        # by default); two of them say the run is up
        p = subprocess.Popen([str(Path(sys.executable).parent / "dataplane"), "run", "--config",
                              str(path), "--progress"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        lines = []
        for line in p.stdout:
            lines.append(line)
            if sum(ln.startswith("[") for ln in lines) >= 2:
                break
        workers = subprocess.run(["pgrep", "-f", f"dataplane.workers.process.*(gen|rx){tag}"],
                                 capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, lines
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        # exit 0 means the books balanced: every seq received or counted as a drop (under
        # load the kernel socket may drop some during shutdown; they are counted, not lost)
        assert p.returncode == 0, "".join(lines) + out + err[-2000:]
        assert "PROBLEM" not in out and "received" in out, out
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the run"
            assert not any(Path("/var/run/dpdk").glob(f"*-{pid}")), "EAL runtime dir left"
        assert f"dpe-{tag}" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                  text=True).stdout
        assert not Path(f"/dev/shm/dataplane-rx{tag}").exists()
        assert not Path(f"/dev/shm/dataplane-gen{tag}").exists()
    finally:
        path.unlink(missing_ok=True)


def test_lab_with_transport_ships_the_receivers_ring_across_the_veth(tmp_path: Path) -> None:
    """The rx worker's ring is shipped by a sender in dp-rx over TCP to a receiver in dp-gen:
    the local consumers see the packets as the remote port "from-rx", and every generated
    sequence number arrives there (or is counted lost)."""
    tag = f"{os.getpid() % 10000}x"
    cfg = lab_config(tag, count=5000, rate=10000, rx_driver="af_packet")
    ship_rx_ring(cfg, tag, tmp_path / "link.key")
    with Run(cfg, io.StringIO()) as r:
        r.start()
        gen = r.sup.workers[f"gen{tag}"]
        _wait(lambda: gen.arena.port_counters[0][0] >= 5000, "5000 sent")
        res = r.finish()
        text = scrape(r.metrics.address)
    s = next(iter(res.streams.values()))
    assert s["duplicates"] == 0 and s["unique"] > 0, r.report(res)
    assert s["missing"] <= res.totals.drops, r.report(res)
    assert metric(text, "dataplane_rx_packets_total", worker=f"col{tag}", port="from-rx") > 0
    assert metric(text, "dataplane_transport_batches_total", transport=f"ship{tag}") > 0
    assert "dataplane_transport_zero_copy_effective" in text
