"""The line a second `dataplane run` prints on a terminal (or with --progress): rates since the
last line, drops, the fullest ring, latency quantiles and how many workers run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dataplane.consumers.latency import EMPTY
from dataplane.consumers.stats import TrafficStats

if TYPE_CHECKING:
    from dataplane.run.runner import Run, Totals


def latency_quantiles(stats: TrafficStats,
                      qs: tuple[float, ...] = (0.5, 0.99)) -> list[float | None]:
    """Each quantile (seconds, 3 significant digits) of every stream's latencies since the
    start, from the streams' HDR histograms; None before any latency."""
    books = stats.snapshot().values()
    merged = sum((b.latency for b in books), EMPTY)
    return [None if v is None else v * 1e-9 for v in merged.quantile_ns(qs)]


def line(run: Run, prev: Totals, cur: Totals, dt: float) -> str:
    up = sum(w.arena.worker_state() == "running" for w in run.sup.workers.values())
    p50, p99 = latency_quantiles(run.stats)
    lat = "-" if p50 is None else f"{_us(p50)} p99 {_us(p99)}"
    return (f"[{time.monotonic() - run.t0:5.0f}s] "
            f"rx {_rate((cur.rx_packets - prev.rx_packets) / dt)}pps "
            f"{_rate(8 * (cur.rx_bytes - prev.rx_bytes) / dt)}b/s | "
            f"tx {_rate((cur.tx_packets - prev.tx_packets) / dt)}pps | "
            f"drops {cur.drops - prev.drops} (ring {cur.ring_full_drops} nic "
            f"{cur.nic_missed} tx {cur.tx_drops}) | ring {100 * cur.occupancy:.1f}% | "
            f"malformed {cur.malformed} | latency p50 {lat} | workers {up}/"
            f"{len(run.sup.workers)} up")


def _rate(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f} "


def _us(s: float | None) -> str:
    """3 significant digits, as the histogram has, in a unit that needs no exponent."""
    if s is None:
        return "-"
    for unit, mul in (("us", 1e6), ("ms", 1e3)):
        if s * mul < 999.5:
            return f"{s * mul:.3g}{unit}"
    return f"{s:.3g}s"
