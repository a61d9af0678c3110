"""The TCP transport's process entry: `python -m dataplane.transport.tcp SPEC_JSON` runs one
end (send or recv, per the spec's role) on the files dataplane.transport.process made.

A sender consumes one ring of a local arena (some worker's) and ships its batches to a receiver
in another namespace or host; the receiver writes them into its own arena's ring 0, as packets
of port 0, whose label is the remote's name (so consumers and metrics see a named remote port).
The loops are C (native/transport/); the wire format and the ack/loss rules are in
native/include/dp_transport.h.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from dataplane._native import ffi, lib
from dataplane.shm.control import Control
from dataplane.transport.process import TCP_MODULE
from dataplane.transport.spec import EXIT_SETUP_FAILED, MODES, TransportSpec, parse_spec


def _config(spec: TransportSpec):
    cfg = ffi.new("struct dp_transport_config *")
    # char arrays: each runs up to the field after it (their length may be open in the cdef)
    for field, nxt, value in (("name", "host", spec.name), ("host", "tcp_port", spec.host)):
        room = ffi.offsetof("struct dp_transport_config", nxt) - \
            ffi.offsetof("struct dp_transport_config", field)
        b = value.encode()
        if len(b) >= room:
            raise ValueError(f"transport {field} {value!r} longer than {room - 1} bytes")
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


def main(argv: list[str] | None = None) -> int:
    return run(parse_spec(argv, f"python -m {TCP_MODULE}", rdma=False))


if __name__ == "__main__":
    sys.exit(main())
