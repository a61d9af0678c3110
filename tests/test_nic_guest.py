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

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "scripts" / "guest"

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="the guest tool installs with apt")]


def _qemu_why_not() -> str:
    try:
        r = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    except FileNotFoundError:
        return ""       # scripts/guest installs it (root)
    return "" if r.returncode == 0 else f"qemu-system-x86_64 cannot run: {r.stderr.strip()}"


def boot(mode: str, *flags: str) -> dict[str, Any]:
    why = _qemu_why_not()
    if why:
        print(why)
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="nic-guest-") as out:
        t = time.monotonic()
        r = subprocess.run([str(GUEST), "--nics", "2", "--hugepages", "256", *flags, "--out", out,
                            "--", sys.executable, "tests/guest/nic_checks.py", mode,
                            "/lab/results.json"],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
        res = Path(out) / "results.json"
        results = json.loads(res.read_text()) if res.exists() else {}
    took = time.monotonic() - t
    print(f"\nguest ({mode}) exited {r.returncode} after {took:.0f} s")
    output = r.stdout + r.stderr
    if not results:
        pytest.fail(f"the guest wrote no results (exit {r.returncode}):\n{output}")
    return {"results": results, "output": output, "rc": r.returncode}


@pytest.fixture(scope="module")
def uio() -> dict[str, Any]:
    return boot("uio")


@pytest.fixture(scope="module")
def vfio() -> dict[str, Any]:
    return boot("vfio", "--iommu")


def ok(run: dict[str, Any], name: str) -> Any:
    r = run["results"].get(name)
    if r is None:
        pytest.fail(f"check {name} did not run; guest output:\n{run['output']}")
    if not r["ok"]:
        pytest.fail(f"{name} failed in the guest:\n{r['error']}\nguest output:\n{run['output']}")
    return r["detail"]


def test_auto_without_iommu_picks_uio(uio):
    d = ok(uio, "auto_without_iommu")
    assert "-> uio_pci_generic" in d["plan"] and "no IOMMU" in d["plan"]


def test_management_interface_refused_unless_force(uio):
    d = ok(uio, "refuse_management")
    assert "10.77.0.1/24" in d["refusal"]
    assert "binding anyway (force)" in d["forced_plan"]


def test_bind_uio_through_journal(uio):
    d = ok(uio, "bind_uio")
    assert all(s["driver"] == "uio_pci_generic" and not s["ifaces"] for s in d["state"].values())
    assert all(e["kind"] == "bind" and e["driver"] == "e1000" for e in d["journal"])


def test_dpdk_workers_on_uio(uio):
    d = ok(uio, "dpdk_workers")
    print(d)
    assert d["unique"] == d["received_generated"] > 0
    assert d["zero_copy"] == 0 and d["copied"] == d["rx_packets"]


def test_undo_restores_e1000_and_names(uio):
    d = ok(uio, "undo_restores_e1000")
    print(d["log"])
    assert all(s["driver"] == "e1000" for s in d["state"].values())


def test_failed_bind_restores_e1000(uio):
    d = ok(uio, "failed_bind_restores")
    assert "restored e1000" in d["virtio-pci"]
    assert "nosuch_driver" in d["nosuch_driver"]


def test_vfio_bind_round_trip(vfio):
    d = ok(vfio, "vfio_bind_round_trip")
    assert "-> vfio-pci" in d["plan_auto"]


def test_dpdk_workers_on_vfio_copy_mode(vfio):
    d = ok(vfio, "vfio_dpdk_copy_mode")
    print(d)
    assert d["unique"] == d["received_generated"] > 0 and d["zero_copy"] == 0


def test_dpdk_workers_on_vfio_zero_copy(vfio):
    """The arena pool DMA-mapped in the IOMMU (rte_vfio_container_dma_map): the NIC writes
    frames straight into the arena, and every generated sequence number arrives."""
    r = vfio["results"].get("vfio_dpdk_zero_copy", {})
    assert r.get("ok"), r.get("error") or "not run"


def test_cli_plan_up_down_in_the_guest(uio):
    """`dataplane plan`, `up` (binds both NICs, runs the workers on them), `down` (e1000 back
    with the original names): the operator's commands, on a real PCI PMD."""
    d = ok(uio, "cli_plan_up_down")
    print(d["plan"], d["up"], d["down"], sep="\n")
    assert d["unique"] >= 2000
