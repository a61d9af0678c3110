"""The flow cache and its IPFIX export (dataplane.consumers.flowcache, ipfix): unit tests on frames
built with scapy in a real arena (descriptors filled by the native parser, as a worker fills
them), and the export read back by a real collector, nfdump's nfcapd, from a run of the lab."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from dataplane._native import ffi, lib
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from dataplane.config.consumers import ConsumerCfg
from dataplane.consumers import ipfix
from dataplane.consumers.flowcache import FlowCache, check_options
from dataplane.consumers.loop import drain, ring_sources
from dataplane.consumers.registry import ConsumerLoadError, make
from tests.helpers.frames import RingFiller

NOW = 0     # each test's "now", set when it starts (_now)


@pytest.fixture(autouse=True)
def _now() -> None:
    """The frames' receive times are this test's now: the cache's timeouts are checked against
    the wall clock at each tick, so a time taken at import would be minutes old by the time a
    full suite reaches a test, and every flow would expire at the first tick."""
    global NOW
    NOW = time.time_ns()


def parsed(frame: bytes) -> dict:
    """The descriptor fields the native parser gives this frame."""
    d = ffi.new("struct dp_desc *")
    lib.dp_parse(ffi.from_buffer(frame), len(frame), d)
    return {"ethertype": d.ethertype, "l4proto": d.l4proto, "l4_off": d.l4_off,
            "hash": d.hash, "flags": d.flags}


def eth(*tags: int):
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for t in tags:
        pkt = pkt / Dot1Q(vlan=t)
    return pkt


def put(arena, frames: list[tuple[bytes, int]]) -> None:
    """Frames with their rx_ns into ring 0, each described by the native parser."""
    filler = RingFiller(arena)
    for f, t in frames:
        filler.put([f], rx_ns=t, **parsed(f))


def cache(arena, frames: list[tuple[bytes, int]], **options) -> FlowCache:
    fc = FlowCache("flows", options)
    put(arena, frames)
    drain(ring_sources([arena]), [fc], max_batch=5)    # flows spread over several batches
    return fc


def by_port(fc: FlowCache) -> dict[int, dict]:
    return {f["sport"]: f for f in fc.top_flows(1000)}


def test_ipv4_flows_counted_by_five_tuple(arena):
    frames = [(bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000 + i % 3,
                                                                     dport=53) / (b"x" * i)),
               NOW + i) for i in range(30)]
    fc = cache(arena, frames)
    flows = by_port(fc)
    assert sorted(flows) == [1000, 1001, 1002]
    for k in range(3):
        mine = [(f, t) for i, (f, t) in enumerate(frames) if i % 3 == k]
        f = flows[1000 + k]
        assert f["packets"] == 10
        assert f["bytes"] == sum(len(x) - 14 for x, _ in mine)      # IP-level octets
        assert (f["first_ns"], f["last_ns"]) == (mine[0][1], mine[-1][1])
        assert (f["src"], f["dst"], f["dport"], f["proto"], f["vlan"]) == \
            ("10.0.0.1", "10.0.0.2", 53, 17, 0)
    assert fc.skipped == 0 and fc.table.used == 3


def test_vlan_is_part_of_the_key_and_non_ip_is_skipped(arena):
    l3 = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6)
    frames = [(bytes(eth(*tags) / l3), NOW) for tags in ((), (7,), (7,), (9, 7), ())]
    frames.append((bytes(eth() / ARP()), NOW))
    fc = cache(arena, frames)
    got = sorted((f["vlan"], f["packets"]) for f in fc.top_flows(10))
    assert got == [(0, 2), (7, 2), (9, 1)]      # the outer tag's id
    assert fc.skipped == 1


def test_ipv6_tcp_flags_are_ored(arena):
    l3 = IPv6(src="2001:db8::1", dst="2001:db8::2")
    frames = [(bytes(eth() / l3 / TCP(sport=443, dport=50000, flags=fl)), NOW)
              for fl in ("S", "A", "PA", "FA")]
    (f,) = cache(arena, frames).top_flows()
    assert (f["src"], f["dst"], f["sport"], f["dport"], f["proto"]) == \
        ("2001:db8::1", "2001:db8::2", 443, 50000, 6)
    assert f["tcp_flags"] == 0x02 | 0x10 | 0x08 | 0x01
    assert f["bytes"] == 4 * (40 + 20)


def udp(sport: int, t: int) -> tuple[bytes, int]:
    return bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=9)), t


def test_timeouts_end_flows_with_their_reason(arena):
    s = 10**9
    frames = [udp(1, NOW - 20 * s),                      # idle for 20 s: over 15
              udp(2, NOW - 70 * s), udp(2, NOW),         # 70 s old and busy: active timeout
              udp(3, NOW - s)]                           # neither
    fc = cache(arena, frames)
    assert fc.table.used == 1                            # the tick after the drain ended 2
    assert fc.ended[ipfix.IDLE_TIMEOUT] == 1 and fc.ended[ipfix.ACTIVE_TIMEOUT] == 1
    assert sorted(by_port(fc)) == [3]
    fc.close()
    assert fc.ended[ipfix.FORCED_END] == 1 and fc.table.used == 0


def ipfix_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s


def messages(sock: socket.socket) -> list[bytes]:
    out = []
    sock.settimeout(0.5)
    try:
        while True:
            out.append(sock.recv(65535))
    except TimeoutError:
        return out


def data_records(msgs: list[bytes]) -> list[tuple[int, bytes]]:
    """(template id, record bytes) of every data set, by the templates' record sizes."""
    out = []
    for m in msgs:
        body = m[ipfix.HEADER.size:]
        sid, slen = ipfix.SET_HEADER.unpack_from(body)
        size = ipfix.RECORD.get(sid, None)
        if size is not None:
            data = body[4:slen]
            out += [(sid, data[i:i + size.itemsize]) for i in range(0, len(data), size.itemsize)]
    return out


def test_eviction_is_counted_and_exported(arena):
    col = ipfix_listener()
    port = col.getsockname()[1]
    frames = [udp(p, NOW + p) for p in (1, 2, 3, 1, 4)]
    fc = cache(arena, frames, max_flows=2, collectors=[f"127.0.0.1:{port}"])
    fc.close()
    ended = fc.ended[ipfix.LACK_OF_RESOURCES]
    assert ended >= 2 and fc.exporter.records == ended + fc.ended[ipfix.FORCED_END]
    recs = data_records(messages(col))
    assert len(recs) == fc.exporter.records
    # every packet is in some exported record: evicted flows are exported, not lost
    assert sum(struct.unpack_from("!Q", r, 16)[0] for _, r in recs) == len(frames)
    counts = {m.name: m.samples for m in fc.collect()}
    assert counts["dataplane_flow_export_records"][0].value == len(recs)


def test_messages_follow_rfc7011(arena):
    col = ipfix_listener()
    port = col.getsockname()[1]
    frames = [udp(p, NOW) for p in range(1, 101)]
    fc = cache(arena, frames, collectors=[f"127.0.0.1:{port}"], observation_domain=42,
               mtu=600)
    fc.close()
    msgs = messages(col)
    head = [ipfix.HEADER.unpack_from(m) for m in msgs]
    assert all(v == 10 and ln == len(m) and ln <= 600 and dom == 42
               for (v, ln, _, _, dom), m in zip(head, msgs, strict=True))
    assert ipfix.SET_HEADER.unpack_from(msgs[0], 16)[0] == ipfix.TEMPLATE_SET_ID  # first
    # sequence number: data records sent before the message
    sent = 0
    for (_, _, _, seq, _), m in zip(head, msgs, strict=True):
        assert seq == sent
        sent += len(data_records([m]))
    assert sent == 100 == fc.exporter.records


def test_a_collector_that_is_not_there_is_counted(arena):
    gone = ipfix_listener()
    port = gone.getsockname()[1]
    gone.close()
    fc = cache(arena, [udp(1, NOW)], collectors=[f"127.0.0.1:{port}"], inactive_timeout=1e-9)
    fc.tick(time.monotonic())
    assert fc.exporter.send_errors >= 1      # the ICMP unreachable of the first message


@pytest.mark.parametrize("options, named", [
    ({"collector": []}, "collector"),
    ({"collectors": "127.0.0.1:4739"}, "collectors"),
    ({"collectors": ["127.0.0.1:99999"]}, "collectors"),
    ({"max_flows": 0}, "max_flows"),
    ({"active_timeout": "60"}, "active_timeout"),
    ({"inactive_timeout": -1}, "inactive_timeout"),
    ({"observation_domain": 1 << 32}, "observation_domain"),
    ({"mtu": True}, "mtu"),
])
def test_bad_options_name_the_option(options, named):
    with pytest.raises(ValueError, match=f'option "{named}"'):
        check_options(options)
    with pytest.raises(ConsumerLoadError, match=f'option "{named}"'):
        make(ConsumerCfg("f", "flows", options=options))


def test_the_builtin_entry_makes_a_flow_cache():
    r = make(ConsumerCfg("f", "flows", options={"max_flows": 10}))
    assert isinstance(r.consumer, FlowCache) and r.consumer.table.capacity == 10


def test_collector_addresses():
    assert ipfix.parse_collector("10.0.0.1:2055") == ("10.0.0.1", 2055)
    assert ipfix.parse_collector("[::1]:4739") == ("::1", 4739)
    assert ipfix.parse_collector("collector.example") == ("collector.example", 4739)


# ---- /flows and `dataplane flows` ----

def test_flows_endpoint_behind_basic_auth(arena):
    import json
    import urllib.error
    import urllib.request

    import bcrypt

    from dataplane.consumers.loop import Running
    from dataplane.consumers.stats import TrafficStats
    from dataplane.metrics.scrape import Endpoint
    from dataplane.metrics.server import serve
    from dataplane.metrics.webconfig import WebConfig
    from dataplane.run import flows

    stats, fc = TrafficStats(), FlowCache("fl", {})
    put(arena, [udp(p, NOW) for p in (7, 7, 8)])
    drain(ring_sources([arena]), [stats, fc])
    web = WebConfig("test", users={"u": bcrypt.hashpw(b"pw", bcrypt.gensalt(4))})
    with serve(web=web, port=0, routes={"/flows": flows.route(
            stats, [Running(stats), Running(fc)])}) as srv:
        base = srv.url.removesuffix("/metrics")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{base}/flows", timeout=5)
        data = json.loads(Endpoint(f"{base}/flows?n=1", user="u", password="pw").get())
        assert [(f["sport"], f["packets"]) for f in data["consumers"]["fl"]] == [(7, 2)]
        assert data["stats"][0]["packets"] == 2     # keyed by hash, sampled later
        with pytest.raises(Exception, match="400"):
            Endpoint(f"{base}/flows?n=0", user="u", password="pw").get()
        out = io.StringIO()
        assert flows.main(Endpoint(f"{base}/flows", user="u", password="pw"), 5, False, out,
                          print) == 0
        assert "10.0.0.1:8" in out.getvalue() and "10.0.0.2:9" in out.getvalue()


def test_flows_command_without_a_run():
    from tests.helpers.default_lab import free_port
    from tests.helpers.live_run import dp

    r = dp("flows", "--url", f"http://127.0.0.1:{free_port()}/flows")
    assert r.returncode == 1
    assert "connection refused; is it running?" in r.stderr
    assert dp("flows", "-n", "0").returncode == 2


# ---- the lab, exported to nfcapd ----

FLOWS, PER_FLOW, SIZE = 10, 300, 128      # the default lab's generator: 128-byte frames
FIRST_PORT = 2000


def nfcapd(d: Path) -> tuple[subprocess.Popen, int]:
    from tests.helpers.default_lab import free_port
    port = free_port()    # a free TCP port number; nfcapd listens on UDP: free too, in practice
    d.mkdir()
    p = subprocess.Popen(["nfcapd", "-w", str(d), "-p", str(port), "-b", "127.0.0.1", "-t", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def bound() -> bool:     # templates sent before nfcapd listens would be lost for 60 s
        assert p.poll() is None, f"nfcapd exited {p.returncode}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
        return False

    poll(bound, 10, "nfcapd listening")
    return p, port


def nfdump_flows(d: Path) -> dict[int, tuple[int, int]]:
    """src_port -> (packets, bytes) of the lab's flows nfdump reads back from d."""
    import json
    r = subprocess.run(["nfdump", "-R", str(d), "-o", "json"], capture_output=True, text=True,
                       env={**os.environ, "TZ": "UTC"}, timeout=60, check=True)
    out: dict[int, tuple[int, int]] = {}
    for f in json.loads(r.stdout or "[]"):
        if f.get("src4_addr") == "10.77.0.1" and f.get("dst_port") == 9:
            p, b = out.get(f["src_port"], (0, 0))
            out[f["src_port"]] = (p + f["in_packets"], b + f["in_bytes"])
    return out


def consumer(name: str, port: int, inactive: float) -> str:
    return f"""
[[consumer]]
name = "{name}"
entry = "flows"
[consumer.options]
collectors = ["127.0.0.1:{port}"]
inactive_timeout = {inactive}
"""


@pytest.mark.root("the lab: netns, veth")
def test_lab_flows_read_back_by_nfdump(tmp_path):
    import json

    from dataplane.metrics.scrape import Endpoint, Scrape
    from dataplane.run import flows
    from tests.helpers.default_lab import default_text
    from tests.helpers.live_run import DATAPLANE, ROOT, dp
    from tests.helpers.processes import stop_process

    # "idle": flows end on their idle timeout while the run goes on; "held": they stay active
    # (seen at /flows) and are exported when the run stops
    (idle, p_idle), (held, p_held) = nfcapd(tmp_path / "idle"), nfcapd(tmp_path / "held")
    text = default_text("fl", ("count = 0", f"count = {FLOWS * PER_FLOW}"),
                        ("vary_range = [1024, 2047]",
                         f"vary_range = [{FIRST_PORT}, {FIRST_PORT + FLOWS - 1}]"))
    cfg = tmp_path / "lab.toml"
    cfg.write_text(text + consumer("idle", p_idle, 1) + consumer("held", p_held, 600))
    url = flows.url_of(config_of(cfg))
    log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen([*DATAPLANE, "run", "--config", str(cfg), "--json"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        held_flows: list = []

        def all_held() -> bool:
            nonlocal held_flows
            assert run.poll() is None, f"the run exited {run.returncode}"
            try:
                held_flows = json.loads(Endpoint(url + "?n=100").get())["consumers"]["held"]
            except Exception:     # not up yet
                return False
            return sum(f["packets"] for f in held_flows) >= FLOWS * PER_FLOW

        poll(all_held, 60, "the held flows at /flows")
        assert sorted((f["sport"], f["packets"], f["bytes"]) for f in held_flows) == \
            [(FIRST_PORT + i, PER_FLOW, PER_FLOW * (SIZE - 14)) for i in range(FLOWS)]
        shown = dp("flows", "--config", str(cfg), "-n", "3")
        assert shown.returncode == 0, shown.stderr
        assert "held: 3 biggest active flows" in shown.stdout and "10.77.0.2:9" in shown.stdout

        def idle_ended() -> bool:
            s = Scrape.parse(Endpoint(url.replace("/flows", "/metrics")).get(), 0)
            return s.by("dataplane_flows_ended_total", "consumer", "reason").get(
                ("idle", "idle_timeout"), 0) == FLOWS

        poll(idle_ended, 30, "the idle flows ended by their timeout")
    finally:
        stop_process(run, signal.SIGINT, 90)
        out = run.stdout.read() if run.stdout else ""
        log.close()
    books = json.loads(out.strip().splitlines()[-1])
    (stream,) = books["streams"].values()
    assert stream["sent"] == FLOWS * PER_FLOW and books["totals"]["drops"] == 0, \
        out + (tmp_path / "run.log").read_text()
    for p in (idle, held):
        stop_process(p, signal.SIGTERM, 30)       # nfcapd writes its last file and exits
    want = {FIRST_PORT + i: (PER_FLOW, PER_FLOW * (SIZE - 14)) for i in range(FLOWS)}
    assert nfdump_flows(tmp_path / "idle") == want
    assert nfdump_flows(tmp_path / "held") == want


def config_of(path: Path):
    from dataplane import config
    return config.load(str(path))


def poll(cond, timeout: float, what: str) -> None:
    from dataplane.host.proc import poll as host_poll
    host_poll(cond, timeout, interval=0.2, what=what)


def test_promtool_accepts_the_federation_config():
    import shutil
    exe = shutil.which("promtool")
    assert exe, "promtool missing: scripts/bootstrap.sh installs Debian's prometheus"
    prom = Path(__file__).resolve().parents[1] / "config" / "prometheus"
    r = subprocess.run([exe, "check", "config", "federate.yml"], cwd=prom, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_lying_descriptor_is_left_out(arena):
    filler = RingFiller(arena)
    for f, t in (udp(1, NOW), udp(2, NOW)):
        filler.put([f], rx_ns=t, publish=False, **parsed(f))
    ring = arena.rings[0]
    ring.desc[(filler.prod - 1) & (ring.size - 1)]["addr"] = arena.buf.size - 8   # runs past
    filler.publish()
    fc = FlowCache("flows", {})
    drain(ring_sources([arena]), [fc])
    assert [f["sport"] for f in fc.top_flows()] == [1] and fc.skipped == 1


def test_keys_of_one_hash_are_two_flows():
    """The table compares whole keys: two keys given one hash (forced here) stay apart, also
    when the table is full and one must make room."""
    import numpy as np

    from dataplane.consumers.flowcache import FlowTable

    key = np.zeros((3, 5), dtype=np.uint64)
    key[:, 0] = [1, 2, 1]
    p = {"key": key, "hash": np.full(3, 7, dtype=np.uint64),
         "bytes": np.array([10, 20, 30], dtype=np.uint32), "tcpflags": np.zeros(3, np.uint8),
         "rx": np.array([1, 2, 3], dtype=np.int64)}
    table = FlowTable(2)
    assert table.add(p) == []
    assert table.used == 2 and list(table.keys[:2, 0]) == [1, 2]
    assert list(table.packets[:2]) == [2, 1] and list(table.bytes[:2]) == [40, 20]
    assert list(table.first[:2]) == [1, 2] and list(table.last[:2]) == [3, 2]
    key[:, 0] = [3, 3, 2]        # a third key; 2 is seen again first (rx 7, folded before the
    p["rx"] = np.array([5, 6, 7], dtype=np.int64)   # table makes room): 1 is the least recent
    (ended,) = table.add(p)
    assert list(ended["key"][:, 0]) == [1] and ended["reason"][0] == ipfix.LACK_OF_RESOURCES
    assert ended["packets"][0] == 2
    assert sorted(zip(table.keys[:2, 0], table.packets[:2], strict=True)) == [(2, 2), (3, 2)]


def test_more_new_flows_in_a_batch_than_the_table_holds(arena):
    fc = cache(arena, [udp(p, NOW) for p in (1, 2, 3, 4, 5, 1)], max_flows=2)
    fc.close()
    assert sum(fc.ended.values()) >= 5 and fc.ended[ipfix.LACK_OF_RESOURCES] >= 3


def test_random_descriptors_over_random_bytes(arena):
    """Whatever the descriptors say, dp_flow_keys reads inside the arena and never fails: the
    packets it keeps are exactly the IP ones whose frame lies inside the arena."""
    import numpy as np

    from dataplane.consumers.api import Batch, RingSource
    from dataplane.consumers.flowcache import packet_keys
    from dataplane.shm.layout import DESC_DTYPE

    rng = np.random.default_rng(12)
    arena.buf[:] = rng.integers(0, 256, arena.buf.size, dtype=np.uint8)
    d = np.zeros(4096, dtype=DESC_DTYPE)
    size = arena.buf.size
    edges = np.array([0, size - 60, size - 1, size, size + 7, 2**64 - 1], dtype=np.uint64)
    d["addr"] = edges[rng.integers(0, len(edges), 4096)] - rng.integers(0, 64, 4096).astype(
        np.uint64)
    d["len"] = rng.integers(0, 2048, 4096)
    d["ethertype"] = rng.choice([0x0800, 0x86DD, 0x0806], 4096)
    d["l4proto"] = rng.choice([6, 17, 1], 4096)
    d["l4_off"] = rng.integers(0, 2048, 4096)
    d["flags"] = rng.choice([0, lib.DP_F_MALFORMED], 4096, p=[0.9, 0.1])
    p, skipped = packet_keys(Batch(d, RingSource(arena, arena.rings[0])))
    inside = (d["addr"] <= size) & (d["len"].astype(np.uint64) <= size - np.minimum(
        d["addr"], size))
    ip = np.isin(d["ethertype"], [0x0800, 0x86DD]) & (d["flags"] == 0)
    kept = 0 if p is None else len(p["hash"])
    assert kept + skipped == 4096 and kept <= int(np.count_nonzero(inside & ip))
