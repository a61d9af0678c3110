"""Live capture (`dataplane capture`): the BPF filter in C over frames in a real arena (lying
descriptors included), the capture service in-process (pcapng that tcpdump and tshark read, the
peer check), and on the lab: a filter selecting one of the generator's flows gets exactly that
flow's packets and bytes; -c, -s, -C/-W and -w - work; a bad filter and a non-root user are
refused with a clear error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from dataplane.consumers.api import RingSource
from dataplane.consumers.bpf import BpfFilter, FilterError
from dataplane.consumers.capture import CaptureConsumer
from dataplane.consumers.capture_wire import message, recv_message
from dataplane.consumers.loop import ConsumerLoop
from dataplane.run import pcapng
from dataplane.run.pcapng import (
    ISB,
    ISB_FILTERACCEPT,
    ISB_IFDROP,
    ISB_IFRECV,
    ISB_OSDROP,
    ISB_USRDELIV,
)
from dataplane.shm.arena import Arena
from dataplane.shm.layout import PORT_COUNTERS
from tests.helpers.default_lab import default_text
from tests.helpers.frames import TRAILER, RingFiller, frame
from tests.helpers.service import service_run, stop
from tests.helpers.unprivileged import NOBODY, prefix
from tests.helpers.wait import wait

DATAPLANE = [sys.executable, "-m", "dataplane.cli"]
ROOT = Path(__file__).resolve().parents[1]
root = pytest.mark.root("the lab, a real run")


def _frames() -> list[bytes]:
    return [frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1025, dport=9), size=128,
                  seq=0),
            frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1026, dport=9), size=300),
            frame(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1025, dport=80), size=90),
            frame(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1025, dport=9), size=200),
            frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1025, dport=9), size=1500,
                  vlan=True)]


def _matches(flt: BpfFilter, arena: Arena, ring: int = 0):
    desc = arena.rings[ring].peek(1024)
    return flt.match(desc, arena.buf), desc


@pytest.mark.parametrize("expr, want", [
    ("udp src port 1025", [0, 3]),            # the VLAN-tagged one needs "vlan and ..."
    ("vlan and udp src port 1025", [4]),
    ("tcp", [2]),
    ("ip6", [3]),
    ("greater 250", [1, 4]),
    ("", [0, 1, 2, 3, 4]),                    # no filter: everything
])
def test_filter_in_c(arena: Arena, expr: str, want: list[int]) -> None:
    frames = _frames()
    RingFiller(arena).put(frames, rx_ns=7)
    m, _ = _matches(BpfFilter(expr), arena)
    assert m.idx.tolist() == want and m.bad == 0
    assert m.caplen.tolist() == [len(frames[i]) for i in want]
    assert m.data == b"".join(frames[i] for i in want)


def test_filter_snaplen_cuts_the_copy(arena: Arena) -> None:
    frames = _frames()
    RingFiller(arena).put(frames)
    m, _ = _matches(BpfFilter("udp", snaplen=64), arena)
    assert m.idx.tolist() == [0, 1, 3]
    assert m.caplen.tolist() == [64, 64, 64]
    assert m.data == b"".join(frames[i][:64] for i in (0, 1, 3))


def test_lying_descriptors_are_counted_not_read(arena: Arena) -> None:
    """addr + len past the arena's end, an addr far beyond it, an addr whose sum with len
    wraps: counted bad, never matched (not even by the empty filter), never read."""
    frames = _frames()[:4]
    RingFiller(arena).put(frames)
    desc = arena.rings[0].peek(1024)
    size = arena.buf.size
    desc[1]["addr"], desc[1]["len"] = size - 10, 100
    desc[2]["addr"] = size + 4096
    desc[3]["addr"], desc[3]["len"] = 2**64 - 8, 64
    m = BpfFilter("").match(desc, arena.buf)
    assert m.idx.tolist() == [0] and m.bad == 3
    assert m.data == frames[0]


def test_bad_filter_is_a_clear_error() -> None:
    with pytest.raises(FilterError, match=r"filter 'udp srcc port 5' does not compile: "
                                          r".*syntax error"):
        BpfFilter("udp srcc port 5")
    with pytest.raises(FilterError, match="snaplen"):
        BpfFilter("", snaplen=-1)


@pytest.mark.parametrize("files, names", [(0, ["f", "f1", "f2", "f3"]),
                                           (3, ["f0", "f1", "f2"]),
                                           (12, ["f00", "f01", "f02", "f03"])])
def test_file_ring_names_as_tcpdump(tmp_path: Path, files: int, names: list[str]) -> None:
    """-C alone: FILE, FILE1, ...; with -W N: FILE0..FILE(N-1), zero-padded, reused; every
    file starts with the header, a block never split, the statistics never start a file."""
    head = pcapng.header([pcapng.Interface("rx:in", 0)])
    ring = pcapng.FileRing(str(tmp_path / "f"), head, max_bytes=len(head) + 400, files=files)
    pkt = pcapng.packet(0, 1, 300, bytes(300))
    for _ in range(4):
        ring.write(pkt)
    ring.write(pcapng.statistics(0, pcapng.Stats(0, 1, 4, 0, 4, 0, 4)), rotate=False)
    ring.close()
    assert ring.names == [str(tmp_path / n) for n in names]
    for n in names:
        data = (tmp_path / n).read_bytes()
        assert data.startswith(head) and len(_pcap_lines("tcpdump", tmp_path / n)) == 1
    assert len(_isb(Path(ring.names[(4 - 1) % (files or 4)]))) == 1


# ---- the service, in this process: a ring filled by the test, a socket in a temporary dir ----

@contextmanager
def _service(arena: Arena, **kw: int) -> Iterator[tuple[CaptureConsumer, ConsumerLoop, Path]]:
    d = Path(tempfile.mkdtemp(prefix="dpcap-"))       # not pytest's 0700 tmp: nobody tries it
    d.chmod(0o755)
    src = RingSource(arena, arena.rings[0], "rx", "in")
    cap = CaptureConsumer(lambda: [src], path=d / "capture.sock", **kw)
    loop = ConsumerLoop([src], [cap])
    loop.start()
    try:
        wait(lambda: (d / "capture.sock").exists(), "the capture socket")
        yield cap, loop, d / "capture.sock"
    finally:
        loop.close()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def _capture(sock: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*DATAPLANE, "capture", "--socket", str(sock), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _attached(cap: CaptureConsumer, n: int) -> None:
    wait(lambda: len(cap.captures) == n, f"{n} capture(s) attached")


def _pcap_lines(tool: str, path: Path) -> list[str]:
    cmd = ["tcpdump", "-nn", "-r", str(path)] if tool == "tcpdump" else \
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name", "-e",
         "frame.len", "-e", "frame.cap_len", "-e", "frame.time_epoch"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="dataplane capture runs as root")
def test_service_writes_pcapng_tcpdump_and_tshark_read(arena: Arena, tmp_path: Path) -> None:
    frames = _frames()
    with _service(arena) as (cap, _loop, sock):
        out = tmp_path / "in.pcapng"
        p = _capture(sock, "-f", "udp src port 1025", "-c", "3", "-w", str(out))
        _attached(cap, 1)
        filler = RingFiller(arena)
        filler.put(frames, rx_ns=1_700_000_000_123_456_789)
        wait(lambda: filler.r.cons == filler.prod, "the ring consumed")
        filler.put(frames, rx_ns=1_700_000_001_000_000_001)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    # the second batch: 3 not matching, one match past the count
    assert "3 packets captured, 0 dropped by capture, 6 not matching (count 3 reached)" in err, err
    assert len(_pcap_lines("tcpdump", out)) == 3
    rows = [ln.split("\t") for ln in _pcap_lines("tshark", out)]
    assert [r[:3] for r in rows] == [["rx:in", "128", "128"], ["rx:in", "200", "200"],
                                     ["rx:in", "128", "128"]]
    # nanoseconds, as the descriptors carry them
    assert [r[3] for r in rows] == ["1700000000.123456789", "1700000000.123456789",
                                    "1700000001.000000001"]
    assert [bytes(p) for p in rdpcap(str(out))] == [frames[0], frames[3], frames[0]]
    info = subprocess.run(["capinfos", str(out)], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    for line in ("Name = rx:in", "Time precision = nanoseconds (9)",
                 "Filter string = udp src port 1025", "Number of stat entries = 1"):
        assert line in info.stdout, info.stdout
    # the statistics block: seen on the interface, matched, dropped, written
    assert _isb(out) == [{ISB_IFRECV: 10, ISB_IFDROP: 0, ISB_FILTERACCEPT: 3, ISB_OSDROP: 0,
                          ISB_USRDELIV: 3}]
    assert cap.captured == 3 and cap.dropped == 0 and not cap.captures


@pytest.mark.skipif(os.geteuid() != 0, reason="dataplane capture runs as root")
def test_the_run_stopping_ends_a_capture_with_its_books(arena: Arena, tmp_path: Path) -> None:
    out = tmp_path / "end.pcapng"
    with _service(arena) as (cap, _loop, sock):
        p = _capture(sock, "-w", str(out))
        _attached(cap, 1)
        filler = RingFiller(arena)
        filler.put(_frames())
        wait(lambda: filler.r.cons == filler.prod, "the ring consumed")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "5 packets captured, 0 dropped by capture, 0 not matching (the capture service " \
           "closed (the run is stopping))" in err, err
    assert len(_pcap_lines("tcpdump", out)) == 5
    assert _isb(out)[0][ISB_USRDELIV] == 5


def _isb(path: Path) -> list[dict[int, int]]:
    """The u64 options of every interface statistics block of a pcapng file."""
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        kind, n = struct.unpack_from("<II", data, pos)
        if kind == ISB:
            opts, o = {}, pos + 20                 # type, length, interface, timestamp
            while o < pos + n - 4:
                code, ln = struct.unpack_from("<HH", data, o)
                if code == 0:
                    break
                if ln == 8 and code >= ISB_IFRECV:
                    opts[code] = struct.unpack_from("<Q", data, o + 4)[0]
                o += 4 + ln + (-ln % 4)
            out.append(opts)
        pos += n
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="the peer check is tested against another uid")
def test_service_refuses_another_user(arena: Arena) -> None:
    """Even with the socket opened to everyone (a mistake the run does not make: 0600 in a 0700
    directory), SO_PEERCRED refuses a peer that is neither root nor the run's user."""
    with _service(arena) as (cap, _loop, sock):
        assert sock.stat().st_mode & 0o777 == 0o600
        sock.chmod(0o666)
        probe = ("import socket,struct,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])"
                 "\nh=s.recv(8)\nk,n=struct.unpack('<4sI',h)\nb=b''\nwhile len(b)<n:\n"
                 " c=s.recv(n-len(b))\n if not c: break\n b+=c\nprint(k.decode(),b.decode())")
        out = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", probe, str(sock)],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.startswith("FAIL"), out
        assert "uid 65534" in out.stdout and "run as root" in out.stdout, out.stdout
        assert not cap.captures


def _attach(sock: Path, request: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.sendall(message(b"CAPT", request))
    kind, body = recv_message(s, 4096)
    assert kind == b"OKAY", body
    return s


def test_a_slow_client_loses_packets_counted_never_the_ring(arena: Arena) -> None:
    """A client that reads nothing: its queue fills, the rest of what matched is dropped and
    counted while the ring keeps being consumed; once it reads, it gets exactly what was queued
    and books that add up.  A client that goes away ends its capture."""
    frames = [frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1025, dport=9), size=1400)
              ] * 256
    with _service(arena, queue_bytes=256 << 10) as (cap, loop, sock):
        slow = _attach(sock, b'{"filter": "udp"}')
        gone = _attach(sock, b'{"filter": "udp"}')
        _attached(cap, 2)
        gone.close()
        wait(lambda: len(cap.captures) == 1, "the capture of the client that went away ended")
        filler = RingFiller(arena)
        for _ in range(40):                      # 40 x 256 frames of 1400 bytes: 14 MB
            filler.put(frames)
            wait(lambda: filler.r.cons == filler.prod, "the ring consumed, the client idle")
        assert cap.dropped > 0 and cap.captured > 0
        assert cap.captured + cap.dropped == 40 * 256
        fams = {m.name: m.samples[0].value for m in cap.collect()}
        assert fams == {"dataplane_capture_active": 1, "dataplane_capture_packets": cap.captured,
                        "dataplane_capture_dropped_packets": cap.dropped}
        slow.shutdown(socket.SHUT_WR)            # Ctrl-C: the books, after what was queued
        got, books = 0, None
        while (m := recv_message(slow, 64 << 20)) is not None:
            if m[0] == b"DONE":
                books = json.loads(m[1])
                break
            got += struct.unpack_from("<II", m[1])[1]
        slow.close()
        assert books is not None
        assert books["captured"] == got == cap.captured
        assert books["dropped"] == cap.dropped
        assert books["interfaces"] == [{"seen": 40 * 256, "dropped": cap.dropped,
                                        "ring_full_drops": 0}]
        assert books["ended"] == "stopped by the client"
        assert loop.consumers[0].errors == 0


def test_service_refuses_bad_requests(arena: Arena) -> None:
    """A bad filter and an unknown worker are FAIL with the reason; nothing is attached."""
    with _service(arena) as (cap, _loop, sock):
        for req, why in ((b'{"filter": "udp srcc port 5"}', "does not compile: "),
                         (b'{"worker": "nope"}', "no ring of worker nope port * in this run "
                                                 "(its rings: rx:in)"),
                         (b'{"snaplen": "x"}', "snaplen = 'x': wrong type"),
                         (b"not json", "not JSON")):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(message(b"CAPT", req))
                kind, body = recv_message(s, 4096)
                assert kind == b"FAIL" and why in body.decode(), (req, body)
        assert not cap.captures


def test_no_run_is_a_clear_error(tmp_path: Path) -> None:
    p = _capture(tmp_path / "capture.sock", "-w", str(tmp_path / "x.pcapng"))
    _, err = p.communicate(timeout=60)
    if os.geteuid() != 0:
        assert p.returncode == 2 and "run as root" in err
        return
    assert p.returncode == 1
    assert f"no dataplane is running (no {tmp_path / 'capture.sock'})" in err, err


# ---- on the lab: a real run, the generator added by a reload once the captures are attached ----

N, FLOWS = 1003, 4         # the generator's count, and its sport range 1024..1027


def _flow_seqs(k: int) -> list[int]:
    """The sequence numbers of flow k: the generator writes sport = 1024 + seq % FLOWS
    (native/core/gen.c, dp_gen_fill), seq from 0 to N - 1."""
    return list(range(k, N, FLOWS))


def _without_generator(text: str) -> str:
    first, second = (m.start() for m in re.finditer(r"(?m)^\[\[worker\]\]", text))
    return text[:first] + text[second:]


def _wait_attached(err: Path) -> None:
    wait(lambda: "capturing on" in err.read_text(), f"{err.name}: attached", timeout=60)


@root
def test_capture_on_the_lab(tmp_path: Path) -> None:
    from dataplane import config

    tag = f"{os.getpid() % 10000}k"
    gen, rx = f"gen{tag}", f"rx{tag}"
    text = default_text(tag, ("rate_pps = 20000", "rate_pps = 2000"),
                        ("count = 0", f"count = {N}"),
                        ("vary_range = [1024, 2047]", f"vary_range = [1024, {1023 + FLOWS}]"))
    arenas = {s.name: Path(s.arena_path) for s in config.plan(config.loads(text))}
    cfg = tmp_path / "lab.toml"
    cfg.write_text(_without_generator(text))
    procs: dict[str, subprocess.Popen] = {}
    with service_run(cfg, tmp_path, f"@dp-test-capture-{os.getpid()}") as run:
        run.notify.wait_for("READY")
        # refused, with the reason: a filter libpcap does not compile, a user who is not root
        bad = subprocess.run([*DATAPLANE, "capture", "-f", "udp srcc port 5", "-w",
                              str(tmp_path / "bad.pcapng")], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert bad.returncode == 2, bad
        assert "filter 'udp srcc port 5' does not compile: " in bad.stderr, bad.stderr
        assert "syntax error" in bad.stderr, bad.stderr
        user = subprocess.run([*prefix(), *DATAPLANE, "capture", "-w", "/dev/null"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert user.returncode == 2 and "run as root" in user.stderr, user
        # four captures at once: one flow to a file, -c/-s, a ring of files, one flow to stdout
        runs = {"flow": ["--worker", rx, "-f", "udp src port 1025", "-w", "flow.pcapng"],
                "short": ["-c", "10", "-s", "64", "-w", "short.pcapng"],
                "ring": ["--port", "in", "-f", "udp", "-C", "0.02", "-W", "3", "-w",
                         "ring.pcapng"],
                "stdout": ["-f", "udp src port 1027", "-w", "-"]}
        for name, args in runs.items():
            with (tmp_path / f"{name}.out").open("wb") as o, \
                    (tmp_path / f"{name}.err").open("w") as e:
                procs[name] = subprocess.Popen([*DATAPLANE, "capture", *args], stdout=o,
                                               stderr=e, cwd=tmp_path,
                                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
            _wait_attached(tmp_path / f"{name}.err")
        # now the generator: every packet it sends is after the captures attached
        n = len(run.notify.messages)
        cfg.write_text(text)
        os.kill(run.proc.pid, signal.SIGHUP)
        i, _ = run.notify.wait_for("RELOADING", after=n)
        _, ready = run.notify.wait_for("READY", after=i + 1)
        assert f"added {gen}" in ready.get("STATUS", ""), ready
        with Arena.open(arenas[gen]) as g, Arena.open(arenas[rx]) as r:
            wait(lambda: int(g.port_counters[0][PORT_COUNTERS.index("gen_seq")]) == N,
                 "the generator's count sent", timeout=60)
            assert int(g.port_counters[0][PORT_COUNTERS.index("tx_drops")]) == 0
            wait(lambda: sum(x.counter("rx_packets") for x in r.rings) >= N
                 and all(x.occupancy() == 0 for x in r.rings), "every packet consumed",
                 timeout=60)
        for name in ("flow", "ring", "stdout"):
            procs[name].send_signal(signal.SIGINT)      # Ctrl-C: the books, then the end
        for name, p in procs.items():
            assert p.wait(60) == 0, (tmp_path / f"{name}.err").read_text()
        assert stop(run) == 0, run.logs()
    _check_lab_files(tmp_path, rx)


def _check_lab_files(tmp_path: Path, rx: str) -> None:
    err = {n: (tmp_path / f"{n}.err").read_text() for n in ("flow", "short", "ring", "stdout")}
    # one flow: exactly the packets and bytes the generator sent with sport 1025
    flow = tmp_path / "flow.pcapng"
    want = _flow_seqs(1)
    assert f"{len(want)} packets captured, 0 dropped by capture" in err["flow"], err["flow"]
    assert len(_pcap_lines("tcpdump", flow)) == len(want)
    rows = [ln.split("\t") for ln in _pcap_lines("tshark", flow)]
    assert {(r[0], r[1], r[2]) for r in rows} == {(f"{rx}:in", "128", "128")}
    pkts = rdpcap(str(flow))
    assert all(p[UDP].sport == 1025 and p[UDP].dport == 9 for p in pkts)
    assert sorted(TRAILER.unpack(bytes(p)[-TRAILER.size:])[0] for p in pkts) == want
    assert sum(len(p) for p in pkts) == 128 * len(want)
    # the same for another flow, through stdout
    stdout = tmp_path / "stdout.out"
    assert len(_pcap_lines("tcpdump", stdout)) == len(_flow_seqs(3)), err["stdout"]
    assert sorted(TRAILER.unpack(bytes(p)[-TRAILER.size:])[0]
                  for p in rdpcap(str(stdout))) == _flow_seqs(3)
    # -c 10 -s 64: ten packets, 64 bytes kept of each, their length intact
    short = [ln.split("\t") for ln in _pcap_lines("tshark", tmp_path / "short.pcapng")]
    assert [r[1:3] for r in short] == [["128", "64"]] * 10, short
    assert "10 packets captured" in err["short"] and "count 10 reached" in err["short"]
    # -C/-W: a ring of three files, each readable alone; every packet was written to one
    files = sorted(tmp_path.glob("ring.pcapng*"))
    assert [f.name for f in files] == ["ring.pcapng0", "ring.pcapng1", "ring.pcapng2"]
    assert all(f.stat().st_size <= 20_000 + 1000 for f in files)   # + the statistics
    assert all(len(_pcap_lines("tcpdump", f)) > 0 for f in files)
    assert f"{N} packets captured, 0 dropped by capture" in err["ring"], err["ring"]
