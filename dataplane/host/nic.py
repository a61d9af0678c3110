"""NIC binding: give a PCI network device to a DPDK driver (vfio-pci or uio_pci_generic) and back.

Through sysfs only, the way `dpdk-devbind.py` does it by hand:

    echo uio_pci_generic > /sys/bus/pci/devices/ADDR/driver_override
    echo ADDR > /sys/bus/pci/devices/ADDR/driver/unbind
    echo ADDR > /sys/bus/pci/drivers/uio_pci_generic/bind

`BindDevice` is the Change of kind "bind"; `undo_bind` (registered in UNDO) gives the device back
to its original driver, loading that driver's module first, and puts the interface's old name
back.  A device never ends a failed bind with no driver: the original one is restored first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from dataplane.host import UNDO, PlanLine
from dataplane.host.proc import poll
from dataplane.host.settings import Bind

log = logging.getLogger("dataplane.host.nic")

PCI_DEVICES = Path("/sys/bus/pci/devices")
PCI_DRIVERS = Path("/sys/bus/pci/drivers")
NET = Path("/sys/class/net")
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")
DPDK_DRIVERS = ("vfio-pci", "uio_pci_generic")
_PCI_RE = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


class NicError(RuntimeError):
    """A binding the host refuses or that failed; the message says what and why."""


# ---- reading the host ----

def normalise_pci(addr: str) -> str:
    """"00:03.0" or "0000:00:03.0" -> "0000:00:03.0"."""
    m = _PCI_RE.match(addr.strip().lower())
    if not m:
        raise NicError(f"{addr!r} is not a PCI address (DDDD:BB:DD.F)")
    return f"{m[1] or '0000'}:{m[2]}:{m[3]}.{m[4]}"


def resolve(bind: Bind) -> str:
    """The PCI address a Bind names: its pci, or the device behind its iface."""
    if bind.pci:
        pci = normalise_pci(bind.pci)
        if not (PCI_DEVICES / pci).exists():
            raise NicError(f"no PCI device {pci} ({PCI_DEVICES / pci} is absent)")
        return pci
    dev = NET / bind.iface / "device"
    if not (NET / bind.iface).exists():
        raise NicError(f"no interface {bind.iface!r}: if a DPDK driver already has it, name "
                       "the device by pci = \"DDDD:BB:DD.F\" instead")
    if not dev.exists():
        raise NicError(f"interface {bind.iface} has no device behind it (virtual interface)")
    target = dev.resolve()
    # virtio-net: the interface's device is virtioN, a child of the PCI function DPDK takes
    for t in (target, target.parent):
        if _PCI_RE.match(t.name) and (PCI_DEVICES / t.name).exists():
            return t.name
    raise NicError(f"interface {bind.iface} is not a PCI device ({target})")


def driver_of(pci: str) -> str | None:
    link = PCI_DEVICES / pci / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def module_of(driver: str) -> str | None:
    """The module providing a driver (e1000 -> e1000, vfio-pci -> vfio_pci); None: built in."""
    link = PCI_DRIVERS / driver / "module"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def interfaces_of(pci: str) -> list[str]:
    """The device's network interfaces: ADDR/net/*, or ADDR/virtioN/net/* for virtio-net."""
    dev = PCI_DEVICES / pci
    return sorted(p.name for p in [*dev.glob("net/*"), *dev.glob("virtio*/net/*")])


def _override(pci: str) -> str | None:
    try:
        v = (PCI_DEVICES / pci / "driver_override").read_text().strip()
    except OSError:
        return None
    return None if v in ("", "(null)") else v


def _ip_json(*args: str) -> list[dict[str, Any]]:
    r = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    return json.loads(r.stdout or "[]") if r.returncode == 0 else []


def carried(iface: str) -> list[str]:
    """What an interface carries that a DPDK bind would take away: its addresses and routes.
    IPv6 link-local addresses and the fe80::/64 route are left out: every interface that is up
    has them, they carry nothing an operator set."""
    out = []
    for link in _ip_json("addr", "show", "dev", iface):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet6" and a.get("scope") == "link":
                continue
            out.append(f"address {a['local']}/{a['prefixlen']}")
    for fam in ("-4", "-6"):
        for r in _ip_json(fam, "route", "show", "dev", iface):
            if r.get("dst", "").startswith("fe80::"):
                continue
            out.append("route " + r.get("dst", "?") + (f" via {r['gateway']}" if "gateway" in r
                                                       else ""))
    return out


def iommu_present() -> bool:
    return IOMMU_GROUPS.is_dir() and any(IOMMU_GROUPS.iterdir())


def group_blockers(pci: str) -> list[str]:
    """The devices in pci's IOMMU group that keep vfio-pci from using it: all of them must be
    bound to vfio-pci (or pci-stub) or unbound; PCI bridges may keep their driver."""
    grp = PCI_DEVICES / pci / "iommu_group" / "devices"
    if not grp.is_dir():
        return [f"{pci} has no IOMMU group (no IOMMU: boot with intel_iommu=on or amd_iommu=on, "
                "or use uio_pci_generic)"]
    blockers = []
    for d in sorted(grp.iterdir()):
        if d.name == pci:
            continue
        drv = driver_of(d.name)
        bridge = (PCI_DEVICES / d.name / "class").read_text().startswith("0x0604")
        if drv not in (None, "vfio-pci", "pci-stub") and not bridge:
            blockers.append(f"{d.name} (bound to {drv})")
    return blockers


def _modules_loadable() -> bool:
    return Path("/proc/modules").exists()


def driver_available(driver: str, dry_run: bool = False) -> str | None:
    """None when driver is (or, dry_run, could be) loaded; else why not.  Loads it otherwise."""
    if (PCI_DRIVERS / driver).is_dir():
        return None
    if not _modules_loadable():
        return (f"{driver} is not built into this kernel and it cannot load modules "
                "(/proc/modules is absent)")
    argv = ["modprobe", *(["-n"] if dry_run else []), driver]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        return f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.returncode}"
    if not dry_run and not (PCI_DRIVERS / driver).is_dir():
        return f"modprobe {driver} succeeded but {PCI_DRIVERS / driver} did not appear"
    return None


def choose_driver(requested: str, dry_run: bool = False) -> tuple[str, str]:
    """(driver, why) for a Bind's driver; loads its module unless dry_run.  "auto": vfio-pci
    when an IOMMU is present and vfio-pci loads, else uio_pci_generic."""
    if requested != "auto":
        why = driver_available(requested, dry_run)
        if why:
            raise NicError(why)
        return requested, ""
    reasons = []
    if not iommu_present():
        reasons.append(f"no IOMMU ({IOMMU_GROUPS} is empty)")
    else:
        why = driver_available("vfio-pci", dry_run)
        if why is None:
            return "vfio-pci", "auto: an IOMMU is present"
        reasons.append(why)
    why = driver_available("uio_pci_generic", dry_run)
    if why is None:
        return "uio_pci_generic", "auto: " + "; ".join(reasons) + ": uio_pci_generic"
    raise NicError("auto: neither DPDK driver can be used: " + "; ".join([*reasons, why]))


# ---- sysfs writes ----

def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _bind_to(pci: str, driver: str) -> None:
    """Bind an unbound device to driver; the bind file, else drivers_probe (driver_override set)."""
    try:
        _write(PCI_DRIVERS / driver / "bind", pci)
    except OSError as e:
        if driver_of(pci) is None:
            try:
                _write(PCI_DEVICES.parent / "drivers_probe", pci)
            except OSError:
                pass
        if driver_of(pci) != driver:
            raise NicError(f"echo {pci} > {PCI_DRIVERS / driver / 'bind'}: {e.strerror}") from e


def _unbind(pci: str) -> None:
    if driver_of(pci) is not None:
        _write(PCI_DEVICES / pci / "driver" / "unbind", pci)


def restore_driver(pci: str, driver: str | None, module: str | None,
                   override: str | None = None) -> None:
    """Give pci back to driver (None: leave it unbound): unbind whatever has it, put the old
    driver_override back, load the driver's module, bind."""
    if driver_of(pci) not in (None, driver):
        _unbind(pci)
    # "\n" clears the override: the kernel strips the newline and stores nothing
    _write(PCI_DEVICES / pci / "driver_override", (override or "") + "\n")
    if driver is None or driver_of(pci) == driver:
        return
    if not (PCI_DRIVERS / driver).is_dir():
        # without its module the driver is not there to bind to (seen: e1000 after DPDK use)
        r = subprocess.run(["modprobe", module or driver], capture_output=True, text=True)
        if r.returncode != 0:
            raise NicError(f"cannot give {pci} back to {driver}: modprobe {module or driver}: "
                           f"{r.stderr.strip()}")
    _bind_to(pci, driver)


def _rename_back(pci: str, names: list[str]) -> None:
    """Wait for the original driver to create the interface(s); give them their old names."""
    if not names:
        return
    try:
        now = poll(lambda: interfaces_of(pci), timeout=10.0, interval=0.05,
                   what=f"an interface of {pci}")
    except TimeoutError:
        log.warning("%s: back on its driver but no interface appeared (was %s)", pci, names)
        return
    for new, orig in zip(now, names, strict=False):
        if new == orig:
            continue
        if (NET / orig).exists():
            log.warning("%s: interface came back as %s; %s is taken by another interface, "
                        "left as is", pci, new, orig)
            continue
        r = subprocess.run(["ip", "link", "set", "dev", new, "name", orig],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("%s: interface came back as %s, renaming to %s failed: %s",
                        pci, new, orig, r.stderr.strip())
        else:
            log.info("%s: interface came back as %s, renamed to %s", pci, new, orig)


# ---- the change ----

class BindDevice:
    """Bind one PCI device to a DPDK driver.  The device is resolved when the change is made
    (an iface must still exist then); the driver is chosen without loading anything until
    apply()."""

    kind = "bind"

    def __init__(self, bind: Bind):
        self.bind = bind
        self.pci = resolve(bind)

    def _target(self, dry_run: bool) -> tuple[str, str]:
        cur = driver_of(self.pci)
        if self.bind.driver == "auto" and cur in DPDK_DRIVERS:
            return cur, "auto: already on a DPDK driver"
        return choose_driver(self.bind.driver, dry_run)

    def _refusal(self) -> str:
        """Why the device is refused (it carries addresses or routes), or ""."""
        what = [f"{i} carries {', '.join(c)}" for i in interfaces_of(self.pci)
                if (c := carried(i))]
        return "; ".join(what)

    def describe(self) -> PlanLine:
        cur = driver_of(self.pci)
        ifs = interfaces_of(self.pci)
        what = f"bind {self.pci}" + (f" ({', '.join(ifs)})" if ifs else "")
        notes = []
        if cur not in DPDK_DRIVERS and (refusal := self._refusal()):
            notes.append(f"{refusal}: " + ("binding anyway (force)" if self.bind.force
                                           else "refused (management interface?), "
                                           "force = true to bind anyway"))
        try:
            desired, why = self._target(dry_run=True)
        except NicError as e:
            return PlanLine(what, cur or "none", "?", "; ".join([f"cannot bind: {e}", *notes]))
        if why:
            notes.insert(0, why)
        if cur != desired and desired == "vfio-pci" and (b := group_blockers(self.pci)):
            notes.append("IOMMU group blocked by " + ", ".join(b))
        return PlanLine(what, cur or "none", desired, "; ".join(notes))

    def needed(self) -> bool:
        cur = driver_of(self.pci)
        if self.bind.driver == "auto":
            return cur not in DPDK_DRIVERS
        return cur != self.bind.driver

    def journal_entry(self) -> dict[str, Any]:
        drv = driver_of(self.pci)
        return {"key": self.pci, "pci": self.pci, "driver": drv,
                "module": module_of(drv) if drv else None,
                "ifaces": interfaces_of(self.pci), "driver_override": _override(self.pci)}

    def apply(self) -> None:
        pci = self.pci
        refusal = self._refusal()
        if refusal and not self.bind.force:
            raise NicError(f"refusing to bind {pci}: {refusal} (the management interface?); "
                           "remove them, or set force = true")
        new, _ = self._target(dry_run=False)
        if new == "vfio-pci" and (b := group_blockers(pci)):
            raise NicError(f"cannot bind {pci} to vfio-pci: its IOMMU group is blocked by "
                           + ", ".join(b))
        orig, old_override = driver_of(pci), _override(pci)
        module = module_of(orig) if orig else None
        if orig == new:
            return
        step = f"echo {new} > {PCI_DEVICES / pci / 'driver_override'}"
        try:
            _write(PCI_DEVICES / pci / "driver_override", new)
            step = f"echo {pci} > {PCI_DEVICES / pci / 'driver' / 'unbind'}"
            _unbind(pci)
            step = f"bind {pci} to {new}"
            _bind_to(pci, new)
            got = driver_of(pci)
            if got != new:
                raise NicError(f"{pci} is bound to {got or 'nothing'} after the bind")
        except (OSError, NicError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            try:
                restore_driver(pci, orig, module, old_override)
                back = f"restored {orig or 'no driver'}"
            except (OSError, NicError) as e2:
                back = f"AND restoring {orig} failed too: {e2}; the device has " \
                       f"{driver_of(pci) or 'no driver'}"
            raise NicError(f"binding {pci} to {new} failed at `{step}`: {why}; {back}") from e
        log.info("%s: %s -> %s", pci, orig or "none", new)


def undo_bind(entry: dict[str, Any]) -> None:
    """Give a journaled device back to its original driver and interface name(s); idempotent."""
    pci = entry["pci"]
    if not (PCI_DEVICES / pci).exists():
        log.warning("%s: device gone, nothing to give back", pci)
        return
    orig = entry.get("driver")
    restore_driver(pci, orig, entry.get("module"), entry.get("driver_override"))
    if driver_of(pci) != orig:
        raise NicError(f"{pci}: still on {driver_of(pci)} after giving it back to {orig}")
    _rename_back(pci, entry.get("ifaces") or [])


UNDO["bind"] = undo_bind
