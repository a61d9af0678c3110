"""Host writes confined and crash-safe: sysctl keys stay inside /proc/sys, the journal
directory must be root's own and closed to others, no file root writes is followed through a
symbolic link (run.log, the journal, lock files), and a journal that cannot be written on a full
tmpfs keeps the last good one, removes its temporary file and refuses the change it was for,
so `down` still restores the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane import config
from dataplane.config.tables import ConfigError
from dataplane.host import Journal, JournalError
from dataplane.host.files import UnsafePath
from dataplane.host.sysctl import Sysctl, TuningError, path
from dataplane.run.lock import RUN_LOCK, HostLock
from dataplane.run.updown import RunProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("key", ["../../etc/x", "net/../../etc/x", "/etc/passwd",
                                 "net.core..rmem_max", "net/./core/rmem_max", ""])
def test_sysctl_key_escaping_proc_sys_is_refused(key: str) -> None:
    with pytest.raises(TuningError, match="sysctl key"):
        path(key)
    with pytest.raises(TuningError):
        Sysctl(key, 1)
    assert path("net.core.rmem_max") == Path("/proc/sys/net/core/rmem_max")
    assert path("net/ipv4/conf/eth0.5/rp_filter") == Path("/proc/sys/net/ipv4/conf/eth0.5/"
                                                          "rp_filter")


def test_profile_with_an_escaping_key_is_a_config_error(tmp_path: Path) -> None:
    prof = tmp_path / "evil.toml"
    prof.write_text('[sysctl]\n"../../../etc/dataplane-x" = 1\n')
    with pytest.raises(ConfigError) as e:
        config.loads(f'[host]\nprofile = "{prof}"\n')
    [msg] = e.value.problems
    assert msg.startswith(f'host.profile = "{prof}": sysctl key \'../../../etc/dataplane-x\'')
    assert not Path("/etc/dataplane-x").exists()


def test_journal_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError) as e:
        config.loads(f'[host]\njournal_dir = "{d}"\n')
    assert e.value.problems == [
        f'host.journal_dir = "{d}": mode 0777: group or others may write it (chmod go-w); '
        "journal_dir must be root's (the running user's) and writable by no one else"]
    with pytest.raises(JournalError, match="group or others may write it"):
        Journal(d)
    os.chmod(d, 0o755)
    config.loads(f'[host]\njournal_dir = "{d}"\n')
    Journal(d).record({"kind": "test"})
    assert (d / "journal.json").stat().st_mode & 0o777 == 0o600


def test_journal_dir_or_journal_as_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(JournalError, match="symbolic link"):
        Journal(tmp_path / "link")
    with pytest.raises(ConfigError, match="symbolic link"):
        config.loads(f'[host]\njournal_dir = "{tmp_path / "link"}"\n')
    target = tmp_path / "target.json"
    target.write_text('{"version": 1, "entries": []}')
    (real / "journal.json").symlink_to(target)
    with pytest.raises(JournalError, match="symbolic link"):
        Journal(real)


@pytest.mark.root("chown to another user")
def test_journal_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(JournalError, match="owned by uid 65534"):
        Journal(d)


def test_symlinked_run_log_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    log = tmp_path / "run.log"
    log.symlink_to(target)
    rp = RunProcess(None, log)
    with pytest.raises(UnsafePath, match="symbolic link"):
        rp.apply()
    assert rp.proc is None and target.read_text() == "untouched\n"


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    (run_dir / RUN_LOCK).symlink_to(target)
    with pytest.raises(UnsafePath, match="symbolic link"):
        HostLock(RUN_LOCK, "test", directory=run_dir).acquire()
    assert target.read_text() == "untouched\n"


# In a network namespace of its own (unshare -n), so its sysctls are nobody else's: a first
# change journaled and made, the tmpfs filled up to a few KiB, then (1) a journal record larger
# than what is left (a short write, then ENOSPC), the tmpfs filled up, and (2) a second change,
# which must be refused before it is made; then `down` (undo from a fresh Journal) on the still
# full tmpfs: the last entry goes by removing the file, which needs no room.
FULL = """
import json, os, sys
from pathlib import Path
from dataplane.host import Journal, JournalError, apply, undo
from dataplane.host.sysctl import Sysctl, read
mnt = Path(sys.argv[1]); jdir = mnt / "state"
out = {"before": {k: read(k) for k in ("net.core.somaxconn", "net.ipv4.ip_default_ttl")}}
apply([Sysctl("net.core.somaxconn", 1000)], Journal(jdir))
good = (jdir / "journal.json").read_bytes()
st = os.statvfs(mnt)
with open(mnt / "filler", "wb") as f:                 # leave 8 KiB free
    f.write(b"x" * (st.f_bavail * st.f_frsize - 8192))
j = Journal(jdir)
try:
    j.record({"kind": "sysctl", "key": "net.core.somaxconn", "old": "x" * 65536})
    out["big"] = "recorded"
except JournalError as e:
    out["big"] = str(e)
out["entries_after_big"] = len(j.entries)
with open(mnt / "filler", "ab", buffering=0) as f:    # now nothing left at all
    try:
        while True:
            f.write(b"x" * 4096)
            f.flush()
    except OSError:
        pass
try:
    apply([Sysctl("net.ipv4.ip_default_ttl", 99)], j)
    out["second"] = "applied"
except JournalError as e:
    out["second"] = str(e)
out["ttl"] = read("net.ipv4.ip_default_ttl")
out["same_journal"] = (jdir / "journal.json").read_bytes() == good
out["left"] = sorted(p.name for p in jdir.iterdir())
out["undone"] = undo(Journal(jdir))
out["after"] = {k: read(k) for k in ("net.core.somaxconn", "net.ipv4.ip_default_ttl")}
out["left_after_down"] = sorted(p.name for p in jdir.iterdir())
print(json.dumps(out))
"""


@pytest.mark.root("mount a tmpfs, unshare a network namespace")
def test_journal_on_a_full_tmpfs_keeps_the_good_journal_and_refuses_the_change(
        tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "dp-test", str(mnt)],
                   check=True)
    try:
        p = subprocess.run(["unshare", "-n", sys.executable, "-c", FULL, str(mnt)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "No space left on device" in out["big"], out
    assert "nothing more was changed" in out["big"]
    assert out["entries_after_big"] == 1                  # the refused entry is not kept
    assert "No space left on device" in out["second"], out
    assert out["ttl"] == out["before"]["net.ipv4.ip_default_ttl"]      # never made
    assert out["same_journal"] and out["left"] == ["journal.json"]     # no temp file
    assert out["undone"] == ["undone sysctl net.core.somaxconn"]
    assert out["after"] == out["before"] and out["left_after_down"] == []
