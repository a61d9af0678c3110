"""Run inside `scripts/guest --rdma` (see tests/test_rdma_run.py): `dataplane run` with the
default lab on the uring backend and its rx ring shipped over RDMA (rxe0) to a receiver of the
same run, as an operator would: the CLI, `dataplane status` while it runs, a Prometheus scrape,
the transport's receiver SIGKILLed mid-run.  Writes RESULTS (JSON), one entry per check:
{"ok": bool, "detail": ..., "error": traceback or ""}.

    python tests/guest/rdma_run_checks.py [CHECK...] RESULTS
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import Checks  # tests/guest, the script's folder, is on sys.path

from dataplane.transport.auth import generate_key, write_key

REPO = Path(__file__).resolve().parents[2]

DATAPLANE = [str(Path(sys.executable).with_name("dataplane"))]   # the venv's console script
PORT = 18515

TRANSPORTS = f"""
[[transport]]
name = "ship"
kind = "rdma"
role = "send"
from = "rx.in"
peer = "10.9.9.1:{PORT}"
device = "DEVICE"
key_file = "KEY_FILE"

[[transport]]
name = "col"
kind = "rdma"
role = "recv"
listen = "10.9.9.1:{PORT}"
label = "from-rx"
device = "DEVICE"
key_file = "KEY_FILE"
"""


def write_config(path: Path, count: int, rate: int, device: str = "rxe0") -> Path:
    text = (REPO / "config" / "default.toml").read_text()
    for old, new in (("count = 0", f"count = {count}"), ("rate_pps = 20000", f"rate_pps = {rate}"),
                     ('driver = "af_xdp"', 'driver = "af_packet"')):
        assert old in text, old
        text = text.replace(old, new)
    # the uring backend: no EAL in a TCG guest; top-level keys come before the first table
    key = path.with_suffix(".key")    # the link's key, as `dataplane transport keygen` makes it
    if not key.exists():
        write_key(key, generate_key())
    path.write_text('backend = "uring"\n' + text + TRANSPORTS.replace("DEVICE", device)
                    .replace("KEY_FILE", str(key)))
    return path


def status(cfg: Path) -> str:
    r = subprocess.run([*DATAPLANE, "status", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    return r.stdout + r.stderr


def scrape() -> str:
    with urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(what: str, cond: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def control_pid(name: str) -> int:
    from dataplane.shm.control import Control, control_path
    c = Control(Path(control_path(name)))
    try:
        return int(c.hdr.pid)
    finally:
        c.close()


def check_run_with_rdma_transport() -> dict[str, Any]:
    """The lab's generated packets go rx worker -> RDMA sender -> RDMA receiver -> the run's
    consumers; the receiver is SIGKILLed once mid-run and restarted by the run; every sequence
    number arrives or is counted lost, and the run exits 0."""
    cfg = write_config(Path("/lab/rdma-run.toml"), count=0, rate=300)
    log = open("/lab/run.out", "w")     # noqa: SIM115 - the run's output, read at the end
    run = subprocess.Popen([*DATAPLANE, "run", "--config", str(cfg), "--duration", "300"],
                           stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        return _watch(cfg, run)
    except Exception as e:   # noqa: BLE001 - with what the run said
        raise AssertionError(f"{e!r}\nlast status:\n{status(cfg)}\nrun output:\n"
                             f"{Path('/lab/run.out').read_text()[-4000:]}") from None
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.wait(60)
        log.close()


def _watch(cfg: Path, run: subprocess.Popen) -> dict[str, Any]:
    # generous limits: a `dataplane status` takes seconds in the emulated guest, many more when
    # the host is busy (60 s ran out once with the ends connected and packets flowing)
    # every part of the condition: a status taken while the sender turns from starting to
    # running to its first publish reads its state before and its counters after (seen once)
    seen = wait_for("status shows both RDMA ends running and connected with packets",
                    lambda: (s := status(cfg)).count("QPs 1/") == 2 and
                    s.count("): state=running") >= 2 and "\nDOWN" not in s and
                    "packets 0;" not in s and s, 180)
    text = scrape()
    before = {"qps": metric(text, "dataplane_rdma_queue_pairs"),
              "max_qp": metric(text, "dataplane_rdma_device_max_qp", transport="col"),
              "mr_misses": metric(text, "dataplane_mr_cache_misses_total", cache="col"),
              "mr_registered": metric(text, "dataplane_mr_cache_registered_bytes",
                                      cache="ship"),
              "from_rx": metric(text, "dataplane_rx_packets_total", worker="col",
                                port="from-rx"),
              "batches": metric(text, "dataplane_transport_batches_total",
                                transport="ship")}
    victim = control_pid("col")
    os.kill(victim, signal.SIGKILL)
    wait_for("the run restarted the receiver and the sender reconnected",
             lambda: control_pid("col") not in (0, victim) and
             metric(scrape(), "dataplane_transport_reconnects_total",
                    transport="ship") >= 1, 180)
    time.sleep(3)                       # the stream flows again through the new receiver
    after_kill = status(cfg)
    run.send_signal(signal.SIGINT)      # an operator's Ctrl-C: the run stops and settles
    rc = run.wait(120)
    # the run's log and books, without its once-a-second summary lines
    out = "".join(ln for ln in Path("/lab/run.out").read_text().splitlines(keepends=True)
                  if "] rx " not in ln)
    return {"rc": rc, "status": seen, "status_after_kill": after_kill, "metrics": before,
            "output": out[-6000:]}


def check_missing_device_is_a_clear_error() -> dict[str, Any]:
    cfg = write_config(Path("/lab/rdma-bad.toml"), count=10, rate=100, device="rxe9")
    r = subprocess.run([*DATAPLANE, "run", "--config", str(cfg), "--duration", "3"],
                       capture_output=True, text=True, timeout=120)
    return {"rc": r.returncode, "output": (r.stdout + r.stderr)[-2000:]}


def main() -> int:
    checks = Checks(Path(sys.argv[-1]), "rdma-run")
    only = sys.argv[1:-1]       # [CHECK...] RESULTS
    for name, fn in (("run_with_rdma_transport", check_run_with_rdma_transport),
                     ("missing_device", check_missing_device_is_a_clear_error)):
        if not only or name in only:
            checks.run(fn, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
