"""The systemd service: config/systemd/dataplane.service.

`systemd-analyze verify` of the unit runs here.  The rest runs under systemd as PID 1: one guest
(scripts/guest --systemd) installs the unit as an operator would and runs
tests/guest/service_checks.py from a driver unit: start (READY, metrics), reload with a changed
rate (applied, counters kept), reload with a broken config (refused, old config kept, the error
in the journal), a worker SIGKILLed (restarted, the service untouched), stop (the host restored
exactly as the state journal said).  Also `dataplane up --host-only`, the unit's ExecStartPre.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.guest_run import GuestRun

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "config" / "systemd" / "dataplane.service"
DATAPLANE = str(Path(sys.executable).with_name("dataplane"))


def unit_settings() -> dict[str, list[str]]:
    """key -> values of the unit file (comments and sections left out)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing, with the Exec lines pointing at this checkout's
    `dataplane` (the unit expects /usr/local/bin/dataplane, which the guest links)."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze (Debian's systemd package)")
    unit = tmp_path / "dataplane.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/dataplane", DATAPLANE))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and "dataplane.service" not in r.stdout + r.stderr, \
        r.stdout + r.stderr


def test_unit_runs_the_run_under_notify_with_up_and_down() -> None:
    u = unit_settings()
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    host = "+/usr/local/bin/dataplane"
    assert u["ExecStartPre"] == [f"{host} up --host-only --config ${{DATAPLANE_CONFIG}}"]
    assert u["ExecStart"] == ["/usr/local/bin/dataplane run --config ${DATAPLANE_CONFIG}"]
    assert u["ExecStopPost"] == [f"{host} down --config ${{DATAPLANE_CONFIG}}"]
    assert u["LimitMEMLOCK"] == ["infinity"] and u["RuntimeDirectory"] == ["dataplane"]


@pytest.mark.root("writes a journal directory and takes the up/down lock")
def test_up_host_only_starts_no_run_and_leaves_memlock(tmp_path: Path) -> None:
    """The unit's ExecStartPre: a profile's memlock is left to LimitMEMLOCK= (a limit on `up`'s
    own process would end with it) and no `dataplane run` is started: systemd runs it."""
    journal = tmp_path / "journal"
    journal.mkdir(mode=0o700)
    profile = tmp_path / "p.toml"
    profile.write_text('memlock = "unlimited"\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text((REPO / "config" / "default.toml").read_text()
                   + f'[host]\njournal_dir = "{journal}"\nprofile = "{profile}"\n')
    r = subprocess.run([DATAPLANE, "up", "--host-only", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dataplane run started" not in r.stdout
    assert not (journal / "journal.json").exists(), (journal / "journal.json").read_text()
    r = subprocess.run([DATAPLANE, "down", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "nothing to undo" in r.stdout, r.stdout + r.stderr


@pytest.fixture(scope="module")
def guest(guest_lab) -> GuestRun:
    return guest_lab.checks("service_checks.py", flags=("--systemd",))


def test_service_installs_and_verifies_in_the_guest(guest: GuestRun) -> None:
    d = guest.ok("install")
    assert d["before"]["arenas"] == [] and d["before"]["netns"] == [], d


def test_start_reaches_ready_and_serves_metrics(guest: GuestRun) -> None:
    d = guest.ok("start")
    assert d["status"]["ActiveState"] == "active" and d["status"]["StatusText"], d
    kinds = [e["kind"] for e in d["journal_entries"]]
    assert "sysctl" in kinds and "hugepages" in kinds and "rlimit" not in kinds, kinds


def test_reload_applies_a_new_rate_and_keeps_counters(guest: GuestRun) -> None:
    d = guest.ok("reload_rate")
    assert d["tx"][1] >= d["tx"][0] and d["pps"][1] > 2 * d["pps"][0], d


def test_reload_of_a_broken_config_is_refused_and_logged(guest: GuestRun) -> None:
    d = guest.ok("reload_broken")
    assert d["journal"] and d["status"]["ActiveState"] == "active", d


def test_a_killed_worker_is_restarted_under_the_service(guest: GuestRun) -> None:
    d = guest.ok("kill_worker")
    assert d["restarts"] >= 1 and d["status"]["NRestarts"] == "0", d


def test_a_crash_is_restored_and_restarted(guest: GuestRun) -> None:
    """The run SIGKILLed: `down` (ExecStopPost) removes its stale arenas and restores the host,
    `up` prepares it again, the service is restarted once."""
    d = guest.ok("crash")
    assert d["status"]["NRestarts"] == "1" and d["journal"], d


def test_stop_restores_the_host_as_the_journal_says(guest: GuestRun) -> None:
    d = guest.ok("stop")
    assert "nothing to undo" in d["down_again"], json.dumps(d)
