"""Reading a /metrics endpoint as Prometheus would: over HTTP, parsed by prometheus_client,
checked by promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(address: tuple[str, int]) -> str:
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a scrape."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` that carry these labels (among others)."""
    return sum(v for (n, have), v in samples(text).items()
               if n == name and all((k, val) in have for k, val in labels.items()))


def promtool_check(text: str) -> None:
    """promtool accepts the text (scripts/bootstrap.sh installs Debian's prometheus)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/bootstrap.sh installs Debian's prometheus"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
