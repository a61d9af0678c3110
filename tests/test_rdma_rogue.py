"""A peer with a valid RDMA session that misbehaves (dataplane/transport/rdma/receiver.py,
staging.py): one guest booted for the module (scripts/guest --rdma) runs
tests/guest/rdma_rogue_checks.py, a receiver on rxe0 polled by a thread and a sender holding the
key, in one process, so the check reads the receiver's arena itself:
  - RDMA WRITE with each of the greeting's rkeys to the arena header, the ring's prod and cons,
    its published descriptors, and the bytes just before and after the slots: each fails with a
    work completion error, nothing of the header, ring or descriptors changed; a write into a
    slot and into the staging area (what the keys are for) lands;
  - descriptors sent with a foreign port, queue, rx_ns: published with the receiver's ring's
    port and queue, its slots' addresses and its receive time; the consumer sees one ring;
  - a batch with a len over the slot size, one with a flag no worker sets: not published, each
    counted in bad_descriptors.
"""

from __future__ import annotations

import pytest

from scripts.guest_run import GuestRun


@pytest.fixture(scope="module")
def guest(guest_lab) -> GuestRun:
    return guest_lab.checks("rdma_rogue_checks.py", flags=("--rdma",))


def test_rogue_writes_outside_slots_and_staging_fail(guest):
    d = guest.ok("writes_outside")
    print(d)
    # 6 targets x 2 rkeys, each refused by the responder's MR check
    assert len(d["status"]) == 12
    assert set(d["status"].values()) == {d["rem_access_err"]}, d["status"]
    assert d["unchanged_bytes"] > 0


def test_rogue_descriptors_get_the_receivers_port_queue_addr_time(guest):
    d = guest.ok("descriptors_rewritten")
    print(d)
    assert d["published"] == 40 and d["ports"] == [1] and d["queues"] == [2]
    assert d["consumer_rings"] == [[1, 2]]


def test_rogue_bad_descriptors_are_counted_and_not_published(guest):
    d = guest.ok("bad_descriptors")
    print(d)
    assert d["receiver"]["bad_descriptors"] == 2 and d["receiver"]["packets"] == 0
    assert d["cases"] == {"len": {"prod": 0, "unchanged": True},
                          "flags": {"prod": 0, "unchanged": True}}


def test_impossible_consumer_index_stops_the_receiver(guest):
    d = guest.ok("corrupted_cons")
    print(d)
    assert "corrupted or foreign writer" in d["at_start"]
    assert "consumer index 3 outside [0, 0]" in d["running"]
