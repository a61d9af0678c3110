"""`dataplane bench`: its parser (light: argparse only, so `--help` stays fast) and its handler,
which brings the lab up once, runs the RFC 2544 set and takes the lab down if it made it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _ints(lo: int, hi: int, example: str, what: str):
    """A comma-separated list of integers, each lo..hi."""
    def check(text: str) -> tuple[int, ...]:
        try:
            got = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {example}") from None
        if not got or any(not lo <= n <= hi for n in got):
            raise argparse.ArgumentTypeError(f"{text!r}: each {what} {lo}..{hi}")
        return got
    return check


_sizes = _ints(64, 9018, "sizes like 64,128,1518", "size (bytes with FCS)")
_steps = _ints(1, 100, "percents like 100,90,80", "step (percent of the top)")


def _tests(text: str) -> tuple[str, ...]:
    from dataplane.bench.rfc2544 import TESTS
    tests = tuple(text.split(","))
    bad = [t for t in tests if t not in TESTS]
    if bad or not tests:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or text!r}: expected some of "
                                         f"{', '.join(TESTS)}")
    return tests


def _positive(kind: type, lo: float, hi: float):
    def check(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {lo:g}..{hi:g}")
        return v
    return check


def add_command(sub, parents: list[argparse.ArgumentParser], fmt: type) -> None:
    b = sub.add_parser(
        "bench", parents=parents, formatter_class=fmt,
        help="RFC 2544 against the lab's device under test (root)",
        description="Bring the config's lab up (with its [lab.dut]), then for each frame size: "
        "throughput (a binary search on the offered rate for zero loss), latency at that "
        "rate, frame loss at steps of the top rate, and back-to-back bursts. Each trial is a "
        "run of the config with the generator at the trial's size, rate and count; losses are "
        "placed by the generator's, the DUT's and the receiver's counters (docs/lab.md).",
        epilog="examples:\n  sudo dataplane bench --config config/dut-router.toml\n  sudo "
        "dataplane bench -c config/dut-bridge.toml --sizes 64,1518 --trial-seconds 5 "
        "--report bench.html\n  sudo dataplane bench -c config/dut-router.toml --tests "
        "throughput --json")
    from dataplane.bench.rfc2544 import Options
    d = Options()
    b.add_argument("--sizes", type=_sizes, default=d.sizes, metavar="N,N,...",
                   help="frame sizes with FCS (default: 64,128,256,512,1024,1280,1518)")
    b.add_argument("--tests", type=_tests, default=d.tests, metavar="T,T,...",
                   help="some of throughput,latency,loss,back_to_back (default: all)")
    b.add_argument("--trial-seconds", type=_positive(float, 0.1, 3600), default=d.trial_seconds,
                   metavar="S", help=f"each trial's length (default {d.trial_seconds:g})")
    b.add_argument("--resolution", type=_positive(float, 0.001, 0.5), default=d.resolution,
                   metavar="F", help="the search stops when its interval is narrower than this "
                   f"fraction of the top rate (default {d.resolution:g})")
    b.add_argument("--max-pps", type=_positive(float, 1, 1e8), default=0.0, metavar="PPS",
                   help="the top of the search (default: the generator's own ceiling, "
                   "measured first)")
    b.add_argument("--loss-steps", type=_steps, default=d.loss_steps, metavar="P,P,...",
                   help="frame-loss trials at these percents of the top (default 100,90,...,10)")
    b.add_argument("--b2b-max", type=_positive(int, 1, 10**8), default=d.b2b_max, metavar="N",
                   help=f"the longest back-to-back burst tried (default {d.b2b_max})")
    b.add_argument("--json", action="store_true",
                   help="end with the results as one JSON object, the last line of stdout")
    b.add_argument("--report", metavar="FILE.html",
                   help="write a self-contained HTML report with plots")
    b.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dataplane.cli import need_root
    need_root("dataplane bench", "dataplane bench --config config/dut-router.toml")
    from dataplane.bench import report, rfc2544
    from dataplane.bench.trial import Bench
    from dataplane.run import lab
    from dataplane.run.lock import RUN_LOCK, HostLock
    bench = Bench(args.config)
    opt = rfc2544.Options(sizes=args.sizes, tests=args.tests, trial_seconds=args.trial_seconds,
                          resolution=args.resolution, max_pps=args.max_pps,
                          loss_steps=args.loss_steps, b2b_max=args.b2b_max)
    with HostLock(RUN_LOCK, "dataplane bench", bench.source):
        made = lab.bring_up(bench.cfg)
        try:
            results = rfc2544.run(bench, opt, say=lambda s: print(s, flush=True))
        finally:
            if made:
                lab.down(bench.cfg)
    meta = {"config": bench.source, "dut": bench.dut.mode if bench.dut else None,
            **{k: v for k, v in dataclasses.asdict(opt).items()}}
    print(rfc2544.table(results), flush=True)
    if args.report:
        report.write(args.report, results, meta)
        print(f"report: {args.report}", flush=True)
    if args.json:
        print(json.dumps({**meta, "results": [dataclasses.asdict(r) for r in results]}),
              file=sys.stdout, flush=True)
    return 0
