"""Stopping a process a test started: asked first (a signal, or a stop flag in shared memory),
killed only when it does not stop in time, and always reaped."""

from __future__ import annotations

import subprocess
from collections.abc import Callable


def stop_process(proc: subprocess.Popen, ask: int | Callable[[], object],
                 timeout: float) -> int:
    """Ask proc to stop (send signal `ask`, or call it) if it still runs, wait up to timeout,
    then SIGKILL; its exit status (negative: the signal that ended it)."""
    if proc.poll() is None:
        if callable(ask):
            ask()
        else:
            proc.send_signal(ask)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
