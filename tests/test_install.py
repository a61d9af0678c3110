"""The package as an operator gets it: `python -m build` of a clean `git clone` of this
repository (HEAD: uncommitted files do not leak in) makes an sdist and, from that sdist, a wheel;
each goes into a fresh virtualenv in another directory, with its dependencies from the package
index, and the `dataplane` command is used from a directory outside any checkout: --version,
--help, completion, the man page, `config check` of the shipped default, `plan` (the profiles are
package data) and a short `run` of the default lab, with its books and dataplane_build_info.

The sdist is installed with DATAPLANE_DPDK=0, as on a host without DPDK: no DPDK worker, and the
lab runs on io_uring.  The venvs are plain (no --system-site-packages): nothing here needs
Debian's pyverbs, and a plain venv is what shows a dependency missing from pyproject.toml.

Two compiles of the native code in all (the wheel from the sdist; the sdist's install) plus the
venvs' dependencies: about a minute on a 2-core box, shared by every test through the
module-scoped `built` fixture.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.default_lab import default_text, free_port

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 900       # bounds a hung build only: a compile takes ~30 s here

ROOT = pytest.mark.root("netns, veth and the workers of the default lab")


@dataclass
class Install:
    name: str
    venv: Path
    dpdk: bool            # the DPDK worker was built into it
    cwd: Path             # outside every checkout

    def run(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "dataplane"), *args], cwd=self.cwd,
                              env=clean_env(self.venv), capture_output=True, text=True,
                              timeout=timeout, **kw)


@dataclass
class Built:
    src: Path             # the clone
    sdist: Path
    wheel: Path
    log: str              # what `python -m build` printed: the compiler's command lines
    installs: dict[str, Install]


def clean_env(venv: Path | None = None, **more: str) -> dict[str, str]:
    """This environment without the checkout's venv, PYTHONPATH or build switches (CI sets
    DATAPLANE_WERROR and DATAPLANE_TESTING: a user's install has neither)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DATAPLANE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    path = [p for p in env.get("PATH", "").split(os.pathsep)
            if not p.startswith(str(REPO))]
    env["PATH"] = os.pathsep.join(([str(venv / "bin")] if venv else []) + path)
    return env | more


def sh(*args: str | Path, timeout: float = BUILD_TIMEOUT, **kw) -> str:
    """stdout and stderr of a command that must succeed."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       **kw)
    assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def has_libdpdk() -> bool:
    return subprocess.run(["pkg-config", "--exists", "libdpdk"]).returncode == 0


def venv_with(tmp: Path, name: str, package: Path, **env: str) -> Path:
    """A fresh venv (the base interpreter's, not this checkout's venv) with `package` and its
    dependencies installed from the index (pip's cache is the machine's)."""
    venv = tmp / "venvs" / name
    sh(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
       package, env=clean_env(venv, **env), cwd=tmp)
    return venv


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("install")
    src, dist, elsewhere = tmp / "src", tmp / "dist", tmp / "elsewhere"
    elsewhere.mkdir()
    sh("git", "clone", "-q", REPO, src)
    # sdist first, then the wheel from the unpacked sdist: the wheel proves the sdist complete
    log = sh(sys.executable, "-m", "build", "--outdir", dist, src, env=clean_env(), cwd=tmp)
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    installs = {
        "wheel": Install("wheel", venv_with(tmp, "wheel", wheel), has_libdpdk(), elsewhere),
        "sdist-no-dpdk": Install("sdist-no-dpdk",
                                 venv_with(tmp, "sdist", sdist, DATAPLANE_DPDK="0"), False,
                                 elsewhere),
    }
    return Built(src, sdist, wheel, log, installs)


INSTALLS = ["wheel", "sdist-no-dpdk"]


def git_files(src: Path, under: str) -> list[str]:
    return sh("git", "ls-files", under, cwd=src).split()


def test_sdist_carries_every_native_source_and_header(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
    native = git_files(built.src, "native")
    assert any(n.endswith(".h") for n in native) and any(n.endswith(".c") for n in native)
    missing = [f for f in native + git_files(built.src, "dataplane") + ["setup.py", "README.md"]
               if f not in names]
    assert not missing, missing
    assert not [n for n in names if n.endswith((".so", ".o"))], "built objects in the sdist"


def test_wheel_carries_every_module_and_what_plan_reads(built: Built) -> None:
    names = set(zipfile.ZipFile(built.wheel).namelist())
    tracked = [f for f in git_files(built.src, "dataplane") if not f.endswith(".so")]
    missing = [f for f in tracked if f not in names]
    assert not missing, missing          # every subpackage, the default lab, the profiles
    assert {"dataplane/default.toml", "dataplane/profiles/throughput.toml"} <= names
    exts = sorted(n.split("/")[1].split(".")[0] for n in names if n.endswith(".so"))
    assert exts == (["_dpdk", "_native"] if has_libdpdk() else ["_native"]), exts  # no _testing


def test_a_users_build_warns_but_does_not_fail_on_warnings(built: Built) -> None:
    """-Wall -Wextra on every compile; -Werror only in development and CI (DATAPLANE_WERROR=1,
    which scripts/bootstrap.sh sets and this build's environment does not have)."""
    compiles = [ln for ln in built.log.splitlines()
                if re.match(r"\S*gcc\b", ln) and " -c " in ln and "native/" in ln]
    assert compiles, built.log[-3000:]
    for ln in compiles:     # (Debian's Python adds -Werror=format-security: one warning only)
        flags = ln.split()
        assert "-Wall" in flags and "-Wextra" in flags and "-Werror" not in flags, ln


def versions(src: Path) -> tuple[str, str]:
    """(package version, DP_LAYOUT_VERSION) as the clone's sources write them."""
    version = re.search(r'__version__ = "([^"]+)"', (src / "dataplane/__init__.py").read_text())
    layout = re.search(r"#define DP_LAYOUT_VERSION (\d+)u",
                       (src / "native/include/dp_layout.h").read_text())
    assert version and layout
    return version[1], layout[1]


@pytest.mark.parametrize("which", INSTALLS)
def test_version(built: Built, which: str) -> None:
    inst = built.installs[which]
    p = inst.run("--version")
    assert p.returncode == 0, p.stderr
    version, layout = versions(built.src)
    dpdk = "DPDK worker: built" if inst.dpdk else "DPDK worker: not built"
    assert f"dataplane {version}\narena layout {layout}\n{dpdk}" in p.stdout, p.stdout


@pytest.mark.parametrize("which", INSTALLS)
def test_help_completion_and_man_page(built: Built, which: str) -> None:
    inst = built.installs[which]
    p = inst.run("--help")
    assert p.returncode == 0 and "usage: dataplane" in p.stdout, p.stdout + p.stderr
    for cmd in ("run", "plan", "config", "completion", "man"):
        assert re.search(rf"^\s+{cmd}\s", p.stdout, re.M), cmd
    for shell in ("bash", "zsh"):
        p = inst.run("completion", shell)
        assert p.returncode == 0 and "plan" in p.stdout and "--config" in p.stdout, p.stderr
    p = inst.run("completion", "bash")
    # bash itself accepts the script and registers the completion
    b = subprocess.run(["bash", "-c", 'eval "$(cat)"; complete -p dataplane'], input=p.stdout,
                       capture_output=True, text=True, timeout=30)
    assert b.returncode == 0 and "dataplane" in b.stdout, b.stderr
    p = inst.run("man")
    assert p.returncode == 0 and p.stdout.startswith(".TH DATAPLANE"), p.stderr
    # man renders it (man-db reads a page from stdin with -l -), every command in it
    m = subprocess.run(["man", "-l", "-"], input=p.stdout, capture_output=True, text=True,
                       timeout=30, env=clean_env() | {"MANPAGER": "cat", "MANWIDTH": "100"})
    assert m.returncode == 0, m.stderr
    for cmd in ("run", "plan", "config check", "completion"):
        assert f"dataplane {cmd}" in m.stdout, cmd


def test_config_check_of_the_shipped_default(built: Built) -> None:
    p = built.installs["wheel"].run("config", "check")
    assert p.returncode == 0, p.stderr
    assert "<embedded default.toml>: ok (2 workers, lab of 2 namespaces" in p.stdout
    # without the DPDK worker the shipped lab (an af_xdp receiver) is refused, and says why
    p = built.installs["sdist-no-dpdk"].run("config", "check")
    assert p.returncode == 2 and "no DPDK worker" in p.stderr, p.stdout + p.stderr


@pytest.mark.parametrize("which", INSTALLS)
def test_plan_reads_the_profiles_from_the_package(built: Built, which: str,
                                                  tmp_path: Path) -> None:
    inst = built.installs[which]
    cfg = tmp_path / "with-profile.toml"
    cfg.write_text('[host]\nprofile = "latency"\n')
    p = inst.run("plan", "-c", str(cfg))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "net.core.busy_read" in p.stdout, p.stdout       # a key of profiles/latency.toml
    where = subprocess.run([str(inst.venv / "bin" / "python"), "-c",
                            "from dataplane.host.profile import PROFILE_DIR; print(PROFILE_DIR)"],
                           cwd=inst.cwd, env=clean_env(inst.venv), capture_output=True,
                           text=True, check=True).stdout.strip()
    assert where.startswith(str(inst.venv)), where
    if which == "wheel":
        p = inst.run("plan")                       # the embedded default: no [host] table
        assert p.returncode == 0 and "then: dataplane run (2 worker(s)" in p.stdout, p.stderr


def run_with_build_info(inst: Install, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """`dataplane run --duration 3 ARGS` with metrics on a free port; the dataplane_build_info
    line scraped while it ran, and the finished process."""
    port = free_port()
    proc = subprocess.Popen([str(inst.venv / "bin" / "dataplane"), "run", "--duration", "3",
                             "--metrics", f"127.0.0.1:{port}", *args], cwd=inst.cwd,
                            env=clean_env(inst.venv), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    info, deadline = "", time.monotonic() + 60
    while not info and proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
            info = next((ln for ln in text.splitlines()
                         if ln.startswith("dataplane_build_info{")), "")
        except OSError:
            time.sleep(0.1)          # not listening yet
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), info


def check_books(p: subprocess.CompletedProcess) -> None:
    """Exit 0 (every generated packet accounted for) and the books line shows packets."""
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    m = re.search(r"stream \d+ from \S+: sent (\d+), received (\d+) unique \((\d+) duplicates\)",
                  p.stdout)
    assert m, p.stdout
    sent, unique, dups = map(int, m.groups())
    assert sent > 0 and 0 < unique <= sent and dups == 0, p.stdout


@ROOT
def test_run_the_default_lab_from_the_wheel(built: Built) -> None:
    inst = built.installs["wheel"]
    p, info = run_with_build_info(inst)        # the embedded default, as shipped
    check_books(p)
    version, layout = versions(built.src)
    dpdk = "true" if inst.dpdk else "false"
    assert info == (f'dataplane_build_info{{dpdk="{dpdk}",layout="{layout}",'
                    f'version="{version}"}} 1.0'), info


@ROOT
def test_run_without_dpdk_uses_io_uring(built: Built, tmp_path: Path) -> None:
    inst = built.installs["sdist-no-dpdk"]
    lab = tmp_path / "lab.toml"     # the default lab, its receiver on af_packet (af_xdp: DPDK)
    lab.write_text(default_text(f"i{os.getpid() % 10000}",
                                ('driver = "af_xdp"', 'driver = "af_packet"')))
    p, info = run_with_build_info(inst, "--config", str(lab))
    check_books(p)
    assert "backend auto -> uring: this install has no DPDK worker" in p.stderr, p.stderr
    _, layout = versions(built.src)
    assert f'dpdk="false",layout="{layout}"' in info, info
