"""The io_uring worker's ingest (multishot receive straight into arena slots, descriptors on a
ring drained by a Python thread) against two plain C receivers on the same veth traffic:
perf/recvmmsg_rx.c (AF_PACKET + recvmmsg into private buffers) and perf/tpacket_rx.c
(AF_PACKET TPACKET_V3 mapped ring).  Built here with gcc -O2 into perf/out/.

A benchmark, not a test: it never asserts a speed.  Human-readable lines first; the last line
is one JSON object.  Root (netns, veth):
    .venv/bin/python perf/ingest_vs_recvmmsg.py --seconds 5 --rounds 3

Traffic: the uring worker's generator (66 B UDP frames, the smallest that carries the trailer,
as fast as the port takes them) in one namespace; each receiver in turn in the other,
alternating A, B, C, A, B, C so drift hits all; medians reported.  pps = packets the receiver
got / seconds; cpu_ns_per_pkt = the receiver process's user+system CPU time / packets
(/proc/PID/stat for the worker and its Python consumer, getrusage for the C programs).  The
veth's kernel work happens mostly on the sender's core (docs/design.md, known limits), in
softirq: TPACKET_V3's copy into its mapped ring runs there, recvmmsg's and io_uring's copy in
the receiver's own system time.  So cpu_ns_per_pkt_with_softirq adds both cores' softirq time
(/proc/stat) over the same seconds, per packet: the kernel's work on both sides, counted for
every receiver alike (the veth's own share is the same in each).  The Python consumer runs on
the receiver's core, as the worker does.  The generator's core is saturated, so what a
receiver costs the kernel there lowers the offered rate: pps tells that apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from consumer_ceiling import machine  # perf/ is sys.path[0] when this script is run

from dataplane.config import templates as template
from dataplane.shm.arena import Arena
from dataplane.workers.spec import GenSpec, PortSpec, WorkerSpec

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "perf" / "out"
TICK = os.sysconf("SC_CLK_TCK")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def build() -> None:
    OUT.mkdir(exist_ok=True)
    for name in ("recvmmsg_rx", "tpacket_rx"):
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(OUT / name),
                        str(REPO / "perf" / f"{name}.c")], check=True)


def start_worker(spec: WorkerSpec, ns: str) -> tuple[subprocess.Popen, Arena]:
    arena = Arena.create(Path(spec.arena_path), spec.geometry())
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
    "dataplane.workers.process",
                             spec.to_json()], cwd=REPO)
    deadline = time.monotonic() + 20
    while arena.worker_state() != "running":
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{spec.name}: {arena.worker_error()}")
        time.sleep(0.02)
    return proc, arena


def stop_worker(proc: subprocess.Popen, arena: Arena) -> None:
    arena.request_stop()
    proc.wait(timeout=20)
    arena.close()
    arena.unlink()


def cpu_ns(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) * 1_000_000_000 // TICK   # utime + stime


def softirq_ns() -> int:
    """Softirq time of every CPU so far (/proc/stat's 7th column of the `cpu` line)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(f[7]) * 1_000_000_000 // TICK


def run_uring(ns: str, iface: str, seconds: float, cpu: int | None) -> dict:
    uid = uuid.uuid4().hex[:8]
    spec = WorkerSpec(name=f"bu{uid}", worker_id=1, backend="uring", core=cpu, pool_mb=0,
                      arena_path=f"/dev/shm/bench-uring-{uid}", idle_sleep_us=50,
                      ports=[PortSpec("in", iface=iface)])
    proc, arena = start_worker(spec, ns)
    stop = threading.Event()

    def drain() -> None:   # the consumer: whole batches, released at once, on the worker's core
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})      # this thread only
        while not stop.is_set():
            n = sum(len(b) for r in arena.rings for b in r.batches())
            if n == 0:
                time.sleep(0.0005)

    t = threading.Thread(target=drain)
    t.start()
    me = os.getpid()
    c0, p0 = cpu_ns(proc.pid) + cpu_ns(me), arena.rings[0].counter("rx_packets")
    s0 = softirq_ns()
    time.sleep(seconds)
    c1, p1 = cpu_ns(proc.pid) + cpu_ns(me), arena.rings[0].counter("rx_packets")
    s1 = softirq_ns()
    stop.set()
    t.join()
    enobufs = int(arena.uring_counters[0][1])
    stop_worker(proc, arena)
    return {"packets": p1 - p0, "cpu_ns": c1 - c0, "softirq_ns": s1 - s0, "enobufs": enobufs}


def run_c(prog: str, ns: str, iface: str, seconds: float, cpu: int | None) -> dict:
    cmd = ["ip", "netns", "exec", ns, str(OUT / prog), iface, str(seconds)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    s0 = softirq_ns()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return {"packets": int(out[1]), "cpu_ns": int(out[5]), "softirq_ns": softirq_ns() - s0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-cpu", type=int, default=0)
    ap.add_argument("--rx-cpu", type=int, default=1)
    args = ap.parse_args()
    build()
    uid = uuid.uuid4().hex[:6]
    ns_a, ns_b, if_a, if_b = f"bia{uid}", f"bib{uid}", f"bia{uid}", f"bib{uid}"
    results: dict[str, list[dict]] = {"uring": [], "recvmmsg": [], "tpacket_v3": []}
    gen = None
    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, ifn in ((ns_a, if_a), (ns_b, if_b)):
            ip("-n", ns, "link", "set", ifn, "up")
        t = template.build(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02",
                           src="10.99.0.1", dst="10.99.0.2", proto="udp", sport=1000, dport=9,
                           size=66, vlan=(), vary="sport")   # smallest UDP frame + trailer
        gspec = WorkerSpec(name=f"bg{uid}", worker_id=0, backend="uring", core=args.gen_cpu,
                           pool_mb=0, arena_path=f"/dev/shm/bench-gen-{uid}",
                           ports=[PortSpec("out", iface=if_a)],
                           gen=GenSpec(rate_pps=0, burst=64, template=t.frame.hex(),
                                       vary_off=t.vary_off, vary_min=1000, vary_max=1999))
        gen = start_worker(gspec, ns_a)
        time.sleep(0.5)
        runners = {"uring": lambda: run_uring(ns_b, if_b, args.seconds, args.rx_cpu),
                   "recvmmsg": lambda: run_c("recvmmsg_rx", ns_b, if_b, args.seconds, args.rx_cpu),
                   "tpacket_v3": lambda: run_c("tpacket_rx", ns_b, if_b, args.seconds,
                                               args.rx_cpu)}
        for r in range(args.rounds):
            for name, fn in runners.items():
                res = fn()
                res["pps"] = res["packets"] / args.seconds
                res["cpu_ns_per_pkt"] = res["cpu_ns"] / max(res["packets"], 1)
                res["cpu_ns_per_pkt_with_softirq"] = (res["cpu_ns"] + res["softirq_ns"]) / \
                    max(res["packets"], 1)
                results[name].append(res)
                print(f"round {r} {name:10s} {res['pps'] / 1e3:8.1f} kpps  "
                      f"{res['cpu_ns_per_pkt']:7.1f} ns CPU/pkt, "
                      f"{res['cpu_ns_per_pkt_with_softirq']:7.1f} with softirq", flush=True)
    finally:
        if gen is not None:
            stop_worker(*gen)
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    keys = ("pps", "cpu_ns_per_pkt", "cpu_ns_per_pkt_with_softirq")
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in keys}
               for name, rs in results.items() if rs}
    for name, s in summary.items():
        print(f"median {name:10s} {s['pps'] / 1e3:8.1f} kpps  {s['cpu_ns_per_pkt']:7.1f} ns/pkt"
              f"  {s['cpu_ns_per_pkt_with_softirq']:7.1f} with softirq")
    best = max(("recvmmsg", "tpacket_v3"), key=lambda n: summary[n]["pps"])
    u, b = summary["uring"], summary[best]
    verdict = {"best_baseline": best, "pps_ratio": round(u["pps"] / b["pps"], 3),
               "cpu_with_softirq_ratio": round(u["cpu_ns_per_pkt_with_softirq"] /
                                               b["cpu_ns_per_pkt_with_softirq"], 3)}
    verdict["target_met"] = verdict["pps_ratio"] >= 1.0 and verdict["cpu_with_softirq_ratio"] < 1
    print(f"io_uring / {best}: pps {verdict['pps_ratio']}x, CPU per packet (with softirq) "
          f"{verdict['cpu_with_softirq_ratio']}x")
    print(json.dumps({"benchmark": "ingest_vs_recvmmsg", "machine": machine(),
                      "seconds": args.seconds, "rounds": args.rounds, "frame_bytes": 66,
                      "summary": summary, "vs_best": verdict, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
