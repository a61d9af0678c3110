"""`dataplane run`: bring the lab up, start the workers, drain their rings into the consumers,
serve metrics, print one line a second, and leave the host as it was found.

Shutdown order matters for accounting: generators stop first, receivers get a moment to take
what is still in flight, then the receivers stop and the consumer drains every ring, so that at
the end each generated packet was either received or counted as a drop somewhere.

A little over 400 lines: start, the run loop, reload's hook, stop and the books are one
ordered life cycle, easier to check for accounting in one file (the progress line and the
transports' set-up live in progress.py and transports.py).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from dataplane import config
from dataplane.consumers.api import RingSource
from dataplane.consumers.capture import CaptureConsumer
from dataplane.consumers.loop import ConsumerLoop, Running
from dataplane.consumers.registry import make as make_consumer
from dataplane.consumers.stats import TrafficStats
from dataplane.host.proc import poll
from dataplane.metrics.arenas import ArenaCollector
from dataplane.metrics.build import BuildInfoCollector
from dataplane.metrics.consumers import ConsumerCollector
from dataplane.metrics.drops import DropsCollector
from dataplane.metrics.mr_cache import MRCacheCollector
from dataplane.metrics.rdma import RdmaCollector, mr_caches
from dataplane.metrics.server import serve
from dataplane.metrics.transports import TransportCollector
from dataplane.run import flows, lab, progress, streams, transports
from dataplane.run.lock import RUN_LOCK, HostLock
from dataplane.run.logfile import LogFile
from dataplane.run.notify import Notifier
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

    def __init__(self, cfg: config.Config, out: TextIO = sys.stdout,
                 notifier: Notifier | None = None):
        # first, before any file is made or removed: a second run refuses here (lock.Locked)
        # and touches nothing of the first; close() releases it
        self.lock = HostLock(RUN_LOCK, "dataplane run", cfg.source)
        self.lock.acquire()
        try:
            self._setup(cfg, out)
            self.notifier = notifier or Notifier({})    # {}: not a service, no messages
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
        # the built-in statistics are a consumer like the others; an error loses that batch's
        # figures only: "made again" as the same object, its books carry on.  The [[consumer]]
        # tables are resolved and made now, before anything starts: a bad entry is an error,
        # not a half-started run
        self.consumers = [Running(self.stats, remake=lambda: self.stats),
                          *(make_consumer(c) for c in cfg.consumers)]
        # live capture (`dataplane capture`): one attribute check a batch while nobody captures
        self.capture = CaptureConsumer(lambda: self.loop.sources if self.loop else [])
        self.consumers.append(Running(self.capture, remake=lambda: self.capture))
        self.loop: ConsumerLoop | None = None
        self.metrics = None
        self.lab_created = False
        self.t0 = 0.0
        self.result: RunResult | None = None
        self.transports = transports.processes(cfg, self.specs)
        self.progress = True           # the line a second (run(): on a terminal or --progress)
        self.reload_pending = False    # SIGHUP seen; serve_until reloads (dataplane.run.reload)
        self.load: Callable[[], config.Config] | None = None   # how a reload reads the config
        self.log_file: LogFile | None = None     # --log-file: rotated by serve_until

    # -- start --
    def start(self) -> None:
        if self.cfg.lab is not None and lab.bring_up(self.cfg):
            self.lab_created = True
            log.info("lab up: namespaces %s", ", ".join(self.cfg.lab.namespaces))
        if any(p.name.startswith("net_memif") for s in self.specs for p in s.ports):
            config.ensure_run_dir()
        self.sup.create_arenas()
        # transport receivers first: a sender connects as soon as it runs
        self.receivers = [t for t in self.transports if t.spec.role == "recv"]
        for t in self.receivers:
            t.start()
            t.wait_running()
        self.shipped = {(t.spec.arena_path, t.spec.ring) for t in self.transports
                        if t.spec.role == "send"}
        self.loop = ConsumerLoop(self._ring_sources(), self.consumers)
        self.loop.start()
        arenas = self.arena_collector = ArenaCollector(self._arena_sources())
        m = self.cfg.metrics
        controls = [(t.spec, t.control) for t in self.transports]
        self.metrics = serve(arenas, ConsumerCollector(self.stats, self.loop, arenas),
                             TransportCollector(controls), RdmaCollector(controls),
                             MRCacheCollector(mr_caches(controls)), BuildInfoCollector(),
                             DropsCollector(arenas, controls), host=m.host, port=m.port,
                             web=m.web, max_connections=m.max_connections,
                             routes={"/flows": flows.route(self.stats, self.consumers),
                                     "/streams": streams.route(self.stats)})
        log.info("metrics on %s", self.metrics.url)
        # receivers first, so the generators' first packets find someone listening
        self.sup.start()
        self.sup.wait_running()
        for t in self.transports:
            if t.spec.role == "send":
                t.start()
                t.wait_running()
        self.t0 = time.monotonic()

    def _ring_sources(self) -> list[RingSource]:
        """A shipped ring has one consumer, its sender; the local consumers get the others and
        the rings of the transport receivers' arenas, each named by its worker and port."""
        return [RingSource(a, r, name, labels[r.port] if r.port < len(labels) else "")
                for name, a, labels in self._arena_sources() for r in a.rings
                if (str(a.path), r.index) not in self.shipped]

    def _arena_sources(self) -> list[tuple]:
        return ([(w.name, w.arena, [p.label or p.name for p in w.spec.ports])
                 for w in self.sup.workers.values()]
                + [(t.spec.name, t.arena, [t.spec.label]) for t in self.receivers])

    def refresh_sources(self) -> None:
        """After a reload added, removed or restarted workers: the consumer loop's rings and
        the exporter's arenas and labels, from the workers there are now."""
        self.specs = self.sup.specs
        if self.loop is not None:
            self.loop.set_sources(self._ring_sources())
            self.arena_collector.set_workers(self._arena_sources())

    def health(self) -> str:
        """'' when every worker and transport is healthy, else why not (the watchdog's food)."""
        return self.sup.health() or next(
            (f"transport {t.spec.name} gave up: {t.gave_up}" for t in self.transports
             if t.gave_up), "")

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

    def serve_until(self, stop: threading.Event, duration: float | None) -> None:
        """Watch workers, reload on request, feed the service watchdog while healthy, and print
        a line a second (with `progress`) until stop is set or duration passes."""
        prev, t_prev = self.totals(), time.monotonic()
        end = None if duration is None else self.t0 + duration
        health = ""
        while not stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            wait = min(1.0 - (now - t_prev) % 1.0, 1.0 if end is None else max(0, end - now))
            ping = self.notifier.next_ping_in(now)
            stop.wait(wait if ping is None else min(wait, ping))
            if self.reload_pending and not stop.is_set():
                self.reload_pending = False
                self._reload()
            wevents = self.sup.check()
            tevents = [e for t in self.transports if (e := t.check())]
            for ev in wevents + tevents:
                if self.progress:
                    print(f"[{time.monotonic() - self.t0:5.0f}s] {ev}", file=self.out, flush=True)
            for ev in tevents if not self.progress else []:
                log.warning("%s", ev)    # the supervisor logs its own workers' events
            now = time.monotonic()
            if (why := self.health()) != health:
                health = why
                self.notifier.status(f"degraded: {why}" if why else self.status_line())
            self.notifier.ping(not health, now)
            if now - t_prev >= 0.999:
                if self.log_file is not None:
                    self.log_file.rotate_if_full()
                cur = self.totals()
                if self.progress:
                    print(progress.line(self, prev, cur, now - t_prev), file=self.out, flush=True)
                prev, t_prev = cur, now

    def _reload(self) -> None:
        from dataplane.run import reload  # here: only a reloaded run pays for it
        if self.load is None:
            log.warning("SIGHUP: this run has no config to re-read; ignored")
            return
        reload.reload(self, self.load)

    def status_line(self) -> str:
        """What systemctl status shows (STATUS=) while all is well."""
        return (f"running {len(self.sup.workers)} worker(s), {len(self.transports)} "
                f"transport(s); metrics on {self.metrics.url if self.metrics else '-'}")

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
            self.loop.tick()       # and folded, before the books are read
        res = RunResult(seconds, self.totals(),
                        restarts=sum(int(w.arena.header.restarts)
                                     for w in self.sup.workers.values()))
        self._account(res, gens)
        self.result = res
        return res

    def _account(self, res: RunResult, gens: list) -> None:
        from dataplane.workers.rate import generator_streams
        for w, gs in ((wk, s) for wk in gens for s in generator_streams(wk.arena)):
            if not gs["tracked"]:      # sent without trailers: nothing for the books to match
                continue
            sid = gs["stream"]
            # every issued sequence number is sent or counted in tx_drops (dpdk_worker.c); a
            # frame too short for the trailer takes none (docs/lab.md, Traffic)
            sent, tx_drops = gs["with_trailer"], gs["tx_drops"]
            st = self.stats.streams.streams.get(sid)
            unique = st.unique if st else 0
            res.streams[sid] = {
                "worker": w.name, "sent": sent, "tx_drops": tx_drops,
                "received": st.received if st else 0, "unique": unique,
                "duplicates": st.duplicates if st else 0, "missing": sent - unique,
                "latency": self.stats.stream_report(sid)["latency"],
            }
            # what the receivers counted as dropped may explain what is missing
            lost = sent - unique
            if lost > res.totals.drops:
                res.ok = False
                res.problems.append(f"stream {sid} ({w.name}): sent {sent}, received "
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
                         f"{s['missing']}" + _latency_us(s.get("latency")))
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
            if self.loop is not None:
                self.loop.close()          # each consumer's close(), once
                self.loop = None
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
        progress: bool | None = None, load: Callable[[], config.Config] | None = None,
        books_json: bool = False, log_file: LogFile | None = None) -> int:
    """The `dataplane run` command: 0 when every generated packet is accounted for.

    progress: the line a second (None: when `out` is a terminal).  load: how SIGHUP re-reads
    the config (dataplane.run.reload); None: SIGHUP is ignored with a warning.  Under systemd
    (NOTIFY_SOCKET) it tells the service manager READY=1 once every worker and transport runs,
    RELOADING=1/READY=1 around a reload, STOPPING=1, and feeds the watchdog while healthy."""
    stop = threading.Event()
    notifier = Notifier()
    holder: list[Run] = []

    def on_signal(signum, _frame) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum, _frame) -> None:
        # the work is the main loop's (serve_until): a handler must not start processes
        if holder:
            holder[0].reload_pending = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # SIGHUP before the run is up would kill it by default: ignored until serve_until
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        try:
            run_ = Run(cfg, out, notifier)
        except RuntimeError as e:   # refused before anything was made (a transport's key)
            log.error("%s", e)
            return 1
        with run_ as r:
            r.load, r.log_file = load, log_file
            r.progress = out.isatty() if progress is None else progress
            try:
                r.start()
            except RuntimeError as e:
                log.error("%s", e)
                return 1
            holder.append(r)
            print(f"running {len(r.specs)} worker(s): "
                  + ", ".join(f"{s.name}" + (f"@core{s.core}" if s.core is not None else "")
                              for s in r.specs)
                  + ("" if duration is None else f" for {duration:g} s")
                  + "; Ctrl-C stops", file=out, flush=True)
            notifier.ready(r.status_line())
            r.serve_until(stop, duration)
            notifier.stopping()
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


def _latency_us(lat: dict | None) -> str:
    """A stream's latency percentiles for its line of the books (microseconds)."""
    if not lat or not lat.get("count"):
        return ""
    return "; latency us: " + " ".join(f"{k.replace('_', '.')} {lat[k] * 1e6:.1f}"
                                       for k in ("p50", "p99", "p99_9", "max"))
