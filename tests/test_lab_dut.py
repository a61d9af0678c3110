"""[lab.dut]: a device under test between the generator and the receiver.  The config checks run
as any user; the shipped router and bridge labs, and a user's command as the DUT, against the
real kernel as root (their namespaces and links gone after `down`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataplane import config
from dataplane.config.tables import ConfigError
from dataplane.run import dut, lab

ROOT_DIR = Path(__file__).resolve().parent.parent
ROUTER, BRIDGE = ROOT_DIR / "config/dut-router.toml", ROOT_DIR / "config/dut-bridge.toml"
LAB_ROOT = pytest.mark.root("namespaces, veths, a bridge and a router")


def with_dut(dut_table: str, extra_veth: str = "") -> str:
    """The router example's text with its [lab.dut] table replaced."""
    text = ROUTER.read_text()
    head, rest = text.split("[lab.dut]", 1)
    tail = rest[rest.index("[metrics]"):]
    return head + extra_veth + "[lab.dut]\n" + dut_table + "\n" + tail


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    return str(e.value)


def test_examples_load() -> None:
    r = config.load(ROUTER)
    assert r.lab.dut.mode == "router" and r.lab.dut.netns == "dpr-dut"
    assert (r.lab.dut.ingress.far, r.lab.dut.egress.far) == ("drgen0", "drrx0")
    assert r.lab.dut.ingress.far_mac == "02:78:00:00:00:01"
    b = config.load(BRIDGE)
    assert (b.lab.dut.mode, b.lab.dut.bridge) == ("bridge", "dutbr0")


@pytest.mark.parametrize(("table", "said"), [
    ('netns = "nope"\nmode = "router"\ningress = "dutin0"\negress = "dutout0"',
     'lab.dut.netns = "nope": expected one of lab.namespaces'),
    ('netns = "dpr-dut"\nmode = "switch"\ningress = "dutin0"\negress = "dutout0"',
     'lab.dut.mode = "switch": expected one of router, bridge, command'),
    ('netns = "dpr-dut"\nmode = "router"\ningress = "drgen0"\negress = "dutout0"',
     'lab.dut.ingress = "drgen0": expected a [[lab.veth]] end (name or peer) in netns'),
    ('netns = "dpr-dut"\nmode = "router"\ningress = "dutin0"\negress = "dutin0"',
     'lab.dut.egress = "dutin0": the same interface as ingress'),
    ('netns = "dpr-dut"\nmode = "router"\ningress = "dutin0"\negress = "dutout0"\n'
     'bridge = "br0"', 'lab.dut.bridge = "br0": only with mode = "bridge"'),
    ('netns = "dpr-dut"\nmode = "bridge"\ningress = "dutin0"\negress = "dutout0"',
     "lab.dut.bridge: missing"),
    ('netns = "dpr-dut"\nmode = "command"\ningress = "dutin0"\negress = "dutout0"\n'
     'command = "sleep 1"', 'lab.dut.command = "sleep 1": expected an array'),
    ('netns = "dpr-dut"\nmode = "command"\ningress = "dutin0"\negress = "dutout0"\n'
     'command = []', "lab.dut.command = []: expected an argv list"),
    ('netns = "dpr-dut"\nmode = "router"\ningress = "dutin0"\negress = "dutout0"\nspeed = 1',
     "lab.dut.speed: unknown key"),
])
def test_dut_table_errors(table: str, said: str) -> None:
    assert said in problems(with_dut(table))


def test_router_needs_addresses_macs_and_two_subnets() -> None:
    text = ROUTER.read_text()
    said = problems(text.replace('peer_address = "10.78.1.254/24"\n', ""))
    assert 'lab.dut.egress = "dutout0": mode = "router" needs the address of dutout0' in said
    said = problems(text.replace('mac = "02:78:00:00:01:02"\n', ""))
    assert "needs the mac of drrx0" in said
    said = problems(text.replace('address = "10.78.1.2/24"', 'address = "10.78.9.2/24"'))
    assert "drrx0's address 10.78.9.2/24 is not in dutout0's subnet 10.78.1.0/24" in said
    assert "two separate subnets" in problems(text.replace("10.78.1.", "10.78.0."))


def udp_through(cfg: config.Config, dst: str) -> bytes:
    """One UDP datagram from the generator's namespace to dst in the receiver's, through the
    DUT, by the kernel's own stack: what the receiver's socket got."""
    d = cfg.lab.dut
    recv = (f"import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            f"s.bind(('{dst}',9999)); s.settimeout(5); print('ready',flush=True); "
            "sys.stdout.write(s.recv(100).decode())")
    rx = subprocess.Popen(["ip", "netns", "exec", d.egress.far_netns, sys.executable, "-c",
                           recv], stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        send = (f"import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                f"s.sendto(b'through the dut', ('{dst}', 9999))")
        subprocess.run(["ip", "netns", "exec", d.ingress.far_netns, sys.executable, "-c", send],
                       check=True, timeout=10)
        out, _ = rx.communicate(timeout=10)
        return out.encode()
    finally:
        rx.kill()
        rx.wait()


def host_clean(cfg: config.Config) -> None:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in names.split() for ns in cfg.lab.namespaces), names
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for v in cfg.lab.veths:
        assert f" {v.name}@" not in links and f" {v.peer}@" not in links


@LAB_ROOT
@pytest.mark.parametrize("path", [ROUTER, BRIDGE], ids=["router", "bridge"])
def test_dut_forwards_and_down_leaves_nothing(path: Path) -> None:
    cfg = config.load(path)
    try:
        lab.up(cfg)
        lab.up(cfg)                     # idempotent
        assert lab.exists(cfg)
        before = dut.counters(cfg.lab.dut)
        dst = cfg.lab.dut.egress.far_address.split("/")[0]
        assert udp_through(cfg, dst) == b"through the dut"
        after = dut.counters(cfg.lab.dut)
        # the DUT itself saw the datagram come in and go out
        assert after["ingress"]["rx_packets"] > before["ingress"]["rx_packets"]
        assert after["egress"]["tx_packets"] > before["egress"]["tx_packets"]
        st = lab.status(cfg)["dut"]
        assert st["present"] and st["mode"] == cfg.lab.dut.mode
    finally:
        lab.down(cfg)
    lab.down(cfg)                       # idempotent
    host_clean(cfg)
    assert not lab.status(cfg)["dut"]["present"]


@LAB_ROOT
def test_command_dut_started_in_its_namespace_and_stopped_at_down(tmp_path: Path) -> None:
    # the user's command: a forwarder of its own (here: the kernel's, switched on by the command
    # itself) that stays up until `down`
    script = tmp_path / "dut.sh"
    script.write_text("sysctl -q -w net.ipv4.ip_forward=1\nexec sleep 600\n")
    cmd = f'["sh", "{script}"]'
    cfg = config.loads(with_dut(f'netns = "dpr-dut"\nmode = "command"\ningress = "dutin0"\n'
                                f'egress = "dutout0"\ncommand = {cmd}'))
    try:
        lab.up(cfg)
        pids = dut.pids("dpr-dut")
        assert len(pids) == 1 and lab.exists(cfg)
        assert Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep",
                                                                                   b"600"]
        lab.up(cfg)                     # running already: not a second one
        assert dut.pids("dpr-dut") == pids
        # addressed like a router: the lab's neighbours and routes, the command's forwarding
        assert udp_through(cfg, "10.78.1.2") == b"through the dut"
    finally:
        lab.down(cfg)
    assert not Path(f"/proc/{pids[0]}").exists()
    host_clean(cfg)


@LAB_ROOT
def test_command_that_fails_at_once_is_an_error() -> None:
    cfg = config.loads(with_dut('netns = "dpr-dut"\nmode = "command"\ningress = "dutin0"\n'
                                'egress = "dutout0"\ncommand = ["sh", "-c", "echo no way; '
                                'exit 3"]'))
    try:
        with pytest.raises(lab.LabError, match="exited 3 at once: no way"):
            lab.up(cfg)
    finally:
        lab.down(cfg)
    host_clean(cfg)
