"""Config validation, plan() and packet templates: no root, no kernel state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dataplane import config
from dataplane.config import specs
from dataplane.config import templates as template
from dataplane.config.loader import ConfigError
from dataplane.workers.spec import WorkerSpec

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[[worker]]
name = "w"
{worker}
  [[worker.port]]
  name = "p"
  driver = "af_packet"
  iface = "veth0"
  {port}
"""


def cfg_text(top: str = "", worker: str = "", port: str = "", tail: str = "") -> str:
    return top + BASE.format(worker=worker, port=port) + tail


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.loads(text, source="t.toml")
    return str(e.value)


GEN = '\n  [worker.generate]\n  port = "p"\n'

# (config text, substrings the one error message must contain: key path, value, what is allowed)
BAD = [
    (cfg_text(port='driver = "af_pakcet"').replace('driver = "af_packet"\n', ""),
     ['worker[0].port[0].driver = "af_pakcet"', "expected one of af_packet, af_xdp, memif, pci"]),
    (cfg_text(top='[metrcs]\nlisten = "127.0.0.1:1"\n'),
     ["metrcs: unknown key (did you mean metrics?)", "expected one of"]),
    (cfg_text(port="qeues = 2"), ["worker[0].port[0].qeues: unknown key (did you mean queues?)"]),
    (cfg_text(port='queues = "2"'), ['worker[0].port[0].queues = "2": expected an integer']),
    (cfg_text(port="queues = 0"), ["worker[0].port[0].queues = 0: expected 1..16"]),
    (cfg_text(worker='core = "one"'), ['worker[0].core = "one": expected an integer']),
    (cfg_text(worker="core = true"), ["worker[0].core = true: expected an integer"]),
    (cfg_text(worker="core = 4096"), ["worker[0].core = 4096: expected a CPU 0..",
                                      f"this machine has {os.cpu_count()}"]),
    (cfg_text(worker='name = "a/b"').replace('name = "w"\n', "", 1),
     ['worker[0].name = "a/b": expected 1-32 of']),
    (cfg_text(worker='poll = "lazy"'), ['worker[0].poll = "lazy": expected one of busy, adaptive']),
    (cfg_text(worker="idle_sleep_us = 50"),
     ['worker[0].idle_sleep_us = 50: only with poll = "adaptive"']),
    (cfg_text(worker='poll = "adaptive"\nidle_sleep_us = 0'),
     ["worker[0].idle_sleep_us = 0: expected 1..100000"]),
    (cfg_text(top="[arena]\nring_size = 1000\n"),
     ["arena.ring_size = 1000: expected a power of two"]),
    (cfg_text(top='[arena]\nhugepages = "maybe"\n'),
     ['arena.hugepages = "maybe": expected one of auto, yes, no']),
    (cfg_text(top="[arena]\npool_mb = 3\n"), ["arena.pool_mb = 3: expected a multiple of 2"]),
    (cfg_text(top="[arena]\npool_mb = 2\nmbufs = 8191\n"),
     ["arena.mbufs = 8191: needs about", "raise pool_mb or lower mbufs"]),
    (cfg_text(top='[metrics]\nlisten = "localhost"\n'),
     ['metrics.listen = "localhost": expected HOST:PORT']),
    (cfg_text(top='[metrics]\nlisten = "127.0.0.1:99999"\n'),
     ['metrics.listen = "127.0.0.1:99999": expected HOST:PORT', "port 1..65535"]),
    (cfg_text(top='[metrics]\nlisten = "::1:9477"\n'), ['metrics.listen = "::1:9477"']),
    (cfg_text(port='iface = "a-very-long-interface"').replace('iface = "veth0"\n', ""),
     ['worker[0].port[0].iface = "a-very-long-interface": expected an interface name']),
    (cfg_text().replace('driver = "af_packet"\n  iface = "veth0"', 'driver = "pci"'),
     ['worker[0].port[0].pci: missing; driver = "pci" needs it']),
    (cfg_text().replace('driver = "af_packet"\n  iface = "veth0"', 'driver = "pci"\npci = "3:0.0"'),
     ['worker[0].port[0].pci = "3:0.0": expected a PCI address like "0000:03:00.0"']),
    (cfg_text().replace('driver = "af_packet"\n  iface = "veth0"', 'driver = "af_xdp"'),
     ['worker[0].port[0].iface: missing; driver = "af_xdp" needs it']),
    (cfg_text().replace('driver = "af_packet"', 'driver = "memif"'),
     ['worker[0].port[0].iface = "veth0": only for driver = af_packet or af_xdp, not memif']),
    (cfg_text(port='role = "server"'),
     ['worker[0].port[0].role = "server": only for driver = memif, not af_packet']),
    (cfg_text().replace('driver = "af_packet"\n  iface = "veth0"',
                        'driver = "memif"\nsocket = "run/x.sock"'),
     ['worker[0].port[0].socket = "run/x.sock": expected an absolute path']),
    (cfg_text().replace('driver = "af_packet"\n  iface = "veth0"',
                        'driver = "memif"\nrole = "master"'),
     ['worker[0].port[0].role = "master": expected one of server, client']),
    (cfg_text(tail=GEN.replace('"p"', '"nope"')),
     ['worker[0].generate.port = "nope": expected one of this worker\'s ports (p)']),
    (cfg_text(tail=GEN), []),   # sanity: the generator stanza itself is fine
    (cfg_text(tail=GEN + "  size = 40\n"), ["worker[0].generate.size = 40: expected 60..2048"]),
    (cfg_text(tail=GEN + "  size = 65\n"),
     ["worker[0].generate.size = 65: expected at least 66", "24-byte generator trailer"]),
    (cfg_text(tail=GEN + '  src = "fd77::1"\n'),
     ['worker[0].generate.dst = "10.77.0.2": must be the same IP version as src = "fd77::1"']),
    (cfg_text(tail=GEN + '  src = "10.77.0.300"\n'),
     ['worker[0].generate.src = "10.77.0.300": expected an IPv4 or IPv6 address']),
    (cfg_text(tail=GEN + '  dst_mac = "02:00:00:00:00"\n'),
     ['worker[0].generate.dst_mac = "02:00:00:00:00": expected a MAC address']),
    (cfg_text(tail=GEN + "  vlan = [5000]\n"),
     ["worker[0].generate.vlan = [5000]: expected up to two VLAN ids"]),
    (cfg_text(tail=GEN + '  vary = "ttl"\n'),
     ['worker[0].generate.vary = "ttl": expected one of none, sport, dport']),
    (cfg_text(tail=GEN + "  vary_range = [10, 5]\n"),
     ["worker[0].generate.vary_range = [10, 5]: expected [first, last]"]),
    (cfg_text(tail=GEN + '  proto = "icmp"\n'),
     ['worker[0].generate.proto = "icmp": expected one of udp, tcp']),
    (cfg_text(tail=GEN + '  expr = "Ether()/IP()"\n'), ["worker[0].generate.expr: unknown key"]),
    (cfg_text(tail='\n  [[worker.port]]\n  name = "p"\n  driver = "af_xdp"\n  iface = "x"\n'),
     ['worker[0].port[1].name = "p": duplicate of worker[0].port[0].name']),
    (cfg_text() + cfg_text(), ['worker[1].name = "w": duplicate of worker[0].name']),
    ("[metrics]\n", ["worker: missing; expected at least one [[worker]] table"]),
    ('[[worker]]\nname = "w"\n', ["worker[0].port: missing"]),
    ("worker = 3\n", ["worker = 3: expected an array of tables"]),
    ("[[worker]\n", ["not valid TOML"]),
    (cfg_text(top='[lab]\nnamespaces = ["a"]\n[[lab.veth]]\nname = "v0"\nnetns = "a"\n'
                  'peer = "v1"\npeer_netns = "b"\n'),
     ['lab.veth[0].peer_netns = "b": expected one of lab.namespaces (a)']),
    (cfg_text(top='[lab]\nnamespaces = ["a"]\n[[lab.veth]]\nname = "v0"\nnetns = "a"\n'
                  'peer = "v1"\npeer_netns = "a"\naddress = "10.0.0.1"\n'),
     ['lab.veth[0].address = "10.0.0.1": expected an address with prefix']),
    (cfg_text(top='[lab]\nnamespaces = ["a", "a"]\n'),
     ['lab.namespaces = ["a", "a"]: expected each name once']),
]


@pytest.mark.parametrize("text,expect", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_names_key_value_and_allowed(text: str, expect: list[str]) -> None:
    if not expect:
        config.loads(text)
        return
    msg = problems(text)
    for part in expect:
        assert part in msg, f"{part!r} not in:\n{msg}"


def test_all_problems_reported_at_once() -> None:
    text = cfg_text(top="[arena]\nring_size = 3\n", worker='poll = "x"', port="queues = -1")
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    assert len(e.value.problems) == 3, e.value.problems
    assert "3 problems" in str(e.value)


def test_memif_one_server_per_socket() -> None:
    memif = 'driver = "memif"\nsocket = "/run/dataplane/m.sock"'
    one = cfg_text().replace('driver = "af_packet"\n  iface = "veth0"', memif)
    msg = problems(one + one.replace('name = "w"', 'name = "w2"'))
    assert 'worker[1].port[0].socket = "/run/dataplane/m.sock": already served by' in msg


def test_warnings_do_not_fail() -> None:
    two = cfg_text(worker="core = 0") + cfg_text(worker="core = 0").replace('"w"', '"w2"')
    cfg = config.loads(two + '[metrics]\nlisten = "0.0.0.0:9477"\n')
    text = "\n".join(cfg.warnings)
    assert 'worker[1].core = 0: also the core of worker "w"' in text
    assert "not loopback" in text


def test_embedded_default_loads_and_plans() -> None:
    cfg = config.load(None)
    specs = config.plan(cfg)
    assert [s.name for s in specs] == ["gen", "rx"]
    assert cfg.lab is not None and cfg.lab.namespaces == ["dp-gen", "dp-rx"]
    gen = specs[0]
    assert gen.worker_id == 0 and gen.core == 0 and gen.netns == "dp-gen"
    assert gen.ports[0].devargs == "net_af_packet0,iface=dpgen0,qpairs=1"
    assert gen.gen is not None and len(bytes.fromhex(gen.gen.template)) == 128
    assert specs[1].gen is None and specs[1].idle_sleep_us == 50
    for s in specs:   # the spec travels to the worker as JSON
        assert WorkerSpec.from_json(s.to_json()) == s


def test_config_default_is_the_embedded_one() -> None:
    """One default lab: config/default.toml, where users look, is the package's own file."""
    assert (ROOT / "config/default.toml").resolve() == (ROOT / "dataplane/default.toml").resolve()


def test_appliance_example_loads_and_plans_without_hugepages() -> None:
    cfg = config.load(ROOT / "config/appliance.toml")
    cfg.arena.hugepages = "no"
    (spec,) = config.plan(cfg)
    assert spec.ports[0].name == spec.ports[0].pci == "0000:03:00.0"
    assert spec.ports[0].devargs == "" and spec.ports[0].rxq == 4 and spec.idle_sleep_us == 0


def test_plan_vdev_names_and_devargs() -> None:
    text = cfg_text(tail="""
  [[worker.port]]
  name = "q"
  driver = "af_packet"
  iface = "veth1"
  queues = 2
  [[worker.port]]
  name = "x"
  driver = "af_xdp"
  iface = "veth2"
  [[worker.port]]
  name = "m"
  driver = "memif"
  role = "client"
  [[worker.port]]
  name = "n"
  driver = "pci"
  pci = "03:00.1"
""")
    (s,) = config.plan(config.loads(text))
    assert [p.devargs for p in s.ports] == [
        "net_af_packet0,iface=veth0,qpairs=1",
        "net_af_packet1,iface=veth1,qpairs=2",
        "net_af_xdp0,iface=veth2,start_queue=0,queue_count=1",
        "net_memif0,role=client,socket=/run/dataplane/memif.sock,socket-abstract=no,id=0",
        ""]
    assert s.ports[4].pci == "0000:03:00.1"
    assert [p.label for p in s.ports] == ["p", "q", "x", "m", "n"]
    assert s.rings() == ((0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (4, 0))
    two = config.plan(config.loads(cfg_text() + cfg_text().replace('"w"', '"w2"')))
    assert [s.ports[0].name for s in two] == ["net_af_packet0", "net_af_packet1"]


def test_plan_hugepages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = config.loads(cfg_text())
    monkeypatch.setattr(specs, "hugetlbfs_mounts", lambda: [tmp_path])
    monkeypatch.setattr(specs, "free_hugepages_2m", lambda: 1000)
    (s,) = config.plan(cfg)
    assert s.hugepages and s.huge_dir == str(tmp_path)
    assert s.arena_path == str(tmp_path / "dataplane-w")
    monkeypatch.setattr(specs, "free_hugepages_2m", lambda: 3)       # not enough: /dev/shm
    (s,) = config.plan(cfg)
    assert not s.hugepages and s.arena_path == "/dev/shm/dataplane-w"
    cfg.arena.hugepages = "yes"
    with pytest.raises(ConfigError, match=r'arena.hugepages = "yes": free 2 MB hugepages: 3'):
        config.plan(cfg)


def test_gen_spec_fields() -> None:
    text = cfg_text(tail=GEN + '  vary = "dport"\n  vary_range = [5000, 5009]\n  rate_pps = 7\n'
                    "  checksum = false\n  stream = 9\n")
    (s,) = config.plan(config.loads(text))
    g = s.gen
    assert g is not None and (g.port, g.rate_pps, g.csum, g.stream) == (0, 7, 0, 9)
    assert (g.vary_off, g.vary_min, g.vary_max) == (14 + 20 + 2, 5000, 5009)


def test_template_parses_back_with_scapy() -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    t = template.build(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02",
                       src="10.1.0.1", dst="10.1.0.2", proto="udp", sport=1111, dport=2222,
                       size=128, vary="sport")
    assert len(t.frame) == 128 and t.frame[-template.TRAILER_LEN:] == bytes(24)
    pkt = Ether(t.frame)
    assert pkt[IP].src == "10.1.0.1" and pkt[UDP].sport == 1111 and pkt[UDP].dport == 2222
    assert pkt[UDP].len == 128 - 14 - 20
    assert int.from_bytes(t.frame[t.vary_off:t.vary_off + 2], "big") == 1111


def test_template_ipv6_tcp_qinq() -> None:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
    size = template.min_size(6, "tcp", 2)
    assert size == 14 + 8 + 40 + 20 + 24
    t = template.build(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02",
                       src="fd77::1", dst="fd77::2", proto="tcp", sport=1, dport=4242,
                       size=size, vlan=(100, 200), vary="dport")
    pkt = Ether(t.frame)
    assert pkt[Dot1AD].vlan == 100 and pkt[Dot1Q].vlan == 200 and pkt[TCP].dport == 4242
    assert t.l4_off == 14 + 8 + 40 and t.vary_off == t.l4_off + 2
    assert int.from_bytes(t.frame[t.vary_off:t.vary_off + 2], "big") == 4242
    with pytest.raises(ValueError, match="too small"):
        template.build(src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02", src="fd77::1",
                       dst="fd77::2", proto="tcp", sport=1, dport=2, size=size - 1,
                       vlan=(1, 2))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def test_plan_json_is_valid() -> None:
    specs = config.plan(config.load(None))
    assert json.loads(specs[0].to_json())["ports"][0]["label"] == "out"
