"""A generator's streams: what frames each sends (a scapy-built template, a size or a cycle of
sizes such as an IMIX), at what rate, with which trailer id (docs/lab.md, "Traffic").

`[worker.generate]` alone is one stream.  Each `[[worker.generate.streams]]` table is one more
stream of the same generator: it takes the keys it does not set from `[worker.generate]` and
must name its `stream` id, so the books of every stream are told apart by their trailers.

    rate = "100kpps"     # or "2.5Mpps", "50Mbps", "1Gbps"; rate_pps = N is the same as "Npps"
    rate = "25%"         # a share of line_rate = "10Gbps" (the port's, given: a veth or memif
                         # port has none), counted as the wire does (FCS, preamble, gap)
    size = 128           # every frame this long (bytes, without the FCS)
    sizes = [64, 512]    # or a cycle: frame k is sizes[k % len]
    imix = "7:4:1"       # the classic IMIX (64/570/1518 bytes with the FCS) in these weights;
                         # or [[size, weight], ...]

A bit rate counts the frames' bytes as sent (the bytes `tx_bytes` counts: no FCS, preamble or
inter-frame gap) and becomes packets per second at the cycle's mean size.  A frame of the
cycle too short for its headers plus the 24-byte trailer goes without one: it is counted by the
ports, not by the receiver's sequence books (said at load and in `config show`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from dataplane._native import lib
from dataplane.config import templates as template
from dataplane.config.tables import REQUIRED, Table, checks

# The classic simple IMIX (weights 7:4:1) of 64, 570 and 1518-byte frames counts the 4-byte FCS,
# which our sizes, like every length in the project, do not: the same frames are these.
CLASSIC_IMIX = (60, 566, 1514)
MAX_CYCLE = lib.DP_GEN_MAX_SIZES        # a cycle's entries, the weights spelled out
MAX_RATE_PPS = 100_000_000
ETH_MIN = 60                            # the smallest Ethernet frame without its FCS
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kMG]?)(pps|bps)")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


@dataclass
class Stream:
    stream: int | None = None          # None: the worker's default (its id + 1)
    rate_pps: int = 0                  # 0: as fast as the port takes them
    rate: str = ""                     # the rate as written, for messages and `config show`
    line_bps: float = 0.0              # line_rate: what rate = "N%" is a share of
    count: int = 0
    src_mac: str = "02:00:00:00:00:01"
    dst_mac: str = "02:00:00:00:00:02"
    src: str = "10.77.0.1"
    dst: str = "10.77.0.2"
    proto: str = "udp"
    sport: int = 1024
    dport: int = 9
    vlan: list[int] = field(default_factory=list)
    sizes: tuple[int, ...] = (128,)    # the size cycle; one entry: every frame that long
    vary: str = "none"
    vary_range: tuple[int, int] = (1024, 65535)
    # pcap replay (dataplane/config/pcap.py): the capture instead of a template
    pcap: str = ""                     # its absolute path; "": a template stream
    speed: float = 0.0                 # times the capture's own pace; 0: paced by rate_pps
    loops: int = 1                     # 0: until stopped
    trailer: bool = True               # False: no frame gets one (asked, or no room)
    max_frame: int = 1514              # a frame and its trailer fit in this
    pcap_frames: int = 0
    pcap_mean: float = 0.0             # the capture's mean frame size, for a bit rate

    @property
    def size(self) -> int:
        """The largest frame: the template's length."""
        return max(self.sizes)

    def header_len(self) -> int:
        return template.header_len(ipaddress.ip_address(self.src).version, self.proto,
                                   len(self.vlan))

    def untrailed(self) -> list[int]:
        """The cycle's sizes with no room for the trailer after the headers."""
        return sorted({n for n in self.sizes if n < self.header_len() + template.TRAILER_LEN})


def parse_rate(text: str, mean_size: float) -> int | None:
    """ "100kpps" or "50Mbps" -> packets per second (bits at the frames' mean size); None when
    it is neither."""
    m = _RATE.fullmatch(text.strip())
    if m is None:
        return None
    value = float(m.group(1)) * _SCALE[m.group(2)]
    pps = value if m.group(3) == "pps" else value / (8 * mean_size)
    return max(1, round(pps)) if value > 0 else 0


# What a frame takes on the wire beyond its bytes without FCS: FCS 4, preamble and start
# delimiter 8, inter-frame gap 12.  A line rate is shared in those terms (RFC 2544's).
WIRE_OVERHEAD = 24


def share_rate(text: str, line_bps: float, mean_size: float) -> int | None:
    """ "25%" of line_bps -> packets per second at the frames' mean size on the wire; None
    when it is not a share in (0, 100]."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text.strip())
    if m is None or not 0 < float(m.group(1)) <= 100:
        return None
    return max(1, round(float(m.group(1)) / 100 * line_bps / (8 * (mean_size + WIRE_OVERHEAD))))


def imix_cycle(pairs: list[tuple[int, int]]) -> tuple[int, ...]:
    """(size, weight) pairs -> one cycle with each size `weight` times, spread out: entry j of
    size i sits at (j + 1/2) / weight_i of the way through, so a short window of the stream
    already has the mix."""
    at = sorted(((j + 0.5) / w, i, size) for i, (size, w) in enumerate(pairs) for j in range(w))
    return tuple(size for _, _, size in at)


def _imix(t: Table) -> tuple[int, ...] | None:
    """imix = "a:b:c" (weights of 64/570/1518) or [[size, weight], ...]; None when wrong."""
    v = t.data["imix"]
    t.known.append("imix")
    if isinstance(v, str) and re.fullmatch(r"\d+:\d+:\d+", v):
        pairs = list(zip(CLASSIC_IMIX, (int(w) for w in v.split(":")), strict=True))
    elif (isinstance(v, list) and v and all(isinstance(p, list) and len(p) == 2 and
                                            all(type(x) is int for x in p) for p in v)):
        pairs = [(p[0], p[1]) for p in v]
    else:
        t.error("imix", v, 'expected "a:b:c" (weights of 60, 566 and 1514-byte frames: 64, 570 '
                'and 1518 with the FCS) or [[size, weight], ...]')
        return None
    if any(w < 0 for _, w in pairs) or not 0 < sum(w for _, w in pairs) <= MAX_CYCLE:
        t.error("imix", v, f"expected weights >= 0, not all 0, at most {MAX_CYCLE} in all")
        return None
    return imix_cycle([(s, w) for s, w in pairs if w > 0])


def _sizes(t: Table, base: Stream) -> tuple[int, ...]:
    """size, sizes or imix: at most one of them; what base has when none is set."""
    given = [k for k in ("size", "sizes", "imix") if k in t.data]
    if len(given) > 1:
        t.error(given[1], t.data[given[1]], f"only one of size, sizes and imix; {given[0]} is "
                "set too")
    span = checks.between(ETH_MIN, template.TMPL_MAX)
    if "imix" in t.data:
        cycle = _imix(t)
    elif "sizes" in t.data:
        v = t.get("sizes", list, None)
        ok = (isinstance(v, list) and 0 < len(v) <= MAX_CYCLE and
              all(type(n) is int for n in v))
        if not ok:
            t.error("sizes", v, f"expected a list of 1..{MAX_CYCLE} frame sizes")
        cycle = tuple(v) if ok else None
    else:
        n = t.get("size", int, None, check=span)
        cycle = (n,) if n is not None else base.sizes if "size" not in t.data else None
    t.known += ["size", "sizes", "imix"]
    if cycle is None:
        return base.sizes
    bad = [n for n in cycle if span(n)]
    if bad and given and given[0] != "size":
        t.error(given[0], t.data[given[0]], f"size {bad[0]}: expected {ETH_MIN}.."
                f"{template.TMPL_MAX}")
        return base.sizes
    return cycle


def parse(t: Table, base: Stream, *, needs_id: bool) -> Stream:
    """One stream's keys, each defaulting to base's (but `pcap`, which each stream names)."""
    if "pcap" in t.data:
        from dataplane.config.pcap import parse_pcap
        return parse_pcap(t, base, needs_id=needs_id)
    if base.pcap:   # a capture's own figures are no template stream's defaults
        d = Stream()
        base = replace(base, pcap="", pcap_mean=d.pcap_mean, pcap_frames=d.pcap_frames,
                       trailer=d.trailer, speed=d.speed, loops=d.loops,
                       max_frame=d.max_frame, sizes=d.sizes)
    s = replace(
        base,
        pcap="",
        stream=stream_id(t, base, needs_id),
        count=t.get("count", int, base.count, check=checks.between(0, 1 << 62)),
        src_mac=t.get("src_mac", str, base.src_mac, check=checks.mac),
        dst_mac=t.get("dst_mac", str, base.dst_mac, check=checks.mac),
        src=t.get("src", str, base.src, check=checks.ip_address),
        dst=t.get("dst", str, base.dst, check=checks.ip_address),
        proto=t.get("proto", str, base.proto, choices=("udp", "tcp")),
        sport=t.get("sport", int, base.sport, check=checks.between(0, 65535)),
        dport=t.get("dport", int, base.dport, check=checks.between(0, 65535)),
        vlan=t.get("vlan", list, base.vlan, check=checks.vlan_ids),
        vary=t.get("vary", str, base.vary, choices=("none", "sport", "dport")),
        vary_range=tuple(t.get("vary_range", list, list(base.vary_range),
                               check=checks.port_range)),
        sizes=_sizes(t, base))
    _check_frames(t, s)
    rate(t, s, base)
    return s


def _check_frames(t: Table, s: Stream) -> None:
    versions = {ipaddress.ip_address(a).version for a in (s.src, s.dst)}
    if len(versions) > 1:
        t.error("dst", s.dst, f"must be the same IP version as src = \"{s.src}\"")
        return
    key = "size" if len(s.sizes) == 1 else "sizes" if "sizes" in t.data else "imix"
    hdr, need = s.header_len(), s.header_len() + template.TRAILER_LEN
    if s.size < need:
        t.error(key, s.size if key == "size" else t.data.get(key), f"expected at least {need}: "
                f"headers plus the {template.TRAILER_LEN}-byte generator trailer")
    elif min(s.sizes) < hdr:
        t.error(key, t.data.get(key), f"size {min(s.sizes)} is shorter than the {hdr} bytes "
                "of headers")
    elif s.untrailed() and key in t.data:
        t.p.warning(f"{t.key(key)}: frames of {', '.join(map(str, s.untrailed()))} bytes have "
                    f"no room for the trailer after {hdr} bytes of headers; they are sent "
                    "without one: counted by the ports, not in the sequence books")


def stream_id(t: Table, base: Stream, needs_id: bool) -> int | None:
    return t.get("stream", int, REQUIRED if needs_id else base.stream,
                 check=checks.between(1, 0xFFFFFFFF))


def rate(t: Table, s: Stream, base: Stream) -> None:
    """rate_pps = N or rate = "..."; both is an error; neither keeps base's."""
    line = t.get("line_rate", str, None)
    if line is not None:
        m = _RATE.fullmatch(line.strip())
        if m is None or m.group(3) != "bps" or float(m.group(1)) <= 0:
            t.error("line_rate", line, 'expected a bit rate such as "10Gbps"')
        else:
            s.line_bps = float(m.group(1)) * _SCALE[m.group(2)]
    pps = t.get("rate_pps", int, None, check=checks.between(0, MAX_RATE_PPS))
    text = t.get("rate", str, None)
    if pps is not None and text is not None:
        t.error("rate", text, "only one of rate and rate_pps")
    elif pps is not None:
        s.rate_pps, s.rate = pps, f"{pps}pps"
    elif text is not None and text.strip().endswith("%"):
        mean = s.pcap_mean or sum(s.sizes) / len(s.sizes)
        got = share_rate(text, s.line_bps, mean) if s.line_bps else None
        if got is None or got > MAX_RATE_PPS:
            t.error("rate", text, "a share needs line_rate (e.g. line_rate = \"10Gbps\") and "
                    f"a value in (0, 100]%, at most {MAX_RATE_PPS} packets/s")
        else:
            s.rate_pps, s.rate = got, text
    elif text is not None:
        mean = s.pcap_mean or sum(s.sizes) / len(s.sizes)
        got = parse_rate(text, mean)
        if got is None or got > MAX_RATE_PPS:
            t.error("rate", text, 'expected a rate such as "100kpps", "2.5Mpps", "50Mbps" or '
                    f'"1Gbps", at most {MAX_RATE_PPS} packets/s')
        else:
            s.rate_pps, s.rate = got, text
    elif base.rate.endswith("bps") and s.sizes != base.sizes:   # the same bits, other sizes
        s.rate_pps = parse_rate(base.rate, sum(s.sizes) / len(s.sizes)) or 0
    elif base.rate.endswith("%") and s.sizes != base.sizes:     # the same share, other sizes
        s.rate_pps = share_rate(base.rate, s.line_bps, sum(s.sizes) / len(s.sizes)) or 0
