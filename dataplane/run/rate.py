"""`dataplane rate WORKER STREAM RATE`: a running generator stream's rate, changed in place
(dataplane/workers/rate.py writes it into the worker's arena; the books go on).  The worker's
newest arena is found as `status` finds it; a bit rate becomes packets per second at the mean
size of the stream's frames in the config, as the config's `rate` does.
"""

from __future__ import annotations

from pathlib import Path

from dataplane.config import Config
from dataplane.config.streams import parse_rate
from dataplane.workers import rate


def stream_mean_size(cfg: Config, worker: str, stream: int) -> float:
    """The mean frame size of one configured stream (the worker's id + 1 is its first one's
    default id, as plan() gives it)."""
    for wid, w in enumerate(cfg.workers):
        if w.name != worker:
            continue
        if w.generate is None:
            raise ValueError(f'worker "{worker}" has no [worker.generate] table')
        for s in w.generate.streams:
            if (s.stream or wid + 1) == stream:
                if s.pcap and s.speed:
                    raise ValueError(f"stream {stream} replays {s.pcap} at its own timing "
                                     f"(speed = {s.speed}): it has no rate to change")
                return s.pcap_mean or sum(s.sizes) / len(s.sizes)
        ids = ", ".join(str(s.stream or wid + 1) for s in w.generate.streams)
        raise ValueError(f'worker "{worker}" has no stream {stream} (streams: {ids})')
    raise ValueError(f'no worker "{worker}" in {cfg.source}')


def set_stream_rate(cfg: Config, worker: str, stream: int, text: str) -> tuple[int, int]:
    """Give a running worker's stream the rate `text` ("100kpps", "50Mbps", or packets/s as
    digits): (the rate it had, the new one), in packets/s.  What `dataplane bench` calls between
    trials, with the config of the run."""
    from dataplane.host import hugepages
    from dataplane.run.status import find_arenas
    from dataplane.shm.arena import Arena
    mean = stream_mean_size(cfg, worker, stream)     # also: the stream is there, has a rate
    pps = int(text) if text.isdigit() else parse_rate(text, mean)
    if pps is None:
        raise ValueError(f'rate "{text}": expected e.g. "100kpps", "2.5Mpps", "50Mbps", "1Gbps" '
                         "or packets/s")
    found = find_arenas(worker, [*hugepages.hugetlbfs_mounts(), Path("/dev/shm")])
    if not found:
        raise ValueError(f'worker "{worker}": no arena (is the run up?)')
    with Arena.open(found[0]) as a:
        return rate.set_rate(a, stream, pps), pps
