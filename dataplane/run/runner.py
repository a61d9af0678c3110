"""`dataplane run`: bring the lab up, start the workers, drain their rings into the consumers,
serve metrics, print one line a second, and leave the host as it was found.

Shutdown order matters for accounting: generators stop first, receivers get a moment to take
what is still in flight, then the receivers stop and the consumer drains every ring, so that at
the end each generated packet was either received or counted as a drop somewhere.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from dataplane import config
from dataplane.consumers.loop import ConsumerLoop, ring_sources
from dataplane.consumers.stats import LATENCY_EDGES, TrafficStats
from dataplane.host.proc import poll
from dataplane.metrics.arenas import ArenaCollector
from dataplane.metrics.consumers import ConsumerCollector
from dataplane.metrics.drops import DropsCollector
from dataplane.metrics.mr_cache import MRCacheCollector
from dataplane.metrics.rdma import RdmaCollector, mr_caches
from dataplane.metrics.server import serve
from dataplane.metrics.transports import TransportCollector
from dataplane.run import lab
from dataplane.run.lock import RUN_LOCK, HostLock
from dataplane.shm.control import control_path
from dataplane.transport.process import TransportProcess
from dataplane.transport.spec import TransportSpec
from dataplane.workers.supervisor import Supervisor

log = logging.getLogger("dataplane.run")


@dataclass
class Totals:
    """Sums over all workers of the shared-memory counters, at one moment."""
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    ring_full_drops: int = 0
    nic_missed: int = 0
    tx_drops: int = 0
    rx_nombuf: int = 0
    malformed: int = 0
    occupancy: float = 0.0     # fullest ring, 0..1
    transport_lost: int = 0    # consumed by a transport sender, never acknowledged

    @property
    def drops(self) -> int:
        return (self.ring_full_drops + self.nic_missed + self.tx_drops + self.rx_nombuf
                + self.transport_lost)


@dataclass
class RunResult:
    seconds: float
    totals: Totals
    streams: dict[int, dict] = field(default_factory=dict)  # stream -> sent/received/unique/...
    restarts: int = 0
    ok: bool = True
    problems: list[str] = field(default_factory=list)


class Run:
    """One run of a config.  `with Run(cfg) as r: r.start(); ...; result = r.finish()`."""

    def __init__(self, cfg: config.Config, out: TextIO = sys.stdout):
        # first, before any file is made or removed: a second run refuses here (lock.Locked)
        # and touches nothing of the first; close() releases it
        self.lock = HostLock(RUN_LOCK, "dataplane run", cfg.source)
        self.lock.acquire()
        try:
            self._setup(cfg, out)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: config.Config, out: TextIO) -> None:
        self.cfg = cfg
        self.out = out
        self.specs = config.plan(cfg)
        self.labels = {s.name: [p.label or p.name for p in s.ports] for s in self.specs}
        self.sup = Supervisor(self.specs)
        self.stats = TrafficStats()
        self.loop: ConsumerLoop | None = None
        self.metrics = None
        self.lab_created = False
        self.t0 = 0.0
        self.result: RunResult | None = None
        self.transports = self._transports()

    # -- start --
    def start(self) -> None:
        if self.cfg.lab is not None and not lab.exists(self.cfg):
            lab.up(self.cfg)
            self.lab_created = True
            log.info("lab up: namespaces %s", ", ".join(self.cfg.lab.namespaces))
        if any(p.name.startswith("net_memif") for s in self.specs for p in s.ports):
            config.ensure_run_dir()
        self.sup.create_arenas()
        # transport receivers first: a sender connects as soon as it runs
        receivers = [t for t in self.transports if t.spec.role == "recv"]
        for t in receivers:
            t.start()
            t.wait_running()
        shipped = {(t.spec.arena_path, t.spec.ring) for t in self.transports
                   if t.spec.role == "send"}
        # a shipped ring has one consumer, its sender; the local consumers get the others and
        # the rings of the transport receivers' arenas
        arenas = [w.arena for w in self.sup.workers.values()] + [t.arena for t in receivers]
        sources = [(a, r) for a, r in ring_sources(arenas)
                   if (str(a.path), r.index) not in shipped]
        self.loop = ConsumerLoop(sources, [self.stats])
        self.loop.start()
        arenas = ArenaCollector(
            [(w.name, w.arena, self.labels[w.name]) for w in self.sup.workers.values()]
            + [(t.spec.name, t.arena, [t.spec.label]) for t in receivers])
        m = self.cfg.metrics
        controls = [(t.spec, t.control) for t in self.transports]
        self.metrics = serve(arenas, ConsumerCollector(self.stats, self.loop, arenas),
                             TransportCollector(controls), RdmaCollector(controls),
                             MRCacheCollector(mr_caches(controls)),
                             DropsCollector(arenas, controls), host=m.host, port=m.port,
                             web=m.web, max_connections=m.max_connections)
        log.info("metrics on %s", self.metrics.url)
        # receivers first, so the generators' first packets find someone listening
        self.sup.start()
        self.sup.wait_running()
        for t in self.transports:
            if t.spec.role == "send":
                t.start()
                t.wait_running()
        self.t0 = time.monotonic()

    def _transports(self) -> list[TransportProcess]:
        """[[transport]] tables as processes: a sender ships the first ring of a worker's
        port; a receiver owns a one-ring arena whose port carries the remote's label."""
        out: list[TransportSpec] = []
        specs = {s.name: s for s in self.specs}
        for x in self.cfg.transports:
            ctl = control_path(x.name)
            spec = TransportSpec(name=x.name, role=x.role, control_path=ctl,
                                 arena_path=ctl.removesuffix(".ctl"), host=x.host,
                                 tcp_port=x.tcp_port, mode=x.mode, netns=x.netns,
                                 label=x.label, device=x.device, key_file=x.key_file,
                                 insecure=x.insecure)
            if x.role == "send":
                w = specs[x.worker]
                port = [p.label or p.name for p in w.ports].index(x.port)
                spec.arena_path = w.arena_path
                spec.ring = w.rings().index((port, 0))
            out.append(spec)
        for spec in out:   # an unusable key refuses the run before any file is made
            try:
                spec.load_key()
            except ValueError as e:
                raise RuntimeError(f"transport {spec.name}: {e}") from None
        return [TransportProcess(spec, self.cfg.arena.ring_size, self.cfg.arena.slot_size)
                for spec in out]

    # -- while running --
    def totals(self) -> Totals:
        t = Totals()
        for w in self.sup.workers.values():
            a = w.arena
            for r in a.rings:
                c = r.counters
                t.rx_packets += int(c[0])
                t.rx_bytes += int(c[1])
                t.ring_full_drops += int(c[2])
                t.malformed += int(c[3])
                t.occupancy = max(t.occupancy, r.occupancy() / r.size)
            pc = a.port_counters[:a.n_ports]
            t.tx_packets += int(pc[:, 0].sum())
            t.tx_drops += int(pc[:, 2].sum())
            t.nic_missed += int(pc[:, 3].sum())
            t.rx_nombuf += int(pc[:, 5].sum())
        t.transport_lost = sum(x.control.counter("lost_packets") for x in self.transports
                               if x.spec.role == "send")
        return t

    def latency_quantiles(self, qs: tuple[float, ...] = (0.5, 0.99)) -> list[float | None]:
        """Upper bucket edges (seconds) holding each quantile; None before any latency."""
        hist = sum((rs.latency for rs in self.stats.rings.values()),
                   np.zeros(len(LATENCY_EDGES) + 1, dtype=np.int64))
        n = int(hist.sum())
        if n == 0:
            return [None for _ in qs]
        cum = np.cumsum(hist)
        edges = [*LATENCY_EDGES, float("inf")]
        return [edges[int(np.searchsorted(cum, q * n))] for q in qs]

    def summary_line(self, prev: Totals, cur: Totals, dt: float) -> str:
        up = sum(w.arena.worker_state() == "running" for w in self.sup.workers.values())
        p50, p99 = self.latency_quantiles()
        lat = "-" if p50 is None else f"<={_us(p50)} p99 <={_us(p99)}"
        return (f"[{time.monotonic() - self.t0:5.0f}s] "
                f"rx {_rate((cur.rx_packets - prev.rx_packets) / dt)}pps "
                f"{_rate(8 * (cur.rx_bytes - prev.rx_bytes) / dt)}b/s | "
                f"tx {_rate((cur.tx_packets - prev.tx_packets) / dt)}pps | "
                f"drops {cur.drops - prev.drops} (ring {cur.ring_full_drops} nic "
                f"{cur.nic_missed} tx {cur.tx_drops}) | ring {100 * cur.occupancy:.1f}% | "
                f"malformed {cur.malformed} | latency p50 {lat} | workers {up}/"
                f"{len(self.sup.workers)} up")

    def serve_until(self, stop: threading.Event, duration: float | None) -> None:
        """Watch workers and print a line a second until stop is set or duration passes."""
        prev, t_prev = self.totals(), time.monotonic()
        end = None if duration is None else self.t0 + duration
        while not stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            stop.wait(min(1.0 - (now - t_prev) % 1.0, 1.0 if end is None else max(0, end - now)))
            events = self.sup.check() + [e for t in self.transports if (e := t.check())]
            for ev in events:
                print(f"[{time.monotonic() - self.t0:5.0f}s] {ev}", file=self.out, flush=True)
            now = time.monotonic()
            if now - t_prev >= 0.999:
                cur = self.totals()
                print(self.summary_line(prev, cur, now - t_prev), file=self.out, flush=True)
                prev, t_prev = cur, now

    # -- stop --
    def finish(self, settle: float = 0.5) -> RunResult:
        """Stop generators, let in-flight packets land, stop the rest, drain, account."""
        if self.result is not None:
            return self.result
        gens = [w for w in self.sup.workers.values() if w.spec.gen is not None]
        for w in gens:
            w.arena.request_stop()
        for w in gens:
            if w.proc is not None:
                try:
                    w.proc.wait(10)
                except Exception:
                    pass
        _wait_quiet(self.totals, settle)
        seconds = time.monotonic() - self.t0 if self.t0 else 0.0
        # senders before the workers they drain (they wait for their last acks), the
        # transport receivers after the workers
        for t in self.transports:
            if t.spec.role == "send":
                t.stop()
        self.sup.stop()
        for t in self.transports:
            if t.spec.role == "recv":
                t.stop()
        if self.loop is not None:
            self.loop.stop()
            self.loop.sweep()      # what the receivers published before they stopped
        res = RunResult(seconds, self.totals(),
                        restarts=sum(int(w.arena.header.restarts)
                                     for w in self.sup.workers.values()))
        self._account(res, gens)
        self.result = res
        return res

    def _account(self, res: RunResult, gens: list) -> None:
        for w in gens:
            g = w.spec.gen
            # every issued sequence number is sent or counted in tx_drops (dpdk_worker.c)
            sent = int(w.arena.port_counters[g.port][6])
            tx_drops = int(w.arena.port_counters[g.port][2])
            st = self.stats.streams.streams.get(g.stream)
            unique = st.unique if st else 0
            res.streams[g.stream] = {
                "worker": w.name, "sent": sent, "tx_drops": tx_drops,
                "received": st.received if st else 0, "unique": unique,
                "duplicates": st.duplicates if st else 0, "missing": sent - unique,
            }
            # what the receivers counted as dropped may explain what is missing
            lost = sent - unique
            if lost > res.totals.drops:
                res.ok = False
                res.problems.append(f"stream {g.stream} ({w.name}): sent {sent}, received "
                                    f"{unique}: {lost - res.totals.drops} not accounted for "
                                    f"by any drop counter")
        for w in self.sup.workers.values():
            if w.gave_up:
                res.ok = False
                res.problems.append(f"worker {w.name}: {w.gave_up}")
        for t in self.transports:
            if t.gave_up:
                res.ok = False
                res.problems.append(f"transport {t.spec.name}: {t.gave_up}")

    def report(self, res: RunResult) -> str:
        t = res.totals
        lines = [f"ran {res.seconds:.1f} s: rx {t.rx_packets} packets ({t.rx_bytes} bytes), "
                 f"tx {t.tx_packets}; drops: ring {t.ring_full_drops}, nic {t.nic_missed}, "
                 f"tx {t.tx_drops}, no-mbuf {t.rx_nombuf}; malformed {t.malformed}; "
                 f"restarts {res.restarts}"]
        for sid, s in res.streams.items():
            lines.append(f"stream {sid} from {s['worker']}: sent {s['sent']}, received "
                         f"{s['unique']} unique ({s['duplicates']} duplicates), missing "
                         f"{s['missing']}")
        lines += [f"PROBLEM: {p}" for p in res.problems]
        return "\n".join(lines)

    @staticmethod
    def books_json(res: RunResult) -> str:
        """The books report() prints, as one JSON object on one line (`run --json`): seconds,
        totals (with the drops they sum), streams by id, restarts, ok, problems."""
        import dataclasses
        import json
        d = dataclasses.asdict(res)
        d["totals"]["drops"] = res.totals.drops
        d["streams"] = {str(k): v for k, v in res.streams.items()}
        return json.dumps(d, sort_keys=True)

    def close(self) -> None:
        """Everything this run created goes away, whatever state it is in.  Idempotent."""
        try:
            self.finish()
        finally:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            for t in self.transports:
                t.close()
            self.sup.close()
            try:
                if self.lab_created:
                    lab.down(self.cfg)
                    self.lab_created = False
                    log.info("lab down")
            finally:
                self.lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(cfg: config.Config, duration: float | None = None, out: TextIO = sys.stdout,
        books_json: bool = False) -> int:
    """The `dataplane run` command: 0 when every generated packet is accounted for."""
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            run_ = Run(cfg, out)
        except RuntimeError as e:   # refused before anything was made (a transport's key)
            log.error("%s", e)
            return 1
        with run_ as r:
            try:
                r.start()
            except RuntimeError as e:
                log.error("%s", e)
                return 1
            print(f"running {len(r.specs)} worker(s): "
                  + ", ".join(f"{s.name}" + (f"@core{s.core}" if s.core is not None else "")
                              for s in r.specs)
                  + ("" if duration is None else f" for {duration:g} s")
                  + "; Ctrl-C stops", file=out, flush=True)
            r.serve_until(stop, duration)
            res = r.finish()
            print(r.report(res), file=out, flush=True)
            if books_json:      # the last line of stdout, for scripts
                print(r.books_json(res), file=out, flush=True)
            return 0 if res.ok else 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _wait_quiet(read, settle: float, timeout: float = 5.0) -> None:
    """Wait until the receive counters stop moving for `settle` seconds (at most `timeout`)."""
    last = [read().rx_packets, time.monotonic()]     # count, and since when it has not moved

    def quiet() -> bool:
        cur = read().rx_packets
        if cur != last[0]:
            last[:] = [cur, time.monotonic()]
        return time.monotonic() - last[1] >= settle

    try:
        poll(quiet, timeout, interval=0.05, what="quiet counters")
    except TimeoutError:
        pass        # still moving: report what there is


def _rate(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f} "


def _us(s: float | None) -> str:
    return "inf" if s is None or s == float("inf") else f"{s * 1e6:.0f}us"
