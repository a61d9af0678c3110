"""A Python producer for real arenas in /dev/shm: the test harness plays the C worker (frame
bytes into the ring's slots, descriptors filled as the C parser would, then prod).  For the
consumer and exporter tests."""

from __future__ import annotations

import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
from dataplane._native import ffi, lib
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from dataplane.shm.arena import Arena, ArenaGeometry

TRAILER = struct.Struct("<QQII")   # struct dp_gen_trailer: seq, tx_ns, stream, magic


def make_arena(tag: str, rings=((0, 0), (1, 0)), ring_size: int = 1024) -> Arena:
    path = Path("/dev/shm") / f"dptest-{tag}-{uuid.uuid4().hex[:8]}"
    return Arena.create(path, ArenaGeometry(n_ports=2, rings=tuple(rings), ring_size=ring_size,
                                            slot_size=2048, pool_bytes=0))


def frame(l3=None, size: int = 0, seq: int | None = None, tx_ns: int = 0, stream: int = 1,
          magic: int = lib.DP_GEN_MAGIC, vlan: bool = False) -> bytes:
    """A scapy frame padded to `size`; with seq, a generator trailer at its very end."""
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if vlan:
        pkt = pkt / Dot1Q(vlan=5)
    raw = bytes(pkt / l3) if l3 is not None else bytes(pkt)
    tail = TRAILER.pack(seq, tx_ns, stream, magic) if seq is not None else b""
    pad = max(size - len(raw) - len(tail), 0)
    return raw + b"\0" * pad + tail


def describe(data: bytes) -> dict:
    """What the C parser would put in the descriptor (the harness's own tiny parser)."""
    pkt = Ether(data)
    d = {"ethertype": getattr(pkt, "type", 0), "l4proto": 0, "hash": 0, "flags": 0}
    if Dot1Q in pkt:
        d["ethertype"], d["flags"] = pkt[Dot1Q].type, lib.DP_F_VLAN
    for l3, proto in ((IP, "proto"), (IPv6, "nh")):
        if l3 in pkt:
            d["l4proto"] = getattr(pkt[l3], proto)
            ports = (pkt.sport, pkt.dport) if (TCP in pkt or UDP in pkt) else (0, 0)
            key = f"{pkt[l3].src}|{pkt[l3].dst}|{d['l4proto']}|{ports}".encode()
            d["hash"] = zlib.crc32(key) or 1
    if len(data) >= TRAILER.size and TRAILER.unpack(data[-TRAILER.size:])[3] == lib.DP_GEN_MAGIC:
        d["flags"] |= lib.DP_F_GENERATED
    return d


class RingFiller:
    """Producer side of one ring, in Python: for tests and the throughput measurement."""

    def __init__(self, arena: Arena, index: int = 0):
        self.arena = arena
        self.r = lib.dp_arena_ring(ffi.cast("void *", arena.header), index)
        self.reader = arena.rings[index]
        self.prod = self.r.prod
        self.slot_size = arena.header.slot_size

    def free(self) -> int:
        return self.r.size - (self.prod - self.r.cons)

    def put(self, frames: list[bytes], rx_ns: int | list[int] = 0, publish: bool = True,
            native: bool = False, **fields) -> None:
        """Write frames and their descriptors; `native`: the descriptors' parsed fields from
        the workers' own parser (dp_parse: l4_off too), else from describe()."""
        assert len(frames) <= self.free(), "test overfills the ring"
        rx = rx_ns if isinstance(rx_ns, list) else [rx_ns] * len(frames)
        for data, t in zip(frames, rx, strict=True):
            pos = self.prod & self.r.mask
            addr = int(self.reader.slots(pos))
            self.arena.buf[addr:addr + len(data)] = np.frombuffer(data, np.uint8)
            d = self.reader.desc[pos]
            if native:
                lib.dp_parse(data, len(data), ffi.addressof(self.r.desc[pos]))
            for k, v in {**({} if native else describe(data)), **fields}.items():
                d[k] = v
            d["addr"], d["len"], d["rx_ns"] = addr, len(data), t
            d["port"], d["queue"] = self.r.port, self.r.queue
            self.prod += 1
        if publish:
            self.publish()

    def publish(self) -> None:
        self.r.prod = self.prod
