"""The fixtures several test modules share, and the rule for root.

Root: a test (or a whole module, through `pytestmark`) that touches the kernel (namespaces,
veth, hugepages, sysfs writes, DPDK, the guest) carries `@pytest.mark.root("what for")`; without
root it is skipped with "needs root: what for" (shown by -ra).  Everything else runs as any
user.  A test using one of the kernel-touching fixtures below (KERNEL_FIXTURES) is marked so at
collection, and the fixture itself skips the same way.

Imports of the project stay inside the fixtures: a module that only needs the root rule must
not fail at collection because the native extension is not built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:   # scripts/guest_run.py, shared with perf/
    sys.path.insert(0, str(REPO))

from tests.helpers.processes import stop_process  # noqa: E402 - after the path is set

if TYPE_CHECKING:
    from dataplane.shm.arena import Arena
    from scripts.guest_run import GuestRun
    from tests.helpers.workers import Worker


def skip_without_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


# fixtures that touch the kernel, and why: a test using one is marked root (and guest) at
# collection, so `-m "not root"` selects exactly what runs as any user
KERNEL_FIXTURES = {"veth": "namespaces and veth",
                   "workers": "worker processes: DPDK vdevs, AF_PACKET, namespaces",
                   "guest_lab": "the guest tool installs QEMU and the kernel with apt"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name, why in KERNEL_FIXTURES.items():
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.root(why))
                if name == "guest_lab":
                    item.add_marker(pytest.mark.guest)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("root"):
        skip_without_root(mark.args[0] if mark.args else "touches the kernel")
        return      # the first reason is enough


# ---- arenas in /dev/shm, filled by the test (tests/helpers/frames.py) ----

@pytest.fixture
def new_arena() -> Iterator[Callable[..., Arena]]:
    """new_arena(tag, rings=..., ring_size=...): an arena in /dev/shm, closed and removed
    after the test."""
    from tests.helpers.frames import make_arena

    made: list[Arena] = []

    def make(tag: str = "test", **kw: Any) -> Arena:
        made.append(make_arena(tag, **kw))
        return made[-1]

    yield make
    for a in made:
        a.close()
        a.unlink()


@pytest.fixture
def arena(new_arena: Callable[..., Arena]) -> Arena:
    """One arena: two ports, a ring each, 1024 slots."""
    return new_arena("cons")


# ---- namespaces and workers ----

@pytest.fixture
def veth() -> Iterator[tuple[str, str, str, str]]:
    """Two namespaces joined by a veth pair, both ends up, IPv6 off (no router solicitations or
    MLD among the frames under test): (ns_a, ns_b, if_a, if_b)."""
    skip_without_root(KERNEL_FIXTURES["veth"])
    uid = uuid.uuid4().hex[:6]
    ns_a, ns_b, if_a, if_b = f"dpwa{uid}", f"dpwb{uid}", f"dpwa{uid}", f"dpwb{uid}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, ifn in ((ns_a, if_a), (ns_b, if_b)):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            f"net.ipv6.conf.{ifn}.disable_ipv6=1"], check=True)
            ip("-n", ns, "link", "set", ifn, "up")
        yield ns_a, ns_b, if_a, if_b
    finally:
        for ns in (ns_a, ns_b):   # deleting a namespace deletes its veth end, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """workers(spec, netns=None, arena=None): a worker process (either backend) on its own
    arena (created unless given), stopped and its arena removed after the test."""
    skip_without_root(KERNEL_FIXTURES["workers"])
    from dataplane.shm.arena import Arena, ArenaGeometry
    from tests.helpers.workers import Worker

    started: list[Worker] = []

    def start(spec: Any, netns: str | None = None, arena: Arena | None = None) -> Worker:
        if arena is None:
            geo = ArenaGeometry(len(spec.ports), spec.rings(), spec.ring_size, spec.slot_size,
                                spec.pool_mb << 20)
            arena = Arena.create(Path(spec.arena_path), geo)
        cmd = [sys.executable, "-m", "dataplane.workers.process", spec.to_json()]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        started.append(Worker(spec, arena, proc))
        return started[-1]

    yield start
    for w in started:
        stop_process(w.proc, w.arena.request_stop, 20)
        # a worker killed by its test (or here) leaves EAL's runtime directory, named by its
        # pid, as the supervisor knows; left, a later worker given that pid looks unclean
        shutil.rmtree(Path("/var/run/dpdk") / f"dp-{w.spec.name}-{w.proc.pid}",
                      ignore_errors=True)
        path = w.arena.path
        w.arena.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A private directory (mode 0700) for memif sockets."""
    with tempfile.TemporaryDirectory(prefix="dpw-") as d:
        yield Path(d)


# ---- the QEMU guest (scripts/guest, driven by scripts/guest_run.py) ----

class GuestLab:
    """Boots the guest for a test module: a guest that cannot run here is a skip, with the
    reason; one that wrote no results a failure."""

    def checks(self, script: str, *args: str, flags: tuple[str, ...] = ()) -> GuestRun:
        """Run tests/guest/SCRIPT in one guest; call .ok(name) on the result for a check."""
        from scripts.guest_run import run_checks
        return self._call(run_checks, script, *args, flags=flags)

    def pair(self, script: str, listen_args: tuple[str, ...], connect_args: tuple[str, ...],
             flags: tuple[str, ...] = ()) -> tuple[GuestRun, GuestRun]:
        """Run tests/guest/SCRIPT in two guests joined by a link (listen side first)."""
        from scripts.guest_run import run_pair
        return self._call(run_pair, script, listen_args, connect_args, flags=flags)

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from scripts.guest_run import GuestUnavailable
        try:
            return fn(*args, **kw)
        except GuestUnavailable as e:
            print(e)
            pytest.skip(str(e))


@pytest.fixture(scope="session")
def guest_lab() -> GuestLab:
    """The guest runner, for a module's own `guest` fixture (module scope: one boot a module)."""
    skip_without_root(KERNEL_FIXTURES["guest_lab"])
    return GuestLab()
