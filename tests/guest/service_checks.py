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
from collections.abc import Callable
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
DONE = ("reloaded", "reload refused", "reload failed")     # the run's STATUS= after a reload


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


def wait(what: str, cond: Callable[[], Any], timeout: float, interval: float = 0.5) -> None:
    """poll(), failing with the unit's state and journal as they are at the end."""
    try:
        poll(cond, timeout=timeout, interval=interval, what=what)
    except TimeoutError as e:
        raise AssertionError(explain(str(e))) from None


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
            "arenas": sorted(str(p) for d in ("/dev/shm", "/dev/hugepages", HUGE_MOUNT)
                             if os.path.isdir(d) for p in Path(d).iterdir()
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
        # the guest's root is the host's under a tmpfs overlay: a journal of the host's
        # (another test's `up`) would be taken for an unfinished one here
        shutil.rmtree(JOURNAL.parent, ignore_errors=True)
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
        wait("generator packets", lambda: tx(scrape(METRICS)) > 0, 60)
        # the host's mount namespace: the lab and up's mounts are everyone's (the unit's comment)
        mnt = {pid: os.readlink(f"/proc/{pid}/ns/mnt") for pid in ("1", st["MainPID"])}
        assert len(set(mnt.values())) == 1, mnt
        text = scrape(METRICS)
        up = {w: metric(text, "dataplane_worker_up", worker=w) for w in ("gen", "rx")}
        assert up == {"gen": 1, "rx": 1}, up
        self.applied = json.loads(JOURNAL.read_text())["entries"]
        now = host_state()
        assert all(now["sysctl"][k] == v.split() for k, v in SYSCTLS.items()), now
        assert HUGE_MOUNT in now["hugetlbfs"] and now["nr_hugepages"] == "16", \
            f"{now}\n{sh('findmnt', '-t', 'hugetlbfs', check=False)}\n" \
            + Path(f"/proc/{st['MainPID']}/mountinfo").read_text()
        return {"status": st, "journal_entries": self.applied, "host": now}

    def reload_rate(self) -> dict[str, Any]:
        rate0, before = tx_rate()
        write_config(NEW_RATE)
        sh("systemctl", "reload", UNIT)
        # kill -HUP returns at once (systemd 252 has no Type=notify-reload): the run says
        # RELOADING=1, then READY=1 with STATUS=reloaded: ... once its workers run again
        wait("STATUS= of the reload", lambda: show()["StatusText"].startswith(DONE), 90)
        st = show()
        assert st["StatusText"].startswith("reloaded:"), explain("reload not applied")
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
            wait("STATUS= of the refused reload",
                 lambda: show()["StatusText"].startswith("reload refused"), 90)
            wait("the refusal, naming the key, in the journal",
                 lambda: "generate.burst" in journal(), 30)
        finally:
            write_config(NEW_RATE)      # `down` at the stop reads this file too
        st = show()
        assert (st["ActiveState"], st["MainPID"]) == ("active", pid), explain("not kept")
        rate, _ = tx_rate()
        assert rate > NEW_RATE / 3, explain(f"the running config not kept: {rate:.0f} pps")
        lines = [ln for ln in journal().splitlines() if "burst" in ln]
        return {"journal": lines[-5:], "pps": round(rate), "status": st}

    def kill_worker(self) -> dict[str, Any]:
        from dataplane.host.hugepages import hugetlbfs_mounts
        from dataplane.run.status import find_arenas
        from dataplane.shm.arena import Arena
        path = find_arenas("rx", [*hugetlbfs_mounts(), Path("/dev/shm")])[0]
        with Arena.open(path) as a:
            pid = int(a.header.pid)
        os.kill(pid, signal.SIGKILL)
        wait("rx restarted", lambda: metric(scrape(METRICS), "dataplane_worker_restarts_total",
                                            worker="rx") >= 1, 90)
        wait("rx up again", lambda: metric(scrape(METRICS), "dataplane_worker_up",
                                           worker="rx") == 1, 90)
        text = scrape(METRICS)
        st = show()
        assert (st["ActiveState"], st["NRestarts"]) == ("active", "0"), explain("service")
        return {"killed": pid, "restarts": metric(text, "dataplane_worker_restarts_total",
                                                  worker="rx"), "status": st}

    def crash(self) -> dict[str, Any]:
        """The run SIGKILLed (its workers orphaned, its arenas left): systemd stops what is left
        of the cgroup, `down` removes the stale arenas and restores the host, the service is
        started again (`up` first), and the new run is healthy."""
        pid, mark = show()["MainPID"], len(journal().splitlines())
        sh("systemctl", "kill", "--kill-who=main", "-s", "SIGKILL", UNIT)
        wait("the service restarted", lambda: (lambda st: st["NRestarts"] == "1" and st[
            "ActiveState"] == "active" and st["MainPID"] not in ("0", pid))(show()), 240, 1)
        since = journal().splitlines()[mark:]
        for want in ("removed stale arena", "undone hugepages", "applied hugepages"):
            assert any(want in ln for ln in since), explain(f"no {want!r} after the crash")
        wait("generator packets", lambda: tx(scrape(METRICS)) > 0, 60)
        now = host_state()
        assert all(now["sysctl"][k] == v.split() for k, v in SYSCTLS.items()), now
        return {"journal": [ln for ln in since if "stale" in ln or "undone" in ln],
                "status": show()}

    def stop(self) -> dict[str, Any]:
        sh("systemctl", "stop", UNIT, timeout=240)
        st = show()
        assert (st["ActiveState"], st["Result"]) == ("inactive", "success"), \
            explain(f"after stop: {st}")
        after = host_state()
        # the run restarted after the crash found the dead run's lab and used it, so it leaves
        # it at its stop as it would a lab someone else made (docs/operations.md)
        lab_left = after["netns"]
        if lab_left:
            assert lab_left == ["dp-gen", "dp-rx"], lab_left
            sh("/usr/local/bin/dataplane", "lab", "down", "--config", str(CONFIG))
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
        return {"after": after, "down_again": left.strip(), "status": st, "lab_left": lab_left}


def main() -> int:
    # it installs a unit and removes /var/lib/dataplane: never on a real host
    if os.environ.get("GUEST_SYSTEMD") != "1" or Path("/proc/1/comm").read_text() != "systemd\n":
        print("service_checks.py runs only inside `scripts/guest --systemd`", file=sys.stderr)
        return 2
    out = Path(sys.argv[-1])
    checks = Checks(out, "service")
    s = Service()
    # kill_worker leaves the run's books short (what the veth got while no socket was there),
    # and it exits 1 at its stop: the crash replaces it with a fresh run, whose stop is clean
    for fn in (s.install, s.start, s.reload_rate, s.reload_broken, s.kill_worker, s.crash,
               s.stop):
        checks.run(fn)
    sh("systemctl", "stop", UNIT, check=False)
    (out.parent / "journal.txt").write_text(journal())
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
