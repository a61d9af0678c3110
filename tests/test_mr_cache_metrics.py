"""The MR cache's counters on a real /metrics endpoint: scraped over HTTP, parsed by
prometheus_client, checked by promtool, equal to cache.stats()."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from dataplane.metrics.mr_cache import MRCacheCollector
from dataplane.metrics.server import serve
from tests.helpers.fake_mr import fake_cache
from tests.helpers.metrics import promtool_check, scrape


def test_mr_cache_metrics_scraped_and_valid() -> None:
    cache, made = fake_cache(budget=8 * 4096)
    bufs = [bytearray(4096) for _ in range(12)]
    for b in bufs:
        cache.get(b)
    cache.get(bufs[-1], 100, 50)                     # a sub-range hit
    s = cache.stats()
    # against what the stand-in for ibv_reg_mr saw: 12 buffers, each registered once (its
    # pages), the evicted ones closed, what is left within the budget of 8 pages
    assert s["misses"] == len(made) == 12 and s["hits"] == 1, s
    assert s["evictions"] == sum(m.closed for m in made) > 0, s
    assert s["registered_bytes"] == sum(m.length for m in made if not m.closed) <= 8 * 4096, s
    with serve(MRCacheCollector({"arena": cache}), host="127.0.0.1", port=0) as srv:
        text = scrape(srv.address)
    got = {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples
           if x.labels.get("cache") == "arena" and "le" not in x.labels}
    assert got["dataplane_mr_cache_hits_total"] == s["hits"]
    assert got["dataplane_mr_cache_misses_total"] == s["misses"]
    assert got["dataplane_mr_cache_evictions_total"] == s["evictions"]
    assert got["dataplane_mr_cache_registered_bytes"] == s["registered_bytes"]
    assert got["dataplane_mr_cache_registration_seconds_count"] == s["misses"]
    promtool_check(text)
