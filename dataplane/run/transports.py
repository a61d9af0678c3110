"""A run's [[transport]] tables as processes: what each end ships or receives, where its files
are, and its key, checked before the run makes any file."""

from __future__ import annotations

from dataplane import config
from dataplane.shm.control import control_path
from dataplane.transport.process import TransportProcess
from dataplane.transport.spec import TransportSpec
from dataplane.workers.spec import WorkerSpec


def processes(cfg: config.Config, specs: list[WorkerSpec]) -> list[TransportProcess]:
    """[[transport]] tables as processes: a sender ships the first ring of a worker's port; a
    receiver owns a one-ring arena whose port carries the remote's label.  RuntimeError when a
    key is unusable: the run is refused before any file is made."""
    out: list[TransportSpec] = []
    by_name = {s.name: s for s in specs}
    for x in cfg.transports:
        ctl = control_path(x.name)
        spec = TransportSpec(name=x.name, role=x.role, control_path=ctl,
                             arena_path=ctl.removesuffix(".ctl"), host=x.host,
                             tcp_port=x.tcp_port, mode=x.mode, netns=x.netns,
                             label=x.label, device=x.device, key_file=x.key_file,
                             insecure=x.insecure)
        if x.role == "send":
            w = by_name[x.worker]
            port = [p.label or p.name for p in w.ports].index(x.port)
            spec.arena_path = w.arena_path
            spec.ring = w.rings().index((port, 0))
        out.append(spec)
    for spec in out:
        try:
            spec.load_key()
        except ValueError as e:
            raise RuntimeError(f"transport {spec.name}: {e}") from None
    return [TransportProcess(spec, cfg.arena.ring_size, cfg.arena.slot_size) for spec in out]
