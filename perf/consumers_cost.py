"""What the consumers cost: the default lab's zero-loss rate with the built-in consumers only,
against the same run with a capture attached (a filter that matches nothing) and the flow
cache exporting IPFIX, and each consumer's cost per packet.

A benchmark, not a test.  Human-readable lines first; the last line is one JSON object.
    sudo .venv/bin/python perf/consumers_cost.py [--seconds 4] [--repeat 1]

Each trial is a `dataplane run --json` of the default lab (generator on the veth's one end,
af_xdp receiver on the other) with the generator at a fixed rate for a fixed count; it passes
when the books balance with no drop anywhere (dataplane.run.runner's books: every sequence
number received, every drop counter 0).  perf/rfc2544.py searches the rate.  Just before the
run ends its metrics are scraped: dataplane_consumer_seconds_total / packets_total per consumer
is each one's cost per packet on this machine at that rate.  The "all" runs start
`dataplane capture -f 'udp port 7' -w /dev/null` as soon as the run's capture socket answers
(the lab sends to port 9), and a UDP socket stands in as the IPFIX collector.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

from rfc2544 import Trial, search

ROOT = Path(__file__).resolve().parents[1]
DP = [sys.executable, "-m", "dataplane.cli"]
SOCKET = Path("/run/dataplane/capture.sock")
METRICS = "http://127.0.0.1:9477/metrics"


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "loadavg_1m": os.getloadavg()[0]}


class Collector:
    """A UDP socket that takes the IPFIX export and counts datagrams (no decoding)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.datagrams = 0
        self.stop = threading.Event()
        threading.Thread(target=self._take, daemon=True).start()

    def _take(self) -> None:
        while not self.stop.is_set():
            try:
                self.sock.recv(65535)
                self.datagrams += 1
            except OSError:
                pass


def config(rate: int, count: int, flows_port: int | None) -> str:
    text = (ROOT / "config/default.toml").read_text()
    for old, new in (("rate_pps = 20000", f"rate_pps = {rate}"), ("count = 0", f"count = {count}")):
        assert old in text, old
        text = text.replace(old, new, 1)
    if flows_port:
        text += (f'\n[[consumer]]\nname = "flows"\nentry = "flows"\n[consumer.options]\n'
                 f'collectors = ["127.0.0.1:{flows_port}"]\n')
    return text


def scrape_costs() -> dict[str, dict[str, float]]:
    """{consumer: {seconds, packets}} from the live run's endpoint."""
    with urllib.request.urlopen(METRICS, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'^dataplane_consumer_(seconds|packets)_total\{consumer="([^"]+)"\} '
                         r'(\S+)$', text, re.M):
        out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return out


def read_books(run: subprocess.Popen, out: str, err: IO[str]) -> dict:
    """The books a finished `dataplane run --json` printed last; its stderr (`err`, closed
    here) says why when there are none."""
    err.seek(0)
    why = err.read()[-3000:]
    err.close()
    if run.returncode not in (0, 1) or not out.strip():
        raise SystemExit(f"dataplane run exited {run.returncode} without its books:\n{why}")
    return json.loads(out.strip().splitlines()[-1])


def trial(rate: float, seconds: float, full: bool, collector: Collector | None) -> Trial:
    rate = int(rate)
    count = int(rate * seconds)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "lab.toml"
        cfg.write_text(config(rate, count, collector.port if full else None))
        err = open(Path(d) / "run.err", "w+")     # noqa: SIM115 - read if the run fails
        run = subprocess.Popen([*DP, "run", "--config", str(cfg), "--duration",
                                str(seconds + 3), "--json"], stdout=subprocess.PIPE,
                               stderr=err, text=True, cwd=ROOT)
        cap = None
        if full:
            deadline = time.monotonic() + 20
            while not SOCKET.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            cap = subprocess.Popen([*DP, "capture", "-f", "udp port 7", "-w", "/dev/null"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   cwd=ROOT)
        time.sleep(seconds + 1.5)
        try:
            costs = scrape_costs()
        except OSError:
            costs = {}
        out, _ = run.communicate(timeout=120)
        if cap is not None:
            cap.terminate()
            cap.wait(30)
        books = read_books(run, out, err)
    sent = sum(s["sent"] for s in books["streams"].values())
    missing = sum(s["missing"] for s in books["streams"].values())
    drops = books["totals"]["drops"]
    offered = sent / seconds
    detail = {"sent": sent, "missing": missing, "drops": drops, "costs": costs}
    return Trial(rate, offered, missing == 0 and drops == 0 and sent == count,
                 missing + drops, detail)


def ns_per_packet(costs: dict[str, dict[str, float]]) -> dict[str, float]:
    return {c: v.get("seconds", 0) / v["packets"] * 1e9 for c, v in costs.items()
            if v.get("packets")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="traffic per trial")
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds (medians)")
    ap.add_argument("--top", type=float, default=0.0,
                    help="highest rate tried, pps (default: what the generator reaches)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("consumers_cost.py: run as root (the lab's namespaces and veth)")
    collector = Collector()
    top = args.top
    if not top:     # the generator's own ceiling: a run as fast as it goes
        t = trial(10_000_000, 2, False, None)
        top = t.offered
        print(f"generator ceiling: {top / 1e3:.0f} kpps", flush=True)
    rounds: dict[str, list] = {"base": [], "all": []}
    for r in range(args.repeat):
        for kind in ("base", "all"):
            s = search(lambda rate, k=kind: trial(rate, args.seconds, k == "all", collector),
                       top, top * 0.05, max_trials=8)
            passed = [t for t in s.trials if t.passed]
            costs = ns_per_packet(passed[-1].detail["costs"]) if passed else {}
            rounds[kind].append({**s.as_dict(), "ns_per_packet": costs})
            print(f"round {r} {kind:4}: zero-loss {s.rate / 1e3:7.1f} kpps"
                  f"{' (generator-capped)' if s.capped else ''}; cost ns/packet "
                  + ", ".join(f"{c} {v:.0f}" for c, v in sorted(costs.items())), flush=True)
    collector.stop.set()
    med = {k: statistics.median(x["zero_loss_pps"] for x in v) for k, v in rounds.items()}
    ratio = med["all"] / med["base"] if med["base"] else None
    capped = any(x["generator_capped"] for v in rounds.values() for x in v)
    print(f"zero-loss rate: base {med['base'] / 1e3:.1f} kpps, with capture + flows "
          f"{med['all'] / 1e3:.1f} kpps: ratio {ratio:.3f}" if ratio else "no zero-loss rate",
          "(generator-capped: the ratio says little)" if capped else "", flush=True)
    print(json.dumps({"benchmark": "consumers_cost", "machine": machine(),
                      "seconds": args.seconds, "top_pps": top, "median_pps": med,
                      "ratio_all_to_base": ratio, "generator_capped": capped,
                      "collector_datagrams": collector.datagrams, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
