"""Shared memory is never trusted: ring indices another process wrote are checked before use,
and arena and control files are opened without trusting their path, owner or header.

Live workers (io_uring on a veth, DPDK on memif in zero-copy) have their ring's consumer index
corrupted under them: each stops with the reason in its arena header and exits with the
worker's failure code (2), never a crash, a double free or a spin; the supervisor reports it and
does not restart it.  The Python reader raises RingCorrupted on impossible producer indices and
the consumer loop drops that ring and goes on with the others.  Files: a symlinked path, a
foreign-owned file, a truncated file, header offsets past the file's end are refused, each with
the path and what is wrong.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dataplane._native import ffi, lib

from dataplane.consumers.api import Batch
from dataplane.consumers.loop import ConsumerLoop
from dataplane.host.files import UnsafePath
from dataplane.shm.arena import Arena, ArenaGeometry
from dataplane.shm.control import Control
from dataplane.shm.layout import LayoutError
from dataplane.shm.ring import RingCorrupted
from dataplane.transport.process import TransportProcess
from dataplane.workers.spec import PortSpec
from dataplane.workers.supervisor import Supervisor
from tests.helpers.frames import RingFiller, frame
from tests.helpers.workers import Worker, gen_spec, worker_spec
from tests.test_transport import (
    Lab,
    drain,
    lab,  # noqa: F401 - the fixture: two namespaces, a veth, a key
    produce,
    receiver,
    sender,
    source_arena,
)

NOBODY = 65534
FAILED = 2    # dataplane.workers.process: the worker's failure code


# ---- live workers ----

def wait_published(w_arena: Arena, at_least: int, proc=None, timeout: float = 20) -> int:
    """Until the worker's ring 0 has published at_least descriptors; its prod."""
    r = w_arena.rings[0].shared
    deadline = time.monotonic() + timeout
    while r.prod < at_least:
        assert proc is None or proc.poll() is None, "worker died before publishing"
        assert time.monotonic() < deadline, f"worker published {r.prod} of {at_least}"
        time.sleep(0.01)
    return r.prod


def wait_exit(proc, timeout: float = 20) -> int:
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        pytest.fail("the worker neither stopped nor exited after its ring was corrupted "
                    "(a spin?)")


def check_stopped(w: Worker, *phrases: str) -> str:
    rc = wait_exit(w.proc)
    err = w.proc.stderr.read() if w.proc.stderr else ""
    assert rc == FAILED, f"exit {rc} (a signal is negative: a crash): {err}"
    assert w.arena.worker_state() == "failed"
    msg = w.arena.worker_error()
    for p in ("ring 0: consumer index", "(corrupted or foreign writer)", *phrases):
        assert p in msg, msg
        assert p in err, err
    return msg


def uring_pair(workers, veth, tag: str, **rx_kw) -> tuple[Worker, Worker]:
    """A uring receiver on one end of the veth, a generator sending until stopped on the
    other; the receiver has published something when this returns."""
    ns_a, ns_b, if_a, if_b = veth
    rx = workers(worker_spec(f"{tag}r", PortSpec("in", iface=if_b), backend="uring", **rx_kw),
                 netns=ns_b)
    rx.wait_running()
    tx = workers(worker_spec(f"{tag}t", PortSpec("out", iface=if_a), gen_spec(count=0, rate=5000),
                             backend="uring"), netns=ns_a)
    tx.wait_running()
    return tx, rx


def test_uring_worker_stops_on_cons_ahead_of_prod(workers, veth):
    tx, rx = uring_pair(workers, veth, "ua")
    prod = wait_published(rx.arena, 10, rx.proc)
    rx.arena.rings[0].shared.cons = prod + 1_000_000     # a consumer "released" the future
    msg = check_stopped(rx, "ahead of producer")
    assert f"consumer index {prod + 1_000_000} ahead" in msg
    assert tx.proc.poll() is None     # the rest of the tree runs on
    tx.stop()


def test_uring_worker_stops_on_cons_far_behind(workers, veth):
    """A ring left drained at a high index (a predecessor's) is taken; then cons jumps back
    by more than the ring holds: the worker must neither loop ~2^64 times nor return buffers."""
    spec = worker_spec("ub", PortSpec("in", iface=veth[3]), backend="uring")
    geo = ArenaGeometry(1, spec.rings(), spec.ring_size, spec.slot_size, spec.pool_mb << 20)
    arena = Arena.create(Path(spec.arena_path), geo)
    base = 10**9
    arena.rings[0].shared.prod = arena.rings[0].shared.cons = base
    rx = workers(spec, netns=veth[1], arena=arena)
    rx.wait_running()
    tx = workers(worker_spec("ubt", PortSpec("out", iface=veth[2]), gen_spec(count=0, rate=5000),
                             backend="uring"), netns=veth[0])
    tx.wait_running()
    wait_published(arena, base + 10, rx.proc)
    arena.rings[0].shared.cons = base - 50_000
    check_stopped(rx, f"more than the ring's {spec.ring_size} behind producer")
    tx.stop()


def test_restarted_worker_refuses_impossible_indices_at_once(workers, veth):
    """A worker attaching to a ring whose cons is ahead of prod does not wait 5 s for a
    consumer to 'drain' it: it fails at once, naming the indices."""
    spec = worker_spec("uc", PortSpec("in", iface=veth[3]), backend="uring")
    geo = ArenaGeometry(1, spec.rings(), spec.ring_size, spec.slot_size, spec.pool_mb << 20)
    arena = Arena.create(Path(spec.arena_path), geo)
    arena.rings[0].shared.prod = 100
    arena.rings[0].shared.cons = 123
    w = workers(spec, netns=veth[1], arena=arena)
    t0 = time.monotonic()
    msg = check_stopped(w, "consumer index 123 ahead of producer 100")
    assert time.monotonic() - t0 < 4.5, "waited for a drain that cannot come"
    assert msg.startswith("ring 0: ")


def test_worker_refuses_header_offsets_not_of_its_geometry(workers, veth):
    spec = worker_spec("uo", PortSpec("in", iface=veth[3]), backend="uring")
    geo = ArenaGeometry(1, spec.rings(), spec.ring_size, spec.slot_size, spec.pool_mb << 20)
    arena = Arena.create(Path(spec.arena_path), geo)
    arena.header.slots_off += 4096          # a foreign writer moved the slots
    w = workers(spec, netns=veth[1], arena=arena)
    assert wait_exit(w.proc) == FAILED
    assert w.arena.worker_error() == ("arena header: offsets are not the ones of its geometry "
                                      "(corrupted or foreign writer)")


def test_worker_keeps_its_own_slot_geometry(workers, veth):
    """The ring header's slots_off moved under a running worker: the kernel is still handed
    (and descriptors still name) the slots the worker checked when it attached."""
    tx, rx = uring_pair(workers, veth, "ug")
    prod = wait_published(rx.arena, 10, rx.proc)
    r = rx.arena.rings[0]
    lo, hi = r.slots_off, r.slots_off + r.size * r.slot_size
    r.shared.slots_off = 1 << 40
    seen, deadline = 0, time.monotonic() + 30
    while seen < prod + r.size + 10:         # every buffer goes round again
        assert rx.proc.poll() is None and time.monotonic() < deadline, rx.arena.worker_error()
        for b in r.batches():
            assert ((b["addr"] >= lo) & (b["addr"] + b["len"] <= hi)).all()
            seen += len(b)
        time.sleep(0.01)
    assert rx.arena.worker_state() == "running"
    r.shared.slots_off = lo
    tx.stop()
    rx.stop()


def test_supervisor_reports_and_does_not_restart(workers, veth):
    ns_a, ns_b, if_a, if_b = veth
    spec = worker_spec("us", PortSpec("in", iface=if_b), backend="uring", netns=ns_b)
    tx = workers(worker_spec("ust", PortSpec("out", iface=if_a), gen_spec(count=0, rate=5000),
                             backend="uring"), netns=ns_a)
    with Supervisor([spec], heartbeat_timeout=3.0) as sup:
        sup.start()
        sup.wait_running(30)
        tx.wait_running()
        w = sup.workers[spec.name]
        prod = wait_published(w.arena, 10, w.proc)
        w.arena.rings[0].shared.cons = prod + 777_777
        events: list[str] = []
        deadline = time.monotonic() + 20
        while not any("gave up" in e for e in events):
            assert time.monotonic() < deadline, events
            events += sup.check()
            time.sleep(0.05)
        assert w.proc.returncode == FAILED
        assert w.gave_up.startswith("stopped: shared memory corrupted: ring 0: consumer index")
        assert any("exited with status 2: ring 0: consumer index" in e for e in events), events
        assert not any("restarted" in e for e in events), events
        assert len(w.starts) == 1
        assert sup.check() == []           # given up: nothing more happens
    tx.stop()


@pytest.mark.dpdk
def test_dpdk_zero_copy_worker_frees_no_stale_mbuf(workers, sockdir):
    """memif, every frame left in its mbuf (copybreak 0): a cons ahead of prod would have
    freed mbufs the worker never received or already freed.  It stops instead."""
    dev = f"socket={sockdir / 'memif.sock'},socket-abstract=no,id=0"
    tx = workers(worker_spec("dzs", PortSpec("net_memif0", f"net_memif0,role=server,{dev}"),
                             gen_spec(count=0, rate=5000)))
    tx.wait_running()
    rx = workers(worker_spec("dzc", PortSpec("net_memif1", f"net_memif1,role=client,{dev}"),
                             copybreak=0))
    rx.wait_running()
    prod = wait_published(rx.arena, 10, rx.proc)
    assert rx.arena.header.zero_copy == 1
    rx.arena.rings[0].shared.cons = prod + 4096
    check_stopped(rx, "ahead of producer")
    assert tx.proc.poll() is None
    tx.stop()


# ---- the Python reader and the consumer loop ----

def test_reader_refuses_impossible_producer_indices(new_arena):
    a = new_arena("trust")
    ring, r = a.rings[0], a.rings[0].shared
    RingFiller(a, 0).put([frame(size=64)] * 3)
    assert len(ring.peek()) == 3
    ring.release(3)
    r.prod = 1                                        # behind what was consumed
    with pytest.raises(RingCorrupted, match=r"ring 0 .*producer index 1 behind consumer 3"):
        ring.peek()
    with pytest.raises(RingCorrupted):                # and it stays stopped
        ring.ready()

    b = new_arena("trust")
    ring = b.rings[0]
    ring.shared.prod = ring.size + 1                  # more than the ring holds
    with pytest.raises(RingCorrupted, match=f"more than the ring's {ring.size} ahead"):
        ring.peek()

    c = new_arena("trust")
    ring = c.rings[0]
    RingFiller(c, 0).put([frame(size=64)] * 5)
    assert ring.ready() == 5
    assert ring.ready(start=2) == 3                   # a sender's peek ahead of release
    ring.shared.prod = 4                              # went back from 5
    with pytest.raises(RingCorrupted, match="went back from 5"):
        ring.ready(start=5)


class Count:
    def __init__(self) -> None:
        self.n = 0

    def on_batch(self, batch: Batch) -> None:
        self.n += len(batch)


def test_consumer_loop_drops_the_corrupted_ring_only(new_arena):
    bad, good = new_arena("trustbad"), new_arena("trustgood")
    bad.rings[0].shared.prod = 5_000_000
    fill = RingFiller(good, 0)
    fill.put([frame(size=64)] * 10)
    count = Count()
    loop = ConsumerLoop([(bad, bad.rings[0]), (good, good.rings[0])], [count])
    assert loop.sweep() == 10                         # no exception out of the loop
    assert count.n == 10
    assert len(loop.ring_faults) == 1 and "producer index 5000000" in loop.ring_faults[0]
    assert loop.errors == 1
    assert [s.ring for s in loop.sources] == [good.rings[0]]
    fill.put([frame(size=64)] * 4)
    assert loop.sweep() == 4 and count.n == 14        # the other ring goes on
    assert len(loop.ring_faults) == 1


# ---- files ----

def arena_file(tmp: str = "trustfile") -> tuple[Path, Arena]:
    path = Path("/dev/shm") / f"dptest-{tmp}-{os.getpid()}-{time.monotonic_ns()}"
    return path, Arena.create(path, ArenaGeometry(1, ((0, 0),), 64, 2048, 0))


@pytest.fixture
def arena_path():
    path, a = arena_file()
    a.close()
    link = path.with_name(path.name + "-link")
    yield path
    link.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def test_symlinked_arena_is_refused(arena_path: Path):
    link = arena_path.with_name(arena_path.name + "-link")
    link.symlink_to(arena_path)
    with pytest.raises(UnsafePath, match=f"{link} is a symbolic link"):
        Arena.open(link)
    length = ffi.new("uint64_t *")
    assert lib.dp_arena_map(str(link).encode(), length) == ffi.NULL   # the workers' own map
    assert ffi.errno == errno.ELOOP
    Arena.open(arena_path).close()                    # the file itself is fine


@pytest.mark.root("chown to another user")
def test_foreign_owned_arena_and_control_refused(arena_path: Path, tmp_path: Path):
    os.chown(arena_path, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"{arena_path}: owned by uid {NOBODY}"):
        Arena.open(arena_path)
    length = ffi.new("uint64_t *")
    assert lib.dp_arena_map(str(arena_path).encode(), length) == ffi.NULL
    assert ffi.errno == errno.EPERM

    ctl = tmp_path / "ctl"
    Control(ctl, create=True).close()
    Control(ctl).close()
    os.chown(ctl, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"{ctl}: owned by uid {NOBODY}"):
        Control(ctl)


def test_control_file_writable_by_others_or_linked_or_short_refused(tmp_path: Path):
    ctl = tmp_path / "ctl"
    Control(ctl, create=True).close()
    os.chmod(ctl, 0o622)
    with pytest.raises(UnsafePath, match="group or others may write it"):
        Control(ctl)
    os.chmod(ctl, 0o600)
    link = tmp_path / "link"
    link.symlink_to(ctl)
    with pytest.raises(UnsafePath, match="symbolic link"):
        Control(link)
    with pytest.raises(FileExistsError):             # create never opens what is there
        Control(link, create=True)
    os.truncate(ctl, 64)
    with pytest.raises(LayoutError, match=f"{ctl}: 64 bytes, a version"):
        Control(ctl)


def test_truncated_arena_refused(arena_path: Path):
    size = arena_path.stat().st_size
    os.truncate(arena_path, size // 2)
    with pytest.raises(LayoutError, match=f"file is {size // 2} bytes, header says {size}"):
        Arena.open(arena_path)
    os.truncate(arena_path, 100)
    with pytest.raises(LayoutError, match="100 bytes, shorter than an arena header"):
        Arena.open(arena_path)
    os.truncate(arena_path, 0)
    with pytest.raises(LayoutError, match="truncated or not an arena"):
        Arena.open(arena_path)


def poke(path: Path, **fields: int) -> None:
    """Write header fields of a closed arena file in place, as a foreign writer would."""
    with Arena.open(path) as a:
        for k, v in fields.items():
            setattr(a.header, k, v)


@pytest.mark.parametrize("fields, match", [
    ({"slots_off": 1 << 40}, "header slots_off is 1099511627776, its geometry gives"),
    ({"rings_off": 8}, "header rings_off is 8"),
    ({"pool_off": 1 << 50}, "header pool_off is"),
    ({"ring_stride": 1 << 30}, "header ring_stride is"),
    ({"ring_size": 1 << 30}, "impossible geometry"),          # slots past the end of the file
    ({"ring_size": 100}, "impossible geometry"),              # not a power of two
    ({"n_rings": 33}, "impossible geometry"),
])
def test_header_offsets_past_the_file_refused(arena_path: Path, fields: dict, match: str):
    poke(arena_path, **fields)
    with pytest.raises(LayoutError, match=match):
        Arena.open(arena_path)


def test_ring_header_not_the_arenas_refused(arena_path: Path):
    with Arena.open(arena_path) as a:
        a.rings[0].shared.size = 1 << 20             # desc[] would run past the ring
    with pytest.raises(LayoutError, match="ring 0 header .size 1048576"):
        Arena.open(arena_path)


# ---- the TCP transport: the sender consumes a worker's ring, the receiver produces on its own ----

@contextmanager
def tcp_pair(lab: Lab) -> Iterator[tuple[Arena, TransportProcess, TransportProcess]]:  # noqa: F811
    """(source arena, receiver, sender), connected, 100 frames delivered and released."""
    src = source_arena(lab)
    with receiver(lab) as rx, sender(lab, src, "copy") as tx:
        rx.start()
        rx.wait_running()
        tx.start()
        tx.wait_running()
        produce(src, 100).join()
        assert drain(rx.arena, [], 100) == 100            # it works before
        deadline = time.monotonic() + 10
        while src.rings[0].shared.cons != 100:             # every batch acknowledged
            assert time.monotonic() < deadline, src.rings[0].shared.cons
            time.sleep(0.01)
        yield src, rx, tx
    src.close()


@pytest.mark.root("netns, veth")
def test_tcp_sender_stops_on_prod_far_ahead(lab: Lab) -> None:  # noqa: F811
    """The sender reads prod written by the worker: one more than the ring could hold ahead of
    what it released would make it ship slots nobody wrote.  It stops instead, with the
    reason in its control file."""
    with tcp_pair(lab) as (src, rx, tx):
        ring = src.rings[0].shared
        ring.prod = 100 + 10 * ring.size
        assert wait_exit(tx.proc) > 0                      # failed, not a signal
        assert tx.control.state() == "failed"
        err = tx.control.error()
        assert err == (f"ring 0: producer index {100 + 10 * ring.size} more than the ring's "
                       f"{ring.size} ahead of consumer 100 (corrupted or foreign writer)"), err
        assert rx.proc.poll() is None                      # the other end carries on


@pytest.mark.root("netns, veth")
def test_tcp_receiver_stops_on_cons_ahead(lab: Lab) -> None:  # noqa: F811
    """The receiver publishes on its own arena's ring and reads cons when its cached room runs
    out: an impossible one stops it (before, it waited for room forever)."""
    with tcp_pair(lab) as (src, rx, tx):
        ring = rx.arena.rings[0].shared
        ring.cons = 1_000_000
        more = produce(src, ring.size + 100)     # more than the receiver's cached room
        assert wait_exit(rx.proc) > 0
        src.request_stop()                       # the producer may wait for room: let it end
        more.join()
        assert rx.control.state() == "failed"
        assert rx.control.error().startswith("ring 0: consumer index 1000000 ahead of producer"), \
            rx.control.error()


@pytest.mark.root("netns, veth")
@pytest.mark.parametrize("where", ["past the end", "inside the header"])
def test_tcp_sender_stops_on_a_descriptor_outside_the_arena(lab: Lab, where: str) -> None:  # noqa: F811
    """The sender turns each descriptor into an iovec of the worker's arena: one pointing past
    the mapping (or into the header) would send other memory or crash.  It stops instead,
    having sent nothing of it."""
    with tcp_pair(lab) as (src, rx, tx):
        ring = src.rings[0]
        d = ring.desc[100 % ring.size]
        d["addr"] = len(src.mapping) + 4096 if where == "past the end" else 8
        d["len"] = 64
        ring.desc[100 % ring.size] = d
        lib.dp_ring_store_prod(ring.shared, 101)
        assert wait_exit(tx.proc) > 0
        assert tx.control.state() == "failed"
        assert "points outside the arena" in tx.control.error(), tx.control.error()
        assert rx.control.counter("packets") == 100          # nothing of it was shipped
