"""Reload (SIGHUP to `dataplane run`): only the difference is applied.  Live, on real runs of
the default lab: a changed generator rate restarts the generator on its arena with the new rate
(its counters go on, the receiver keeps its pid, the books balance at the end); a broken config
and a change that cannot be applied live are refused, logged by key, and the same workers keep
running; a removed worker is stopped and its arena removed, an added one started, the other
untouched.  RELOADING=1 (with MONOTONIC_USEC) and READY=1 with a STATUS= go to the notify socket
each time.  The decisions themselves (reload.diff) also run without root.

The live tests run under the host lock (flock /tmp/dp-host.lock): the lab, real runs."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from dataplane import config
from dataplane.run import reload
from tests.helpers.default_lab import default_text, free_port
from tests.helpers.metrics import metric, scrape
from tests.helpers.service import ServiceRun, service_run, stop, wait_until

root = pytest.mark.root("the lab, real runs")


def hup(run: ServiceRun, what: str, timeout: float = 90) -> dict[str, str]:
    """SIGHUP; the READY=1 that ends the reload (after its RELOADING=1), whose STATUS= holds
    `what`."""
    n = len(run.notify.messages)
    os.kill(run.proc.pid, signal.SIGHUP)
    i, reloading = run.notify.wait_for("RELOADING", timeout=timeout, after=n)
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    # systemd's clock: CLOCK_MONOTONIC, in µs, taken as the reload began
    assert 0 <= now_us - int(reloading["MONOTONIC_USEC"]) < timeout * 1e6, reloading
    _, ready = run.notify.wait_for("READY", timeout=timeout, after=i + 1)
    assert what in ready.get("STATUS", ""), ready
    return ready


def pids(run: ServiceRun, *names: str) -> dict[str, int]:
    out = {}
    for n in names:
        state, pid = run.worker(n)
        assert state == "running", (n, state)
        out[n] = pid
    return out


@root
def test_reload_rate_refusals_and_counters(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}h"
    gen, rx = f"gen{tag}", f"rx{tag}"
    text = default_text(tag)
    url = re.search(r'listen = "(127\.0\.0\.1):(\d+)"', text)
    assert url
    cfg = tmp_path / "dp.toml"
    cfg.write_text(text)
    with service_run(cfg, tmp_path, f"@dp-test-reload-{os.getpid()}") as run:
        run.notify.wait_for("READY")
        wait_until(lambda: run.rx_packets(rx) > 2000, "traffic before the reloads")
        first = pids(run, gen, rx)

        # a broken config: refused with its problem (by key), the running one kept
        cfg.write_text(text.replace("ring_size = 4096", "ring_size = 1000"))
        hup(run, "reload refused")
        assert "reload refused: arena.ring_size = 1000" in run.stderr.read_text(), run.logs()
        assert pids(run, gen, rx) == first

        # valid, but not live: the exporter's address; refused naming the key
        cfg.write_text(text.replace(url[0], f'listen = "127.0.0.1:{free_port()}"'))
        ready = hup(run, "metrics.listen")
        assert "refused" in ready["STATUS"], ready
        assert pids(run, gen, rx) == first

        # the rate: the generator alone restarts, on its arena, with the new rate
        tx = lambda: run.port_counter(gen, "tx_packets")     # noqa: E731
        seq = lambda: run.port_counter(gen, "gen_seq")       # noqa: E731
        before_tx, before_seq = tx(), seq()
        cfg.write_text(text.replace("rate_pps = 20000", "rate_pps = 1000"))
        hup(run, f"reloaded: restarted {gen}; unchanged {rx}")
        now = pids(run, gen, rx)
        assert now[rx] == first[rx], "the receiver was touched"
        assert now[gen] != first[gen], "the generator was not restarted"
        assert '"rate_pps":1000' in Path(f"/proc/{now[gen]}/cmdline").read_text()
        assert tx() >= before_tx and seq() >= before_seq, "a counter went backwards"
        # the new rate holds: 1000 pps (the old one would send 20000 a second)
        c0, t0 = tx(), time.monotonic()
        time.sleep(3)
        c1, t1 = tx(), time.monotonic()
        assert 0 < c1 - c0 <= 1000 * (t1 - t0) * 1.2 + 64, (c0, c1, t1 - t0)
        text_m = scrape((url[1], int(url[2])))
        assert metric(text_m, "dataplane_worker_restarts_total", worker=gen) == 0, \
            "a reload is not a failure"
        assert metric(text_m, "dataplane_worker_up", worker=gen) == 1

        # valid, but the generator cannot start on it (no such interface): rolled back, the
        # previous settings run again on the same arena, the receiver untouched
        pre, seq0 = pids(run, gen, rx), seq()
        cfg.write_text(text.replace("rate_pps = 20000", "rate_pps = 500")
                       .replace(f'iface = "dpe{tag}g"', 'iface = "nosuch0"'))
        ready = hup(run, "reload failed")
        assert "rolled back" in ready["STATUS"], ready
        back = pids(run, gen, rx)
        assert back[rx] == pre[rx], "the receiver was touched"
        cmdline = Path(f"/proc/{back[gen]}/cmdline").read_text()
        assert '"rate_pps":1000' in cmdline and "nosuch0" not in cmdline, cmdline
        assert seq() >= seq0, "a counter went backwards"
        wait_until(lambda: seq() > seq0 + 100, "the generator sending again")
        # every packet sent before, during and after the reload accounted for
        assert stop(run) == 0, run.logs()


@root
def test_reload_removes_and_adds_workers(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}a"
    gen, rx = f"gen{tag}", f"rx{tag}"
    text = default_text(tag, ("rate_pps = 20000", "rate_pps = 2000"))
    first_worker, second_worker = (m.start() for m in re.finditer(r"(?m)^\[\[worker\]\]", text))
    rx_only = text[:first_worker] + text[second_worker:]
    cfg = tmp_path / "dp.toml"
    cfg.write_text(text)
    with service_run(cfg, tmp_path, f"@dp-test-readd-{os.getpid()}") as run:
        run.notify.wait_for("READY")
        first = pids(run, gen, rx)
        gen_arena = run.arenas[gen]
        cfg.write_text(rx_only)
        hup(run, f"removed {gen}; unchanged {rx}")
        assert not gen_arena.exists(), "the removed worker's arena is still there"
        assert not Path(f"/proc/{first[gen]}").exists(), "the removed worker still runs"
        assert pids(run, rx) == {rx: first[rx]}
        before = run.rx_packets(rx)
        cfg.write_text(text)
        hup(run, f"added {gen}; unchanged {rx}")
        assert pids(run, rx) == {rx: first[rx]}
        wait_until(lambda: run.rx_packets(rx) > before + 1000, "traffic from the added generator")
        assert stop(run) == 0, run.logs()


def _plan(text: str) -> tuple[config.Config, list]:
    cfg = config.loads(text)
    return cfg, config.plan(cfg)


def test_diff_decisions() -> None:
    """Without root: what reload.diff decides for each kind of change."""
    text = default_text("d")
    old, running = _plan(text)

    def diff(new_text: str) -> reload.Changes:
        new, planned = _plan(new_text)
        return reload.diff(old, new, running, planned)

    same = diff(text)
    assert (same.refused, same.changed, same.added, same.removed) == ([], [], [], [])
    assert same.unchanged == ["gend", "rxd"]
    rate = diff(text.replace("rate_pps = 20000", "rate_pps = 5"))
    assert [s.name for s in rate.changed] == ["gend"] and rate.unchanged == ["rxd"]
    assert rate.changed[0].gen.rate_pps == 5
    # the geometry of a worker's arena, and the tables that cannot change live, name the key
    queues = diff(text.replace("queues = 1", "queues = 2", 1))     # the generator's port
    assert any("worker gend" in r for r in queues.refused), queues.refused
    for old_text, new_text, key in (("ring_size = 4096", "ring_size = 8192", "arena.ring_size"),
                                    ("mtu = 1500", "mtu = 1400", "lab"),
                                    ("ipv6 = false", "ipv6 = true", "lab")):
        d = diff(text.replace(old_text, new_text))
        assert any(r.startswith(key) for r in d.refused), (key, d.refused)
        assert not d.changed and not d.added and not d.removed
