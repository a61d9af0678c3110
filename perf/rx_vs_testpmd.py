"""Each receiver on ONE core: `dpdk-testpmd --forward-mode=rxonly` against the project's RX
path (DPDK worker -> arena ring -> Python TrafficStats consumer, both on that core), fed by the
same rate-controlled generator on the other core.

A benchmark, not a test: it never asserts a speed.  Human-readable lines first; the last line
is one JSON object with the figures.
    .venv/bin/python perf/rx_vs_testpmd.py                          # both sections, ~10 min
    .venv/bin/python perf/rx_vs_testpmd.py --only memif --seconds 2 --rounds 2

The generator is the project's DPDK worker with a [worker.generate] table (66-byte UDP frames,
1000 flows, a token bucket): testpmd's txonly cannot be paced.  Every trial starts a fresh
receiver and a fresh generator that sends rate x --seconds frames (after a warm-up) at the asked
rate, and passes when nothing was lost anywhere (perf/rx_receivers.py says which counters and
what the warm-up leaves out).

Per section and round (--rounds, receivers alternated, medians and min-max reported):
  generator max   one unpaced trial into testpmd: what the generator hands over as fast as it
                  goes (its ceiling, or testpmd's if testpmd refused frames); the search's top
  zero loss       perf/rfc2544.py's search() per receiver: the highest rate with no loss.  When
                  the top passes, the generator capped that receiver and no ratio is given.
  cycles/packet   trials at fixed rates (--memif-rates, --xdp-rates, in Mpps, and the generator's
                  maximum; rates the generator cannot reach are left out and said so):
                  testpmd's --record-core-cycles (non-empty bursts) against the worker's busy
                  cycles (iterations that moved packets, without the FIFO consumer's preemption)
                  and the whole path's (worker + consumer CPU), per packet received.
Sections:
  memif    the receiver is the memif client, the generator the server (as tests/test_dpdk_worker.py
           pairs them; the other way round testpmd received nothing and the client generator was
           refused most frames).  Rings of 2^--memif-rsize slots for both receivers.  No kernel in
           the path.
  af_xdp   a veth pair across two namespaces made for the run (and always removed): the
           generator on net_af_packet in one, the receiver on net_af_xdp in the other.  The
           generator's core also does the kernel's veth/XDP work, so it is the limit there.
The QEMU guest's PCI NIC is not measured yet (left out for time; on this 2-core host the
guest's vCPUs would also share the cores with the generator and the receiver under test).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from consumer_ceiling import machine  # perf/ is sys.path[0] when this script is run
from rfc2544 import search
from rx_receivers import BURST, FRAME, RXD, TAG, Lab, Where, in_ns, trial

from dataplane.workers.spec import PortSpec

RUN_DIR = Path("/run/dpbench")
WHO = ("testpmd", "dataplane")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def memif_where(lab: Lab, args: argparse.Namespace) -> Where:
    RUN_DIR.mkdir(exist_ok=True)

    def dev(uid: int) -> str:
        # a socket of its own per trial: one reused across short-lived servers and clients
        # left a client connected to nothing
        path = RUN_DIR / f"{TAG}-{uid}.sock"
        lab.on_close(lambda: path.unlink(missing_ok=True))
        return f"socket={path},socket-abstract=no,id=0,rsize={args.memif_rsize}"
    # the receiver is the client, the generator the server (as tests/test_dpdk_worker.py pairs
    # them): with the roles swapped testpmd received nothing and the client generator's port
    # refused most frames
    return Where("memif", lambda u: PortSpec("net_memif0", f"net_memif0,role=client,{dev(u)}"),
                 lambda u: PortSpec("net_memif0", f"net_memif0,role=server,{dev(u)}"),
                 None, None, args.rx_cpu, args.gen_cpu, 1 << args.memif_rsize)


def af_xdp_where(lab: Lab, args: argparse.Namespace) -> Where:
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
    rx = f"net_af_xdp0,iface={if_b},start_queue=0,queue_count=1"
    return Where("af_xdp", lambda u: PortSpec("net_af_xdp0", rx),
                 lambda u: PortSpec("net_af_packet0", f"net_af_packet0,iface={if_a}"),
                 ns_b, ns_a, args.rx_cpu, args.gen_cpu, gen_first=False)


def show(label: str, t) -> None:
    d = t.detail
    extra = (f", consumer {100 * d['consumer_cpu_frac']:.0f}% CPU, worker "
             f"{d['worker_cycles_per_pkt']:.0f} + consumer {d['consumer_cycles_per_pkt']:.0f}"
             if "consumer_cpu_frac" in d else "")
    print(f"    {label:34} offered {t.offered / 1e6:7.3f} Mpps  "
          f"{'pass' if t.passed else 'LOSS'} (lost {t.lost}, attempts refused "
          f"{d['gen_drops']}, receiver drops {d['rx_drops']})  "
          f"{d['path_cycles_per_pkt']:6.1f} cycles/pkt{extra}, {d['empty_poll_pct']:.0f}% "
          f"empty polls, preempted {d.get('preempted', 0)}x", flush=True)


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


def section(where: Where, lab: Lab, args: argparse.Namespace, rates_mpps: list[float],
            probe_pps: float) -> dict:
    """args.rounds rounds of: the generator's maximum, both searches, the fixed rates."""
    rounds: list[dict] = []
    skipped: set[float] = set()
    for r in range(args.rounds):
        order = WHO if r % 2 == 0 else WHO[::-1]
        print(f"  {where.name} round {r + 1}", flush=True)
        probe = trial(lab, where, "testpmd", 0, args, probe_pps)
        show("generator max (unpaced) -> testpmd", probe)
        top = probe.offered
        rnd: dict = {"generator_max_pps": top, "search": {}, "fixed": {}}
        for who in order:
            def one(rate: float, who: str = who):
                t = trial(lab, where, who, rate, args, probe_pps)
                show(f"search {who} {rate / 1e6:.3f} Mpps", t)
                return t
            rnd["search"][who] = search(one, top, resolution=args.resolution,
                                        max_trials=args.max_trials).as_dict()
        for rate in [x * 1e6 for x in rates_mpps] + [0.0]:
            if rate > 0.97 * top:
                skipped.add(rate)
                continue
            key = "max" if rate == 0 else f"{rate / 1e6:g}"
            for who in order:
                t = trial(lab, where, who, rate, args, probe_pps)
                show(f"fixed {key} {who}", t)
                rnd["fixed"].setdefault(key, {})[who] = {
                    "offered_pps": t.offered, "passed": t.passed, "lost": t.lost, **t.detail}
        rounds.append(rnd)
    return summarize(where.name, rounds, sorted(skipped))


def summarize(name: str, rounds: list[dict], skipped: list[float]) -> dict:
    out: dict = {"generator_max_pps": spread([r["generator_max_pps"] for r in rounds]),
                 "rates_left_out_pps": skipped, "zero_loss": {}, "cycles": {}, "rounds": rounds}
    for who in WHO:
        s = [r["search"][who] for r in rounds]
        out["zero_loss"][who] = spread([x["zero_loss_pps"] for x in s]) | {
            "generator_capped": any(x["generator_capped"] for x in s)}
    tp, dp = out["zero_loss"]["testpmd"], out["zero_loss"]["dataplane"]
    if tp["generator_capped"]:
        out["zero_loss"]["ratio"] = None
        out["zero_loss"]["note"] = ("testpmd kept up with the generator's maximum: its zero-loss "
                                    "rate is the generator's, not testpmd's; no ratio")
    else:
        out["zero_loss"]["ratio"] = round(dp["median"] / tp["median"], 3) if tp["median"] else None
    keys = sorted({k for r in rounds for k in r["fixed"]},
                  key=lambda k: float("inf") if k == "max" else float(k))
    for k in keys:
        row: dict = {}
        for who in WHO:
            got = [r["fixed"][k][who] for r in rounds if who in r["fixed"].get(k, {})]
            row[who] = {f: spread([g[f] for g in got]) for f in
                        ("offered_pps", "worker_cycles_per_pkt", "path_cycles_per_pkt")
                        } | {"all_passed": all(g["passed"] for g in got)}
        t = row["testpmd"]["path_cycles_per_pkt"].get("median")
        if t:
            row["worker_vs_testpmd"] = round(
                row["dataplane"]["worker_cycles_per_pkt"]["median"] / t, 2)
            row["path_vs_testpmd"] = round(
                row["dataplane"]["path_cycles_per_pkt"]["median"] / t, 2)
        out["cycles"][k] = row
    return out


def report(name: str, s: dict) -> None:
    g = s["generator_max_pps"]
    print(f"{name}: generator max {g['median'] / 1e6:.3f} Mpps "
          f"({g['min'] / 1e6:.3f}-{g['max'] / 1e6:.3f})")
    for r in s["rates_left_out_pps"]:
        print(f"  {r / 1e6:g} Mpps left out: above what the generator reaches")
    z = s["zero_loss"]
    for who in WHO:
        x = z[who]
        cap = "  (generator-capped: the receiver kept up)" if x["generator_capped"] else ""
        print(f"  zero-loss {who:9} {x['median'] / 1e6:7.3f} Mpps "
              f"({x['min'] / 1e6:.3f}-{x['max'] / 1e6:.3f}){cap}")
    print(f"  zero-loss ratio dataplane/testpmd: "
          f"{z['ratio'] if z['ratio'] is not None else z.get('note', 'n/a')}")
    print(f"  {'rate':>6} {'testpmd':>8} {'worker':>8} {'path':>8} {'worker/tp':>9} "
          f"{'path/tp':>8}   cycles/pkt, medians")
    for k, row in s["cycles"].items():
        tp, dp = row["testpmd"], row["dataplane"]
        print(f"  {k:>6} {tp['path_cycles_per_pkt'].get('median', 0):8.1f} "
              f"{dp['worker_cycles_per_pkt'].get('median', 0):8.1f} "
              f"{dp['path_cycles_per_pkt'].get('median', 0):8.1f} "
              f"{row.get('worker_vs_testpmd', 0):9.2f} {row.get('path_vs_testpmd', 0):8.2f}"
              f"{'' if dp['all_passed'] else '   (dataplane lost packets at this rate)'}")


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1, help="seconds of traffic per trial")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per section")
    ap.add_argument("--only", choices=("memif", "af_xdp"), help="run one section")
    ap.add_argument("--memif-rates", type=float, nargs="*", default=[1, 2, 4],
                    help="fixed rates (Mpps) for cycles per packet over memif")
    ap.add_argument("--xdp-rates", type=float, nargs="*", default=[0.05, 0.1, 0.15],
                    help="fixed rates (Mpps) for cycles per packet over veth + af_xdp")
    ap.add_argument("--resolution", type=float, default=0.03,
                    help="the search stops when the interval is narrower than this x the top")
    ap.add_argument("--max-trials", type=int, default=6, help="trials per search at most")
    ap.add_argument("--consumer", choices=("stats", "count"), default="stats",
                    help="stats: TrafficStats on every batch; count: peek and release only")
    ap.add_argument("--ring-size", type=int, default=65536,
                    help="descriptors; large, so a consumer that naps 1 ms when it finds "
                         "little (the consumer loop) does not let the ring overflow")
    ap.add_argument("--copybreak", type=int, default=256,
                    help="with zero copy, frames of at most this many bytes are copied into "
                         "their ring slot (the config default, 256); 0: never")
    ap.add_argument("--zero-copy", type=int, choices=(0, 1), default=1,
                    help="1: descriptors point at the PMD's mbufs in the arena pool; "
                         "0: the worker copies each frame into a ring slot")
    ap.add_argument("--memif-rsize", type=int, default=14,
                    help="log2 of the memif rings' size, both receivers alike (14, the PMD's "
                         "largest: the dataplane's worker shares its core with the consumer, "
                         "and the ring covers the time it waits)")
    ap.add_argument("--gen-cpu", type=int, default=0, help="CPU of the generator")
    ap.add_argument("--rx-cpu", type=int, default=1,
                    help="CPU of the receiver under test (and of the dataplane's consumer)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root: DPDK vdevs, veth and network namespaces")
    # this process (the trials' control, testpmd's reader) sits with the generator: it sleeps
    os.sched_setaffinity(0, {args.gen_cpu})
    signal.signal(signal.SIGTERM, interrupted)   # cleaned up like Ctrl-C
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
          f"load average {m['loadavg_1m']:.2f} at start")
    print(f"generator: the dataplane DPDK worker, {FRAME} B UDP, on CPU {args.gen_cpu}; "
          f"receiver (and the dataplane's Python consumer, {args.consumer}) on CPU "
          f"{args.rx_cpu}; {args.rounds} rounds of {args.seconds:g} s trials", flush=True)
    out: dict = {"benchmark": "rx_vs_testpmd"}
    sections = (("memif", memif_where, args.memif_rates, 8e6),
                ("af_xdp_veth", af_xdp_where, args.xdp_rates, 0.4e6))
    for name, make, rates, probe in sections:
        if args.only and not name.startswith(args.only):
            continue
        lab = Lab()
        try:
            out[name] = section(make(lab, args), lab, args, rates, probe)
        finally:
            lab.close()
    for name, _, _, _ in sections:
        if name in out:
            report(name, out[name])
    out["machine"] = m | {"loadavg_1m_at_end": os.getloadavg()[0]}
    out["settings"] = vars(args) | {"burst": BURST, "rxd": RXD, "frame": FRAME,
                                    "generator": "dataplane DPDK worker [worker.generate]"}
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
