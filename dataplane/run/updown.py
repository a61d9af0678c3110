"""`dataplane up` and `down`: prepare the host and start the dataplane in the background; stop
it and put the host back.

Everything `up` does is a journaled change, including the background `dataplane run` itself
(kind "process": undone by stopping it), so `down` is exactly "undo the journal", and a `down`
after a SIGKILL'd `up` undoes whatever that `up` had reached.  `up` on a host that still has a
journal from an `up` that never finished restores it first; `up` while the dataplane runs does
nothing; `down` with no journal does nothing.

`up --host-only` prepares the host and starts nothing: a service manager runs `dataplane run`
itself (config/systemd/dataplane.service: ExecStartPre= `up --host-only`, ExecStopPost= `down`).
It leaves the memlock limit out too: a limit set on `up`'s own process would end with it, and
the unit's LimitMEMLOCK= gives the run its limit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dataplane import host
from dataplane.host import Journal, PlanLine
from dataplane.host.files import open_private
from dataplane.host.plan import host_changes, problems
from dataplane.host.proc import poll, start_time
from dataplane.host.profile import Memlock
from dataplane.run.lock import HOST_LOCK, RUN_LOCK, HostLock, Locked, holder

log = logging.getLogger("dataplane.up")


class UpError(RuntimeError):
    pass


class Blocked(UpError):
    """The plan cannot be applied on this host; nothing was changed."""


class RunProcess:
    """The background `dataplane run`, as a change: apply starts it, undo stops it."""
    kind = "process"

    def __init__(self, config_path: str | None, log_path: Path):
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def describe(self) -> PlanLine:
        return PlanLine("dataplane run", "stopped", "running",
                        f"config {self.config_path or '<embedded default>'}, log {self.log_path}")

    def needed(self) -> bool:
        return True

    def journal_entry(self) -> dict[str, Any]:
        return {}    # pid known only after apply(): recorded then (see up())

    def apply(self) -> None:
        # --log-file: the run rotates the file itself (dataplane/run/logfile.py); the fd below
        # only catches what it prints before it opens it
        argv = [sys.executable, "-m", "dataplane.cli", "run", "--log-file", str(self.log_path)]
        if self.config_path:
            argv += ["--config", str(Path(self.config_path).resolve())]
        fd = open_private(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                         start_new_session=True)
        finally:
            os.close(fd)


def stop_process(e: dict[str, Any]) -> None:
    pid, start = e.get("pid"), e.get("start_time")
    if not pid or start_time(pid) != start:
        return          # gone already (or never started): nothing to stop
    os.kill(pid, signal.SIGTERM)
    try:
        poll(lambda: start_time(pid) != start, timeout=60, interval=0.1, what="run to stop")
    except TimeoutError:
        log.warning("dataplane run (pid %d) ignored SIGTERM for 60 s; killing it", pid)
        os.kill(pid, signal.SIGKILL)


host.UNDO["process"] = stop_process


def running(journal: Journal) -> int | None:
    for e in journal.entries:
        if e["kind"] == "process" and e.get("pid") and start_time(e["pid"]) == e.get(
                "start_time"):
            return e["pid"]
    return None


def up(cfg, config_path: str | None, host_only: bool = False) -> list[str]:
    """Apply the host changes and start the run (not with host_only); refused (Locked) while
    another `up` or `down` runs, or while a `dataplane run` of someone else's runs, before
    anything changes."""
    with HostLock(HOST_LOCK, "dataplane up", cfg.source):
        return _up(cfg, config_path, host_only)


def _up(cfg, config_path: str | None, host_only: bool) -> list[str]:
    journal = Journal(cfg.host.journal_dir)
    pid = running(journal)
    if pid:
        return [f"already up: dataplane run is pid {pid}; nothing to do (`dataplane down` "
                "first to change anything)"]
    other = holder(RUN_LOCK)
    if other:
        raise Locked(f"dataplane up: refused, nothing was touched: {other} is running; stop "
                     "it first (its host and lab are not ours to change under it)")
    out = []
    if journal.entries:
        out.append(f"{journal.path}: an earlier `up` did not finish (crashed or killed); "
                   "restoring what it changed first")
        out += remove_stale_arenas(cfg)
        out += host.undo(journal)
    changes = host_changes(cfg)
    if host_only:       # no run of ours to carry the limit: the service manager sets it
        changes = [c for c in changes if not isinstance(c, Memlock)]
    blocked = problems(changes)
    if blocked:
        raise Blocked("nothing was changed; `up` cannot apply this plan:\n  - "
                      + "\n  - ".join(blocked))
    try:
        out += host.apply(changes, journal)
        if cfg.workers and not host_only:
            out.append(_start_run(cfg, config_path, journal))
    except BaseException as e:
        log.error("up failed (%s); restoring what it had changed", e)
        try:
            host.undo(journal)
        except Exception as undo_error:     # the first failure is what the user must see
            log.error("restoring failed too (%s); `dataplane down` undoes the rest", undo_error)
        raise
    return out


def _start_run(cfg, config_path: str | None, journal: Journal) -> str:
    rp = RunProcess(config_path, Path(cfg.host.journal_dir) / "run.log")
    # journal first (no pid yet: undo of an entry without one is a no-op), then start, then
    # record the pid: a kill in between leaves at worst a process `down` cannot name
    journal.record({"kind": "process"})
    rp.apply()
    assert rp.proc is not None
    journal.entries[-1].update(pid=rp.proc.pid, start_time=start_time(rp.proc.pid))
    journal.record(journal.entries.pop())
    from dataplane.config.specs import plan
    paths = [Path(s.arena_path) for s in plan(cfg)]
    proc = rp.proc

    def all_running() -> bool:
        if proc.poll() is not None:
            tail = Path(rp.log_path).read_text()[-1500:]
            raise UpError(f"dataplane run exited with status {proc.returncode}:\n{tail}")
        return all(_worker_running(p) for p in paths)

    try:
        poll(all_running, timeout=90, interval=0.2, what="workers")
    except TimeoutError:
        raise UpError(f"workers not running after 90 s; see {rp.log_path}") from None
    return f"dataplane run started: pid {proc.pid}, log {rp.log_path}"


def _worker_running(path: Path) -> bool:
    from dataplane.shm.arena import Arena
    try:
        with Arena.open(path) as a:
            return a.worker_state() == "running"
    except (OSError, RuntimeError):
        return False        # not there yet


def down_config(path: str | None) -> SimpleNamespace:
    """What `down` needs of a config that no longer loads: its journal_dir ([host], else the
    default) and its workers' names, read leniently from the TOML; the journal itself says
    what to undo."""
    from dataplane.config.tables import checks
    from dataplane.host.journal import DEFAULT_DIR
    try:
        raw = tomllib.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        raw = {}
    host = raw.get("host") if isinstance(raw.get("host"), dict) else {}
    jd = host.get("journal_dir")
    workers = raw.get("worker") if isinstance(raw.get("worker"), list) else []
    names = [w["name"] for w in workers if isinstance(w, dict) and isinstance(w.get("name"), str)
             and checks.name(w["name"]) is None]
    return SimpleNamespace(source=str(path), workers=[SimpleNamespace(name=n) for n in names],
                           host=SimpleNamespace(journal_dir=Path(jd if isinstance(jd, str)
                                                                 else DEFAULT_DIR)))


def down(cfg) -> list[str]:
    """Undo the journal; refused (Locked) while an `up` or another `down` runs."""
    with HostLock(HOST_LOCK, "dataplane down", cfg.source):
        return _down(cfg)


def _down(cfg) -> list[str]:
    journal = Journal(cfg.host.journal_dir)
    out = remove_stale_arenas(cfg)
    if not journal.entries:
        return [*out, "nothing to undo: no journal (the host is as `up` found it)"]
    return out + host.undo(journal)


def remove_stale_arenas(cfg) -> list[str]:
    """The arena files of a run that died without cleaning up (SIGKILL, systemd's watchdog):
    in hugetlbfs they hold pages that a journaled pool size cannot be restored without.  None
    while a run holds the run lock; a file whose worker still lives is left, with a warning."""
    if holder(RUN_LOCK):
        return []
    from dataplane.host.hugepages import hugetlbfs_mounts
    from dataplane.run.status import find_arenas
    from dataplane.workers.supervisor import _remove_stale  # the run's own rule, reused
    dirs = [*hugetlbfs_mounts(), Path("/dev/shm")]
    out = []
    for w in cfg.workers:
        for f in find_arenas(w.name, dirs):
            try:
                _remove_stale(f)
                out.append(f"removed stale arena {f}")
            except RuntimeError as e:
                log.warning("%s", e)
    return out


def status_lines(cfg) -> list[str]:
    journal = Journal(cfg.host.journal_dir)
    if not journal.entries:
        return [f"host: nothing applied (no journal in {journal.dir})"]
    pid = running(journal)
    lines = [f"host: {len(journal.entries)} change(s) applied, journal {journal.path}"
             + (f"; dataplane run pid {pid}" if pid else "")]
    for e in journal.entries:
        rest = ", ".join(f"{k}={v}" for k, v in e.items() if k != "kind")
        lines.append(f"  {e['kind']}: {rest}")
    return lines
