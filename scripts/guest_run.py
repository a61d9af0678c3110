"""Running a check script inside the project's QEMU guest (scripts/guest) from Python, for the
guest test modules (through tests/conftest.py) and the RDMA benchmarks in perf/ alike: neither
imports the other, both import this.

A check script does every check in one Python process (Python under TCG is slow) and writes
{name: {"ok", "detail", "error"}} to /lab/results.json; `GuestRun.ok()` turns one entry into its
detail or an AssertionError that shows the guest's output.  `run_pair` boots two such guests at
once, joined by a QEMU socket link (scripts/guest --link), for what needs two hosts.

No pytest here: a guest that cannot run is a `GuestUnavailable`, one that wrote no results a
`GuestError`; tests/conftest.py makes the first a skip and the second a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "scripts" / "guest"
CHECKS = REPO / "tests" / "guest"


class GuestUnavailable(Exception):
    """QEMU cannot run here (the reason is the message)."""


class GuestError(AssertionError):
    """A guest ran but wrote no results, or a check in it failed."""


@dataclass
class GuestRun:
    """What one guest left: its results file (empty when it wrote none), console, exit status."""
    results: dict[str, Any]
    output: str
    rc: int | None

    def ok(self, name: str) -> Any:
        """The detail of check `name`; a GuestError, with the guest's output, if it failed or
        did not run."""
        r = self.results.get(name)
        if r is None:
            raise GuestError(f"check {name} did not run; guest output:\n{self.output}")
        if not r["ok"]:
            raise GuestError(f"{name} failed in the guest:\n{r['error']}\n"
                             f"guest output:\n{self.output}")
        return r["detail"]


def qemu_why_not() -> str:
    """Why the guest cannot boot here, or "" when it can."""
    try:
        r = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    except FileNotFoundError:   # scripts/guest installs it with apt, as root
        return "" if os.geteuid() == 0 else "no qemu-system-x86_64, and not root to install it"
    return "" if r.returncode == 0 else f"qemu-system-x86_64 cannot run: {r.stderr.strip()}"


def _require_qemu() -> None:
    why = qemu_why_not()
    if why:
        raise GuestUnavailable(why)


class _Boot:
    """One scripts/guest run of SCRIPT (a path relative to tests/guest) in the background, its
    console in a file (two guests at once: pipes would need a reader each, or one fills up and
    stalls its guest)."""

    def __init__(self, script: str, script_args: tuple[str, ...], flags: tuple[str, ...]) -> None:
        self.label = f"{script} {' '.join(script_args)}".strip()
        self.out = tempfile.TemporaryDirectory(prefix="guest-run-")
        self.log = tempfile.TemporaryFile("w+")
        self.t = time.monotonic()
        path = os.path.relpath(CHECKS / script, REPO)
        # a session of its own: scripts/guest runs qemu under `timeout`, and killing the shell
        # alone would leave the guest running
        self.p = subprocess.Popen([str(GUEST), *flags, "--out", self.out.name, "--",
                                   sys.executable, path, *script_args, "/lab/results.json"],
                                  cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)

    def finish(self, timeout: float) -> GuestRun:
        """Wait for the guest; what it left, the results empty when it wrote none."""
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            # what the guest printed says which step hung: keep it, do not lose it with the run
            self.kill()
            self.log.seek(0)
            tail = self.log.read()[-6000:]
            raise GuestError(f"the guest ({self.label}) did not finish in {timeout:.0f} s; its "
                             f"console ended with:\n{tail}") from None
        finally:
            self.kill()
        res = Path(self.out.name) / "results.json"
        results = json.loads(res.read_text()) if res.exists() else {}
        self.out.cleanup()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        print(f"\nguest ({self.label}) exited {rc} after {time.monotonic() - self.t:.0f} s")
        return GuestRun(results, output, rc)

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def run_checks(script: str, *script_args: str, flags: tuple[str, ...] = ()) -> GuestRun:
    """Boot the guest with `flags`, run tests/guest/SCRIPT with its args; what it left."""
    _require_qemu()
    run = _Boot(script, script_args, flags).finish(900)
    if not run.results:
        raise GuestError(f"the guest wrote no results (exit {run.rc}):\n{run.output}")
    return run


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, from /proc/net/tcp: connecting to find out
    would be taken by QEMU for the other guest (its socket link accepts one connection)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want and f[3] == "0A":       # 0A: TCP_LISTEN
            return True
    return False


def run_pair(script: str, listen_args: tuple[str, ...], connect_args: tuple[str, ...],
             flags: tuple[str, ...] = (), timeout: float = 600) -> tuple[GuestRun, GuestRun]:
    """Boot two guests joined by a QEMU socket link (one emulated CPU each: the host has two),
    each running tests/guest/SCRIPT: the `listen` side (its link address 10.6.6.1) with
    listen_args, then, once its QEMU listens, the `connect` side (10.6.6.2) with connect_args.
    Both runs; a GuestError when either wrote no results."""
    _require_qemu()
    with socket.socket() as s:      # a free port; QEMU binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = (*flags, "--smp", "1", "--timeout", str(int(timeout)))
    a = _Boot(script, listen_args, (*common, "--link", f"listen:{port}"))
    b = None
    try:
        end = time.monotonic() + timeout    # the first run builds the kernel cache first
        while not _listening(port):
            if a.p.poll() is not None or time.monotonic() > end:
                break
            time.sleep(0.1)
        if a.p.poll() is None:
            b = _Boot(script, connect_args, (*common, "--link", f"connect:{port}"))
            runs = (a.finish(timeout + 60), b.finish(timeout + 60))
        else:
            runs = (a.finish(0), GuestRun({}, "(not started)", None))
    finally:
        for g in (a, b):
            if g:
                g.kill()
    if not (runs[0].results and runs[1].results):
        raise GuestError("a guest of the pair wrote no results:\n" + "\n".join(
            f"--- {side} side (exit {r.rc}):\n{r.output}"
            for side, r in zip(("listen", "connect"), runs, strict=True)))
    return runs
