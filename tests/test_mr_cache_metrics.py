"""The MR cache's counters on a real /metrics endpoint: scraped over HTTP, parsed by
prometheus_client, checked by promtool, equal to cache.stats()."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from dataplane.metrics.exporter import MRCacheCollector, serve
from tests.test_mr_cache import fake_cache


def test_mr_cache_metrics_scraped_and_valid() -> None:
    cache, _made = fake_cache(budget=8 * 4096)
    bufs = [bytearray(4096) for _ in range(12)]
    for b in bufs:
        cache.get(b)
    cache.get(bufs[-1], 100, 50)                     # a sub-range hit
    s = cache.stats()
    assert s["evictions"] > 0 and s["hits"] == 1
    with serve(MRCacheCollector({"arena": cache}), "127.0.0.1", 0) as srv:
        host, port = srv.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    got = {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples
           if x.labels.get("cache") == "arena" and "le" not in x.labels}
    assert got["dataplane_mr_cache_hits_total"] == s["hits"]
    assert got["dataplane_mr_cache_misses_total"] == s["misses"]
    assert got["dataplane_mr_cache_evictions_total"] == s["evictions"]
    assert got["dataplane_mr_cache_registered_bytes"] == s["registered_bytes"]
    assert got["dataplane_mr_cache_registration_seconds_count"] == s["misses"]
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/bootstrap.sh installs Debian's prometheus"
    chk = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                         capture_output=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
