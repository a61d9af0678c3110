"""`dataplane top`: a running dataplane seen through its metrics endpoint, refreshed each interval:
rates per port, drops by reason, ring occupancy and latency, workers, transports.

It reads only the endpoint (dataplane.metrics.scrape), never shared memory, so it needs no root
and shows a run started by `dataplane run`, `up` or systemd alike.  Rates are differences of two
scrapes over the time between them; latency quantiles come from the histogram's buckets over the
same interval (or since the start when nothing arrived in it).

The live view is curses from the standard library: the frame is a list of plain lines that the
plain-text mode (`--once`, `-n N`) prints as they are, so a terminal library would only redraw
what curses already redraws, and the appliance installs with one dependency fewer.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from dataplane.metrics.scrape import Endpoint, Scrape, ScrapeError

# the families `top` falls back to when the run has no dataplane_dropped_packets_total{reason}
DROP_FAMILIES = {"ring_full": "dataplane_ring_full_drops_total",
                 "nic_missed": "dataplane_nic_missed_total",
                 "nic_errors": "dataplane_nic_errors_total",
                 "tx_dropped": "dataplane_tx_dropped_packets_total",
                 "rx_nombuf": "dataplane_rx_nombuf_total",
                 "transport_lost": "dataplane_transport_lost_packets_total"}
DROPPED = "dataplane_dropped_packets_total"
LATENCY = "dataplane_latency_seconds_bucket"


def si(v: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (rates and sizes, three significant figures)."""
    for prefix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}".rstrip()


class View:
    """Frames from pairs of scrapes: rates over the interval between them."""

    def __init__(self, prev: Scrape, cur: Scrape, url: str):
        self.prev, self.cur, self.url = prev, cur, url
        self.dt = max(cur.at - prev.at, 1e-9)

    def rates(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Per-second increase of counter `name` by `keys`; a counter that went back (a new
        run on the same port) counts from zero."""
        before = self.prev.by(name, *keys)
        return {k: (v - before.get(k, 0.0) if v >= before.get(k, 0.0) else v) / self.dt
                for k, v in self.cur.by(name, *keys).items()}

    def lines(self) -> list[str]:
        out = [f"dataplane top  {self.url}  every {self.dt:.1f} s  "
               f"{time.strftime('%H:%M:%S', time.localtime(time.time()))}", ""]
        for section in (self.ports, self.drops, self.rings, self.workers, self.transports):
            out += section() + [""]
        errors = self.cur.by("dataplane_exporter_source_errors_total", "source")
        if errors:
            out.append("unreadable sources (partial scrapes): "
                       + ", ".join(f"{k[0]} {v:.0f}" for k, v in sorted(errors.items())))
        return out[:-1] if out[-1] == "" else out

    def ports(self) -> list[str]:
        rx_p = self.rates("dataplane_rx_packets_total", "worker", "port")
        rx_b = self.rates("dataplane_rx_bytes_total", "worker", "port")
        tx_p = self.rates("dataplane_tx_packets_total", "worker", "port")
        tx_b = self.rates("dataplane_tx_bytes_total", "worker", "port")
        keys = sorted(set(rx_p) | set(tx_p))
        rows = [[f"{w}/{p}", si(rx_p.get((w, p), 0)), si(8 * rx_b.get((w, p), 0), "b"),
                 si(tx_p.get((w, p), 0)), si(8 * tx_b.get((w, p), 0), "b")] for w, p in keys]
        return table(["PORT", "rx pkt/s", "rx bit/s", "tx pkt/s", "tx bit/s"], rows)

    def drops(self) -> list[str]:
        if self.cur.has(DROPPED):
            total = {k[0]: v for k, v in self.cur.by(DROPPED, "reason").items()}
            rate = {k[0]: v for k, v in self.rates(DROPPED, "reason").items()}
        else:
            total = {r: sum(self.cur.by(n).values()) for r, n in DROP_FAMILIES.items()}
            rate = {r: sum(self.rates(n).values()) for r, n in DROP_FAMILIES.items()}
        rows = [[r, si(rate.get(r, 0)), f"{total[r]:.0f}"] for r in sorted(total)]
        return table(["DROPS by reason", "per s", "total"], rows)

    def rings(self) -> list[str]:
        occ = self.cur.by("dataplane_ring_occupancy_ratio", "worker", "port", "queue")
        rows = []
        for k in sorted(occ):
            p50, p99 = self.latency(dict(zip(("worker", "port", "queue"), k, strict=True)))
            rows.append(["/".join(k), f"{100 * occ[k]:.1f}%", p50, p99])
        return table(["RING", "occupancy", "latency p50", "p99"], rows)

    def latency(self, ring: dict[str, str]) -> tuple[str, str]:
        """p50 and p99 of the ring's latency histogram over the interval, as bucket bounds."""
        def buckets(s: Scrape) -> dict[float, float]:
            return {float(lab["le"]): v for lab, v in s.each(LATENCY)
                    if all(lab.get(k) == val for k, val in ring.items())}
        cur, prev = buckets(self.cur), buckets(self.prev)
        delta = {le: n - prev.get(le, 0.0) for le, n in cur.items()}
        cum = delta if delta and max(delta.values()) > 0 else cur
        if not cum or max(cum.values()) <= 0:
            return "-", "-"
        n = max(cum.values())             # the +Inf bucket: every observation
        return tuple(_bound(next(le for le in sorted(cum) if cum[le] >= q * n))
                     for q in (0.5, 0.99))  # type: ignore[return-value]

    def workers(self) -> list[str]:
        up = self.cur.by("dataplane_worker_up", "worker")
        state = {k[0]: k[1] for k, v in self.cur.by("dataplane_worker_state", "worker",
                                                    "state").items() if v}
        restarts = self.cur.by("dataplane_worker_restarts_total", "worker")
        age = self.cur.by("dataplane_worker_heartbeat_age_seconds", "worker")
        busy = self.rates("dataplane_worker_busy_cycles_total", "worker")
        cycles = self.rates("dataplane_worker_cycles_total", "worker")
        rows = [[w, state.get(w, "?"),
                 "up" if up[(w,)] else "DOWN", f"{restarts.get((w,), 0):.0f}",
                 f"{age[(w,)]:.2f} s" if (w,) in age else "-",
                 f"{100 * busy.get((w,), 0) / cycles[(w,)]:.0f}%" if cycles.get((w,)) else "-"]
                for (w,) in sorted(up)]
        return table(["WORKER", "state", "up", "restarts", "heartbeat", "busy"], rows)

    def transports(self) -> list[str]:
        keys = ("transport", "role", "peer")
        conn = self.cur.by("dataplane_transport_connected", *keys)
        if not conn:
            return ["TRANSPORTS: none"]
        pkts = self.rates("dataplane_transport_packets_total", *keys)
        lost = self.cur.by("dataplane_transport_lost_packets_total", *keys)
        auth = self.cur.by("dataplane_transport_auth_failures_total", *keys)
        rows = [[k[0], k[1], k[2], "yes" if conn[k] else "NO", si(pkts.get(k, 0)),
                 f"{lost.get(k, 0):.0f}", f"{auth.get(k, 0):.0f}"] for k in sorted(conn)]
        return table(["TRANSPORT", "role", "peer", "connected", "pkt/s", "lost",
                      "auth failures"], rows)


def _bound(le: float) -> str:
    return "inf" if math.isinf(le) else f"<={le * 1e6:.0f}us"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, the others right-aligned, each as wide as it needs."""
    if not rows:
        return [f"{head[0]}: none"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in [head, *rows]]


def scrape(ep: Endpoint) -> Scrape:
    text = ep.get()
    return Scrape.parse(text, time.monotonic())


def plain(ep: Endpoint, interval: float, frames: int, out: TextIO = sys.stdout) -> None:
    """`frames` frames as plain text, one per interval (the first after one interval: a rate
    needs two scrapes).  A scrape that fails raises ScrapeError."""
    prev = scrape(ep)
    for i in range(frames):
        time.sleep(interval)
        cur = scrape(ep)
        print(("\n" if i else "") + "\n".join(View(prev, cur, ep.url).lines()), file=out,
              flush=True)
        prev = cur


def live(ep: Endpoint, interval: float) -> None:
    """The full-screen view until q or Ctrl-C; a failed scrape is shown and retried (the run
    may be restarting), never fatal."""
    import curses

    def loop(scr: curses.window) -> None:
        curses.curs_set(0)
        scr.timeout(int(interval * 1000))
        prev: Scrape | None = None
        while True:
            try:
                cur = scrape(ep)
                lines = (View(prev, cur, ep.url).lines() if prev is not None
                         else [f"dataplane top  {ep.url}: first scrape, rates next"])
                prev = cur
            except ScrapeError as e:
                lines, prev = [f"dataplane top: {e}", "", "retrying; q quits"], None
            draw(scr, lines + ["", "q quits"])
            if scr.getch() in (ord("q"), ord("Q")):
                return

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass


def draw(scr, lines: list[str]) -> None:
    """The lines, clipped to the window (curses raises when writing past its edge)."""
    scr.erase()
    h, w = scr.getmaxyx()
    for y, ln in enumerate(lines[:h]):
        scr.addnstr(y, 0, ln, max(w - 1, 0))
    scr.refresh()


def main(ep: Endpoint, interval: float, frames: int | None,
         err: Callable[[str], None]) -> int:
    """The `dataplane top` command: 0, or 1 with the reason when the endpoint cannot be read."""
    try:
        if frames is None and sys.stdout.isatty():
            scrape(ep)          # fail at once, with the reason, when nothing is there
            live(ep, interval)
        else:
            plain(ep, interval, frames if frames is not None else sys.maxsize)
    except ScrapeError as e:
        err(str(e))
        return 1
    except KeyboardInterrupt:
        pass
    return 0
