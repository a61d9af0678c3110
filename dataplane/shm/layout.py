"""Python's view of the shared-memory layout: the numpy dtypes and counter names of the structs
in native/include/dp_layout.h, and check_layout(), which compares each with the compiled structs.

The header is the only definition.  A dtype here names the fields Python reads, in C order, with
their numpy types; numpy places them at C alignment (align=True, or packed for a packed struct),
and check_layout() compares each offset, width and signedness with offsetof/sizeof of the
compiled struct (through cffi), and fails when the struct has a field Python does not know.
No offset, width or size is written down here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from dataplane._native import ffi, lib

U64 = np.dtype("<u8")


def _view(struct: str, fields: Sequence[tuple], packed: bool = False) -> np.dtype:
    """Fields in C order at C alignment (or packed), padded to the compiled struct's size:
    trailing padding is C's business, the fields' places are checked."""
    c_order = np.dtype(list(fields), align=not packed)
    names = list(c_order.names)
    return np.dtype({"names": names, "formats": [c_order.fields[n][0] for n in names],
                     "offsets": [c_order.fields[n][1] for n in names],
                     "itemsize": max(ffi.sizeof(struct), c_order.itemsize)})


def _counters(struct: str, names: Sequence[str], *more: tuple) -> np.dtype:
    return _view(struct, [(n, U64) for n in names] + list(more))


# struct dp_desc: one packet
DESC_DTYPE = _view("struct dp_desc", [
    ("addr", "<u8"), ("rx_ns", "<u8"), ("hash", "<u4"), ("len", "<u2"), ("flags", "<u2"),
    ("ethertype", "<u2"), ("port", "<u2"), ("queue", "u1"), ("l4proto", "u1"), ("l4_off", "<u2")])
# struct dp_gen_trailer (packed): the generator's last bytes of every frame it sends
TRAILER_DTYPE = _view("struct dp_gen_trailer", [
    ("seq", "<u8"), ("tx_ns", "<u8"), ("stream", "<u4"), ("magic", "<u4")], packed=True)

# Counter blocks, all u64: Python reads them as u64 arrays indexed by position in these names.
RING_COUNTERS = ("rx_packets", "rx_bytes", "ring_full_drops", "malformed", "truncated", "copied",
                 "bursts")
PORT_COUNTERS = ("tx_packets", "tx_bytes", "tx_drops", "nic_missed", "nic_errors", "rx_nombuf",
                 "gen_seq")
# Per ring, io_uring worker only (layout version 2): struct dp_uring_counters.
URING_COUNTERS = ("cqes", "enobufs", "rearms", "recv_errors")
# Per generator stream (layout version 4): struct dp_gen_stream_ctl.  rate_pps is the one word
# Python writes (dataplane/workers/rate.py); the worker writes the rest.
GEN_STREAM_FIELDS = ("rate_pps", "cfg_rate_pps", "seq", "issued", "tx_packets", "tx_bytes",
                     "tx_drops", "stream")
# A transport's control file (struct dp_transport): its counters, and what an RDMA end adds
# (struct dp_rdma_counters, then mr_reg_buckets[DP_MR_BUCKETS]).
TRANSPORT_COUNTERS = ("batches", "packets", "bytes", "completions", "copied_completions",
                      "reconnects", "lost_batches", "lost_packets", "bad_frames", "short_reads",
                      "acks", "ring_waits", "disconnects", "last_session", "last_seq",
                      "slow_peers")
RDMA_COUNTERS = ("wc_errors", "peer_errors", "credit_waits", "credits", "credit_updates", "qps",
                 "max_qp", "mr_hits", "mr_misses", "mr_evictions", "mr_registered_bytes",
                 "mr_budget_bytes", "mr_reg_count", "mr_reg_ns", "bad_descriptors")

RING_COUNTERS_DTYPE = _counters("struct dp_ring_counters", RING_COUNTERS)
PORT_COUNTERS_DTYPE = _counters("struct dp_port_counters", PORT_COUNTERS)
URING_COUNTERS_DTYPE = _counters("struct dp_uring_counters", URING_COUNTERS)
GEN_STREAM_DTYPE = _counters("struct dp_gen_stream_ctl", GEN_STREAM_FIELDS)
TRANSPORT_COUNTERS_DTYPE = _counters("struct dp_transport_counters", TRANSPORT_COUNTERS)
RDMA_COUNTERS_DTYPE = _counters("struct dp_rdma_counters", RDMA_COUNTERS,
                                ("mr_reg_buckets", U64, (lib.DP_MR_BUCKETS,)))

# enum dp_worker_state: of a worker (struct dp_arena) and of a transport process
WORKER_STATES = {lib.DP_W_EMPTY: "empty", lib.DP_W_STARTING: "starting",
                 lib.DP_W_RUNNING: "running", lib.DP_W_STOPPED: "stopped",
                 lib.DP_W_FAILED: "failed"}

# every dtype above, by the struct it views
VIEWS: dict[str, np.dtype] = {
    "struct dp_desc": DESC_DTYPE,
    "struct dp_gen_trailer": TRAILER_DTYPE,
    "struct dp_ring_counters": RING_COUNTERS_DTYPE,
    "struct dp_port_counters": PORT_COUNTERS_DTYPE,
    "struct dp_uring_counters": URING_COUNTERS_DTYPE,
    "struct dp_gen_stream_ctl": GEN_STREAM_DTYPE,
    "struct dp_transport_counters": TRANSPORT_COUNTERS_DTYPE,
    "struct dp_rdma_counters": RDMA_COUNTERS_DTYPE,
}


class LayoutError(RuntimeError):
    """Python's view of the arena does not match the compiled layout, or the file is foreign."""


def u64_words(struct: str) -> int:
    """How many u64s one struct of counters spans (a row of a counters array)."""
    return ffi.sizeof(struct) // U64.itemsize


def _fix(what: str) -> str:
    return f"{what}; rebuild (pip install -e .) or update dataplane/shm/layout.py"


def _check_field(struct: str, name: str, dt: np.dtype, off: int, ctype) -> None:
    """One field: the same offset, width and signedness as the compiled one."""
    real_off = ffi.offsetof(struct, name)
    if real_off != off:
        raise LayoutError(_fix(f"{struct}.{name}: Python assumes offset {off}, compiled layout "
                               f"has {real_off}"))
    if ctype.kind == "array":
        # the declarations may leave an array's length open: then the fields after it and the
        # struct's size (both checked) bound it
        n = dt.shape[0] if dt.shape else 0
        if ctype.length is not None and ctype.length != n:
            raise LayoutError(_fix(f"{struct}.{name}: Python assumes {n} elements, compiled "
                                   f"layout has {ctype.length}"))
        ctype, dt = ctype.item, dt.base
    width = ffi.sizeof(ctype)
    signed = ctype.cname.startswith("int")
    if dt.itemsize != width or (dt.kind == "i") != signed:
        raise LayoutError(_fix(f"{struct}.{name}: Python reads {dt.str}, compiled layout has "
                               f"{ctype.cname}"))


def check_layout(views: dict[str, np.dtype] | None = None) -> None:
    """Compare Python's dtypes (VIEWS unless given) with the compiled structs; raise LayoutError
    naming the struct and field that differ."""
    for struct, view in (VIEWS if views is None else views).items():
        real = ffi.sizeof(struct)
        if real != view.itemsize:
            raise LayoutError(_fix(f"{struct}: Python assumes {view.itemsize} bytes, compiled "
                                   f"layout has {real}"))
        compiled = dict(ffi.typeof(struct).fields)
        for name in view.names:
            if name not in compiled:
                raise LayoutError(_fix(f"{struct}.{name}: no such field in the compiled layout"))
            dt, off = view.fields[name][:2]
            _check_field(struct, name, dt, off, compiled[name].type)
        unknown = _unknown(compiled, view.names)
        if unknown:
            raise LayoutError(_fix(f"{struct}: fields {', '.join(unknown)} of the compiled "
                                   "layout are not in Python's view"))


def _unknown(compiled: Iterable[str], known: Sequence[str]) -> list[str]:
    """Compiled fields Python does not name, padding aside."""
    return [n for n in compiled if n not in known and not n.startswith("pad")]
