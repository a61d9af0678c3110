"""The worker supervisor: create each worker's arena, start and pin the worker, watch its
heartbeat, restart it when it dies, and stop everything cleanly.

Counters live in the arena, which the supervisor owns: a restarted worker maps the same file and
adds to the same counters, so nothing Prometheus has seen goes backwards (docs/design.md,
invariant 3).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataplane.host.proc import pid_alive, poll
from dataplane.shm.arena import Arena, choose_backing
from dataplane.workers.spec import WorkerSpec

log = logging.getLogger("dataplane.workers.supervisor")

DPDK_RUN_DIR = Path("/var/run/dpdk")


@dataclass
class WorkerProcess:
    """One worker as the supervisor sees it: its spec, its arena, the process running it."""

    spec: WorkerSpec
    arena: Arena
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    starts: list[float] = field(default_factory=list)
    gave_up: str = ""          # why the supervisor stopped restarting it

    @property
    def name(self) -> str:
        return self.spec.name

    def heartbeat_age(self) -> float | None:
        hb = self.arena.header.heartbeat_ns
        return None if hb == 0 else (time.monotonic_ns() - hb) / 1e9

    def file_prefix(self) -> str:
        # dataplane.workers.process names its EAL prefix after itself; `ip netns exec` execs, so
        # the child's pid is the worker's
        return f"dp-{self.spec.name}-{self.proc.pid if self.proc else 0}"


class Supervisor:
    """Start, watch and stop workers.  Call check() periodically (the runner does, every ~0.5 s)."""

    def __init__(self, specs: list[WorkerSpec], run_id: str | None = None,
                 heartbeat_timeout: float = 3.0, start_timeout: float = 60.0,
                 max_restarts: int = 5, restart_window: float = 60.0):
        self.specs = specs
        self.run_id = run_id or f"{os.getpid()}"
        self.heartbeat_timeout = heartbeat_timeout
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.workers: dict[str, WorkerProcess] = {}
        self._stopping = False

    # -- set-up --
    def create_arenas(self) -> None:
        for spec in self.specs:
            self._create_arena(spec)

    def _create_arena(self, spec: WorkerSpec) -> WorkerProcess:
        geo = spec.geometry()
        if spec.arena_path:
            path = Path(spec.arena_path)        # the plan chose it
        else:
            name = f"dataplane-{self.run_id}-{spec.name}"
            path = choose_backing(name, Arena.layout(geo).arena_size, prefer_huge=spec.hugepages)
        _remove_stale(path)
        arena = Arena.create(path, geo)
        spec.arena_path = str(path)
        w = self.workers[spec.name] = WorkerProcess(spec, arena)
        log.info("arena %s: %d MiB, %d ring(s) of %d", path, arena.header.arena_size >> 20,
                 arena.n_rings, arena.ring_size)
        return w

    def start(self, timeout: float = 60.0) -> None:
        """Receivers first, generators once every receiver runs: a generator's first packets
        would otherwise reach a port nobody polls yet (af_xdp attaches its program late) and be
        lost where no counter of ours sees them."""
        if not self.workers:
            self.create_arenas()
        receivers = [w for w in self.workers.values() if w.spec.gen is None]
        generators = [w for w in self.workers.values() if w.spec.gen is not None]
        for w in receivers:
            self._spawn(w)
        if generators and receivers:
            self.wait_running(timeout, receivers)
        for w in generators:
            self._spawn(w)

    def _spawn(self, w: WorkerProcess) -> None:
        argv = [sys.executable, "-m", "dataplane.workers.process", w.spec.to_json()]
        if w.spec.netns:
            argv = ["ip", "netns", "exec", w.spec.netns, *argv]
        h = w.arena.header
        h.stop = 0
        h.state = 0
        h.heartbeat_ns = 0
        w.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        w.started_at = time.monotonic()
        w.starts.append(w.started_at)
        log.info("worker %s: started pid %d%s%s", w.name, w.proc.pid,
                 f" on core {w.spec.core}" if w.spec.core is not None else "",
                 f" in netns {w.spec.netns}" if w.spec.netns else "")

    # -- watching --
    def health(self, stale: float = 1.0) -> str:
        """'' when every worker is healthy, else why not (the first one that is not): given up,
        exited, or running with a heartbeat older than `stale` seconds (the 1 s after which
        dataplane_worker_up says 0; check() restarts it only after heartbeat_timeout).  A
        worker being started or restarted counts as healthy: check() bounds that by
        start_timeout.  What the service's watchdog is fed on (dataplane.run.notify)."""
        for w in self.workers.values():
            if w.gave_up:
                return f"worker {w.name} gave up: {w.gave_up}"
            if w.proc is None or w.proc.poll() is not None:
                return f"worker {w.name} is not running"
            age = w.heartbeat_age()
            if w.arena.worker_state() == "running" and (age is None or age > stale):
                return f"worker {w.name}: heartbeat {age or 0:.1f} s old"
        return ""

    def check(self) -> list[str]:
        """Restart dead or hung workers.  Returns a line per event, for the live summary."""
        events = []
        if self._stopping:
            return events
        now = time.monotonic()
        for w in self.workers.values():
            if w.proc is None or w.gave_up:
                continue
            rc = w.proc.poll()
            state = w.arena.worker_state()
            age = w.heartbeat_age()
            why = ""
            if rc is not None:
                why = f"exited with status {rc}"
                if state == "failed":
                    why += f": {w.arena.worker_error()}"
            elif state == "running" and age is not None and age > self.heartbeat_timeout:
                why = f"heartbeat {age:.1f} s old"
            elif state in ("empty", "starting") and now - w.started_at > self.start_timeout:
                why = f"not running after {self.start_timeout:.0f} s"
            if not why:
                continue
            events.append(f"worker {w.name} {why}")
            log.warning("worker %s %s", w.name, why)
            self._reap(w)
            recent = [t for t in w.starts if now - t < self.restart_window]
            faults = w.arena.ring_faults() if state == "failed" else []
            if faults:   # a restart would stop at once on the same indices
                w.gave_up = ("stopped: shared memory corrupted: "
                             f"{w.arena.worker_error() or '; '.join(faults)}")
            elif state == "failed" and rc == 2 and len(w.starts) == 1:
                w.gave_up = f"set-up failed: {w.arena.worker_error()}"
            elif len(recent) >= self.max_restarts:
                w.gave_up = (f"{len(recent)} starts in {self.restart_window:.0f} s; "
                             "not restarting (see the log above for why)")
            if w.gave_up:
                log.error("worker %s: %s", w.name, w.gave_up)
                events.append(f"worker {w.name} gave up: {w.gave_up}")
                continue
            w.arena.header.restarts += 1
            self._spawn(w)
            events.append(f"worker {w.name} restarted (restart #{w.arena.header.restarts})")
        return events

    def _reap(self, w: WorkerProcess) -> None:
        if w.proc is not None and w.proc.poll() is None:
            _kill(w.proc)
        self._remove_runtime_dir(w)

    def _remove_runtime_dir(self, w: WorkerProcess) -> None:
        # EAL leaves its runtime directory (config, fbarray files) behind when killed.
        d = DPDK_RUN_DIR / w.file_prefix()
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)

    def wait_running(self, timeout: float = 60.0, workers: list[WorkerProcess] | None = None,
                     tick: Callable[[], object] | None = None) -> None:
        """Block until every worker is running; raise with the worker's own error otherwise.
        tick: called at every look (a reload feeds the service watchdog with it)."""
        workers = list(self.workers.values()) if workers is None else workers

        def all_running() -> bool:
            if tick is not None:
                tick()
            for w in workers:
                if w.proc is not None and w.proc.poll() is not None:
                    err = w.arena.worker_error() or f"exited with status {w.proc.returncode}"
                    raise RuntimeError(f"worker {w.name} failed to start: {err}")
            return all(w.arena.worker_state() == "running" for w in workers)

        try:
            poll(all_running, timeout, interval=0.05, what="workers")
        except TimeoutError:
            states = ", ".join(f"{w.name}={w.arena.worker_state()}" for w in workers)
            raise RuntimeError(f"workers not running after {timeout:.0f} s: {states}") from None

    # -- shutting down --
    def stop(self, timeout: float = 10.0) -> None:
        """Ask every worker to stop, wait, then force; unlink arenas.  Idempotent."""
        self._stopping = True
        self._stop_workers(list(self.workers.values()), timeout)

    def _stop_workers(self, workers: list[WorkerProcess], timeout: float = 10.0) -> None:
        for w in workers:
            w.arena.request_stop()
        deadline = time.monotonic() + timeout
        for w in workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0f s; killing it", w.name, timeout)
            self._reap(w)

    # -- reload (dataplane.run.reload decides what; these do it) --
    def replace(self, spec: WorkerSpec) -> WorkerProcess:
        """Restart a worker with a new spec on its own arena, whose geometry the caller checked
        is the spec's: its counters go on (invariant 3).  Not a failure: its restart count
        stays, and its restart budget starts afresh (a new spec that fails set-up on its first
        start is given up at once, as at the run's start)."""
        w = self.workers[spec.name]
        self._stop_workers([w])
        spec.arena_path, spec.hugepages, spec.huge_dir = (w.spec.arena_path, w.spec.hugepages,
                                                         w.spec.huge_dir)
        w.spec, w.starts, w.gave_up = spec, [], ""
        self.specs = [spec if s.name == spec.name else s for s in self.specs]
        self._spawn(w)
        return w

    def add(self, spec: WorkerSpec) -> WorkerProcess:
        """A new worker: its arena, then the process."""
        w = self._create_arena(spec)
        self.specs = [*self.specs, spec]
        self._spawn(w)
        return w

    def restore(self, w: WorkerProcess) -> WorkerProcess:
        """A removed worker back, on its arena (a reload rolled back)."""
        self.workers[w.name] = w
        self.specs = [*self.specs, w.spec]
        w.starts, w.gave_up = [], ""
        self._spawn(w)
        return w

    def remove(self, name: str) -> WorkerProcess:
        """Stop a worker and forget it; the caller closes and unlinks its arena once no reader
        (the consumer loop, a scrape) holds it any more."""
        w = self.workers.pop(name)
        self.specs = [s for s in self.specs if s.name != name]
        self._stop_workers([w])
        return w

    def close(self) -> None:
        self.stop()
        for w in self.workers.values():
            w.arena.close()
            w.arena.unlink()
        self.workers.clear()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL.  `ip netns exec` execs the worker, so the pid is the worker's."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _remove_stale(path: Path) -> None:
    """An arena left by a crashed run is removed; one whose worker still lives is an error."""
    if not path.exists():
        return
    try:
        old = Arena.open(path)
        pid, state = old.header.pid, old.worker_state()
        old.close()
    except Exception as e:  # not ours, or from another layout version: say so, don't guess
        raise RuntimeError(f"{path} exists and is not a usable arena ({e}); "
                           "remove it if no dataplane is running") from e
    if pid > 0 and state in ("starting", "running") and pid_alive(pid):
        raise RuntimeError(f"{path} belongs to a running worker (pid {pid}); "
                           "stop that dataplane first (dataplane status shows it)")
    log.info("removing stale arena %s (worker pid %d, state %s)", path, pid, state)
    path.unlink()
