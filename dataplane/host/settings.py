"""What the `[host]` table of a config asks of the machine (dataplane.config.host reads it).

    [host]
    journal_dir = "/var/lib/dataplane"     # where the state journal lives (0700 dir, 0600 file)
    profile = "throughput"                 # config/profiles/<name>.toml: sysctls, BBR, fq, memlock
    fq_interfaces = ["eth1"]               # get `fq` as root qdisc (with the profile's BBR)

    [[host.hugepages]]
    size = "2M"                            # "2M" or "1G"
    count = 512                            # pages to have reserved (total, not added)
    node = 0                               # NUMA node; omitted: spread by the kernel (global)
    mount = "/run/dataplane/hugepages"     # a dedicated hugetlbfs for this size (pagesize=)

    [[host.bind]]
    pci = "0000:00:03.0"                   # or iface = "eth1"
    driver = "uio_pci_generic"             # "vfio-pci", "uio_pci_generic" or "auto"
    force = false                          # bind even if the interface carries addresses/routes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dataplane.host.journal import DEFAULT_DIR


@dataclass
class Hugepages:
    size: str = "2M"          # "2M" | "1G"
    count: int = 0
    node: int | None = None   # None: /sys/kernel/mm/hugepages (global)
    mount: str = ""           # "" : no mount for this size

    @property
    def size_kb(self) -> int:
        return {"2M": 2048, "1G": 1048576}[self.size]


@dataclass
class Bind:
    pci: str = ""             # normalised 0000:bb:dd.f, or "" when iface names the device
    iface: str = ""
    driver: str = "auto"      # vfio-pci | uio_pci_generic | auto (vfio-pci, else uio_pci_generic)
    force: bool = False


@dataclass
class Host:
    journal_dir: Path = DEFAULT_DIR
    profile: str | None = None        # name in config/profiles/, or /path/to/profile.toml
    fq_interfaces: list[str] = field(default_factory=list)
    hugepages: list[Hugepages] = field(default_factory=list)
    bind: list[Bind] = field(default_factory=list)


def normalise_pci(addr: str) -> str:
    """0000:bb:dd.f, lower case: the form sysfs and DPDK use."""
    addr = addr.lower()
    return addr if len(addr) > 7 else "0000:" + addr
