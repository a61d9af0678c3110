"""A BPF filter over a batch of descriptors, for live capture: compiled by libpcap (tcpdump's
syntax) and run by libpcap's bpf_filter() in C over the whole batch (native/core/capture.c),
never per packet in Python (docs/design.md, invariant 1).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from dataplane._native import ffi, lib

MAX_SNAPLEN = 262144           # libpcap's and tcpdump's largest

# pcap_compile has kept state in globals in older libpcap: one compile at a time
_compile_lock = threading.Lock()


class FilterError(ValueError):
    """A filter libpcap does not compile: names the filter and libpcap's message."""


@dataclass
class Matched:
    """The frames of one batch a filter matched, copied out of the arena."""
    idx: np.ndarray        # uint32: their positions in the batch
    caplen: np.ndarray     # uint32: bytes kept of each (cut to the snaplen)
    data: bytearray        # the kept bytes, one frame after another
    bad: int               # descriptors pointing outside the arena: counted, never read

    def __len__(self) -> int:
        return len(self.idx)


class BpfFilter:
    """`BpfFilter("udp src port 1025", snaplen=64).match(desc, arena_buf)`."""

    def __init__(self, expression: str, snaplen: int = 0):
        if not 0 <= snaplen <= MAX_SNAPLEN:
            raise FilterError(f"snaplen {snaplen}: expected 0 (whole frames) to {MAX_SNAPLEN}")
        self.expression = expression
        self.snaplen = snaplen
        err = ffi.new("char[]", lib.DP_BPF_ERR_LEN)
        with _compile_lock:
            prog = lib.dp_bpf_compile(expression.encode(), snaplen, err, lib.DP_BPF_ERR_LEN)
        if prog == ffi.NULL:
            raise FilterError(f"filter {expression!r} does not compile: "
                              f"{ffi.string(err).decode(errors='replace')}")
        self._prog = ffi.gc(prog, lib.dp_bpf_free)

    def __len__(self) -> int:
        """Instructions in the compiled program."""
        return int(lib.dp_bpf_len(self._prog))

    def match(self, desc: np.ndarray, arena: np.ndarray) -> Matched:
        """Run the filter over `desc` (a DESC_DTYPE view) whose frames are in `arena` (the
        arena's bytes, uint8), and copy what matched out: one C call for each, whatever the
        batch's size."""
        n = len(desc)
        idx = np.empty(n, dtype=np.uint32)
        caplen = np.empty(n, dtype=np.uint32)
        bad = ffi.new("uint32_t *")
        base = ffi.from_buffer("uint8_t[]", arena)
        d = ffi.from_buffer("struct dp_desc[]", desc)
        m = int(lib.dp_bpf_match(self._prog, base, arena.size, d, n, self.snaplen,
                                 ffi.from_buffer("uint32_t[]", idx),
                                 ffi.from_buffer("uint32_t[]", caplen), bad))
        idx, caplen = idx[:m], caplen[:m]
        out = bytearray(int(caplen.sum(dtype=np.uint64)))
        if m:
            used = lib.dp_bpf_copy(base, arena.size, d, ffi.from_buffer("uint32_t[]", idx),
                                   ffi.from_buffer("uint32_t[]", caplen), m,
                                   ffi.from_buffer("uint8_t[]", out), len(out))
            assert used == len(out)       # sized from the same caplen: always fits
        return Matched(idx, caplen, out, int(bad[0]))
