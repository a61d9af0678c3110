"""Run inside `scripts/guest --rdma` (see tests/test_rdma.py): the RDMA transport on rxe0 with
its two ends in two processes.  This process is the sender; each receiver is
tests/guest/rdma_common.py's `recv` role.  Writes RESULTS (JSON), one entry per check:
{"ok": bool, "detail": ..., "error": traceback or ""}.

    python tests/guest/rdma_checks.py RESULTS

The receiver role and what else the pair checks share: tests/guest/rdma_common.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Checks  # tests/guest, the script's folder, is on sys.path
from rdma_common import (
    FRAME,
    HOST,
    KEY,
    fill,
    in_order,
    make_arena,
    run_sender,
    send_all,
    spawn,
)

from dataplane.transport import auth
from dataplane.transport.rdma import RdmaError, RdmaSender


def collect(tx: RdmaSender, out: Path, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The receiver's report and the sender's last stats (the sender is closed): every seq
    0..n-1 arrived once, in order, and no descriptor was bad."""
    got = json.loads(out.read_text())
    s = tx.stats()
    tx.close()
    assert not got["bad"], got["bad"][:3]
    assert in_order(got["seqs"], 0, n - 1), (len(got["seqs"]), got["seqs"][:5])
    return got, s


def end_to_end() -> dict[str, Any]:
    n = 2000
    out = Path(tempfile.mktemp(prefix="rx1-"))
    p = spawn(18601, 1024, n - 1, 0, out)
    a = make_arena("tx1", 2048)
    fill(a, 0, n)
    tx = RdmaSender(a, host=HOST, port=18601, key=KEY)
    t = time.monotonic()
    try:
        send_all(tx, a)
        took = time.monotonic() - t
        assert p.wait(120) == 0
    finally:
        p.kill()
    got, s = collect(tx, out, n)
    assert s["packets"] == n and s["bytes"] == n * FRAME, s
    return {"frames": n, "seconds": round(took, 2), "sender": s, "receiver": got["stats"]}


def credit_exhaustion() -> dict[str, Any]:
    n, ring = 512, 64
    out = Path(tempfile.mktemp(prefix="rx2-"))
    p = spawn(18602, ring, n - 1, 1500, out)
    a = make_arena("tx2", 512)
    fill(a, 0, n)
    tx = RdmaSender(a, host=HOST, port=18602, key=KEY)
    try:
        send_all(tx, a)
        assert p.wait(120) == 0
    finally:
        p.kill()
    got, s = collect(tx, out, n)
    st = got["stall"]
    assert st["held"] == ring and st["occupancy_after"] == ring and st["unchanged"], st
    assert s["credits_wait"] >= 1, s
    return {"sender": s, "stall": st, "receiver": got["stats"]}


def peer_killed() -> dict[str, Any]:
    n, port = 1200, 18603
    out_a, out_b = Path(tempfile.mktemp(prefix="rx3a-")), Path(tempfile.mktemp(prefix="rx3b-"))
    pa = spawn(port, 1024, 10 ** 9, 0, out_a)
    a = make_arena("tx3", 2048)
    fill(a, 0, n)
    tx = RdmaSender(a, host=HOST, port=port, key=KEY)
    pb = None
    try:
        run_sender(tx, lambda: tx.stats()["packets"] >= 400)
        pa.send_signal(signal.SIGKILL)
        pa.wait()
        killed_at = tx.stats()["packets"]
        # keep sending into the dead peer until the error shows
        end = time.monotonic() + 60
        while tx.link is not None:
            tx.poll()
            assert time.monotonic() < end, "no error after the peer was killed"
        err, before = tx.last_error, tx.stats()
        pb = spawn(port, 1024, n - 1, 0, out_b)
        send_all(tx, a)
        assert pb.wait(120) == 0
    finally:
        pa.kill()
        if pb:
            pb.kill()
    got = json.loads(out_b.read_text())
    s = tx.stats()
    tx.close()
    seqs = got["seqs"]
    assert not got["bad"], got["bad"][:3]
    assert seqs and in_order(seqs, seqs[0], n - 1), seqs[:5]
    # released = completed (the bytes reached the receiver's memory, which died with them);
    # batches in flight at the kill may complete after it: the rest is sent again, from the
    # first position not acknowledged when the error showed
    assert seqs[0] == before["packets"] >= killed_at, (seqs[0], before, killed_at)
    assert before["wc_errors"] + before["peer_errors"] >= 1 and err, before
    assert s["reconnects"] == 1, s
    return {"killed_at": killed_at, "error": err, "after_kill": before, "sender": s,
            "restarted_first_seq": seqs[0], "restarted_frames": len(seqs),
            "receiver": got["stats"]}


def wc_error_reconnect() -> dict[str, Any]:
    """A work completion error (a wrong rkey: remote access error, both QPs in error state),
    short frames (one WR per frame): counted, reconnected to the same receiver, every seq once."""
    n, port, short = 600, 18604, 200
    out = Path(tempfile.mktemp(prefix="rx4-"))
    p = spawn(port, 256, n - 1, 0, out)
    a = make_arena("tx4", 1024)
    fill(a, 0, n, short)
    tx = RdmaSender(a, host=HOST, port=port, key=KEY)
    try:
        run_sender(tx, lambda: tx.stats()["packets"] >= 192)
        tx.peer["slot_rkey"] ^= 0x5A5A
        end = time.monotonic() + 60
        while tx.link is not None:
            tx.poll()
            assert time.monotonic() < end, "no error with a wrong rkey"
        err, before = tx.last_error, tx.stats()
        send_all(tx, a)
        assert p.wait(120) == 0
    finally:
        p.kill()
    got, s = collect(tx, out, n)
    assert before["wc_errors"] == 1 and "status" in err, before
    assert s["reconnects"] == 1 and s["bytes"] == n * short, s
    return {"error": err, "after_error": before, "sender": s, "receiver": got["stats"]}


def rogue_without_key() -> dict[str, Any]:
    """Peers without the key learn nothing (no rkey, no ring state) and displace nobody: one
    that speaks the handshake with a guessed proof, one with a wrong key, one that connects and
    says nothing; the real sender's stream arrives whole meanwhile."""
    n, port = 800, 18605
    out = Path(tempfile.mktemp(prefix="rx5-"))
    p = spawn(port, 256, n - 1, 0, out)
    a = make_arena("tx5", 1024)
    fill(a, 0, n)
    silent = socket.create_connection((HOST, port))
    tx = RdmaSender(a, host=HOST, port=port, key=KEY)
    try:
        run_sender(tx, lambda: tx.stats()["packets"] >= 200)
        with socket.create_connection((HOST, port)) as rogue:   # a guessed proof
            rogue.sendall(auth._hello(0, os.urandom(auth.NONCE), "rogue"))
            challenge = auth.recv_exact(rogue, auth.CHALLENGE_SIZE, time.monotonic() + 30)
            rogue.sendall(bytes(auth.MAC))
            rogue.settimeout(30)
            after = rogue.recv(65536)
        wrong = RdmaSender(make_arena("tx5w", 64), host=HOST, port=port, key=bytes(32))
        try:
            wrong.connect(timeout=5)
            raise AssertionError("a sender with the wrong key connected")
        except RdmaError as e:
            refused = str(e)
        finally:
            wrong.close()
        send_all(tx, a)
        assert p.wait(120) == 0
    finally:
        silent.close()
        p.kill()
    got, s = collect(tx, out, n)
    assert after == b"" and b"rkey" not in challenge, (after, challenge)
    assert "authentication" in refused and "bad_proof" in refused, refused
    assert s["reconnects"] == 0 and s["peer_errors"] == 0, s
    assert got["stats"]["connects"] == 1, got["stats"]
    # the guessed proof fails at the receiver; the wrong key fails at the sender first, which
    # then hangs up (each of its connect attempts), both counted
    assert got["auth"]["ok"] == 1 and got["auth"]["bad_proof"] == 1, got["auth"]
    assert got["auth"]["closed"] >= 1, got["auth"]
    return {"refused": refused, "auth": got["auth"], "sender": s}


if __name__ == "__main__":
    checks = Checks(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/lab/results.json"),
                    "rdma-check")
    for step in (end_to_end, credit_exhaustion, peer_killed, wc_error_reconnect,
                 rogue_without_key):
        checks.run(step)
    sys.exit(checks.exit_code())
