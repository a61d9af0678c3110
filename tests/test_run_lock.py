"""The host-wide locks: a second `dataplane run` (or `lab up/down`, or `up`) while one runs is
refused naming it (pid, config, start time) and touches nothing of it, which keeps running and
balances its books; `up` and `down` exclude each other; a dead holder's lock is free.

Run under the host lock (flock /tmp/dp-host.lock): the lab, a real run, /run/dataplane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dataplane import config
from dataplane.host import Journal
from dataplane.host.proc import poll
from dataplane.run import lab
from dataplane.run.lock import HOST_LOCK, RUN_LOCK, holder
from tests.helpers.default_lab import default_text

pytestmark = pytest.mark.root("the lab, a run, /run/dataplane")

DP = str(Path(sys.executable).parent / "dataplane")
HOLD = """
import sys, time
from dataplane.run.lock import HostLock
HostLock(sys.argv[1], sys.argv[2], sys.argv[3]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def dp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DP, *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def held(name: str, what: str, cfg: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding lock NAME, as a running command would."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, name, what, cfg], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "held\n"
        yield p
    finally:
        p.kill()
        p.wait()


def workers_state(paths: list[Path]) -> dict[Path, tuple[str, int]]:
    from dataplane.shm.arena import Arena
    out = {}
    for path in paths:
        try:
            with Arena.open(path) as a:
                out[path] = (a.worker_state(), int(a.header.pid))
        except (OSError, RuntimeError):
            out[path] = ("absent", 0)
    return out


def test_second_run_refuses_naming_the_first_and_touches_nothing(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}k"
    cfg = tmp_path / "dp.toml"
    cfg.write_text(default_text(tag) + f'\n[host]\njournal_dir = "{tmp_path}/state"\n')
    parsed = config.load(cfg)
    paths = [Path(s.arena_path) for s in config.plan(parsed)]
    first = subprocess.Popen([DP, "run", "--config", str(cfg), "--duration", "15"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: first.poll() is not None or all(
            st == "running" for st, _ in workers_state(paths).values()), timeout=90,
            what="the first run's workers")
        assert first.poll() is None, first.communicate()
        before = workers_state(paths)
        inodes = {p: p.stat().st_ino for p in paths}
        refusals = {
            "run": dp("run", "--config", str(cfg), "--duration", "1"),
            "lab down": dp("lab", "down", "--config", str(cfg)),
            "lab up": dp("lab", "up", "--config", str(cfg)),
            "up": dp("up", "--config", str(cfg)),
        }
        for what, r in refusals.items():
            assert r.returncode == 1, (what, r.stdout, r.stderr)
            assert "refused, nothing was touched" in r.stderr, (what, r.stderr)
            assert f"dataplane run (pid {first.pid}, config {cfg}, started " in r.stderr, \
                (what, r.stderr)
        # the first run's files are the same files, its workers the same processes, still up
        assert {p: p.stat().st_ino for p in paths} == inodes
        assert workers_state(paths) == before
        assert lab.exists(parsed) and first.poll() is None
        assert not (tmp_path / "state" / "journal.json").exists()      # up changed nothing
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
            first.wait(60)
    assert first.returncode == 0, out + err
    assert "PROBLEM" not in out and "ran " in out, out
    assert holder(RUN_LOCK) is None                 # released when the run ended


def test_lab_up_is_refused_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}l"
    cfg = tmp_path / "dp.toml"
    cfg.write_text(default_text(tag))
    parsed = config.load(cfg)
    with held(RUN_LOCK, "dataplane run", "/some/other.toml") as other:
        r = dp("lab", "up", "--config", str(cfg))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"dataplane run (pid {other.pid}, config /some/other.toml" in r.stderr
        assert not any(lab.netns_exists(ns) for ns in parsed.lab.namespaces)
    # a dead holder's lock is free by construction
    assert holder(RUN_LOCK) is None
    try:
        assert dp("lab", "up", "--config", str(cfg)).returncode == 0
        assert lab.exists(parsed)
    finally:
        assert dp("lab", "down", "--config", str(cfg)).returncode == 0


def test_up_and_down_exclude_each_other(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[host]\njournal_dir = "{state}"\n')
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    Journal(state).record({"kind": "sysctl", "key": "net.core.somaxconn", "old": somaxconn})
    journal = (state / "journal.json").read_bytes()
    with held(HOST_LOCK, "dataplane up", str(cfg)) as other:
        for cmd in ("down", "up"):
            r = dp(cmd, "--config", str(cfg))
            assert r.returncode == 1, (cmd, r.stdout, r.stderr)
            assert (f"dataplane {cmd}: refused, nothing was touched: dataplane up (pid "
                    f"{other.pid}, config {cfg}, started ") in r.stderr, r.stderr
            assert (state / "journal.json").read_bytes() == journal
    r = dp("down", "--config", str(cfg))          # the holder is gone: its lock with it
    assert r.returncode == 0 and "undone sysctl net.core.somaxconn" in r.stdout, r.stderr
    assert not (state / "journal.json").exists()
