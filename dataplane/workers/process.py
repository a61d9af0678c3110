"""One native worker process: `python -m dataplane.workers.process SPEC_JSON`.

The supervisor has already created the arena at spec.arena_path.  This process maps it, pins
itself, fills struct dp_worker_config and hands over to C, which polls until arena->stop is set:
backend "dpdk" builds the EAL argv as a list and runs dp_dpdk_worker_run() (from the extension
dataplane._dpdk, loaded only here); backend "uring" has no EAL and runs dp_uring_worker_run() on
sockets it opens itself (iface / udp_port).
Exit codes: 0 after a clean stop, 2 when set-up failed (arena->error is printed to stderr), 1 on
a bad command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dataplane._native import ffi, lib
from dataplane.config.templates import TRAILER_LEN
from dataplane.workers.spec import PortSpec, StreamSpec, WorkerSpec

EXIT_SETUP_FAILED = 2


def eal_argv(spec: WorkerSpec, prefix: str) -> list[str]:
    """The EAL command line, as a list: no shell ever sees it."""
    if spec.core is not None:
        cores = ["-l", str(spec.core)]
    else:
        # lcore 0 floats over every CPU we may use: two workers on a 2-core box share them
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        cores = ["--lcores", f"0@({cpus})"]
    argv = ["dataplane-worker", *cores, "--file-prefix", prefix, "--no-telemetry",
            "--log-level", spec.log_level]
    if spec.hugepages:
        # unlinked at once: the pages go back when the process exits, however it exits
        argv += ["--huge-dir", spec.huge_dir, "--huge-unlink"]
    else:
        argv += ["--no-huge", "-m", str(spec.eal_memory_mb)]
    pci = [p.pci for p in spec.ports if p.pci]
    if pci:
        for addr in pci:
            argv += ["-a", addr]
    else:
        # vdevs only: arena memory has no physical address, zero copy needs IOVA as VA
        argv += ["--no-pci", "--iova-mode", "va"]
    for p in spec.ports:
        if p.devargs:
            argv += ["--vdev", p.devargs]
    return argv


class DpWorkerConfig:
    """struct dp_worker_config for a spec, with every buffer it points to kept alive."""

    def __init__(self, spec: WorkerSpec, argv: list[str]):
        if len(argv) > lib.DP_EAL_ARGS:
            raise ValueError(f"{len(argv)} EAL arguments, at most {lib.DP_EAL_ARGS}")
        if not 1 <= len(spec.ports) <= lib.DP_MAX_PORTS:
            raise ValueError(f"{len(spec.ports)} ports, need 1..{lib.DP_MAX_PORTS}")
        self.cfg = ffi.new("struct dp_worker_config *")
        # the C side keeps char* into these for its whole run: they live as long as self
        self._args = [ffi.new("char[]", a.encode()) for a in argv]
        self._keep: list[list[np.ndarray]] = []   # captures the generator replays, likewise
        c = self.cfg
        c.worker_id = spec.worker_id
        c.n_ports = len(spec.ports)
        for i, p in enumerate(spec.ports):
            self._port(c.port[i], p)
        c.burst = spec.burst
        c.n_mbufs = spec.n_mbufs
        c.zero_copy = int(spec.zero_copy)
        c.idle_sleep_us = spec.idle_sleep_us
        c.copybreak = spec.copybreak
        c.eal_argc = len(argv)
        for i, a in enumerate(self._args):
            c.eal_argv[i] = a
        if spec.gen is not None:
            self._gen(spec)

    @staticmethod
    def _port(pc, p: PortSpec) -> None:
        name = p.name.encode()
        if len(name) >= lib.DP_NAME_LEN:
            raise ValueError(f"port name {p.name!r} longer than {lib.DP_NAME_LEN - 1} bytes")
        pc.name = name
        pc.n_rxq, pc.n_txq, pc.rxd, pc.txd = p.rxq, p.txq, p.rxd, p.txd
        iface = p.iface.encode()
        if len(iface) >= 16:      # IFNAMSIZ; the C field has room for more
            raise ValueError(f"interface name {p.iface!r} longer than 15 bytes")
        pc.iface = iface
        pc.udp_port = p.udp_port

    def _gen(self, spec: WorkerSpec) -> None:
        g, s = self.cfg.gen, spec.gen
        assert s is not None
        streams = s.streams()
        if not 1 <= len(streams) <= lib.DP_GEN_MAX_STREAMS:
            raise ValueError(f"{len(streams)} generator streams, need 1..{lib.DP_GEN_MAX_STREAMS}")
        g.enabled = 1
        g.port, g.queue, g.burst, g.n_streams = s.port, s.queue, s.burst, len(streams)
        for i, st in enumerate(streams):
            self._stream(g.s[i], st)

    def _stream(self, c, s: StreamSpec) -> None:
        """One struct dp_gen_stream_config; the C side checks the rest (dp_gen_prepare)."""
        if s.pcap:
            self._pcap(c, s)
            return
        tmpl = bytes.fromhex(s.template)
        if not 0 < len(tmpl) <= lib.DP_TMPL_MAX:
            raise ValueError(f"generator template of {len(tmpl)} bytes, need 1..{lib.DP_TMPL_MAX}")
        if len(s.sizes) > lib.DP_GEN_MAX_SIZES:
            raise ValueError(f"a cycle of {len(s.sizes)} sizes, at most {lib.DP_GEN_MAX_SIZES}")
        c.stream, c.rate_pps, c.count = s.stream, s.rate_pps, s.count
        c.vary_off, c.vary_min, c.vary_max, c.csum = s.vary_off, s.vary_min, s.vary_max, s.csum
        c.tmpl_len = len(tmpl)
        ffi.memmove(c.tmpl, tmpl, len(tmpl))
        c.n_sizes = len(s.sizes)
        for k, n in enumerate(s.sizes):
            c.sizes[k] = n


    def _pcap(self, c, s: StreamSpec) -> None:
        """A capture, loaded once: its arrays live as long as self, the C side reads them."""
        from dataplane.config.pcap import load
        cap = load(s.pcap, lib.DP_TMPL_MAX)
        trail = cap.trailable() if s.trailer else np.zeros(len(cap), np.uint8)
        gaps = cap.gaps_ns(s.speed) if s.speed else np.zeros(len(cap), np.uint64)
        keep = [np.frombuffer(cap.data, np.uint8), np.ascontiguousarray(cap.off, np.uint32),
                np.ascontiguousarray(cap.lens, np.uint16), gaps, trail]
        self._keep.append(keep)
        c.stream, c.rate_pps = s.stream, 0 if s.speed else s.rate_pps
        c.count = len(cap) * s.loops
        c.n_frames, c.pace_capture = len(cap), int(s.speed > 0)
        c.frame_max = int((cap.lens.astype(np.int64) + trail * TRAILER_LEN).max())
        c.frames, c.frame_off, c.frame_len, c.gap_ns, c.trail = (
            ffi.cast(t, ffi.from_buffer(a)) for t, a in zip(
                ("uint8_t *", "uint32_t *", "uint16_t *", "uint64_t *", "uint8_t *"), keep,
                strict=True))
        c.tmpl[12:14] = list(cap.data[12:14])   # the ethertype the io_uring worker binds with


def dpdk_entry(spec: WorkerSpec) -> Callable[..., int] | None:
    """dp_dpdk_worker_run, from the extension dataplane._dpdk: imported here, in the worker
    process, because importing it loads libdpdk.  None (and why, on stderr) when it is absent."""
    # RTLD_GLOBAL: the PMDs that rte_eal_init loads later bind the EAL's interrupt-callback
    # registration to the extension's guard (native/dpdk/intr_guard.c), which keeps a PMD's
    # control path (memif unmapping its regions when the peer leaves) out of the bursts.
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from dataplane import _dpdk
    except ImportError as e:
        print(f"worker {spec.name}: backend dpdk, but the DPDK worker cannot be loaded ({e}): "
              "this install was built without libdpdk or with DATAPLANE_DPDK=0", file=sys.stderr)
        return None
    finally:
        sys.setdlopenflags(flags)
    return _dpdk.lib.dp_dpdk_worker_run


def run(spec: WorkerSpec) -> int:
    """Map the arena, run the C worker until stopped; the exit code of the process."""
    length = ffi.new("uint64_t *")
    base = lib.dp_arena_map(spec.arena_path.encode(), length)
    if base == ffi.NULL:
        err = ffi.errno
        print(f"worker {spec.name}: cannot map arena {spec.arena_path}: {os.strerror(err)}",
              file=sys.stderr)
        return EXIT_SETUP_FAILED
    arena = ffi.cast("struct dp_arena *", base)
    if arena.magic != lib.DP_MAGIC or arena.version != lib.DP_LAYOUT_VERSION:
        print(f"worker {spec.name}: {spec.arena_path} is not a version "
              f"{lib.DP_LAYOUT_VERSION} arena", file=sys.stderr)
        return EXIT_SETUP_FAILED
    if spec.core is not None:
        os.sched_setaffinity(0, {spec.core})
    uring = spec.backend == "uring"
    prefix = f"dp-{spec.name}-{os.getpid()}"
    # the io_uring worker has no EAL: its argv is a placeholder nobody parses
    cfg = DpWorkerConfig(spec, ["dataplane-worker"] if uring else eal_argv(spec, prefix))
    entry = lib.dp_uring_worker_run if uring else dpdk_entry(spec)
    if entry is None:
        return EXIT_SETUP_FAILED

    def on_signal(signum: int, frame: object) -> None:
        arena.stop = 1

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The C loop runs in a thread (cffi drops the GIL for the call) so that this main thread
    # stays free to run the Python signal handlers, which only ever run in the main thread.
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(entry(base, cfg.cfg)),
                         name=f"{spec.backend}-worker")
    t.start()
    while t.is_alive():
        t.join(0.2)
    if not uring:   # EAL leaves its runtime directory behind; the prefix is ours alone
        shutil.rmtree(Path("/var/run/dpdk") / prefix, ignore_errors=True)
    if not result or result[0] != 0:
        msg = ffi.string(arena.error).decode(errors="replace")
        print(f"worker {spec.name}: set-up failed: {msg}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dataplane.workers.process",
        description="Run one poll-mode worker (DPDK or io_uring) on an arena the supervisor "
                    "created. "
                    "SIGTERM/SIGINT (or arena->stop) stop it cleanly. Exit 0 after a clean "
                    "stop, 2 when set-up failed (the reason is printed and left in the arena).")
    ap.add_argument("spec_json",
                    help="a WorkerSpec as JSON (dataplane.workers.spec.WorkerSpec.to_json)")
    args = ap.parse_args(argv)
    try:
        spec = WorkerSpec.from_json(args.spec_json)
    except (ValueError, TypeError, KeyError) as e:
        ap.error(f"bad worker spec: {e}")
    if not spec.arena_path:
        ap.error("the spec has no arena_path: the supervisor creates the arena first")
    return run(spec)


if __name__ == "__main__":
    code = main()
    # EAL's threads (interrupts, IPC) are still running and are never joined: leave without
    # interpreter teardown or library destructors pulling memory from under them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
