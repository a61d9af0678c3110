"""What the kernel says about processes and mounts, read from /proc, once for the project:
capabilities (CapEff), whether a pid still names the same process (its start time), the mount
table; and poll(), the one wait-until-true loop every room uses.

A leaf module (nothing of the project imported), so any room may use it without an import
circle: the config's plan, the shared-memory room, the supervisor, the CLI.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

T = TypeVar("T")

# bits of CapEff (linux/capability.h)
CAP_NET_ADMIN, CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 12, 14, 21, 24
CAP_NAMES = {"CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_IPC_LOCK": CAP_IPC_LOCK,
             "CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_SYS_RESOURCE": CAP_SYS_RESOURCE}


def effective_caps(pid: int | None = None) -> int:
    """The effective capability mask of pid (None: this process)."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_cap(cap: int, pid: int | None = None) -> bool:
    return bool(effective_caps(pid) >> cap & 1)


def missing_caps(names: list[str], pid: int | None = None) -> list[str]:
    """Those of the named capabilities (keys of CAP_NAMES) the process lacks, in order."""
    caps = effective_caps(pid)
    return [n for n in names if not caps >> CAP_NAMES[n] & 1]


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid, names one process even if pids are reused;
    None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int) -> bool:
    """True while pid exists (ours or another user's: EPERM means it is there)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MountEntry(NamedTuple):
    device: str
    path: str
    fstype: str
    options: str


def mount_table() -> list[MountEntry]:
    """/proc/self/mounts, with the kernel's octal escapes (a space is \\040) undone in paths."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        out.append(MountEntry(dev, _unescape(mnt), fstype, opts))
    return out


def _unescape(field: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def poll(fn: Callable[[], T], timeout: float = 5.0, interval: float = 0.02,
         what: str = "condition") -> T:
    """Call fn until it returns something truthy; return that, or raise TimeoutError.  fn may
    raise to give up early (a process it waits on died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
