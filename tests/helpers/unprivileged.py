"""The command prefix that runs a process without privileges, for the refusal tests.

A real non-root user (nobody) when it can reach the checkout; when it cannot (the checkout sits
under a directory only root may enter, as a CI clone in a 0700 temporary directory does), root
with every capability dropped, which is what the privilege checks look at (CapEff) and which
can still read a root-owned tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def prefix() -> list[str]:
    probe = subprocess.run([*NOBODY, "test", "-r", str(REPO / "dataplane" / "cli.py")],
                           capture_output=True)
    if probe.returncode == 0:
        return NOBODY
    print(f"nobody cannot reach {REPO}: running as root without capabilities instead")
    return NO_CAPS
