"""One transport end as a process of a run: TransportProcess creates its control file (and a
receiver's arena), starts `python -m dataplane.transport.tcp` or
`python -m dataplane.transport.rdma.process` on them, restarts it, stops it.

The control file (struct dp_transport in native/include/dp_layout.h: state, heartbeat, stop, error,
counters) outlives the process: a restarted sender or receiver adds to the same counters, and
the receiver's record of the last batch it published lets a reconnecting sender tell delivered
batches from lost ones exactly.
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


class TransportProcess:
    """One sender or receiver process and its control file (and, for a receiver, its arena).

    start() spawns it (in spec.netns when set); kill() and start() again are a restart on the
    same files, so counters carry on; close() stops it and removes what it created."""

    def __init__(self, spec: TransportSpec, ring_size: int = 4096, slot_size: int = 2048):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
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
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)

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

    def check(self) -> str | None:
        """Restart the process if it died on its own (not when set-up failed: that needs the
        operator).  An event line for the run's log, or None when nothing happened."""
        p = self.proc
        if p is None or p.poll() is None or self.control.hdr.stop or self.gave_up:
            return None
        why = self.control.error() or "no error recorded"
        if p.returncode == EXIT_SETUP_FAILED:
            self.gave_up = f"set-up failed: {why}"
            return f"transport {self.spec.name}: {self.gave_up}; not restarted"
        self.control.hdr.restarts += 1
        self.start()
        return f"transport {self.spec.name} exited {p.returncode} ({why}): restarted"

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
