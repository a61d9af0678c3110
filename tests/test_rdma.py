"""The RDMA RC transport (dataplane/transport/rdma/receiver.py).

This kernel has no RDMA: one guest booted for the module (scripts/guest --rdma) runs
tests/guest/rdma_checks.py, the sender, which starts each receiver as a second process (the same
script, role `recv`) on rxe0, and writes the results to the lab share:
  - end to end: 2000 frames of 256 B with a '<QQII' trailer (seq, tx_ns, stream, magic), every
    seq once and in order on the receiver's ring;
  - credit exhaustion: a receiver ring of 64 whose consumer holds it full for 1.5 s: the sender
    waits at zero credits, nothing held is overwritten, it resumes when the consumer drains;
  - peer killed: SIGKILL the receiver mid-stream, the sender reports and counts the error, then
    reconnects to a restarted receiver, which gets every batch after the last acknowledged one
    (completed: batches in flight at the kill may still complete);
  - a work completion error (wrong rkey: both QPs in error state) with short frames (one WR per
    frame): counted in wc_errors, reconnected to the same receiver, every seq once.
"""

from __future__ import annotations

import pytest

from scripts.guest_run import GuestRun


def test_messages_split_whole_and_keep_the_rest() -> None:
    """The control socket's messages (credits, END, END_ACK) are cut from a byte stream at any
    boundary; this loads without pyverbs (imported only when a transport starts)."""
    from dataplane.transport.rdma.link import CREDIT, END_ACK, MSG, split_msgs
    stream = MSG.pack(CREDIT, 7) + MSG.pack(CREDIT, 2 ** 64 - 1) + MSG.pack(END_ACK, 9)
    got, rest = split_msgs(stream[:40])
    assert got == [(CREDIT, 7), (CREDIT, 2 ** 64 - 1)] and rest == stream[32:40]
    got, rest = split_msgs(rest + stream[40:])
    assert got == [(END_ACK, 9)] and rest == b""


def test_qp_budget_refuses_past_max_qp() -> None:
    """A QP past the device's max_qp is refused with the device, the limit and the count."""
    from dataplane.transport.rdma.link import RdmaError, give_qp, qps_held, take_qp
    dev = "fake-max-qp"
    take_qp(dev, 2)
    take_qp(dev, 2)
    with pytest.raises(RdmaError, match=r"fake-max-qp: max_qp is 2 and this process holds 2"):
        take_qp(dev, 2)
    give_qp(dev)
    take_qp(dev, 2)
    give_qp(dev)
    give_qp(dev)
    assert qps_held(dev) == 0


@pytest.fixture(scope="module")
def guest(guest_lab) -> GuestRun:
    return guest_lab.checks("rdma_checks.py", flags=("--rdma",))


def test_rxe_end_to_end(guest):
    d = guest.ok("end_to_end")
    print(d)
    s = d["sender"]
    # each end's own count (d["frames"] is the check's constant, not a measurement)
    assert s["packets"] == d["receiver"]["packets"] == 2000
    assert s["bytes"] == d["receiver"]["bytes"] == 2000 * 256
    assert s["wc_errors"] == s["peer_errors"] == s["reconnects"] == 0
    assert d["receiver"]["bad_batches"] == 0
    assert s["ends"] == d["receiver"]["ends"] == 1 and d["receiver"]["peer_errors"] == 0


def test_rxe_credit_exhaustion(guest):
    d = guest.ok("credit_exhaustion")
    print(d)
    assert d["stall"] == {"held": 64, "occupancy_after": 64, "unchanged": True,
                          "published_while_full": 64}
    assert d["sender"]["credits_wait"] >= 1 and d["sender"]["packets"] == 512


def test_rxe_peer_killed_then_reconnect(guest):
    d = guest.ok("peer_killed")
    print(d)
    assert d["after_kill"]["wc_errors"] + d["after_kill"]["peer_errors"] >= 1 and d["error"]
    assert d["sender"]["reconnects"] == 1
    assert d["restarted_first_seq"] == d["after_kill"]["packets"] >= d["killed_at"]
    assert d["restarted_first_seq"] + d["restarted_frames"] == 1200


def test_rxe_wc_error_then_reconnect(guest):
    d = guest.ok("wc_error_reconnect")
    print(d)
    assert d["after_error"]["wc_errors"] == 1 and "status" in d["error"]
    assert d["sender"]["reconnects"] == 1 and d["receiver"]["packets"] == 600


def test_rxe_rogue_peers_learn_nothing(guest):
    """Peers without the key get no rkey and displace nobody; the real stream arrives whole."""
    d = guest.ok("rogue_without_key")
    print(d)
    assert d["auth"]["ok"] == 1 and d["auth"]["bad_proof"] == 1 and d["auth"]["closed"] >= 1
    assert d["sender"]["packets"] == 800 and d["sender"]["reconnects"] == 0
