"""A worker's packet arena (native/include/dp_layout.h) from Python: create or map the file,
check its header, reach its rings (dataplane/shm/ring.py) and counters (dtypes: layout.py).

Nothing in an existing file is trusted: it is opened without following a link, must be a
regular file of the running user (or root) that nobody else may read or write, and every offset
of its header must be the one C computes for the header's geometry (which ends at the file's
size) before any view past the header is made."""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataplane._native import ffi, lib
from dataplane.host.files import open_private
from dataplane.host.hugepages import free_hugepages_2m, hugetlbfs_mounts
from dataplane.shm.layout import (
    DESC_DTYPE,
    U64,
    WORKER_STATES,
    LayoutError,
    check_layout,
    u64_words,
)
from dataplane.shm.ring import RingReader


@dataclass(frozen=True)
class ArenaGeometry:
    n_ports: int
    rings: tuple[tuple[int, int], ...]   # (port, queue) per ring, in ring order
    ring_size: int = 4096
    slot_size: int = 2048
    pool_bytes: int = 64 << 20


def choose_backing(name: str, size: int, prefer_huge: bool = True) -> Path:
    """hugetlbfs when a mount exists and has enough free 2 MB pages, else /dev/shm."""
    if prefer_huge:
        mounts = [m for m in hugetlbfs_mounts() if os.access(m, os.W_OK)]
        # hugetlbfs reports its page size as the block size
        if mounts and free_hugepages_2m() * os.statvfs(mounts[0]).f_bsize >= size:
            return mounts[0] / name
    return Path("/dev/shm") / name


class Arena:
    """One worker's arena file, mapped.  Create with Arena.create(), map with Arena.open()."""

    def __init__(self, path: Path, mm: mmap.mmap, owner: bool):
        self.path = path
        self._mm = mm
        self.owner = owner
        self.buf = np.frombuffer(mm, dtype=np.uint8)
        self._hdr = ffi.cast("struct dp_arena *", ffi.from_buffer(mm))
        self._verify()
        h = self._hdr
        self.n_rings = h.n_rings
        self.n_ports = h.n_ports
        self.ring_size = h.ring_size
        self.rings = [RingReader(self, i) for i in range(self.n_rings)]
        port_off = ffi.offsetof("struct dp_arena", "port")
        self.port_counters = np.ndarray((lib.DP_MAX_PORTS, u64_words("struct dp_port_counters")),
                                        dtype=U64, buffer=mm, offset=port_off)
        # one row per ring, URING_COUNTERS first: zero unless the worker is an io_uring one
        self.uring_counters = np.ndarray(
            (lib.DP_MAX_RINGS, u64_words("struct dp_uring_counters")), dtype=U64, buffer=mm,
            offset=ffi.offsetof("struct dp_arena", "uring"))
        # one row per generator stream, GEN_STREAM_FIELDS: rate_pps is Python's to write
        self.gen_streams = np.ndarray(
            (lib.DP_GEN_MAX_STREAMS, u64_words("struct dp_gen_stream_ctl")), dtype=U64,
            buffer=mm, offset=ffi.offsetof("struct dp_arena", "gen"))

    @staticmethod
    def layout(geo: ArenaGeometry):
        """The header (offsets, sizes) C computes for this geometry: struct dp_arena *."""
        layout = ffi.new("struct dp_arena *")
        if lib.dp_arena_layout(layout, geo.n_ports, len(geo.rings), geo.ring_size,
                               geo.slot_size, geo.pool_bytes) != 0:
            raise ValueError(f"arena geometry rejected: {geo} (ring_size must be a power of two, "
                             f"slot_size a multiple of 64, at most {lib.DP_MAX_RINGS} rings and "
                             f"{lib.DP_MAX_PORTS} ports)")
        return layout

    @classmethod
    def create(cls, path: Path, geo: ArenaGeometry) -> Arena:
        check_layout()
        layout = cls.layout(geo)
        size = layout.arena_size
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)   # umask cannot widen it, but be explicit
            # the backing file's page: hugetlbfs reports its huge page as the block size,
            # tmpfs the base page
            layout.page_size = max(os.fstatvfs(fd).f_bsize, mmap.PAGESIZE)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        ports = ffi.new("uint16_t[]", [p for p, _ in geo.rings] or [0])
        queues = ffi.new("uint16_t[]", [q for _, q in geo.rings] or [0])
        lib.dp_arena_format(ffi.from_buffer(mm), layout, ports, queues)
        return cls(path, mm, owner=True)

    @classmethod
    def open(cls, path: Path) -> Arena:
        check_layout()
        path = Path(path)
        fd = open_private(path, os.O_RDWR)   # no link, ours or root's, nobody else may write
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise LayoutError(f"{path}: mode {stat.S_IMODE(st.st_mode):o} lets other users in; "
                                  "arenas are created 0600")
            if st.st_size < ffi.sizeof("struct dp_arena"):
                raise LayoutError(f"{path}: {st.st_size} bytes, shorter than an arena header "
                                  f"({ffi.sizeof('struct dp_arena')}): truncated or not an arena")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mm, owner=False)

    def _verify(self) -> None:
        h = self._hdr
        if len(self._mm) < ffi.sizeof("struct dp_arena") or h.magic != lib.DP_MAGIC:
            raise LayoutError(f"{self.path}: not a dataplane arena (bad magic)")
        if h.version != lib.DP_LAYOUT_VERSION:
            raise LayoutError(f"{self.path}: layout version {h.version}, this build reads "
                              f"{lib.DP_LAYOUT_VERSION}; stop the old workers and remove the file")
        if h.header_size != ffi.sizeof("struct dp_arena") or h.desc_size != DESC_DTYPE.itemsize:
            raise LayoutError(f"{self.path}: header/descriptor size differ from this build")
        if h.arena_size != len(self._mm):
            raise LayoutError(f"{self.path}: file is {len(self._mm)} bytes, header says "
                              f"{h.arena_size}")
        self._verify_offsets()

    def _verify_offsets(self) -> None:
        """Every offset of the header is the one C computes for its geometry (so, with
        arena_size equal to the file's size, each region lies inside the file), and each ring's
        header agrees: checked before any view of rings, slots or the pool is made."""
        h = self._hdr
        want = ffi.new("struct dp_arena *")
        # Python's ints do not wrap: a geometry whose slots alone pass the file's end is refused
        # before C's u64 arithmetic could wrap it into plausible offsets
        too_big = h.n_rings * h.ring_size * h.slot_size > len(self._mm)
        if too_big or lib.dp_arena_layout(want, h.n_ports, h.n_rings, h.ring_size, h.slot_size,
                                          h.pool_len) != 0:
            raise LayoutError(f"{self.path}: impossible geometry in the header ({h.n_ports} "
                              f"ports, {h.n_rings} rings of {h.ring_size}, slots of "
                              f"{h.slot_size} bytes)")
        for name in ("rings_off", "ring_stride", "slots_off", "pool_off", "pool_len",
                     "arena_size"):
            got, exp = getattr(h, name), getattr(want, name)
            if got != exp:
                raise LayoutError(f"{self.path}: header {name} is {got}, its geometry gives "
                                  f"{exp} (file of {len(self._mm)} bytes)")
        for i in range(h.n_rings):
            r = lib.dp_arena_ring(ffi.cast("void *", h), i)
            slots = h.slots_off + i * h.ring_size * h.slot_size
            if r.size != h.ring_size or r.mask != h.ring_size - 1 or r.slots_off != slots \
                    or r.port >= h.n_ports:
                raise LayoutError(f"{self.path}: ring {i} header (size {r.size}, mask {r.mask}, "
                                  f"slots at {r.slots_off}, port {r.port}) is not the arena's "
                                  f"(size {h.ring_size}, slots at {slots}, {h.n_ports} ports)")

    # -- worker control, read at any time without locks --
    @property
    def header(self):
        return self._hdr

    @property
    def mapping(self) -> mmap.mmap:
        """The whole file, mapped (for numpy views and memory registration)."""
        return self._mm

    def worker_state(self) -> str:
        return WORKER_STATES.get(self._hdr.state, f"unknown({self._hdr.state})")

    def worker_error(self) -> str:
        return ffi.string(self._hdr.error).decode(errors="replace")

    def ring_faults(self) -> list[str]:
        """Rings whose shared indices no worker and consumer could have left (cons ahead of
        prod, or prod more than the ring ahead of cons), one line each; [] when none.  A worker
        stopped on such a ring would stop again at once if restarted."""
        out = []
        for ring in self.rings:
            r = ring.shared
            prod, cons = r.prod, r.cons
            if cons > prod:
                out.append(f"ring {ring.index}: consumer index {cons} ahead of producer {prod}")
            elif prod - cons > ring.size:
                out.append(f"ring {ring.index}: consumer index {cons} more than the ring's "
                           f"{ring.size} behind producer {prod}")
        return out

    def request_stop(self) -> None:
        self._hdr.stop = 1

    def frame(self, addr: int, length: int) -> memoryview:
        """The bytes of one frame, in place (for decoding samples, not for the data path)."""
        return memoryview(self._mm)[addr:addr + length]

    def close(self) -> None:
        self.rings = []
        self.buf = None  # type: ignore[assignment]
        self._hdr = None
        try:
            self._mm.close()
        except BufferError:
            pass   # a consumer still holds a view; the mapping goes when it does

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
