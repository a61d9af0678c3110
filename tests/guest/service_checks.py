"""Run inside `scripts/guest --systemd` (see tests/test_service.py): the unit of
config/systemd/dataplane.service installed as an operator would, under systemd as PID 1, driven
with systemctl: verify, start (READY, metrics), reload with a changed rate (applied, counters
kept), reload with a broken config (refused, the old one kept, the error in the journal), a
worker SIGKILLed (restarted by the supervisor, the service untouched), stop (the host exactly as
the state journal said it was).  Writes RESULTS (JSON), one entry per check: {"ok": bool,
"detail": ..., "error": ...}.

    python tests/guest/service_checks.py RESULTS
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import Checks  # tests/guest, the script's folder, is on sys.path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))      # tests.helpers

from dataplane.host.proc import poll  # noqa: E402 - after the path
from tests.helpers.metrics import metric, scrape  # noqa: E402

UNIT = "dataplane"
CONFIG = Path("/etc/dataplane/dataplane.toml")
PROFILE = Path("/etc/dataplane/service-profile.toml")
JOURNAL = Path("/var/lib/dataplane/journal.json")
HUGE_MOUNT = "/mnt/dataplane-huge"
METRICS = ("127.0.0.1", 9477)
# what `up` changes here, each away from this kernel's default, so a restore is visible
SYSCTLS = {"net.core.netdev_max_backlog": "5000", "net.core.busy_read": "50",
           "net.ipv4.tcp_autocorking": "0"}
HOST = f"""
[host]
profile = "{PROFILE}"
[[host.hugepages]]
size = "2M"
count = 16
mount = "{HUGE_MOUNT}"
"""
RATE, NEW_RATE = 200, 1000


def sh(*argv: str, check: bool = True, timeout: float = 180) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def show() -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, "-p", "ActiveState", "-p", "SubState", "-p",
             "StatusText", "-p", "NRestarts", "-p", "MainPID", "-p", "Result")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal() -> str:
    return sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat")


def explain(what: str) -> str:
    return f"{what}\nunit: {show()}\njournal:\n{journal()[-4000:]}"


def write_config(rate: int, broken: bool = False) -> None:
    """config/default.toml as the guest runs it: the uring backend (no EAL under TCG), AF_PACKET
    on the receiver, a slow generator, and a [host] table with real changes for up/down."""
    text = (REPO / "config" / "default.toml").read_text()
    for old, new in (("rate_pps = 20000", f"rate_pps = {rate}"),
                     ('driver = "af_xdp"', 'driver = "af_packet"')):
        assert old in text, old
        text = text.replace(old, new)
    if broken:      # a key path the error must name
        text = text.replace("burst = 32", "burst = -32")
    CONFIG.write_text('backend = "uring"\n' + text + HOST)


def host_state() -> dict[str, Any]:
    """What `up` may change and `down` must put back, read from the kernel."""
    mounts = sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                    .splitlines() if " hugetlbfs " in line)
    return {"sysctl": {k: Path("/proc/sys", k.replace(".", "/")).read_text().split()
                       for k in SYSCTLS},
            "nr_hugepages": Path("/proc/sys/vm/nr_hugepages").read_text().strip(),
            "hugetlbfs": mounts,
            "shm": sorted(p.name for p in Path("/dev/shm").iterdir()
                          if p.name.startswith("dataplane")),
            "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []}


def tx(text: str) -> float:
    return metric(text, "dataplane_tx_packets_total", worker="gen")


def tx_rate(seconds: float = 6.0) -> tuple[float, float]:
    """(packets per second the generator sent over `seconds`, its counter at the end)."""
    a, t = tx(scrape(METRICS)), time.monotonic()
    time.sleep(seconds)
    b = tx(scrape(METRICS))
    return (b - a) / (time.monotonic() - t), b


class Service:
    """The checks, in order: each starts where the one before left the service."""

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}
        self.applied: list[dict[str, Any]] = []

    def install(self) -> dict[str, Any]:
        """The unit verbatim; `dataplane` where the unit expects it (the venv, linked)."""
        bin_ = Path("/usr/local/bin/dataplane")
        bin_.parent.mkdir(parents=True, exist_ok=True)
        bin_.unlink(missing_ok=True)
        bin_.symlink_to(Path(sys.executable).with_name("dataplane"))
        shutil.copy(REPO / "config/systemd/dataplane.service", "/etc/systemd/system/")
        CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
        PROFILE.write_text('description = "the service test"\nmemlock = "unlimited"\n[sysctl]\n'
                           + "".join(f'{k} = "{v}"\n' for k, v in SYSCTLS.items()))
        write_config(RATE)
        sh("systemctl", "daemon-reload")
        out = sh("systemd-analyze", "verify", "/etc/systemd/system/dataplane.service")
        assert "dataplane.service" not in out, out      # verify names the unit in any finding
        self.before = host_state()
        assert all(self.before["sysctl"][k] != v.split() for k, v in SYSCTLS.items()), \
            f"the guest's sysctls are already what the profile asks: {self.before}"
        return {"before": self.before, "verify": out}

    def start(self) -> dict[str, Any]:
        r = subprocess.run(["systemctl", "start", UNIT], capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 0, explain(f"systemctl start: exit {r.returncode} {r.stderr}")
        st = show()
        assert (st["ActiveState"], st["SubState"]) == ("active", "running"), explain("state")
        assert st["StatusText"], explain("no STATUS= from the run")
        poll(lambda: tx(scrape(METRICS)) > 0, timeout=60, interval=1, what="generator packets")
        text = scrape(METRICS)
        up = {w: metric(text, "dataplane_worker_up", worker=w) for w in ("gen", "rx")}
        assert up == {"gen": 1, "rx": 1}, up
        self.applied = json.loads(JOURNAL.read_text())["entries"]
        now = host_state()
        assert all(now["sysctl"][k] == v.split() for k, v in SYSCTLS.items()), now
        assert HUGE_MOUNT in now["hugetlbfs"] and now["nr_hugepages"] == "16", now
        return {"status": st, "journal_entries": self.applied, "host": now}

    def reload_rate(self) -> dict[str, Any]:
        rate0, before = tx_rate()
        write_config(NEW_RATE)
        sh("systemctl", "reload", UNIT)
        poll(lambda: "reloaded" in journal().lower() or "reload" in show()["StatusText"]
             .lower(), timeout=60, interval=1, what="the reload to be logged")
        poll(lambda: show()["ActiveState"] == "active", timeout=60, interval=0.5,
             what="active after the reload")
        time.sleep(3)       # the generator restarted on its arena
        rate1, after = tx_rate()
        assert after >= before, f"counters reset by the reload: {before} -> {after}"
        assert rate1 > 2 * rate0, explain(f"rate {rate0:.0f} -> {rate1:.0f} pps: not applied")
        st = show()
        assert st["NRestarts"] == "0" and st["SubState"] == "running", explain("restarted")
        return {"pps": [round(rate0), round(rate1)], "tx": [before, after], "status": st}

    def reload_broken(self) -> dict[str, Any]:
        pid = show()["MainPID"]
        write_config(NEW_RATE, broken=True)
        try:
            sh("systemctl", "reload", UNIT)
            poll(lambda: "burst" in journal(), timeout=60, interval=1,
                 what="the refusal, naming the key, in the journal")
        finally:
            write_config(NEW_RATE)      # `down` at the stop reads this file too
        st = show()
        assert (st["ActiveState"], st["MainPID"]) == ("active", pid), explain("not kept")
        rate, _ = tx_rate()
        assert rate > NEW_RATE / 3, explain(f"the running config not kept: {rate:.0f} pps")
        lines = [ln for ln in journal().splitlines() if "burst" in ln]
        return {"journal": lines[-5:], "pps": round(rate), "status": st}

    def kill_worker(self) -> dict[str, Any]:
        from dataplane.shm.arena import Arena
        path = next(p for p in ("/dev/shm/dataplane-rx", "/mnt/dataplane-huge/dataplane-rx")
                    if os.path.exists(p))
        with Arena.open(Path(path)) as a:
            pid = int(a.hdr.pid)
        os.kill(pid, signal.SIGKILL)
        poll(lambda: metric(scrape(METRICS), "dataplane_worker_restarts_total", worker="rx")
             >= 1, timeout=90, interval=1, what="rx restarted")
        poll(lambda: metric(scrape(METRICS), "dataplane_worker_up", worker="rx") == 1,
             timeout=90, interval=1, what="rx up again")
        text = scrape(METRICS)
        st = show()
        assert (st["ActiveState"], st["NRestarts"]) == ("active", "0"), explain("service")
        return {"killed": pid, "restarts": metric(text, "dataplane_worker_restarts_total",
                                                  worker="rx"), "status": st}

    def stop(self) -> dict[str, Any]:
        sh("systemctl", "stop", UNIT, timeout=240)
        st = show()
        assert st["ActiveState"] == "inactive", explain(f"after stop: {st}")
        after = host_state()
        assert after == self.before, explain(f"host not restored:\n{self.before}\n{after}")
        # and each value the state journal held is what the kernel has again
        kinds = {e["kind"] for e in self.applied}
        assert {"sysctl", "hugepages"} <= kinds, self.applied
        for e in self.applied:
            if e["kind"] == "sysctl":
                assert after["sysctl"][e["key"]] == str(e["old"]).split(), e
            elif e["kind"] == "hugepages":
                assert after["nr_hugepages"] == str(e["old"]), e
        assert not JOURNAL.exists(), JOURNAL.read_text()
        left = sh("/usr/local/bin/dataplane", "down", "--config", str(CONFIG))
        assert "nothing to undo" in left, left
        return {"after": after, "down_again": left.strip(), "status": st}


def main() -> int:
    out = Path(sys.argv[-1])
    checks = Checks(out, "service")
    s = Service()
    for fn in (s.install, s.start, s.reload_rate, s.reload_broken, s.kill_worker, s.stop):
        checks.run(fn)
    sh("systemctl", "stop", UNIT, check=False)
    (out.parent / "journal.txt").write_text(journal())
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
