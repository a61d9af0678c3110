"""The alert rules and the Grafana dashboard, checked against the real tools: promtool checks the
rules and runs their unit tests (every alert fires in one of them); the committed dashboard is
its generator's output; dataplane_dropped_packets_total sums the per-cause counters; and a real
Prometheus, scraping a live run of the default lab with a keyed TCP transport every second,
returns data for every dashboard query and every alert expression (less its threshold), so no
misspelt metric survives.  The RDMA and MR-cache queries need an rxe device, which only the
QEMU guest has: they are listed below with that reason, and their metric names are checked
against what the collectors export."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.core import Metric

from dataplane.metrics.arenas import ArenaCollector
from dataplane.metrics.drops import REASONS, DropsCollector
from dataplane.metrics.mr_cache import MRCacheCollector
from dataplane.metrics.rdma import RdmaCollector
from dataplane.metrics.server import serve
from dataplane.shm.layout import PORT_COUNTERS, RING_COUNTERS
from tests.helpers.default_lab import free_port, lab_config, ship_rx_ring
from tests.helpers.metrics import promtool_check, samples, scrape
from tests.helpers.wait import wait

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "config" / "prometheus"
RULES = PROM / "dataplane.rules.yml"
RULE_TESTS = PROM / "dataplane.rules.test.yml"
GRAFANA = ROOT / "config" / "grafana"
RATE_INTERVAL = "10s"       # $__rate_interval at a 1 s scrape: ten samples a window

GUEST = "RDMA needs an rxe device, which only the QEMU guest has (docs/rdma.md)"
GUEST_ONLY_PANELS = {title: GUEST for title in (
    "RDMA credits and credit waits/s", "RDMA errors/s", "RDMA queue pairs",
    "MR cache hit ratio", "MR cache registered and budget", "MR cache evictions/s",
    "MR registration time p99")}
GUEST_ONLY_ALERTS = {name: GUEST for name in (
    "DataplaneRdmaErrors", "DataplaneRdmaBadDescriptors", "DataplaneMRCacheThrashing")}
GUEST_METRIC = re.compile(r"\bdataplane_(rdma|mr_cache)_\w+")


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: scripts/bootstrap.sh installs Debian's prometheus"
    return subprocess.run([exe, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


def alerts() -> dict[str, str]:
    """alert name -> expr, of every rule in the rules file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def without_threshold(expr: str) -> str:
    """The query of `query OP number`: what must return series for the alert to mean anything
    (the alert itself fires only on trouble).  The rules file keeps every expr in that shape."""
    depth, cut = 0, []
    for i, ch in enumerate(expr):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch in "<>=!" and expr[i - 1] not in "<>=!~":
            cut.append(i)
    assert len(cut) == 1, f"{expr!r}: expected one top-level comparison"
    query, threshold = expr[:cut[0]], expr[cut[0]:].lstrip("<>=! ")
    float(threshold)
    assert not re.search(r"\b(and|or|unless)\b", query), expr
    return query.strip()


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def panel_queries() -> dict[str, list[str]]:
    """panel title -> its queries, with the dashboard's variables as Grafana would fill them
    for "All" instances."""
    out: dict[str, list[str]] = {}
    for p in json.loads((GRAFANA / "dataplane.json").read_text())["panels"]:
        if p["type"] != "row":
            out[p["title"]] = [t["expr"].replace("$__rate_interval", RATE_INTERVAL)
                               .replace("$instance", ".*") for t in p["targets"]]
    return out


def sample_names(fams: Iterator[Metric]) -> set[str]:
    """The sample names families are exposed under."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {f.name + s for f in fams for s in suffixes.get(f.type, [""])}


# ---- the rules: promtool ----

def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_pass() -> None:
    r = promtool("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_fires_in_a_unit_test_and_has_one_threshold() -> None:
    fired = {case["alertname"] for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert set(alerts()) - fired == set(), "alerts without a firing unit test"
    for expr in alerts().values():
        without_threshold(expr)


# ---- the dashboard ----

def test_dashboard_is_its_generators_output() -> None:
    assert (GRAFANA / "dataplane.json").read_text() == generator().render(), \
        "run: python config/grafana/generate.py"


def test_guest_only_lists_are_exactly_the_rdma_queries_and_exported() -> None:
    """The panels and alerts left to the guest are those on RDMA or MR-cache metrics, and
    each of those metrics is one the collectors export."""
    panels = {t for t, qs in panel_queries().items() if any(GUEST_METRIC.search(q) for q in qs)}
    assert panels == set(GUEST_ONLY_PANELS)
    rules = {n for n, e in alerts().items() if GUEST_METRIC.search(e)}
    assert rules == set(GUEST_ONLY_ALERTS)
    exported = (sample_names(RdmaCollector([]).collect())
                | sample_names(MRCacheCollector({}).collect()))
    used = {m.group(0) for q in [*sum(panel_queries().values(), []), *alerts().values()]
            for m in GUEST_METRIC.finditer(q)}
    assert used - exported == set(), f"not exported: {used - exported}"


# ---- the drops family ----

def test_dropped_packets_sum_the_per_cause_counters(new_arena) -> None:
    a = new_arena("drops", rings=((0, 0), (0, 1), (1, 0)))
    full = RING_COUNTERS.index("ring_full_drops")
    for i, ring in enumerate(a.rings):
        ring.counters[full] = 10 + i
    a.port_counters[0, :len(PORT_COUNTERS)] = [100 + k for k in range(len(PORT_COUNTERS))]
    arenas = ArenaCollector([("w", a, ["in", "out"])])
    with serve(arenas, DropsCollector(arenas), port=0) as server:
        text = scrape(server.address)
    promtool_check(text)
    got = {(dict(lab)["reason"], dict(lab)["port"]): v for (n, lab), v in samples(text).items()
           if n == "dataplane_dropped_packets_total"}
    port = {k: 100 + PORT_COUNTERS.index(k) for k in PORT_COUNTERS}
    assert got == {("ring_full", "in"): 21, ("ring_full", "out"): 12,
                   ("nic_missed", "in"): port["nic_missed"],
                   ("nic_errors", "in"): port["nic_errors"],
                   ("rx_nombuf", "in"): port["rx_nombuf"], ("tx_dropped", "in"): port["tx_drops"],
                   **{(r, "out"): 0 for r in REASONS if r not in ("ring_full", "transport_lost")}}


# ---- a real Prometheus on a live run ----

@contextmanager
def prometheus(tmp: Path, target: str) -> Iterator[str]:
    """Debian's Prometheus with config/prometheus's scrape config and rules, scraping `target`
    every second; yields its base URL."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus missing: scripts/bootstrap.sh installs Debian's prometheus"
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(RULES)]
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp / "prometheus.log").open("w")
    p = subprocess.Popen([exe, f"--config.file={tmp / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp / 'data'}",
                          f"--web.listen-address={url.removeprefix('http://')}"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: get(url, "/-/ready") is not None or p.poll() is not None, "ready", 60)
        assert p.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        p.terminate()
        p.wait(30)
        log.close()


def get(url: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            body = r.read()
    except OSError:
        return None
    return json.loads(body) if path.startswith("/api/") else body


def query(url: str, q: str) -> list[dict[str, Any]]:
    r = get(url, "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
    assert r is not None and r["status"] == "success", (q, r)
    return r["data"]["result"]


@pytest.mark.root("netns, veth, DPDK: a live run of the default lab")
@pytest.mark.dpdk
def test_every_query_returns_data_from_a_live_run(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}p"
    cfg = lab_config(tag, rate=5000, rx_driver="af_packet")
    ship_rx_ring(cfg, tag, tmp_path / "link.key")    # the transport families need one
    from dataplane.run.runner import Run

    with Run(cfg, io.StringIO()) as r:
        r.start()
        host, port = r.metrics.address
        with prometheus(tmp_path, f"{host}:{port}") as url:
            # enough scrapes for every rate window, and every rule evaluated since
            wait(lambda: bool(query(url, 'count_over_time(up{job="dataplane"}[1m]) >= 15')),
                 "15 scrapes", 60)
            wait(lambda: bool(query(url, "dataplane_transport_packets_total > 0")),
                 "packets over the transport", 30)
            time.sleep(2)
            up = query(url, 'up{job="dataplane"}')
            assert [s["value"][1] for s in up] == ["1"], up
            empty = [f"panel {title!r}: {q}" for title, qs in panel_queries().items()
                     if title not in GUEST_ONLY_PANELS for q in qs if not query(url, q)]
            empty += [f"alert {name}: {without_threshold(expr)}"
                      for name, expr in alerts().items()
                      if name not in GUEST_ONLY_ALERTS and not query(url,
                                                                     without_threshold(expr))]
            rules = get(url, "/api/v1/rules")["data"]["groups"]
            unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"]
                         if r["health"] != "ok"]
    assert not empty, "queries that returned no series:\n" + "\n".join(empty)
    assert len({r["name"] for g in rules for r in g["rules"]}) == len(alerts())
    assert not unhealthy, unhealthy
