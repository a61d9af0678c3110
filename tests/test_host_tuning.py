"""Sysctl, qdisc and memlock changes against the real kernel: every sysctl of both shipped
profiles applied and undone through a real journal (values identical after), root qdiscs on a
veth and an ifb in a test namespace, the locked-memory limit, and profile errors that name the
file, the key and the value.

Namespaced sysctls (most of net.core and net.ipv4) are changed inside a fresh network namespace;
the global ones (netdev_max_backlog, busy_poll, ...) on the host, put back in `finally` too."""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dataplane.host import Journal, apply, undo
from dataplane.host.proc import CAP_SYS_RESOURCE, has_cap
from dataplane.host.profile import (
    PROFILE_DIR,
    Memlock,
    ProfileError,
    load_profile,
    profile_changes,
)
from dataplane.host.qdisc import RootQdisc, root, shape, show, tc
from dataplane.host.sysctl import (
    CC_KEY,
    QDISC_KEY,
    Sysctl,
    TuningError,
    path,
    qdisc_problem,
    read,
    write,
)

ROOT = Path(__file__).resolve().parent.parent
# what changes the host needs root; the profile checks at the end run as anyone
NEEDS_ROOT = pytest.mark.root("/proc/sys, tc, netns")
_seq = itertools.count()


@contextmanager
def netns() -> Iterator[str]:
    name = f"dpt{os.getpid()}n{next(_seq)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_py(code: str, *args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = (["ip", "netns", "exec", ns] if ns else []) + [sys.executable, "-c", code, *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


# Applies sysctls with a journal, then undoes them from a fresh Journal (as `down` would).
ROUND_TRIP = """
import json, sys
from pathlib import Path
from dataplane.host import Journal, apply, undo
from dataplane.host.sysctl import Sysctl, read
want, jdir = json.loads(sys.argv[1]), Path(sys.argv[2])
before = {k: read(k) for k in want}
apply([Sysctl(k, v) for k, v in want.items()], Journal(jdir))
during = {k: read(k) for k in want}
undo(Journal(jdir))
after = {k: read(k) for k in want}
left = (jdir / "journal.json").exists()
print(json.dumps({"before": before, "during": during, "after": after, "left": left}))
"""


def round_trip(want: dict[str, str], jdir: Path, ns: str | None = None) -> None:
    r = run_py(ROUND_TRIP, json.dumps(want), str(jdir), ns=ns)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["during"] == want
    assert res["after"] == res["before"], "values differ after undo"
    assert not res["left"], "journal left after undo"


@NEEDS_ROOT
@pytest.mark.parametrize("name", ["throughput", "latency"])
def test_every_sysctl_of_the_profile_round_trips(name: str, tmp_path: Path) -> None:
    prof = load_profile(name)
    usable = {k: v for k, v in prof.sysctl.items() if not Sysctl(k, v).problem()}
    for k in set(prof.sysctl) - set(usable):      # explained, and tested below with a stand-in
        print(f"{k} = {prof.sysctl[k]} not applicable here: {Sysctl(k, prof.sysctl[k]).problem()}")
    with netns() as ns:
        # per-namespace and writable there (some net.core keys are read-only outside init_net)
        local = {k: v for k, v in usable.items() if run_py(
            f"import os, sys; sys.exit(not os.stat({str(path(k))!r}).st_mode & 0o200)",
            ns=ns).returncode == 0}
        round_trip(local, tmp_path / "netns", ns)
    host = {k: v for k, v in usable.items() if k not in local}
    saved = {k: read(k) for k in host}
    try:
        round_trip(host, tmp_path / "host")
    finally:
        for k, v in saved.items():
            if read(k) != v:
                write(k, v)
    assert {k: read(k) for k in host} == saved


@NEEDS_ROOT
def test_default_qdisc_round_trips(tmp_path: Path) -> None:
    """The profiles' fq may be missing (this lab's kernel lacks sch_fq); the mechanism is the
    same for any qdisc the kernel has, so pfifo stands in when fq cannot."""
    value = "fq" if not qdisc_problem("fq") else "pfifo"
    saved = read(QDISC_KEY)
    if saved == value:
        value = "pfifo_fast" if value != "pfifo_fast" else "pfifo"
    try:
        round_trip({QDISC_KEY: value}, tmp_path)
    finally:
        if read(QDISC_KEY) != saved:
            write(QDISC_KEY, saved)
    assert read(QDISC_KEY) == saved


@NEEDS_ROOT
def test_missing_features_are_explained(tmp_path: Path) -> None:
    cc = Sysctl(CC_KEY, "nosuchcc")
    avail = read("net.ipv4.tcp_available_congestion_control")
    assert cc.problem() == (f"nosuchcc is not available: tcp_available_congestion_control is "
                            f"{avail!r}; load tcp_nosuchcc (modprobe tcp_nosuchcc) or build it "
                            "in (CONFIG_TCP_CONG_NOSUCHCC=y)")
    assert cc.describe().note == cc.problem()
    before = read(CC_KEY)
    with pytest.raises(TuningError, match="nosuchcc is not available"):
        apply([cc], Journal(tmp_path))
    assert read(CC_KEY) == before
    undo(Journal(tmp_path))
    if qdisc_problem("fq"):
        assert "qdisc fq is not available" in Sysctl(QDISC_KEY, "fq").problem()
        assert "bbr still paces" in qdisc_problem("fq")
    gone = Sysctl("net.core.no_such_key", 1)
    assert "net.core.no_such_key" in gone.problem() and gone.describe().current == "(missing)"
    with pytest.raises(TuningError, match="no /proc/sys/net/core/no_such_key"):
        gone.journal_entry()


def make_devices(ns: str) -> dict[str, str]:
    """A veth (default root qdisc noqueue) and an ifb (default pfifo_fast) in `ns`."""
    ip = ["ip", "-n", ns, "link"]
    subprocess.run(ip + ["add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
    subprocess.run(ip + ["add", "ifb9", "type", "ifb"], check=True)
    for d in ("v0", "v1", "ifb9"):
        subprocess.run(ip + ["set", d, "up"], check=True)
    return {"v0": "noqueue", "ifb9": "pfifo_fast"}


@NEEDS_ROOT
@pytest.mark.parametrize("kind", ["fq", "pfifo", "htb"])
def test_root_qdisc_round_trips(kind: str, tmp_path: Path) -> None:
    if (why := qdisc_problem(kind)):
        pytest.skip(why)
    with netns() as ns:
        for dev, default in make_devices(ns).items():
            before = show(dev, ns)
            assert before is not None and root(before)["kind"] == default
            c = RootQdisc(dev, kind, ns)
            assert c.needed() and c.describe().current == default and not c.problem()
            apply([c], Journal(tmp_path))
            assert root(show(dev, ns) or [])["kind"] == kind
            undo(Journal(tmp_path))
            assert shape(show(dev, ns) or []) == shape(before)
            assert not (tmp_path / "journal.json").exists()


@NEEDS_ROOT
def test_someone_elses_qdisc_is_left_alone(tmp_path: Path) -> None:
    with netns() as ns:
        make_devices(ns)
        tc(["qdisc", "replace", "dev", "ifb9", "root", "handle", "1:", "htb"], ns)
        before = show("ifb9", ns)
        c = RootQdisc("ifb9", "pfifo", ns)
        assert "set up by someone else" in c.problem() and "ifb9" in c.problem()
        with pytest.raises(TuningError, match="someone else"):
            apply([c], Journal(tmp_path))
        undo(Journal(tmp_path))
        assert show("ifb9", ns) == before
        assert RootQdisc("nosuchdev", "pfifo", ns).problem().startswith("no interface nosuchdev")


MEMLOCK = """
import json, resource, sys
from pathlib import Path
from dataplane.host import Journal, apply, undo
from dataplane.host.profile import Memlock
L = resource.RLIMIT_MEMLOCK
before = resource.getrlimit(L)
apply([Memlock(int(sys.argv[2]))], Journal(Path(sys.argv[1])))
during = resource.getrlimit(L)
undo(Journal(Path(sys.argv[1])))
print(json.dumps([before, during, resource.getrlimit(L)]))
"""


@NEEDS_ROOT
def test_memlock_round_trips(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    lower = (hard if hard != resource.RLIM_INFINITY else 1 << 33) // 2
    for limit in (lower, resource.RLIM_INFINITY):
        c = Memlock(limit)
        if limit == resource.RLIM_INFINITY and not has_cap(CAP_SYS_RESOURCE):
            # Containers often drop CAP_SYS_RESOURCE: the hard limit cannot go up.  With
            # CAP_IPC_LOCK the limit does not bind, and the plan says so instead of failing.
            assert c.problem() or "CAP_IPC_LOCK" in c.describe().note
            print(f"memlock unlimited not applied here: {c.problem() or c.describe().note}")
            continue
        r = run_py(MEMLOCK, str(tmp_path), str(limit))
        assert r.returncode == 0, r.stderr
        before, during, after = json.loads(r.stdout)
        assert during[0] == limit and after == before


@NEEDS_ROOT
def test_memlock_of_another_process_and_of_a_dead_one(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        before = resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK)
        c = Memlock(1 << 20, pid=child.pid)
        assert "LimitMEMLOCK=" in c.describe().note
        apply([c], Journal(tmp_path))
        assert resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK)[0] == 1 << 20
        undo(Journal(tmp_path))
        assert resource.prlimit(child.pid, resource.RLIMIT_MEMLOCK) == before
        apply([c], Journal(tmp_path))
    finally:
        child.kill()
        child.wait()
    undo(Journal(tmp_path))       # its process is gone: nothing to restore, and no error
    assert not (tmp_path / "journal.json").exists()


def test_profile_changes_order() -> None:
    prof = load_profile("throughput")
    kinds = [(c.kind, getattr(c, "key", getattr(c, "iface", ""))) for c in
             profile_changes(prof, ["eth9"])]
    assert kinds[0] == ("sysctl", CC_KEY)
    assert kinds[-3:] == [("qdisc", "eth9"), ("sysctl", QDISC_KEY), ("rlimit", "")]


@pytest.mark.parametrize("text, says", [
    ('[sysctl]\nnet.core.no_such_thing = 1\n',
     ["net.core.no_such_thing", "unknown to this kernel", "/proc/sys/net/core/no_such_thing"]),
    ('[sysctl]\nnet.core.rmem_max = "lots"\n',
     ["net.core.rmem_max", "'lots'", "a non-negative integer"]),
    ('[sysctl]\nnet.core.rmem_max = -1\n', ["net.core.rmem_max", "-1", "non-negative"]),
    ('[sysctl]\nnet.core.rmem_max = true\n', ["net.core.rmem_max", "True", "integer or"]),
    ('[sysctl]\n"net.ipv4.tcp_rmem" = "4096 87380"\n',
     ["net.ipv4.tcp_rmem", "'4096 87380'", "3 non-negative integers in a string"]),
    ('[sysctl]\nnet.ipv4.tcp_congestion_control = 1\n',
     ["tcp_congestion_control", "holds a word", "as a string"]),
    ('memlock = "lots"\n', ["memlock", "'lots'", '"unlimited"']),
    ('memlock = -5\n', ["memlock", "-5", "bytes (>= 0)"]),
    ('sysctls = {}\n', ["unknown key 'sysctls'", "description, memlock, sysctl"]),
    ('sysctl = 3\n', ["sysctl must be a table"]),
    ('[sysctl\n', ["not valid TOML"]),
])
def test_profile_errors_name_file_key_value(text: str, says: list[str], tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ProfileError) as e:
        load_profile(f)
    for s in [str(f), *says]:
        assert s in str(e.value), str(e.value)


def test_unknown_profile_says_where_it_looked() -> None:
    with pytest.raises(ProfileError) as e:
        load_profile("nosuch")
    msg = str(e.value)
    assert str(PROFILE_DIR / "nosuch.toml") in msg and "latency, throughput" in msg
    with pytest.raises(ProfileError, match="letters, digits"):
        load_profile("no such")
    with pytest.raises(ProfileError, match="no such file"):
        load_profile("/nonexistent/x.toml")
