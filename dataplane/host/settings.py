"""What the `[host]` table of a config asks of the machine, validated by dataplane.config.loader.

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


def parse(t) -> Host:
    """Read the [host] table (a dataplane.config.tables.Table); problems go to t's problem list."""
    from dataplane.config.tables import checks

    h = Host(
        journal_dir=Path(t.get("journal_dir", str, str(DEFAULT_DIR), check=_abs_path)),
        profile=t.get("profile", str, None, check=_profile),
        fq_interfaces=t.get("fq_interfaces", list, [], check=checks.names_list))
    for hp in t.tables("hugepages"):
        node = hp.get("node", int, None, check=checks.between(0, 1023))
        h.hugepages.append(Hugepages(
            size=hp.get("size", str, "2M", choices=("2M", "1G")),
            count=hp.get("count", int, check=checks.between(0, 1 << 20)),
            node=node,
            mount=hp.get("mount", str, "", check=_abs_path_or_empty)))
        hp.close()
    sizes = [x.size for x in h.hugepages if x.mount]
    if len(sizes) != len(set(sizes)):
        t.p.error(f"{t.key('hugepages')}: two mounts for the same page size; one hugetlbfs per "
                  "size is enough")
    for b in t.tables("bind"):
        pci = b.get("pci", str, "", check=lambda v: checks.pci(v) if v else None)
        iface = b.get("iface", str, "", check=lambda v: checks.ifname(v) if v else None)
        if bool(pci) == bool(iface):
            b.p.error(f"{b.path}: name the device with exactly one of pci = \"0000:03:00.0\" "
                      "or iface = \"eth1\"")
        h.bind.append(Bind(
            pci=normalise_pci(pci) if pci else "", iface=iface,
            driver=b.get("driver", str, "auto", choices=("auto", "vfio-pci", "uio_pci_generic")),
            force=b.get("force", bool, False)))
        b.close()
    t.close()
    return h


def _profile(v: str) -> str | None:
    """A profile name (config/profiles/NAME.toml) or an absolute path to a .toml file."""
    from dataplane.config.tables import checks
    if v.startswith("/"):
        return None if v.endswith(".toml") else "expected a profile name or a path to a .toml"
    return checks.name(v)


def _abs_path(v: str) -> str | None:
    return None if v.startswith("/") and "\0" not in v else "expected an absolute path"


def _abs_path_or_empty(v: str) -> str | None:
    return None if not v else _abs_path(v)
