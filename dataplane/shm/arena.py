"""The packet arena from Python: create, map, check the layout, read rings as numpy batches.

The layout is defined once, in native/dp_layout.h.  The numpy dtypes below are Python's own
view of it; `check_layout()` compares them with sizeof/offsetof of the compiled structs on every
map, so a header change without a matching change here fails loudly instead of misreading.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataplane._native import ffi, lib

DESC_DTYPE = np.dtype({
    "names": ["addr", "rx_ns", "hash", "len", "flags", "ethertype", "port", "queue", "l4proto",
              "l4_off"],
    "formats": ["<u8", "<u8", "<u4", "<u2", "<u2", "<u2", "<u2", "u1", "u1", "<u2"],
    "offsets": [0, 8, 16, 20, 22, 24, 26, 28, 29, 30],
    "itemsize": 32,
})

RING_COUNTERS = ("rx_packets", "rx_bytes", "ring_full_drops", "malformed", "truncated", "copied",
                 "bursts")
PORT_COUNTERS = ("tx_packets", "tx_bytes", "tx_drops", "nic_missed", "nic_errors", "rx_nombuf",
                 "gen_seq")
# Per ring, io_uring worker only (layout version 2): struct dp_uring_counters.
URING_COUNTERS = ("cqes", "enobufs", "rearms", "recv_errors")

# Offsets Python relies on, by struct: checked against the compiled layout.
_EXPECTED = {
    "struct dp_desc": ({n: DESC_DTYPE.fields[n][1] for n in DESC_DTYPE.names}, DESC_DTYPE.itemsize),
    "struct dp_ring": ({"prod": 0, "cons": 64, "size": 128, "mask": 132, "port": 136,
                        "queue": 138, "slots_off": 144, "c": 192}, 256),
    "struct dp_ring_counters": ({n: 8 * i for i, n in enumerate(RING_COUNTERS)}, 64),
    "struct dp_port_counters": ({n: 8 * i for i, n in enumerate(PORT_COUNTERS)}, 64),
    "struct dp_uring_counters": ({n: 8 * i for i, n in enumerate(URING_COUNTERS)}, 64),
}

WORKER_STATES = {0: "empty", 1: "starting", 2: "running", 3: "stopped", 4: "failed"}


class LayoutError(RuntimeError):
    """Python's view of the arena does not match the compiled layout, or the file is foreign."""


def check_layout(expected: dict | None = None) -> None:
    """Compare Python's offsets with the compiled structs; raise LayoutError naming the field."""
    for struct, (fields, size) in (expected or _EXPECTED).items():
        real = ffi.sizeof(struct)
        if real != size:
            raise LayoutError(f"{struct}: Python assumes {size} bytes, compiled layout has {real}; "
                              "rebuild (pip install -e .) and update dataplane/shm/arena.py")
        for field, off in fields.items():
            real_off = ffi.offsetof(struct, field)
            if real_off != off:
                raise LayoutError(f"{struct}.{field}: Python assumes offset {off}, compiled "
                                  f"layout has {real_off}; update dataplane/shm/arena.py")


@dataclass(frozen=True)
class ArenaGeometry:
    n_ports: int
    rings: tuple[tuple[int, int], ...]   # (port, queue) per ring, in ring order
    ring_size: int = 4096
    slot_size: int = 2048
    pool_bytes: int = 64 << 20


def hugetlbfs_mounts() -> list[Path]:
    """Mounted hugetlbfs directories with 2 MB pages."""
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        if fstype == "hugetlbfs" and ("pagesize=1G" not in opts and "pagesize=1024M" not in opts):
            out.append(Path(mnt))
    return out


def free_hugepages_2m() -> int:
    p = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    return int(p.read_text()) if p.exists() else 0


def choose_backing(name: str, size: int, prefer_huge: bool = True) -> Path:
    """hugetlbfs when a mount exists and has enough free 2 MB pages, else /dev/shm."""
    if prefer_huge:
        mounts = [m for m in hugetlbfs_mounts() if os.access(m, os.W_OK)]
        if mounts and free_hugepages_2m() * (2 << 20) >= size:
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
        self.port_counters = np.ndarray((lib.DP_MAX_PORTS, 8), dtype="<u8", buffer=mm,
                                        offset=port_off)
        # one row per ring, URING_COUNTERS first: zero unless the worker is an io_uring one
        self.uring_counters = np.ndarray((lib.DP_MAX_RINGS, 8), dtype="<u8", buffer=mm,
                                         offset=ffi.offsetof("struct dp_arena", "uring"))

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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)   # umask cannot widen it, but be explicit
            if path.parent != Path("/dev/shm"):
                layout.page_size = 2 << 20      # hugetlbfs
            else:
                layout.page_size = mmap.PAGESIZE
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
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise LayoutError(f"{path}: mode {stat.S_IMODE(st.st_mode):o} lets other users in; "
                                  "arenas are created 0600")
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

    # -- worker control, read at any time without locks --
    @property
    def header(self):
        return self._hdr

    def worker_state(self) -> str:
        return WORKER_STATES.get(self._hdr.state, f"unknown({self._hdr.state})")

    def worker_error(self) -> str:
        return ffi.string(self._hdr.error).decode(errors="replace")

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


class RingReader:
    """Consumer side of one ring: peek a batch as a numpy view, release it when done.

    peek/release mean what they mean in dp_ring.h; the shared indices are touched once per
    batch, through C, so the acquire/release barriers are the same as in the workers.
    """

    def __init__(self, arena: Arena, index: int):
        self.arena = arena
        self.index = index
        self._ring = lib.dp_arena_ring(ffi.cast("void *", arena._hdr), index)
        h = arena._hdr
        off = h.rings_off + index * h.ring_stride
        self.port = self._ring.port
        self.queue = self._ring.queue
        self.size = self._ring.size
        self.mask = self.size - 1
        desc_off = off + ffi.sizeof("struct dp_ring")
        self.desc = np.ndarray((self.size,), dtype=DESC_DTYPE, buffer=arena._mm, offset=desc_off)
        self.counters = np.ndarray((8,), dtype="<u8", buffer=arena._mm,
                                   offset=off + ffi.offsetof("struct dp_ring", "c"))
        self.cons = self._ring.cons
        self._prod_cache = self.cons

    def peek(self, max_n: int = 1 << 30) -> np.ndarray:
        """Up to max_n ready descriptors, contiguous (a batch never wraps): a view, not a copy."""
        avail = self._prod_cache - self.cons
        if avail == 0:
            self._prod_cache = lib.dp_ring_load_prod(self._ring)
            avail = self._prod_cache - self.cons
        start = self.cons & self.mask
        n = min(avail, self.size - start, max_n)
        return self.desc[start:start + n]

    def release(self, n: int) -> None:
        """Give n descriptors (and their frames) back to the worker."""
        self.cons += n
        lib.dp_ring_store_cons(self._ring, self.cons)

    def batches(self, max_n: int = 1 << 30) -> Iterator[np.ndarray]:
        """Every ready batch, each released after the caller's loop body has run."""
        while True:
            b = self.peek(max_n)
            if len(b) == 0:
                return
            yield b
            self.release(len(b))

    def occupancy(self) -> int:
        return int(lib.dp_ring_load_prod(self._ring) - self._ring.cons)

    def counter(self, name: str) -> int:
        return int(self.counters[RING_COUNTERS.index(name)])
