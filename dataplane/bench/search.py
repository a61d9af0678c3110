"""The zero-loss throughput search of RFC 2544 (section 26.1): `dataplane bench` and the perf/
benchmarks use this one.

A trial offers a rate for a while and passes when nothing was lost anywhere (the receiver's
drop counters and the sequence numbers both say so).  The search first offers the top of the
range: if that passes, the receiver was not the limit, and the result says the generator
capped it (`capped`) rather than pretending to a zero-loss rate.  Otherwise it halves the
interval between the highest pass and the lowest failure until it is narrower than
`resolution` (a fraction of the top) or `max_trials` ran out.

A rate the generator could not offer (it reached less than `offered_min` of the asked rate)
is a failed trial of the generator, not of the receiver: the top of the range comes down to
what the generator reached, and the search says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Trial:
    asked: float            # packets/s asked of the generator
    offered: float          # packets/s it reached
    passed: bool            # nothing lost anywhere
    lost: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Search:
    rate: float             # the highest offered rate that passed (0: none did)
    capped: bool            # the top of the range passed: the generator, not the receiver, limits
    trials: list[Trial]

    def as_dict(self) -> dict[str, Any]:
        return {"zero_loss_pps": self.rate, "generator_capped": self.capped,
                "trials": [asdict(t) for t in self.trials]}


def search(trial: Callable[[float], Trial], top: float, bottom: float = 0.0,
           resolution: float = 0.03, max_trials: int = 10, offered_min: float = 0.97) -> Search:
    """Binary search for the highest rate in [bottom, top] at which `trial` passes."""
    trials: list[Trial] = []
    best, lo, hi = 0.0, bottom, top
    t = trial(top)
    trials.append(t)
    if t.offered < offered_min * t.asked:
        hi = t.offered          # the generator's own ceiling: never ask for more again
        if t.passed:
            return Search(t.offered, True, trials)
    elif t.passed:
        return Search(t.offered, True, trials)
    while len(trials) < max_trials and hi - lo > resolution * top:
        mid = (lo + hi) / 2
        t = trial(mid)
        trials.append(t)
        if t.passed:
            best, lo = max(best, t.offered), mid
        else:
            hi = mid
    return Search(best, False, trials)
