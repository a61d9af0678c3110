"""Running a check script inside the project's QEMU guest (scripts/guest), once per test module:
the script does every check in one Python process (Python under TCG is slow) and writes
{name: {"ok", "detail", "error"}} to /lab/results.json; `ok()` turns one entry into a result
or a failure that shows the guest's output."""

from __future__ import annotations

import json
import os
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


def run_checks(script: str, *script_args: str, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Boot the guest with `flags`, run tests/guest/SCRIPT with its args; the results."""
    why = _qemu_why_not()
    if why:
        print(why)
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="guest-run-") as out:
        t = time.monotonic()
        r = subprocess.run([str(GUEST), *flags, "--out", out, "--", sys.executable,
                            f"tests/guest/{script}", *script_args, "/lab/results.json"],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
        res = Path(out) / "results.json"
        results = json.loads(res.read_text()) if res.exists() else {}
    print(f"\nguest ({script} {' '.join(script_args)}) exited {r.returncode} after "
          f"{time.monotonic() - t:.0f} s")
    output = r.stdout + r.stderr
    if not results:
        pytest.fail(f"the guest wrote no results (exit {r.returncode}):\n{output}")
    return {"results": results, "output": output, "rc": r.returncode}


def ok(run: dict[str, Any], name: str) -> Any:
    r = run["results"].get(name)
    if r is None:
        pytest.fail(f"check {name} did not run; guest output:\n{run['output']}")
    if not r["ok"]:
        pytest.fail(f"{name} failed in the guest:\n{r['error']}\nguest output:\n{run['output']}")
    return r["detail"]
