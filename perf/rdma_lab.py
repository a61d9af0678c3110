"""What perf/mr_cache_bench.py and perf/rdma_bench.py share: running on rxe0, which exists only
inside the project's QEMU guest (scripts/guest --rdma), and describing the machine.

    if not in_rdma_lab():
        sys.exit(rerun_in_guest(__file__, sys.argv[1:], mem="2G"))

`rerun_in_guest` boots the guest with this script and the same arguments plus `--json-out
/lab/NAME.json`, streams the guest's console to stdout, and prints the JSON object the guest
wrote as the very last line: the console may print after the command (power-off), so the
guest's own last line cannot be relied on.  `rerun_in_two_guests` boots two guests joined by a
link (scripts/guest_run.run_pair, one emulated CPU each) with the script and `--pair serve OUT`
(guest A, 10.6.6.1) or `--pair drive OUT` (guest B, which writes the figures) added.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEVICE = "rxe0"
if str(REPO) not in sys.path:       # scripts.guest_run and scripts.guest_link
    sys.path.append(str(REPO))


def in_rdma_lab() -> bool:
    return Path(f"/sys/class/infiniband/{DEVICE}").exists()


def rerun_in_guest(script: str, args: list[str], mem: str = "2G", smp: int = 2,
                   timeout: int = 1500) -> int:
    name = Path(script).stem
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as out:
        cmd = [str(REPO / "scripts" / "guest"), "--rdma", "--mem", mem, "--smp", str(smp),
               "--out", out, "--timeout", str(timeout), "--", sys.executable,
               str(Path(script).resolve()), *args, "--json-out", f"/lab/{name}.json"]
        print("host: no rxe0 here, running in the guest:", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=REPO).returncode
        res = Path(out) / f"{name}.json"
        if not res.exists():
            print(f"host: the guest wrote no results (exit {rc})", file=sys.stderr)
            return rc or 1
        result = json.loads(res.read_text())
    print_with_host(result)
    return rc


def rerun_in_two_guests(script: str, args: list[str], mem: str = "2G",
                        timeout: int = 1500) -> int:
    from scripts.guest_run import run_pair
    # run_pair runs tests/guest/SCRIPT, from the repo
    rel = os.path.relpath(Path(script).resolve(), REPO / "tests" / "guest")
    print(f"host: booting two linked guests (SMP 1 each) for {rel} {' '.join(args)}", flush=True)
    a, b = run_pair(rel, (*args, "--pair", "serve"), (*args, "--pair", "drive"),
                    flags=("--rdma", "--mem", mem), timeout=timeout)
    for side, run in (("A (receivers, 10.6.6.1)", a), ("B (senders, 10.6.6.2)", b)):
        print(f"---- guest {side}, exit {run.rc} ----\n{run.output}", flush=True)
    print_with_host(b.results)
    return b.rc or 0


def print_with_host(result: dict[str, Any]) -> None:
    """The guest's JSON as the last line; the guest's /proc/cpuinfo names QEMU's emulated CPU,
    so the host's, which runs it, is added."""
    host = machine()
    result.setdefault("machine", {}).update(host_cpu=host["cpu"], host_cores=host["cores"],
                                            host_loadavg_1m=host["loadavg_1m"])
    print(json.dumps(result), flush=True)


def machine(device: str = DEVICE) -> dict[str, Any]:
    """The guest's view (vCPUs, kernel) and the host's CPU, which TCG emulates."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    guest = os.environ.get("GUEST") == "1"
    where = (f"QEMU TCG guest, Debian kernel {platform.release()}" if guest
             else f"bare metal or VM, kernel {platform.release()}")
    return {"cpu": model, "cores": os.cpu_count(), "where": where, "device": device,
            "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]}


def finish(result: dict[str, Any], json_out: str | None) -> None:
    """The benchmark's last line, and the file the host side reads back."""
    line = json.dumps(result)
    if json_out:
        Path(json_out).write_text(line)
    print(line, flush=True)
