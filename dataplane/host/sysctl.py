"""Kernel parameters through /proc/sys, as `sysctl -w net.core.rmem_max=134217728` would set them.

    >>> Sysctl("net.core.rmem_max", 134217728).describe()   # current: this machine's value
    PlanLine(what='sysctl net.core.rmem_max', current='...', desired='134217728', note='')

Values are compared normalised: the kernel prints multi-value keys (tcp_rmem) tab-separated and
accepts them space-separated, so "4096\\t131072\\t6291456" equals "4096 131072 6291456".

Two keys name something that may be missing from the kernel, and are checked before anything
is written (`Sysctl.problem()`), so `up` can refuse with the reason instead of a bare ENOENT:
  net.ipv4.tcp_congestion_control  must be in tcp_available_congestion_control (or loadable);
  net.core.default_qdisc           the qdisc must be built in or loadable (sch_fq for fq).

Many net.* keys are per network namespace: a process reads and writes the values of the
namespace it runs in, so `down` must run where `up` ran (the CLI does).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

from dataplane.host import UNDO, PlanLine
from dataplane.host.files import write_all

PROC_SYS = Path("/proc/sys")
CC_KEY = "net.ipv4.tcp_congestion_control"
QDISC_KEY = "net.core.default_qdisc"

# Qdiscs that are part of the scheduler core itself (sch_generic.c, sch_fifo.c, sch_mq.c):
# present whenever there is a scheduler at all, so no CONFIG_NET_SCH_* option names them.
CORE_QDISCS = {"pfifo_fast", "pfifo", "bfifo", "pfifo_head_drop", "noqueue", "noop", "mq"}


class TuningError(RuntimeError):
    """The kernel cannot take a tuning change (missing key, missing feature, refused value)."""


def path(key: str) -> Path:
    """net.core.rmem_max -> /proc/sys/net/core/rmem_max ('/' also accepted, as sysctl does,
    for keys whose parts contain dots such as interface names: net/ipv4/conf/eth0.5/rp_filter).

    Confined to /proc/sys: a key with an empty, "." or ".." part, or one whose real path (links
    resolved) leaves /proc/sys, is refused (TuningError), so a profile cannot make root write
    /etc/x through "../../etc/x"."""
    rel = key if "/" in key else key.replace(".", "/")
    parts = rel.split("/")
    if not key or "\0" in key or any(x in ("", ".", "..") for x in parts):
        raise TuningError(f"sysctl key {key!r}: not a key (an empty, '.' or '..' part); a key "
                          "is like net.core.rmem_max or net/ipv4/conf/eth0.5/rp_filter")
    p = PROC_SYS / rel
    real = os.path.realpath(p)
    if not real.startswith(f"{os.path.realpath(PROC_SYS)}/"):
        raise TuningError(f"sysctl key {key!r}: resolves to {real}, outside {PROC_SYS}; "
                          "refused")
    return p


def normalise(value: object) -> str:
    return " ".join(str(value).split())


def read(key: str) -> str:
    try:
        return normalise(path(key).read_text())
    except FileNotFoundError:
        raise TuningError(missing(key)) from None


def write(key: str, value: object) -> None:
    try:
        # O_NOFOLLOW: path() resolved the key a moment ago; never follow a link at write time
        fd = os.open(path(key), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            write_all(fd, (normalise(value) + "\n").encode())
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise TuningError(missing(key)) from None
    except PermissionError:
        raise TuningError(f"sysctl {key}: read-only here (some net.core keys can be set only "
                          "from the host's network namespace, and only by root)") from None
    except OSError as e:
        raise TuningError(f"sysctl {key} = {normalise(value)!r}: the kernel refused it "
                          f"({e.strerror})") from None


def missing(key: str) -> str:
    return (f"sysctl {key}: this kernel has no {path(key)} (not built in, a module not loaded, "
            "or a global key read from inside a network namespace)")


def kernel_config(option: str) -> str | None:
    """'y', 'm' or '' (not set) for CONFIG_<option> of the running kernel; None if unknown
    (neither /proc/config.gz nor /boot/config-<release> is there)."""
    text = None
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        try:
            text = Path(f"/boot/config-{os.uname().release}").read_text()
        except OSError:
            return None
    for line in text.splitlines():
        if line.startswith(f"CONFIG_{option}="):
            return line.split("=", 1)[1].strip('"')
    return ""


def loadable_modules() -> bool:
    return Path("/proc/modules").exists()


def congestion_control_problem(name: str) -> str:
    avail = read("net.ipv4.tcp_available_congestion_control")
    if name in avail.split():
        return ""
    option = f"TCP_CONG_{name.upper()}"
    if kernel_config(option) == "m" and loadable_modules():
        return ""   # the kernel loads tcp_<name> itself when the key is written
    return (f"{name} is not available: tcp_available_congestion_control is {avail!r}; "
            f"load tcp_{name} (modprobe tcp_{name}) or build it in (CONFIG_{option}=y)")


def qdisc_problem(kind: str) -> str:
    """Why the kernel cannot attach a `kind` qdisc, or '' when it can (or cannot tell).
    There is no list of qdiscs in /proc: the kernel's build config is what says it."""
    if kind in CORE_QDISCS:
        return ""
    option = f"NET_SCH_{kind.upper()}"
    cfg = kernel_config(option)
    if cfg is None or cfg == "y" or (cfg == "m" and loadable_modules()):
        return ""
    how = ("load it (modprobe sch_{k})" if cfg == "m" else
           f"this kernel was built without it (CONFIG_{option} is not set)").format(k=kind)
    extra = ""
    if kind == "fq":
        # Since Linux 4.13 TCP paces by itself when the qdisc does not, so BBR still works.
        extra = "; bbr still paces its flows without it (TCP internal pacing, Linux 4.13+)"
    return (f"qdisc {kind} is not available: {how}; build it in or as a module "
            f"(sch_{kind}), or leave it out of the profile{extra}")


class Sysctl:
    """One kernel parameter set to one value; undo writes back the value it replaced."""

    kind = "sysctl"

    def __init__(self, key: str, value: object):
        path(key)                   # refuses a key outside /proc/sys before anything is planned
        self.key = key
        self.value = normalise(value)

    def __repr__(self) -> str:
        return f"Sysctl({self.key!r}, {self.value!r})"

    def current(self) -> str | None:
        try:
            return read(self.key)
        except TuningError:
            return None

    def problem(self) -> str:
        """Why apply() would fail, read from the host now; '' when it would not."""
        if not path(self.key).exists():
            return missing(self.key)
        if self.key == CC_KEY:
            return congestion_control_problem(self.value)
        if self.key == QDISC_KEY:
            return qdisc_problem(self.value)
        return ""

    def describe(self) -> PlanLine:
        return PlanLine(f"sysctl {self.key}", self.current() or "(missing)", self.value,
                        self.problem())

    def needed(self) -> bool:
        return self.current() != self.value

    def journal_entry(self) -> dict[str, Any]:
        return {"key": self.key, "old": read(self.key)}

    def apply(self) -> None:
        why = self.problem()
        if why:
            raise TuningError(why)
        write(self.key, self.value)
        got = read(self.key)
        if got != self.value:
            # Some keys clamp or round (e.g. values above a limit); say so rather than pretend.
            raise TuningError(f"sysctl {self.key}: wrote {self.value!r}, the kernel kept {got!r}")


def undo_sysctl(entry: dict[str, Any]) -> None:
    if read(entry["key"]) != normalise(entry["old"]):
        write(entry["key"], entry["old"])


UNDO["sysctl"] = undo_sysctl
