"""pcapng for `dataplane capture`: a section header, one interface block per worker:port (if_name
"worker:port", if_tsresol 9: nanoseconds), enhanced packet blocks, and interface statistics
blocks at the end, in a ring of files like tcpdump's -C/-W.

Written with struct rather than scapy's PcapNgWriter: that writer (scapy 2.8) keeps microsecond
resolution, has no if_tsresol, if_filter or statistics blocks; what is needed here is five block
kinds of a few fields each (little-endian, as tcpdump writes them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
SHB, IDB, EPB, ISB = 0x0A0D0D0A, 1, 6, 5
OPT_END, OPT_COMMENT = 0, 1
IF_NAME, IF_DESCRIPTION, IF_TSRESOL, IF_FILTER = 2, 3, 9, 11
ISB_STARTTIME, ISB_ENDTIME, ISB_IFRECV, ISB_IFDROP = 2, 3, 4, 5
ISB_FILTERACCEPT, ISB_OSDROP, ISB_USRDELIV = 6, 7, 8
SHB_USERAPPL = 4
EPB_HEAD = struct.Struct("<IIIIIII")      # type, length, interface, ts high, ts low, caplen, len


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def block(kind: int, body: bytes, options: Sequence[bytes] = ()) -> bytes:
    body = _pad(body) + (b"".join(options) + option(OPT_END, b"") if options else b"")
    n = len(body) + 12
    return struct.pack("<II", kind, n) + body + struct.pack("<I", n)


def _ts(ns: int) -> bytes:
    return struct.pack("<II", ns >> 32 & 0xFFFFFFFF, ns & 0xFFFFFFFF)


@dataclass
class Interface:
    name: str            # worker:port
    snaplen: int         # 0: whole frames (written as 262144, libpcap's largest)
    filter: str = ""


@dataclass
class Stats:
    """One interface's books, for its statistics block."""
    start_ns: int
    end_ns: int
    received: int        # packets the capture saw on it (isb_ifrecv)
    ring_drops: int      # dropped by the worker, its ring full, while capturing (isb_ifdrop)
    accepted: int        # matched the filter (isb_filteraccept)
    dropped: int         # matched but dropped: the capture's client did not keep up (osdrop)
    delivered: int       # written (isb_usrdeliv)


def header(interfaces: Sequence[Interface]) -> bytes:
    """The section header and the interface blocks: what every file of a ring starts with."""
    shb = block(SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1),
                [option(SHB_USERAPPL, b"dataplane capture")])
    idbs = []
    for i in interfaces:
        opts = [option(IF_NAME, i.name.encode()), option(IF_TSRESOL, bytes([9]))]
        if i.filter:       # the first byte 0: a libpcap filter string
            opts.append(option(IF_FILTER, b"\0" + i.filter.encode()))
        idbs.append(block(IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, i.snaplen or 262144),
                          opts))
    return shb + b"".join(idbs)


def packet(iface: int, ts_ns: int, orig_len: int, data: bytes) -> bytes:
    """One enhanced packet block (no options): the header is packed in one call."""
    pad = -len(data) % 4
    n = 28 + len(data) + pad + 4           # the header, the padded data, the length again
    return (EPB_HEAD.pack(EPB, n, iface, ts_ns >> 32 & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF,
                          len(data), orig_len)
            + data + b"\0" * pad + struct.pack("<I", n))


def statistics(iface: int, s: Stats) -> bytes:
    u64 = struct.Struct("<Q").pack
    comment = (f"{s.dropped} dropped by the capture (its client did not keep up: isb_osdrop); "
               f"{s.ring_drops} dropped by the worker, its ring full (isb_ifdrop)")
    return block(ISB, struct.pack("<I", iface) + _ts(s.end_ns),
                 [option(OPT_COMMENT, comment.encode()),
                  option(ISB_STARTTIME, _ts(s.start_ns)), option(ISB_ENDTIME, _ts(s.end_ns)),
                  option(ISB_IFRECV, u64(s.received)), option(ISB_IFDROP, u64(s.ring_drops)),
                  option(ISB_FILTERACCEPT, u64(s.accepted)), option(ISB_OSDROP, u64(s.dropped)),
                  option(ISB_USRDELIV, u64(s.delivered))])


class FileRing:
    """Where the blocks go: one file, stdout ("-"), or with `max_bytes` a new file each time the
    current one would grow past it, named as tcpdump names them: without `files`, FILE, FILE1,
    FILE2...; with `files` = N, FILE0..FILE(N-1) (zero-padded to N-1's digits), reused in turn.
    Every file starts with the same header, so each is readable alone."""

    def __init__(self, path: str, head: bytes, max_bytes: int = 0, files: int = 0):
        self.path, self.head = path, head
        self.max_bytes, self.files = max_bytes, files
        self.index = 0
        self.size = 0
        self.names: list[str] = []          # every file written, in order (one per index)
        self.out: BinaryIO = self._open()

    def name(self, index: int) -> str:
        if self.files:
            return f"{self.path}{index % self.files:0{len(str(self.files - 1))}d}"
        return self.path if index == 0 or not self.max_bytes else f"{self.path}{index}"

    def _open(self) -> BinaryIO:
        if self.path == "-":
            import sys
            out = sys.stdout.buffer
        else:
            name = self.name(self.index)
            out = open(name, "wb")         # noqa: SIM115 - closed by rotate() and close()
            if name not in self.names:
                self.names.append(name)
        out.write(self.head)
        self.size = len(self.head)
        return out

    def write(self, data: bytes, rotate: bool = True) -> None:
        """Write a block; a packet (`rotate`) may start the next file first, the statistics
        at the end go into the last one."""
        if (rotate and self.max_bytes and self.path != "-" and self.size > len(self.head)
                and self.size + len(data) > self.max_bytes):
            self.out.close()
            self.index += 1
            self.out = self._open()
        self.out.write(data)
        self.size += len(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self.path == "-":
            self.out.flush()
        else:
            self.out.close()
