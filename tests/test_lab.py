"""The veth/netns lab against the real kernel, with this test run's own names (prefix dpt-)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dataplane import config
from dataplane.host.proc import poll
from dataplane.run import lab

ROOT = pytest.mark.root("namespaces and veth")     # lab.up/down; the rest run as anyone

TAG = f"{os.getpid() % 100000}"      # unique per run, so parallel colleagues do not collide


def lab_config(tag: str = TAG) -> config.Config:
    return config.loads(f"""
[lab]
namespaces = ["dpt-{tag}-a", "dpt-{tag}-b"]
[[lab.veth]]
name = "dpt{tag}a"
netns = "dpt-{tag}-a"
address = "10.250.0.1/24"
mac = "02:fa:00:00:00:01"
peer = "dpt{tag}b"
peer_netns = "dpt-{tag}-b"
peer_address = "10.250.0.2/24"
mtu = 1400
[[worker]]
name = "w"
[[worker.port]]
name = "p"
driver = "af_packet"
iface = "dpt{tag}a"
""")


@pytest.fixture
def cfg() -> Iterator[config.Config]:
    c = lab_config()
    yield c
    lab.down(c)


def host_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def udp_across(cfg: config.Config) -> bytes:
    """Send one UDP datagram from namespace a to b's address; what b received."""
    a, b = cfg.lab.namespaces
    recv = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            "s.bind(('10.250.0.2',9999)); s.settimeout(5); print('ready',flush=True); "
            "sys.stdout.write(s.recv(100).decode())")
    rx = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", recv],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        send = ("import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                "s.sendto(b'hello-lab',('10.250.0.2',9999))")
        subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", send], check=True)
        out, _ = rx.communicate(timeout=10)
    finally:
        rx.kill()
        rx.wait()
    return out.encode()


@ROOT
def test_up_down_round_trip(cfg: config.Config) -> None:
    assert not lab.exists(cfg)
    lab.up(cfg)
    lab.up(cfg)                                  # twice: harmless
    assert lab.exists(cfg)
    st = lab.status(cfg)
    a, b = st["links"]
    assert a["state"] == b["state"] == "UP"
    assert a["addresses"] == ["10.250.0.1/24"] and b["addresses"] == ["10.250.0.2/24"]
    assert a["mac"] == "02:fa:00:00:00:01"
    assert lab.link(a["name"], a["netns"])["mtu"] == 1400
    # Built inside the namespaces: nothing of the lab shows on the host.
    assert f"dpt{TAG}a" not in host_links() and f"dpt{TAG}b" not in host_links()
    # ipv6 = false: no link-local address (the lists above), so no DAD or router
    # solicitations in counters, because IPv6 is off on both ends, as the kernel says
    for end in (a, b):
        off = subprocess.run(["ip", "netns", "exec", end["netns"], "cat",
                              f"/proc/sys/net/ipv6/conf/{end['name']}/disable_ipv6"],
                             capture_output=True, text=True, check=True).stdout
        assert off.strip() == "1", end
    assert udp_across(cfg) == b"hello-lab"
    lab.down(cfg)
    lab.down(cfg)                                # twice: harmless
    st = lab.status(cfg)
    assert not any(st["namespaces"].values()) and not any(lk["present"] for lk in st["links"])
    assert not os.path.exists(f"/run/netns/dpt-{TAG}-a")


@ROOT
def test_down_after_crash_half_built(cfg: config.Config) -> None:
    # A crash after the namespaces but before the veth: down removes what is there.
    for ns in cfg.lab.namespaces:
        lab.ip("netns", "add", ns)
    lab.down(cfg)
    assert not any(lab.status(cfg)["namespaces"].values())


@ROOT
def test_down_leaves_other_namespaces_alone(cfg: config.Config) -> None:
    other = lab_config(f"{TAG}x")
    lab.up(other)
    try:
        lab.up(cfg)
        lab.down(cfg)
        assert lab.exists(other)
    finally:
        lab.down(other)


def test_ip_error_names_command_and_stderr() -> None:
    with pytest.raises(lab.LabError, match=r"ip link del dev dpt-no-such: exit \d+: .*"):
        lab.ip("link", "del", "dev", "dpt-no-such")


def test_poll() -> None:
    seen = iter([0, 0, 3])
    assert poll(lambda: next(seen), timeout=1, interval=0) == 3
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        poll(lambda: False, timeout=0.05, what="nothing")


def test_no_lab_table() -> None:
    c = config.loads('[[worker]]\nname = "w"\n[[worker.port]]\nname = "p"\ndriver = "pci"\n'
                     'pci = "0000:00:03.0"\n')
    with pytest.raises(lab.LabError, match="no \\[lab\\] table"):
        lab.up(c)
