"""What every check script run inside the guest shares: the results file the host side reads
(scripts/guest_run.py), one entry per check, {"ok": bool, "detail": ..., "error": traceback or
"", "seconds": ...}, rewritten after every check so a guest that dies half way still tells what
it got to."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Checks:
    """The checks of one script, written to `out` as they end; `tag` starts each console line."""

    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, fn: Callable[[], Any], name: str = "") -> bool:
        """Run one check (under its function's name unless `name`); whether it passed.  A
        failure is recorded with its traceback and the next check runs."""
        name = name or fn.__name__
        t = time.monotonic()
        try:
            self.results[name] = {"ok": True, "detail": fn(), "error": ""}
        except Exception:   # noqa: BLE001 - every failure is reported, the next check runs
            self.results[name] = {"ok": False, "detail": None, "error": traceback.format_exc()}
        r = self.results[name]
        r["seconds"] = round(time.monotonic() - t, 2)
        print(f"{self.tag} {name}: {'ok' if r['ok'] else 'FAILED'} ({r['seconds']} s)",
              flush=True)
        self.write()
        return r["ok"]

    def write(self) -> None:
        self.out.write_text(json.dumps(self.results, indent=1))

    def exit_code(self) -> int:
        """0 when every check passed, for the script's exit status."""
        return 0 if all(r["ok"] for r in self.results.values()) else 1
