"""Config cross-checks against what the native workers and transports refuse later: each error
names the key path, the value and the limit, read from the native build (never restated here
either), and a worker and a transport can neither share a name nor a shared-memory file."""

from __future__ import annotations

import re

import pytest
from dataplane._native import lib

from dataplane import config
from dataplane.config.specs import arena_filename
from dataplane.config.tables import ConfigError
from dataplane.shm.control import control_path


def worker(name: str = "w", driver: str = "af_packet", extra: str = "", port: str = "",
           gen: str = "") -> str:
    keys = {"af_packet": 'iface = "eth0"', "udp": "udp_port = 9000", "pci": 'pci = "00:03.0"'}
    text = (f'[[worker]]\nname = "{name}"\n{extra}\n[[worker.port]]\nname = "p"\n'
            f'driver = "{driver}"\n{keys[driver]}\n{port}\n')
    return text + (f'[worker.generate]\nport = "p"\n{gen}\n' if gen else "")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    return e.value.problems


def dpdk_dataroom() -> int:
    dpdk = pytest.importorskip("dataplane._dpdk", reason="DPDK worker not built")
    return int(dpdk.lib.DPW_MBUF_DATAROOM)


def test_burst_above_the_native_limit_is_refused_naming_it() -> None:
    over = lib.DP_MAX_BURST + 1
    assert problems(worker(extra=f"burst = {over}")) == [
        f"worker[0].burst = {over}: at most {lib.DP_MAX_BURST} (DP_MAX_BURST, the workers' "
        "per-burst arrays)"]
    [msg] = problems(worker(gen=f"burst = {over}"))
    assert msg.startswith(f"worker[0].generate.burst = {over}: at most {lib.DP_MAX_BURST}")
    config.loads(worker(extra=f"burst = {lib.DP_MAX_BURST}"))      # the limit itself is fine


def test_io_uring_ring_size_above_the_provided_buffer_limit_is_refused() -> None:
    over = lib.DP_URING_MAX_BUFS * 2
    [msg] = problems(f"[arena]\nring_size = {over}\n" + worker(driver="udp"))
    assert msg.startswith(f"arena.ring_size = {over}: at most {lib.DP_URING_MAX_BUFS} for "
                          'worker[0] ("w", backend uring)'), msg
    config.loads(f"[arena]\nring_size = {lib.DP_URING_MAX_BUFS}\n" + worker(driver="udp"))


def test_copybreak_above_slot_size_is_refused_for_a_zero_copy_dpdk_worker() -> None:
    dpdk_dataroom()
    text = "[arena]\nslot_size = 1024\n" + worker(driver="pci", extra="copybreak = 1500")
    assert problems(text) == ["worker[0].copybreak = 1500: at most arena.slot_size = 1024; a "
                              "frame copied into its slot is cut at slot_size"]
    config.loads(text.replace("copybreak = 1500", "copybreak = 1500\nzero_copy = false"))


def test_slot_size_a_zero_copy_dpdk_worker_cannot_honour_is_refused() -> None:
    room = dpdk_dataroom()
    big = room * 2
    [msg] = problems(f"[arena]\nslot_size = {big}\n" + worker(driver="pci"))
    assert msg.startswith(f"arena.slot_size = {big}: at most {room} (the DPDK mbuf data room"), msg
    config.loads(f"[arena]\nslot_size = {big}\n" + worker(driver="pci", extra="zero_copy = false"))


def test_rdma_sender_of_zero_copy_frames_longer_than_the_slots_is_refused() -> None:
    """The receiver refuses a frame longer than its slot, the sender reconnects and sends it
    again: a wedge; refused before it runs."""
    room = dpdk_dataroom()
    small = room // 2
    send = ('[[transport]]\nname = "ship"\nkind = "rdma"\nrole = "send"\nfrom = "w.p"\n'
            'peer = "10.9.9.1:18515"\ninsecure = true\n')
    text = f"[arena]\nslot_size = {small}\n" + worker(driver="pci", extra="copybreak = 64") + send
    [msg] = problems(text)
    assert msg.startswith(f'arena.slot_size = {small}: transport[0] ("ship", kind rdma) ships '
                          'worker "w" (zero_copy = true)'), msg
    assert f"at least {room}" in msg
    config.loads(text.replace("copybreak = 64", "copybreak = 64\nzero_copy = false"))
    config.loads(text.replace(f"slot_size = {small}", f"slot_size = {room}"))


def test_a_worker_and_a_transport_cannot_share_a_name() -> None:
    recv = ('[[transport]]\nname = "w"\nrole = "recv"\nlisten = "10.77.0.1:7100"\n'
            'insecure = true\n')
    assert problems(worker() + recv) == [
        'transport[0].name = "w": also the name of worker[0]; workers and transports share one '
        "name space"]


@pytest.mark.parametrize("name", ["transport-x", "x", "a.b", "../x", "x/y"])
def test_worker_and_transport_files_never_collide(name: str) -> None:
    """The issue's collision: a worker "transport-x" and a transport "x" had one arena file.
    Worker files start "dataplane-", transport files "dataplane.transport."; names have no dot
    or slash, so neither can spell the other's prefix."""
    ctl = control_path("x")
    assert arena_filename("transport-x") not in (ctl.rsplit("/", 1)[1],
                                                 ctl.removesuffix(".ctl").rsplit("/", 1)[1])
    ok = "." not in name and "/" not in name
    for kind in (worker(name=name),
                 f'[[transport]]\nname = "{name}"\nrole = "recv"\nlisten = "10.0.0.1:1"\n'
                 'insecure = true\n' + worker()):
        if ok:
            config.loads(kind)
        else:
            assert any(".name" in p for p in problems(kind))


def test_total_arena_size_is_bounded_by_shm_and_memory() -> None:
    # 32 rings of 1 Mi slots of 16 KiB: 512 GiB, more than half of any machine this runs on
    text = ('[arena]\nring_size = 1048576\nslot_size = 16384\nhugepages = "no"\n'
            + worker(driver="pci", extra="zero_copy = false",
                     port="queues = 16") + '[[worker.port]]\nname = "q"\ndriver = "pci"\n'
            'pci = "00:04.0"\nqueues = 16\n')
    cfg = config.loads(text)
    with pytest.raises(ConfigError) as e:
        config.plan(cfg)
    [msg] = e.value.problems
    assert msg.startswith("arena.ring_size = 1048576, arena.slot_size = 16384, arena.pool_mb = "
                          "64: the arenas in /dev/shm need "), msg
    need = re.search(r"need (\d+) MiB \(w (\d+) MiB\), at most (\d+) MiB: ", msg)
    assert need, msg
    assert int(need[1]) == int(need[2]) >= 32 * 16384 and int(need[3]) < int(need[1])
    assert "MiB free" in msg or "half of this machine's RAM" in msg
    config.plan(config.loads(text.replace("1048576", "64")))     # a small ring fits
