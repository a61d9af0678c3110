"""Hugepages: reserve pages per size and NUMA node through sysfs, mount a dedicated hugetlbfs.

    /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages                    (global)
    /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages    (node 0)
    mount -t hugetlbfs -o pagesize=2M,mode=0700 nodev /run/dataplane/hugepages

What DPDK's `dpdk-hugepages.py` offers, and where it is here:
    -s / --show        `dataplane status` (calls `show()`): pages per node and size, mounts
    --setup 2G         `[[host.hugepages]]` count + mount, made by `dataplane up`, undone by
                       `down` (dpdk-hugepages.py has no undo: -c/-u clear and unmount everything,
                       not just what it set)
    -n / --node        `node = N` in `[[host.hugepages]]` (omitted: global, the kernel spreads)
    -p / --pagesize    `size = "2M" | "1G"`
Counts are totals to have, not pages to add, like --setup (and unlike --reserve's arithmetic).

The kernel may give fewer pages than asked (free memory is fragmented, or too small): the write
succeeds and nr_hugepages reads back lower.  `Reserve.apply()` reads it back and raises with how
many it got and what to do; the entry is already journaled, so `down` still gives them back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from dataplane.host import UNDO, PlanLine
from dataplane.host.proc import mount_table
from dataplane.host.settings import Hugepages

SYS_MM = Path("/sys/kernel/mm/hugepages")
SYS_NODE = Path("/sys/devices/system/node")
PAGESIZE_KB = {"2M": 2048, "1G": 1048576}


class HugepagesError(RuntimeError):
    """The kernel cannot give the pages or the mount asked for."""


def size_name(size_kb: int) -> str:
    return f"{size_kb // 1048576} GB" if size_kb >= 1048576 else f"{size_kb // 1024} MB"


def pool(size_kb: int, node: int | None) -> Path:
    base = SYS_MM if node is None else SYS_NODE / f"node{node}" / "hugepages"
    return base / f"hugepages-{size_kb}kB"


def nodes() -> list[int]:
    return sorted(int(p.name[4:]) for p in SYS_NODE.glob("node[0-9]*"))


def sizes() -> list[int]:
    return sorted(int(p.name[10:-2]) for p in SYS_MM.glob("hugepages-*kB"))


def read_int(p: Path) -> int:
    return int(p.read_text())


def mem_free_kb(node: int | None) -> int:
    f = Path("/proc/meminfo") if node is None else SYS_NODE / f"node{node}" / "meminfo"
    for line in f.read_text().splitlines():
        parts = line.replace("Node", "").split()
        if "MemFree:" in parts:
            return int(parts[parts.index("MemFree:") + 1])
    return 0


def pool_problem(size_kb: int, node: int | None) -> str:
    if node is not None and not (SYS_NODE / f"node{node}").exists():
        return f"NUMA node {node} does not exist (nodes: {', '.join(map(str, nodes()))})"
    if not pool(size_kb, None).exists():
        have = ", ".join(size_name(s) for s in sizes()) or "none"
        cpu = " (1 GB pages need the CPU flag pdpe1gb)" if size_kb == 1048576 else ""
        return (f"{size_name(size_kb)} pages are not supported by this CPU/kernel{cpu}; "
                f"supported sizes: {have}")
    return ""


def shortfall(size_kb: int, node: int | None, asked: int, got: int) -> str:
    on = "" if node is None else f" on node {node}"
    boot = ("hugepagesz=1G hugepages=" if size_kb >= 1048576 else "hugepages=") + str(asked)
    return (f"asked for {asked} {size_name(size_kb)} pages{on}, the kernel gave {got}: memory "
            f"is fragmented or too small (MemFree {mem_free_kb(node) // 1024} MB{on}); try "
            f"fewer, reserve at boot ({boot} on the kernel command line), or drop caches and "
            "compact (echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory) "
            f"and run up again; down gives back the {got} it did reserve")


class Reserve:
    """Have `count` pages of `size_kb` reserved (globally, or on NUMA node `node`)."""

    kind = "hugepages"

    def __init__(self, size_kb: int, count: int, node: int | None = None):
        self.size_kb, self.count, self.node = size_kb, count, node

    def __repr__(self) -> str:
        return f"Reserve({self.size_kb}, {self.count}, node={self.node})"

    @property
    def nr(self) -> Path:
        return pool(self.size_kb, self.node) / "nr_hugepages"

    def problem(self) -> str:
        return pool_problem(self.size_kb, self.node)

    def describe(self) -> PlanLine:
        on = "global" if self.node is None else f"node {self.node}"
        what = f"hugepages {size_name(self.size_kb)} {on}"
        if (why := self.problem()):
            return PlanLine(what, "(unsupported)", str(self.count), why)
        free = read_int(self.nr.with_name("free_hugepages"))
        return PlanLine(what, str(read_int(self.nr)), str(self.count), f"{free} free now")

    def needed(self) -> bool:
        return bool(self.problem()) or read_int(self.nr) != self.count

    def journal_entry(self) -> dict[str, Any]:
        if (why := self.problem()):
            raise HugepagesError(why)
        return {"size_kb": self.size_kb, "node": self.node, "old": read_int(self.nr)}

    def apply(self) -> None:
        if (why := self.problem()):
            raise HugepagesError(why)
        try:
            self.nr.write_text(str(self.count))
        except OSError as e:
            raise HugepagesError(f"{self.nr}: {e.strerror}") from None
        got = read_int(self.nr)
        if got < self.count:
            raise HugepagesError(shortfall(self.size_kb, self.node, self.count, got))


def undo_reserve(entry: dict[str, Any]) -> None:
    nr = pool(entry["size_kb"], entry["node"]) / "nr_hugepages"
    if not nr.exists() or read_int(nr) == entry["old"]:
        return
    # Pages still in use (files on a hugetlbfs, mapped) become surplus and are freed when
    # released, so this write lowers the persistent pool even then.
    nr.write_text(str(entry["old"]))
    if (got := read_int(nr)) != entry["old"]:
        raise HugepagesError(f"{nr}: wrote {entry['old']} back, it reads {got}")


def mounts() -> list[tuple[str, int, str]]:
    """hugetlbfs mounts as (path, page size in kB, options), from /proc/self/mounts."""
    out = []
    for m in mount_table():
        if m.fstype != "hugetlbfs":
            continue
        kb = 0
        for o in m.options.split(","):
            if o.startswith("pagesize="):
                v = o[9:]
                kb = int(v[:-1]) * {"K": 1, "M": 1024, "G": 1048576}[v[-1]]
        out.append((m.path, kb, m.options))
    return out


def hugetlbfs_mounts() -> list[Path]:
    """Mounted hugetlbfs directories for the arenas: every one but those of 1 GB pages."""
    return [Path(m) for m, kb, _ in mounts() if kb != PAGESIZE_KB["1G"]]


def free_hugepages_2m() -> int:
    """Free 2 MB pages in the global pool (0 when the kernel has no such pool)."""
    p = pool(PAGESIZE_KB["2M"], None) / "free_hugepages"
    return read_int(p) if p.exists() else 0


def is_mountpoint(p: Path) -> bool:
    return any(m.path == str(p) for m in mount_table())


class Mount:
    """A dedicated hugetlbfs for one page size at `path` (created if missing, 0700)."""

    kind = "mount"

    def __init__(self, path: str | Path, size: str = "2M", mode: int = 0o700):
        self.path, self.size, self.mode = Path(path).absolute(), size, mode

    def __repr__(self) -> str:
        return f"Mount({str(self.path)!r}, {self.size!r})"

    @property
    def options(self) -> str:
        return f"pagesize={self.size},mode={self.mode:04o}"

    def mounted(self) -> bool:
        return any(m == str(self.path) and kb == PAGESIZE_KB[self.size] for m, kb, _ in mounts())

    def problem(self) -> str:
        if self.size not in PAGESIZE_KB:
            return f"hugetlbfs page size {self.size!r}: one of {', '.join(PAGESIZE_KB)}"
        if (why := pool_problem(PAGESIZE_KB[self.size], None)):
            return why
        if not self.mounted() and is_mountpoint(self.path):
            return (f"{self.path} is already a mount point of something else; "
                    "choose another path for the dataplane's hugetlbfs")
        return ""

    def describe(self) -> PlanLine:
        now = f"hugetlbfs {self.options}" if self.mounted() else "(not mounted)"
        return PlanLine(f"mount {self.path}", now, f"hugetlbfs {self.options}", self.problem())

    def needed(self) -> bool:
        return not self.mounted()

    def journal_entry(self) -> dict[str, Any]:
        # The topmost directory that does not exist yet: undo removes up to it, no further.
        created = ""
        for p in [self.path, *self.path.parents]:
            if p.exists():
                break
            created = str(p)
        return {"key": str(self.path), "created": created}

    def apply(self) -> None:
        if (why := self.problem()):
            raise HugepagesError(why)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "hugetlbfs", "-o", self.options, "nodev",
                            str(self.path)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise HugepagesError(f"mount hugetlbfs on {self.path}: {r.stderr.strip()}")


def undo_mount(entry: dict[str, Any]) -> None:
    path = Path(entry["key"])
    if any(m == str(path) for m, _, _ in mounts()):
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise HugepagesError(f"umount {path}: {r.stderr.strip()} (files still open or "
                                 f"mapped? `fuser -vm {path}` names the processes)")
    if entry.get("created"):
        top = Path(entry["created"])
        for p in [path, *path.parents]:
            try:
                p.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break           # not empty: someone put something there; leave it
            if p == top:
                break


UNDO["hugepages"] = undo_reserve
UNDO["mount"] = undo_mount


def hugepage_changes(wanted: list[Hugepages]) -> list[Reserve | Mount]:
    """The changes for `[[host.hugepages]]`, in order: each reservation, then its mount (so
    `down` unmounts before it shrinks the pool).  count = 0 reserves nothing (it does not
    release pages someone else reserved)."""
    out: list[Reserve | Mount] = []
    for h in wanted:
        if h.count:
            out.append(Reserve(h.size_kb, h.count, h.node))
        if h.mount:
            out.append(Mount(h.mount, h.size))
    return out


def show() -> str:
    """Like `dpdk-hugepages.py -s`: pages per node and size, then the hugetlbfs mounts."""
    rows = ["node  size    total   free  surplus"]
    for n in nodes() or [None]:
        for kb in sizes():
            p = pool(kb, n)
            if not p.exists():
                continue
            total, free, surplus = (read_int(p / f) for f in
                                    ("nr_hugepages", "free_hugepages", "surplus_hugepages"))
            rows.append(f"{'-' if n is None else n:<5} {size_name(kb):<6} {total:>6} "
                        f"{free:>6} {surplus:>8}")
    ms = mounts()
    rows += [f"hugetlbfs on {m} ({size_name(kb)} pages, {opts})" for m, kb, opts in ms] or \
        ["no hugetlbfs mounted"]
    return "\n".join(rows)


if __name__ == "__main__":
    print(show())
