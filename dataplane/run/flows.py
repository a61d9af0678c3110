"""Top flows without code: what the run serves at /flows, and `dataplane flows`, which reads it.

/flows (on the metrics endpoint, behind its TLS and basic auth) answers one JSON object:

    {"stats": [flow, ...],                     the built-in statistics' top flows by bytes
     "consumers": {"NAME": [flow, ...], ...}}  each consumer with top_flows(n), e.g. "flows"

`?n=N` asks for N flows each (default 10, at most MAX_N).  A flow is a dict: the statistics'
(keyed by the descriptor's hash, with a decoded sample frame: src, dst, sport, dport, proto,
bytes at frame level) or the flow cache's (exact 5-tuple and VLAN, bytes at IP level,
docs/flows.md).  The command reads it like `top` reads /metrics (dataplane.metrics.scrape): no
root, no shared memory, any run (`run`, `up`, systemd).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from dataplane.consumers.loop import Running
from dataplane.consumers.stats import TrafficStats
from dataplane.metrics.scrape import Endpoint, ScrapeError

DEFAULT_N = 10
MAX_N = 1000


def route(stats: TrafficStats, consumers: Sequence[Running]) -> Callable[[dict], dict]:
    """The /flows handler for a run: called in the exporter's thread, it only reads (each
    consumer's top_flows copies what it reads, as collect() does)."""

    def flows(query: dict[str, str]) -> dict[str, Any]:
        n = query.get("n", str(DEFAULT_N))
        if not n.isdigit() or not 0 < int(n) <= MAX_N:
            raise ValueError(f"n={n}: expected 1..{MAX_N}")
        out: dict[str, Any] = {"stats": stats.top_flows(int(n)), "consumers": {}}
        for r in list(consumers):
            top = getattr(r.consumer, "top_flows", None)
            if r.consumer is not stats and callable(top) and not r.disabled:
                out["consumers"][r.name] = top(int(n))
        return out

    return flows


def url_of(cfg: Any) -> str:
    """Where a run of cfg serves /flows: its [metrics] listen (a wildcard through loopback),
    https when its web config has TLS."""
    m = cfg.metrics
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(m.host, m.host)
    scheme = "https" if m.web is not None and m.web.tls is not None else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{m.port}/flows"


def lines(data: dict[str, Any]) -> list[str]:
    """The flows as tables: the flow caches' first (exact keys), then the statistics'."""
    out: list[str] = []
    for name, flows in data.get("consumers", {}).items():
        out += [f"{name}: {len(flows)} biggest active flows (bytes at IP level)"]
        out += _table(flows, with_vlan=True) + [""]
    out += ["stats: top flows by bytes (frame level; 5-tuple from a sample frame)"]
    out += _table(data.get("stats", []), with_vlan=False)
    return out


def _table(flows: list[dict], with_vlan: bool) -> list[str]:
    head = ["SRC", "DST", "PROTO", *(["VLAN"] if with_vlan else []), "PACKETS", "BYTES"]
    rows = [[_end(f, "src", "sport"), _end(f, "dst", "dport"), str(f.get("proto", "-")),
             *([str(f.get("vlan", 0))] if with_vlan else []), str(f.get("packets", 0)),
             str(f.get("bytes", 0))] for f in flows]
    if not rows:
        return ["  (none)"]
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip()
            for r in [head, *rows]]


def _end(f: dict, addr: str, port: str) -> str:
    a = str(f.get(addr, "?"))
    if port not in f:
        return a
    return f"[{a}]:{f[port]}" if ":" in a else f"{a}:{f[port]}"


def main(ep: Endpoint, n: int, as_json: bool, out: TextIO, err: Callable[[str], None]) -> int:
    """`dataplane flows`: 0 printed, 1 the endpoint could not be read (said why)."""
    sep = "&" if "?" in ep.url else "?"
    ep.url = f"{ep.url}{sep}n={n}"
    try:
        data = json.loads(ep.get())
    except ScrapeError as e:
        err(str(e).replace("dataplane metrics", "dataplane flows"))
        return 1
    except json.JSONDecodeError as e:
        err(f"{ep.url}: not the JSON of /flows ({e}): is this a dataplane of this version?")
        return 1
    if as_json:
        print(json.dumps(data, indent=1, sort_keys=True), file=out)
    else:
        print("\n".join(lines(data)), file=out)
    return 0
