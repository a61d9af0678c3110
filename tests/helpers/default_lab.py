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
