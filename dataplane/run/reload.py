"""Reload (SIGHUP to `dataplane run`): re-read the config, and apply only what changed.

The rules (docs/operations.md, "Service mode"):
- a config that does not load, validate or plan is refused with its problems logged, and the
  running one is kept; so is one that changes what cannot change under a live run: the [lab],
  [host], [metrics] and [arena] tables and the [[transport]] tables (the namespaces and links,
  the host's journaled state, the exporter's socket, every arena's geometry and the transport
  ends' files and connections), or a worker's ports, queues or backend (its arena's geometry).
  Each refusal names the key.  Those take a restart (`systemctl restart`), said so.
- otherwise workers whose WorkerSpec changed are stopped and started again with the new spec
  on their own arena (counters go on: invariant 3), receivers before generators as at start;
  unchanged workers keep running untouched; removed ones are stopped and their arenas removed;
  added ones get a new arena and start.
Nothing is changed before every check passed, so a refused reload touches nothing; a reload
whose new or changed worker does not start is rolled back to what ran before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from dataplane import config
from dataplane.workers.spec import WorkerSpec

if TYPE_CHECKING:
    from dataplane.run.runner import Run

log = logging.getLogger("dataplane.run.reload")

# spec fields that say where the arena is, not what the worker does: a re-plan may choose
# another backing (hugepages "auto" while our own arenas hold the free pages); the running
# arena stays where it is
WHERE = ("arena_path", "hugepages", "huge_dir")
# and what only names a worker in native log lines: its index in the config, which moves when
# a worker before it is added or removed (the name is what identifies a worker)
IGNORED = (*WHERE, "worker_id")


@dataclass
class Changes:
    refused: list[str] = field(default_factory=list)     # why it cannot be applied live
    changed: list[WorkerSpec] = field(default_factory=list)    # the new specs
    added: list[WorkerSpec] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("restarted", [s.name for s in self.changed]), ("added", [s.name for s in self.added]),
            ("removed", self.removed), ("unchanged", self.unchanged)) if names]
        return "; ".join(parts) or "no workers"


def diff(old: config.Config, new: config.Config, running: list[WorkerSpec],
         planned: list[WorkerSpec]) -> Changes:
    """What a reload from `old` (running as `running`) to `new` (planned as `planned`) does."""
    ch = Changes()
    for key in ("lab", "host", "transports", "consumers"):
        if getattr(old, key) != getattr(new, key):
            name = key.removesuffix("s")
            ch.refused.append(f"{name}: changed; a running {_WHY[key]} cannot change live")
    for key in ("listen", "web_config", "max_connections"):
        if getattr(old.metrics, key) != getattr(new.metrics, key):
            ch.refused.append(f"metrics.{key}: changed; the exporter's socket is not reopened "
                              "live")
    for f in fields(old.arena):
        if getattr(old.arena, f.name) != getattr(new.arena, f.name):
            ch.refused.append(f"arena.{f.name}: changed; every running arena keeps its "
                              "geometry")
    shipped = {x.worker for x in old.transports if x.role == "send"}
    now = {s.name: s for s in running}
    for spec in planned:
        cur = now.get(spec.name)
        if cur is None:
            ch.added.append(spec)
        elif _geometry(cur) != _geometry(spec):
            ch.refused.append(f"worker {spec.name}: its ports, queues or backend changed; its "
                              "arena's geometry cannot change live")
        elif spec.name in shipped and _labels(cur) != _labels(spec):
            ch.refused.append(f"worker {spec.name}: its port names or order changed; a "
                              "transport ships one of its rings")
        elif _what(cur) != _what(spec):
            ch.changed.append(spec)
        else:
            ch.unchanged.append(spec.name)
    planned_names = {s.name for s in planned}
    ch.removed = [s.name for s in running if s.name not in planned_names]
    return ch


_WHY = {"lab": "lab's namespaces and links", "host": "host's journaled state (`up`/`down`)",
        "transports": "transport end's files and connections",
        "consumers": "consumer's code and state (a [[consumer]] is made when the run starts)"}


def _geometry(s: WorkerSpec) -> tuple:
    return (s.rings(), s.ring_size, s.slot_size, s.pool_mb)


def _labels(s: WorkerSpec) -> list[str]:
    return [p.label or p.name for p in s.ports]


def _what(s: WorkerSpec) -> dict:
    d = asdict(s)
    for k in IGNORED:
        d.pop(k)
    return d


def reload(run: Run, load: Callable[[], config.Config]) -> bool:
    """Reload the run's config (the SIGHUP handler's work, done on the main loop): True when
    applied.  Tells the service manager RELOADING=1 first and READY=1 at the end, whatever
    the outcome, with a STATUS= saying what happened."""
    run.notifier.reloading()
    log.info("reload: reading %s", run.cfg.source)
    try:
        new = load()
        planned = config.plan(new)
    except Exception as e:   # whatever failed, nothing was changed yet: refuse, keep running
        problems = e.problems if isinstance(e, config.ConfigError) else [f"{type(e).__name__}: {e}"]
        for p in problems:
            log.error("reload refused: %s", p)
        return _done(run, f"reload refused ({len(problems)} problem(s), logged); "
                          "running the previous config", ok=False)
    ch = diff(run.cfg, new, list(run.sup.specs), planned)
    if ch.refused:
        for p in ch.refused:
            log.error("reload refused: %s", p)
        return _done(run, f"reload refused: {'; '.join(ch.refused)}; running the previous "
                          "config (these need a restart)", ok=False)
    try:
        apply(run, new, ch)
    except RuntimeError as e:    # a new spec that does not start: rolled back
        log.error("reload failed: %s", e)
        return _done(run, f"reload failed: {e}", ok=False)
    log.info("reload applied: %s", ch.summary())
    return _done(run, f"reloaded: {ch.summary()}", ok=True)


def _done(run: Run, status: str, ok: bool) -> bool:
    run.notifier.ready(status)
    return ok


def apply(run: Run, new: config.Config, ch: Changes) -> None:
    """Do what diff() decided: removed workers stopped first (they may hold an interface an
    added one takes), then receivers started, then generators.  If a started worker does not
    run, everything is rolled back (RuntimeError): the previous specs restarted, the removed
    workers started again on their arenas (kept until the reload succeeded, counters and all),
    the added ones removed."""
    sup = run.sup
    old_specs = {s.name: sup.workers[s.name].spec for s in ch.changed}
    gone = [sup.remove(name) for name in ch.removed]
    run.refresh_sources()
    started = []
    try:
        for gens in (False, True):
            todo = [s for s in ch.changed + ch.added if (s.gen is not None) == gens]
            group = [sup.replace(s) if s.name in sup.workers else sup.add(s) for s in todo]
            started += group
            run.refresh_sources()
            if group:
                sup.wait_running(workers=group, tick=lambda: _tick(run))
    except RuntimeError as e:
        _roll_back(run, started, old_specs, gone)
        raise RuntimeError(f"{e}; rolled back, the previous config runs") from None
    run.cfg = new
    _unlink(run, gone)


def _roll_back(run: Run, started: list, old_specs: dict[str, WorkerSpec], gone: list) -> None:
    sup = run.sup
    added = [sup.remove(w.name) for w in started if w.name not in old_specs]
    back = [sup.replace(old_specs[w.name]) for w in started if w.name in old_specs]
    back += [sup.restore(w) for w in gone]
    run.refresh_sources()
    _unlink(run, added)
    if back:
        sup.wait_running(workers=back, tick=lambda: _tick(run))


def _tick(run: Run) -> None:
    """While workers start: the main loop is busy here, not hung; a slow start must not let
    the service watchdog expire (workers starting count as healthy, as in the loop)."""
    run.notifier.ping(not run.health(), time.monotonic())


def _unlink(run: Run, gone: list) -> None:
    """Close and remove the arenas of workers that are gone, once the loop let go of them."""
    if not gone:
        return
    _let_go(run)
    for w in gone:
        w.arena.close()
        w.arena.unlink()
        log.info("worker %s removed, arena %s unlinked", w.name, w.arena.path)


def _let_go(run: Run, timeout: float = 5.0) -> None:
    """Wait until the consumer loop has begun a pass after its rings were swapped: no batch of
    a removed arena is still being read when that arena is unmapped."""
    loop = run.loop
    if loop is None or loop.thread is None:
        return
    start = loop.passes
    deadline = time.monotonic() + timeout
    while loop.passes < start + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
