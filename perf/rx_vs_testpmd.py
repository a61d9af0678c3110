"""The project's RX path (DPDK worker -> arena ring -> Python consumer) against
`dpdk-testpmd --forward-mode=rxonly` on the same PMD, with the same offered traffic, in one run.

A benchmark, not a test: it never asserts a speed.  Human-readable lines first; the last line
is one JSON object with the figures.
    .venv/bin/python perf/rx_vs_testpmd.py                 # both sections, about 2.5 minutes
    .venv/bin/python perf/rx_vs_testpmd.py --only memif --seconds 5 --rounds 3

Sections:
  memif    testpmd txonly (64 B) is the memif server on CPU 0; the receiver is the memif client
           on CPU 1.  No kernel in the path: this is the receivers' own ceiling, unless the
           generator is slower than both (then both read the generator's rate: see the
           empty-burst %).
  af_xdp   a veth pair across two namespaces made for the run; testpmd txonly on net_af_packet
           in one, the receiver on net_af_xdp in the other.  The sender's core also does the
           kernel's veth/XDP work, so rates sit near 0.3-0.6 Mpps and swing +-30%.

Receivers, alternated A, B, A, B (--rounds pairs) so drift hits both; medians are reported:
  testpmd    rxonly, --record-core-cycles: rate from its per-second Rx-pps, and its CPU cycles
             per packet, counted over non-empty bursts only.
  dataplane  `python -m dataplane.workers.process` (busy poll, burst 32, zero copy into the arena)
  and a
             Python ConsumerLoop thread of this process draining the ring.  Rate from the
             arena's rx_packets (delivered into the ring); cycles per packet = busy_cycles
             (loop iterations that moved packets) / rx_packets, the closest match to testpmd's.
The Python consumer thread runs on the receiver's core by default (--consumer-cpu): with 2 cores
it must share with the generator or the worker, and on the generator's core it would lower the
offered load of one receiver only.  It runs SCHED_FIFO (--consumer-sched): it naps 0.5 ms when
the ring is empty, and as SCHED_OTHER it then waits behind the busy-polling worker's time slice
while the ring overflows.  Its CPU share is reported; it preempts the worker inside iterations
that count as busy, so cycles/pkt is also given with the consumer's CPU time taken out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from consumer_ceiling import machine  # perf/ is sys.path[0] when this script is run

from dataplane.consumers.loop import ConsumerLoop, ring_sources
from dataplane.consumers.stats import TrafficStats
from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.layout import PORT_COUNTERS
from dataplane.workers.spec import PortSpec, WorkerSpec

REPO = Path(__file__).resolve().parent.parent
TESTPMD = "/usr/bin/dpdk-testpmd"
RUN_DIR = Path("/run/dpbench")
TAG = f"dpb{os.getpid()}"
BURST = 32       # testpmd's default RX burst; the worker is given the same
RXD = 1024
_phase_ids = itertools.count()   # unique names for each phase's EAL prefix and arena


class Lab:
    """Everything the run creates, undone in reverse order by close(), also after Ctrl-C."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def on_close(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def close(self) -> None:
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:   # one failed undo must not leave the rest behind
                print(f"cleanup: {type(e).__name__}: {e}", file=sys.stderr)


def stop_proc(p: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15) -> None:
    """Ask nicely (testpmd prints its final statistics on SIGINT), then kill."""
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def in_ns(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Testpmd:
    """One dpdk-testpmd, pinned to one CPU (both its lcores), output read line by line."""

    def __init__(self, lab: Lab, name: str, cpu: int, vdev: str, mode: str,
                 netns: str | None = None):
        prefix = f"{TAG}-{name}"
        lab.on_close(lambda: shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True))
        # taskset: EAL's control threads (memif socket, interrupts) stay on this CPU too;
        # stdbuf: line-buffered stdout, so each per-second sample is timestamped when printed
        cmd = [*in_ns(netns), "taskset", "-c", str(cpu), "stdbuf", "-oL", TESTPMD,
               "--lcores", f"0@{cpu},1@{cpu}", "--no-huge", "-m", "512", "--no-pci",
               "--file-prefix", prefix, "--no-telemetry", "--vdev", vdev, "--",
               f"--forward-mode={mode}", "--stats-period", "1", "--total-num-mbufs", "32768",
               f"--burst={BURST}", f"--rxd={RXD}", f"--txd={RXD}", "--txpkts=64",
               "--record-core-cycles", "--record-burst-stats"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        lab.on_close(lambda: stop_proc(self.proc))
        self.lines: list[str] = []
        self.samples: list[tuple[float, float, float]] = []   # (time, Rx-pps, Tx-pps)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        rx = 0.0
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"Rx-pps:\s+(\d+)", line):
                rx = float(m[1])
            elif m := re.search(r"Tx-pps:\s+(\d+)", line):
                self.samples.append((time.monotonic(), rx, float(m[1])))

    def tx_pps(self, t0: float, t1: float) -> float:
        """Mean Tx-pps over the samples printed within [t0, t1] (the generator's offered rate)."""
        got = [tx for t, _, tx in self.samples if t0 < t <= t1]
        return statistics.fmean(got) if got else 0.0

    def finish(self) -> str:
        stop_proc(self.proc)
        self.reader.join(5)
        return "".join(self.lines)


def testpmd_phase(lab: Lab, args: argparse.Namespace, vdev: str, netns: str | None,
                  gen: Testpmd) -> dict:
    rx = Testpmd(lab, f"rx{next(_phase_ids)}", args.rx_cpu, vdev, "rxonly", netns)
    deadline = time.monotonic() + 30 + args.warmup + args.seconds
    # per-second samples from the first one with traffic; the first args.warmup are skipped
    while time.monotonic() < deadline and rx.proc.poll() is None:
        live = [s for s in rx.samples if s[1] > 0]
        if live and len(rx.samples) - rx.samples.index(live[0]) >= args.warmup + args.seconds:
            break
        time.sleep(0.1)
    start = next((i for i, s in enumerate(rx.samples) if s[1] > 0), len(rx.samples))
    window = rx.samples[start + args.warmup:start + args.warmup + args.seconds]
    out = rx.finish()
    if not window:
        raise SystemExit(f"testpmd rxonly got no traffic; its output ends:\n{out[-2000:]}")
    cyc = re.search(r"CPU cycles/packet=([\d.]+)", out)
    empty = re.search(r"RX-bursts : \d+ \[(\d+)% of 0 pkts", out)
    t0, t1 = window[0][0] - 1, window[-1][0]
    return {"mpps": statistics.fmean(s[1] for s in window) / 1e6,
            "cycles_per_pkt": float(cyc[1]) if cyc else None,
            "empty_burst_pct": int(empty[1]) if empty else 0,
            "offered_mpps": gen.tx_pps(t0, t1) / 1e6}


def consumer_cpu_s(t: threading.Thread) -> float:
    """CPU seconds the consumer thread has used so far (its own thread clock)."""
    assert t.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


def dataplane_phase(lab: Lab, args: argparse.Namespace, port: PortSpec, netns: str | None,
                    gen: Testpmd) -> dict:
    n = next(_phase_ids)
    spec = WorkerSpec(name=f"{TAG}w{n}", worker_id=0, core=args.rx_cpu, netns=netns,
                      arena_path=f"/dev/shm/{TAG}-w{n}", ring_size=args.ring_size,
                      n_mbufs=args.ring_size + 4 * RXD - 1, pool_mb=args.ring_size // 256 + 32,
                      burst=BURST, idle_sleep_us=0, zero_copy=bool(args.zero_copy),
                      copybreak=args.copybreak,
                      eal_memory_mb=256, log_level="error", ports=[port])
    geo = ArenaGeometry(1, spec.rings(), spec.ring_size, spec.slot_size, spec.pool_mb << 20)
    arena = Arena.create(Path(spec.arena_path), geo)
    lab.on_close(arena.unlink)
    lab.on_close(arena.close)
    consumers = [TrafficStats()] if args.consumer == "stats" else []
    loop = ConsumerLoop(ring_sources([arena]), consumers, max_batch=args.ring_size)

    def consume() -> None:
        os.sched_setaffinity(0, {args.consumer_cpu})   # 0: this thread only
        if args.consumer_sched == "fifo":
            # it sleeps whenever the ring is empty, so FIFO costs the worker only what the
            # consumer uses; as SCHED_OTHER, a waking consumer waits for the busy-polling
            # worker's time slice to end, and the ring overflows meanwhile
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        loop.run()

    thread = threading.Thread(target=consume, name="dp-consumer", daemon=True)
    thread.start()
    lab.on_close(loop.stop_event.set)
    proc = subprocess.Popen([*in_ns(netns), sys.executable, "-m", "dataplane.workers.process",
                             spec.to_json()], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    # the worker removes its EAL directory on a clean stop; this covers a killed one
    lab.on_close(lambda: shutil.rmtree(f"/var/run/dpdk/dp-{spec.name}-{proc.pid}",
                                       ignore_errors=True))
    lab.on_close(lambda: stop_proc(proc, signal.SIGTERM))
    ring = arena.rings[0]
    deadline = time.monotonic() + 30
    while ring.counter("rx_packets") == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_proc(proc, signal.SIGTERM)
            raise SystemExit(f"dataplane worker got no traffic (state {arena.worker_state()}, "
                             f"exit {proc.poll()}): {arena.worker_error()} "
                             f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    time.sleep(args.warmup)
    h = arena.header

    def snap() -> tuple:
        return (time.monotonic(), ring.counter("rx_packets"), loop.descriptors, h.busy_cycles,
                h.loops, ring.counter("bursts"), ring.counter("ring_full_drops"),
                consumer_cpu_s(thread), h.total_cycles)

    s0 = snap()
    time.sleep(args.seconds)
    s1 = snap()
    arena.request_stop()
    stop_proc(proc, signal.SIGTERM, timeout=20)
    loop.stop_event.set()
    thread.join(5)
    d = [b - a for a, b in zip(s0, s1, strict=True)]
    dt, pkts, consumed, busy, loops, bursts, full, cpu, total = d
    hz = total / dt   # the loop's TSC cycles over wall time: the TSC rate
    nic = dict(zip(PORT_COUNTERS, (int(x) for x in arena.port_counters[0]), strict=False))
    return {"mpps": pkts / dt / 1e6, "python_consumed_mpps": consumed / dt / 1e6,
            # what the worker took off the port, delivered or dropped because the ring was full
            "worker_rx_mpps": (pkts + full) / dt / 1e6,
            "cycles_per_pkt": busy / max(pkts, 1),
            # the consumer preempts the worker inside busy iterations: its CPU time taken out
            "cycles_per_pkt_without_consumer": max(busy - cpu * hz, 0) / max(pkts, 1),
            "empty_burst_pct": round(100 * (1 - bursts / max(loops, 1))),
            "ring_full_drops": full, "nic_missed": nic["nic_missed"],
            "python_consumer_cpu": cpu / dt, "offered_mpps": gen.tx_pps(s0[0], s1[0]) / 1e6,
            "zero_copy": bool(h.zero_copy)}


def section(lab: Lab, args: argparse.Namespace, name: str, make_gen,
            netns: str | None) -> dict:
    """Alternate the two receivers args.rounds times; print each phase; medians out.

    Every phase gets a fresh generator with the same command line: a memif server whose client
    went away did not always serve the next client (seen: round 2 got no traffic)."""
    runs: dict[str, list[dict]] = {"testpmd": [], "dataplane": []}
    for r in range(args.rounds):
        for who in ("testpmd", "dataplane"):
            gen, tp_vdev, dp_port = make_gen()
            try:
                res = (testpmd_phase(lab, args, tp_vdev, netns, gen) if who == "testpmd"
                       else dataplane_phase(lab, args, dp_port, netns, gen))
            finally:
                gen.finish()
            runs[who].append(res)
            extra = (f", Python consumed {res['python_consumed_mpps']:.2f} Mpps using "
                     f"{100 * res['python_consumer_cpu']:.0f}% of CPU {args.consumer_cpu} "
                     f"(worker alone {res['cycles_per_pkt_without_consumer']:.0f} cycles/pkt), "
                     f"ring-full drops {res['ring_full_drops']}" if who == "dataplane" else "")
            print(f"  {name} round {r + 1} {who:9}: {res['mpps']:6.3f} Mpps, "
                  f"{res['cycles_per_pkt']:7.1f} cycles/pkt, {res['empty_burst_pct']:3d}% "
                  f"empty polls, generator sent {res['offered_mpps']:.3f} Mpps{extra}",
                  flush=True)

    def med(who: str, key: str) -> float:
        return statistics.median(float(x[key] or 0) for x in runs[who])

    tp, dp = med("testpmd", "mpps"), med("dataplane", "mpps")
    return {"testpmd_mpps": round(tp, 3), "dataplane_mpps": round(dp, 3),
            "ratio": round(dp / tp, 3) if tp else None,
            "testpmd_cycles_per_pkt": round(med("testpmd", "cycles_per_pkt"), 1),
            "dataplane_cycles_per_pkt": round(med("dataplane", "cycles_per_pkt"), 1),
            "dataplane_cycles_per_pkt_without_consumer": round(
                med("dataplane", "cycles_per_pkt_without_consumer"), 1),
            "dataplane_worker_rx_mpps": round(med("dataplane", "worker_rx_mpps"), 3),
            "python_consumed_mpps": round(med("dataplane", "python_consumed_mpps"), 3),
            "python_consumer_cpu_frac": round(med("dataplane", "python_consumer_cpu"), 3),
            "testpmd_empty_poll_pct": med("testpmd", "empty_burst_pct"),
            "dataplane_empty_poll_pct": med("dataplane", "empty_burst_pct"),
            "offered_mpps": round(statistics.median(
                x["offered_mpps"] for v in runs.values() for x in v), 3),
            "runs": runs}


def memif(lab: Lab, args: argparse.Namespace) -> dict:
    RUN_DIR.mkdir(exist_ok=True)
    sock = RUN_DIR / f"{TAG}-memif.sock"
    lab.on_close(lambda: sock.unlink(missing_ok=True))

    def make_gen() -> tuple[Testpmd, str, PortSpec]:
        # a socket path of its own per phase: reusing one across short-lived servers and
        # clients left a client connected to nothing (no traffic, seen in both directions)
        n = next(_phase_ids)
        path = sock.with_name(f"{sock.stem}-{n}.sock")
        lab.on_close(lambda: path.unlink(missing_ok=True))
        dev = f"socket={path},socket-abstract=no,id=0"
        gen = Testpmd(lab, f"gen-memif{n}", args.gen_cpu, f"net_memif0,role=server,{dev}",
                      "txonly")
        deadline = time.monotonic() + 30
        # the socket file appears before the server has registered its interface: a client
        # connecting in between is told "ID not found" and never retries; testpmd's
        # "start packet forwarding" comes after the registration
        while not (path.exists() and any("start packet forwarding" in ln
                                         for ln in gen.lines)):
            if gen.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"memif generator did not start: {gen.finish()[-2000:]}")
            time.sleep(0.05)
        client = f"net_memif0,role=client,{dev}"
        return gen, client, PortSpec("net_memif0", client)

    return section(lab, args, "memif", make_gen, None)


def af_xdp(lab: Lab, args: argparse.Namespace) -> dict:
    ns_a, ns_b, if_a, if_b = f"{TAG}-a", f"{TAG}-b", f"{TAG}a", f"{TAG}b"
    for ns in (ns_a, ns_b):
        ip("netns", "add", ns)
        # deleting a namespace deletes its veth end, and with it the pair
        lab.on_close(lambda ns=ns: subprocess.run(["ip", "netns", "del", ns], check=False))
    ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    for ns, ifn in ((ns_a, if_a), (ns_b, if_b)):
        # no IPv6 chatter (router solicitations, MLD) among the frames counted
        subprocess.run([*in_ns(ns), "sysctl", "-qw", f"net.ipv6.conf.{ifn}.disable_ipv6=1"],
                       check=True)
        ip("-n", ns, "link", "set", ifn, "up")
    vdev = f"net_af_xdp0,iface={if_b},start_queue=0,queue_count=1"

    def make_gen() -> tuple[Testpmd, str, PortSpec]:
        gen = Testpmd(lab, f"gen-afp{next(_phase_ids)}", args.gen_cpu,
                      f"net_af_packet0,iface={if_a}", "txonly", ns_a)
        return gen, vdev, PortSpec("net_af_xdp0", vdev)

    return section(lab, args, "af_xdp", make_gen, ns_b)


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6, help="measured seconds per phase")
    ap.add_argument("--warmup", type=int, default=2, help="seconds skipped at each phase start")
    ap.add_argument("--rounds", type=int, default=2, help="testpmd/dataplane pairs per section")
    ap.add_argument("--only", choices=("memif", "af_xdp"), help="run one section")
    ap.add_argument("--consumer", choices=("stats", "count"), default="stats",
                    help="stats: TrafficStats (protocol mix, sizes, flows) on every batch; "
                         "count: peek and release only")
    ap.add_argument("--ring-size", type=int, default=16384,
                    help="descriptors; large, so a consumer descheduled for a few ms by the "
                         "busy-polling worker on its core does not drop")
    ap.add_argument("--consumer-sched", choices=("fifo", "other"), default="fifo",
                    help="scheduling class of the consumer thread (default fifo: it preempts "
                         "the busy-polling worker on its core as soon as it wakes)")
    ap.add_argument("--copybreak", type=int, default=256,
                    help="with zero copy, frames of at most this many bytes are copied into their "
                         "ring slot and the mbuf recycled at once (the config default, 256); 0: "
                         "every frame stays in its mbuf until the consumer releases it")
    ap.add_argument("--zero-copy", type=int, choices=(0, 1), default=1,
                    help="1: descriptors point at the PMD's mbufs in the arena pool; "
                         "0: the worker copies each frame into a ring slot")
    ap.add_argument("--gen-cpu", type=int, default=0, help="CPU of the generator")
    ap.add_argument("--rx-cpu", type=int, default=1, help="CPU of the receiver under test")
    ap.add_argument("--consumer-cpu", type=int, default=1,
                    help="CPU of the Python consumer thread (default: the receiver's)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root: DPDK vdevs, veth and network namespaces")
    # this process (main thread, testpmd readers) sits with the generator: it mostly sleeps
    os.sched_setaffinity(0, {args.gen_cpu})
    signal.signal(signal.SIGTERM, interrupted)   # cleaned up like Ctrl-C
    m = machine() | {"loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    print(f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
          f"load average {m['loadavg_1m_at_start']:.2f} at start")
    print(f"generator: dpdk-testpmd txonly 64 B on CPU {args.gen_cpu}; receivers on CPU "
          f"{args.rx_cpu}; Python consumer ({args.consumer}) on CPU {args.consumer_cpu}; "
          f"{args.rounds} x (testpmd, dataplane), {args.warmup}+{args.seconds} s each")
    out: dict = {"benchmark": "rx_vs_testpmd"}
    for name, fn in (("memif", memif), ("af_xdp_veth", af_xdp)):
        if args.only and not name.startswith(args.only):
            continue
        lab = Lab()
        try:
            out[name] = fn(lab, args)
        finally:
            lab.close()
    print(f"{'section':12} {'testpmd Mpps':>12} {'dataplane':>10} {'ratio':>6} "
          f"{'tp cyc/pkt':>10} {'dp cyc/pkt':>10} {'py Mpps':>8} {'py CPU':>6}")
    for name in ("memif", "af_xdp_veth"):
        if name in out:
            s = out[name]
            print(f"{name:12} {s['testpmd_mpps']:12.3f} {s['dataplane_mpps']:10.3f} "
                  f"{s['ratio']:6.3f} {s['testpmd_cycles_per_pkt']:10.1f} "
                  f"{s['dataplane_cycles_per_pkt']:10.1f} {s['python_consumed_mpps']:8.3f} "
                  f"{100 * s['python_consumer_cpu_frac']:5.0f}%")
    out["machine"] = m
    out["settings"] = vars(args) | {
        "burst": BURST, "rxd": RXD, "pkt_len": 64, "generator": "dpdk-testpmd txonly",
        "cycles": "busy: testpmd counts non-empty bursts, the worker iterations that moved "
                  "packets"}
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
