"""The TCP transport from Python: `python -m dataplane.transport.tcp send|recv SPEC_JSON`, a class
to run one such process, and a Prometheus collector for the dataplane_transport_* families.

A sender consumes one ring of a local arena (some worker's) and ships its batches to a receiver
in another namespace or host; the receiver writes them into its own arena's ring 0, as packets
of port 0, whose label is the remote's name (so consumers and metrics see a named remote port).
The C side is native/transport.c and native/transport_send.c; the wire format and the
ack/loss rules are in native/dp_transport.h.

Each transport process has a control file (struct dp_transport in native/dp_layout.h: state,
heartbeat, stop, error, counters), created 0600 by TransportProcess, which outlives the process:
a restarted sender or receiver adds to the same counters, and the receiver's record of the last
batch it published lets a reconnecting sender tell delivered batches from lost ones exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dataplane._native import ffi, lib
from dataplane.shm.arena import Arena, ArenaGeometry, LayoutError, check_layout

log = logging.getLogger(__name__)

MODES = {"copy": lib.DP_TM_COPY, "zerocopy": lib.DP_TM_ZEROCOPY, "send_zc": lib.DP_TM_SEND_ZC}
COUNTERS = ("batches", "packets", "bytes", "completions", "copied_completions", "reconnects",
            "lost_batches", "lost_packets", "bad_frames", "short_reads", "acks", "ring_waits",
            "disconnects", "last_session", "last_seq")
_EXPECTED = {
    "struct dp_transport_counters": ({n: 8 * i for i, n in enumerate(COUNTERS)}, 128),
    "struct dp_transport": ({"magic": 0, "version": 8, "size": 12, "heartbeat_ns": 64,
                             "state": 72, "stop": 76, "pid": 80, "connected": 84,
                             "restarts": 88, "error": 96, "c": 384, "r": 512}, 704),
}
# struct dp_rdma_counters, then mr_reg_buckets[DP_MR_BUCKETS]
RDMA_COUNTERS = ("wc_errors", "peer_errors", "credit_waits", "credits", "credit_updates", "qps",
                 "max_qp", "mr_hits", "mr_misses", "mr_evictions", "mr_registered_bytes",
                 "mr_budget_bytes", "mr_reg_count", "mr_reg_ns")
EXIT_SETUP_FAILED = 2


@dataclass
class TransportSpec:
    name: str
    role: str                  # "send" or "recv"
    control_path: str          # the struct dp_transport file
    arena_path: str            # send: the arena whose ring is shipped; recv: its own arena
    ring: int = 0              # send: which ring of that arena; recv: 0
    host: str = "127.0.0.1"    # send: peer address; recv: address to listen on
    tcp_port: int = 7000
    mode: str = "zerocopy"     # send: copy | zerocopy | send_zc; both roles: rdma
    device: str = ""           # rdma: the RDMA device (rxe0, mlx5_0, ...)
    netns: str | None = None
    max_batch: int = 256       # descriptors per frame
    max_bytes: int = 1 << 20   # frame bytes per frame
    max_inflight: int = 64     # batches not yet acknowledged and completed
    backoff_min_ms: int = 100
    backoff_max_ms: int = 5000
    label: str = ""            # recv: metric label of its port 0 (the remote's name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TransportSpec:
        return cls(**json.loads(text))


def control_path(name: str) -> str:
    """Where a run keeps transport NAME's control file (its receiver arena: without .ctl)."""
    return f"/dev/shm/dataplane-transport-{name}.ctl"


class Control:
    """A transport's control file, mapped: state, stop, error and counters as u64s."""

    def __init__(self, path: Path, create: bool = False):
        check_layout(_EXPECTED)
        self.path = Path(path)
        size = ffi.sizeof("struct dp_transport")
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.hdr = ffi.cast("struct dp_transport *", ffi.from_buffer(self._mm))
        if create:
            self.hdr.version = lib.DP_TRANSPORT_VERSION
            self.hdr.size = size
            self.hdr.magic = lib.DP_TRANSPORT_MAGIC
        elif self.hdr.magic != lib.DP_TRANSPORT_MAGIC or \
                self.hdr.version != lib.DP_TRANSPORT_VERSION or self.hdr.size != size:
            raise LayoutError(f"{self.path}: not a version {lib.DP_TRANSPORT_VERSION} "
                              "transport control file")
        self.counters = np.ndarray((len(COUNTERS),), dtype="<u8", buffer=self._mm,
                                   offset=ffi.offsetof("struct dp_transport", "c"))
        # RDMA_COUNTERS then the registration-time buckets (written by
        # dataplane/transport/rdma/process.py)
        self.rdma = np.ndarray((len(RDMA_COUNTERS) + lib.DP_MR_BUCKETS,), dtype="<u8",
                               buffer=self._mm, offset=ffi.offsetof("struct dp_transport", "r"))

    def counter(self, name: str) -> int:
        return int(self.counters[COUNTERS.index(name)])

    def snapshot(self) -> dict[str, int]:
        c = self.counters.copy()
        return {n: int(c[i]) for i, n in enumerate(COUNTERS)}

    def rdma_snapshot(self) -> dict[str, Any]:
        r = self.rdma.copy()
        out: dict[str, Any] = {n: int(r[i]) for i, n in enumerate(RDMA_COUNTERS)}
        out["mr_reg_buckets"] = [int(x) for x in r[len(RDMA_COUNTERS):]]
        return out

    def state(self) -> str:
        return {0: "empty", 1: "starting", 2: "running", 3: "stopped", 4: "failed"}.get(
            self.hdr.state, "unknown")

    def error(self) -> str:
        return ffi.string(self.hdr.error).decode(errors="replace")

    def close(self) -> None:
        self.counters = self.rdma = None  # type: ignore[assignment]
        self.hdr = None
        try:
            self._mm.close()
        except BufferError:
            pass


def _config(spec: TransportSpec):
    cfg = ffi.new("struct dp_transport_config *")
    for field, value in (("name", spec.name), ("host", spec.host)):
        b = value.encode()
        if len(b) >= 64:
            raise ValueError(f"transport {field} {value!r} longer than 63 bytes")
        setattr(cfg, field, b)
    if spec.mode not in MODES:
        raise ValueError(f"transport mode {spec.mode!r}: expected one of {', '.join(MODES)}")
    cfg.tcp_port, cfg.mode, cfg.port_index = spec.tcp_port, MODES[spec.mode], 0
    cfg.max_batch, cfg.max_bytes, cfg.max_inflight = spec.max_batch, spec.max_bytes, \
        spec.max_inflight
    cfg.backoff_min_ms, cfg.backoff_max_ms = spec.backoff_min_ms, spec.backoff_max_ms
    return cfg


def run(spec: TransportSpec) -> int:
    """Map the arena and the control file, run the C loop until stopped: the exit code."""
    length = ffi.new("uint64_t *")
    base = lib.dp_arena_map(spec.arena_path.encode(), length)
    if base == ffi.NULL:
        print(f"transport {spec.name}: cannot map arena {spec.arena_path}: "
              f"{os.strerror(ffi.errno)}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    ctl = Control(Path(spec.control_path))
    cfg = _config(spec)
    hdr = ctl.hdr

    def on_signal(signum: int, frame: object) -> None:
        hdr.stop = 1

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fn = lib.dp_transport_send_run if spec.role == "send" else lib.dp_transport_recv_run
    result: list[int] = []
    # the C loop in a thread (cffi drops the GIL), the main thread free for signal handlers
    t = threading.Thread(target=lambda: result.append(fn(base, spec.ring, hdr, cfg)))
    t.start()
    while t.is_alive():
        t.join(0.2)
    if not result or result[0] != 0:
        print(f"transport {spec.name}: set-up failed: {ctl.error()}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    return 0


class TransportProcess:
    """One sender or receiver process and its control file (and, for a receiver, its arena).

    start() spawns it (in spec.netns when set); kill() and start() again are a restart on the
    same files, so counters carry on; close() stops it and removes what it created."""

    def __init__(self, spec: TransportSpec, ring_size: int = 4096, slot_size: int = 2048):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        Path(spec.control_path).unlink(missing_ok=True)
        self.control = Control(Path(spec.control_path), create=True)
        self.arena: Arena | None = None
        self.gave_up = ""
        if spec.role == "recv":
            Path(spec.arena_path).unlink(missing_ok=True)
            self.arena = Arena.create(Path(spec.arena_path),
                                      ArenaGeometry(1, ((0, 0),), ring_size, slot_size, 0))

    def start(self, stderr=None) -> None:
        module = ("dataplane.transport.rdma.process" if self.spec.mode == "rdma"
                  else "dataplane.transport.tcp")
        argv = [sys.executable, "-m", module, self.spec.to_json()]
        if self.spec.netns:
            argv = ["ip", "netns", "exec", self.spec.netns, *argv]
        self.control.hdr.stop = 0
        self.control.hdr.state = 0
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)

    def wait_running(self, timeout: float | None = None) -> None:
        # an RDMA end is Python importing pyverbs and registering its memory: slower to start
        timeout = timeout or (60.0 if self.spec.mode == "rdma" else 10.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"transport {self.spec.name} exited "
                                   f"{self.proc.returncode}: {self.control.error()}")
            if self.control.state() == "running":
                return
            time.sleep(0.02)
        raise RuntimeError(f"transport {self.spec.name} not running after {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL, no goodbye: what a crash looks like to the peer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.control.hdr.restarts += 1

    def check(self) -> str | None:
        """Restart the process if it died on its own (not when set-up failed: that needs the
        operator).  An event line for the run's log, or None when nothing happened."""
        p = self.proc
        if p is None or p.poll() is None or self.control.hdr.stop or self.gave_up:
            return None
        why = self.control.error() or "no error recorded"
        if p.returncode == EXIT_SETUP_FAILED:
            self.gave_up = f"set-up failed: {why}"
            return f"transport {self.spec.name}: {self.gave_up}; not restarted"
        self.control.hdr.restarts += 1
        self.start()
        return f"transport {self.spec.name} exited {p.returncode} ({why}): restarted"

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        self.control.hdr.stop = 1
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        self.control.close()
        Path(self.spec.control_path).unlink(missing_ok=True)
        if self.arena is not None:
            self.arena.close()
            self.arena.unlink()

    def __enter__(self) -> TransportProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# family -> (kind, name, help); labels are always (transport, role, peer, mode)
FAMILIES = {
    "batches": ("c", "dataplane_transport_batches_total",
                "Batches sent whole (send) or published on the ring (recv)."),
    "packets": ("c", "dataplane_transport_packets_total", "Packets in those batches."),
    "bytes": ("c", "dataplane_transport_bytes_total", "Frame bytes in those batches."),
    "completions": ("c", "dataplane_transport_completions_total",
                    "Zero-copy send completions from the kernel."),
    "copied_completions": ("c", "dataplane_transport_copied_completions_total",
                           "Zero-copy completions where the kernel copied anyway "
                           "(always so on loopback and veth)."),
    "reconnects": ("c", "dataplane_transport_reconnects_total",
                   "Connections made after the first."),
    "lost_batches": ("c", "dataplane_transport_lost_batches_total",
                     "Batches taken from the ring that the receiver never published."),
    "lost_packets": ("c", "dataplane_transport_lost_packets_total",
                     "Packets in the lost batches."),
    "bad_frames": ("c", "dataplane_transport_bad_frames_total",
                   "Frames or messages that failed validation (connection closed)."),
    "short_reads": ("c", "dataplane_transport_short_reads_total",
                    "Connections that ended in the middle of a frame."),
    "acks": ("c", "dataplane_transport_acks_total", "Batches acknowledged."),
    "ring_waits": ("c", "dataplane_transport_ring_waits_total",
                   "Frames that waited for ring room (TCP backpressure)."),
    "disconnects": ("c", "dataplane_transport_disconnects_total", "Connections that ended."),
}
LABELS = ["transport", "role", "peer", "mode"]


class TransportCollector(Collector):
    """dataplane_transport_* from the control files, read at scrape time; a closed or foreign
    source is skipped (partial scrape)."""

    def __init__(self, sources: Iterable[tuple[TransportSpec, Control]]):
        self.sources = list(sources)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        fams = {k: (CounterMetricFamily if kind == "c" else GaugeMetricFamily)(
            name, doc, labels=LABELS) for k, (kind, name, doc) in FAMILIES.items()}
        up = GaugeMetricFamily("dataplane_transport_connected",
                               "1 while the transport has a peer connection.", labels=LABELS)
        zc = GaugeMetricFamily("dataplane_transport_zero_copy_effective",
                               "1 when the kernel sent without copying (no copied completions "
                               "among the completions so far), 0 when it copied.", labels=LABELS)
        for spec, ctl in self.sources:
            try:
                snap, connected = ctl.snapshot(), ctl.hdr.connected
            except (AttributeError, TypeError, ValueError):
                continue
            lab = [spec.name, spec.role, f"{spec.host}:{spec.tcp_port}",
                   spec.mode if spec.role == "send" or spec.mode == "rdma" else ""]
            for k in FAMILIES:
                fams[k].add_metric(lab, float(snap[k]))
            up.add_metric(lab, float(connected))
            if snap["completions"]:
                zc.add_metric(lab, float(snap["copied_completions"] == 0))
        yield from fams.values()
        yield up
        if zc.samples:
            yield zc


def parse_spec(argv: list[str] | None, prog: str, rdma: bool, stop: str = "") -> TransportSpec:
    """The command line of a transport process (this module's or
    dataplane.transport.rdma.process's)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Run one transport end (send or recv, per the spec's role) on files "
                    f"TransportProcess created. SIGTERM/SIGINT stop it{stop}. Exit 0 after a "
                    f"clean stop, {EXIT_SETUP_FAILED} when set-up failed (the reason is in the "
                    "control file and on stderr).")
    ap.add_argument("spec_json", help="a TransportSpec as JSON"
                    + (', with mode "rdma"' if rdma else ""))
    args = ap.parse_args(argv)
    try:
        spec = TransportSpec.from_json(args.spec_json)
    except (ValueError, TypeError) as e:
        ap.error(f"bad transport spec: {e}")
    if spec.role not in ("send", "recv"):
        ap.error(f"role {spec.role!r}: expected send or recv")
    if (spec.mode == "rdma") != rdma:
        ap.error(f"mode {spec.mode!r}: {prog} runs " + ("rdma only" if rdma else "tcp modes"))
    return spec


def main(argv: list[str] | None = None) -> int:
    return run(parse_spec(argv, "python -m dataplane.transport.tcp", rdma=False))


if __name__ == "__main__":
    sys.exit(main())
