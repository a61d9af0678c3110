"""The control port between two guests joined by a link (scripts/guest_run.run_pair): the side
that drives sends one command per line and gets one answer per line, both JSON, over TCP on the
link itself (the lab share is 9p with cache=loose: files are no way to coordinate).

The serving side (guest A) runs `serve(server, addr)`: each command `{"cmd": NAME, **args}`
becomes `server.NAME(**args)`, its answer the reply (an exception: {"error": traceback}), until
"done".  The driving side (guest B) calls them with `Control(host).call(NAME, **args)`.  Used by
tests/guest/rdma_pair_checks.py and perf/rdma_bench.py, each with a server of its own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import traceback
from typing import Any, Protocol

CTL_PORT = 18700


class Server(Protocol):
    """What serve() needs of a server besides its commands: the processes it started, killed
    when the driver is done (a check that failed half way may leave one behind)."""
    procs: dict[str, subprocess.Popen]


def serve(server: Server, addr: str, accept_timeout: float = 240) -> dict[str, Any]:
    """Serve one driver's commands on addr:CTL_PORT until it says done; who drove, and the
    commands handled in order."""
    handled: list[str] = []
    with socket.create_server((addr, CTL_PORT)) as lsock:
        lsock.settimeout(accept_timeout)    # the other guest boots at the same time
        conn, peer = lsock.accept()
    conn.settimeout(None)
    with conn, conn.makefile("rw") as f:
        for line in f:
            req = json.loads(line)
            cmd = req.pop("cmd")
            handled.append(cmd)
            try:
                rep = {} if cmd == "done" else getattr(server, cmd)(**req)
            except Exception:   # noqa: BLE001 - the driver reports it with its check
                rep = {"error": traceback.format_exc()}
            f.write(json.dumps(rep) + "\n")
            f.flush()
            if cmd == "done":
                break
    for p in server.procs.values():
        p.kill()
    return {"driver": peer[0], "commands": handled}


class Control:
    """The driver's end of the control port."""

    def __init__(self, host: str, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while True:     # the serving guest may still be booting
            try:
                self.sock = socket.create_connection((host, CTL_PORT), timeout=5)
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)
        self.sock.settimeout(180)
        self.f = self.sock.makefile("rw")

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run `cmd` on the serving side; its answer (an AssertionError if it failed there)."""
        self.f.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.f.flush()
        line = self.f.readline()
        assert line, f"the serve side closed the control connection ({cmd})"
        rep = json.loads(line)
        assert "error" not in rep, f"{cmd} failed in guest A:\n{rep['error']}"
        return rep
