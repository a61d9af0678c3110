"""One trial of `dataplane bench`: the config's generator offers one frame size at one rate for
a while, and the books say what arrived and where the rest was lost.

The simplest honest way with what the dataplane has: the lab stays up for the whole bench, and
each trial is a run of the config (dataplane.run.runner.Run, in this process) whose generator
has the trial's size, rate and count.  Each run starts with fresh arenas and books, so a trial's
figures are its own; the run's shutdown order (generators first, receivers drained last) is
what makes sent = received + every counted drop.  Starting the workers costs a second or two a
trial, which is why trials are few and short.

A drop is placed by comparing counters along the path: the generator's (issued sequence numbers
it could not send), the DUT's interfaces (`ip -s -j link` in its namespace: what came in, what
went out, what they dropped), and the receiver's (ring full, NIC missed, no mbuf).
"""

from __future__ import annotations

import copy
import io
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dataplane.config.loader import Config, from_data
from dataplane.config.tables import ConfigError
from dataplane.config.templates import min_size
from dataplane.host.proc import poll

FCS = 4     # bench sizes are Ethernet frames with their FCS (RFC 2544); the generator's are not


@dataclass
class Result:
    """What one trial did: asked and reached, the books, and where each lost frame went."""
    size: int                   # frame size with FCS
    asked_pps: float            # 0: as fast as the port takes them
    count: int                  # frames asked (0: for `seconds`)
    offered_pps: float          # what the generator reached
    sent: int                   # sequence numbers issued
    received: int               # unique frames the receiver's books have
    lost: int                   # sent - received
    duplicated: int = 0
    reordered: int = 0
    latency: dict[str, float] = field(default_factory=dict)   # seconds: p50, p99, p99_9, max...
    where: dict[str, int] = field(default_factory=dict)       # lost frames by place
    dut: dict[str, dict[str, int]] = field(default_factory=dict)   # its counters' deltas

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.sent > 0 and not any(
            self.where.values())


class Bench:
    """Trials of one config: `Bench(path)`; `trial(size, pps, seconds)`, `burst(size, n)`."""

    def __init__(self, path: str | Path | None):
        self.source = str(path) if path else "<embedded default.toml>"
        try:
            text = (Path(path).read_text() if path else
                    resources.files("dataplane").joinpath("default.toml").read_text())
            self.data = tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(self.source, [f"cannot read: {e}"]) from None
        self.cfg = from_data(copy.deepcopy(self.data), self.source)
        gens = [i for i, w in enumerate(self.cfg.workers) if w.generate is not None]
        problems = []
        if self.cfg.lab is None:
            problems.append("no [lab] table: bench runs against the lab's DUT (docs/lab.md)")
        if len(gens) != 1:
            problems.append(f"{len(gens)} workers with a [worker.generate] table; bench drives "
                            "exactly one")
        elif "streams" in self.data["worker"][gens[0]]["generate"]:
            problems.append(f"worker[{gens[0]}].generate.streams: bench offers one stream")
        if problems:
            raise ConfigError(self.source, problems)
        self.gen = gens[0]
        self.dut = self.cfg.lab.dut

    def smallest(self) -> int:
        """The smallest frame (with FCS) that carries the generator's headers and trailer."""
        g = self.data["worker"][self.gen]["generate"]
        version = 6 if ":" in str(g.get("dst", "")) else 4
        return min_size(version, g.get("proto", "udp"), len(g.get("vlan", []))) + FCS

    def config(self, size: int, pps: float, count: int) -> Config:
        """The config with the generator at this size, rate and count."""
        data = copy.deepcopy(self.data)
        g = data["worker"][self.gen]["generate"]
        for k in ("rate", "rate_pps", "sizes", "imix", "size", "count"):
            g.pop(k, None)
        g.update(rate_pps=int(pps), count=int(count), size=size - FCS)
        return from_data(data, self.source)

    def trial(self, size: int, pps: float, seconds: float) -> Result:
        """`pps` frames a second (0: as fast as it goes) for `seconds`."""
        count = int(pps * seconds) if pps else 0
        return self._run(size, pps, count, seconds)

    def burst(self, size: int, frames: int) -> Result:
        """`frames` back to back, as fast as the generator and the port take them."""
        return self._run(size, 0, frames, None)

    def _run(self, size: int, pps: float, count: int, seconds: float | None) -> Result:
        from dataplane.run import dut, lab
        from dataplane.run.runner import Run
        cfg = self.config(size, pps, count)
        if not lab.exists(cfg):
            # a run would make it and take it down again: a DUT that died (a user's command)
            # or a lab someone removed is not something to measure through
            raise lab.LabError(f"{self.source}: the lab or its DUT is not (all) there any more "
                               "(dataplane lab status)")
        before = dut.counters(self.dut) if self.dut else {}
        with Run(cfg, out=io.StringIO()) as r:
            r.start()
            offered = _offer(r, count, seconds)
            res = r.finish()
            stream = next(iter(res.streams), None)
            s = res.streams.get(stream, {})
            rep = r.stats.stream_report(stream, sent=s.get("sent", 0)) if s else {}
        t = res.totals
        after = dut.counters(self.dut) if self.dut else {}
        delta = {side: {k: d for k, v in c.items() if (d := v - before.get(side, {}).get(k, 0))}
                 for side, c in after.items()}
        sent, unique = s.get("sent", 0), s.get("unique", 0)
        out = Result(size, pps, count, offered, sent, unique, sent - unique,
                     rep.get("duplicated", 0), rep.get("reordered", 0),
                     {k: v for k, v in rep.get("latency", {}).items() if v is not None},
                     dut=delta)
        out.where = place(out, s.get("tx_drops", 0), t.ring_full_drops + t.nic_missed
                          + t.rx_nombuf, delta)
        return out


def _offer(r: Any, count: int, seconds: float | None) -> float:
    """Wait until the generator issued `count` (or `seconds` passed when count is 0); the rate
    it reached, from the first to the last packet its port took.  Frames the port refused
    (tx_drops) took a seq but never left: they end the count, they are not offered load."""
    first: list[float] = []
    state = {"tx": 0, "t": 0.0}
    start = time.monotonic()
    limit = 3 * (seconds or 1.0) + 10      # bounds a generator far slower than asked

    def done() -> bool:
        tot = r.totals()
        tx, now = tot.tx_packets, time.monotonic()
        if tx and not first:
            first[:] = [now, tx]
        if tx != state["tx"]:
            state.update(tx=tx, t=now)
        if count:
            return tx + tot.tx_drops >= count
        return bool(first) and now - first[0] >= (seconds or 0)

    try:
        poll(done, limit, interval=0.005, what="the generator to finish its trial")
    except TimeoutError:
        pass        # reached less than asked: the rate it did reach says so
    if not first or state["t"] <= first[0]:
        return 0.0 if not first else float(state["tx"]) / max(time.monotonic() - start, 1e-3)
    return (state["tx"] - first[1]) / (state["t"] - first[0])


def place(r: Result, tx_drops: int, rx_drops: int,
          dut: dict[str, dict[str, int]]) -> dict[str, int]:
    """Where the lost frames went, by the counters along the path: the generator, the link to
    the DUT, the DUT, the link from it, our receiver; what no counter explains is `unplaced`."""
    where = {"generator": tx_drops, "receiver": rx_drops}
    if dut.get("ingress") and dut.get("egress"):
        came = dut["ingress"].get("rx_packets", 0)
        went = dut["egress"].get("tx_packets", 0)
        where["to_dut"] = max(0, r.sent - tx_drops - came)
        where["dut"] = max(0, came - went)
        where["from_dut"] = max(0, went - r.received - rx_drops)
    where["unplaced"] = max(0, r.lost - sum(where.values()))
    return {k: v for k, v in where.items() if v}
