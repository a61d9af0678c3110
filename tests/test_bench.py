"""`dataplane bench`: RFC 2544 against the lab's DUT.  The search, the placing of losses, the
report and the flags run as any user; the benches against a Linux router namespace, plain and
with its egress shaped by a tbf qdisc of a known rate, run as root on the real kernel."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dataplane import config
from dataplane.bench import report
from dataplane.bench.rfc2544 import SizeResult, table
from dataplane.bench.search import Trial, search
from dataplane.bench.trial import Bench, Result, place
from dataplane.config.tables import ConfigError
from dataplane.host.proc import poll
from dataplane.run import dut, lab

ROOT_DIR = Path(__file__).resolve().parent.parent
ROUTER = ROOT_DIR / "config/dut-router.toml"
DP = [sys.executable, "-m", "dataplane.cli"]
BENCH_ROOT = pytest.mark.root("the router lab's namespaces and veths, runs of its workers")


def limited(limit: float, ceiling: float = 1e9):
    """A trial against a device that forwards up to `limit` pps, offered by a generator that
    reaches at most `ceiling`."""
    def trial(pps: float) -> Trial:
        offered = min(pps, ceiling)
        return Trial(pps, offered, offered <= limit, int(max(0, offered - limit)))
    return trial


def test_search_finds_the_limit_within_resolution() -> None:
    s = search(limited(37_000), 100_000, resolution=0.01, max_trials=20)
    assert not s.capped and 36_000 <= s.rate <= 37_000
    assert any(not t.passed for t in s.trials) and s.trials[0].asked == 100_000


def test_search_says_when_the_generator_is_the_limit() -> None:
    s = search(limited(1e9, ceiling=50_000), 100_000)
    assert s.capped and s.rate == 50_000 and len(s.trials) == 1
    s = search(limited(30_000, ceiling=50_000), 100_000, resolution=0.01, max_trials=20)
    assert not s.capped and 29_000 <= s.rate <= 30_000
    assert max(t.asked for t in s.trials[1:]) <= 50_000   # never asked above the ceiling again


def test_losses_are_placed_by_the_counters_along_the_path() -> None:
    r = Result(128, 1000, 1000, 1000, sent=1000, received=900, lost=100)
    dut = {"ingress": {"rx_packets": 990}, "egress": {"tx_packets": 960}}
    # 5 never left the generator, 5 lost before the DUT, 30 in it, 60 after it: 20 of them
    # counted by our receiver, 40 on the way
    assert place(r, 5, 20, dut) == {"generator": 5, "receiver": 20, "to_dut": 5, "dut": 30,
                                    "from_dut": 40}
    assert place(r, 0, 0, {}) == {"unplaced": 100}      # no DUT counters: not placed


def test_bench_sizes_and_the_configs_it_refuses(tmp_path: Path) -> None:
    b = Bench(ROUTER)
    # 64 B less the FCS has no room for IPv4/UDP headers and the trailer: measured at 70 B
    assert b.smallest() == 70 and b.dut.mode == "router"
    cfg = b.config(256, 1234, 617)
    g = cfg.workers[b.gen].generate
    assert g.size == 252 and (g.streams[0].rate_pps, g.streams[0].count) == (1234, 617)
    two = tmp_path / "two.toml"
    text = ROUTER.read_text()
    gen = text[text.index("[[worker]]"):text.index("[[worker]]", text.index("[[worker]]") + 1)]
    two.write_text(text + "\n" + gen.replace('name = "dutgen"', 'name = "gen2"'))
    with pytest.raises(ConfigError, match="2 workers with a \\[worker.generate\\] table"):
        Bench(two)
    nolab = tmp_path / "nolab.toml"
    nolab.write_text(text[text.index("[metrics]"):].replace('netns = "dpr-gen"\n', "")
                     .replace('netns = "dpr-rx"\n', ""))
    with pytest.raises(ConfigError, match="no \\[lab\\] table"):
        Bench(nolab)


def results() -> list[SizeResult]:
    a = SizeResult(64, 70, 1e5, 8e4, 8e4 * 70 * 8, latency={"count": 9, "p50": 1e-5,
                                                            "p99": 3e-5, "p99_9": 4e-5,
                                                            "max": 5e-5})
    a.notes.append("64 B cannot carry the headers and the trailer: measured at 70 B")
    a.loss = [{"percent": 100, "offered_pps": 1e5, "loss_rate": 0.2, "where": {"dut": 20000}}]
    b = SizeResult(1518, 1518, 2e4, 2e4, 2e4 * 1518 * 8, capped=True, back_to_back=500)
    return [a, b]


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def pngs_in(path: Path) -> list[bytes]:
    """The images of an HTML report, each checked to be an embedded PNG."""
    p = Images()
    p.feed(path.read_text())
    out = []
    for src in p.srcs:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64"
        out.append(base64.b64decode(data, validate=True))
        assert out[-1].startswith(b"\x89PNG\r\n\x1a\n")
    return out


def test_report_is_self_contained_html_with_both_plots(tmp_path: Path) -> None:
    f = tmp_path / "r.html"
    report.write(str(f), results(), {"config": "x.toml"})
    assert len(pngs_in(f)) == 2
    text = f.read_text()
    assert "Throughput against frame size" in text and "Latency against frame size" in text
    assert "measured at 70 B" in text and "http" not in text.replace("http-equiv", "")
    t = table(results())
    assert "80,000" in t and "20,000+" in t and "the generator, not the DUT" in t


@pytest.mark.parametrize(("flag", "said"), [
    (["--sizes", "10"], "each size (bytes with FCS) 64..9018"),
    (["--tests", "speed"], "'speed': expected some of"),
    (["--loss-steps", "0"], "each step (percent of the top) 1..100"),
    (["--resolution", "2"], "expected 0.001..0.5"),
])
def test_bad_flags_are_usage_errors(flag: list[str], said: str) -> None:
    res = subprocess.run([*DP, "bench", *flag], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and said in res.stderr


def bench(*args: str) -> dict:
    res = subprocess.run([*DP, "bench", "--config", str(ROUTER), "--sizes", "128", *args,
                          "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT_DIR)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def host_clean() -> None:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not {"dpr-gen", "dpr-dut", "dpr-rx"} & set(names.split()), names
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not any(n in links for n in ("drgen0", "drrx0", "dutin0", "dutout0"))


@BENCH_ROOT
def test_bench_against_a_linux_router(tmp_path: Path) -> None:
    html = tmp_path / "bench.html"
    out = bench("--trial-seconds", "0.5", "--resolution", "0.1", "--loss-steps", "100",
                "--b2b-max", "5000", "--report", str(html))
    host_clean()            # the bench made the lab, so it took it down
    r = out["results"][0]
    assert r["size"] == r["measured_size"] == 128 and r["throughput_pps"] > 0
    # either the generator's own top passed (said so) or a trial above the rate found lost
    lost_above = [t for t in r["trials"] if not t["passed"] and t["offered"] > r["throughput_pps"]]
    assert r["capped"] or lost_above
    assert all(t["lost"] > 0 or t["detail"]["where"] for t in lost_above)
    assert r["latency"]["count"] > 0 and 0 < r["latency"]["p50"] <= r["latency"]["max"]
    assert [s["percent"] for s in r["loss"]] == [100] and r["back_to_back"] > 0
    assert len(pngs_in(html)) == 2


@BENCH_ROOT
def test_bench_finds_the_rate_of_a_tbf_shaped_dut() -> None:
    cfg = config.load(ROUTER)
    rate_bits, top, resolution = 20e6, 40_000, 0.05
    # tbf counts a frame's bytes as the kernel sends it: Ethernet header, no FCS
    expected = rate_bits / (8 * (128 - 4))
    try:
        lab.up(cfg)
        subprocess.run(["ip", "netns", "exec", "dpr-dut", "tc", "qdisc", "add", "dev",
                        "dutout0", "root", "tbf", "rate", "20mbit", "burst", "4kb", "latency",
                        "5ms"], check=True)
        out = bench("--tests", "throughput", "--trial-seconds", "1", "--resolution",
                    str(resolution), "--max-pps", str(top))
        assert lab.exists(cfg)      # the bench found the lab up: not its to take down
    finally:
        lab.down(cfg)
    host_clean()
    r = out["results"][0]
    assert not r["capped"]
    # within the search's resolution below; above only by what tbf's 5 ms queue and 4 kB burst
    # let through in one 1 s trial (about 170 frames)
    assert expected - resolution * top <= r["throughput_pps"] <= expected + 200, (expected, r)
    failed = [t for t in r["trials"] if not t["passed"]]
    assert failed and all(t["detail"]["where"].get("dut", 0) > 0 for t in failed)


@BENCH_ROOT
def test_a_trial_refuses_a_dut_that_died(tmp_path: Path) -> None:
    text = ROUTER.read_text().replace('mode = "router"               # router | bridge | command',
                                      'mode = "command"\ncommand = ["sleep", "600"]')
    f = tmp_path / "cmd.toml"
    f.write_text(text)
    b = Bench(f)
    try:
        lab.up(b.cfg)
        for pid in dut.pids("dpr-dut"):
            os.kill(pid, signal.SIGKILL)
        poll(lambda: not dut.pids("dpr-dut"), 5, what="the DUT's command to die")
        with pytest.raises(lab.LabError, match="its DUT is not"):
            b.trial(128, 1000, 0.1)
    finally:
        lab.down(b.cfg)
    host_clean()
