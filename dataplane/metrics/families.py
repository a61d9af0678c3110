"""What every collector shares: metric families built from a table (key -> kind, name, help,
labels), histogram buckets from per-bucket counts, and the count of sources a scrape could not
read (a partial scrape, never a failed one)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
