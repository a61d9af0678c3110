"""Run inside two guests joined by a link (scripts/guest_run.run_pair, scripts/guest --rdma --link;
see tests/test_rdma_pair.py): the RDMA transport between two hosts, over rxh on that link.

The `serve` side (guest A, 10.6.6.1) is where the receivers run: the control port of
scripts/guest_link.py on its link address takes the driver's commands (start a receiver, SIGKILL
it after a delay, wait for it and return what its ring saw, take the link down for a while).
The `drive` side (guest B) is the sender and does the checks.  The two coordinate over the link
itself, not through files: the lab share is 9p with cache=loose, and the point is what crosses
the link.  Each writes RESULTS (JSON) as tests/guest/rdma_checks.py does.

    python tests/guest/rdma_pair_checks.py serve RESULTS
    python tests/guest/rdma_pair_checks.py drive PEER RESULTS
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import Checks  # tests/guest, the script's folder, is on sys.path
from rdma_common import FRAME, KEY, fill, in_order, make_arena, run_sender, send_all, spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo: scripts/

from dataplane.transport.rdma import RdmaSender  # noqa: E402
from scripts.guest_link import CTL_PORT, Control, serve  # noqa: E402

DEVICE = "rxh"


def rxe_counters() -> dict[str, int]:
    """rxh's own counters (retransmits, duplicates, sequence errors: what the link did)."""
    d = Path(f"/sys/class/infiniband/{DEVICE}/ports/1/hw_counters")
    return {f.name: int(f.read_text()) for f in sorted(d.iterdir()) if f.name != "lifespan"}


def _link_if() -> str:
    name = os.environ.get("GUEST_LINK_IF", "")
    assert name and os.environ.get("GUEST_LINK_RDMA") == DEVICE, \
        "not booted with scripts/guest --rdma --link"
    return name


# ---- the serve side (guest A): receivers and the link, on command ----

class Server:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.outs: dict[str, Path] = {}
        self.kills: dict[str, dict[str, Any]] = {}
        self.link_info: dict[str, Any] = {}
        self.link_thread: threading.Thread | None = None

    def recv(self, name: str, port: int, ring: int, last: int) -> dict[str, Any]:
        """A receiver process (rdma_common's recv role on rxh); answers once it listens, so the
        sender's first connect finds it."""
        out = Path(tempfile.mktemp(prefix=f"rx-{name}-"))
        p = spawn(port, ring, last, 0, out, DEVICE)
        self.procs[name], self.outs[name] = p, out
        return {"listening": True, "pid": p.pid}

    def kill(self, name: str, after: float) -> dict[str, Any]:
        """SIGKILL the receiver `after` seconds from now, while the sender keeps writing."""
        p, rec = self.procs[name], self.kills.setdefault(name, {})

        def later() -> None:
            time.sleep(after)
            rec["alive_until_kill"] = p.poll() is None     # set before `wait` can return
            p.send_signal(signal.SIGKILL)
        threading.Thread(target=later, daemon=True).start()
        return {"scheduled": after}

    def wait(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for a receiver to end; its exit status and, when it lived to write it, its ring's
        seqs and stats."""
        rc = self.procs.pop(name).wait(timeout)
        out = self.outs.pop(name)
        got = json.loads(out.read_text()) if out.exists() else {}
        return {"rc": rc, **got, "kill": self.kills.get(name)}

    def down(self, seconds: float) -> dict[str, Any]:
        """Drop everything the link interface receives or sends for `seconds` but this control
        connection (and ARP, which it needs): no RST, no FIN, packets just vanish, as when a
        cable is pulled.  Answers once the drop is in place, so the driver knows it writes into
        nothing (under TCG, setting it up takes a second or more).  Not `ip link set down`:
        virtio-net keeps what arrives meanwhile and delivers it seconds late when it is up."""
        ifname = _link_if()
        subprocess.run(["modprobe", "-a", "sch_ingress", "cls_flower", "cls_matchall",
                        "act_gact"], check=True)
        t0 = time.monotonic()
        subprocess.run(["tc", "qdisc", "add", "dev", ifname, "clsact"], check=True)
        for way, port in (("ingress", "dst_port"), ("egress", "src_port")):
            f = ["tc", "filter", "add", "dev", ifname, way]
            subprocess.run([*f, "prio", "1", "protocol", "ip", "flower", "ip_proto", "tcp", port,
                            str(CTL_PORT), "action", "pass"], check=True)
            subprocess.run([*f, "prio", "2", "protocol", "arp", "matchall", "action", "pass"],
                           check=True)
            subprocess.run([*f, "prio", "3", "protocol", "all", "matchall", "action", "drop"],
                           check=True)
        self.link_info = {"if": ifname, "setup_seconds": round(time.monotonic() - t0, 3)}

        def restore() -> None:
            time.sleep(seconds)
            r = subprocess.run(["tc", "-s", "filter", "show", "dev", ifname, "ingress"],
                               capture_output=True, text=True, check=True)
            # what the drop took in (the matchall's "Sent N bytes M pkt"), for the record
            self.link_info["dropped_in"] = re.findall(r"Sent \d+ bytes (\d+) pkt", r.stdout)[-1:]
            subprocess.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], check=True)
            self.link_info["down_for"] = round(time.monotonic() - t0, 3)
        self.link_thread = threading.Thread(target=restore, daemon=True)
        self.link_thread.start()
        return {"seconds": seconds}

    def link(self) -> dict[str, Any]:
        """What the last `down` did, once it is over, and rxh's counters."""
        if self.link_thread:
            self.link_thread.join(60)
        return {**self.link_info, "counters": rxe_counters()}

    def counters(self) -> dict[str, Any]:
        return rxe_counters()


def serve_receivers() -> dict[str, Any]:
    """Serve the driver's commands with a Server until it says done; what was handled."""
    _link_if()
    return serve(Server(), os.environ["GUEST_LINK_ADDR"].split("/")[0])


# ---- the drive side (guest B): the sender and the checks ----

PEER = "10.6.6.1"
CTL: Control


def _start(name: str, n: int, port: int, last: int, **kw: Any) -> tuple[Any, RdmaSender]:
    """A receiver in A on `port` (ring of 1024, so credits flow), and a sender here over rxh with
    n frames (seqs 0..n-1) queued on its ring."""
    assert CTL.call("recv", name=name, port=port, ring=1024, last=last)["listening"]
    a = make_arena(f"tx-{name}", 4096)
    fill(a, 0, n)
    return a, RdmaSender(a, host=PEER, port=port, device=DEVICE, key=KEY, **kw)


def _until_error(tx: RdmaSender, timeout: float = 60, pace: float = 0.0) -> float:
    """Keep writing until the sender drops its link; seconds it took.  `pace`: a nap between
    polls, so the stream is still going when the peer goes (a free-running sender may finish
    first)."""
    t = time.monotonic()
    while tx.link is not None:
        tx.poll()
        time.sleep(pace)
        assert time.monotonic() - t < timeout, f"no error within {timeout} s: {tx.stats()}"
    return round(time.monotonic() - t, 3)


def _wait(name: str, tx: RdmaSender) -> dict[str, Any]:
    """The receiver's end, once the sender has seen every batch completed: it has them all by
    now, give or take its last few polls (a failure says what the sender thought)."""
    try:
        return CTL.call("wait", name=name, timeout=30)
    except AssertionError as err:
        raise AssertionError(f"{err}\nsender: {tx.stats()}") from None


def _wc_status(err: str) -> str:
    """The WC status name in a sender error, or "" for an error that is not a completion's."""
    m = re.search(r"work completion error status (\d+)", err)
    if not m:
        return ""
    import pyverbs.enums as e
    return e.ibv_wc_status(int(m.group(1))).name


def _seqs_wrong(seqs: list[int], first: int, last: int, *more: Any) -> str:
    """Where a ring's seqs part from first..last, for the failure message."""
    want = list(range(first, last + 1))
    i = next((k for k, (x, y) in enumerate(zip(seqs, want, strict=False)) if x != y),
             min(len(seqs), len(want)))
    return (f"{len(seqs)} seqs for {len(want)} ({first}..{last}); from index {i}: got "
            f"{seqs[max(0, i - 2):i + 6]}, wanted {want[max(0, i - 2):i + 6]}; "
            f"{len(seqs) - len(set(seqs))} repeated; {more}")


def pair_end_to_end() -> dict[str, Any]:
    n = 4000
    a, tx = _start("a", n, 18711, n - 1)
    t = time.monotonic()
    send_all(tx, a)
    took = time.monotonic() - t
    got = _wait("a", tx)
    s = tx.stats()
    tx.close()
    r = got["stats"]
    assert got["rc"] == 0 and not got["bad"], (got["rc"], got["bad"][:3])
    assert in_order(got["seqs"], 0, n - 1), _seqs_wrong(got["seqs"], 0, n - 1, s, r)
    assert s["packets"] == r["packets"] == n and s["bytes"] == r["bytes"] == n * FRAME, (s, r)
    assert s["batches"] == r["batches"], (s, r)
    # a healthy link: no error, or (an emulated host starved of CPU misses its ACK deadlines,
    # seen once in ten rounds beside a full test run) each reconnect follows an error counted
    # on both ends, and the books above are exact anyway
    assert s["reconnects"] == s["wc_errors"] + s["peer_errors"], s
    assert r["wc_errors"] + r["peer_errors"] == s["reconnects"], (s, r)
    assert r["bad_batches"] == 0 and r["connects"] == 1 + s["reconnects"], (s, r)
    assert s["ends"] == r["ends"] == 1, (s, r)     # the end of stream, acknowledged
    return {"frames": n, "seconds": round(took, 2), "sender": s, "receiver": r}


def pair_peer_killed() -> dict[str, Any]:
    """SIGKILL the receiver mid-stream; the sender counts the error, reconnects to a restarted
    one, which gets every seq from the first the sender had not seen completed, in order."""
    n, port = 3000, 18712
    # one batch of 16 in flight, a poll every 5 ms: at most 3200 frames/s, so the 2000 after
    # the first 1000 take longer than the 0.3 s before the kill
    a, tx = _start("b1", n, port, 10 ** 9, max_batch=16, window=1)
    run_sender(tx, lambda: tx.stats()["packets"] >= 1000)
    CTL.call("kill", name="b1", after=0.3)
    detect = _until_error(tx, pace=0.005)
    err, before = tx.last_error, tx.stats()
    acked = n - a.rings[0].occupancy()      # released = completed; the rest is sent again
    killed = CTL.call("wait", name="b1", timeout=30)
    CTL.call("recv", name="b2", port=port, ring=1024, last=n - 1)
    send_all(tx, a)
    got = _wait("b2", tx)
    s = tx.stats()
    tx.close()
    seqs, r = got["seqs"], got["stats"]
    assert killed["rc"] == -signal.SIGKILL and killed["kill"]["alive_until_kill"], killed
    assert got["rc"] == 0 and not got["bad"], (got["rc"], got["bad"][:3])
    assert in_order(seqs, acked, n - 1), _seqs_wrong(seqs, acked, n - 1, before, s, r)
    assert before["wc_errors"] + before["peer_errors"] == 1 and err, before
    assert before["packets"] == acked > 1000, (before, acked)
    # the kill's error and reconnect, and any later one (an emulated host short of CPU can miss
    # its ACK deadline) only after an error that was counted; the books stay exact either way
    assert s["reconnects"] == s["wc_errors"] + s["peer_errors"] >= 1 and s["packets"] == n, s
    assert r["packets"] == n - acked and r["connects"] == s["reconnects"], (s, r)
    assert r["bad_batches"] == 0 and s["ends"] == r["ends"] == 1, r
    return {"error": err, "wc_status": _wc_status(err), "detect_seconds": detect,
            "after_kill": before, "acked": acked, "restarted_first_seq": seqs[0],
            "restarted_frames": len(seqs), "sender": s, "receiver": r}


def pair_link_down() -> dict[str, Any]:
    """A's link drops everything for a few seconds mid-stream: no RST, no FIN, the sender's writes
    just vanish until its QP gives up; the link comes back, the sender reconnects, the same
    receiver (still running) gets every seq exactly once.

    The sender pauses (nothing in flight) while the drop is set up: a batch whose WRITEs landed
    but whose ACK was lost would be sent again after the reconnect (rdma.py delivers at least
    once), and this check is about nothing being lost, with exact counts."""
    n, port, down = 3000, 18713, 4.0
    a, tx = _start("c", n, port, n - 1, cq_timeout=5.0)
    run_sender(tx, lambda: tx.stats()["packets"] >= 1000)
    # what is posted completes meanwhile (the HCA, here rxh in the kernel, ACKs it without this
    # process), long before the drop is in place (tc under TCG: a second or more)
    CTL.call("down", seconds=down)      # answers once the drop is in place
    detect = _until_error(tx)
    err, before = tx.last_error, tx.stats()
    acked = n - a.rings[0].occupancy()
    t = time.monotonic()
    send_all(tx, a)
    resumed = round(time.monotonic() - t, 2)
    got = _wait("c", tx)
    link = CTL.call("link")
    s = tx.stats()
    tx.close()
    r = got["stats"]
    status = _wc_status(err)
    assert link["dropped_in"] and int(link["dropped_in"][0]) > 0, link
    assert got["rc"] == 0 and not got["bad"], (got["rc"], got["bad"][:3])
    assert in_order(got["seqs"], 0, n - 1), _seqs_wrong(got["seqs"], 0, n - 1, before, s, r)
    assert before["packets"] == acked, (before, acked)
    # the sender's QP gives up after its retries (its QP's timeout x retry_cnt: about 2 s, within
    # the 4 s drop), before the 5 s completion timeout: a WC error, not a timeout nor a TCP error
    assert status == "IBV_WC_RETRY_EXC_ERR", err
    assert before["wc_errors"] == 1 and before["peer_errors"] == 0, before
    # every reconnect follows a counted error (the drop's, and any later one of a starved
    # emulated link); the same receiver took each new connection, and every packet once
    assert s["reconnects"] == s["wc_errors"] + s["peer_errors"] >= 1, s
    assert s["packets"] == n and s["bytes"] == n * FRAME, s
    assert r["packets"] == n and r["connects"] == 1 + s["reconnects"], (s, r)
    assert r["bad_batches"] == 0 and s["ends"] == r["ends"] == 1, r
    return {"error": err, "wc_status": status, "detect_seconds": detect,
            "resume_seconds": resumed, "link": link, "after_error": before, "acked": acked,
            "sender": s, "receiver": r}


def drive(checks: Checks) -> None:
    global CTL
    _link_if()
    t = time.monotonic()
    CTL = Control(PEER)
    print(f"rdma-pair: control connected after {time.monotonic() - t:.1f} s", flush=True)
    for step in (pair_end_to_end, pair_peer_killed, pair_link_down):
        before = {"sender": rxe_counters(), "receiver": CTL.call("counters")}
        checks.run(step)
        # what rxh did on both ends meanwhile (retransmits, duplicates, retry errors): the
        # transport's own counters cannot tell a slow ACK from a lost packet
        after = {"sender": rxe_counters(), "receiver": CTL.call("counters")}
        checks.results[step.__name__]["rxe"] = rxe = {
            side: {k: v - before[side][k] for k, v in c.items() if v != before[side][k]}
            for side, c in after.items()}
        print(f"rdma-pair {step.__name__} rxh counters: {rxe}", flush=True)
        checks.write()
    CTL.call("done")


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "serve":
        checks = Checks(Path(sys.argv[2]), "rdma-pair")
        checks.run(serve_receivers, "serve")
    else:
        PEER = sys.argv[2]
        checks = Checks(Path(sys.argv[3]), "rdma-pair")
        drive(checks)
    sys.exit(checks.exit_code())
