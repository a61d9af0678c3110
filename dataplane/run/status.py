"""`dataplane status`: what a config's run looks like now, read-only, as lines of text.

The host changes applied (the journal), the hugepage pools and mounts, the lab, each worker's
arena (state, pid, heartbeat age) and each [[transport]]'s control file.  Nothing here changes
anything, and nothing needs a run of this process: it reads the shared memory and /proc.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dataplane.config import Config, arena_filename
from dataplane.host.proc import pid_alive


def lines(cfg: Config) -> Iterator[str]:
    """Every line `dataplane status` prints for cfg."""
    from dataplane.host import hugepages
    from dataplane.run import updown
    yield from updown.status_lines(cfg)
    yield hugepages.show()     # what `dpdk-hugepages.py -s` shows: pools per node, mounts
    if cfg.lab is not None:
        from dataplane.run import lab
        yield f"lab: {'up' if lab.exists(cfg) else 'down'}"
        yield from lab_lines(lab.status(cfg))
    dirs = [*hugepages.hugetlbfs_mounts(), Path("/dev/shm")]
    for w in cfg.workers:
        yield worker_line(w.name, dirs)
    yield from transport_lines(cfg)


def lab_lines(st: dict[str, Any]) -> Iterator[str]:
    """The lab's namespaces and links, from dataplane.run.lab.status()."""
    for ns, present in st["namespaces"].items():
        yield f"netns {ns}: {'present' if present else 'absent'}"
    for lk in st["links"]:
        yield (f"  {lk['netns']}/{lk['name']}: {lk['state']} {lk['mac']} "
               f"{' '.join(lk['addresses'])}").rstrip()


def worker_line(name: str, dirs: list[Path]) -> str:
    """One worker, from the newest of its arena files in dirs."""
    from dataplane.shm.arena import Arena
    from dataplane.shm.layout import LayoutError
    found = find_arenas(name, dirs)
    if not found:
        return f"worker {name}: no arena (not running)"
    try:
        with Arena.open(found[0]) as a:
            h = a.header
            age = (time.monotonic_ns() - h.heartbeat_ns) / 1e9 if h.heartbeat_ns else None
            pid, state, err = h.pid, a.worker_state(), a.worker_error()
    except (OSError, LayoutError) as e:
        return f"worker {name}: arena {found[0]} unreadable: {e}"
    beat = f"heartbeat {age:.2f} s ago" if age is not None else "no heartbeat yet"
    return (f"worker {name}: arena {found[0]} state={state} pid={pid} "
            f"({'alive' if pid_alive(pid) else 'gone'}) {beat}" + (f" error: {err}" if err else ""))


def transport_lines(cfg: Config) -> Iterator[str]:
    """Each [[transport]] of the config, from its control file when a run has one."""
    from dataplane.metrics.rdma import status_line
    from dataplane.shm.control import Control, control_path
    from dataplane.shm.layout import LayoutError
    for x in cfg.transports:
        path = Path(control_path(x.name))
        where = f"{x.host}:{x.tcp_port}"
        head = f"transport {x.name} ({x.kind} {x.role} {'to' if x.role == 'send' else 'on'} " \
            f"{where})"
        if not path.exists():
            yield f"{head}: not running (no {path})"
            continue
        try:
            ctl = Control(path)
        except (OSError, LayoutError) as e:
            yield f"{head}: control file {path} unreadable: {e}"
            continue
        h, c = ctl.hdr, ctl.snapshot()
        err = ctl.error()
        yield (f"{head}: state={ctl.state()} pid={h.pid} "
               f"({'alive' if pid_alive(h.pid) else 'gone'}) "
               f"{'connected' if h.connected else 'not connected'}, batches {c['batches']}, "
               f"packets {c['packets']}, restarts {h.restarts}"
               + (", INSECURE (no key)" if x.insecure or h.auth.insecure else "")
               + (f" error: {err}" if err else ""))
        if x.kind == "rdma":
            yield status_line(x.role, x.device, ctl)
        ctl.close()


def find_arenas(worker: str, dirs: list[Path]) -> list[Path]:
    """The worker's arena files, newest first: plan() names them dataplane-NAME, the supervisor
    dataplane-RUNID-NAME (the run's pid: digits, so worker "b" does not find "a-b"'s file)."""
    pattern = re.compile(rf"{re.escape(arena_filename(''))}([0-9]+-)?{re.escape(worker)}")
    found = [f for d in dirs if d.is_dir() for f in d.iterdir() if pattern.fullmatch(f.name)]
    return sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)
