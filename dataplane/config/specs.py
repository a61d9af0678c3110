"""A checked Config becomes the specs of the processes to start: plan() is the only place that
turns a config into WorkerSpecs (dataplane.workers.spec), and the only place that looks at the
host for it (hugetlbfs mounts, free hugepages); it only looks, it never changes the host's
hugepage reservation.  describe() is the plan as `dataplane config show` prints it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from dataplane.config import templates as template
from dataplane.config.loader import Config
from dataplane.config.streams import Stream
from dataplane.config.tables import ConfigError
from dataplane.config.workers import RUN_DIR, Port, WorkerTable
from dataplane.host.files import private_dir
from dataplane.host.hugepages import free_hugepages_2m, hugetlbfs_mounts
from dataplane.workers.spec import GenSpec, PortSpec, StreamSpec, WorkerSpec

log = logging.getLogger(__name__)


def ensure_run_dir(path: Path = RUN_DIR) -> Path:
    """Create the run directory 0700 (memif sockets and the run locks live there; no other user
    may connect or plant a file); an existing one must be root's own, not a link."""
    private_dir(path, "the run directory")
    os.chmod(path, 0o700)
    return path


def arena_filename(worker: str) -> str:
    """The arena's file name, in the hugetlbfs mount or /dev/shm (status looks in both).
    "dataplane-": a transport's files are "dataplane.transport.NAME" (shm/control.py), and a
    name has no dot (checks.label), so a worker and a transport never share a file."""
    return f"dataplane-{worker}"


def plan(cfg: Config) -> list[WorkerSpec]:
    """What each worker does: the one place a config becomes WorkerSpecs."""
    specs = []
    # vdev numbers count across all workers, so no two ports anywhere share an ethdev name
    # (each worker is its own EAL process; unique names keep logs and metrics unambiguous too).
    seen: dict[str, int] = {}
    for wid, w in enumerate(cfg.workers):
        ports: list[PortSpec] = []
        uring = w.backend == "uring"
        for pt in w.ports:
            n = seen[pt.driver] = seen.get(pt.driver, -1) + 1
            ports.append(_uring_port_spec(pt) if uring else _port_spec(pt, n))
        a = cfg.arena
        specs.append(WorkerSpec(
            name=w.name, worker_id=wid, backend=w.backend, backend_reason=w.backend_reason,
            core=w.core, netns=w.netns, ring_size=a.ring_size, slot_size=a.slot_size,
            # io_uring writes into the ring slots: no mbuf pool in its arena
            pool_mb=0 if uring else a.pool_mb, n_mbufs=a.mbufs, burst=w.burst,
            zero_copy=w.zero_copy, copybreak=w.copybreak, idle_sleep_us=w.idle_sleep_us,
            ports=ports,
            gen=_gen_spec(w, wid)))
    huge_dir = _huge_dir(cfg, specs)
    for s in specs:
        s.hugepages, s.huge_dir = bool(huge_dir), huge_dir
        s.arena_path = str(Path(huge_dir or "/dev/shm") / arena_filename(s.name))
    _check_shm_room(cfg, [] if huge_dir else specs)
    return specs


def _check_shm_room(cfg: Config, shm_specs: list[WorkerSpec], shm: str = "/dev/shm") -> None:
    """Refuse arenas that /dev/shm cannot hold: the workers' (when not on hugepages) and every
    transport receiver's.  The bound is the smaller of what the tmpfs has free (a worker that
    touches a page beyond it dies of SIGBUS mid-run) and half the RAM (tmpfs's default size:
    the kernel, the consumers and the page cache need the rest; arena pages are never
    reclaimed while a run maps them)."""
    from dataplane.shm.arena import Arena, ArenaGeometry
    from dataplane.shm.control import control_path
    a = cfg.arena
    need = {s.name: _arena_bytes(s) for s in shm_specs}
    recv = Arena.layout(ArenaGeometry(1, ((0, 0),), a.ring_size, a.slot_size, 0)).arena_size
    need.update({x.name: int(recv) for x in cfg.transports if x.role == "recv"})
    st = os.statvfs(shm)
    # the files of this config that are there already (a run of it, or one that crashed) are
    # replaced, so their room counts as free
    paths = [s.arena_path for s in shm_specs] + [control_path(x.name).removesuffix(".ctl")
                                                 for x in cfg.transports if x.role == "recv"]
    free = st.f_bavail * st.f_frsize + sum(os.stat(f).st_blocks * 512 for f in paths
                                           if os.path.exists(f))
    half_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    limit = min(free, half_ram)
    total = sum(need.values())
    if total > limit:
        each = ", ".join(f"{n} {b >> 20} MiB" for n, b in need.items())
        why = (f"{shm} has {free >> 20} MiB free" if free <= half_ram else
               f"half of this machine's RAM is {half_ram >> 20} MiB")
        raise ConfigError(cfg.source, [
            f"arena.ring_size = {a.ring_size}, arena.slot_size = {a.slot_size}, arena.pool_mb = "
            f"{a.pool_mb}: the arenas in {shm} need {total >> 20} MiB ({each}), at most "
            f"{limit >> 20} MiB: {why}; lower them, or put the workers' arenas on hugepages"])


def _port_spec(pt: Port, n: int) -> PortSpec:
    q = pt.queues
    if pt.driver == "pci":
        return PortSpec(name=pt.pci or "", pci=pt.pci or "", rxq=q, txq=q, label=pt.name)
    # DPDK insists that a vdev's name starts with its driver's name: net_af_packet0, ...
    name = f"net_{pt.driver}{n}"
    args = {
        "af_packet": f"iface={pt.iface},qpairs={q}",
        "af_xdp": f"iface={pt.iface},start_queue=0,queue_count={q}",
        # socket-abstract=no: a file in a 0700 directory, not an abstract socket anyone may use
        "memif": f"role={pt.role},socket={pt.socket},socket-abstract=no,id={pt.id}",
    }[pt.driver]
    return PortSpec(name=name, devargs=f"{name},{args}", rxq=q, txq=q, label=pt.name)


def _uring_port_spec(pt: Port) -> PortSpec:
    """A port the io_uring worker opens itself: an AF_PACKET socket per queue, or UDP ones."""
    q = pt.queues
    return PortSpec(name=pt.name, iface=pt.iface or "", udp_port=pt.udp_port or 0, rxq=q, txq=q,
                    label=pt.name)


def _stream_spec(s: Stream, default_id: int, checksum: bool) -> StreamSpec:
    if s.pcap:
        return StreamSpec(stream=s.stream or default_id, rate_pps=s.rate_pps, pcap=s.pcap,
                          speed=s.speed, loops=s.loops, trailer=s.trailer,
                          max_frame=s.max_frame)
    t = template.build(src_mac=s.src_mac, dst_mac=s.dst_mac, src=s.src, dst=s.dst,
                       proto=s.proto, sport=s.sport, dport=s.dport, size=s.size,
                       vlan=tuple(s.vlan), vary=s.vary)
    lo, hi = s.vary_range if s.vary != "none" else (0, 0)
    # one size: every frame is the template; a cycle: the C side cuts the template per frame
    sizes = list(s.sizes) if len(set(s.sizes)) > 1 else []
    return StreamSpec(stream=s.stream or default_id, rate_pps=s.rate_pps, count=s.count,
                      template=t.frame.hex(), vary_off=t.vary_off, vary_min=lo, vary_max=hi,
                      csum=1 if checksum else 0, sizes=sizes)


def _gen_spec(w: WorkerTable, wid: int) -> GenSpec | None:
    g = w.generate
    if g is None:
        return None
    first, *more = [_stream_spec(s, wid + 1, g.checksum) for s in g.streams]
    return GenSpec(port=[p.name for p in w.ports].index(g.port), burst=g.burst,
                   more=more, **asdict(first))


def _arena_bytes(s: WorkerSpec) -> int:
    from dataplane.shm.arena import Arena
    try:
        return int(Arena.layout(s.geometry()).arena_size)
    except ValueError as e:
        raise ConfigError("<plan>", [f'worker "{s.name}": {e}']) from None


def _huge_dir(cfg: Config, specs: list[WorkerSpec]) -> str:
    """The hugetlbfs directory the arenas go in, or "" for /dev/shm.  Looks, never reserves."""
    mode = cfg.arena.hugepages
    if mode == "no":
        return ""
    need = sum(-(-_arena_bytes(s) // (2 << 20)) for s in specs)     # 2 MB pages, rounded up
    mounts = [m for m in hugetlbfs_mounts() if os.access(m, os.W_OK)]
    free = free_hugepages_2m()
    if mounts and free >= need:
        return str(mounts[0])
    why = (f"free 2 MB hugepages: {free}, the arenas need {need}" if mounts else
           "no writable hugetlbfs mount with 2 MB pages")
    if mode == "yes":
        raise ConfigError(cfg.source, [
            f'arena.hugepages = "yes": {why}; reserve pages (echo N > /sys/kernel/mm/hugepages/'
            'hugepages-2048kB/nr_hugepages), mount hugetlbfs (mount -t hugetlbfs none '
            '/dev/hugepages), or set hugepages = "auto"'])
    log.info("arena.hugepages = auto: using /dev/shm (%s)", why)
    return ""


def describe(specs: list[WorkerSpec]) -> list[str]:
    """The plan in words: per worker its core, backend, arena, ports (devargs) and generator."""
    out = []
    for s in specs:
        poll = f"adaptive, idle_sleep_us {s.idle_sleep_us}" if s.idle_sleep_us else "busy"
        out.append(f"worker {s.worker_id} {s.name}: core {s.core}, netns {s.netns or '-'}, "
                   f"poll {poll}, zero_copy {s.zero_copy}")
        out.append(f"  backend {s.backend}" + (f" ({s.backend_reason})" if s.backend_reason
                                               else ""))
        out.append(f"  arena {s.arena_path} (hugepages {'yes' if s.hugepages else 'no'}): rings "
                   f"{len(s.rings())} x {s.ring_size}, slots {s.slot_size} B, pool {s.pool_mb} "
                   f"MB, {s.n_mbufs} mbufs")
        for i, p in enumerate(s.ports):
            dev = (f"--vdev {p.devargs}" if p.devargs else f"-a {p.pci}" if p.pci else
                   f"udp port {p.udp_port}" if p.udp_port else f"AF_PACKET on {p.iface}")
            out.append(f"  port {i} {p.label}: {p.name}  {dev}  rxq {p.rxq} txq {p.txq}")
        if s.gen:
            out.append(f"  generate on port {s.gen.port}: burst {s.gen.burst}")
            out += [f"    {_describe_stream(st)}" for st in s.gen.streams()]
    return out


def _describe_stream(g: StreamSpec) -> str:
    if g.pcap:
        pace = f"{g.speed:g}x its own pace" if g.speed else f"{g.rate_pps or 'max'} pps"
        return (f"stream {g.stream}: replay {g.pcap}, {pace}, {g.loops or 'unlimited'} times, "
                + ("trailer on its UDP/TCP frames" if g.trailer else
                   "no trailer: sequence tracking off"))
    vary = (f", vary u16 at byte {g.vary_off} over {g.vary_min}..{g.vary_max}"
            if g.vary_off else "")
    size = (f"{len(bytes.fromhex(g.template))} B frames" if not g.sizes else
            f"sizes {_cycle_words(g.sizes)} (cycle of {len(g.sizes)})")
    return (f"stream {g.stream}: {g.rate_pps or 'max'} pps, {size}, count "
            f"{g.count or 'unlimited'}{vary}")


def _cycle_words(sizes: list[int]) -> str:
    """7x64 4x570 1x1518: how often each size comes in one cycle."""
    return " ".join(f"{sizes.count(n)}x{n}" for n in sorted(set(sizes)))
