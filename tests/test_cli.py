"""The `dataplane` command: help everywhere, exit codes, privilege checks before any change."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane import cli
from dataplane.run.status import find_arenas
from tests.helpers import unprivileged
from tests.helpers.default_lab import free_port

ROOT = Path(__file__).resolve().parent.parent
DATAPLANE = [sys.executable, "-m", "dataplane.cli"]
TAG = f"{os.getpid() % 100000}"


def run(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), *DATAPLANE, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("args", [[], ["run"], ["lab"], ["status"], ["config"],
                                  ["config", "check"], ["config", "show"]])
def test_help_everywhere_with_examples(args: list[str]) -> None:
    r = run(*args, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: dataplane" in r.stdout and "example" in r.stdout


def test_no_command_is_usage_error() -> None:
    assert run().returncode == 2


def test_config_check_bad_file_exits_2_with_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[worker]]\nname = "w"\n[[worker.port]]\nname = "p"\n'
                   'driver = "af_pakcet"\n')
    r = run("config", "check", str(bad))
    assert r.returncode == 2
    assert ('worker[0].port[0].driver = "af_pakcet": expected one of af_packet, af_xdp, memif, '
            'pci') in r.stderr


def test_config_check_good_files() -> None:
    for f in ("config/default.toml", "config/appliance.toml"):
        r = run("config", "check", f)
        assert r.returncode == 0, r.stderr
        assert ": ok (" in r.stdout


def test_config_show_default_and_json() -> None:
    r = run("config", "show")
    assert r.returncode == 0, r.stderr
    assert "--vdev net_af_packet0,iface=dpgen0,qpairs=1" in r.stdout and "core 1" in r.stdout
    r = run("config", "show", "--json")
    specs = json.loads(r.stdout)
    assert [s["name"] for s in specs] == ["gen", "rx"]


def test_status_reads_an_arena(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from dataplane.shm.arena import Arena, ArenaGeometry
    name = f"dpt{TAG}st"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[worker]]\nname = "{name}"\n[[worker.port]]\nname = "p"\n'
                   'driver = "pci"\npci = "0000:00:03.0"\n')
    path = Path("/dev/shm") / f"dataplane-{name}"
    a = Arena.create(path, ArenaGeometry(n_ports=1, rings=((0, 0),), ring_size=64,
                                         pool_bytes=2 << 20))
    try:
        a.header.pid = os.getpid()
        # an arena nobody runs in (state empty): read, shown, and not running (exit 3)
        assert cli.main(["status", "--config", str(cfg)]) == 3
    finally:
        a.close()
        a.unlink()
    out = capsys.readouterr().out
    assert find_arenas(name, [tmp_path]) == []
    # another run's arena of worker "x-NAME" and the plain arena of worker "x-NAME" are not
    # NAME's
    for f in (f"dataplane-123-{name}", f"dataplane-{name}", f"dataplane-1-x-{name}",
              f"dataplane-x-{name}"):
        (tmp_path / f).touch()
    assert {f.name for f in find_arenas(name, [tmp_path])} == {
        f"dataplane-123-{name}", f"dataplane-{name}"}
    assert f"worker {name}: arena {path} state=empty pid={os.getpid()} (alive)" in out
    assert cli.main(["status", "--config", str(cfg)]) == 3
    assert "no arena (not running)" in capsys.readouterr().out


@pytest.mark.root("to drop to nobody, who must be refused")
@pytest.mark.parametrize("args", [["lab", "up"], ["lab", "down"], ["run", "--duration", "1"]])
def test_root_commands_refuse_non_root(args: list[str], tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    ns = f"dpt-{TAG}-cli"
    cfg.write_text(f'[lab]\nnamespaces = ["{ns}"]\n[[worker]]\nname = "w"\n'
                   '[[worker.port]]\nname = "p"\ndriver = "af_packet"\niface = "x0"\n')
    # tmp_path is 0700 root: nobody cannot even read the config, so this also shows that the
    # privilege check comes before the config is read.
    r = run(*args, "--config", str(cfg), prefix=unprivileged.prefix())
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "needs CAP_NET_ADMIN and CAP_SYS_ADMIN" in r.stderr
    assert f"run as root: sudo dataplane {args[0]}" in r.stderr
    assert not Path(f"/run/netns/{ns}").exists()


@pytest.mark.root("netns, veth, DPDK")
def test_run_embedded_default_for_real() -> None:
    """The README's first command, minus the bootstrap: the embedded default lab, for real."""
    # --progress: the line a second is printed on a terminal, as the README's reader has one
    p = subprocess.run([str(Path(sys.executable).parent / "dataplane"), "run", "--duration", "3",
                        "--progress", "--metrics", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) >= 2 and all(" rx " in ln and "workers 2/2 up" in ln for ln in lines)
    # the closing report, against the ports' own counters: what the generator's port sent
    # arrived once, or a receive-side drop counter has it (exit 0 alone is the run's books
    # agreeing with themselves)
    tx, ring, nic, _tx_drops, nombuf = map(int, re.search(
        r"tx (\d+); drops: ring (\d+), nic (\d+), tx (\d+), no-mbuf (\d+)", p.stdout).groups())
    unique, dups = map(int, re.search(r"received (\d+) unique \((\d+) duplicates\)",
                                      p.stdout).groups())
    assert dups == 0 and 0 < unique <= tx and tx - unique <= ring + nic + nombuf, p.stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dp-gen" not in netns and "dp-rx" not in netns, "the lab was left behind"
    left = [f for f in os.listdir("/dev/shm") if f in ("dataplane-gen", "dataplane-rx")]
    assert not left, f"arenas left in /dev/shm: {left}"


# run and lab check the caller's capabilities before their flags and config: as anyone else
# they stop at the privilege check, which test_root_commands_refuse_non_root covers
@pytest.mark.root("run checks privileges before its flags")
@pytest.mark.parametrize("args,msg", [(["--metrics", "nohost"], "--metrics nohost: expected"),
                                      (["--duration", "0"], "--duration 0: expected seconds")])
def test_run_bad_flags(args: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", *args]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.root("lab up checks privileges before its config")
def test_lab_without_lab_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[worker]]\nname = "w"\n[[worker.port]]\nname = "p"\ndriver = "pci"\n'
                   'pci = "0000:00:03.0"\n')
    assert cli.main(["lab", "up", "--config", str(cfg)]) == 2
    assert "no [lab] table" in capsys.readouterr().err


@pytest.mark.root("namespaces and veth")
def test_lab_up_status_down(tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    ns = f"dpt-{TAG}-cl"
    cfg.write_text(f'[lab]\nnamespaces = ["{ns}"]\n[[lab.veth]]\nname = "dpt{TAG}c0"\n'
                   f'netns = "{ns}"\npeer = "dpt{TAG}c1"\npeer_netns = "{ns}"\n'
                   '[[worker]]\nname = "w"\n[[worker.port]]\nname = "p"\n'
                   f'driver = "af_packet"\niface = "dpt{TAG}c0"\n')
    try:
        r = run("lab", "up", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"netns {ns}: present" in r.stdout and f"{ns}/dpt{TAG}c1: UP" in r.stdout
        r = run("status", "--config", str(cfg))
        assert r.returncode == 3 and "lab: up" in r.stdout     # the lab, no run: exit 3
    finally:
        r = run("lab", "down", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"netns {ns}: absent" in r.stdout and not Path(f"/run/netns/{ns}").exists()


def test_ensure_run_dir_is_private(tmp_path: Path) -> None:
    from dataplane import config
    d = config.ensure_run_dir(tmp_path / "run" / "dataplane")
    d.chmod(0o755)
    assert (config.ensure_run_dir(d).stat().st_mode & 0o777) == 0o700
