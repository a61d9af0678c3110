"""Cross-checks of a config against what the native workers and transports refuse or cannot
honour later, so a run never starts with a value a worker would refuse (or wedge on) minutes
in.  Every limit is read from the native build through cffi, never restated here; each error
names the key path, the value and the limit.

Called from the loader's cross-checks, after every table was read.
"""

from __future__ import annotations

from typing import Any

from dataplane.config.tables import Problems


def cross_check(cfg: Any, p: Problems) -> None:
    """Names across kinds, and each worker's burst, ring, copybreak and slot limits."""
    from dataplane._native import lib
    _names(cfg, p)
    a = cfg.arena
    dataroom = _mbuf_dataroom(cfg)
    for i, w in enumerate(cfg.workers):
        where = f"worker[{i}]"
        if w.burst is not None and w.burst > lib.DP_MAX_BURST:
            p.error(f"{where}.burst = {w.burst}: at most {lib.DP_MAX_BURST} (DP_MAX_BURST, "
                    "the workers' per-burst arrays)")
        g = w.generate
        if g is not None and g.burst is not None and g.burst > lib.DP_MAX_BURST:
            p.error(f"{where}.generate.burst = {g.burst}: at most {lib.DP_MAX_BURST} "
                    "(DP_MAX_BURST, the workers' per-burst arrays)")
        if w.backend == "uring" and a.ring_size > lib.DP_URING_MAX_BUFS:
            p.error(f"arena.ring_size = {a.ring_size}: at most {lib.DP_URING_MAX_BUFS} for "
                    f'{where} ("{w.name}", backend uring): its ring slots are an io_uring '
                    "provided-buffer ring, which the kernel caps below 65536 entries")
        if w.backend != "dpdk" or not w.zero_copy:
            continue
        if w.copybreak is not None and w.copybreak > a.slot_size:
            p.error(f"{where}.copybreak = {w.copybreak}: at most arena.slot_size = "
                    f"{a.slot_size}; a frame copied into its slot is cut at slot_size")
        if dataroom and a.slot_size > dataroom:
            p.error(f"arena.slot_size = {a.slot_size}: at most {dataroom} (the DPDK mbuf data "
                    f"room, DPW_MBUF_DATAROOM) for {where} (\"{w.name}\", zero_copy = true): "
                    "its frames stay in mbufs of that size; set zero_copy = false or a smaller "
                    "slot_size")
    _rdma_senders(cfg, p, dataroom)


def _names(cfg: Any, p: Problems) -> None:
    """One name space: a worker and a transport of the same name are refused (their files are
    kept apart by prefix, but a name must say which one a message or a metric is about)."""
    workers = {w.name: i for i, w in enumerate(cfg.workers) if w.name}
    for j, x in enumerate(cfg.transports):
        if x.name in workers:
            p.error(f'transport[{j}].name = "{x.name}": also the name of '
                    f"worker[{workers[x.name]}]; workers and transports share one name space")


def _rdma_senders(cfg: Any, p: Problems, dataroom: int) -> None:
    """An RDMA sender writes each frame into one of the receiver's slots; the receiver refuses a
    descriptor longer than its slot_size (transport/rdma/staging.py), and the sender reconnects
    and sends it again, forever.  A zero-copy DPDK worker's frames are up to an mbuf's data
    room long, so the slots must hold that much."""
    workers = {w.name: w for w in cfg.workers}
    for j, x in enumerate(cfg.transports):
        w = workers.get(x.worker)
        if x.kind != "rdma" or x.role != "send" or w is None:
            continue
        if w.backend == "dpdk" and w.zero_copy and dataroom and cfg.arena.slot_size < dataroom:
            p.error(f"arena.slot_size = {cfg.arena.slot_size}: transport[{j}] "
                    f'("{x.name}", kind rdma) ships worker "{w.name}" (zero_copy = true), whose '
                    f"frames are up to {dataroom} B (the DPDK mbuf data room); the receiver "
                    "refuses frames longer than its slots: set slot_size to at least "
                    f"{dataroom} or zero_copy = false")


def _mbuf_dataroom(cfg: Any) -> int:
    """The DPDK worker's mbuf data room, from its extension; 0 when no worker runs on DPDK
    (the extension, which loads libdpdk, is imported only then)."""
    if not any(w.backend == "dpdk" for w in cfg.workers):
        return 0
    try:
        from dataplane._dpdk import lib as dpdk
    except ImportError:
        return 0                    # backends.resolve already refused "dpdk" without it
    return int(dpdk.DPW_MBUF_DATAROOM)
