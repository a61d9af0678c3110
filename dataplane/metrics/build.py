"""dataplane_build_info{version,layout,dpdk} 1: what is running, as the usual *_build_info gauge
(a dashboard or alert joins on it; a mixed fleet shows its versions and arena layouts)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dataplane.about import build_info


class BuildInfoCollector(Collector):
    """One sample, always 1; the labels are dataplane.about.build_info(), read once."""

    def __init__(self) -> None:
        self.info = build_info()

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("dataplane_build_info", "The dataplane's version, arena layout "
                              "version and whether the DPDK worker is built (always 1).",
                              labels=list(self.info))
        g.add_metric(list(self.info.values()), 1)
        yield g
