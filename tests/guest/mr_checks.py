"""Run inside `scripts/guest --rdma` (see tests/test_mr_cache.py): every MR-cache check on rxe0 in
one Python process (Python under TCG is slow).  Writes RESULTS (JSON on the /lab share), one
entry per check: {"ok": bool, "detail": ..., "error": traceback or ""}.

    python tests/guest/mr_checks.py RESULTS
"""

from __future__ import annotations

import ctypes
import json
import mmap
import resource
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pyverbs.enums as e
from common import Checks  # tests/guest, the script's folder, is on sys.path
from pyverbs.addr import AHAttr, GlobalRoute
from pyverbs.cq import CQ
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, SendWR

from dataplane.transport.rdma.link import gid_index
from dataplane.transport.rdma.mr_cache import MemlockError, MRCache

P = mmap.PAGESIZE
ACC = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ


CTX = Context(name="rxe0")
PDOM = PD(CTX)


def counts(c: MRCache) -> dict[str, int]:
    s = c.stats()
    return {k: s[k] for k in ("hits", "misses", "evictions", "entries", "registered_bytes")}


def addr_of(buf: Any) -> int:
    a = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(a)
    finally:
        del a


def sub_range_hits() -> dict[str, Any]:
    m = mmap.mmap(-1, 16 * P)
    base = addr_of(m)
    with MRCache(CTX, PDOM) as c:
        r0 = c.get(m)
        r1 = c.get(m, 4096, 100)
        r2 = c.get(m, 15 * P)
        assert r1.addr == base + 4096 and r1.length == 100, r1
        assert r2.addr == base + 15 * P and r2.length == P, r2
        assert r0.lkey == r1.lkey == r2.lkey, (r0, r1, r2)
        # another exporter of the very same memory: a different object, so a miss
        other = (ctypes.c_char * P).from_address(base)
        r3 = c.get(other)
        assert r3.addr == base
        got = counts(c)
        assert got == {"hits": 2, "misses": 2, "evictions": 0, "entries": 2,
                       "registered_bytes": 17 * P}, got
        try:
            m.close()
            raise AssertionError("an mmap was closed while registered")
        except BufferError as err:
            refused = str(err)
        c.release(other)
        assert c.release(m) == 1
        m.close()
        s = c.stats()
    return {"counts": got, "close_refused": refused, "reg_seconds": s["registration_seconds"]}


def lru_eviction() -> dict[str, Any]:
    bufs = [mmap.mmap(-1, P) for _ in range(4)]
    a, b, c_, d = bufs
    with MRCache(CTX, PDOM, budget=3 * P) as c:
        for x in (a, b, c_):
            c.get(x)
        c.get(a, 10, 20)            # hit: a becomes most recent
        c.get(d)                    # miss: evicts b
        assert counts(c) == {"hits": 1, "misses": 4, "evictions": 1, "entries": 3,
                             "registered_bytes": 3 * P}, counts(c)
        c.get(b)                    # miss: evicts c
        c.get(a)                    # hit
        c.get(d)                    # hit
        got = counts(c)
        assert got == {"hits": 3, "misses": 5, "evictions": 2, "entries": 3,
                       "registered_bytes": 3 * P}, got
        c_.close()                  # evicted: its export was dropped, so it can be freed
        c.get(b)                    # hit: the order is now a, d, b
        with c.pin(a):              # a hit, and a pinned entry is never the victim
            c.get(mmap.mmap(-1, P))         # evicts d (b is more recent, a is pinned)
            c.get(mmap.mmap(-1, P))         # evicts b
        pinned = counts(c)
        assert pinned == {"hits": 5, "misses": 7, "evictions": 4, "entries": 3,
                          "registered_bytes": 3 * P}, pinned
        b.close()
        d.close()
        c.clear()
    with MRCache(CTX, PDOM, max_entries=2) as c:   # the entry cap (the device's max_mr too)
        for x in bufs[:1] + [mmap.mmap(-1, P) for _ in range(2)]:
            c.get(x)
        by_count = counts(c)
        assert by_count["entries"] == 2 and by_count["evictions"] == 1, by_count
        max_mr = c.stats()["max_mr"]
    assert max_mr > 0 and CTX.query_device().max_mr == max_mr
    return {"counts": got, "with_pin": pinned, "by_count": by_count, "max_mr": max_mr}


def low_memlock() -> dict[str, Any]:
    """With CAP_IPC_LOCK (root here) a registration past RLIMIT_MEMLOCK works, in the cache as in
    the kernel; without it (a child whose capabilities exclude it: dropping it in this process
    would change its credentials, and uverbs refuses a caller whose credentials differ from
    the opener's) the kernel refuses it, and the cache refuses it first, with the numbers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (16 * P, hard))
    try:
        big = mmap.mmap(-1, 256 * P)
        with MRCache(CTX, PDOM) as c:
            assert c.get(big).length == 256 * P
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    r = subprocess.run(["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--",
                        sys.executable, __file__, "low-memlock-child"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def low_memlock_child() -> dict[str, Any]:
    """low_memlock() without CAP_IPC_LOCK."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    big = mmap.mmap(-1, 256 * P)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (16 * P, hard))
    calls: list[int] = []

    def spy(pd: Any, length: int, access: int, address: int) -> Any:
        calls.append(length)
        return MR(pd, length, access, address=address)

    try:
        kernel_says = ""
        try:
            MR(PDOM, 256 * P, e.IBV_ACCESS_LOCAL_WRITE, address=addr_of(big)).close()
        except Exception as err:   # noqa: BLE001 - PyverbsRDMAError: ENOMEM from ib_umem_get
            kernel_says = str(err)
        assert kernel_says, "the kernel registered past RLIMIT_MEMLOCK without CAP_IPC_LOCK"
        with MRCache(CTX, PDOM, register=spy) as c:
            assert c.budget == 16 * P, c.budget
            try:
                c.get(big)
                raise AssertionError("registered past RLIMIT_MEMLOCK")
            except MemlockError as err:
                msg = str(err)
            assert not calls, "ibv_reg_mr was called"
            assert "RLIMIT_MEMLOCK" in msg and str(16 * P) in msg and str(256 * P) in msg, msg
            small = c.get(big, 0, 8 * P)     # too big as a whole: the asked range only
            assert calls == [8 * P] and small.length == 8 * P, calls
            after = counts(c)
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
    return {"message": msg, "counts": after, "kernel": kernel_says}


class Peer:
    """Two RC QPs on rxe0 connected to each other and a peer MR (the loopback pattern of
    rdma-core's pyverbs tests)."""

    def __init__(self) -> None:
        self.gidx = gid_index(CTX)
        self.gid = CTX.query_gid(1, self.gidx)
        self.cq = CQ(CTX, 16)
        cap = QPCap(max_send_wr=8, max_recv_wr=8, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap)
        self.qa, self.qb = QP(PDOM, init), QP(PDOM, init)
        self.connect(self.qa, self.qb)
        self.connect(self.qb, self.qa)
        self.mr = MR(PDOM, 4 * P, ACC)

    def connect(self, q: QP, remote: QP) -> None:
        a = QPAttr(qp_state=e.IBV_QPS_INIT)
        a.qp_access_flags, a.port_num, a.pkey_index = ACC, 1, 0
        q.to_init(a)
        a = QPAttr(qp_state=e.IBV_QPS_RTR)
        a.path_mtu, a.dest_qp_num, a.rq_psn = e.IBV_MTU_1024, remote.qp_num, 0
        a.max_dest_rd_atomic, a.min_rnr_timer = 1, 12
        a.ah_attr = AHAttr(gr=GlobalRoute(dgid=self.gid, sgid_index=self.gidx), is_global=1,
                           port_num=1)
        q.to_rtr(a)
        a.qp_state, a.sq_psn, a.timeout, a.retry_cnt, a.rnr_retry = e.IBV_QPS_RTS, 0, 14, 7, 7
        a.max_rd_atomic = 1
        q.to_rts(a)

    def write(self, reg: Any) -> bytes:
        """RDMA WRITE reg's bytes to the peer MR; returns what the peer holds."""
        wr = SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                    sg=[SGE(reg.addr, reg.length, reg.lkey)], send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(self.mr.rkey, self.mr.buf)
        self.qa.post_send(wr)
        end = time.monotonic() + 20
        while True:
            n, wcs = self.cq.poll()
            if n:
                assert wcs[0].status == e.IBV_WC_SUCCESS, f"WC status {wcs[0].status}"
                break
            assert time.monotonic() < end, "CQ timeout"
        return self.mr.read(reg.length, 0)


libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED_NOREPLACE = 0x100000


def stale_address() -> dict[str, Any]:
    peer = Peer()
    n = 2 * P
    with MRCache(CTX, PDOM) as c:
        old = mmap.mmap(-1, n)
        old[:n] = b"A" * n
        addr = addr_of(old)
        r_old = c.get(old)
        assert peer.write(r_old) == b"A" * n
        try:                        # the cache holds the export: it cannot be unmapped now
            old.close()
            raise AssertionError("unmapped while registered")
        except BufferError as err:
            refused = str(err)
        assert c.release(old) == 1
        old.close()                 # munmap: the address is free
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        got = libc.mmap(addr, n, prot, flags | MAP_FIXED_NOREPLACE, -1, 0)
        assert got == addr, f"new mapping at {got:#x}, not {addr:#x}"
        new = (ctypes.c_char * n).from_address(addr)
        new[:] = b"B" * n
        before = counts(c)
        r_new = c.get(new)
        after = counts(c)
        assert r_new.addr == addr and after["misses"] == before["misses"] + 1, (before, after)
        peer_got = peer.write(r_new)
        assert peer_got == b"B" * n, peer_got[:16]
        c.release(new)
    del new
    libc.munmap(addr, n)
    # the same address reused by a new numpy-style exporter without a release in between
    # cannot happen: the cached entry's export keeps the mmap mapped (refused above)
    return {"addr": hex(addr), "old_lkey": r_old.lkey, "new_lkey": r_new.lkey,
            "close_refused": refused, "before": before, "after": after}


def threads() -> dict[str, Any]:
    bufs = [mmap.mmap(-1, 4 * P) for _ in range(3)]
    addrs = {id(b): addr_of(b) for b in bufs}
    errors: list[str] = []
    per, nthreads = 60, 4

    with MRCache(CTX, PDOM, budget=8 * P) as c:    # room for two of three: churn
        def work(k: int) -> None:
            try:
                for i in range(per):
                    b = bufs[(i + k) % 3]
                    off = (i * 997 + k * 131) % (3 * P)
                    r = c.get(b, off, P)
                    assert r.length == P and r.addr == addrs[id(b)] + off
            except Exception:   # noqa: BLE001 - reported
                errors.append(traceback.format_exc())

        ts = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(nthreads)]
        for t in ts:
            t.start()
        for t in ts:                    # bounded: a deadlock is this check's failure, named
            t.join(120)
        stuck = [t.name for t in ts if t.is_alive()]
        assert not stuck, f"threads {stuck} still in get() after 120 s: {c.stats()}"
        s = c.stats()
        assert not errors, errors[0]
        assert s["hits"] + s["misses"] == per * nthreads, s
        assert s["registered_bytes"] == 4 * P * s["entries"] and s["entries"] <= 2, s
        assert s["misses"] - s["races"] - s["evictions"] == s["entries"], s
    return {k: s[k] for k in ("hits", "misses", "evictions", "races", "entries")}


if __name__ == "__main__" and sys.argv[1:] == ["low-memlock-child"]:
    print(json.dumps(low_memlock_child()))
elif __name__ == "__main__":
    print(f"mr-check start: max_mr {CTX.query_device().max_mr}", flush=True)
    checks = Checks(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/lab/results.json"),
                    "mr-check")
    for step in (sub_range_hits, lru_eviction, low_memlock, stale_address, threads):
        checks.run(step)
    sys.exit(checks.exit_code())
