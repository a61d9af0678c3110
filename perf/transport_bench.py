"""Transport throughput: plain send vs MSG_ZEROCOPY vs io_uring SEND_ZC, at 4 KB and 64 KB
batches, against iperf3 on the same path (a veth between two namespaces), in the same run.

    sudo .venv/bin/python perf/transport_bench.py [--seconds 3] [--rounds 3] [--sizes 4 64]
                                                  [--modes copy zerocopy send_zc]

For each mode and batch size: a C producer fills the sender's ring with 2 KB frames as fast as
it drains, the sender ships batches of that size, and a consumer empties the receiver's ring
as the run's consumer loop does: whole batches (a numpy view, the bytes summed), a 1 ms nap
after a pass that found fewer than 256 descriptors.  (A consumer spinning on an empty ring
would take a core of the two from the transport's ends; iperf3's server spins on nothing.)
GB/s counts frame bytes published by the receiver; sender CPU is the sender process's
utime+stime.  iperf3 runs with -l of the same size (its own buffer: no arena, no framing).
The kernel's "copied" flag is reported as it was counted: on veth the kernel copies zero-copy
sends anyway (docs/design.md, known limits), so zero copy is not expected to win here.
A benchmark, not a test:
the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from dataplane._native import ffi
from dataplane._testing import lib as testing

from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.ring import RingReader
from dataplane.transport import auth
from dataplane.transport.process import TransportProcess
from dataplane.transport.spec import TransportSpec

TAG = f"tb{os.getpid() % 100000}"
NS_S, NS_R = f"dpt-{TAG}-s", f"dpt-{TAG}-r"
PEER = "10.79.9.2"
FRAME = 2048
CLK = os.sysconf("SC_CLK_TCK")
MODES = ("copy", "zerocopy", "send_zc")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def lab_up() -> None:
    ip("netns", "add", NS_S)
    ip("netns", "add", NS_R)
    ip("link", "add", f"s{TAG}", "netns", NS_S, "type", "veth", "peer", "name", f"r{TAG}",
       "netns", NS_R)
    for ns, dev, addr in ((NS_S, f"s{TAG}", "10.79.9.1/24"), (NS_R, f"r{TAG}", PEER + "/24")):
        ip("-n", ns, "addr", "add", addr, "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")


def lab_down() -> None:
    for ns in (NS_S, NS_R):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def drain(ring: RingReader, small: int = 256, nap: float = 0.001) -> int:
    """Empty the ring in whole batches until the arena is told to stop; bytes seen."""
    seen = 0
    while not ring.arena.header.stop:
        got = 0
        for batch in ring.batches():
            seen += int(batch["len"].sum())
            got += len(batch)
        if got < small:
            time.sleep(nap)
    return seen


def run_transport(mode: str, batch: int, seconds: float, port: int) -> dict:
    shm = Path("/dev/shm")
    paths = [shm / f"dataplane-{TAG}-{n}" for n in ("src", "rx", "rxctl", "txctl", "key")]
    for p in paths:
        p.unlink(missing_ok=True)
    auth.write_key(paths[4], auth.generate_key())   # both ends authenticate, as in a run
    src = Arena.create(paths[0], ArenaGeometry(1, ((0, 0),), 4096, FRAME, 0))
    rx = TransportProcess(TransportSpec(name="rx", role="recv", control_path=str(paths[2]),
                                        arena_path=str(paths[1]), host="0.0.0.0",
                                        tcp_port=port, netns=NS_R, key_file=str(paths[4])),
                          4096, FRAME)
    tx = TransportProcess(TransportSpec(name="tx", role="send", control_path=str(paths[3]),
                                        arena_path=str(paths[0]), host=PEER, tcp_port=port,
                                        mode=mode, netns=NS_S, max_batch=batch // FRAME,
                                        max_bytes=batch, key_file=str(paths[4])))
    assert rx.arena is not None
    threads = [threading.Thread(target=testing.dp_transport_produce,
                                args=(ffi.from_buffer(src._mm), 0, 1 << 62, FRAME, 32, 1)),
               threading.Thread(target=drain, args=(RingReader(rx.arena, 0),))]
    try:
        rx.start(stderr=subprocess.DEVNULL)
        rx.wait_running()
        tx.start(stderr=subprocess.DEVNULL)
        tx.wait_running()
        for t in threads:
            t.start()
        time.sleep(0.5)                       # connected and flowing
        assert tx.proc is not None
        b0, c0, t0 = rx.control.counter("bytes"), cpu_s(tx.proc.pid), time.monotonic()
        time.sleep(seconds)
        b1, c1, t1 = rx.control.counter("bytes"), cpu_s(tx.proc.pid), time.monotonic()
        s = tx.control.snapshot()
    finally:
        src.header.stop = 1
        rx.arena.header.stop = 1
        for t in threads:
            if t.is_alive():
                t.join(10)
        tx.close()
        rx.close()
        src.close()
        src.unlink()
        paths[4].unlink()
    gb = (b1 - b0) / 1e9
    return {"gbps": round(gb / (t1 - t0), 3), "sender_cpu_s_per_gb": round((c1 - c0) / gb, 3)
            if gb else None, "completions": s["completions"],
            "copied_completions": s["copied_completions"], "lost_batches": s["lost_batches"]}


def run_iperf3(batch: int, seconds: float, port: int) -> dict:
    srv = subprocess.Popen(["ip", "netns", "exec", NS_R, "iperf3", "-s", "-1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(["ip", "netns", "exec", NS_S, "iperf3", "-c", PEER, "-p", str(port),
                              "-t", str(seconds), "-l", str(batch), "-J"],
                             capture_output=True, text=True, timeout=seconds + 30, check=True)
    finally:
        srv.wait(10)
    res = json.loads(out.stdout)["end"]
    gbps = res["sum_received"]["bytes"] / 1e9 / res["sum_received"]["seconds"]
    cpu = res["cpu_utilization_percent"]["host_total"] / 100 * res["sum_sent"]["seconds"]
    return {"gbps": round(gbps, 3),
            "sender_cpu_s_per_gb": round(cpu / (res["sum_sent"]["bytes"] / 1e9), 3)}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "loadavg_1m": os.getloadavg()[0], "path": "veth between two network namespaces"}


def median_of(runs: list[dict]) -> dict:
    """The run of median throughput (its CPU figure with it), and the spread."""
    ranked = sorted(runs, key=lambda r: r["gbps"])
    return ranked[len(ranked) // 2] | {"gbps_min": ranked[0]["gbps"],
                                       "gbps_max": ranked[-1]["gbps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds (each mode, then iperf3) per batch size")
    ap.add_argument("--sizes", nargs="+", type=int, default=[4, 64], metavar="KB",
                    help="batch sizes in KB")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = ap.parse_args()
    lab_down()
    lab_up()
    results: dict = {"benchmark": "transport_bench", "machine": machine(), "frame_bytes": FRAME,
                     "seconds": args.seconds, "rounds": args.rounds}
    port = 7300
    try:
        for kb in args.sizes:
            runs: dict[str, list[dict]] = {m: [] for m in (*args.modes, "iperf3")}
            for rnd in range(args.rounds):
                for mode in runs:
                    port += 1
                    r = (run_iperf3(kb << 10, args.seconds, port) if mode == "iperf3" else
                         run_transport(mode, kb << 10, args.seconds, port))
                    runs[mode].append(r)
                    print(f"{kb:>3} KB round {rnd} {mode:<9} {r}", flush=True)
            row: dict = {m: median_of(rs) | {"runs": rs} for m, rs in runs.items()}
            ref = row["iperf3"]["gbps"]
            row["ratio_to_iperf3"] = {m: round(row[m]["gbps"] / ref, 2) if ref else None
                                      for m in args.modes}
            print(f"{kb:>3} KB medians: " + ", ".join(
                f"{m} {row[m]['gbps']} GB/s" for m in runs) + f"; ratio to iperf3 "
                f"{row['ratio_to_iperf3']}", flush=True)
            results[f"{kb}KB"] = row
    finally:
        lab_down()
    zc = [results[f"{kb}KB"][m] for kb in args.sizes for m in ("zerocopy", "send_zc")
          if m in args.modes]
    results["kernel_copied"] = all(r["copied_completions"] == r["completions"] > 0 for r in zc)
    results["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
