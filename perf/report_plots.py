"""The PNG plots of perf/report.py, made from a benchmark's stored JSON with matplotlib.

Found by shape, not by script, so a rewritten benchmark still gets its plots:
- a zero-loss search (a list "trials" of {asked, offered, passed, lost, detail}): the rate
  received against the rate offered, trial by trial, passes and failures marked;
- cycles per packet (numeric fields whose name has "cycles_per_pkt"): one bar each;
- a distribution (a list of at least 20 numbers under a name with "samples" or "latency"):
  its cumulative distribution.
The files are written without a timestamp, so the same JSON gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

META = {"Software": None}       # no matplotlib version or date in the PNG: reproducible bytes


def walk(obj: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) for every field at any depth; list items are indexed in the path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "report":
                continue
            p = f"{path}.{k}" if path else k
            yield p, k, v
            yield from walk(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, dict | list):
                yield from walk(v, f"{path}[{i}]")


def searches(res: dict) -> list[tuple[str, list[dict]]]:
    return [(p.removesuffix(".trials"), v) for p, k, v in walk(res)
            if k == "trials" and isinstance(v, list) and v and isinstance(v[0], dict)
            and {"asked", "offered", "passed"} <= v[0].keys()]


def received(t: dict) -> float:
    """The rate that arrived: the offered rate less the share lost, where the trial says how
    many were sent."""
    sent = t.get("detail", {}).get("sent")
    if sent:
        return t["offered"] * max(0.0, sent - t.get("lost", 0)) / sent
    return t["offered"] if t["passed"] else 0.0


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata=META)
    plt.close(fig)
    return path


def plot_search(name: str, found: list[tuple[str, list[dict]]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = 0.0
    for i, (label, trials) in enumerate(found):
        color = f"C{i % 10}"
        xs = [t["offered"] / 1e3 for t in trials]
        ys = [received(t) / 1e3 for t in trials]
        top = max(top, *xs, *ys)
        ax.scatter([x for x, t in zip(xs, trials, strict=True) if t["passed"]],
                   [y for y, t in zip(ys, trials, strict=True) if t["passed"]],
                   color=color, marker="o", label=f"{label} (o pass, x loss)")
        ax.scatter([x for x, t in zip(xs, trials, strict=True) if not t["passed"]],
                   [y for y, t in zip(ys, trials, strict=True) if not t["passed"]],
                   color=color, marker="x")
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("offered, kpps")
    ax.set_ylabel("received, kpps")
    ax.set_title(f"{name}: zero-loss search trials")
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_cycles(name: str, bars: list[tuple[str, float]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(bars)))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="C0")
    ax.invert_yaxis()
    ax.set_xlabel("cycles per packet")
    ax.set_title(f"{name}: cycles per packet")
    ax.tick_params(axis="y", labelsize=7)
    return _save(fig, out)


def plot_dists(name: str, dists: list[tuple[str, list[float]]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, xs in dists:
        s = sorted(xs)
        ax.step(s, [(i + 1) / len(s) for i in range(len(s))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(", ".join(sorted({unit(lbl) for lbl, _ in dists})))
    ax.set_ylabel("fraction at or below")
    ax.set_title(f"{name}: distributions")
    ax.legend(fontsize=7)
    return _save(fig, out)


def unit(label: str) -> str:
    for u in ("ms", "us", "ns"):
        if label.endswith(f"_{u}"):
            return u
    return "value"


def figure(v: Any) -> float | None:
    """A number, or the median of a spread ({median, min, max})."""
    v = v.get("median") if isinstance(v, dict) else v
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def plot_all(name: str, res: dict, plots_dir: Path) -> list[Path]:
    """Every plot this result has, written as plots_dir/NAME-KIND.png."""
    out = []
    found = searches(res)
    if found:
        out.append(plot_search(name, found, plots_dir / f"{name}-search.png"))
    bars = [(p, v) for p, v in ((p, figure(v)) for p, k, v in walk(res)
                                 if "cycles_per_pkt" in k) if v is not None]
    summed = [b for b in bars if "rounds[" not in b[0]]
    bars = summed or bars       # medians where the script gives them, not every round's
    if bars:
        out.append(plot_cycles(name, bars, plots_dir / f"{name}-cycles.png"))
    dists = [(p, [float(x) for x in v]) for p, k, v in walk(res)
             if ("samples" in k or "latency" in k) and isinstance(v, list) and len(v) >= 20
             and all(isinstance(x, int | float) for x in v)]
    if dists:
        out.append(plot_dists(name, dists, plots_dir / f"{name}-dist.png"))
    return out
