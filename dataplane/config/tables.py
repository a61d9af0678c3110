"""Validation helpers for dataplane.config.loader: tables that know their key path, value checks.

A check returns None when a value is fine, else a phrase saying what is allowed; `Table.get`
puts the key path and the value in front of it, and `Table.close` reports the keys nobody asked
for (a typo), so every message names its key path:

    >>> p = Problems()
    >>> port = Table(p, "worker[1].port[0]", {"driver": "af_pakcet", "ifcae": "eth1"})
    >>> port.get("driver", str, choices=("af_packet", "af_xdp", "memif", "pci")) is None
    True
    >>> port.get("iface", str, "")
    ''
    >>> port.close()
    >>> for message in p.errors:
    ...     print(message)
    worker[1].port[0].driver = "af_pakcet": expected one of af_packet, af_xdp, memif, pci
    worker[1].port[0].ifcae: unknown key (did you mean iface?); expected one of driver, iface
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Callable
from typing import Any

REQUIRED: Any = object()
Check = Callable[[Any], "str | None"]
KIND_NAMES = {int: "an integer", str: "a string", bool: "true or false", list: "an array",
              dict: "a table"}


class ConfigError(ValueError):
    """Every problem found in one config, each naming its key path, value and what is allowed."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n > 1 else ''}:\n  - "
                         + "\n  - ".join(self.problems))


def fmt(value: Any) -> str:
    """A value as it would be written in TOML (close enough for a message)."""
    return json.dumps(value, default=str)


class Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)

    def unique(self, path: str, names: list[Any], key: str) -> None:
        first: dict[Any, int] = {}
        for i, n in enumerate(names):
            if n is None:
                continue
            if n in first:
                self.error(f"{path}[{i}].{key} = {fmt(n)}: duplicate of {path}[{first[n]}].{key}"
                           "; names must be unique")
            first.setdefault(n, i)


def _is(value: Any, kind: type) -> bool:
    # TOML booleans are Python bools, and bool is a subclass of int: `core = true` is not a core.
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


class Table:
    """One TOML table being read.  get() records each key asked for; close() reports the rest."""

    def __init__(self, problems: Problems, path: str, data: Any):
        if not isinstance(data, dict):
            problems.error(f"{path} = {fmt(data)}: expected a table")
            data = {}
        self.p, self.path, self.data = problems, path, data
        self.known: list[str] = []

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def error(self, k: str, value: Any, msg: str) -> None:
        self.p.error(f"{self.key(k)}: {msg}" if value is None else
                     f"{self.key(k)} = {fmt(value)}: {msg}")

    def get(self, k: str, kind: type, default: Any = REQUIRED, *,
            choices: tuple[str, ...] | None = None, check: Check | None = None) -> Any:
        """The value of k, or `default` (None when required) if it is missing or wrong."""
        self.known.append(k)
        fallback = None if default is REQUIRED else default
        if k not in self.data:
            if default is REQUIRED:
                what = f"one of {', '.join(choices)}" if choices else KIND_NAMES[kind]
                self.error(k, None, f"missing; expected {what}")
            return fallback
        v = self.data[k]
        if not _is(v, kind):
            self.error(k, v, f"expected {KIND_NAMES[kind]}")
            return fallback
        if choices is not None and v not in choices:
            self.error(k, v, f"expected one of {', '.join(choices)}")
            return fallback
        msg = check(v) if check else None
        if msg:
            self.error(k, v, msg)
            return fallback
        return v

    def refuse(self, k: str, why: str) -> None:
        """k is a known key that does not apply here: an error if it is set."""
        self.known.append(k)
        if k in self.data:
            self.error(k, self.data[k], why)

    def table(self, k: str) -> Table:
        self.known.append(k)
        return Table(self.p, self.key(k), self.data.get(k, {}))

    def tables(self, k: str, required: bool = False) -> list[Table]:
        """An array of tables ([[k]]); each gets its index in its path."""
        self.known.append(k)
        if k not in self.data:
            if required:
                self.error(k, None, f"missing; expected at least one [[{self.key(k)}]] table")
            return []
        v = self.data[k]
        if not isinstance(v, list):
            self.error(k, v, f"expected an array of tables ([[{self.key(k)}]])")
            return []
        return [Table(self.p, f"{self.key(k)}[{i}]", d) for i, d in enumerate(v)]

    def close(self) -> None:
        for k in self.data:
            if k not in self.known:
                near = difflib.get_close_matches(k, self.known, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                self.p.error(f"{self.key(k)}: unknown key{hint}; expected one of "
                             f"{', '.join(sorted(set(self.known)))}")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_PCI = re.compile(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[01][0-9a-fA-F]\.[0-7]")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,253})")


class checks:
    """Value checks: each returns None when fine, else what is allowed."""

    @staticmethod
    def between(lo: int, hi: int) -> Check:
        return lambda v: None if lo <= v <= hi else f"expected {lo}..{hi}"

    @staticmethod
    def power_of_two(lo: int, hi: int) -> Check:
        return lambda v: (None if lo <= v <= hi and v & (v - 1) == 0 else
                          f"expected a power of two, {lo}..{hi}")

    @staticmethod
    def multiple_of(m: int, lo: int, hi: int) -> Check:
        return lambda v: (None if lo <= v <= hi and v % m == 0 else
                          f"expected a multiple of {m}, {lo}..{hi}")

    @staticmethod
    def cpu(v: int) -> str | None:
        n = os.cpu_count() or 1
        return None if 0 <= v < n else f"expected a CPU 0..{n - 1} (this machine has {n})"

    @staticmethod
    def name(v: str) -> str | None:
        return None if _NAME.fullmatch(v) else "expected 1-64 of A-Z a-z 0-9 _ . - (not first)"

    @staticmethod
    def label(v: str) -> str | None:
        return None if _LABEL.fullmatch(v) else "expected 1-32 of A-Z a-z 0-9 _ - (not first)"

    @staticmethod
    def ifname(v: str) -> str | None:
        ok = _IFNAME.fullmatch(v) and v not in (".", "..")
        return None if ok else "expected an interface name: 1-15 of A-Z a-z 0-9 _ . -"

    @staticmethod
    def names_list(v: list) -> str | None:
        if not all(isinstance(x, str) and _NAME.fullmatch(x) for x in v):
            return "expected an array of names (1-64 of A-Z a-z 0-9 _ . -)"
        return None if len(set(v)) == len(v) else "expected each name once"

    @staticmethod
    def mac(v: str) -> str | None:
        return None if _MAC.fullmatch(v) else 'expected a MAC address like "02:00:00:00:00:01"'

    @staticmethod
    def pci(v: str) -> str | None:
        return None if _PCI.fullmatch(v) else 'expected a PCI address like "0000:03:00.0"'

    @staticmethod
    def ip_address(v: str) -> str | None:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            return 'expected an IPv4 or IPv6 address like "10.77.0.1" or "fd77::1"'
        return None

    @staticmethod
    def ip_interface(v: str) -> str | None:
        want = 'expected an address with prefix like "10.77.0.1/24" or "fd77::1/64"'
        try:
            ipaddress.ip_interface(v)
        except ValueError:
            return want
        return None if "/" in v else want

    @staticmethod
    def host_port(v: str) -> str | None:
        host, sep, port = v.rpartition(":")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(bare)
            ok_host = ":" not in bare or host != bare      # an IPv6 host needs its brackets
        except ValueError:
            ok_host = bool(_HOST.fullmatch(bare))
        if sep and ok_host and port.isdigit() and 1 <= int(port) <= 65535:
            return None
        return 'expected HOST:PORT like "127.0.0.1:9477" or "[::1]:9477", port 1..65535'

    @staticmethod
    def socket_path(v: str) -> str | None:
        # DPDK parses devargs as comma-separated key=value: a comma would split the path.
        if v.startswith("/") and len(v.encode()) <= 107 and not set(v) & set(",= \t\n"):
            return None
        return "expected an absolute path, at most 107 bytes, without , = or spaces"

    @staticmethod
    def vlan_ids(v: list) -> str | None:
        ok = len(v) <= 2 and all(_is(x, int) and 1 <= x <= 4094 for x in v)
        return None if ok else "expected up to two VLAN ids (outer first), each 1..4094"

    @staticmethod
    def port_range(v: list) -> str | None:
        ok = len(v) == 2 and all(_is(x, int) and 0 <= x <= 65535 for x in v) and v[0] <= v[1]
        return None if ok else "expected [first, last] with 0 <= first <= last <= 65535"
