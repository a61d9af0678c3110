"""Generator packet templates: structured fields in, frame bytes out, built with scapy.

The config names fields (MACs, addresses, ports, VLAN ids, size); it never carries a scapy
expression, because evaluating one would run code from a config file.  The frame is padded to
the configured size and its last TRAILER_LEN bytes are left zero: the native generator writes
struct dp_gen_trailer there on every packet.  scapy is imported only when a frame is built, so
validating a config stays fast.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dataplane._native import ffi, lib

TRAILER_LEN = ffi.sizeof("struct dp_gen_trailer")   # 24: seq, tx_ns, stream, magic
TMPL_MAX = lib.DP_TMPL_MAX                        # largest frame a generator replays
ETH_LEN, VLAN_LEN = 14, 4
IP_LEN = {4: 20, 6: 40}
L4_LEN = {"udp": 8, "tcp": 20}
VARY_FIELD_OFF = {"sport": 0, "dport": 2}   # both are the first two u16s of UDP and TCP
ETH_P_8021AD = 0x88A8                       # outer tag of a double-tagged (QinQ) frame


@dataclass(frozen=True)
class Template:
    frame: bytes
    vary_off: int      # byte offset of the varied big-endian u16 in frame; 0: nothing varies
    l4_off: int        # byte offset of the UDP/TCP header


def header_len(ip_version: int, proto: str, n_vlans: int) -> int:
    """Bytes before the payload: what a frame needs at least, before the trailer."""
    return ETH_LEN + VLAN_LEN * n_vlans + IP_LEN[ip_version] + L4_LEN[proto]


def min_size(ip_version: int, proto: str, n_vlans: int) -> int:
    return header_len(ip_version, proto, n_vlans) + TRAILER_LEN


def build(*, src_mac: str, dst_mac: str, src: str, dst: str, proto: str, sport: int, dport: int,
          size: int, vlan: tuple[int, ...] = (), vary: str = "none") -> Template:
    """Build one frame of exactly `size` bytes (no FCS) whose last TRAILER_LEN bytes are zero."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw

    version = ipaddress.ip_address(src).version
    need = min_size(version, proto, len(vlan))
    if size < need:
        raise ValueError(f"size {size} is too small: headers and the {TRAILER_LEN}-byte trailer "
                         f"need {need}")
    pkt = Ether(src=src_mac, dst=dst_mac)
    if len(vlan) == 2:           # QinQ: 802.1ad outer tag, 802.1Q inner tag
        pkt.type = ETH_P_8021AD
        pkt = pkt / Dot1AD(vlan=vlan[0]) / Dot1Q(vlan=vlan[1])
    elif len(vlan) == 1:
        pkt = pkt / Dot1Q(vlan=vlan[0])
    pkt = pkt / (IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst))
    # PA: a data segment, the most ordinary thing a TCP stream carries.
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else TCP(sport=sport, dport=dport,
                                                                 flags="PA")
    pad = size - header_len(version, proto, len(vlan))
    frame = bytes(pkt / l4 / Raw(b"\x00" * pad))
    if len(frame) != size:       # a scapy surprise must not become a wrong-sized frame
        raise AssertionError(f"template is {len(frame)} bytes, wanted {size}")
    l4_off = header_len(version, proto, len(vlan)) - L4_LEN[proto]
    vary_off = l4_off + VARY_FIELD_OFF[vary] if vary in VARY_FIELD_OFF else 0
    return Template(frame=frame, vary_off=vary_off, l4_off=l4_off)
