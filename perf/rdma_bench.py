"""RDMA transport throughput (dataplane/transport/rdma/receiver.py) against perftest's
`ib_write_bw`, on the same rxe0 device in the same run, at 4 KB and 64 KB messages.

    .venv/bin/python perf/rdma_bench.py [--seconds 5] [--warmup 1] [--profile] [--sizes 4KB]
    .venv/bin/python perf/rdma_bench.py --two-guests [--seconds 5] ...

rxe0 exists only in the project's QEMU guest: run from the host, the script runs itself there
(scripts/guest --rdma --mem 2G) and prints the guest's output.
--two-guests: two hosts instead of one device.  Two guests of one emulated CPU each, joined by a
QEMU socket link (scripts/guest_run.run_pair), each with rxh on its link NIC: the receivers (ours,
ib_write_bw's server) run in guest A (10.6.6.1) on guest B's commands over the control port of
scripts/guest_link.py (its serve() loop, with `Procs` as the server), the senders and
ib_write_bw's client in B (10.6.6.2), which measures and writes the JSON.

Ours: two arenas whose slot_size is one message, frames of that size; the sender and the
receiver are this script again in two processes (roles `send`, `recv`, each printing its JSON
as its last line), like tests/guest/rdma_common.py's receiver.  The sender's ring is kept full
(descriptors written once, prod set to cons + ring size after every poll: no producer cost in
the figure); the receiver's consumer releases everything published after every poll (no
consumer cost either).  Both loops nap IDLE_SLEEP_S when a poll moved nothing, as
dataplane/transport/rdma/process.py (the transport process of a run) does: a spinning end would
take a vCPU, and a host core, from the kernel's rxe work.
Bytes/s is counted at the receiver (its stats()["bytes"], frames published) over --seconds
after --warmup.
ib_write_bw: server and client on rxe0 (rxh) with -s MSG -D SECONDS and its defaults otherwise
(one QP, tx depth 128, one message per WR); its "BW average" is the figure.  Each is run --repeat
times, alternating; ratio = median ours / median theirs.
--profile runs both ends under cProfile and prints where their time went.

A benchmark, not a test: the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rdma_lab import (
    DEVICE,
    finish,
    in_rdma_lab,
    machine,
    rerun_in_guest,
    rerun_in_two_guests,
)

SELF = str(Path(__file__).resolve())
HOST = "10.9.9.1"               # rxe0's address (dummy0), in the one guest
PAIR_DEVICE, PAIR_PEER = "rxh", "10.6.6.1"      # two guests: the link's rxe, guest A's address
# message bytes: a descriptor's len is 16 bits, so the "64 KB" frame is 65535 B (in a 64 KB
# slot), and ib_write_bw sends the same 65535 B
SIZES = {"4KB": 4 << 10, "64KB": (64 << 10) - 1}
SLOT = {"4KB": 4 << 10, "64KB": 64 << 10}
RING = {"4KB": 1024, "64KB": 1024}         # 4 MB and 64 MB of slots per arena
TARGET_RATIO = 0.9
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def make_arena(name: str, ring_size: int, slot: int) -> Any:
    from dataplane.shm.arena import Arena, ArenaGeometry
    p = SHM / f"rdma-bench-{name}-{os.getpid()}"
    p.unlink(missing_ok=True)
    a = Arena.create(p, ArenaGeometry(n_ports=1, rings=((0, 0),), ring_size=ring_size,
                                      slot_size=slot, pool_bytes=0))
    a.unlink()
    return a


def profiled(fn: Any, enabled: bool, title: str) -> Any:
    if not enabled:
        return fn()
    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print(f"---- cProfile {title} (by own time) ----\n{s.getvalue()}", flush=True)


# ---- the two ends, each in its own process ----

def recv_role(device: str, port: int, slot: int, ring: int, warmup: float, seconds: float,
              profile: bool) -> None:
    from dataplane.transport.rdma import RdmaReceiver
    from dataplane.transport.rdma.process import IDLE_SLEEP_S
    a = make_arena("rx", ring, slot)
    rx = RdmaReceiver(a, port=port, device=device, key=None)
    r = a.rings[0]

    def loop() -> dict[str, Any]:
        t_first = None
        b0 = t0 = 0.0
        end = time.monotonic() + warmup + seconds + 60
        while time.monotonic() < end:
            moved = rx.poll()
            n = r.occupancy()
            if n:
                r.release(n)
            elif not moved:
                time.sleep(IDLE_SLEEP_S)
            now = time.monotonic()
            if t_first is None:
                if rx.s["bytes"]:
                    t_first = now
                continue
            if not t0 and now - t_first >= warmup:
                b0, t0 = rx.s["bytes"], now
            elif t0 and now - t0 >= seconds:
                return {"bytes_per_s": (rx.s["bytes"] - b0) / (now - t0),
                        "seconds": now - t0, "stats": rx.stats()}
        raise SystemExit(f"recv: no traffic for the measurement: {rx.stats()}")

    res = profiled(loop, profile, f"receiver {slot} B")
    rx.close()
    print(json.dumps(res), flush=True)


def send_role(device: str, host: str, port: int, slot: int, ring: int, msg: int, limit: float,
              profile: bool) -> None:
    from dataplane.transport.rdma import RdmaSender
    from dataplane.transport.rdma.process import IDLE_SLEEP_S
    a = make_arena("tx", ring, slot)
    r = a.rings[0]
    d = r.desc
    d["addr"] = r.slots(np.arange(ring))
    d["len"] = msg
    r.shared.prod = ring                        # full: every slot holds a frame to send
    tx = RdmaSender(a, host=host, port=port, device=device, key=None)
    tx.connect()
    until = time.monotonic() + limit

    def loop() -> None:
        while time.monotonic() < until:
            if not tx.poll():
                time.sleep(IDLE_SLEEP_S)
            r.shared.prod = int(r.shared.cons) + ring    # refill what was released: always full
            if tx.link is None:                       # the receiver has measured and gone
                return

    profiled(loop, profile, f"sender {slot} B")
    tx.close()
    print(json.dumps(tx.stats()), flush=True)


# ---- the orchestration (the first process; in two guests, guest B) ----

class Procs:
    """Processes of one end by name, started now and waited for later: the receivers (ours,
    ib_write_bw's server) and our sender.  In the two-guest mode guest A runs one of these behind
    scripts/guest_link.serve(), and guest B calls it through `Remote`."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Any] = {}

    def start(self, name: str, argv: list[str], port: int = 0) -> dict[str, Any]:
        """Start argv, its output in a file; with a port, answer once something listens there
        (a client that comes before the server listens fails, and leaves the server waiting)."""
        log = tempfile.TemporaryFile("w+")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.procs[name], self.logs[name] = p, log
        end = time.monotonic() + 60
        while port and not listening(port) and p.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        return {"pid": p.pid, "listening": bool(port) and listening(port)}

    def wait(self, name: str, timeout: float) -> dict[str, Any]:
        """Its exit status (killed after timeout) and output; the JSON of its last line, if any."""
        p, log = self.procs.pop(name), self.logs.pop(name)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        log.seek(0)
        out = log.read()
        log.close()
        last = (out.strip().splitlines() or [""])[-1]
        return {"rc": rc, "output": out,
                "result": json.loads(last) if last.startswith("{") else None}

    def ib_server(self, device: str, size: int, port: int, seconds: float) -> dict[str, Any]:
        """ib_write_bw's server, with this host's GID index."""
        return self.start("ib", ib_args(device, size, port, seconds), port)


class Remote:
    """Guest A's Procs, over the control port of scripts/guest_link (its Control): the same
    calls, with keyword arguments."""

    def __init__(self, peer: str) -> None:
        from scripts.guest_link import Control
        self.ctl = Control(peer)

    def __getattr__(self, cmd: str) -> Any:
        return lambda **kw: self.ctl.call(cmd, **kw)


def ours(name: str, port: int, warmup: float, seconds: float, profile: bool, recv_at: Any,
         device: str, host: str) -> dict[str, Any]:
    """One run of our transport: the receiver where recv_at runs it (Procs here, or Remote),
    the sender here."""
    slot, ring, msg = SLOT[name], RING[name], SIZES[name]
    me = [sys.executable, SELF, "--role"]
    common = [device, host, str(port), str(slot), str(ring), str(msg)]
    flag = ["--profile"] if profile else []
    here = Procs()
    recv_at.start(name="recv", argv=[*me, "recv", *common, str(warmup), str(seconds), *flag],
                  port=port)
    here.start("send", [*me, "send", *common, str(warmup + seconds + 60), *flag])
    # the receiver ends after its measurement (or gives up), and the sender once it is gone
    rcv = recv_at.wait(name="recv", timeout=warmup + seconds + 120)
    snd = here.wait("send", 60)
    if profile:
        print(rcv["output"], snd["output"], flush=True)
    if not rcv["result"]:
        raise RuntimeError(f"our transport at {name}: the receiver wrote no result "
                           f"(exit {rcv['rc']}):\n{rcv['output']}\nsender:\n{snd['output']}")
    return {**rcv["result"], "sender": snd["result"]}


def listening(port: int) -> bool:
    """A TCP socket in LISTEN (state 0A) on the port, from /proc (connecting would take the
    server's one accept)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def ib_args(device: str, size: int, port: int, seconds: float) -> list[str]:
    """ib_write_bw's arguments for either end (the client adds the server's address); -x is
    this host's IPv4-mapped GID."""
    from pyverbs.device import Context

    from dataplane.transport.rdma import gid_index
    with Context(name=device) as ctx:
        gidx = gid_index(ctx)
    return ["ib_write_bw", "-d", device, "-x", str(gidx), "-s", str(size), "-D",
            str(int(seconds)), "-p", str(port), "-F", "--report_gbits"]


def ib_write_bw(size: int, port: int, seconds: float, server_at: Any, device: str,
                host: str) -> dict[str, Any]:
    """One ib_write_bw run: the server where server_at runs it, the client here to host."""
    server_at.ib_server(device=device, size=size, port=port, seconds=seconds)
    cmd = [*ib_args(device, size, port, seconds), host]
    try:
        cli = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    finally:
        srv = server_at.wait(name="ib", timeout=30)
    # the result row: "#bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]"
    rows = [ln.split() for ln in cli.stdout.splitlines()
            if ln.split() and ln.split()[0] == str(size)]
    if cli.returncode or not rows:
        raise RuntimeError(f"ib_write_bw failed ({cli.returncode}):\n{cli.stdout}{cli.stderr}"
                           f"\nserver:\n{srv['output']}")
    _, iters, _, avg_gbit, mpps = rows[-1][:5]
    return {"bytes_per_s": float(avg_gbit) * 1e9 / 8, "iterations": int(iters),
            "mpps": float(mpps), "command": " ".join(cmd), "gid_index": int(cmd[4])}


def bench(args: argparse.Namespace, recv_at: Any, device: str, host: str) -> dict[str, Any]:
    """Both tools alternating --repeat times per size, receivers where recv_at runs them;
    the figures, for the JSON line."""
    results: dict[str, Any] = {}
    port = 18700
    for name in args.sizes:
        size = SIZES[name]
        runs: dict[str, list[dict[str, Any]]] = {"ib_write_bw": [], "ours": []}
        # alternating, medians: the host's other load moves both by +-30% from run to run
        for _ in range(args.repeat):
            port += 2
            theirs = ib_write_bw(size, port, args.seconds, recv_at, device, host)
            print(f"{name:>5} ib_write_bw   {theirs['bytes_per_s'] / 1e6:9.1f} MB/s "
                  f"({theirs['mpps'] * 1e6:.0f} msg/s)", flush=True)
            mine = ours(name, port + 1, args.warmup, args.seconds, args.profile, recv_at,
                        device, host)
            print(f"{name:>5} dataplane     {mine['bytes_per_s'] / 1e6:9.1f} MB/s "
                  f"({mine['bytes_per_s'] / size:.0f} msg/s)", flush=True)
            runs["ib_write_bw"].append(theirs)
            runs["ours"].append(mine)
        med = {k: statistics.median(r["bytes_per_s"] for r in v) for k, v in runs.items()}
        ratio = med["ours"] / med["ib_write_bw"]
        print(f"{name:>5} medians: dataplane {med['ours'] / 1e6:.1f} MB/s, ib_write_bw "
              f"{med['ib_write_bw'] / 1e6:.1f} MB/s, ratio {ratio:.2f}x", flush=True)
        results[name] = {"message_bytes": size, "slot_size": SLOT[name], "ring_size": RING[name],
                         "ours_bytes_per_s": round(med["ours"]),
                         "ib_write_bw_bytes_per_s": round(med["ib_write_bw"]),
                         "ratio": round(ratio, 3),
                         "ours_runs": [round(r["bytes_per_s"]) for r in runs["ours"]],
                         "ib_write_bw_runs": [round(r["bytes_per_s"]) for r in runs["ib_write_bw"]],
                         "ib_write_bw_command": theirs["command"],
                         "ours_last": {k: mine[k] for k in ("seconds", "stats", "sender")}}
    return {"machine": machine(device), "seconds": args.seconds, "warmup": args.warmup,
            "repeat": args.repeat, "results": results, "target_ratio": TARGET_RATIO,
            "target_met": all(r["ratio"] >= TARGET_RATIO for r in results.values())}


def pair_role(args: argparse.Namespace) -> None:
    """Inside one of the two guests: A (serve) runs the receivers on B's commands, B (drive)
    runs the senders and the clients, and writes the figures."""
    role, out = args.pair
    if role == "serve":
        from scripts.guest_link import serve
        served = serve(Procs(), os.environ["GUEST_LINK_ADDR"].split("/")[0])
        Path(out).write_text(json.dumps({"served": served}))
        return
    remote = Remote(PAIR_PEER)
    try:
        res = bench(args, remote, PAIR_DEVICE, PAIR_PEER)
    finally:
        remote.done()
    res["machine"].update(guests=2, link="QEMU socket netdev, loopback TCP on the host")
    finish(res, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4, help="measured, per run (ib_write_bw -D)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--profile", action="store_true", help="cProfile both ends of ours")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--two-guests", action="store_true",
                    help="receivers in one guest, senders in another, over rxh on their link")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--pair", nargs=2, metavar=("ROLE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # root in the guest: the arenas (up to 16 MB) are registered whole, over the default limit
    if in_rdma_lab():
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)
    if args.role:
        role, device, host, *rest = args.role
        port, slot, ring, msg = (int(x) for x in rest[:4])
        if role == "recv":
            recv_role(device, port, slot, ring, float(rest[4]), float(rest[5]), args.profile)
        else:
            send_role(device, host, port, slot, ring, msg, float(rest[4]), args.profile)
        return 0
    if args.pair:
        pair_role(args)
        return 0
    flags = [a for a in sys.argv[1:] if a != "--two-guests"]
    if args.two_guests:
        return rerun_in_two_guests(SELF, flags, mem="2G")
    if not in_rdma_lab():
        return rerun_in_guest(SELF, flags, mem="2G")
    finish(bench(args, Procs(), DEVICE, HOST), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
