"""The report of `dataplane bench --report FILE.html`: one self-contained HTML file (the plots are
PNGs inside it as data URIs), so it opens anywhere and can be mailed as it is."""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from dataplane.bench.rfc2544 import SizeResult, table


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(results: list[SizeResult]) -> list[tuple[str, str]]:
    """(title, data URI) of throughput and latency against frame size."""
    import matplotlib
    matplotlib.use("Agg")           # no display: a file
    import matplotlib.pyplot as plt
    sizes = [r.size for r in results]
    out = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(sizes, [r.throughput_pps / 1e3 for r in results], "o-", label="kpps")
    ax.set_xlabel("frame size (bytes, with FCS)")
    ax.set_ylabel("zero-loss throughput (kpps)")
    ax2 = ax.twinx()
    ax2.plot(sizes, [r.throughput_bps / 1e6 for r in results], "s--", color="tab:orange",
             label="Mbit/s")
    ax2.set_ylabel("Mbit/s")
    ax.set_title("Throughput (RFC 2544 26.1)")
    fig.tight_layout()
    out.append(("Throughput against frame size", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, style in (("p50", "o-"), ("p99", "s-"), ("p99_9", "^-"), ("max", "x:")):
        pts = [(r.size, r.latency[key] * 1e6) for r in results
               if r.latency.get("count") and key in r.latency]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key.replace("_", "."))
    ax.set_xlabel("frame size (bytes, with FCS)")
    ax.set_ylabel("latency at the throughput rate (us)")
    ax.set_title("Latency (RFC 2544 26.2)")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    out.append(("Latency against frame size", _png(fig)))
    plt.close(fig)
    return out


def write(path: str, results: list[SizeResult], meta: dict[str, Any]) -> None:
    """The HTML report: what was run, the summary table, the plots, every trial's books."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>dataplane bench: {esc(str(meta.get('config', '')))}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "pre{background:#f4f4f4;padding:1em;overflow-x:auto}</style></head><body>",
             "<h1>RFC 2544 against the lab's device under test</h1>",
             f"<pre>{esc(json.dumps(meta, indent=1, default=str))}</pre>",
             "<h2>Summary</h2>", f"<pre>{esc(table(results))}</pre>"]
    for title, uri in plots(results):
        parts += [f"<h2>{esc(title)}</h2>", f"<img alt='{esc(title)}' src='{uri}'>"]
    parts.append("<h2>Frame loss at steps of the top rate (RFC 2544 26.3)</h2><pre>")
    for r in results:
        for x in r.loss:
            parts.append(esc(f"{r.size:>5} B {x['percent']:>3}% {x['offered_pps']:>12,.0f} pps"
                             f"  loss {x['loss_rate']:.4%}  {x['where'] or ''}") + "\n")
    parts.append("</pre><h2>Every trial</h2>")
    for r in results:
        parts.append(f"<h3>{r.size} B</h3><pre>{esc(json.dumps(r.trials, indent=1))}</pre>")
    parts.append("</body></html>\n")
    with open(path, "w") as f:
        f.write("".join(parts))
