"""An RDMA transport end as a process of a run: `python -m dataplane.transport.rdma.process
SPEC_JSON` polls an RdmaSender or RdmaReceiver and keeps its counters in the control file.

A [[transport]] table with kind = "rdma" becomes a TransportSpec with mode "rdma" and a
TransportProcess (dataplane/transport/process.py) that runs this module instead of the C TCP
loop: the same control file (struct dp_transport: state, heartbeat, stop, error, counters that
outlive the process), the same order in a run (receivers before workers, senders after), the
same receiver arena, consumed and exported under the remote's label.  What RDMA adds (QPs, credits,
the memory-registration cache) goes in the control file's struct dp_rdma_counters, rewritten
every few milliseconds from the RdmaSender / RdmaReceiver's stats(): dataplane/metrics/rdma.py
reads it at scrape time, as the arena collector reads the workers' arenas.

Counters carry across restarts of the process: it adds its own counts to what the file held
when it started.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dataplane._native import lib
from dataplane.shm.arena import Arena
from dataplane.shm.control import Control
from dataplane.shm.layout import RDMA_COUNTERS, TRANSPORT_COUNTERS
from dataplane.shm.ring import RingCorrupted
from dataplane.transport.auth import AuthBook
from dataplane.transport.process import RDMA_MODULE
from dataplane.transport.spec import EXIT_SETUP_FAILED, TransportSpec, parse_spec

PUBLISH_S = 0.01        # counters and heartbeat, as often as the C workers beat
IDLE_SLEEP_S = 100e-6   # nothing to do: nap (the workers' adaptive polling does the same)
DRAIN_S = 2.0           # on stop, a sender finishes what its ring still holds for this long
INFINIBAND = Path("/sys/class/infiniband")


def devices() -> list[str]:
    return sorted(p.name for p in INFINIBAND.iterdir()) if INFINIBAND.is_dir() else []


def check_device(name: str) -> str:
    """'' when the RDMA device exists, else what is wrong and how to fix it."""
    try:
        import pyverbs.device  # noqa: F401
    except ImportError:
        return "pyverbs is not installed: apt install python3-pyverbs (rdma-core)"
    found = devices()
    if name in found:
        return ""
    return (f"RDMA device {name!r} not found; devices here: {', '.join(found)}" if found else
            f"RDMA device {name!r} not found and this host has none: load a driver, or for "
            "soft-RoCE `modprobe rdma_rxe; rdma link add rxe0 type rxe netdev IFACE`")


class _Books:
    """Writes an end's stats() into the control file, on top of what the file held at start."""

    def __init__(self, ctl: Control) -> None:
        self.ctl = ctl
        self.c0 = ctl.counters.copy()
        self.r0 = ctl.rdma.copy()

    def publish(self, s: dict[str, Any], cache: dict[str, Any], max_qp: int) -> None:
        errors = s.get("wc_errors", 0) + s.get("peer_errors", 0)
        c = {"batches": s.get("batches", 0), "packets": s.get("packets", 0),
             "bytes": s.get("bytes", 0), "bad_frames": s.get("bad_batches", 0),
             "reconnects": max(s.get("connects", 0) - 1, 0), "disconnects": errors,
             "acks": s.get("credits_sent", 0), "lost_batches": s.get("lost_batches", 0),
             "lost_packets": s.get("lost_packets", 0)}
        cur = np.zeros_like(self.c0)
        for k, v in c.items():
            cur[TRANSPORT_COUNTERS.index(k)] = v
        self.ctl.counters[:] = self.c0 + cur
        reg = cache["registration_seconds"]
        grows = {"wc_errors": s.get("wc_errors", 0), "peer_errors": s.get("peer_errors", 0),
                 "credit_waits": s.get("credits_wait", 0),
                 "credit_updates": s.get("credits_sent", s.get("credit_updates", 0)),
                 "mr_hits": cache["hits"], "mr_misses": cache["misses"],
                 "mr_evictions": cache["evictions"], "mr_reg_count": reg["count"],
                 "mr_reg_ns": int(reg["sum"] * 1e9),
                 "bad_descriptors": s.get("bad_descriptors", 0)}
        gauges = {"credits": max(s.get("credits", 0), 0), "qps": int(bool(s.get("connected"))),
                  "max_qp": max_qp, "mr_registered_bytes": cache["registered_bytes"],
                  "mr_budget_bytes": cache["budget"]}
        r = self.r0.copy()
        for k, v in grows.items():
            r[RDMA_COUNTERS.index(k)] += v
        for k, v in gauges.items():
            r[RDMA_COUNTERS.index(k)] = v
        n = len(RDMA_COUNTERS)
        counts = list(reg["buckets"].values())
        r[n:n + len(counts)] += np.array(counts, dtype=r.dtype)
        self.ctl.rdma[:] = r
        self.ctl.hdr.connected = int(bool(s.get("connected")))
        self.ctl.hdr.heartbeat_ns = time.monotonic_ns()


def _error(ctl: Control, msg: str) -> None:
    ctl.hdr.error = msg.encode()[:255]


def _open(spec: TransportSpec, ctl: Control) -> tuple[Any, int]:
    """The end the spec asks for, on its arena, and its device's max_qp; raises what set-up
    raised (KeyFileError, RdmaError, MemlockError, OSError, pyverbs errors)."""
    from dataplane.transport.rdma import RdmaError, RdmaReceiver, RdmaSender
    key = spec.load_key()     # first: a bad key file fails before the device is touched
    ctl.hdr.auth.insecure = int(key is None)
    book = AuthBook(ctl.hdr.auth, spec.name, lambda line: print(line, file=sys.stderr))
    auth = {"key": key, "name": spec.name, "book": book}
    why = check_device(spec.device)
    if why:
        raise RdmaError(why)
    arena = Arena.open(Path(spec.arena_path))
    end: Any
    if spec.role == "recv":
        end = RdmaReceiver(arena, ring=spec.ring, port=spec.tcp_port, host=spec.host,
                           device=spec.device, **auth)
    else:
        end = RdmaSender(arena, ring=spec.ring, host=spec.host, port=spec.tcp_port,
                         device=spec.device, max_batch=spec.max_batch, **auth)
    try:
        return end, int(end.ctx.query_device().max_qp)
    except BaseException:
        end.close()
        raise


def _serve(spec: TransportSpec, ctl: Control, end: Any, books: _Books, max_qp: int) -> None:
    """Poll the end until the control file says stop; its counters and error into the file
    every PUBLISH_S."""
    from dataplane.transport.rdma import RdmaError
    sending = spec.role == "send"
    last_error, next_publish = "", 0.0
    while True:
        now = time.monotonic()
        if ctl.hdr.stop:
            # a receiver stops at once; a sender with a receiver first ends its stream
            # (sends what its ring holds, END, acknowledged) for at most DRAIN_S
            if sending and end.link is not None:
                end.finish(DRAIN_S)
            return
        try:
            if sending and end.link is None:
                end.connect(timeout=0.5)       # short: the stop flag is seen between tries
            n = end.poll()
        except RdmaError as err:
            n = 0
            end.last_error = str(err)
        if n == 0:
            time.sleep(IDLE_SLEEP_S)
        if now >= next_publish:
            s = end.stats()
            books.publish(s, end.cache.stats(), max_qp)
            if s["last_error"] != last_error:
                last_error = s["last_error"]
                _error(ctl, last_error)
                print(f"transport {spec.name}: {last_error}", file=sys.stderr, flush=True)
            next_publish = now + PUBLISH_S


def _stop(spec: TransportSpec, ctl: Control, end: Any, books: _Books, max_qp: int) -> None:
    """The last counters (a sender's undelivered packets counted lost), then close."""
    s = end.stats()
    if spec.role == "send":
        # what the ring still holds was taken from the worker and will never arrive (the
        # drain ran out of time or of a receiver): lost, and counted so
        left = end.reader.occupancy()
        s["lost_packets"] = s.get("lost_packets", 0) + left
        if left:
            print(f"transport {spec.name}: stopped with {left} packets not delivered, "
                  "counted lost", file=sys.stderr, flush=True)
    books.publish(s, end.cache.stats(), max_qp)
    ctl.hdr.connected = 0
    ctl.rdma[RDMA_COUNTERS.index("qps")] = 0
    end.close()
    ctl.hdr.state = lib.DP_W_STOPPED


def run(spec: TransportSpec) -> int:
    """Open the end, poll it until told to stop: the exit code."""
    ctl = Control(Path(spec.control_path))
    hdr = ctl.hdr
    hdr.pid, hdr.state = os.getpid(), lib.DP_W_STARTING

    def on_signal(signum: int, frame: object) -> None:
        hdr.stop = 1

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        end, max_qp = _open(spec, ctl)
    except Exception as err:   # noqa: BLE001 - RdmaError, MemlockError, OSError, pyverbs errors
        msg = f"transport {spec.name}: {err}"
        _error(ctl, msg)
        hdr.state = lib.DP_W_FAILED
        print(msg, file=sys.stderr)
        return EXIT_SETUP_FAILED
    books = _Books(ctl)
    hdr.state = lib.DP_W_RUNNING
    try:
        _serve(spec, ctl, end, books, max_qp)
    except RingCorrupted as err:    # not restarted: the ring needs the operator
        _error(ctl, f"stopped: shared memory corrupted: {err}")
        print(f"transport {spec.name}: stopped: {err}", file=sys.stderr, flush=True)
        _stop(spec, ctl, end, books, max_qp)
        hdr.state = lib.DP_W_FAILED
        return EXIT_SETUP_FAILED
    except BaseException:
        _stop(spec, ctl, end, books, max_qp)
        raise
    _stop(spec, ctl, end, books, max_qp)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_spec(argv, f"python -m {RDMA_MODULE}", rdma=True,
                          stop=f" (a sender first sends what its ring holds, for up to "
                               f"{DRAIN_S:g} s)"))


if __name__ == "__main__":
    sys.exit(main())
