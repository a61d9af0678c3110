"""The consumer API: [[consumer]] entries resolved (module:callable from a directory of its own,
an installed entry point, clear errors for every way it can be wrong), consumers that raise
made again or disabled while the others see every batch, and the example of docs/consumers.md
(examples/consumers/dns_count.py) counting the DNS queries sent through a live run of the lab."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP

from dataplane import config
from dataplane.config.consumers import ConsumerCfg
from dataplane.consumers.loop import MAX_REMAKES, ConsumerLoop, drain, ring_sources
from dataplane.consumers.registry import ConsumerLoadError, make
from tests.helpers.frames import RingFiller, frame
from tests.helpers.live_run import live_run
from tests.helpers.metrics import metric

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "consumers"

FLAKY = '''
class Flaky:
    """Raises on every `fail_every`-th batch; counts what it saw."""
    made = 0

    def __init__(self, name, options):
        self.name, self.every, self.seen, self.calls = name, options["fail_every"], 0, 0
        Flaky.made += 1

    def on_batch(self, batch):
        self.calls += 1
        if self.calls % self.every == 0:
            raise RuntimeError("flaky")
        self.seen += len(batch)


def not_a_consumer(name, options):
    return object()


def refuses(name, options):
    raise ValueError(f"option top = {options.get('top')!r}: expected a positive integer")


NOT_CALLABLE = 3
'''


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A directory of the user's own, not on sys.path, with a module of consumers."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / f"flaky_{tmp_path.name}.py").write_text(FLAKY)
    return d


def _cfg(package: Path, attr: str, **kw) -> ConsumerCfg:
    return ConsumerCfg("c1", f"flaky_{package.parent.name}:{attr}", str(package), **kw)


@pytest.mark.parametrize("attr,why", [
    ("missing", "AttributeError"),
    ("NOT_CALLABLE", "is not callable"),
    ("not_a_consumer", "returned object, which has no on_batch()"),
    ("refuses", "raised ValueError: option top = None: expected a positive integer"),
])
def test_a_bad_entry_is_a_clear_error(package: Path, attr: str, why: str):
    with pytest.raises(ConsumerLoadError, match=f'consumer "c1": .*{why}'):
        make(_cfg(package, attr))


def test_unknown_module_and_unknown_name():
    with pytest.raises(ConsumerLoadError, match=r"No module named 'nowhere_.*' \(searched /tmp"):
        make(ConsumerCfg("c1", "nowhere_xyz:factory", "/tmp"))
    with pytest.raises(ConsumerLoadError, match='not a built-in .* nor an entry point of the '
                                                '"dataplane.consumers" group'):
        make(ConsumerCfg("c1", "no_such_consumer"))


def test_an_installed_entry_point_is_found(package: Path, monkeypatch):
    """The dist-info of an installed package names the factory; importlib.metadata finds it
    on sys.path as pip would have put it there."""
    dist = package / "mine_consumers-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mine-consumers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[dataplane.consumers]\nflaky = flaky_{package.parent.name}:Flaky\n")
    monkeypatch.syspath_prepend(str(package))
    r = make(ConsumerCfg("c2", "flaky", options={"fail_every": 10**9}))
    assert type(r.consumer).__name__ == "Flaky" and r.consumer.name == "c2"


def test_a_failing_consumer_is_made_again_then_disabled(package: Path, new_arena):
    """on_error = restart: made again by its factory after each error, at most MAX_REMAKES
    times a minute, then disabled; the consumer after it sees every packet all along."""
    arena = new_arena("api", ring_size=64)
    flaky = make(_cfg(package, "Flaky", options={"fail_every": 2}))
    steady = make(_cfg(package, "Flaky", options={"fail_every": 10**9}))
    steady.name = "steady"
    filler, total = RingFiller(arena), 0
    for _ in range(2 * (MAX_REMAKES + 2)):
        filler.put([frame(IP() / UDP(), 64)] * 8)
        total += drain(ring_sources([arena]), [flaky, steady], max_batch=8)
    assert total == 8 * 2 * (MAX_REMAKES + 2) == steady.consumer.seen == steady.packets
    assert flaky.remakes == MAX_REMAKES and flaky.errors == MAX_REMAKES + 1
    assert "RuntimeError: flaky (5 times made again)" in flaky.disabled
    assert steady.errors == 0 and not steady.disabled
    assert arena.rings[0].cons == filler.prod, "every batch released"


def test_disable_on_first_error(package: Path, new_arena):
    arena = new_arena("api2", ring_size=64)
    flaky = make(_cfg(package, "Flaky", on_error="disable", options={"fail_every": 1}))
    RingFiller(arena).put([frame(IP() / UDP(), 64)] * 8)
    loop = ConsumerLoop(ring_sources([arena]), [flaky])
    assert loop.sweep() == 8
    assert flaky.errors == 1 and flaky.remakes == 0 and flaky.disabled == "RuntimeError: flaky"
    loop.close()


def test_config_table_checks():
    base = (ROOT / "config/default.toml").read_text()
    bad = base + '''
[[consumer]]
name = "stats"
entry = "not an entry"
rings = ["nope", "rx:nope"]
on_error = "retry"
colour = 1
'''
    with pytest.raises(config.ConfigError) as e:
        config.loads(bad)
    text = str(e.value)
    for want in ('consumer[0].name = "stats": reserved', 'consumer[0].entry = "not an entry"',
                 'no worker or transport receiver "nope"', '"rx" has no port "nope"',
                 'on_error = "retry": expected one of restart, disable',
                 "consumer[0].colour: unknown key"):
        assert want in text, text


# ---- the example of docs/consumers.md ----

def _dns(name: str, answer: bool = False, vlan: bool = False, dport: int = 53) -> bytes:
    msg = DNS(id=1, qr=int(answer), qd=DNSQR(qname=name),
              an=[DNSRR(rrname=name, rdata="10.0.0.1")] if answer else [])
    return frame(IP(src="10.77.0.1", dst="10.77.0.2") / UDP(sport=5353, dport=dport) / msg,
                 vlan=vlan)


def test_the_docs_show_the_example_as_it_is():
    doc = (ROOT / "docs/consumers.md").read_text()
    block = doc.split("```python\n")[1].split("```")[0]
    assert block == (EXAMPLES / "dns_count.py").read_text(), \
        "docs/consumers.md: paste examples/consumers/dns_count.py into its python block again"


def test_dns_example_counts_queries_only(new_arena, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    arena = new_arena("dnsx", ring_size=256)
    dns = make(ConsumerCfg("dns", "dns_count:factory", str(EXAMPLES),
                           options={"max_names": 2}))
    frames = ([_dns("example.org")] * 5 + [_dns("example.org", answer=True)] * 3 +
              [_dns("a.test", vlan=True)] * 2 + [_dns("b.test"), _dns("c.test")] +
              [_dns("example.org", dport=5353)] * 4 +
              [frame(IP() / UDP(dport=53) / b"\xff\x00garbage")] +
              [frame(IP() / UDP(), 64)] * 10)
    RingFiller(arena).put(frames, native=True)
    drain(ring_sources([arena]), [dns], max_batch=7)
    assert dns.consumer.counts == {"example.org.": 5, "a.test.": 2, "(other)": 2}
    assert dns.consumer.malformed == 1 and dns.errors == 0


@pytest.mark.root("a dataplane run of the lab: network namespaces and veths")
def test_dns_example_on_a_live_run(tmp_path: Path):
    """The lab with the example consumer loaded from its own directory; DNS queries sent from
    the generator's namespace onto the link, beside the generator's traffic."""
    extra = f'''
[[consumer]]
name = "dns"
entry = "dns_count:factory"
path = "{EXAMPLES}"
rings = ["rxcapi"]
'''
    with live_run(tmp_path, "capi", rate=2000, extra=extra) as run:
        ns, iface = "dpe-capi-g", "dpecapig"
        send = (f"from scapy.all import *\n"
                f"q = Ether(src='02:77:00:00:00:01', dst='02:77:00:00:00:02') / "
                f"IP(src='10.77.0.1', dst='10.77.0.2') / UDP(sport=5353, dport=53)\n"
                f"sendp([q / DNS(rd=1, qd=DNSQR(qname='example.org'))] * 30 + "
                f"[q / DNS(rd=1, qd=DNSQR(qname='dataplane.test'))] * 12, iface='{iface}', "
                f"verbose=0)\n")
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send], check=True,
                       timeout=60)
        deadline, text = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            with urllib.request.urlopen(run.url, timeout=5) as r:
                text = r.read().decode()
            if metric(text, "dataplane_dns_queries_total", qname="dataplane.test.") >= 12:
                break
            time.sleep(0.3)
        assert metric(text, "dataplane_dns_queries_total", consumer="dns",
                      qname="example.org.") == 30, text
        assert metric(text, "dataplane_dns_queries_total", qname="dataplane.test.") == 12
        assert metric(text, "dataplane_consumer_errors_total", consumer="dns") == 0
        assert metric(text, "dataplane_consumer_up", consumer="dns") == 1
        # both consumers saw the same packets: the example after the built-in statistics
        assert metric(text, "dataplane_consumer_packets_total", consumer="dns") > 0
        assert metric(text, "dataplane_consumer_seconds_total", consumer="dns") > 0
