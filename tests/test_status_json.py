"""`dataplane status --json` and its exit code, and `run --json`, as an operator's script uses
them: on a config nothing runs, on a live run of the default lab, with a worker the supervisor
gave up on, after the run; and the books of a short run as JSON against the printed ones."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.default_lab import default_text
from tests.helpers.live_run import LiveRun, dp, live_run

TAG = f"{os.getpid() % 10000}"


def status(cfg: Path) -> tuple[int, dict[str, Any]]:
    r = dp("status", "--json", "--config", str(cfg))
    assert r.stdout.count("\n") == 1, r.stdout + r.stderr      # one object, one line
    return r.returncode, json.loads(r.stdout)


def by_name(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in rep["workers"]}


def test_nothing_running_exits_3_naming_every_worker(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    cfg.write_text(default_text(f"{TAG}n"))
    rc, rep = status(cfg)
    assert rc == 3 and rep["ok"] is False, rep
    assert rep["down"] == [f"worker gen{TAG}n: no arena (not running)",
                           f"worker rx{TAG}n: no arena (not running)"]
    assert rep["lab"]["up"] is False and rep["transports"] == []
    assert set(rep["host"]) == {"journal", "changes", "run_pid"}
    assert "3 none of them runs" in dp("status", "--help").stdout


def wait_status(cfg: Path, ok: Any, what: str, timeout: float = 60) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        rc, rep = status(cfg)
        if ok(rc, rep):
            return rc, rep
        assert time.monotonic() < deadline, f"{what}: rc {rc}, {json.dumps(rep, indent=1)}"
        time.sleep(0.5)


def give_up(run: LiveRun, worker: str) -> None:
    """SIGKILL the worker each time the supervisor has restarted it, until it gives up (5 starts
    in 60 s, the supervisor's default): a worker that keeps failing.  Seen from outside: its
    4th restart killed and no 5th, for longer than the supervisor takes to restart one."""
    deadline = time.monotonic() + 150
    killed: set[int] = set()
    while True:
        assert time.monotonic() < deadline and run.proc.poll() is None, run.output()
        _, rep = status(run.config)
        w = by_name(rep)[worker]
        if w["up"] and w["pid"] not in killed:
            os.kill(w["pid"], signal.SIGKILL)
            killed.add(w["pid"])
        elif w.get("restarts") == 4 and w["pid"] in killed and not w["up"]:
            time.sleep(5)
            _, rep = status(run.config)
            again = by_name(rep)[worker]
            if (again["pid"], again["up"]) == (w["pid"], False):
                return
        time.sleep(0.2)


@pytest.mark.root("the lab: netns, veth")
def test_status_json_live_then_a_worker_fails_then_the_run_ends(tmp_path: Path) -> None:
    gen, rx = f"gen{TAG}s", f"rx{TAG}s"
    with live_run(tmp_path, f"{TAG}s") as run:
        rc, rep = wait_status(run.config, lambda rc, rep: rc == 0 and by_name(rep)[rx].get(
            "counters", {}).get("rx_packets", 0) > 0, "both workers up, packets received")
        assert rep["ok"] is True and rep["down"] == [] and rep["lab"]["up"] is True
        w = by_name(rep)
        for name in (gen, rx):
            assert w[name]["state"] == "running" and w[name]["alive"] is True, w[name]
            assert w[name]["restarts"] == 0 and w[name]["heartbeat_age"] < 3
        assert w[gen]["counters"]["tx_packets"] > 0 and w[rx]["counters"]["rx_bytes"] > 0
        assert [p["port"] for p in w[rx]["ports"]] == ["in"]
        text = dp("status", "--config", str(run.config))
        assert text.returncode == 0 and "all running" in text.stdout, text.stdout
        assert re.search(rf"worker {rx}: .*\n  rx [1-9]\d* packets", text.stdout), text.stdout

        give_up(run, rx)
        rc, rep = status(run.config)
        assert rc == 4 and rep["ok"] is False, rep
        assert [d.split(":")[0] for d in rep["down"]] == [f"worker {rx}"], rep["down"]
        w = by_name(rep)
        assert w[gen]["up"] is True and w[rx]["up"] is False and w[rx]["restarts"] == 4
        assert w[rx]["counters"]["rx_packets"] > 0, "the counters of a failed worker stay"
        text = dp("status", "--config", str(run.config))
        assert text.returncode == 4 and f"DOWN: 1: worker {rx}: " in text.stdout, text.stdout
    rc, rep = status(run.config)
    assert rc == 3 and not any(w["up"] for w in rep["workers"]), rep


@pytest.mark.root("the lab: netns, veth")
def test_run_json_books_are_the_printed_books(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    cfg.write_text(default_text(f"{TAG}j"))
    r = dp("run", "--json", "--duration", "3", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    *before, last = r.stdout.rstrip("\n").splitlines()
    books = json.loads(last)
    assert set(books) == {"seconds", "totals", "streams", "restarts", "ok", "problems"}
    assert books["ok"] is True and books["problems"] == [] and books["restarts"] == 0
    t = books["totals"]
    m = re.search(r"ran ([\d.]+) s: rx (\d+) packets \((\d+) bytes\), tx (\d+); drops: ring "
                  r"(\d+), nic (\d+), tx (\d+), no-mbuf (\d+); malformed (\d+); restarts (\d+)",
                  "\n".join(before))
    assert m, r.stdout
    assert f"{books['seconds']:.1f}" == m[1]
    assert [t[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "ring_full_drops",
                           "nic_missed", "tx_drops", "rx_nombuf", "malformed")] == \
        [int(x) for x in m.groups()[1:9]]
    assert t["rx_packets"] > 0 and t["drops"] == sum(
        t[k] for k in ("ring_full_drops", "nic_missed", "tx_drops", "rx_nombuf",
                       "transport_lost"))
    (sid, s), = books["streams"].items()
    line = re.search(rf"stream {sid} from gen{TAG}j: sent (\d+), received (\d+) unique "
                     r"\((\d+) duplicates\), missing (-?\d+)", r.stdout)
    assert line, r.stdout
    assert [s[k] for k in ("sent", "unique", "duplicates", "missing")] == \
        [int(x) for x in line.groups()]
