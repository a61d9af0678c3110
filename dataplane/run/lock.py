"""Host-wide locks: one `dataplane run` (and the lab it uses) at a time, one `up`/`down` at a
time.

A lock is flock(2) on a file in the run directory (0700, root's), opened O_NOFOLLOW and 0600:
the kernel drops it when its holder exits, however it exits, so a dead holder's lock is free by
construction and there is nothing stale to clean up.  The holder writes who it is (pid, what,
config, start time) into the file, so a refused second command names the running one.  A lock
is taken BEFORE anything else is read or made, so a refused command touches nothing.

Within one process the same lock may be taken again (a run brings its lab up): flock locks
belong to an open file, and a second open file of the same process would wait for the first.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from dataplane.config.specs import ensure_run_dir
from dataplane.config.workers import RUN_DIR
from dataplane.host.files import open_private, write_all

RUN_LOCK = "run.lock"       # a run, and `lab up`/`lab down` (a lab under a running run)
HOST_LOCK = "host.lock"     # `up` and `down` (the journal and the host changes)

_held: dict[str, list[Any]] = {}     # path -> [fd, depth]: the locks this process holds


class Locked(RuntimeError):
    """Another process holds the lock; nothing was changed."""


class HostLock:
    """`with HostLock(RUN_LOCK, "dataplane run", cfg.source):` -- held for the block."""

    def __init__(self, name: str, what: str, config: str = "", directory: Path = RUN_DIR):
        self.dir = Path(directory)
        self.path = self.dir / name
        self.what, self.config = what, config
        self.held = False            # by this object: release() is then idempotent

    def acquire(self) -> None:
        if self.held:
            return
        key = str(self.path)
        if key in _held:
            _held[key][1] += 1
            self.held = True
            return
        ensure_run_dir(self.dir)
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(_read(fd))
            os.close(fd)
            raise Locked(f"{self.what}: refused, nothing was touched: {who} holds {self.path}; "
                         "stop it first (Ctrl-C, or `dataplane down` for one `up` started)"
                         ) from None
        except BaseException:
            os.close(fd)
            raise
        doc = {"pid": os.getpid(), "what": self.what, "config": self.config,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        write_all(fd, json.dumps(doc).encode())
        _held[key] = [fd, 1]
        self.held = True

    def release(self) -> None:
        key = str(self.path)
        if not self.held or key not in _held:
            return
        self.held = False
        _held[key][1] -= 1
        if _held[key][1] > 0:
            return
        fd = _held.pop(key)[0]
        os.ftruncate(fd, 0)          # nobody: a reader of the file sees no stale holder
        os.close(fd)                 # closing the last descriptor drops the flock

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(name: str, directory: Path = RUN_DIR) -> str | None:
    """Who holds lock NAME now ("dataplane run (pid ...)"), or None when it is free.  Probes
    with a shared lock for an instant: it never blocks and never takes the lock over."""
    path = Path(directory) / name
    if str(path) in _held:
        return None                  # this process: not another one
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_read(fd))
    finally:
        os.close(fd)                 # also drops the shared probe lock
    return None


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(doc: dict[str, Any]) -> str:
    if not doc.get("pid"):
        return "another dataplane process (starting: it has not written its pid yet)"
    return (f"{doc.get('what', 'dataplane')} (pid {doc['pid']}, config "
            f"{doc.get('config') or '<embedded default>'}, started {doc.get('started', '?')})")
