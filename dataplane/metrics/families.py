"""What every collector shares: metric families built from a table (key -> kind, name, help,
labels), histogram buckets from per-bucket counts, and the count of sources a scrape could not
read (a partial scrape, never a failed one)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# kind in a family table: counter, gauge, histogram.  Counter names end in _total in the
# tables; the client library strips and re-adds the suffix.
KINDS = {"c": CounterMetricFamily, "g": GaugeMetricFamily, "h": HistogramMetricFamily}

Table = dict[str, tuple[str, str, str, Sequence[str]]]


def families(table: Table) -> dict[str, Metric]:
    """A fresh, empty family per entry of `table` (a scrape fills them)."""
    return {k: KINDS[kind](name, doc, labels=list(labels))
            for k, (kind, name, doc, labels) in table.items()}


def buckets(edges: Sequence[float], counts: np.ndarray) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, le=edge, then +Inf) from per-bucket counts."""
    cum = np.cumsum(counts)
    return ([(floatToGoString(e), float(c)) for e, c in zip(edges, cum[:-1], strict=True)] +
            [("+Inf", float(cum[-1]))])


class ScrapeCollector(Collector):
    """A collector whose families depend on its sources: nothing to describe at registration
    (no collect() then), everything built at scrape time."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class SourceErrors:
    """Scrapes that could not read a source (closed or foreign arena, consumer state), counted by
    source name; shared by the collectors of one endpoint, exported once."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def guard(self, source: str, fn: Callable[..., Any], *args: Any) -> None:
        """fn(*args); an exception skips the source, counted, and the scrape goes on."""
        try:
            fn(*args)
        except Exception as e:   # noqa: BLE001 - closed or foreign: skip it, say so, keep on
            self.counts[source] = self.counts.get(source, 0) + 1
            log.debug("scrape of %s failed: %r", source, e)

    def family(self) -> Metric:
        fam = CounterMetricFamily("dataplane_exporter_source_errors_total",
                                  "Scrapes that could not read a source (partial scrape).",
                                  labels=["source"])
        for source, n in list(self.counts.items()):
            fam.add_metric([source], n)
        return fam


# ---- the text exposition (format 0.0.4), written here rather than by prometheus_client ----
# Why not prometheus_client's generate_latest: a run's scrape is ~900 samples, and that
# formatter checks every label name against two regexes and escapes every value per sample;
# profiled in-process with 8 workers it was ~80% of the scrape's CPU (collecting the counters
# the rest), all of it on the run's Python process, where the consumer loop needs the same
# cores and interpreter (docs/performance.md, the exporter).  This one gives the same bytes:
# names are escaped by prometheus_client's own functions, once per distinct name, and a
# family this writer does not handle alike (timestamps, OpenMetrics-only samples) is handed
# to generate_latest whole.  tests/test_exporter.py compares the two byte for byte.

_NAMES: dict[str, str] = {}         # metric name -> escaped (few distinct names: kept)
_LABELS: dict[str, str] = {}        # label name -> escaped
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
          "summary": "summary", "unknown": "untyped"}


def _metric_name(name: str) -> str:
    esc = _NAMES.get(name)
    if esc is None:
        esc = _NAMES[name] = openmetrics.escape_metric_name(name, openmetrics.UNDERSCORES)
    return esc


def _label_name(name: str) -> str:
    esc = _LABELS.get(name)
    if esc is None:
        esc = _LABELS[name] = openmetrics.escape_label_name(name, openmetrics.UNDERSCORES)
    return esc


def _label_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


_INF = float("inf")


class _One:
    """A single family as the registry generate_latest expects."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def _plain(metric: Metric) -> bool:
    """The families this writer formats exactly as generate_latest does."""
    if metric.type not in _TYPES:
        return False
    om = tuple(metric.name + s for s in _OM_SUFFIXES)
    return all(s.timestamp is None and s.name not in om for s in metric.samples)


def exposition(metrics: Iterable[Metric]) -> bytes:
    """The text exposition (0.0.4) of these families, byte for byte what
    prometheus_client.exposition.generate_latest writes for them, at a fraction of its cost."""
    out: list[str] = []
    # label sets repeat across families (a ring's worker, port, queue in a dozen of them):
    # each one is sorted, escaped and joined once a scrape
    bodies: dict[tuple[tuple[str, str], ...], str] = {}
    for m in metrics:
        if not _plain(m):
            out.append(generate_latest(_One(m)).decode())
            continue
        name = m.name + "_total" if m.type == "counter" else m.name
        esc = _metric_name(name)
        doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {esc} {doc}\n# TYPE {esc} {_TYPES[m.type]}\n")
        # the loop below runs ~1000 times a scrape: names and values inlined, no call per sample
        for s in m.samples:
            sname = _NAMES.get(s.name) or _metric_name(s.name)
            v = s.value
            # floatToGoString's answer is repr() for every float below 1e6 (Go's exponent
            # starts there) but -inf and NaN, which fail the comparison
            val = repr(v) if type(v) is float and -_INF < v < 1e6 else floatToGoString(v)
            if s.labels:
                key = tuple(s.labels.items())
                body = bodies.get(key)
                if body is None:
                    body = bodies[key] = ",".join([f'{_label_name(k)}="{_label_value(x)}"'
                                                   for k, x in sorted(key)])
                out.append(f"{sname}{{{body}}} {val}\n")
            else:
                out.append(f"{sname} {val}\n")
    return "".join(out).encode()
