"""The [host] table of a config, validated key by key into dataplane.host.settings.Host (what
the machine should look like; dataplane.host plans and makes the changes).

    [host]
    journal_dir = "/var/lib/dataplane"
    profile = "throughput"
    [[host.hugepages]]
    size = "2M"
    count = 512
    [[host.bind]]
    pci = "0000:00:03.0"
"""

from __future__ import annotations

from pathlib import Path

from dataplane.config.tables import Table, checks
from dataplane.host.files import dir_problem
from dataplane.host.journal import DEFAULT_DIR
from dataplane.host.profile import ProfileError, load_profile
from dataplane.host.settings import Bind, Host, Hugepages, normalise_pci
from dataplane.host.sysctl import TuningError


def parse(t: Table) -> Host:
    """Read the [host] table; problems go to t's problem list."""
    h = Host(
        journal_dir=Path(t.get("journal_dir", str, str(DEFAULT_DIR), check=_journal_dir)),
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
    """A profile name (config/profiles/NAME.toml) or an absolute path to a .toml file, that
    loads: its sysctl keys stay inside /proc/sys and this kernel has them."""
    if v.startswith("/"):
        if not v.endswith(".toml"):
            return "expected a profile name or a path to a .toml"
    elif checks.name(v):
        return checks.name(v)
    try:
        load_profile(v)
    except (ProfileError, TuningError) as e:
        return str(e)
    return None


def _journal_dir(v: str) -> str | None:
    """An absolute path to a directory root alone may write: it holds what root will undo."""
    why = _abs_path(v) or dir_problem(Path(v))
    return (f"{why}; journal_dir must be root's (the running user's) and writable by no one "
            "else" if why else None)


def _abs_path(v: str) -> str | None:
    return None if v.startswith("/") and "\0" not in v else "expected an absolute path"


def _abs_path_or_empty(v: str) -> str | None:
    return None if not v else _abs_path(v)
