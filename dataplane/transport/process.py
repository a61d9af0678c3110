"""One transport end as a process of a run: TransportProcess creates its control file (and a
receiver's arena), starts `python -m dataplane.transport.tcp` or
`python -m dataplane.transport.rdma.process` on them, restarts it, stops it.

The control file (struct dp_transport in native/include/dp_layout.h: state, heartbeat, stop, error,
counters) outlives the process: a restarted sender or receiver adds to the same counters, and
the receiver's record of the last batch it published lets a reconnecting sender tell delivered
batches from lost ones exactly.

Watched like a worker (dataplane/workers/supervisor.py): check() restarts an end that died or
whose heartbeat went stale (killed first), and gives up, with an event saying why, after
MAX_RESTARTS starts within RESTART_WINDOW seconds, or at once when set-up failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.control import Control
from dataplane.transport.spec import EXIT_SETUP_FAILED, TransportSpec

# the module each kind of end runs (`python -m`)
TCP_MODULE = "dataplane.transport.tcp"
RDMA_MODULE = "dataplane.transport.rdma.process"

# A running end beats at least every 20 ms; the longest it may go without is a sender's connect
# (1 s) plus its handshake (auth.DEFAULT_TIMEOUT, 5 s), or an RDMA end's blocking set-up call.
HEARTBEAT_TIMEOUT = 15.0
MAX_RESTARTS = 5           # starts within RESTART_WINDOW seconds before giving up
RESTART_WINDOW = 60.0


class TransportProcess:
    """One sender or receiver process and its control file (and, for a receiver, its arena).

    start() spawns it (in spec.netns when set); kill() and start() again are a restart on the
    same files, so counters carry on; close() stops it and removes what it created."""

    def __init__(self, spec: TransportSpec, ring_size: int = 4096, slot_size: int = 2048,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT, max_restarts: int = MAX_RESTARTS,
                 restart_window: float = RESTART_WINDOW):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.heartbeat_timeout = heartbeat_timeout
        self.max_restarts, self.restart_window = max_restarts, restart_window
        self.starts: list[float] = []       # monotonic times of start()
        Path(spec.control_path).unlink(missing_ok=True)
        self.control = Control(Path(spec.control_path), create=True)
        self.arena: Arena | None = None
        self.gave_up = ""
        if spec.role == "recv":
            Path(spec.arena_path).unlink(missing_ok=True)
            self.arena = Arena.create(Path(spec.arena_path),
                                      ArenaGeometry(1, ((0, 0),), ring_size, slot_size, 0))

    def start(self, stderr=None) -> None:
        module = RDMA_MODULE if self.spec.mode == "rdma" else TCP_MODULE
        argv = [sys.executable, "-m", module, self.spec.to_json()]
        if self.spec.netns:
            argv = ["ip", "netns", "exec", self.spec.netns, *argv]
        self.control.hdr.stop = 0
        self.control.hdr.state = 0
        self.control.hdr.heartbeat_ns = 0
        self._stderr = stderr
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
        self.starts.append(time.monotonic())

    def wait_running(self, timeout: float | None = None) -> None:
        # an RDMA end is Python importing pyverbs and registering its memory: slower to start
        timeout = timeout or (60.0 if self.spec.mode == "rdma" else 10.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"transport {self.spec.name} exited "
                                   f"{self.proc.returncode}: {self.control.error()}")
            if self.control.state() == "running":
                return
            time.sleep(0.02)
        raise RuntimeError(f"transport {self.spec.name} not running after {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL, no goodbye: what a crash looks like to the peer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.control.hdr.restarts += 1

    def heartbeat_age(self) -> float | None:
        hb = self.control.hdr.heartbeat_ns
        return (time.monotonic_ns() - hb) / 1e9 if hb else None

    def check(self) -> str | None:
        """Restart the process if it died on its own or hangs (running, heartbeat older than
        heartbeat_timeout: killed first); give up when set-up failed (that needs the operator)
        or after max_restarts starts within restart_window.  An event line for the run's log,
        or None when nothing happened."""
        p = self.proc
        if p is None or self.control.hdr.stop or self.gave_up:
            return None
        name = self.spec.name
        if p.poll() is None:
            age = self.heartbeat_age()
            if self.control.state() != "running" or age is None or age <= self.heartbeat_timeout:
                return None
            p.kill()
            p.wait(5)
            why = f"heartbeat {age:.1f} s old: killed"
        else:
            err = self.control.error() or "no error recorded"
            if p.returncode == EXIT_SETUP_FAILED:
                self.gave_up = f"set-up failed: {err}"
                return f"transport {name}: {self.gave_up}; not restarted"
            why = f"exited {p.returncode} ({err})"
        now = time.monotonic()
        recent = [t for t in self.starts if now - t < self.restart_window]
        if len(recent) >= self.max_restarts:
            self.gave_up = (f"{len(recent)} starts in {self.restart_window:.0f} s, the last "
                            f"{why}; not restarting")
            return f"transport {name} gave up: {self.gave_up}"
        self.control.hdr.restarts += 1
        self.start(self._stderr)
        return f"transport {name} {why}: restarted (restart #{self.control.hdr.restarts})"

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        self.control.hdr.stop = 1
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        self.control.close()
        Path(self.spec.control_path).unlink(missing_ok=True)
        if self.arena is not None:
            self.arena.close()
            self.arena.unlink()

    def __enter__(self) -> TransportProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
