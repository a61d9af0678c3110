"""`dataplane run` as a systemd notify service, against a real notify socket bound here (what
systemd listens on): READY=1 once every worker runs, WATCHDOG=1 every WATCHDOG_USEC/2 while the
workers are healthy and none after one is given up, STOPPING=1 on SIGTERM; the abstract
namespace ('@name') and a path; journald-style logs when JOURNAL_STREAM is stderr; the line a
second only with --progress (stdout is no terminal here).

Run under the host lock (flock /tmp/dp-host.lock): the default lab, real runs."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers.default_lab import default_text
from tests.helpers.service import service_run, stop, wait_until

pytestmark = pytest.mark.root("the lab, real runs")

PROGRESS = re.compile(r"^\[\s*\d+s\] rx ", re.M)


def lab_file(tmp_path: Path, tag: str) -> Path:
    cfg = tmp_path / "dp.toml"
    cfg.write_text(default_text(tag, ("rate_pps = 20000", "rate_pps = 2000")))
    return cfg


def test_ready_watchdog_stopping(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}n"
    cfg = lab_file(tmp_path, tag)
    with service_run(cfg, tmp_path, f"@dp-test-notify-{os.getpid()}",
                     extra=("--progress",)) as run:
        _, ready = run.notify.wait_for("READY")
        # READY=1 means every worker runs: it is sent after they do, never before
        for name in (f"gen{tag}", f"rx{tag}"):
            assert run.worker(name)[0] == "running", name
        assert "running 2 worker(s)" in ready["STATUS"], ready
        assert "WATCHDOG" not in ready
        # WATCHDOG_USEC = 2 s: a ping a second while healthy
        pings = [m for m in run.notify.collect(4.5) if m.get("WATCHDOG") == "1"]
        assert 3 <= len(pings) <= 6, run.notify.kinds()
        assert stop(run) == 0, run.logs()
        run.notify.wait_for("STOPPING", timeout=1)     # sent before the process ended
    out = run.stdout.read_text()
    assert PROGRESS.search(out), out      # --progress: the line a second on a pipe too


def test_watchdog_stops_when_a_worker_is_given_up(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}w"
    cfg = lab_file(tmp_path, tag)
    sock = tmp_path / "notify.sock"
    with service_run(cfg, tmp_path, str(sock)) as run:
        run.notify.wait_for("READY")
        run.notify.wait_for("WATCHDOG", timeout=5)
        rx = f"rx{tag}"
        # the supervisor gives up after 5 starts in 60 s: the first start, 4 restarts, a kill
        pid = 0
        for _ in range(5):
            wait_until(lambda p=pid: run.worker(rx)[1] != p and run.worker(rx)[0] == "running",
                       "the receiver (re)started", 60)
            pid = run.worker(rx)[1]
            os.kill(pid, signal.SIGKILL)
        # a STATUS= says why the pings stopped
        k, degraded = run.notify.wait_for("STATUS", "gave up", timeout=30, contains=True)
        assert rx in degraded["STATUS"], degraded
        assert run.proc.poll() is None, "the run goes on; the watchdog is what stops it"
        run.notify.collect(3.5)          # three ping intervals
        after = [m for _, m in run.notify.messages[k + 1:]]
        assert not [m for m in after if m.get("WATCHDOG")], run.notify.kinds()
        assert stop(run, timeout=150) == 1, "a given-up worker is a problem in the books"


def test_journal_stream_priorities_no_timestamps_no_progress(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}j"
    cfg = lab_file(tmp_path, tag)
    with service_run(cfg, tmp_path, f"@dp-test-journal-{os.getpid()}",
                     extra=("--duration", "3"), env={"JOURNAL_STREAM": "stderr"}) as run:
        assert run.proc.wait(90) == 0, run.logs()
    err = run.stderr.read_text().splitlines()
    assert err, "nothing logged"
    # ours: each line of our loggers (libbpf, libxdp and EAL in the workers write their own,
    # which journald takes at its default priority)
    ours = [ln for ln in err if re.search(r"\bdataplane[.\w]*: ", ln)]
    assert ours, err
    for line in ours:
        assert re.match(r"^<[0-7]>dataplane[.\w]*: ", line), line
    for line in err:
        assert not re.match(r"^\d\d:\d\d:\d\d", line), f"a timestamp of our own: {line}"
    assert any(ln.startswith("<6>dataplane.workers.supervisor: worker ") for ln in err), err
    out = run.stdout.read_text()
    assert not PROGRESS.search(out), f"a line a second without a terminal or --progress:\n{out}"
    assert "ran " in out, out           # the report still comes


def test_log_file_takes_the_output(tmp_path: Path) -> None:
    """--log-file (what `up` gives its background run): the log, the report and the workers'
    own lines in the file, nothing on the inherited stdout and stderr."""
    tag = f"{os.getpid() % 10000}f"
    cfg = lab_file(tmp_path, tag)
    log = tmp_path / "state" / "run.log"
    log.parent.mkdir(mode=0o700)
    with service_run(cfg, tmp_path, f"@dp-test-logfile-{os.getpid()}",
                     extra=("--duration", "2", "--log-file", str(log))) as run:
        assert run.proc.wait(90) == 0, log.read_text()
    assert run.logs() == "", run.logs()
    text = log.read_text()
    assert "dataplane.workers.supervisor: worker " in text and "\nran " in text, text


ROTATE = """
import os, sys
from dataplane.run.logfile import LogFile
lf = LogFile(sys.argv[1], max_bytes=1000, keep=2)
for i in range(13):
    print(f"line {i:03d} " + "x" * 290, flush=True)    # 300 bytes a line
    lf.rotate_if_full()
"""


def test_log_file_rotates(tmp_path: Path) -> None:
    """Without root: a real process writing through LogFile keeps at most keep + 1 files of
    about max_bytes each, newest last, and refuses a link in place of the file."""
    import subprocess
    import sys
    log = tmp_path / "run.log"
    r = subprocess.run([sys.executable, "-c", ROTATE, str(log)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["run.log", "run.log.1", "run.log.2"], files
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1200, (p, p.stat().st_size)
    assert "line 012" in log.read_text() and "line 011" in (tmp_path / "run.log.1").read_text()
    assert "line 000" not in "".join(p.read_text() for p in tmp_path.iterdir()), "kept too much"
    log.unlink()
    log.symlink_to(tmp_path / "elsewhere")
    r = subprocess.run([sys.executable, "-c", ROTATE, str(log)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "symbolic link" in r.stderr, r.stderr
    assert not (tmp_path / "elsewhere").exists()
