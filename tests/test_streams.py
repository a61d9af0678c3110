"""Generator streams (docs/lab.md, "Traffic"): several streams per generator, each with its own
template, size cycle (an IMIX) and rate, and a rate changed on a running generator.

The config half reads TOML through the loader and plan (no host needed).  The lab half runs two
DPDK workers joined by memif (the `workers` fixture) and keeps its own books from the receiver's
descriptors and frames: per stream (told apart by UDP destination port, since the shortest IMIX
frames carry no trailer) every trailer seq 0..n-1 exactly once, and the frame sizes exactly the
cycle's counts.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dataplane.config import loads
from dataplane.config.specs import plan
from dataplane.config.streams import imix_cycle, parse_rate
from dataplane.config.tables import ConfigError
from dataplane.workers import rate
from dataplane.workers.spec import GenSpec, PortSpec, StreamSpec
from tests.helpers.workers import (
    TRAILER,
    Worker,
    drain_until_quiet,
    udp_template,
    worker_spec,
)

GEN = """
[[worker]]
name = "g"
  [[worker.port]]
  name = "p"
  driver = "af_packet"
  iface = "veth0"
  [worker.generate]
  port = "p"
"""
MAGIC = 0x31475044


def gen_of(extra: str):
    cfg = loads(GEN + extra)
    return plan(cfg)[0].gen


# ---- config: the syntax, and what it becomes ----

def test_imix_profile_is_the_classic_cycle_spread_out():
    g = gen_of('  imix = "7:4:1"\n  rate = "12kpps"\n')
    # 64, 570 and 1518 bytes with the FCS, which the generator's sizes leave out
    assert Counter(g.sizes) == {60: 7, 566: 4, 1514: 1} and len(g.sizes) == 12
    assert g.sizes[:3] != [60, 60, 60]                  # spread out, not in runs
    assert len(bytes.fromhex(g.template)) == 1514 and g.rate_pps == 12000
    assert imix_cycle([(100, 2), (200, 1)]) == (100, 200, 100)


def test_streams_inherit_the_generate_table_and_take_their_own_keys():
    g = gen_of('  rate = "1Mbps"\n  size = 125\n  dport = 7000\n'
               '    [[worker.generate.streams]]\n    stream = 9\n    sizes = [100, 150]\n'
               '    [[worker.generate.streams]]\n    stream = 10\n    rate_pps = 5\n'
               '    imix = [[200, 1], [300, 3]]\n')
    s1, s9, s10 = g.streams()
    assert (s1.stream, s1.rate_pps, s1.sizes) == (1, 1000, [])          # 1e6 / (8 * 125)
    assert (s9.stream, s9.rate_pps, s9.sizes) == (9, 1000, [100, 150])   # same bits, mean 125
    assert (s10.rate_pps, Counter(s10.sizes)) == (5, {200: 1, 300: 3})
    # the inherited template: same destination port in every stream
    assert {bytes.fromhex(s.template)[36:38] for s in (s1, s9, s10)} == {(7000).to_bytes(2)}


@pytest.mark.parametrize(("extra", "msg"), [
    ('  rate = "fast"\n', 'worker[0].generate.rate = "fast": expected a rate such as'),
    ('  rate = "1kpps"\n  rate_pps = 5\n', "only one of rate and rate_pps"),
    ('  size = 128\n  imix = "7:4:1"\n', "only one of size, sizes and imix; size is set too"),
    ('  imix = "7:4"\n', 'worker[0].generate.imix = "7:4": expected "a:b:c"'),
    ('  imix = "200:100:1"\n', "at most 256 in all"),
    ('  imix = "7:4:1"\n  proto = "tcp"\n  src = "fd00::1"\n  dst = "fd00::2"\n',
     "size 60 is shorter than the 74 bytes of headers"),
    ('  sizes = [64, 65]\n', "expected at least 66: headers plus the 24-byte"),
    ('  sizes = [70, 100]\n  checksum = false\n', "needs checksum = true"),
    ('    [[worker.generate.streams]]\n    size = 100\n',
     "worker[0].generate.streams[0].stream: missing"),
    ('  stream = 4\n    [[worker.generate.streams]]\n    stream = 4\n', "repeat"),
])
def test_bad_streams_are_named(extra, msg):
    with pytest.raises(ConfigError) as e:
        loads(GEN + extra)
    assert msg in str(e.value)


def test_rates():
    assert parse_rate("2.5Mpps", 100) == 2_500_000
    assert parse_rate("64kbps", 100) == 80                  # 64000 / 800 bits a frame
    assert parse_rate("0pps", 100) == 0 and parse_rate("12 parsecs", 100) is None


def test_a_stream_id_equal_to_the_first_streams_default_is_refused():
    # the first stream takes the worker's index + 1 (here 1) when it names none
    with pytest.raises(ConfigError, match="stream id 1 is used by 2"):
        loads(GEN + '    [[worker.generate.streams]]\n    stream = 1\n')


def test_a_share_of_the_line_rate():
    # 25% of 1 Gbit/s in 100-byte frames: each takes 124 bytes on the wire (FCS, preamble, gap)
    g = gen_of('  size = 100\n  line_rate = "1Gbps"\n  rate = "25%"\n')
    assert g.rate_pps == round(0.25e9 / (8 * 124)) == 252016
    with pytest.raises(ConfigError, match="a share needs line_rate"):
        loads(GEN + '  rate = "25%"\n')
    with pytest.raises(ConfigError, match="a share needs line_rate"):
        loads(GEN + '  line_rate = "1Gbps"\n  rate = "120%"\n')
    with pytest.raises(ConfigError, match="line_rate"):
        loads(GEN + '  line_rate = "1Gpps"\n')


# ---- on the lab: memif between two DPDK workers ----

def stream(sid: int, dport: int, count: int, rate_pps: int, sizes: list[int]) -> StreamSpec:
    tmpl = bytearray.fromhex(udp_template(max(sizes)))
    tmpl[36:38] = dport.to_bytes(2, "big")     # the UDP destination port tells the streams apart
    return StreamSpec(stream=sid, rate_pps=rate_pps, count=count, template=tmpl.hex(),
                      sizes=sizes if len(set(sizes)) > 1 else [])


def memif(workers, tmp: Path, streams: list[StreamSpec]) -> tuple[Worker, Worker]:
    """A DPDK generator and receiver joined by memif."""
    dev = f"socket={tmp / 'memif.sock'},socket-abstract=no,id=0"
    tx = workers(worker_spec("ss", PortSpec("net_memif0", f"net_memif0,role=server,{dev}"),
                             gen_of_streams(streams)))
    tx.wait_running()
    rx = workers(worker_spec("sc", PortSpec("net_memif1", f"net_memif1,role=client,{dev}"),
                             zero_copy=False))
    rx.wait_running()
    return tx, rx


def uring(workers, veth, streams: list[StreamSpec]) -> tuple[Worker, Worker]:
    """An io_uring generator and receiver on the two ends of a veth pair."""
    ns_a, ns_b, if_a, if_b = veth
    rx = workers(worker_spec("ur", PortSpec("in", iface=if_b), backend="uring"), netns=ns_b)
    rx.wait_running()
    tx = workers(worker_spec("ut", PortSpec("out", iface=if_a), gen_of_streams(streams),
                             backend="uring"), netns=ns_a)
    tx.wait_running()
    return tx, rx


def gen_of_streams(streams: list[StreamSpec]) -> GenSpec:
    first, *more = streams
    return GenSpec(burst=16, more=more, **vars(first))


class Books:
    """What the receiver got, from its rings: per frame its length, UDP destination port and
    last 24 bytes; the first frame of each (port, length) whole, to decode."""

    def __init__(self) -> None:
        self.lens, self.dports, self.tails = [], [], []
        self.samples: dict[tuple[int, int], bytes] = {}

    def drain(self, rx: Worker) -> int:
        n, buf = 0, rx.arena.buf
        for ring in rx.arena.rings:
            for b in ring.batches():
                addr, ln = b["addr"].astype(np.int64), b["len"].astype(np.int64)
                dport = buf[addr[:, None] + np.arange(36, 38)].view(">u2").ravel()
                self.tails.append(buf[(addr + ln - TRAILER)[:, None] + np.arange(TRAILER)])
                self.lens.append(ln.copy())
                self.dports.append(dport.copy())
                for a, k, d in zip(addr, ln, dport, strict=True):
                    self.samples.setdefault((int(d), int(k)), bytes(buf[a:a + k]))
                n += len(b)
        return n

    def until_quiet(self, rx: Worker, done: Callable[[], bool]) -> None:
        if not drain_until_quiet(lambda: self.drain(rx), done, 40):
            pytest.fail("the generator did not finish in time")

    def stream(self, dport: int) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, trailers) of one stream's frames, in arrival order."""
        mine = np.concatenate(self.dports) == dport
        tails = np.concatenate(self.tails)[mine].copy().view(
            np.dtype([("seq", "<u8"), ("tx_ns", "<u8"), ("stream", "<u4"), ("magic", "<u4")]))
        return np.concatenate(self.lens)[mine], tails.ravel()


def finished(tx: Worker, counts: list[int]) -> Callable[[], bool]:
    return lambda: all(int(tx.arena.gen_streams[i, 4]) >= c for i, c in enumerate(counts))


def check_stream(books: Books, tx: Worker, i: int, sid: int, dport: int, sizes: list[int],
                 count: int) -> None:
    """Stream i's books, from the receiver alone: its sizes exactly the cycle's counts over
    `count` frames, every trailer seq 0..n-1 once, n the frames long enough to carry one."""
    assert int(tx.arena.gen_streams[i, 6]) == 0, "the port refused frames: books not exact"
    lens, tails = books.stream(dport)
    cycle = [sizes[k % len(sizes)] for k in range(count)]
    assert Counter(lens.tolist()) == Counter(cycle)
    hdr = 42                                                    # Ethernet + IPv4 + UDP
    trailed = tails[lens >= hdr + TRAILER]
    assert (trailed["magic"] == MAGIC).all() and (trailed["stream"] == sid).all()
    n = sum(1 for s in cycle if s >= hdr + TRAILER)
    assert sorted(trailed["seq"].tolist()) == list(range(n))
    assert int(tx.arena.gen_streams[i, 2]) == n                 # the worker's next seq
    for size in set(cycle):
        check_frame(books.samples[(dport, size)], size)


def check_frame(raw: bytes, size: int) -> None:
    """A frame cut from the template: IP and UDP lengths say its size, checksums are right."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    pkt = Ether(raw)
    assert (len(raw), pkt[IP].len, pkt[UDP].len) == (size, size - 14, size - 34)
    ip_ck, udp_ck = pkt[IP].chksum, pkt[UDP].chksum
    del pkt[IP].chksum, pkt[UDP].chksum
    again = Ether(bytes(pkt))
    assert (ip_ck, udp_ck) == (again[IP].chksum, again[UDP].chksum)


@pytest.mark.root("DPDK vdevs (memif), or veth and netns for io_uring")
@pytest.mark.parametrize("backend", [pytest.param("dpdk", marks=pytest.mark.dpdk), "uring"])
def test_imix_streams_books_exact(workers, sockdir, request, backend):
    imix = list(imix_cycle([(60, 7), (566, 4), (1514, 1)]))   # "7:4:1", fits a 1500 MTU
    plan_ = [(11, 7011, imix, 1200), (12, 7012, [100, 300], 600), (13, 7013, [128], 500)]
    streams = [stream(s, d, n, 4000, z) for s, d, z, n in plan_]
    tx, rx = (memif(workers, sockdir, streams) if backend == "dpdk" else
              uring(workers, request.getfixturevalue("veth"), streams))
    books = Books()
    books.until_quiet(rx, finished(tx, [n for *_, n in plan_]))
    for i, (sid, dport, sizes, n) in enumerate(plan_):
        check_stream(books, tx, i, sid, dport, sizes, n)
    assert rate.stream_ids(tx.arena) == [11, 12, 13]
    tx.stop()
    rx.stop()


@pytest.mark.root("DPDK vdevs (memif)")
@pytest.mark.dpdk
def test_rate_change_mid_run_keeps_the_books(workers, sockdir):
    tx, rx = memif(workers, sockdir, [stream(21, 7021, 3000, 500, [200])])
    books = Books()
    deadline = time.monotonic() + 20
    while int(tx.arena.gen_streams[0, 4]) < 200 and time.monotonic() < deadline:
        books.drain(rx)
        time.sleep(0.01)
    assert rate.set_rate(tx.arena, 21, 50_000) == 500 and rate.rate(tx.arena, 21) == 50_000
    books.until_quiet(rx, finished(tx, [3000]))
    check_stream(books, tx, 0, 21, 7021, [200], 3000)
    # the change took: the generator's own send times, gaps before it against after it
    _, tails = books.stream(7021)
    ns = np.sort(tails["tx_ns"][np.argsort(tails["seq"])].astype(np.int64))
    slow, fast = np.median(np.diff(ns[20:150])), np.median(np.diff(ns[-1500:]))
    assert fast * 10 < slow, (slow, fast)
    with pytest.raises(ValueError, match="no generator stream 5 \\(streams: 21\\)"):
        rate.set_rate(tx.arena, 5, 10)
    tx.stop()
    rx.stop()



# ---- pcap replay ----

def capture(tmp: Path, ng: bool = False) -> tuple[Path, list[bytes]]:
    """A capture written with scapy: UDP frames of several sizes, an ARP and an ICMP one (no
    trailer for those), 1 ms apart."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.utils import wrpcap, wrpcapng

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = [eth / IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=5, dport=7031) / (b"x" * n)
            for n in (18, 100, 700, 1400, 30)]
    pkts.insert(2, eth / ARP(pdst="10.9.0.2"))
    pkts.insert(4, eth / IP(src="10.9.0.1", dst="10.9.0.2") / ICMP())
    for k, p in enumerate(pkts):
        p.time = 1000 + k / 1000
    path = tmp / ("c.pcapng" if ng else "c.pcap")
    (wrpcapng if ng else wrpcap)(str(path), pkts)
    return path, [bytes(p) for p in pkts]


def test_pcap_stream_config(tmp_path):
    path, frames = capture(tmp_path)
    g = gen_of(f'  pcap = "{path}"\n  loop = 3\n  speed = 2.5\n')
    assert (g.pcap, g.speed, g.loops, g.trailer, g.template) == (str(path), 2.5, 3, True, "")
    tight = f'  pcap = "{path}"\n  max_frame = 1440\n  rate = "1kpps"\n'
    g = gen_of(tight)                       # the 1442-byte frame has no room for 24 more
    assert (g.trailer, g.speed, g.rate_pps) == (False, 0.0, 1000)
    from dataplane.config.pcap import load
    cap = load(path, 2048)
    assert [bytes(cap.data[o:o + n]) for o, n in zip(cap.off, cap.lens, strict=True)] == frames
    assert cap.trailable().tolist() == [1, 1, 0, 1, 0, 1, 1]
    assert cap.gaps_ns(2.0).tolist() == [500_000] * 7   # 1 ms apart at twice the pace
    # a template stream after a capture takes none of the capture's figures: its bit rate is
    # at its own frame size (8 Mbit/s of 1000-byte frames), its trailer on
    g = gen_of(tight + '    [[worker.generate.streams]]\n    stream = 9\n    size = 1000\n'
               '    rate = "8Mbps"\n')
    assert (g.more[0].rate_pps, g.more[0].trailer, g.more[0].pcap) == (1000, True, "")


@pytest.mark.parametrize("ng", [False, True])
def test_damaged_captures_are_clear_errors(tmp_path, ng):
    path, _ = capture(tmp_path, ng)
    data = path.read_bytes()
    cut = tmp_path / "cut.pcap"
    for at in (len(data) - 10, len(data) - 700):          # inside the last record, the one before
        cut.write_bytes(data[:at])
        with pytest.raises(ConfigError, match="truncated"):
            loads(GEN + f'  pcap = "{cut}"\n')
    cut.write_bytes(b"not a capture at all, really")
    with pytest.raises(ConfigError, match=f'worker\\[0\\].generate.pcap = "{cut}": '):
        loads(GEN + f'  pcap = "{cut}"\n')
    with pytest.raises(ConfigError, match="not with pcap"):
        loads(GEN + f'  pcap = "{path}"\n  size = 100\n')
    with pytest.raises(ConfigError, match="only one of speed and rate"):
        loads(GEN + f'  pcap = "{path}"\n  speed = 2\n  rate_pps = 5\n')


@pytest.mark.root("DPDK vdevs (memif)")
@pytest.mark.dpdk
@pytest.mark.parametrize(("ng", "pace", "trailer"), [(False, {"rate_pps": 3000}, True),
                                                     (True, {"speed": 20.0}, True),
                                                     (False, {"rate_pps": 3000}, False)])
def test_pcap_replayed_byte_for_byte(workers, sockdir, tmp_path, ng, pace, trailer):
    path, frames = capture(tmp_path, ng)
    loops = 4
    spec = StreamSpec(stream=31, pcap=str(path), loops=loops, trailer=trailer, **pace)
    tx, rx = memif(workers, sockdir, [spec])
    got: list[bytes] = []

    def drain() -> int:
        n = 0
        for ring in rx.arena.rings:
            for b in ring.batches():
                got.extend(bytes(rx.arena.frame(int(d["addr"]), int(d["len"]))) for d in b)
                n += len(b)
        return n

    assert drain_until_quiet(drain, finished(tx, [len(frames) * loops]), 40)
    assert int(tx.arena.gen_streams[0, 6]) == 0, "the port refused frames"
    assert len(got) == len(frames) * loops
    seq = 0
    for k, raw in enumerate(got):
        want = frames[k % len(frames)]
        if raw == want:            # ARP, ICMP, or trailer = false: as captured, no trailer
            assert not trailer or want[12:14] == b"\x08\x06" or want[23] == 1
            continue
        assert raw[:-TRAILER] == want, f"frame {k} differs from the capture's"
        s, _, sid, magic = np.frombuffer(raw[-TRAILER:], "<u8", 2).tolist() + \
            np.frombuffer(raw[-8:], "<u4", 2).tolist()
        assert (s, sid, magic) == (seq, 31, MAGIC)
        seq += 1
    assert seq == (5 * loops if trailer else 0) and int(tx.arena.gen_streams[0, 2]) == seq
    st = rate.generator_streams(tx.arena)          # what `dataplane status` shows
    assert [(g["stream"], g["tx_packets"], g["with_trailer"], g["tracked"]) for g in st] == \
        [(31, len(got), seq, trailer)]
    tx.stop()
    rx.stop()
