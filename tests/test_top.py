"""`dataplane top`: the view computed from scrapes (exposition text parsed by prometheus_client,
rates over the interval, latency quantiles from bucket differences), `top --once` against a real
metrics endpoint behind TLS and basic auth, nothing listening, and a live run of the default lab
watched by an unprivileged user."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import bcrypt
import pytest

from dataplane.metrics.scrape import Endpoint, Scrape, ScrapeError
from dataplane.metrics.server import serve
from dataplane.run.top import View
from tests.helpers import unprivileged
from tests.helpers.default_lab import free_port
from tests.helpers.live_run import dp, live_run
from tests.test_metrics_security import TLS, Pki

TAG = f"{os.getpid() % 10000}"


def exposition(rx: int, tx: int, drops: int, lat_fast: int, lat_slow: int) -> str:
    """The text a run's endpoint serves (as prometheus_client writes it), trimmed to a few
    families: rx on rx/in, tx on gen/out, latency buckets 50us/1ms/+Inf."""
    return f"""\
# HELP dataplane_rx_packets_total Packets put on the ring.
# TYPE dataplane_rx_packets_total counter
dataplane_rx_packets_total{{port="in",queue="0",worker="rx"}} {rx}.0
dataplane_rx_packets_total{{port="out",queue="0",worker="gen"}} 0.0
# HELP dataplane_rx_bytes_total Bytes of packets put on the ring.
# TYPE dataplane_rx_bytes_total counter
dataplane_rx_bytes_total{{port="in",queue="0",worker="rx"}} {rx * 100}.0
dataplane_rx_bytes_total{{port="out",queue="0",worker="gen"}} 0.0
# HELP dataplane_tx_packets_total Packets transmitted.
# TYPE dataplane_tx_packets_total counter
dataplane_tx_packets_total{{port="out",worker="gen"}} {tx}.0
dataplane_tx_packets_total{{port="in",worker="rx"}} 0.0
# HELP dataplane_ring_occupancy_ratio Ring entries in use / ring size.
# TYPE dataplane_ring_occupancy_ratio gauge
dataplane_ring_occupancy_ratio{{port="in",queue="0",worker="rx"}} 0.25
# HELP dataplane_dropped_packets_total Packets lost, by reason.
# TYPE dataplane_dropped_packets_total counter
dataplane_dropped_packets_total{{port="in",reason="ring_full",transport="",worker="rx"}} {drops}.0
dataplane_dropped_packets_total{{port="in",reason="nic_missed",transport="",worker="rx"}} 0.0
# HELP dataplane_latency_seconds End-to-end latency of generated packets.
# TYPE dataplane_latency_seconds histogram
dataplane_latency_seconds_bucket{{le="5e-05",port="in",queue="0",worker="rx"}} {lat_fast}.0
dataplane_latency_seconds_bucket{{le="0.001",port="in",queue="0",worker="rx"}} {lat_slow}.0
dataplane_latency_seconds_bucket{{le="+Inf",port="in",queue="0",worker="rx"}} {lat_slow}.0
dataplane_latency_seconds_count{{port="in",queue="0",worker="rx"}} {lat_slow}.0
dataplane_latency_seconds_sum{{port="in",queue="0",worker="rx"}} 0.01
# HELP dataplane_worker_up 1 when the worker runs and its heartbeat is fresh.
# TYPE dataplane_worker_up gauge
dataplane_worker_up{{worker="gen"}} 1.0
dataplane_worker_up{{worker="rx"}} 0.0
# HELP dataplane_worker_state 1 for the worker's current state.
# TYPE dataplane_worker_state gauge
dataplane_worker_state{{state="running",worker="gen"}} 1.0
dataplane_worker_state{{state="failed",worker="rx"}} 1.0
dataplane_worker_state{{state="running",worker="rx"}} 0.0
"""


def rows(lines: list[str], first: str) -> dict[str, list[str]]:
    """The rows of the frame's table that begins with `first`, by their first column."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith(first))
    out = {}
    for ln in lines[i + 1:]:
        if not ln:
            break
        cells = re.split(r"\s{2,}", ln.strip())
        out[cells[0]] = cells[1:]
    return out


def test_view_rates_drops_latency_and_workers() -> None:
    a = Scrape.parse(exposition(rx=1000, tx=1000, drops=5, lat_fast=900, lat_slow=1000), at=10)
    b = Scrape.parse(exposition(rx=41000, tx=41000, drops=25, lat_fast=1000, lat_slow=41000),
                     at=12)
    lines = View(a, b, "http://x/metrics").lines()
    ports = rows(lines, "PORT")
    # 40000 packets in 2 s; 100 bytes each: 2 MB/s, 16 Mb/s
    assert ports["rx/in"] == ["20.00 k", "16.00 Mb", "0", "0 b"], lines
    assert ports["gen/out"] == ["0", "0 b", "20.00 k", "0 b"], lines
    assert rows(lines, "DROPS")["ring_full"] == ["10", "25"], lines
    # in the interval 100 of 40000 under 50us: p50 and p99 in the 1 ms bucket
    assert rows(lines, "RING")["rx/in/0"] == ["25.0%", "<=1000us", "<=1000us"], lines
    workers = rows(lines, "WORKER")
    assert workers["gen"][:2] == ["running", "up"] and workers["rx"][:2] == ["failed", "DOWN"]
    assert "TRANSPORTS: none" in lines


class _Recorded(BaseHTTPRequestHandler):
    """Serves the next recorded text at each GET."""
    texts: Iterator[str]

    def do_GET(self) -> None:
        body = next(self.texts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_top_once_reads_recorded_text_over_http() -> None:
    texts = iter([exposition(1000, 1000, 0, 0, 0), exposition(3000, 3000, 0, 0, 0)])
    handler = type("H", (_Recorded,), {"texts": texts})
    with HTTPServer(("127.0.0.1", 0), handler) as srv:
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            r = dp("top", "--once", "--interval", "0.2", "--url",
                   f"http://127.0.0.1:{srv.server_address[1]}/metrics")
        finally:
            srv.shutdown()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert float(rows(lines, "PORT")["rx/in"][0].split()[0]) > 0, r.stdout
    assert rows(lines, "RING")["rx/in/0"][1:] == ["-", "-"]     # no latency observed yet


def test_nothing_listening_is_a_clear_failure() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    r = dp("top", "--once", "--url", url)
    assert r.returncode == 1 and r.stdout == ""
    assert (f"dataplane top: no dataplane metrics at {url}: connection refused; is it running? "
            "(dataplane status)") in r.stderr
    with pytest.raises(ScrapeError, match="connection refused"):
        Endpoint(url).get()


def test_tls_and_basic_auth(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    h = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    with serve(port=0, web=pki.web(TLS + f"basic_auth_users:\n  watcher: {h}\n")) as srv:
        url = f"https://127.0.0.1:{srv.address[1]}/metrics"
        ca = str(tmp_path / "ca.crt")
        r = dp("top", "--once", "--url", url)
        assert r.returncode == 1 and "give the CA that signed it (--ca)" in r.stderr, r.stderr
        r = dp("top", "--once", "--url", url, "--ca", ca)
        assert r.returncode == 1 and "HTTP 401" in r.stderr and "--user" in r.stderr, r.stderr
        env = {**os.environ, "DATAPLANE_METRICS_PASSWORD": "s3cret"}
        r = dp("top", "--once", "--interval", "0.1", "--url", url, "--ca", ca, "--user",
               "watcher", env=env)
        assert r.returncode == 0, r.stderr
        assert "PORT: none" in r.stdout       # an endpoint with no workers behind it
        pw = tmp_path / "pw"
        pw.write_text("wrong\n")
        r = dp("top", "--once", "--url", url, "--ca", ca, "--user", "watcher",
               "--password-file", str(pw))
        assert r.returncode == 1 and "HTTP 401" in r.stderr, r.stderr


@pytest.mark.root("the lab: netns, veth")
def test_top_once_on_a_live_run_as_nobody(tmp_path: Path) -> None:
    with live_run(tmp_path, f"{TAG}t") as run:
        # the rates need traffic in both scrapes: wait for the generator's first packets
        for _ in range(30):
            r = dp("top", "--once", "--url", run.url, prefix=unprivileged.prefix())
            assert r.returncode == 0, r.stderr
            ports = rows(r.stdout.splitlines(), "PORT")
            if all(float(ports[p][i].split()[0]) > 0
                   for p, i in ((f"gen{run.tag}/out", 2), (f"rx{run.tag}/in", 0))):
                break
        else:
            raise AssertionError(f"no traffic in the frame:\n{r.stdout}\n{run.output()}")
        lines = r.stdout.splitlines()
        workers = rows(lines, "WORKER")
        assert [workers[f"{w}{run.tag}"][:2] for w in ("gen", "rx")] == [["running", "up"]] * 2
        assert "ring_full" in rows(lines, "DROPS"), r.stdout
        assert f"rx{run.tag}/in/0" in rows(lines, "RING"), r.stdout
