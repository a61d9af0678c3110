"""The [[transport]] tables of a config: which ring is shipped where, and who listens.

    [[transport]]
    name = "to-collector"
    role = "send"
    from = "rx.in"                 # WORKER.PORT: that port's first ring is shipped (its only
                                   # consumer is then the sender, not the local consumers)
    peer = "10.77.0.1:7100"
    mode = "zerocopy"              # copy | zerocopy (MSG_ZEROCOPY) | send_zc (io_uring)
    netns = "dp-rx"                # where the sender runs (it must reach peer)
    key_file = "/etc/dataplane/collector.key"   # `dataplane transport keygen FILE`, 0600

    [[transport]]
    name = "collector"
    role = "recv"
    listen = "10.77.0.1:7100"
    label = "from-rx"              # the port name its packets carry in metrics
    netns = "dp-gen"
    key_file = "/etc/dataplane/collector.key"   # the same key on both ends

Both ends of a link hold the same key: each proves it to the other before anything else crosses
the connection (dataplane/transport/auth.py).  `insecure = true` instead of a key runs without
authentication (anyone who reaches the port may then send or receive): status and the metrics
say so.

The same over RDMA (RC queue pairs, dataplane/transport/rdma/receiver.py): `kind = "rdma"` on both
ends, the RDMA device that reaches the peer, no `mode` (the NIC writes into the receiver's slots):

    [[transport]]
    name = "to-collector"
    kind = "rdma"
    role = "send"
    from = "rx.in"
    peer = "10.9.9.1:18515"        # the receiver's IPv4 on the RDMA device, and its TCP port
    device = "rxe0"                # for the QP set-up exchange and the credits
    key_file = "/etc/dataplane/collector.key"
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass
class TransportCfg:
    name: str
    role: str                       # "send" | "recv"
    host: str                       # send: peer address; recv: listen address
    tcp_port: int
    mode: str = "zerocopy"
    worker: str = ""                # send: the worker whose ring is shipped
    port: str = ""                  # send: that worker's port (by name)
    netns: str | None = None
    label: str = ""
    kind: str = "tcp"               # "tcp" | "rdma"
    device: str = ""                # rdma: the RDMA device
    key_file: str = ""              # the link's pre-shared key (dataplane/transport/auth.py)
    insecure: bool = False          # no key: no authentication, said so in status and metrics


def _addr(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return 'expected IPv4:PORT like "10.77.0.1:7100" (the transport speaks IPv4)'
    return None if sep and port.isdigit() and 1 <= int(port) <= 65535 else \
        'expected IPv4:PORT like "10.77.0.1:7100"'


def _key_path(v: str) -> str | None:
    return None if v.startswith("/") else \
        'expected an absolute path, e.g. "/etc/dataplane/collector.key"'


def parse(t) -> TransportCfg:
    """One [[transport]] table (a dataplane.config.tables.Table)."""
    from dataplane.config.tables import checks

    name = t.get("name", str, check=checks.label)
    role = t.get("role", str, choices=("send", "recv"))
    netns = t.get("netns", str, None, check=checks.name)
    kind = t.get("kind", str, "tcp", choices=("tcp", "rdma"))
    if kind == "rdma":
        device = t.get("device", str, "rxe0", check=checks.name)
        t.refuse("mode", 'only with kind = "tcp" (RDMA writes need no send mode)')
    else:
        device = ""
        t.refuse("device", 'only with kind = "rdma"')
    if role == "send":
        src = t.get("from", str, check=lambda v: None if v.count(".") == 1 else
                    'expected WORKER.PORT, e.g. "rx.in"')
        addr = t.get("peer", str, check=_addr)
        mode = "rdma" if kind == "rdma" else \
            t.get("mode", str, "zerocopy", choices=("copy", "zerocopy", "send_zc"))
        t.refuse("listen", 'only with role = "recv"')
        t.refuse("label", 'only with role = "recv"')
        worker, _, port = (src or ".").partition(".")
        cfg = TransportCfg(name, role, "", 0, mode, worker, port, netns)
    else:
        addr = t.get("listen", str, check=_addr)
        label = t.get("label", str, name, check=checks.label)
        for k in ("from", "peer") + (("mode",) if kind != "rdma" else ()):
            t.refuse(k, 'only with role = "send"')
        cfg = TransportCfg(name or "", role or "recv", "", 0, mode="rdma" if kind == "rdma"
                           else "zerocopy", netns=netns, label=label or "")
    cfg.kind, cfg.device = kind or "tcp", device or ""
    cfg.key_file = t.get("key_file", str, "", check=_key_path)
    cfg.insecure = t.get("insecure", bool, False)
    if cfg.key_file and cfg.insecure:
        t.refuse("insecure", "not with key_file (a keyed transport authenticates its peer)")
    elif not cfg.key_file and not cfg.insecure and name:
        t.error("key_file", None, "missing: every transport authenticates its peer with a "
                "pre-shared key (make one with `dataplane transport keygen FILE`, the same file "
                "on both ends), or says `insecure = true` to let anyone who reaches it connect")
    if addr and not _addr(addr):
        host, _, port = addr.rpartition(":")
        cfg.host, cfg.tcp_port = host, int(port)
    t.close()
    return cfg


def cross_check(transports: list[TransportCfg], workers, p) -> None:
    """A sender's `from` names a worker and one of its ports; names are unique."""
    names = [x.name for x in transports]
    for dup in {n for n in names if names.count(n) > 1}:
        p.error(f'transport name "{dup}" is used twice')
    for i, x in enumerate(transports):
        if x.role != "send" or not x.worker:
            continue
        w = next((w for w in workers if w.name == x.worker), None)
        if w is None:
            p.error(f'transport[{i}].from = "{x.worker}.{x.port}": no worker "{x.worker}" '
                    f"(workers: {', '.join(w.name for w in workers)})")
        elif x.port not in [pt.name for pt in w.ports]:
            p.error(f'transport[{i}].from = "{x.worker}.{x.port}": worker "{x.worker}" has no '
                    f"port \"{x.port}\" (ports: {', '.join(pt.name for pt in w.ports)})")
