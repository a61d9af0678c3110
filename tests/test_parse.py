"""dp_parse (native/parse.c) on frames built with scapy, on every truncation of them, and on junk.

Every frame is placed so that its last byte is the last byte of a readable page and the next page
is PROT_NONE: a read past frame[len - 1] faults and kills the test run instead of passing quietly.
"""

from __future__ import annotations

import ctypes
import mmap
import random

import pytest
from dataplane._native import ffi, lib
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1AD,
    Dot1Q,
    Ether,
    ICMPv6EchoRequest,
    IPOption_NOP,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Packet,
    PadN,
)
from scapy.layers.ipsec import AH

PAGE = mmap.PAGESIZE
MALFORMED, TRUNC, VLAN = lib.DP_F_MALFORMED, lib.DP_F_TRUNCATED, lib.DP_F_VLAN
OPTS, V6EXT, FRAG = lib.DP_F_IP_OPTIONS, lib.DP_F_IPV6_EXT, lib.DP_F_FRAGMENT
L4_MIN = {6: 20, 17: 8, 1: 8, 58: 8}   # headers parse.c validates: wholly in the frame


class GuardedFrame:
    """A page of frame bytes followed by an inaccessible page."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, 2 * PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mprotect(ctypes.c_void_p(self.base + PAGE), PAGE, 0) != 0:   # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect guard page")

    def parse(self, frame: bytes, flags: int = 0) -> tuple[int, dict]:
        assert len(frame) <= PAGE
        off = PAGE - len(frame)
        self.mm[off:PAGE] = frame
        d = ffi.new("struct dp_desc *")
        d.flags = flags
        rc = lib.dp_parse(ffi.cast("uint8_t *", self.base + off), len(frame), d)
        return rc, {"ethertype": d.ethertype, "l4proto": d.l4proto, "l4_off": d.l4_off,
                    "hash": d.hash, "flags": d.flags}


GUARD = GuardedFrame()
parse = GUARD.parse

MAC = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
V4 = {"src": "10.0.0.1", "dst": "10.0.0.2"}
V6 = {"src": "2001:db8::1", "dst": "2001:db8::2"}


def eth(**kw: object) -> Ether:
    return Ether(**MAC, **kw)


def dest_opts(n: int) -> Packet:
    chain = IPv6ExtHdrDestOpt()
    for _ in range(n - 1):
        chain = chain / IPv6ExtHdrDestOpt()
    return chain


def l4_offset(pkt: Packet, layer: type) -> int:
    return len(bytes(pkt)) - len(bytes(pkt[layer]))


def check(frame: bytes, rc: int = 0, **want: int) -> dict:
    got_rc, got = parse(frame)
    assert got_rc == rc, got
    for k, v in want.items():
        assert got[k] == v, (k, got)
    if rc == 0 and got["ethertype"] in (0x0800, 0x86DD):
        assert got["hash"] != 0
    return got


# (id, packet, L4 layer or None, ethertype, l4proto, flags)
GOOD = [
    ("v4-tcp", eth() / IP(**V4) / TCP(sport=1234, dport=80) / (b"x" * 10), TCP, 0x0800, 6, 0),
    ("v4-udp", eth() / IP(**V4) / UDP(sport=53, dport=5353) / b"q", UDP, 0x0800, 17, 0),
    ("v4-icmp", eth() / IP(**V4) / ICMP(), ICMP, 0x0800, 1, 0),
    ("v4-options", eth() / IP(**V4, options=[IPOption_NOP()] * 4) / TCP(), TCP, 0x0800, 6, OPTS),
    ("v4-first-frag", eth() / IP(**V4, flags="MF") / UDP() / (b"a" * 64), UDP, 0x0800, 17, 0),
    ("v4-tcp-opts", eth() / IP(**V4) / TCP(options=[("MSS", 1460), ("NOP", None)]), TCP,
     0x0800, 6, 0),
    ("v4-gre-unknown", eth() / IP(**V4, proto=47) / (b"\x00" * 8), IP, 0x0800, 47, 0),
    ("vlan", eth() / Dot1Q(vlan=5) / IP(**V4) / UDP(), UDP, 0x0800, 17, VLAN),
    ("qinq-88a8", eth() / Dot1AD(vlan=3) / Dot1Q(vlan=4) / IP(**V4) / TCP(), TCP, 0x0800, 6,
     VLAN),
    ("qinq-9100", eth(type=0x9100) / Dot1Q(vlan=3) / Dot1Q(vlan=4) / IPv6(**V6) / UDP(), UDP,
     0x86DD, 17, VLAN),
    ("vlan-x4", eth() / Dot1Q() / Dot1Q() / Dot1Q() / Dot1Q() / IP(**V4) / UDP(), UDP, 0x0800,
     17, VLAN),
    ("v6-tcp", eth() / IPv6(**V6) / TCP(), TCP, 0x86DD, 6, 0),
    ("v6-udp", eth() / IPv6(**V6) / UDP() / b"hello", UDP, 0x86DD, 17, 0),
    ("v6-icmp", eth() / IPv6(**V6) / ICMPv6EchoRequest(), ICMPv6EchoRequest, 0x86DD, 58, 0),
    ("v6-ext-chain", eth() / IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()
     / AH(nh=60, payloadlen=4, spi=1, seq=1, icv=b"\0" * 12) / IPv6ExtHdrDestOpt() / TCP(),
     TCP, 0x86DD, 6, V6EXT),
    ("v6-first-frag", eth() / IPv6(**V6) / IPv6ExtHdrFragment(m=1) / UDP() / (b"z" * 32), UDP,
     0x86DD, 17, V6EXT),
    ("v6-ext-x8", eth() / IPv6(**V6) / dest_opts(8) / UDP(),
     UDP, 0x86DD, 17, V6EXT),
    ("arp", eth(type=0x0806) / (b"\0" * 28), None, 0x0806, 0, 0),
]


@pytest.mark.parametrize("pkt,layer,et,proto,flags", [g[1:] for g in GOOD],
                         ids=[g[0] for g in GOOD])
def test_good_frames(pkt: Packet, layer: type | None, et: int, proto: int, flags: int) -> None:
    raw = bytes(pkt)
    l4 = l4_offset(pkt, layer) if layer is not None else 0
    if layer is IP:
        l4 += 20
    got = check(raw, ethertype=et, l4proto=proto, l4_off=l4, flags=flags)
    if proto == 0:
        assert got["hash"] == 0


def test_ethernet_padding_is_not_truncation() -> None:
    raw = bytes(eth() / IP(**V4) / UDP()) + b"\0" * 18   # padded to the 60-byte minimum
    check(raw, l4_off=34, flags=0)


def test_runt_and_bare_ethernet() -> None:
    for n in range(14):
        check(b"\x08\x00" * n, rc=-1, flags=MALFORMED, hash=0)
    check(bytes(12) + b"\x88\xcc", ethertype=0x88CC, l4_off=0, hash=0, flags=0)


@pytest.mark.parametrize("pkt,flags", [
    (eth() / Dot1Q() / Dot1Q() / Dot1Q() / Dot1Q() / Dot1Q() / IP(**V4) / UDP(), VLAN),
    (eth() / IP(**V4, version=5) / UDP(), 0),
    (eth() / IP(**V4, ihl=4) / UDP(), 0),
    (eth() / IP(**V4, ihl=15) / UDP(), 0),          # 60 bytes of header, 28 in the frame
    (eth() / IP(**V4, len=19) / UDP(), 0),          # total length < IHL*4
    (eth() / IP(**V4, len=24) / UDP(), 0),          # UDP header runs past total length
    (eth() / IP(**V4) / TCP(dataofs=4), 0),
    (eth() / IP(**V4) / TCP(dataofs=15), 0),        # 60-byte TCP header in a 20-byte segment
    (eth() / IP(**V4) / UDP(len=7), 0),
    (eth() / IP(**V4) / UDP(len=200) / b"x", 0),
    (eth() / IPv6(**V6, version=4) / UDP(), 0),
    (eth() / IPv6(**V6) / IPv6ExtHdrDestOpt(len=10) / UDP(), V6EXT),   # ext past the packet
    (eth() / IPv6(**V6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP(), V6EXT),
    (eth() / IPv6(**V6) / dest_opts(9) / UDP(), V6EXT),
    (eth() / IPv6(**V6, plen=4) / UDP(), 0),        # UDP header past payload length
], ids=["vlan-x5", "v4-version", "v4-ihl4", "v4-ihl-past-frame", "v4-totlen<ihl",
        "v4-udp-past-totlen", "tcp-doff4", "tcp-doff-past", "udp-len7", "udp-len-past",
        "v6-version", "v6-ext-past", "v6-hbh-not-first", "v6-ext-x9", "v6-plen-short"])
def test_malformed(pkt: Packet, flags: int) -> None:
    check(bytes(pkt), rc=-1, flags=MALFORMED | flags, l4_off=0, l4proto=0, hash=0)


def test_truncated_frames() -> None:
    raw = bytes(eth() / IP(**V4) / TCP() / (b"p" * 100))
    check(raw[:-40], flags=TRUNC, l4_off=34, l4proto=6)     # payload cut: L4 still usable
    check(raw[:34 + 10], flags=TRUNC, l4_off=0, l4proto=6)  # TCP header cut: no L4, no error
    big = IPv6ExtHdrDestOpt(options=[PadN(optdata=bytes(36))])   # 40 bytes
    raw6 = bytes(eth() / IPv6(**V6) / big / IPv6ExtHdrDestOpt() / UDP())
    check(raw6[:54 + 40 + 4], flags=TRUNC | V6EXT, l4_off=0, l4proto=0)  # chain goes on, cut
    check(raw6[:54 + 48 + 4], flags=TRUNC | V6EXT, l4_off=0, l4proto=17)
    check(raw6, flags=V6EXT, l4_off=54 + 48, l4proto=17)


def test_fragments() -> None:
    first = eth() / IP(**V4, flags="MF", id=7) / UDP(sport=1, dport=2) / (b"a" * 64)
    later = eth() / IP(**V4, frag=9, id=7, proto=17) / (b"b" * 64)
    f = check(bytes(first), flags=0, l4_off=34)
    lt = check(bytes(later), flags=FRAG, l4_off=0, l4proto=17)
    assert f["hash"] == lt["hash"], "all fragments of a datagram share a hash"
    unfrag = check(bytes(eth() / IP(**V4) / UDP(sport=1, dport=2)))
    assert unfrag["hash"] != f["hash"], "ports count when not fragmented"
    v6later = eth() / IPv6(**V6) / IPv6ExtHdrFragment(offset=8, nh=60) / (b"\x11" * 40)
    check(bytes(v6later), flags=FRAG | V6EXT, l4_off=0, l4proto=60)  # data, not a header


def test_caller_flags_kept_parser_flags_reset() -> None:
    raw = bytes(eth() / IP(**V4) / TCP())
    mine = lib.DP_F_COPIED | lib.DP_F_GENERATED | TRUNC
    rc, got = parse(raw, flags=mine | MALFORMED | VLAN | FRAG | OPTS | V6EXT)
    assert rc == 0 and got["flags"] == mine


def v4_tcp(src: str, dst: str, sport: int, dport: int, proto: type = TCP, **kw: object) -> bytes:
    return bytes(eth() / IP(src=src, dst=dst, **kw) / proto(sport=sport, dport=dport))


def test_hash_identity_and_symmetry() -> None:
    h = parse(v4_tcp("1.2.3.4", "5.6.7.8", 1000, 80))[1]["hash"]
    assert parse(v4_tcp("1.2.3.4", "5.6.7.8", 1000, 80, ttl=3, id=99))[1]["hash"] == h
    assert parse(v4_tcp("5.6.7.8", "1.2.3.4", 80, 1000))[1]["hash"] == h   # symmetric
    assert parse(v4_tcp("1.2.3.4", "5.6.7.8", 1000, 80, proto=UDP))[1]["hash"] != h
    a = bytes(eth() / IPv6(src="2001:db8::a", dst="2001:db8::b") / UDP(sport=9, dport=10))
    b = bytes(eth() / IPv6(src="2001:db8::b", dst="2001:db8::a") / UDP(sport=10, dport=9))
    assert parse(a)[1]["hash"] == parse(b)[1]["hash"]


def test_hash_spreads() -> None:
    rng = random.Random(1)
    hashes = set()
    n = 3000
    for _ in range(n):
        src = ".".join(str(rng.randrange(256)) for _ in range(4))
        hashes.add(parse(v4_tcp(src, "10.9.9.9", rng.randrange(1, 65536), 443))[1]["hash"])
    assert len(hashes) >= n - 3
    # low bits are what consumers bucket on: no bucket of 16 is starved or hogged
    buckets = [0] * 16
    for h in hashes:
        buckets[h & 15] += 1
    assert min(buckets) > n / 16 * 0.7 and max(buckets) < n / 16 * 1.3


def assert_sane(frame: bytes) -> None:
    rc, d = parse(frame)
    assert rc in (0, -1)
    assert (rc == -1) == bool(d["flags"] & MALFORMED)
    if d["l4_off"]:
        assert d["l4_off"] + L4_MIN.get(d["l4proto"], 1) <= len(frame)
    if rc == -1:
        assert d["l4_off"] == 0 and d["hash"] == 0


@given(st.binary(max_size=200))
@settings(max_examples=3000)
def test_random_bytes(frame: bytes) -> None:
    assert_sane(frame)


HEADS = [bytes(g[1])[:n] for g in GOOD for n in (14, 18, 22, 34, 54)]


@given(st.sampled_from(HEADS), st.binary(max_size=120))
@settings(max_examples=3000)
def test_plausible_headers_then_junk(head: bytes, tail: bytes) -> None:
    assert_sane(head + tail)


@given(st.sampled_from([g[1] for g in GOOD]), st.data())
@settings(max_examples=1000)
def test_mutated_frames(pkt: Packet, data: st.DataObject) -> None:
    raw = bytearray(bytes(pkt))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    assert_sane(bytes(raw))


@pytest.mark.parametrize("pkt", [g[1] for g in GOOD], ids=[g[0] for g in GOOD])
def test_every_truncation(pkt: Packet) -> None:
    raw = bytes(pkt)
    for n in range(len(raw) + 1):
        assert_sane(raw[:n])
