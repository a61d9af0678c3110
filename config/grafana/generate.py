"""Writes config/grafana/dataplane.json, the Grafana dashboard of the dataplane's metrics
(docs/metrics.md), from the panel list below: `python config/grafana/generate.py` rewrites it,
`--check` exits 1 when the committed file differs.  tests/test_dashboards.py checks both that
the committed JSON is this script's output and that every query returns data from a real
Prometheus scraping a live run.

A script of our own rather than grafanalib or grafana-foundation-sdk: the dashboard is a few
dozen panels of three kinds, the JSON model of those is small and stable, and the test against a
live Prometheus checks what matters (the queries); a library would add a dependency to
regenerate one file.  Why, at length: docs/operations.md, "Watch it: alerts and dashboard".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("dataplane.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = '{instance=~"$instance"}'      # every query follows the instance picker
RI = "$__rate_interval"


def rate(metric: str, by: str = "") -> str:
    """rate() of a counter of the chosen instances, summed by `by` when given."""
    q = f"rate({metric}{SEL}[{RI}])"
    return f"sum by ({by}) ({q})" if by else q


def quantile(q: float, histogram: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket{SEL}[{RI}])))"


def target(expr: str, legend: str = "", fmt: str = "time_series") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "format": fmt,
            "range": True}


def panel(kind: str, title: str, targets: list[dict[str, Any]], unit: str = "short",
          description: str = "", stack: bool = False, w: int = 12, h: int = 8,
          **options: Any) -> dict[str, Any]:
    """A panel of `kind` (timeseries, heatmap, stat); positions are set by dashboard()."""
    custom: dict[str, Any] = {}
    if kind == "timeseries":
        custom = {"drawStyle": "line", "fillOpacity": 30 if stack else 0,
                  "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": options, "gridPos": {"w": w, "h": h},
    }


def ts(title: str, *targets: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return panel("timeseries", title, list(targets), **kw)


def heatmap(title: str, histogram: str, unit: str, description: str) -> dict[str, Any]:
    t = target(f"sum by (le) (rate({histogram}_bucket{SEL}[{RI}]))", "{{le}}", "heatmap")
    return panel("heatmap", title, [t], unit, description, calculate=False,
                 yAxis={"unit": unit}, cellGap=1, color={"scheme": "Oranges", "mode": "scheme"})


def stat(title: str, expr: str, legend: str, description: str, **kw: Any) -> dict[str, Any]:
    return panel("stat", title, [target(expr, legend)], description=description, w=6,
                 h=8, reduceOptions={"calcs": ["lastNotNull"]}, colorMode="background", **kw)


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


PORT = "instance, worker, port"
WP = "{{worker}}/{{port}}"
XPORT = "instance, transport, role"
XL = "{{transport}} ({{role}})"


def panels() -> list[dict[str, Any]]:
    """Every panel, in order; a row starts a new band."""
    return [
        row("Traffic"),
        ts("Received packets/s per port", target(rate("dataplane_rx_packets_total", PORT), WP),
           unit="pps", description="Packets the workers put on their rings."),
        ts("Transmitted packets/s per port",
           target(rate("dataplane_tx_packets_total", PORT), WP), unit="pps"),
        ts("Received bits/s per port",
           target(f"8 * {rate('dataplane_rx_bytes_total', PORT)}", WP), unit="bps"),
        ts("Transmitted bits/s per port",
           target(f"8 * {rate('dataplane_tx_bytes_total', PORT)}", WP), unit="bps"),
        row("Drops"),
        ts("Drops by reason", target(rate("dataplane_dropped_packets_total", "reason"),
                                     "{{reason}}"), unit="pps", stack=True,
           description="Every way a packet is lost, stacked (docs/metrics.md)."),
        ts("Drops by port", target(rate("dataplane_dropped_packets_total",
                                        "instance, worker, port, transport"),
                                   "{{worker}}/{{port}} {{transport}}"), unit="pps", stack=True),
        ts("Malformed and truncated packets/s",
           target(rate("dataplane_malformed_packets_total", PORT), "malformed " + WP),
           target(rate("dataplane_truncated_packets_total", PORT), "truncated " + WP),
           unit="pps", description="Not losses: put on the ring, flagged."),
        ts("Generator streams: sequence numbers missing",
           target(f"dataplane_sequence_missing_packets{SEL}", "stream {{stream}}"),
           description="Between the lowest and highest received, never arrived."),
        ts("Generator streams: duplicates and reordering/s",
           target(rate("dataplane_sequence_duplicates_total", "instance, stream"),
                  "duplicates {{stream}}"),
           target(rate("dataplane_sequence_out_of_order_total", "instance, stream"),
                  "out of order {{stream}}"), unit="pps"),
        row("Rings, latency, sizes"),
        ts("Ring occupancy", target(f"dataplane_ring_occupancy_ratio{SEL}",
                                    "{{worker}}/{{port}}/{{queue}}"), unit="percentunit",
           description="Entries in use / ring size at the scrape; near 1 the ring drops."),
        heatmap("Latency", "dataplane_latency_seconds", "s",
                "End to end, from the generator's trailers."),
        ts("Latency p50 and p99",
           target(quantile(0.5, "dataplane_latency_seconds", PORT), "p50 " + WP),
           target(quantile(0.99, "dataplane_latency_seconds", PORT), "p99 " + WP), unit="s"),
        ts("Latency per stream: p50, p99, p99.9",
           *(target(quantile(q, "dataplane_stream_latency_seconds", "instance, stream"),
                    f"{name} stream {{{{stream}}}}")
             for q, name in ((0.5, "p50"), (0.99, "p99"), (0.999, "p99.9"))), unit="s",
           description="From each stream's HDR histogram (docs/lab.md, Latency); the exact "
                       "percentiles are in `dataplane status`."),
        heatmap("Packet sizes", "dataplane_packet_size_bytes", "bytes",
                "Sizes of consumed packets."),
        row("Workers"),
        stat("Workers up", f"dataplane_worker_up{SEL}", "{{worker}}",
             "1: running with a fresh heartbeat.", unit="bool"),
        stat("Worker restarts", f"dataplane_worker_restarts_total{SEL}", "{{worker}}",
             "Since the run started."),
        ts("Worker busy ratio",
           target(f"rate(dataplane_worker_busy_cycles_total{SEL}[{RI}]) / "
                  f"rate(dataplane_worker_cycles_total{SEL}[{RI}])", "{{worker}}"),
           unit="percentunit", description="Poll-loop cycles that moved packets."),
        ts("Worker heartbeat age", target(f"dataplane_worker_heartbeat_age_seconds{SEL}",
                                          "{{worker}}"), unit="s"),
        row("Consumers"),
        ts("Consumer cost: seconds per second",
           target(rate("dataplane_consumer_seconds_total", "instance, consumer"), "{{consumer}}"),
           unit="percentunit", stack=True,
           description="Share of the consumer thread each consumer takes (docs/consumers.md); "
                       "near 100% in total the consumers hold the rings back."),
        ts("Consumer cost per packet",
           target(f"{rate('dataplane_consumer_seconds_total', 'instance, consumer')} / "
                  f"{rate('dataplane_consumer_packets_total', 'instance, consumer')}",
                  "{{consumer}}"), unit="s"),
        ts("Consumer errors/s and state",
           target(rate("dataplane_consumer_errors_total", "instance, consumer"),
                  "errors {{consumer}}"),
           target(f"dataplane_consumer_up{SEL}", "up {{consumer}}")),
        row("Transports"),
        stat("Transports connected", f"dataplane_transport_connected{SEL}", XL,
             "1 while the transport has its peer.", unit="bool"),
        ts("Transport packets/s", target(rate("dataplane_transport_packets_total", XPORT), XL),
           unit="pps"),
        ts("Transport losses and reconnects/s",
           target(rate("dataplane_transport_lost_packets_total", XPORT), "lost " + XL),
           target(rate("dataplane_transport_reconnects_total", XPORT), "reconnects " + XL),
           target(rate("dataplane_transport_ring_waits_total", XPORT), "ring waits " + XL)),
        ts("Transport handshake failures/s by reason",
           target(rate("dataplane_transport_auth_failures_total", "instance, transport, reason"),
                  "{{transport}} {{reason}}"), stack=True),
        row("RDMA and the MR cache"),
        ts("RDMA credits and credit waits/s",
           target(f"dataplane_rdma_credits{SEL}", "credits {{transport}}"),
           target(rate("dataplane_rdma_credit_waits_total", XPORT), "waits " + XL)),
        ts("RDMA errors/s",
           target(rate("dataplane_rdma_wc_errors_total", XPORT), "wc " + XL),
           target(rate("dataplane_rdma_peer_errors_total", XPORT), "peer " + XL),
           target(rate("dataplane_rdma_bad_descriptors_total", XPORT), "bad descriptors " + XL)),
        ts("RDMA queue pairs", target(f"dataplane_rdma_queue_pairs{SEL}", "open " + XL),
           target(f"dataplane_rdma_device_max_qp{SEL}", "device max {{device}}")),
        ts("MR cache hit ratio",
           target(f"{rate('dataplane_mr_cache_hits_total', 'instance, cache')} / "
                  f"({rate('dataplane_mr_cache_hits_total', 'instance, cache')} + "
                  f"{rate('dataplane_mr_cache_misses_total', 'instance, cache')})", "{{cache}}"),
           unit="percentunit"),
        ts("MR cache registered and budget",
           target(f"dataplane_mr_cache_registered_bytes{SEL}", "registered {{cache}}"),
           target(f"dataplane_mr_cache_budget_bytes{SEL}", "budget {{cache}}"), unit="bytes"),
        ts("MR cache evictions/s", target(rate("dataplane_mr_cache_evictions_total",
                                               "instance, cache"), "{{cache}}")),
        ts("MR registration time p99",
           target(quantile(0.99, "dataplane_mr_cache_registration_seconds", "instance, cache"),
                  "{{cache}}"), unit="s"),
        row("The metrics endpoint"),
        ts("Endpoint refusals/s",
           target(rate("dataplane_exporter_auth_failures_total", "instance, reason"),
                  "auth {{reason}}"),
           target(rate("dataplane_exporter_rejected_connections_total", "instance"),
                  "over max_connections")),
        ts("Scrape duration", target('scrape_duration_seconds{job="dataplane", '
                                     'instance=~"$instance"}', "{{instance}}"), unit="s"),
    ]


def place(ps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids and grid positions: panels left to right on a 24-column grid, a row on its own."""
    x = y = h = 0
    for i, p in enumerate(ps, 1):
        p["id"] = i
        g = p["gridPos"] = p.get("gridPos", {"w": 24, "h": 1})
        if p["type"] == "row" or x + g["w"] > 24:
            x, y, h = 0, y + h, 0
        g["x"], g["y"] = x, y
        x, h = x + g["w"], max(h, g["h"])
        if p["type"] == "row":
            x, y, h = 0, y + g["h"], 0
    return ps


def dashboard() -> dict[str, Any]:
    return {
        "uid": "dataplane", "title": "Dataplane", "tags": ["dataplane"],
        "description": "The dataplane's metrics (docs/metrics.md), from config/grafana/"
                       "generate.py.",
        "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"}, "timezone": "",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus"},
            {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
             "query": {"query": "label_values(dataplane_worker_up, instance)",
                       "refId": "instance"},
             "definition": "label_values(dataplane_worker_up, instance)", "refresh": 2,
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": place(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        if OUT.read_text() != render():
            print(f"{OUT} is not generate.py's output: run python {__file__}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
