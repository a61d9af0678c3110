"""IPFIX (RFC 7011) export of finished flows over UDP: templates, data records, messages.

Two templates, one per address family, of standard information elements (IANA's IPFIX
registry; docs/flows.md says what each means here):

    id  IE                          bytes  v4  v6
    8   sourceIPv4Address           4      x
    12  destinationIPv4Address      4      x
    27  sourceIPv6Address           16         x
    28  destinationIPv6Address      16         x
    7   sourceTransportPort         2      x   x
    11  destinationTransportPort    2      x   x
    4   protocolIdentifier          1      x   x
    6   tcpControlBits              1      x   x   (reduced-size encoding, RFC 7011 6.2)
    58  vlanId                      2      x   x
    2   packetDeltaCount            8      x   x
    1   octetDeltaCount             8      x   x
    152 flowStartMilliseconds       8      x   x
    153 flowEndMilliseconds         8      x   x
    136 flowEndReason               1      x   x

Records are packed with numpy (one structured big-endian array per batch of flows, then
tobytes), not with scapy.layers.netflow: scapy builds a template set, but its data records are
bytes the caller packs anyway, and one scapy Packet per record costs more than numpy's packing
of a whole message.  A message holds one template set or one data set and stays within `mtu`
bytes (the path MTU's payload, so a record is never split across IP fragments).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterable

import numpy as np

log = logging.getLogger(__name__)

VERSION = 10
TEMPLATE_SET_ID = 2
TEMPLATE_V4, TEMPLATE_V6 = 256, 257
HEADER = struct.Struct("!HHIII")    # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")   # set id, length
DEFAULT_PORT = 4739                 # IANA's port for IPFIX

# flowEndReason (IANA registry, IE 136)
IDLE_TIMEOUT, ACTIVE_TIMEOUT, END_OF_FLOW, FORCED_END, LACK_OF_RESOURCES = 1, 2, 3, 4, 5
REASONS = {IDLE_TIMEOUT: "idle_timeout", ACTIVE_TIMEOUT: "active_timeout",
           END_OF_FLOW: "end_of_flow", FORCED_END: "forced_end",
           LACK_OF_RESOURCES: "lack_of_resources"}

_TAIL = [(7, 2), (11, 2), (4, 1), (6, 1), (58, 2), (2, 8), (1, 8), (152, 8), (153, 8), (136, 1)]
FIELDS = {TEMPLATE_V4: [(8, 4), (12, 4), *_TAIL], TEMPLATE_V6: [(27, 16), (28, 16), *_TAIL]}


def _record_dtype(alen: int) -> np.dtype:
    """A data record of FIELDS, big-endian and packed (numpy packs unaligned by default)."""
    return np.dtype([("src", f"V{alen}"), ("dst", f"V{alen}"), ("ports", "V4"),
                     ("proto", "u1"), ("tcpflags", "u1"), ("vlan", ">u2"),
                     ("packets", ">u8"), ("bytes", ">u8"), ("start", ">u8"), ("end", ">u8"),
                     ("reason", "u1")])


RECORD = {TEMPLATE_V4: _record_dtype(4), TEMPLATE_V6: _record_dtype(16)}
assert all(RECORD[t].itemsize == sum(n for _, n in FIELDS[t]) for t in RECORD)


def template_set() -> bytes:
    """The template set that describes both templates."""
    body = b"".join(struct.pack("!HH", tid, len(f)) + b"".join(struct.pack("!HH", ie, n)
                                                                  for ie, n in f)
                    for tid, f in FIELDS.items())
    return SET_HEADER.pack(TEMPLATE_SET_ID, SET_HEADER.size + len(body)) + body


def message(body: bytes, seq: int, domain: int, export_time: int | None = None) -> bytes:
    """One IPFIX message around `body` (whole sets); seq: data records sent before it."""
    t = int(time.time()) if export_time is None else export_time
    return HEADER.pack(VERSION, HEADER.size + len(body), t & 0xFFFFFFFF, seq & 0xFFFFFFFF,
                       domain) + body


def data_sets(tid: int, records: np.ndarray, mtu: int) -> Iterable[tuple[bytes, int]]:
    """(data set, record count) pieces of `records` (RECORD[tid]) that fit a message of mtu."""
    size = RECORD[tid].itemsize
    per = max(1, (mtu - HEADER.size - SET_HEADER.size) // size)
    for i in range(0, len(records), per):      # per message, not per record
        chunk = records[i:i + per]
        yield SET_HEADER.pack(tid, SET_HEADER.size + chunk.nbytes) + chunk.tobytes(), len(chunk)


def parse_collector(text: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" (port default 4739) -> (host, port); ValueError why not."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f'"{text}": expected "[ipv6]:port"')
        if rest:
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(text, p)
    if not host:
        raise ValueError(f'"{text}": no host')
    return host, port


def _port(text: str, p: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ValueError(f'"{text}": port "{p}" is not 1..65535')
    return int(p)


class Exporter:
    """Connected UDP sockets to the collectors, the sequence number and the books.  Every
    message goes to every collector: one exporting process, several collecting ones."""

    def __init__(self, collectors: list[tuple[str, int]], domain: int = 0, mtu: int = 1400):
        self.domain, self.mtu = domain, mtu
        self.seq = 0                  # data records sent so far (RFC 7011 3.1)
        self.messages = self.records = self.templates = self.send_errors = 0
        self.bytes = 0
        self.socks: list[socket.socket] = []
        for host, port in collectors:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                              type=socket.SOCK_DGRAM)[0]
            s = socket.socket(family, kind, proto)
            s.setblocking(False)      # never wait in the consumer loop: a full buffer is an error
            s.connect(addr)           # connected: a collector's ICMP unreachable is seen
            self.socks.append(s)
        self.names = [f"{h}:{p}" for h, p in collectors]

    def send_templates(self) -> None:
        self._send(message(template_set(), self.seq, self.domain))
        self.templates += 1

    def send(self, tid: int, records: np.ndarray) -> None:
        for body, n in data_sets(tid, records, self.mtu):
            self._send(message(body, self.seq, self.domain))
            self.seq += n
            self.records += n

    def _send(self, msg: bytes) -> None:
        self.messages += 1
        for s, name in zip(self.socks, self.names, strict=True):
            try:
                s.send(msg)
                self.bytes += len(msg)
            except OSError as e:      # refused (nobody listening), buffer full, no route
                if not self.send_errors:
                    log.warning("IPFIX to %s: %s (counted from now on)", name, e)
                self.send_errors += 1

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []
