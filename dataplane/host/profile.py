"""Tuning profiles: dataplane/profiles/NAME.toml, named sets of sysctls and a memlock limit.

    description = "bulk transfers"
    memlock = "unlimited"                 # bytes, or "unlimited": RLIMIT_MEMLOCK of the dataplane
    [sysctl]
    net.core.rmem_max = 134217728         # dotted keys, as `sysctl` names them
    "net.ipv4.tcp_rmem" = "4096 87380 134217728"   # quoted works too; several ints: a string

`load_profile()` checks every key against this kernel's /proc/sys and every value against what
the key holds now (one int, several ints, or a word such as bbr); `profile_changes()` turns a
profile into the changes `up` makes.  Importing this module registers the undo of the kinds
"sysctl", "qdisc" and "rlimit".
"""

from __future__ import annotations

import os
import re
import resource
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dataplane
from dataplane.host import UNDO, Change, PlanLine
from dataplane.host.proc import CAP_IPC_LOCK, CAP_SYS_RESOURCE, has_cap, start_time
from dataplane.host.qdisc import RootQdisc
from dataplane.host.sysctl import CC_KEY, QDISC_KEY, Sysctl, TuningError, normalise, path, read

# package data (config/profiles links here), so an installed package finds them too
PROFILE_DIR = Path(dataplane.__file__).resolve().parent / "profiles"
INFINITY = resource.RLIM_INFINITY


class ProfileError(ValueError):
    """A profile that cannot be used: names the file, the key, the value and what is allowed."""


@dataclass
class Profile:
    name: str
    path: Path
    description: str = ""
    sysctl: dict[str, str] = field(default_factory=dict)   # key -> normalised value
    memlock: int | None = None                               # bytes, INFINITY, None: unset


def find(name_or_path: str | Path) -> Path:
    s = str(name_or_path)
    if "/" in s or s.endswith(".toml"):
        p = Path(s)
        if not p.is_file():
            raise ProfileError(f"profile {s}: no such file")
        return p
    if not re.fullmatch(r"[A-Za-z0-9_-]+", s):
        raise ProfileError(f"profile {s!r}: a name is letters, digits, '-' and '_' "
                           f"(it names {PROFILE_DIR}/NAME.toml), or give a path to a .toml")
    p = PROFILE_DIR / f"{s}.toml"
    if not p.is_file():
        have = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.toml"))) or "none"
        raise ProfileError(f"profile {s!r}: no {p} (profiles there: {have})")
    return p


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML reads `net.core.rmem_max = 1` as nested tables; sysctl keys are the dotted path."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def check_value(where: str, key: str, value: Any) -> str:
    """The value normalised, checked against what the kernel's key holds now."""
    now = read(key).split()
    numeric = bool(now) and all(re.fullmatch(r"-?\d+", w) for w in now)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ProfileError(f"{where}: {key} = {value!r}: a sysctl value is an integer or a "
                           "string")
    if not numeric:
        if not isinstance(value, str) or not value.strip():
            raise ProfileError(f"{where}: {key} = {value!r}: this key holds a word "
                               f"(now {' '.join(now)!r}), give it as a string")
        return normalise(value)
    words = str(value).split()
    if len(words) != len(now) or not all(re.fullmatch(r"\d+", w) for w in words):
        shape = "a non-negative integer" if len(now) == 1 else \
            f"{len(now)} non-negative integers in a string, like {' '.join(now)!r}"
        raise ProfileError(f"{where}: {key} = {value!r}: expected {shape}")
    return normalise(value)


def parse_memlock(where: str, value: Any) -> int:
    if value == "unlimited":
        return INFINITY
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProfileError(f"{where}: memlock = {value!r}: a number of bytes (>= 0) or "
                           "\"unlimited\"")
    return value


def load_profile(name_or_path: str | Path) -> Profile:
    p = find(name_or_path)
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{p}: not valid TOML: {e}") from None
    allowed = {"description", "memlock", "sysctl"}
    for k in doc:
        if k not in allowed:
            raise ProfileError(f"{p}: unknown key {k!r}; a profile has "
                               f"{', '.join(sorted(allowed))}")
    prof = Profile(p.stem, p, str(doc.get("description", "")))
    if "memlock" in doc:
        prof.memlock = parse_memlock(str(p), doc["memlock"])
    table = doc.get("sysctl", {})
    if not isinstance(table, dict):
        raise ProfileError(f"{p}: sysctl must be a table ([sysctl] with key = value lines)")
    for key, value in flatten(table).items():
        if not path(key).is_file():
            raise ProfileError(f"{p}: [sysctl] {key}: unknown to this kernel (no {path(key)})")
        prof.sysctl[key] = check_value(f"{p}: [sysctl]", key, value)
    return prof


class Memlock:
    """RLIMIT_MEMLOCK of one process (default: this one), as `ulimit -l` or prlimit(1) set it.
    RDMA memory registration and AF_XDP UMEMs pin pages against it.  It is a process limit,
    not a sysctl: it covers the dataplane and the workers it starts (children inherit it), no
    other process.  The soft limit is set; the hard limit is raised only when it is below."""

    kind = "rlimit"

    def __init__(self, limit: int, pid: int | None = None):
        self.limit, self.pid = limit, pid

    def __repr__(self) -> str:
        return f"Memlock({show_limit(self.limit)}, pid={self.pid})"

    def current(self) -> tuple[int, int]:
        return resource.prlimit(self.pid or 0, resource.RLIMIT_MEMLOCK)

    def _stuck(self) -> bool:
        """The hard limit would have to go up, and this process may not raise it."""
        return _num(self.current()[1]) < _num(self.limit) and not has_cap(CAP_SYS_RESOURCE)

    def _bypassed(self) -> bool:
        # CAP_IPC_LOCK lets a process pin memory past the limit (mlock, ib_umem_get).
        return self._stuck() and has_cap(CAP_IPC_LOCK, self.pid)

    def problem(self) -> str:
        if not self._stuck() or self._bypassed():
            return ""
        return (f"RLIMIT_MEMLOCK: the hard limit is {show_limit(self.current()[1])} and this "
                f"process lacks CAP_SYS_RESOURCE to raise it to {show_limit(self.limit)}; start "
                "the dataplane with a higher limit (LimitMEMLOCK= under systemd, ulimit -l) "
                "or with CAP_IPC_LOCK")

    def describe(self) -> PlanLine:
        soft, hard = self.current()
        note = ("for the dataplane and its workers only; a systemd service gets the same from "
                "LimitMEMLOCK=")
        if self._bypassed():
            note = ("not needed: the dataplane has CAP_IPC_LOCK, which locks memory past the "
                    "limit; the hard limit cannot be raised here (no CAP_SYS_RESOURCE)")
        return PlanLine("rlimit memlock", f"{show_limit(soft)} (hard {show_limit(hard)})",
                        f"{show_limit(self.limit)}", self.problem() or note)

    def needed(self) -> bool:
        soft, hard = self.current()
        return (soft != self.limit or _num(hard) < _num(self.limit)) and not self._bypassed()

    def journal_entry(self) -> dict[str, Any]:
        soft, hard = self.current()
        pid = self.pid or os.getpid()
        return {"key": "memlock", "pid": pid, "start": start_time(pid), "soft": soft, "hard": hard}

    def apply(self) -> None:
        if (why := self.problem()):
            raise TuningError(why)
        hard = self.current()[1]
        new = (self.limit, hard if _num(hard) >= _num(self.limit) else self.limit)
        try:
            resource.prlimit(self.pid or 0, resource.RLIMIT_MEMLOCK, new)
        except (OSError, ValueError) as e:
            raise TuningError(f"RLIMIT_MEMLOCK = {show_limit(self.limit)}: {e}") from None


def _num(v: int) -> float:
    return float("inf") if v == INFINITY else v


def show_limit(v: int) -> str:
    return "unlimited" if v == INFINITY else str(v)


def undo_rlimit(entry: dict[str, Any]) -> None:
    pid = entry["pid"]
    # int(): journals of earlier versions hold the start time as a string
    if not entry["start"] or start_time(pid) != int(entry["start"]):
        return      # the process is gone and its limit with it
    # Lower the soft limit first: setting (soft, hard) with soft > the new hard is EINVAL.
    resource.prlimit(pid, resource.RLIMIT_MEMLOCK, (entry["soft"], entry["hard"]))


UNDO["rlimit"] = undo_rlimit


def problems(changes: list[Change]) -> list[str]:
    """What stops `up` before anything is changed: each change's problem(), where it has one."""
    return [p for c in changes if (p := getattr(c, "problem", lambda: "")())]


def profile_changes(profile: Profile, fq_interfaces: list[str],
                    netns: str | None = None) -> list[Change]:
    """The changes for a profile, in the order `up` makes them (`down` undoes newest first):
    the congestion control first (its availability is the likeliest to be missing), the other
    sysctls, fq on each interface, default_qdisc, then the memlock limit.  default_qdisc comes
    after the interfaces so that down restores it before it deletes their fq: the kernel's
    default root qdisc is then the original one again."""
    ctl = profile.sysctl
    order = [k for k in (CC_KEY,) if k in ctl] + \
        [k for k in ctl if k not in (CC_KEY, QDISC_KEY)]
    out: list[Change] = [Sysctl(k, ctl[k]) for k in order]
    qdisc = ctl.get(QDISC_KEY, "fq")
    out += [RootQdisc(i, qdisc, netns) for i in fq_interfaces]
    if QDISC_KEY in ctl:
        out.append(Sysctl(QDISC_KEY, ctl[QDISC_KEY]))
    if profile.memlock is not None:
        out.append(Memlock(profile.memlock))
    return out
