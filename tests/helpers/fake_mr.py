"""The MR cache (dataplane/transport/rdma/mr_cache.py) without RDMA: a stand-in for ibv_reg_mr
that records every registration, so a test can count them itself."""

from __future__ import annotations

import itertools
from typing import Any

from dataplane.transport.rdma.mr_cache import MRCache


class FakeMR:
    keys = itertools.count(1)

    def __init__(self, length: int, address: int) -> None:
        self.lkey = self.rkey = next(self.keys)
        self.length, self.address, self.closed = length, address, False

    def close(self) -> None:
        self.closed = True


def fake_cache(**kw: Any) -> tuple[MRCache, list[FakeMR]]:
    made: list[FakeMR] = []

    def reg(pd: Any, length: int, access: int, address: int) -> FakeMR:
        made.append(FakeMR(length, address))
        return made[-1]

    return MRCache(None, None, access=0, register=reg, **kw), made
