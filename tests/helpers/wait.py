"""Waiting for a condition in a test: polled, bounded by a timeout that only ever bounds a
failure, and naming what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait(cond: Callable[[], object], what: str, timeout: float = 20.0,
         every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")
