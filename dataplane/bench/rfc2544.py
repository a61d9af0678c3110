"""The RFC 2544 set against the lab's DUT, for each frame size: throughput (the zero-loss
search), latency at the rate found, frame loss at steps of the top rate, and back-to-back
bursts (the longest burst at the generator's full speed with nothing lost).

Frame sizes are Ethernet frames with their FCS, as RFC 2544 counts them (64 ... 1518); the
generator's frame is 4 bytes shorter.  A size too small for the headers and the 24-byte trailer
that the books need is measured at the smallest that carries it, and the result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dataplane.bench.search import Search, Trial, search

if TYPE_CHECKING:       # the CLI's parser reads Options: no runner or native build for --help
    from dataplane.bench.trial import Bench, Result

SIZES = (64, 128, 256, 512, 1024, 1280, 1518)
TESTS = ("throughput", "latency", "loss", "back_to_back")
LOSS_STEPS = (100, 90, 80, 70, 60, 50, 40, 30, 20, 10)


@dataclass
class Options:
    sizes: tuple[int, ...] = SIZES
    tests: tuple[str, ...] = TESTS
    trial_seconds: float = 2.0
    resolution: float = 0.02        # of the top rate
    max_pps: float = 0.0            # 0: the generator's own ceiling, measured first
    loss_steps: tuple[int, ...] = LOSS_STEPS    # percent of the top rate
    b2b_max: int = 100_000          # the longest burst tried
    max_trials: int = 12


@dataclass
class SizeResult:
    size: int                   # asked, with FCS
    measured_size: int          # the frame the generator sent, with FCS
    top_pps: float = 0.0        # what the search started from
    throughput_pps: float = 0.0
    throughput_bps: float = 0.0     # at the frame size with FCS
    capped: bool = False        # the top passed: the generator, not the DUT, is the limit
    latency: dict[str, float] = field(default_factory=dict)
    loss: list[dict[str, Any]] = field(default_factory=list)     # by step
    back_to_back: int | None = None     # frames; None: not run
    back_to_back_capped: bool = False
    trials: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def as_trial(r: Result) -> Trial:
    """A bench result as the search's trial, with its books and where its losses went."""
    return Trial(r.asked_pps, r.offered_pps, r.passed, r.lost,
                 {"size": r.size, "sent": r.sent, "received": r.received,
                  "duplicated": r.duplicated, "reordered": r.reordered, "where": r.where,
                  "dut": r.dut})


def run(bench: Bench, opt: Options, say: Callable[[str], None] = print) -> list[SizeResult]:
    """Every test of opt.tests for every size; `say` hears a line per step."""
    out = []
    for size in opt.sizes:
        res = SizeResult(size, max(size, bench.smallest()))
        if res.measured_size != size:
            res.notes.append(f"{size} B cannot carry the headers and the trailer: measured at "
                             f"{res.measured_size} B")
        out.append(res)
        _one_size(bench, opt, res, say)
    return out


def _one_size(bench: Bench, opt: Options, res: SizeResult, say: Callable[[str], None]) -> None:
    n = res.measured_size
    top = opt.max_pps
    if not top:
        r = bench.trial(n, 0, opt.trial_seconds)
        res.trials.append(asdict(as_trial(r)))
        top = r.offered_pps
        say(f"{res.size} B: generator ceiling {top:,.0f} pps")
    res.top_pps = top
    if top <= 0:
        res.notes.append("the generator sent nothing")
        return
    if "throughput" in opt.tests:
        s: Search = search(lambda pps: as_trial(bench.trial(n, pps, opt.trial_seconds)), top,
                           resolution=opt.resolution, max_trials=opt.max_trials)
        res.trials += [asdict(t) for t in s.trials]
        res.throughput_pps, res.capped = s.rate, s.capped
        res.throughput_bps = s.rate * res.measured_size * 8
        say(f"{res.size} B: throughput {s.rate:,.0f} pps"
            + (" (the top of the range passed: the generator is the limit)" if s.capped else ""))
    if "latency" in opt.tests and res.throughput_pps > 0:
        r = bench.trial(n, res.throughput_pps, opt.trial_seconds)
        res.latency = r.latency
        if not r.passed:
            res.notes.append(f"latency trial at {res.throughput_pps:,.0f} pps lost {r.lost}")
        say(f"{res.size} B: latency at the throughput rate: " + _us(r.latency))
    if "loss" in opt.tests:
        for pct in opt.loss_steps:
            r = bench.trial(n, top * pct / 100, opt.trial_seconds)
            # RFC 2544's frame loss counts frames that left for the DUT: the generator's own
            # refusals (placed under "generator") are not among them
            gen = r.where.get("generator", 0) if r.where else 0
            rate = (r.lost - gen) / (r.sent - gen) if r.sent > gen else 0.0
            res.loss.append({"percent": pct, "asked_pps": r.asked_pps,
                             "offered_pps": r.offered_pps, "sent": r.sent, "lost": r.lost,
                             "loss_rate": rate, "duplicated": r.duplicated,
                             "reordered": r.reordered, "where": r.where})
            say(f"{res.size} B: {pct}% ({r.offered_pps:,.0f} pps): loss {rate:.4%}"
                + (f" {r.where}" if r.where else ""))
    if "back_to_back" in opt.tests:
        b = search(lambda k: _burst_trial(bench, n, k), opt.b2b_max, 1, resolution=opt.resolution,
                   max_trials=opt.max_trials, offered_min=0)
        res.back_to_back, res.back_to_back_capped = int(b.rate), b.capped
        say(f"{res.size} B: back-to-back {int(b.rate)} frames"
            + (" (the longest tried)" if b.capped else ""))


def _burst_trial(bench: Bench, size: int, frames: float) -> Trial:
    r = bench.burst(size, max(1, int(frames)))
    t = as_trial(r)
    t.asked = t.offered = r.count       # the search's unit here is frames, not packets/s
    t.detail["offered_pps"] = r.offered_pps
    return t


def _us(lat: dict[str, float]) -> str:
    if not lat.get("count"):
        return "no latency (no trailer received)"
    return " ".join(f"{k.replace('_', '.')} {lat[k] * 1e6:.1f} us"
                    for k in ("p50", "p99", "p99_9", "max") if k in lat)


def table(results: list[SizeResult]) -> str:
    """The summary a person reads on the terminal."""
    head = (f"{'size':>6} {'throughput':>14} {'Mbit/s':>9} {'p50 us':>8} {'p99 us':>8} "
            f"{'p99.9 us':>9} {'max us':>8} {'b2b':>8}  loss at steps")
    lines = [head]
    for r in results:
        lat = r.latency
        us = [f"{lat[k] * 1e6:.1f}" if k in lat and lat.get("count") else "-"
              for k in ("p50", "p99", "p99_9", "max")]
        loss = " ".join(f"{x['percent']}%:{x['loss_rate']:.2%}" for x in r.loss) or "-"
        tp = f"{r.throughput_pps:,.0f}" + ("+" if r.capped else "")
        b2b = "-" if r.back_to_back is None else (f"{r.back_to_back}"
                                                   + ("+" if r.back_to_back_capped else ""))
        lines.append(f"{r.size:>6} {tp:>14} {r.throughput_bps / 1e6:>9.2f} {us[0]:>8} "
                     f"{us[1]:>8} {us[2]:>9} {us[3]:>8} {b2b:>8}  {loss}")
    if any(r.capped or r.back_to_back_capped for r in results):
        lines.append("+: the top of the range passed; the generator, not the DUT, set the limit")
    lines += [f"note: {n}" for r in results for n in r.notes]
    return "\n".join(lines)
