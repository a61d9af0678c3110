"""Per-stream books from outside the run: what the run serves at /streams, and what `dataplane
status` shows of it.

/streams (on the metrics endpoint, behind its TLS and basic auth) answers one JSON object:

    {"streams": {"ID": {"received", "unique", "lost", "duplicated", "reordered", "late",
                        "latency": {"count", "min", "mean", "p50", "p90", "p99", "p99_9",
                                    "max"}}}}

(dataplane.consumers.streams.StreamBooks.report; latencies in seconds, exact to 3 significant
digits; `lost` counts the holes between the lowest and highest sequence numbers seen, since the
receiver does not know what was sent).  `status` reads it only where that needs no secret: a
plain-HTTP endpoint without basic auth; otherwise it says why the streams are not shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from dataplane.consumers.stats import TrafficStats


def route(stats: TrafficStats) -> Callable[[dict], dict]:
    """The /streams handler: called in the exporter's thread, it only copies the books."""

    def streams(query: dict[str, str]) -> dict[str, Any]:
        return {"streams": {str(k): v for k, v in stats.stream_reports().items()}}

    return streams


def fetch(cfg: Any, timeout: float = 2.0) -> dict[str, Any]:
    """{"streams": {...}} from the run of cfg, or {"streams": None, "why": ...}."""
    from dataplane.metrics.scrape import Endpoint, ScrapeError
    from dataplane.run.flows import url_of
    m = cfg.metrics
    if m.web is not None and (m.web.tls is not None or m.web.users):
        return {"streams": None, "why": "the metrics endpoint needs TLS or a password, which "
                                        "status does not have: GET /streams with them"}
    url = url_of(cfg).rsplit("/", 1)[0] + "/streams"
    try:
        data = json.loads(Endpoint(url, timeout=timeout).get())
    except (ScrapeError, json.JSONDecodeError) as e:
        return {"streams": None, "why": f"{url}: {e}"}
    return {"streams": data.get("streams", {})}


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e6:.4g}"


def lines(streams: dict[str, dict]) -> Iterator[str]:
    """One line per stream: its books and latency percentiles in microseconds."""
    for sid, s in sorted(streams.items(), key=lambda kv: int(kv[0])):
        lat = s["latency"]
        yield (f"stream {sid}: received {s['received']} ({s['unique']} unique), lost "
               f"{s['lost']}, reordered {s['reordered']}, duplicated {s['duplicated']}; "
               f"latency us: min {_us(lat['min'])} p50 {_us(lat['p50'])} p99 "
               f"{_us(lat['p99'])} p99.9 {_us(lat['p99_9'])} max {_us(lat['max'])} "
               f"mean {_us(lat['mean'])}")
