"""`dataplane plan|up|down|status` against the real host: every change journaled, `down`
restores exactly (also after `up` was SIGKILLed half-way), damaged journals stop everything
with a way out, and a non-root user is refused before anything changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import unprivileged
from tests.helpers.default_lab import default_text

pytestmark = pytest.mark.root("sysctl, tc, hugepages")

DP = str(Path(sys.executable).parent / "dataplane")
NR = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
SYSCTLS = ["net/core/rmem_max", "net/core/wmem_max", "net/core/netdev_max_backlog",
           "net/core/optmem_max", "net/core/busy_read", "net/core/busy_poll",
           "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem", "net/ipv4/tcp_congestion_control",
           "net/core/default_qdisc"]


def snapshot(dummy: str) -> dict:
    s = {k: Path("/proc/sys", k).read_text().split() for k in SYSCTLS}
    s["nr_hugepages"] = NR.read_text().strip()
    s["mounts"] = sorted(ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()
                         if ln.split()[2] == "hugetlbfs")
    q = json.loads(subprocess.run(["tc", "-j", "qdisc", "show", "dev", dummy],
                                  capture_output=True, text=True, check=True).stdout)
    s["qdisc"] = [(x["kind"], x.get("root")) for x in q]
    return s


@pytest.fixture
def setup(tmp_path: Path):
    """A config: the default lab (renamed) plus a [host] table using a dummy interface."""
    tag = f"{os.getpid() % 10000}u"
    dummy = f"dpu{tag}"
    # veth: this kernel has no dummy driver; the peer goes with it on delete
    subprocess.run(["ip", "link", "add", dummy, "type", "veth", "peer", "name", f"{dummy}p"],
                   check=True)
    text = default_text(tag)
    want = int(NR.read_text()) + 32
    # The shipped profiles ask for fq, which this lab kernel lacks (test_shipped_profile_...
    # checks that up refuses them cleanly); this one uses what every kernel has.
    prof = tmp_path / "lab.toml"
    prof.write_text("""description = "test profile: buffers, backlog, busy polling, BBR"
[sysctl]
"net.core.rmem_max" = 67108864
"net.core.wmem_max" = 67108864
"net.core.netdev_max_backlog" = 30000
"net.core.optmem_max" = 1048576
"net.core.busy_read" = 50
"net.core.busy_poll" = 50
"net.ipv4.tcp_rmem" = "4096 131072 67108864"
"net.ipv4.tcp_wmem" = "4096 65536 67108864"
"net.ipv4.tcp_congestion_control" = "bbr"
"net.core.default_qdisc" = "pfifo_fast"
""")
    text += f"""
[host]
journal_dir = "{tmp_path}/state"
profile = "{prof}"
fq_interfaces = ["{dummy}"]
[[host.hugepages]]
size = "2M"
count = {want}
mount = "{tmp_path}/huge"
"""
    cfg = tmp_path / "dp.toml"
    cfg.write_text(text)
    before = snapshot(dummy)
    try:
        yield cfg, dummy, before, tmp_path / "state" / "journal.json"
    finally:
        subprocess.run([DP, "down", "--config", str(cfg)], capture_output=True)
        subprocess.run(["ip", "link", "del", dummy], check=False)


def dp(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([DP, *args], capture_output=True, text=True, timeout=timeout)


def test_plan_changes_nothing_and_shows_current_to_desired(setup) -> None:
    cfg, dummy, before, journal = setup
    p = dp("plan", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "->" in p.stdout and "hugepages" in p.stdout.lower() and dummy in p.stdout
    assert snapshot(dummy) == before and not journal.exists()


def test_up_down_round_trip_twice_each(setup) -> None:
    cfg, dummy, before, journal = setup
    up = dp("up", "--config", str(cfg))
    assert up.returncode == 0, up.stdout + up.stderr
    during = snapshot(dummy)
    assert during != before and during["qdisc"][0][0] == "pfifo_fast"
    assert int(during["nr_hugepages"]) == int(before["nr_hugepages"]) + 32
    st = dp("status", "--config", str(cfg))
    assert "change(s) applied" in st.stdout and "state=running" in st.stdout, st.stdout
    entries = json.loads(journal.read_text())["entries"]
    again = dp("up", "--config", str(cfg))
    assert again.returncode == 0 and "already up" in again.stdout
    assert json.loads(journal.read_text())["entries"] == entries, "a second up changed more"
    down = dp("down", "--config", str(cfg))
    assert down.returncode == 0, down.stdout + down.stderr
    assert snapshot(dummy) == before, "down did not restore the host exactly"
    assert not journal.exists()
    assert dp("down", "--config", str(cfg)).returncode == 0
    assert snapshot(dummy) == before


def test_sigkill_during_up_then_down_restores(setup) -> None:
    cfg, dummy, before, journal = setup
    p = subprocess.Popen([DP, "up", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    end = time.monotonic() + 60
    while time.monotonic() < end:   # kill it half-way: after a few changes were journaled
        try:
            if len(json.loads(journal.read_text())["entries"]) >= 4:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert journal.exists(), "the journal must survive the kill"
    down = dp("down", "--config", str(cfg))
    assert down.returncode == 0, down.stdout + down.stderr
    assert snapshot(dummy) == before
    assert not journal.exists()


@pytest.mark.parametrize("content,words", [
    ("{not json", "damaged"),
    ('{"version": 99, "entries": []}', "version 99"),
    ('{"version": 1, "entries": [42]}', "not a list of changes"),
])
def test_damaged_journal_is_a_clear_stop_with_a_way_out(setup, content: str, words: str) -> None:
    cfg, dummy, before, journal = setup
    journal.parent.mkdir(mode=0o700, exist_ok=True)
    journal.write_text(content)
    for cmd in ("down", "up", "status"):
        p = dp(cmd, "--config", str(cfg))
        assert p.returncode != 0, f"{cmd} went on with a damaged journal"
        assert words in p.stderr and "--forget-journal" in p.stderr, p.stderr
    assert snapshot(dummy) == before, "nothing may change while the journal is damaged"
    p = dp("down", "--config", str(cfg), "--forget-journal")
    assert p.returncode == 0 and not journal.exists()


def test_non_root_refused_before_any_change(setup) -> None:
    cfg, dummy, before, journal = setup
    os.chmod(cfg.parent, 0o755)
    os.chmod(cfg, 0o644)
    for cmd in ("up", "down"):
        p = subprocess.run([*unprivileged.prefix(), DP, cmd, "--config", str(cfg)],
                           capture_output=True, text=True)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "CAP_SYS_ADMIN" in p.stderr and "sudo dataplane" in p.stderr, p.stderr
    assert snapshot(dummy) == before and not journal.exists()


def test_shipped_profile_needing_fq_is_refused_cleanly_when_fq_is_missing(setup) -> None:
    cfg, dummy, before, journal = setup
    text = cfg.read_text()
    cfg.write_text(text.replace(f'profile = "{cfg.parent}/lab.toml"', 'profile = "latency"'))
    fq = "fq" in Path("/proc/sys/net/core/default_qdisc").read_text() or subprocess.run(
        ["tc", "qdisc", "add", "dev", dummy, "root", "fq"], capture_output=True).returncode == 0
    subprocess.run(["tc", "qdisc", "del", "dev", dummy, "root"], capture_output=True)
    if fq:
        pytest.skip("this kernel has fq: the shipped profiles apply, nothing to refuse")
    p = dp("up", "--config", str(cfg))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "nothing was changed" in p.stderr and "fq" in p.stderr, p.stderr
    plan = dp("plan", "--config", str(cfg))
    assert "BLOCKED" in plan.stdout
    assert snapshot(dummy) == before and not journal.exists()


def test_down_restores_the_host_when_the_config_broke_after_up(setup) -> None:
    """A config edited into something that no longer loads (a refused reload, an edit before a
    stop) must not keep `down` from putting the host back: it says why and uses the journal."""
    cfg, dummy, before, journal = setup
    up = dp("up", "--config", str(cfg))
    assert up.returncode == 0, up.stdout + up.stderr
    assert snapshot(dummy) != before
    cfg.write_text(cfg.read_text().replace("[host]", "bogus_key = 1\n[host]", 1))
    assert dp("config", "check", str(cfg)).returncode == 2
    down = dp("down", "--config", str(cfg))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "bogus_key" in down.stderr and "going on with journal_dir" in down.stderr
    assert snapshot(dummy) == before and not journal.exists()
