"""Hugepage reservations and hugetlbfs mounts made and undone through a real journal (the pool
size identical after, the mount and the directories it created gone), explained refusals, and a
process SIGKILLed in the middle of `up` whose journal a fresh process undoes completely."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import dataplane.host.profile  # noqa: F401  registers the undo of "rlimit", as `down` must
from dataplane.host import Journal, apply, undo
from dataplane.host import hugepages as hp
from dataplane.host.hugepages import HugepagesError, Mount, Reserve, hugepage_changes, mounts
from dataplane.host.qdisc import shape, show
from dataplane.host.settings import Hugepages
from dataplane.host.sysctl import read, write

ROOT = Path(__file__).resolve().parent.parent
NR = hp.pool(2048, None) / "nr_hugepages"
pytestmark = [pytest.mark.root("sysfs, mount"),
              pytest.mark.skipif(not NR.exists(), reason="kernel without 2 MB hugepages")]


@pytest.fixture
def host_pools(tmp_path: Path) -> Iterator[Path]:
    """Whatever a test does, the pools and our mounts are as they were afterwards."""
    saved = {p: p.read_text() for p in [NR, hp.pool(2048, 0) / "nr_hugepages",
                                          hp.pool(1048576, None) / "nr_hugepages"] if p.exists()}
    try:
        yield tmp_path
    finally:
        for m, _, _ in mounts():
            if m.startswith(str(tmp_path)):
                subprocess.run(["umount", m], check=False)
        for p, v in saved.items():
            p.write_text(v)
    assert {p: p.read_text() for p in saved} == saved


def fault_a_page(f: Path) -> None:
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 2 << 20)          # hugetlbfs has no write(): size it, map it, touch it
        with mmap.mmap(fd, 2 << 20) as m:
            m[0] = 1
    finally:
        os.close(fd)


def mounted(p: Path) -> list[tuple[str, int, str]]:
    return [m for m in mounts() if m[0] == str(p)]


@pytest.mark.parametrize("node", [None, 0])
def test_reserve_and_mount_round_trip(node: int | None, host_pools: Path) -> None:
    nr = hp.pool(2048, node) / "nr_hugepages"
    if not nr.exists():
        pytest.skip(f"no {nr}: kernel without NUMA node sysfs")
    before = int(nr.read_text())
    mnt = host_pools / "run" / "huge"
    changes = hugepage_changes([Hugepages("2M", before + 16, node, str(mnt))])
    assert [c.kind for c in changes] == ["hugepages", "mount"]
    line = changes[0].describe()
    assert (line.current, line.desired) == (str(before), str(before + 16))
    jdir = host_pools / "journal"
    apply(changes, Journal(jdir))
    assert int(nr.read_text()) == before + 16
    [(_, kb, opts)] = mounted(mnt)
    assert kb == 2048 and "mode=700" in opts and str(mnt) in hp.show()
    fault_a_page(mnt / "arena")        # a file holding a page must not stop down
    undo(Journal(jdir))
    assert int(nr.read_text()) == before
    assert not mounted(mnt) and not (host_pools / "run").exists()
    assert not (jdir / "journal.json").exists()


def test_one_gigabyte_pages_round_trip(host_pools: Path) -> None:
    """1 GB pages (the CPU's pdpe1gb): one page reserved, mounted with pagesize=1G, given back."""
    nr = hp.pool(1048576, None) / "nr_hugepages"
    if not nr.exists():
        pytest.skip("no 1 GB hugepage pool: the CPU lacks pdpe1gb")
    before = int(nr.read_text())
    mnt = host_pools / "huge1g"
    jdir = host_pools / "journal"
    apply(hugepage_changes([Hugepages("1G", before + 1, None, str(mnt))]), Journal(jdir))
    assert int(nr.read_text()) == before + 1
    [(_, kb, _opts)] = mounted(mnt)
    assert kb == 1048576
    undo(Journal(jdir))
    assert int(nr.read_text()) == before and not mounted(mnt)


def test_refusals_are_explained(host_pools: Path) -> None:
    assert Reserve(4096, 1).problem().startswith("4 MB pages are not supported by this CPU")
    assert "NUMA node 99 does not exist (nodes: 0" in Reserve(2048, 1, node=99).problem()
    if not hp.pool(1048576, None).exists():
        assert "pdpe1gb" in Reserve(1048576, 1).problem()
    assert "one of 2M, 1G" in Mount(host_pools / "m", "3M").problem()
    assert "already a mount point" in Mount("/proc", "2M").problem()
    with pytest.raises(HugepagesError, match="4 MB pages"):
        apply([Reserve(4096, 1)], Journal(host_pools))


def test_fewer_pages_than_asked_is_explained(host_pools: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A real shortfall needs memory exhausted or fragmented, which a shared machine must not
    suffer; the write here is real, only the read-back is made one page short."""
    before = int(NR.read_text())
    c = Reserve(2048, before + 2)
    journal = Journal(host_pools)
    journal.record({"kind": c.kind, **c.journal_entry()})
    real = hp.read_int
    monkeypatch.setattr(hp, "read_int",
                        lambda p: real(p) - (p.name == "nr_hugepages"))
    with pytest.raises(HugepagesError) as e:
        c.apply()
    monkeypatch.undo()
    msg = str(e.value)
    assert f"asked for {before + 2} 2 MB pages, the kernel gave {before + 1}" in msg
    assert "MemFree" in msg and f"hugepages={before + 2} on the kernel command line" in msg
    undo(Journal(host_pools))
    assert int(NR.read_text()) == before


# Applies every kind of change, and SIGKILLs itself inside the apply of change number `kill`
# (journaled, not made) or, with kill = -1, after all of them were made.
CHILD = """
import json, os, sys
from pathlib import Path
from dataplane.host import Journal, apply
from dataplane.host.hugepages import Mount, Reserve
from dataplane.host.profile import Memlock
from dataplane.host.qdisc import RootQdisc
from dataplane.host.sysctl import Sysctl
a = json.loads(sys.argv[1])
changes = [Sysctl("net.core.netdev_max_backlog", a["backlog"]), Reserve(2048, a["pages"]),
           Mount(a["mnt"], "2M"), RootQdisc("ifb9", "pfifo", a["ns"]), Memlock(a["memlock"])]
class KillInApply:
    def __init__(self, c):
        self.c, self.kind = c, c.kind
    def needed(self):
        return True
    def describe(self):
        return self.c.describe()
    def journal_entry(self):
        return self.c.journal_entry()
    def apply(self):
        os.kill(os.getpid(), 9)
if a["kill"] >= 0:
    changes[a["kill"]] = KillInApply(changes[a["kill"]])
apply(changes, Journal(Path(a["journal"])))
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("kill", [2, -1])
def test_sigkill_during_up_is_undone_by_a_fresh_process(kill: int, host_pools: Path) -> None:
    ns = f"dpt{os.getpid()}k"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    backlog = read("net.core.netdev_max_backlog")
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "ifb9", "type", "ifb"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "ifb9", "up"], check=True)
        before = {"nr": NR.read_text(), "qdisc": shape(show("ifb9", ns) or [])}
        mnt = host_pools / "a" / "huge"
        args = {"backlog": int(backlog) + 7, "pages": int(before["nr"]) + 4, "mnt": str(mnt),
                "ns": ns, "memlock": 1 << 20, "kill": kill, "journal": str(host_pools / "j")}
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT,
                           capture_output=True, text=True, check=False)
        assert r.returncode == -9, r.stderr
        entries = Journal(host_pools / "j").entries
        assert [e["kind"] for e in entries] == \
            ["sysctl", "hugepages", "mount", "qdisc", "rlimit"][:kill + 1 if kill >= 0 else 5]
        assert int(NR.read_text()) == args["pages"]
        assert bool(mounted(mnt)) == (kill == -1)
        done = undo(Journal(host_pools / "j"))
        assert len(done) == len(entries)
        assert read("net.core.netdev_max_backlog") == backlog
        assert NR.read_text() == before["nr"]
        assert shape(show("ifb9", ns) or []) == before["qdisc"]
        assert not mounted(mnt) and not (host_pools / "a").exists()
        assert not (host_pools / "j" / "journal.json").exists()
    finally:
        if read("net.core.netdev_max_backlog") != backlog:
            write("net.core.netdev_max_backlog", backlog)
        subprocess.run(["ip", "netns", "del", ns], check=False)
