"""The [[consumer]] tables of a config: code the run's consumer loop feeds every batch to.

    [[consumer]]
    name = "dns"                         # its name in logs and metrics ({consumer="dns"})
    entry = "dns_count:factory"          # MODULE:CALLABLE, or an entry point of the
                                         # "dataplane.consumers" group, or a built-in ("flows")
    path = "/opt/dataplane/consumers"    # optional: a directory searched for MODULE first
    rings = ["rx"]                       # WORKER or WORKER:PORT; default: every ring the run reads
    on_error = "restart"                 # restart (made again, at most 5 times a minute) | disable
    [consumer.options]                   # handed to the factory as a dict
    top = 10

The factory is called as `factory(name, options)` and returns a consumer
(dataplane.consumers.api); consumers run in the order of the tables, after the built-in
statistics ("stats"), one after another on the same batch.  The entry is imported when the run
starts (dataplane.consumers.registry), so `dataplane config check` names a typo before a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dataplane.consumers.loop import ON_ERROR

# names the run gives its own consumers: a [[consumer]] may not take them
RESERVED = ("stats", "capture")
_ENTRY = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?")


@dataclass
class ConsumerCfg:
    name: str
    entry: str
    path: str = ""
    rings: list[str] = field(default_factory=list)
    on_error: str = "restart"
    options: dict[str, Any] = field(default_factory=dict)


def _entry(v: str) -> str | None:
    return None if _ENTRY.fullmatch(v) else \
        'expected "package.module:callable", an entry point name or a built-in, e.g. "flows"'


def _path(v: str) -> str | None:
    return None if v.startswith("/") else 'expected an absolute directory path'


def _rings(v: list) -> str | None:
    return None if all(isinstance(x, str) and x for x in v) else \
        'expected a list of WORKER or WORKER:PORT names, e.g. ["rx", "gen:p0"]'


def parse(t) -> ConsumerCfg:
    """One [[consumer]] table (a dataplane.config.tables.Table)."""
    from dataplane.config.tables import checks
    name = t.get("name", str, check=checks.label)
    if name in RESERVED:
        t.error("name", name, f"reserved for the run's own consumers ({', '.join(RESERVED)})")
    cfg = ConsumerCfg(name or "", t.get("entry", str, check=_entry) or "",
                      t.get("path", str, "", check=_path),
                      list(t.get("rings", list, [], check=_rings)),
                      t.get("on_error", str, "restart", choices=ON_ERROR),
                      dict(t.get("options", dict, {})))
    t.close()
    return cfg


def cross_check(consumers: list[ConsumerCfg], cfg: Any, p) -> None:
    """Names unique; each ring a consumer reads is a worker's (or a transport receiver's),
    and a WORKER:PORT names one of that worker's ports."""
    names = [c.name for c in consumers]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        p.error(f'consumer name "{dup}" is used twice')
    ports = {w.name: [pt.name for pt in w.ports] for w in cfg.workers}
    ports.update({x.name: [x.label] for x in cfg.transports if x.role == "recv"})
    for i, c in enumerate(consumers):
        for r in c.rings:
            src, _, port = r.partition(":")
            if src not in ports:
                p.error(f'consumer[{i}].rings: "{r}": no worker or transport receiver "{src}" '
                        f"(there are: {', '.join(ports) or 'none'})")
            elif port and port not in ports[src]:
                p.error(f'consumer[{i}].rings: "{r}": "{src}" has no port "{port}" '
                        f"(ports: {', '.join(ports[src])})")
