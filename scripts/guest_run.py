"""Running a check script inside the project's QEMU guest (scripts/guest), once per test module:
the script does every check in one Python process (Python under TCG is slow) and writes
{name: {"ok", "detail", "error"}} to /lab/results.json; `ok()` turns one entry into a result
or a failure that shows the guest's output.  `run_pair` boots two such guests at once, joined
by a QEMU socket link (scripts/guest --link), for what needs two hosts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "scripts" / "guest"


def _qemu_why_not() -> str:
    try:
        r = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    except FileNotFoundError:   # scripts/guest installs it with apt, as root
        return "" if os.geteuid() == 0 else "no qemu-system-x86_64, and not root to install it"
    return "" if r.returncode == 0 else f"qemu-system-x86_64 cannot run: {r.stderr.strip()}"


class _Boot:
    """One scripts/guest run of tests/guest/SCRIPT in the background, its console in a file (two
    guests at once: pipes would need a reader each, or one fills up and stalls its guest)."""

    def __init__(self, script: str, script_args: tuple[str, ...], flags: tuple[str, ...]) -> None:
        self.label = f"{script} {' '.join(script_args)}".strip()
        self.out = tempfile.TemporaryDirectory(prefix="guest-run-")
        self.log = tempfile.TemporaryFile("w+")
        self.t = time.monotonic()
        # a session of its own: scripts/guest runs qemu under `timeout`, and killing the shell
        # alone would leave the guest running
        self.p = subprocess.Popen([str(GUEST), *flags, "--out", self.out.name, "--",
                                   sys.executable, f"tests/guest/{script}", *script_args,
                                   "/lab/results.json"], cwd=REPO, stdout=self.log,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the guest; {"results", "output", "rc"}, the results empty when it wrote none."""
        try:
            rc = self.p.wait(timeout)
        finally:
            self.kill()
        res = Path(self.out.name) / "results.json"
        results = json.loads(res.read_text()) if res.exists() else {}
        self.out.cleanup()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        print(f"\nguest ({self.label}) exited {rc} after {time.monotonic() - self.t:.0f} s")
        return {"results": results, "output": output, "rc": rc}

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def _skip_without_qemu() -> None:
    why = _qemu_why_not()
    if why:
        print(why)
        pytest.skip(why)


def run_checks(script: str, *script_args: str, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Boot the guest with `flags`, run tests/guest/SCRIPT with its args; the results."""
    _skip_without_qemu()
    run = _Boot(script, script_args, flags).finish(900)
    if not run["results"]:
        pytest.fail(f"the guest wrote no results (exit {run['rc']}):\n{run['output']}")
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
             flags: tuple[str, ...] = (), timeout: float = 600,
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Boot two guests joined by a QEMU socket link (one emulated CPU each: the host has two),
    each running tests/guest/SCRIPT: the `listen` side (its link address 10.6.6.1) with
    listen_args, then, once its QEMU listens, the `connect` side (10.6.6.2) with connect_args.
    Both results, as run_checks gives them; a failure when either wrote none."""
    _skip_without_qemu()
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
            runs = (a.finish(0), {"results": {}, "output": "(not started)", "rc": None})
    finally:
        for g in (a, b):
            if g:
                g.kill()
    if not (runs[0]["results"] and runs[1]["results"]):
        pytest.fail("a guest of the pair wrote no results:\n" + "\n".join(
            f"--- {side} side (exit {r['rc']}):\n{r['output']}"
            for side, r in zip(("listen", "connect"), runs, strict=True)))
    return runs


def ok(run: dict[str, Any], name: str) -> Any:
    r = run["results"].get(name)
    if r is None:
        pytest.fail(f"check {name} did not run; guest output:\n{run['output']}")
    if not r["ok"]:
        pytest.fail(f"{name} failed in the guest:\n{r['error']}\nguest output:\n{run['output']}")
    return r["detail"]
