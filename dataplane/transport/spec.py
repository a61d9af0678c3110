"""What one transport end is (TransportSpec) and how its process is told so: the command line
of `python -m dataplane.transport.tcp` and `python -m dataplane.transport.rdma.process`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dataplane._native import lib

MODES = {"copy": lib.DP_TM_COPY, "zerocopy": lib.DP_TM_ZEROCOPY, "send_zc": lib.DP_TM_SEND_ZC}
EXIT_SETUP_FAILED = 2       # a transport process's exit code when set-up failed: not restarted


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
    key_file: str = ""         # the link's pre-shared key (dataplane/transport/auth.py)
    insecure: bool = False     # no key_file: run without authentication (config says so)

    def load_key(self) -> bytes | None:
        """The key this end authenticates with; None when insecure.  KeyFileError (a
        ValueError) when the file is unsafe, or when neither a key nor insecure is set."""
        from dataplane.transport.auth import KeyFileError, load_key

        if self.insecure:
            return None
        if not self.key_file:
            raise KeyFileError(f"transport {self.name}: no key_file and not insecure")
        return load_key(Path(self.key_file))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TransportSpec:
        return cls(**json.loads(text))


def parse_spec(argv: list[str] | None, prog: str, rdma: bool, stop: str = "") -> TransportSpec:
    """The command line of a transport process (dataplane.transport.tcp's or
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
