"""The RDMA receiver's descriptor check: what a peer wrote into the staging area is copied into
the ring's own descriptors, checked there and completed by the receiver before anything is
published (dataplane/transport/rdma/receiver.py).

The staging area is remotely writable for as long as a sender is connected, the ring's
descriptors never are: so the descriptors are copied FIRST and checked in the copy, where a peer
writing the staging area again meanwhile changes nothing.  Per descriptor:
  - `len` at most the slot size, `flags` only the DP_F_* bits a worker sets: else it is bad;
  - `addr` is the slot of its ring position, written here (what the sender said is not used);
  - `port` and `queue` are the ring's own, `rx_ns` the receiver's clock (as the TCP receiver,
    native/transport/transport_recv.c, stamps them), DP_F_COPIED set: the frame sits in a slot.
`hash`, `ethertype`, `l4proto`, `l4_off` and the frame bytes stay as sent: they describe the
frame, which the consumers parse as untrusted bytes anyway (bounded by `len` and the slot).
numpy on the whole batch: no per-packet Python (docs/design.md, invariant 1).
"""

from __future__ import annotations

import numpy as np

from dataplane._native import lib

# every flag a worker may set on a descriptor (native/include/dp_layout.h)
SENDER_FLAGS = (lib.DP_F_TRUNCATED | lib.DP_F_MALFORMED | lib.DP_F_VLAN | lib.DP_F_IP_OPTIONS
                | lib.DP_F_IPV6_EXT | lib.DP_F_FRAGMENT | lib.DP_F_COPIED | lib.DP_F_GENERATED)


def accept(staged: np.ndarray, desc: np.ndarray, want_addr: np.ndarray, slot_size: int,
           port: int, queue: int, rx_ns: int) -> int:
    """Copy `staged` into `desc` (the same positions of the ring, not yet published), check the
    copy and complete it; returns how many descriptors are bad (0: `desc` may be published)."""
    desc[:] = staged
    bad = (desc["len"] > slot_size) | ((desc["flags"] & ~np.uint16(SENDER_FLAGS)) != 0)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        return n_bad
    desc["addr"] = want_addr
    desc["port"] = port
    desc["queue"] = queue
    desc["rx_ns"] = rx_ns
    desc["flags"] |= np.uint16(lib.DP_F_COPIED)
    return 0
