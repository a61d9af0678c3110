"""The RDMA sender's work requests: which frames of a batch go in one RDMA WRITE, and the WRs
themselves, built once and rewritten in place for each batch (a pyverbs SendWR costs a
constructor, a logger lookup and a malloc; the verbs copy a WR into the send queue at post time,
so one set serves every batch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dataplane.shm.layout import DESC_DTYPE
from dataplane.shm.ring import slot_address
from dataplane.transport.rdma.link import verbs

# a run of frames is split into WRs of at most this: rxe (measured in the guest, 64 KB frames)
# moved 4 MB WRs at about half the rate of 256 KB ones, and 64 KB WRs cost more posts
MAX_WR_BYTES = 256 << 10


def run_ends(addr: np.ndarray, lens: np.ndarray, slot_size: int, cut: int) -> list[int]:
    """Where each frame WR of a batch ends (exclusive descriptor indexes, ascending, the last
    len(addr)).  A run: frames slot_size apart locally, consecutive remote slots, each but the
    last filling its slot to within 1/8 (the run writes whole slots: the padding goes too); a
    run never crosses `cut` (where the remote ring wraps) nor MAX_WR_BYTES."""
    n, ss = len(addr), slot_size
    brk = np.flatnonzero((np.diff(addr) != ss) | (lens[:-1] < ss - ss // 8)) + 1
    starts = brk.tolist()
    if cut < n and cut not in starts:
        starts = sorted([*starts, cut])
    per_wr = max(1, MAX_WR_BYTES // ss)
    ends: list[int] = []
    a = 0
    for b in [*starts, n]:
        ends.extend(range(a + per_wr, b, per_wr))
        ends.append(b)
        a = b
    return ends


class WorkRequests:
    """The send WRs, built once: `frames[i]` writes frame run i, `desc` the descriptors before a
    remote wrap, `imm` the (rest of the) descriptors with the immediate, signaled."""

    def __init__(self, n_frames: int, lkey: int, desc_lkey: int) -> None:
        from pyverbs.wr import SGE, SendWR
        e = verbs()

        def make(opcode: int, lk: int, flags: int = 0) -> tuple[Any, Any]:
            sge = SGE(0, 0, lk)
            return SendWR(wr_id=0, opcode=opcode, num_sge=1, sg=[sge], send_flags=flags), sge

        self.frames = [make(e.IBV_WR_RDMA_WRITE, lkey) for _ in range(n_frames)]
        self.desc = make(e.IBV_WR_RDMA_WRITE, desc_lkey)
        self.imm = make(e.IBV_WR_RDMA_WRITE_WITH_IMM, desc_lkey, e.IBV_SEND_SIGNALED)

    @staticmethod
    def fill(pair: tuple[Any, Any], addr: int, length: int, rkey: int, raddr: int) -> Any:
        wr, sge = pair
        sge.addr, sge.length = addr, length
        wr.sg_list = sge            # the WR's own copy of the SGE: set again after each change
        wr.set_wr_rdma(rkey, raddr)
        return wr

    def chain(self, batch: np.ndarray, local_base: int, staged: int, first: int, seq: int,
              peer: dict[str, Any]) -> Any:
        """The chain for one batch, linked, its first WR returned: frame runs from local_base
        (the arena's registered address) into the peer's slots of ring positions first..,
        then the descriptors at address `staged` into its staging area at the same positions,
        the last WR with the immediate (imm = n, wr_id = seq).  Each region has its own rkey."""
        n, size, ss, rkey = len(batch), peer["ring_size"], peer["slot_size"], peer["slot_rkey"]
        cut = min(n, size - first)      # descriptors before the remote ring wraps
        addr, lens = batch["addr"], batch["len"]
        wrs = []
        a = 0
        for i, b in enumerate(run_ends(addr, lens, ss, cut)):
            length = (b - a - 1) * ss + int(lens[b - 1])
            raddr = int(slot_address(peer["slot_addr"], ss, (first + a) & (size - 1)))
            wrs.append(self.fill(self.frames[i], local_base + int(addr[a]), length, rkey, raddr))
            a = b
        dsz, skey, stage = DESC_DTYPE.itemsize, peer["stage_rkey"], peer["stage_addr"]
        if cut < n:
            wrs.append(self.fill(self.desc, staged, cut * dsz, skey, stage + first * dsz))
        imm_from = 0 if cut == n else cut
        imm_pos = (first + imm_from) & (size - 1)
        last = self.fill(self.imm, staged + imm_from * dsz, (n - imm_from) * dsz, skey,
                         stage + imm_pos * dsz)
        last.wr_id, last.imm_data = seq, n
        wrs.append(last)
        for x, y in zip(wrs, wrs[1:], strict=False):
            x.next_wr = y
        return wrs[0]
