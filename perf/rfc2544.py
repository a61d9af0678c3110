"""The zero-loss throughput search of RFC 2544, for the perf/ benchmarks: the product's own
(dataplane/bench/search.py), which `dataplane bench` runs too; perf scripts import it from here
because perf/ is sys.path[0] when one of them runs."""

from dataplane.bench.search import Search, Trial, search

__all__ = ["Search", "Trial", "search"]
