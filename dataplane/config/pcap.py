"""A capture to replay (pcap or pcapng, Ethernet), read with scapy's raw readers and checked:
a file that is not a capture, of another link type, truncated or with a damaged record is a
clear error naming the file and the record, never a short replay.  The frames end up in one
bytes object with numpy arrays of offsets, lengths and times: the worker process loads the file
once and the native generator replays from those arrays (native/core/gen.c), never per packet
in Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dataplane.config.tables import Table, checks
from dataplane.config.templates import TMPL_MAX, TRAILER_LEN

if TYPE_CHECKING:
    from dataplane.config.streams import Stream

LINKTYPE_ETHERNET = 1
MAX_FRAMES = 1 << 24                   # a bound on what one stream holds in memory
ETH_IP_UDP_TCP = {0x0800: (9, 20), 0x86DD: (6, 40)}   # ethertype -> (proto byte, IP header)


class CaptureError(ValueError):
    """The file cannot be replayed: what is wrong and where."""


@dataclass
class Capture:
    path: Path
    data: bytes                        # the frames, one after the other
    off: np.ndarray                    # uint32: where frame k starts in data
    lens: np.ndarray                   # uint16: its length
    ts_ns: np.ndarray                  # int64: its capture time

    def __len__(self) -> int:
        return len(self.lens)

    def trailable(self) -> np.ndarray:
        """uint8 per frame: 1 when it is IPv4/IPv6 carrying UDP or TCP, the frames a receiver
        takes a trailer from (native/include/dp_gen.h, dp_gen_flag)."""
        out = np.zeros(len(self), np.uint8)
        for k, (o, n) in enumerate(zip(self.off.tolist(), self.lens.tolist(), strict=True)):
            et = int.from_bytes(self.data[o + 12:o + 14], "big") if n >= 14 else 0
            if et in ETH_IP_UDP_TCP:
                at, hdr = ETH_IP_UDP_TCP[et]
                out[k] = n >= 14 + hdr and self.data[o + 14 + at] in (6, 17)
        return out

    def gaps_ns(self, speed: float) -> np.ndarray:
        """uint64 per frame: the wait before it at `speed` times the capture's pace; frame 0's
        is the wait between loops, the capture's mean gap."""
        gaps = np.diff(self.ts_ns, prepend=self.ts_ns[:1]).clip(min=0).astype(np.float64)
        if len(gaps) > 1:
            gaps[0] = gaps[1:].mean()
        return (gaps / speed).astype(np.uint64)


MAX_BYTES = (1 << 32) - 1     # frames' offsets into the loaded capture are uint32


def load(path: str | Path, max_len: int) -> Capture:
    """Every frame of the capture, checked: Ethernet, 14..max_len bytes, nothing truncated."""
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapNgReader, RawPcapReader

    path = Path(path)
    try:
        size = os.stat(path).st_size
        reader = RawPcapReader(str(path))
    except (OSError, Scapy_Exception) as e:
        raise CaptureError(f"{path}: {e}") from None
    frames: list[bytes] = []
    ts: list[int] = []
    total = 0
    with reader:
        ng = isinstance(reader, RawPcapNgReader)
        if not ng and reader.linktype != LINKTYPE_ETHERNET:
            raise CaptureError(f"{path}: link type {reader.linktype}, only Ethernet (1) replays")
        for data, when in _records(reader, path, size, ng):
            if not 14 <= len(data) <= max_len:
                raise CaptureError(f"{path}: frame {len(frames)} of {len(data)} bytes, "
                                   f"expected 14..{max_len}")
            if len(frames) >= MAX_FRAMES:
                raise CaptureError(f"{path}: more than {MAX_FRAMES} frames")
            total += len(data)
            if total > MAX_BYTES:   # the frames' offsets are 32-bit
                raise CaptureError(f"{path}: more than {MAX_BYTES} bytes of frames")
            frames.append(data)
            ts.append(when)
    if not frames:
        raise CaptureError(f"{path}: no frames")
    lens = np.fromiter((len(f) for f in frames), np.uint16, len(frames))
    off = np.zeros(len(frames), np.uint32)
    np.cumsum(lens[:-1], out=off[1:])
    return Capture(path, b"".join(frames), off, lens, np.asarray(ts, np.int64))


def _records(reader, path: Path, size: int, ng: bool):
    """(frame bytes, capture time in ns) of every record.  scapy's readers end quietly at a
    record they cannot read whole: a read that ends anywhere but the end of the file is the
    error here, as is a record shorter than its header says."""
    while True:
        at = reader.f.tell()
        try:
            rec = reader._read_block() if ng else reader._read_packet()
        except EOFError:
            if at != size:
                raise CaptureError(f"{path}: truncated or damaged at byte {at} of {size}") \
                    from None
            return
        if rec is None:            # a pcapng block that is not a packet
            continue
        data, meta = rec
        if ng:
            if meta.linktype != LINKTYPE_ETHERNET:
                raise CaptureError(f"{path}: link type {meta.linktype} at byte {at}, only "
                                   "Ethernet (1) replays")
            when = ((meta.tshigh << 32) | meta.tslow) * 1_000_000_000 // meta.tsresol
        else:
            if len(data) != meta.caplen:
                raise CaptureError(f"{path}: record at byte {at} holds {len(data)} of its "
                                   f"{meta.caplen} bytes: truncated")
            frac = 1_000_000_000 if reader.nano else 1_000_000
            when = meta.sec * 1_000_000_000 + meta.usec * (1_000_000_000 // frac)
        if not 0 <= when < 1 << 63:
            raise CaptureError(f"{path}: record at byte {at} has an impossible time stamp")
        yield data, when


def room(cap: Capture, max_frame: int) -> bool:
    """Whether every frame that can carry a trailer has room for one within max_frame."""
    trail = cap.trailable().astype(bool)
    return bool((cap.lens[trail].astype(np.int64) + TRAILER_LEN <= max_frame).all())


# keys of a template stream that a pcap stream, whose frames are the capture's, refuses
TEMPLATE_KEYS = ("size", "sizes", "imix", "vary", "vary_range", "src", "dst", "src_mac",
                 "dst_mac", "proto", "sport", "dport", "vlan", "count")


def parse_pcap(t: Table, base: Stream, *, needs_id: bool) -> Stream:
    """A stream table with `pcap = "FILE"`: the capture's frames, at its own pace times
    `speed` (1 when neither speed nor a rate is given) or at a fixed rate, `loop` times."""
    from dataplane.config.streams import rate, stream_id
    for k in TEMPLATE_KEYS:
        t.refuse(k, "not with pcap: the frames are the capture's, sent loop times")
    path = t.get("pcap", str)
    s = replace(base, pcap="", stream=stream_id(t, base, needs_id), rate="", rate_pps=0,
                loops=t.get("loop", int, 1, check=checks.between(0, 1 << 30)),
                trailer=t.get("trailer", bool, True),
                max_frame=t.get("max_frame", int, 1514, check=checks.between(60, TMPL_MAX)),
                speed=0.0)
    t.known.append("speed")                   # a float: Table.get knows no float kind
    speed = t.data.get("speed")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float)):
        t.error("speed", speed, "expected a number")
        speed = None
    if path is None:
        return s
    try:
        cap = load(path, TMPL_MAX)
    except CaptureError as e:
        t.error("pcap", path, str(e))
        return s
    s.pcap, s.pcap_frames = str(Path(path).resolve()), len(cap)
    s.pcap_mean = float(cap.lens.mean())
    s.sizes = (int(cap.lens.max()) + TRAILER_LEN,)
    rate(t, s, replace(base, rate=""))
    if speed is not None and (s.rate_pps or "rate" in t.data or "rate_pps" in t.data):
        t.error("speed", speed, "only one of speed and rate")
    elif speed is not None and not 0 < speed <= 1e6:
        t.error("speed", speed, "expected a multiple of the capture's pace, > 0")
    elif not s.rate_pps:
        s.speed = float(speed or 1.0)
    if s.trailer and not room(cap, s.max_frame):
        s.trailer = False
        t.p.warning(f"{t.key('pcap')}: {path}: a frame has no room for the {TRAILER_LEN}-byte "
                    f"trailer within max_frame = {s.max_frame}: stream {s.stream or '(default)'}"
                    " is sent without trailers, sequence tracking off")
    return s
