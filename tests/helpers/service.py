"""A real `dataplane run` as systemd would start it, without systemd: a notify socket bound by
the test (what the service manager listens on), NOTIFY_SOCKET and WATCHDOG_USEC in the run's
environment, its workers read from their arena files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.processes import stop_process

DP = str(Path(sys.executable).parent / "dataplane")


class NotifyListener:
    """The service manager's end of sd_notify: an AF_UNIX datagram socket, read by a thread of
    its own as systemd reads it (promptly: a queue left full would make the sender's
    messages fail); every message kept as a dict of its KEY=VALUE lines."""

    def __init__(self, address: str):
        self.env_value = address                   # what NOTIFY_SOCKET says
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode().split("\n")
            msg = dict(ln.split("=", 1) for ln in lines if ln)
            self.messages = [*self.messages, (time.monotonic(), msg)]    # replaced: no lock

    def wait_for(self, key: str, value: str = "1", timeout: float = 90.0,
                 contains: bool = False, after: int = 0) -> tuple[int, dict[str, str]]:
        """The first message from index `after` on with KEY=value (KEY containing value if
        `contains`), and its index; AssertionError, listing what came, on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (_, m) in enumerate(self.messages[after:], after):
                got = m.get(key)
                if got == value or (contains and got is not None and value in got):
                    return i, m
            assert time.monotonic() < deadline, (
                f"no {key}={value} in {timeout:.0f} s; got {self.kinds()}")
            time.sleep(0.02)

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Every message arriving in the next `seconds`."""
        start = len(self.messages)
        time.sleep(seconds)
        return [m for _, m in self.messages[start:]]

    def kinds(self) -> list[str]:
        return [",".join(k for k in m if k != "MONOTONIC_USEC") for _, m in self.messages]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(1)
        self.sock.close()


@dataclass
class ServiceRun:
    proc: subprocess.Popen
    notify: NotifyListener
    stdout: Path
    stderr: Path
    arenas: dict[str, Path] = field(default_factory=dict)

    def worker(self, name: str) -> tuple[str, int]:
        """(state, pid) from the worker's arena header."""
        from dataplane.shm.arena import Arena
        with Arena.open(self.arenas[name]) as a:
            return a.worker_state(), int(a.header.pid)

    def port_counter(self, name: str, counter: str, port: int = 0) -> int:
        from dataplane.shm.arena import Arena
        from dataplane.shm.layout import PORT_COUNTERS
        with Arena.open(self.arenas[name]) as a:
            return int(a.port_counters[port][PORT_COUNTERS.index(counter)])

    def rx_packets(self, name: str) -> int:
        from dataplane.shm.arena import Arena
        with Arena.open(self.arenas[name]) as a:
            return sum(r.counter("rx_packets") for r in a.rings)

    def logs(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


@contextmanager
def service_run(cfg: Path, tmp: Path, notify_address: str, watchdog_usec: int = 2_000_000,
                extra: tuple[str, ...] = (), env: dict[str, str] | None = None
                ) -> Iterator[ServiceRun]:
    """`dataplane run --config CFG` with the notify socket and watchdog set; killed (and its
    lab left to its own clean-up) if the test fails before stopping it."""
    from dataplane import config
    listener = NotifyListener(notify_address)
    e = dict(os.environ, NOTIFY_SOCKET=notify_address, WATCHDOG_USEC=str(watchdog_usec),
             **(env or {}))
    out, err = tmp / "stdout", tmp / "stderr"
    with out.open("w") as fo, err.open("w") as fe:
        if env and env.get("JOURNAL_STREAM") == "stderr":   # stderr is "the journal"
            st = os.fstat(fe.fileno())
            e["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([DP, "run", "--config", str(cfg), *extra], stdout=fo,
                                stderr=fe, stdin=subprocess.DEVNULL, env=e)
    arenas = {s.name: Path(s.arena_path) for s in config.plan(config.load(cfg))}
    run = ServiceRun(proc, listener, out, err, arenas)
    try:
        yield run
    finally:
        stop_process(proc, signal.SIGTERM, 60)
        listener.close()


def stop(run: ServiceRun, timeout: float = 60) -> int:
    """SIGTERM, as `systemctl stop` sends; the exit status."""
    run.proc.send_signal(signal.SIGTERM)
    return run.proc.wait(timeout)


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
