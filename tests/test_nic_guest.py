"""NIC binding for real: dataplane.host.nic inside a QEMU guest running Debian's kernel (this
host kernel has no VFIO, no UIO and no loadable modules), with two e1000 NICs on a QEMU hub.

Two guests, each booted once for the module, each running one Python process
(tests/guest/nic_checks.py) that does every check and writes the results to the lab share:
  - no IOMMU: auto picks uio_pci_generic and says why; a device carrying an address is refused
    (named) unless force; bind through apply() with a journal; the DPDK worker generating on one
    NIC and receiving on the other (copy mode: uio means IOVA as PA); undo gives e1000 back
    (module reloaded first) with the original names; a failed bind restores e1000.
  - --iommu (q35 + intel-iommu): vfio-pci bind/unbind round trip; workers in copy mode; the
    arena's zero copy on vfio (the worker DMA-maps the arena pool in the IOMMU).
"""

from __future__ import annotations

import pytest

from scripts.guest_run import GuestRun

pytestmark = pytest.mark.root("the guest tool installs with apt")


def boot(guest_lab, mode: str, *flags: str) -> GuestRun:
    return guest_lab.checks("nic_checks.py", mode,
                            flags=("--nics", "2", "--hugepages", "256", *flags))


@pytest.fixture(scope="module")
def uio(guest_lab) -> GuestRun:
    return boot(guest_lab, "uio")


@pytest.fixture(scope="module")
def vfio(guest_lab) -> GuestRun:
    return boot(guest_lab, "vfio", "--iommu")


def test_auto_without_iommu_picks_uio(uio):
    d = uio.ok("auto_without_iommu")
    assert "-> uio_pci_generic" in d["plan"] and "no IOMMU" in d["plan"]


def test_management_interface_refused_unless_force(uio):
    d = uio.ok("refuse_management")
    assert "10.77.0.1/24" in d["refusal"]
    assert "binding anyway (force)" in d["forced_plan"]


def test_bind_uio_through_journal(uio):
    d = uio.ok("bind_uio")
    assert all(s["driver"] == "uio_pci_generic" and not s["ifaces"] for s in d["state"].values())
    assert all(e["kind"] == "bind" and e["driver"] == "e1000" for e in d["journal"])


def test_dpdk_workers_on_uio(uio):
    d = uio.ok("dpdk_workers")
    print(d)
    assert d["unique"] == d["received_generated"] > 0
    assert d["zero_copy"] == 0 and d["copied"] == d["rx_packets"]


def test_undo_restores_e1000_and_names(uio):
    d = uio.ok("undo_restores_e1000")
    print(d["log"])
    assert all(s["driver"] == "e1000" for s in d["state"].values())


def test_failed_bind_restores_e1000(uio):
    d = uio.ok("failed_bind_restores")
    assert "restored e1000" in d["virtio-pci"]
    assert "nosuch_driver" in d["nosuch_driver"]


def test_vfio_bind_round_trip(vfio):
    d = vfio.ok("vfio_bind_round_trip")
    assert "-> vfio-pci" in d["plan_auto"]


def test_dpdk_workers_on_vfio_copy_mode(vfio):
    d = vfio.ok("vfio_dpdk_copy_mode")
    print(d)
    assert d["unique"] == d["received_generated"] > 0 and d["zero_copy"] == 0


def test_dpdk_workers_on_vfio_zero_copy(vfio):
    """The arena pool DMA-mapped in the IOMMU (rte_vfio_container_dma_map): the NIC writes
    frames straight into the arena, and every generated sequence number arrives."""
    d = vfio.ok("vfio_dpdk_zero_copy")
    print(d)
    assert d["unique"] == d["received_generated"] > 0 and d["zero_copy"] == 1


def test_cli_plan_up_down_in_the_guest(uio):
    """`dataplane plan`, `up` (binds both NICs, runs the workers on them), `down` (e1000 back
    with the original names): the operator's commands, on a real PCI PMD."""
    d = uio.ok("cli_plan_up_down")
    print(d["plan"], d["up"], d["down"], sep="\n")
    assert d["unique"] >= 2000
