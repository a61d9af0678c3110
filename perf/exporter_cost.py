"""What the exporter costs: the zero-loss rate of a lab of 8 workers without scrapes against
the same with /metrics scraped at 10 Hz, and how long each scrape takes.

A benchmark, not a test.  Human-readable lines first; the last line is one JSON object.
    sudo .venv/bin/python perf/exporter_cost.py [--seconds 4] [--repeat 1] [--hz 10]

The lab is the default one (generator `gen` on dpgen0, af_xdp receiver `rx` on dprx0) plus
three more veth pairs, each with a generator (in a namespace of its own) and an af_xdp receiver:
8 workers on the 2 cores, all adaptive-polling (they nap when idle), every one with its arena's
counters for the collectors to read.  The config is checked by the project's loader and its
[lab] brought up once by dataplane.run.lab (as `dataplane lab up` does) and down at the end;
each trial is a `dataplane run --json` of that config, which finds the lab there.

First a calibration search without scrapes over the generator's whole range; then alternating
rounds (the order flips each round) of the two searches, "base" and "scrape", over [0.5, 1.5]
times that rate, fine enough to see a few percent.  perf/rfc2544.py searches the rate of `gen`;
the three other generators offer a fixed `--side-pps` each.  A trial passes when the run's
books show every generated packet received and no drop anywhere (as in
perf/consumers_cost.py); its detail keeps the drops by kind.  In the "scrape" trials a thread
of this process fetches the run's /metrics every 1/hz s while the traffic runs and times each
fetch (request to last byte: the server's collectors, its exposition and the HTTP round trip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from consumers_cost import DP, METRICS, ROOT, machine, read_books
from rfc2544 import Search, Trial, search

from dataplane import config
from dataplane.run import lab

EXTRA_PAIRS = 3     # with the default pair: 4 generators + 4 receivers = 8 workers
DROP_KINDS = ("ring_full_drops", "nic_missed", "tx_drops", "rx_nombuf", "transport_lost")


def lab_config(rate: int, count: int, side_pps: int, seconds: float) -> str:
    """The default lab at `rate` pps for `count` packets, plus EXTRA_PAIRS veth pairs with a
    generator and a receiver each."""
    text = (ROOT / "config/default.toml").read_text()
    for old, new in (("rate_pps = 20000", f"rate_pps = {rate}"), ("count = 0", f"count = {count}")):
        assert old in text, old
        text = text.replace(old, new, 1)
    side_count = int(side_pps * seconds)
    # each extra generator in a namespace of its own: DPDK's af_packet PMD picks its fanout
    # group from its pid and the ifindex, so two generators started one after the other on
    # consecutive ifindexes of one namespace can pick the same group and fail to start
    gens = [f"dp-gen{i}" for i in range(1, EXTRA_PAIRS + 1)]
    old = 'namespaces = ["dp-gen", "dp-rx"]'
    assert old in text, old
    text = text.replace(old, f'namespaces = {json.dumps(["dp-gen", "dp-rx", *gens])}', 1)
    for i in range(1, EXTRA_PAIRS + 1):
        text += f"""
[[lab.veth]]
name = "dpgen{i}"
netns = "dp-gen{i}"
address = "10.77.{i}.1/24"
mac = "02:77:00:00:0{i}:01"
peer = "dprx{i}"
peer_netns = "dp-rx"
peer_address = "10.77.{i}.2/24"
peer_mac = "02:77:00:00:0{i}:02"

[[worker]]
name = "gen{i}"
core = 0
netns = "dp-gen{i}"
poll = "adaptive"
  [[worker.port]]
  name = "out"
  driver = "af_packet"
  iface = "dpgen{i}"
  [worker.generate]
  port = "out"
  rate_pps = {side_pps}
  count = {side_count}
  src_mac = "02:77:00:00:0{i}:01"
  dst_mac = "02:77:00:00:0{i}:02"
  src = "10.77.{i}.1"
  dst = "10.77.{i}.2"
  dport = 9
  size = 128

[[worker]]
name = "rx{i}"
core = 1
netns = "dp-rx"
poll = "adaptive"
  [[worker.port]]
  name = "in"
  driver = "af_xdp"
  iface = "dprx{i}"
"""
    return text


class Scraper:
    """Fetches /metrics every 1/hz s until stopped; keeps each fetch's seconds."""

    def __init__(self, hz: float) -> None:
        self.period = 1.0 / hz
        self.seconds: list[float] = []
        self.failures = 0
        self.bytes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(METRICS, timeout=2) as r:
                    self.bytes = len(r.read())
                self.seconds.append(time.perf_counter() - t0)
            except OSError:     # before the server is up, or after it went
                self.failures += 1
            nxt += self.period
            self.stop.wait(max(0.0, nxt - time.monotonic()))


def trial(rate: float, args: argparse.Namespace, scrape: bool) -> Trial:
    rate = int(rate)
    count = int(rate * args.seconds)
    scraper = Scraper(args.hz) if scrape else None
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "lab.toml"
        cfg.write_text(lab_config(rate, count, args.side_pps, args.seconds))
        err = open(Path(d) / "run.err", "w+")     # noqa: SIM115 - read if the run fails
        run = subprocess.Popen([*DP, "run", "--config", str(cfg), "--duration",
                                str(args.seconds + 3), "--json"], stdout=subprocess.PIPE,
                               stderr=err, text=True, cwd=ROOT)
        if scraper:
            scraper.thread.start()
        out, _ = run.communicate(timeout=180)
        if scraper:
            scraper.stop.set()
            scraper.thread.join(5)
        books = read_books(run, out, err)
    streams = books["streams"].values()
    sent = sum(s["sent"] for s in streams if s["worker"] == "gen")
    side = sum(s["sent"] for s in streams if s["worker"] != "gen")
    totals = books["totals"]
    missing, drops = sum(s["missing"] for s in streams), totals["drops"]
    detail: dict = {"sent": sent, "side_sent": side, "missing": missing, "drops": drops,
                    "drops_by_kind": {k: totals[k] for k in DROP_KINDS if totals.get(k)}}
    if scraper:
        detail |= {"scrapes": len(scraper.seconds), "scrape_failures": scraper.failures,
                   "scrape_bytes": scraper.bytes,
                   "scrape_ms": [round(s * 1e3, 3) for s in scraper.seconds]}
    ok = sent == count and side == EXTRA_PAIRS * int(args.side_pps * args.seconds)
    return Trial(rate, sent / args.seconds, ok and missing == 0 and drops == 0,
                 missing + drops, detail)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


def rounds_of(args: argparse.Namespace, lo: float, hi: float,
              top: float) -> dict[str, list[Search]]:
    """`args.repeat` alternating rounds of both searches over [lo, hi] (up to `top`, the
    generator's ceiling, when hi passes); the order flips each round, so a drift of the
    machine's load does not favour one side."""
    rounds: dict[str, list[Search]] = {"base": [], "scrape": []}
    for r in range(args.repeat):
        for kind in ("base", "scrape") if r % 2 == 0 else ("scrape", "base"):
            s = search(lambda rate, k=kind: trial(rate, args, k == "scrape"),
                       hi, lo, resolution=0.01, max_trials=args.trials)
            while s.capped and s.rate < top * 0.97:    # the range's top passed: go higher
                t = s.trials
                s = search(lambda rate, k=kind: trial(rate, args, k == "scrape"),
                           min(top, 2 * s.rate), s.rate, resolution=0.01,
                           max_trials=args.trials)
                s.trials = t + s.trials
                s.rate = max(s.rate, t[-1].offered if t[-1].passed else 0.0)
            rounds[kind].append(s)
            print(f"round {r} {kind:6}: zero-loss {s.rate / 1e3:7.1f} kpps"
                  f"{' (generator-capped)' if s.capped else ''}"
                  f"{' (every trial lost: below the range)' if not s.rate else ''}", flush=True)
    return rounds


def measure(args: argparse.Namespace) -> dict:
    top = args.top
    if not top:     # the generator's own ceiling: a run as fast as it goes
        seconds, args.seconds = args.seconds, 2.0
        top = trial(10_000_000, args, False).offered
        args.seconds = seconds
        print(f"generator ceiling: {top / 1e3:.0f} kpps", flush=True)
    calib = search(lambda rate: trial(rate, args, False), top, top * 0.02, max_trials=6)
    base = calib.rate or top * 0.05
    print(f"calibration: zero-loss {base / 1e3:.1f} kpps without scrapes", flush=True)
    lo, hi = 0.5 * base, min(top, 1.5 * base)
    rounds = rounds_of(args, lo, hi, top)
    zl = {k: [s.rate for s in v] for k, v in rounds.items()}
    med = {k: statistics.median(v) for k, v in zl.items()}
    ratio = med["scrape"] / med["base"] if med["base"] else None
    per_round = [s / b for b, s in zip(zl["base"], zl["scrape"], strict=True) if b]
    dicts = {k: [s.as_dict() for s in v] for k, v in rounds.items()}
    ms = [m for x in dicts["scrape"] for t in x["trials"] for m in t["detail"]["scrape_ms"]]
    size = max((t["detail"]["scrape_bytes"] for x in dicts["scrape"] for t in x["trials"]),
               default=0)
    scrape = {"count": len(ms), "median_ms": round(statistics.median(ms), 3) if ms else None,
              "p99_ms": round(percentile(ms, 0.99), 3) if ms else None,
              "max_ms": round(max(ms), 3) if ms else None, "bytes": size, "samples_ms": ms}
    capped = any(s.capped and s.rate >= 0.97 * top for v in rounds.values() for s in v)
    print(f"zero-loss rate: no scrapes {med['base'] / 1e3:.1f} kpps "
          f"({min(zl['base']) / 1e3:.1f}-{max(zl['base']) / 1e3:.1f}), {args.hz:g} Hz scrapes "
          f"{med['scrape'] / 1e3:.1f} kpps ({min(zl['scrape']) / 1e3:.1f}-"
          f"{max(zl['scrape']) / 1e3:.1f}): ratio {ratio:.3f}" if ratio else "no zero-loss rate",
          "(generator-capped: the ratio says little)" if capped else "", flush=True)
    print(f"scrape: {scrape['count']} of {size} bytes, median {scrape['median_ms']} ms, "
          f"p99 {scrape['p99_ms']} ms", flush=True)
    return {"benchmark": "exporter_cost", "machine": machine(),
            "workers": 2 + 2 * EXTRA_PAIRS, "seconds": args.seconds, "hz": args.hz,
            "side_pps": args.side_pps, "top_pps": top, "calibration": calib.as_dict(),
            "range_pps": [lo, hi], "median_pps": med,
            "spread_pps": {k: spread(v) for k, v in zl.items()},
            "ratio_scrape_to_base": ratio, "ratio_per_round": per_round,
            "generator_capped": capped, "scrape": scrape, "rounds": dicts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="traffic per trial")
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds (medians)")
    ap.add_argument("--trials", type=int, default=7, help="trials per search")
    ap.add_argument("--hz", type=float, default=10.0, help="scrapes per second")
    ap.add_argument("--side-pps", type=int, default=1000,
                    help="rate of each of the 3 other generators")
    ap.add_argument("--top", type=float, default=0.0,
                    help="highest rate tried, pps (default: what the generator reaches)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("exporter_cost.py: run as root (the lab's namespaces and veths)")
    # the lab of the trials' config, built by the project's own lab code, once for all trials
    cfg = config.loads(lab_config(1000, 1000, args.side_pps, args.seconds), "exporter lab")
    lab.up(cfg)
    try:
        result = measure(args)
    finally:
        lab.down(cfg)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
