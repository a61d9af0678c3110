"""The RDMA memory-registration caches at scrape time: dataplane_mr_cache_*, from each cache's
stats() (an MRCache in this process, or a transport process's control file through
dataplane/metrics/rdma.py's mr_caches())."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric

from dataplane.metrics.families import ScrapeCollector, Table, buckets, families

FAMILIES: Table = {
    "hits": ("c", "dataplane_mr_cache_hits", "Lookups served by an existing registration.",
             ("cache",)),
    "misses": ("c", "dataplane_mr_cache_misses", "Lookups that registered memory (ibv_reg_mr).",
               ("cache",)),
    "evictions": ("c", "dataplane_mr_cache_evictions", "Registrations dropped to stay in budget.",
                  ("cache",)),
    "registered_bytes": ("g", "dataplane_mr_cache_registered_bytes", "Bytes registered now.",
                         ("cache",)),
    "budget": ("g", "dataplane_mr_cache_budget_bytes", "Byte budget (from RLIMIT_MEMLOCK).",
               ("cache",)),
}


class MRCacheCollector(ScrapeCollector):
    """The RDMA memory-registration caches' counters, read from cache.stats() at scrape time."""

    def __init__(self, caches: dict[str, Any]):
        self.caches = caches          # name -> anything with MRCache's stats()

    def collect(self) -> Iterator[Metric]:
        fams = families(FAMILIES)
        seconds = HistogramMetricFamily("dataplane_mr_cache_registration_seconds",
                                        "Time spent in ibv_reg_mr.", labels=["cache"])
        for name, cache in list(self.caches.items()):
            try:
                s = cache.stats()
            except Exception:   # noqa: BLE001 - a closed cache: a partial scrape, not a failed one
                continue
            for k, fam in fams.items():
                fam.add_metric([name], s[k])
            reg = s["registration_seconds"]
            edges = [e for e in reg["buckets"] if e != float("inf")]
            counts = np.array([reg["buckets"][e] for e in reg["buckets"]], dtype=np.int64)
            seconds.add_metric([name], buckets(edges, counts), reg["sum"])
        yield from fams.values()
        yield seconds
