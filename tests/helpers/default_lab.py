"""The shipped default lab (config/default.toml) renamed for one test: its namespaces, veths and
workers carry the test's tag, so runs of several tests (or several checkouts) never collide, and
its metrics listen on a free port."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataplane.config import Config

DEFAULT = Path(__file__).resolve().parents[2] / "config" / "default.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_text(tag: str, *more: tuple[str, str]) -> str:
    """default.toml with the tag in every name and a free metrics port, then `more`
    (old, new) replacements; each old text must be there, so a changed default fails loudly."""
    text = DEFAULT.read_text()
    for old, new in (("dp-gen", f"dpe-{tag}-g"), ("dp-rx", f"dpe-{tag}-r"),
                     ("dpgen0", f"dpe{tag}g"), ("dprx0", f"dpe{tag}r"),
                     ('name = "gen"', f'name = "gen{tag}"'), ('name = "rx"', f'name = "rx{tag}"'),
                     ("127.0.0.1:9477", f"127.0.0.1:{free_port()}"), *more):
        assert old in text, old
        text = text.replace(old, new)
    return text


def lab_config(tag: str, count: int = 0, rate: int = 20000, gen: bool = True,
               rx_driver: str = "af_xdp") -> Config:
    """The default lab, renamed, generating `count` packets (0: until stopped) at `rate`, the
    receiver on `rx_driver`; without the generator if not `gen`."""
    from dataplane import config

    text = default_text(tag, ("count = 0", f"count = {count}"),
                        ("rate_pps = 20000", f"rate_pps = {rate}"),
                        ('driver = "af_xdp"', f'driver = "{rx_driver}"'))
    cfg = config.loads(text, source=f"default.toml for test {tag}")
    if not gen:
        cfg.workers = [w for w in cfg.workers if w.name != f"gen{tag}"]
    return cfg


def ship_rx_ring(cfg: Config, tag: str, key: Path) -> None:
    """Add to a lab_config() a TCP transport: the rx worker's ring shipped by a sender
    "ship{tag}" in the rx namespace to a receiver "col{tag}" in the gen namespace, whose port is
    labelled "from-rx"; both ends authenticate with a new key written to `key`."""
    import os

    from dataplane import config
    from dataplane.config.loader import Veth
    from dataplane.transport import auth

    auth.write_key(key, auth.generate_key())
    tport = 7000 + os.getpid() % 1000
    # the transport gets a network of its own (as it would in a deployment): over the captured
    # veth, the receiver's AF_PACKET socket would capture the transport's own TCP segments
    assert cfg.lab is not None
    cfg.lab.veths.append(Veth(name=f"dpt{tag}g", netns=f"dpe-{tag}-g", peer=f"dpt{tag}r",
                              peer_netns=f"dpe-{tag}-r", address="10.78.0.1/24",
                              peer_address="10.78.0.2/24"))
    extra = config.loads(DEFAULT.read_text() + f"""
[[transport]]
name = "ship{tag}"
role = "send"
from = "rx.in"
peer = "10.78.0.1:{tport}"
mode = "zerocopy"
netns = "dpe-{tag}-r"
key_file = "{key}"
[[transport]]
name = "col{tag}"
role = "recv"
listen = "10.78.0.1:{tport}"
label = "from-rx"
netns = "dpe-{tag}-g"
key_file = "{key}"
""")
    for x in extra.transports:
        x.worker = f"rx{tag}" if x.worker else ""
    cfg.transports = extra.transports
