"""The RDMA RC transport (dataplane/transport/rdma/receiver.py) between two hosts: two guests
joined by a QEMU
socket link (scripts/guest_run.run_pair: scripts/guest --rdma --link, one emulated CPU each), soft-
RoCE device rxh on the link in each.  Guest A (10.6.6.1) runs the receivers and a control port;
guest B runs the sender and the checks (tests/guest/rdma_pair_checks.py), all in one pair of
boots for the module.  Seqs are checked end to end on the receiver's ring: every seq once, in
order, the counters exact.
  - end to end: 4000 frames of 256 B from B to A, nothing lost;
  - peer killed: the receiver process in A is SIGKILLed mid-stream and started again; the sender
    counts one error, reconnects once, and the new receiver gets every seq from the first the
    sender had not seen completed;
  - link down: A's link drops everything both ways for 4 s mid-stream (tc, as a pulled cable:
    nothing tells TCP); the sender's QP gives up with a retry-exceeded completion, it reconnects
    when the link is back, and the receiver, which kept running, gets every seq once.
The rxh counters of both ends (retransmits, duplicates) are in each check's entry, as "rxe".
"""

from __future__ import annotations

import pytest

from scripts.guest_run import GuestRun


@pytest.fixture(scope="module")
def pair(guest_lab) -> tuple[GuestRun, GuestRun]:
    return guest_lab.pair("rdma_pair_checks.py", ("serve",), ("drive", "10.6.6.1"),
                          flags=("--rdma",))


def test_pair_serve_side(pair):
    d = pair[0].ok("serve")
    print(d)
    assert d["driver"] == "10.6.6.2" and d["commands"][-1] == "done"


def test_pair_end_to_end(pair):
    d = pair[1].ok("pair_end_to_end")
    print(d)
    s, r = d["sender"], d["receiver"]
    assert s["packets"] == r["packets"] == 4000     # each end's own count
    assert s["bytes"] == r["bytes"] == 4000 * 256 and s["batches"] == r["batches"]
    # each reconnect (none on a link whose hosts have CPU to spare) follows an error counted on
    # both ends
    assert s["reconnects"] == s["wc_errors"] + s["peer_errors"]
    assert r["wc_errors"] + r["peer_errors"] == s["reconnects"] and r["bad_batches"] == 0
    assert r["connects"] == 1 + s["reconnects"] and s["ends"] == r["ends"] == 1


def test_pair_peer_killed_then_reconnect(pair):
    d = pair[1].ok("pair_peer_killed")
    print(d)
    assert d["after_kill"]["wc_errors"] + d["after_kill"]["peer_errors"] == 1 and d["error"]
    s = d["sender"]
    assert s["reconnects"] == s["wc_errors"] + s["peer_errors"] >= 1 and s["packets"] == 3000
    assert d["restarted_first_seq"] == d["acked"] > 1000
    assert d["restarted_first_seq"] + d["restarted_frames"] == 3000


def test_pair_link_down_then_reconnect(pair):
    d = pair[1].ok("pair_link_down")
    print(d)
    assert d["wc_status"] == "IBV_WC_RETRY_EXC_ERR" and d["after_error"]["wc_errors"] == 1
    s, r = d["sender"], d["receiver"]
    assert s["reconnects"] == s["wc_errors"] + s["peer_errors"] >= 1 and r["packets"] == 3000
    assert r["connects"] == 1 + s["reconnects"]
