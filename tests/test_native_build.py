"""The native build in parts: an install built with DATAPLANE_DPDK=0 has no DPDK worker, never
loads libdpdk, and still runs the default lab on the io_uring backend with its books showing
the packets; the unchanged default lab (its receiver is af_xdp, a DPDK-only driver) is a clear
config error there.

The build goes into a temporary directory (pip --target), from a copy of the sources, and runs
in a bare venv that sees that directory and this environment's site directories as plain paths:
the Python dependencies are reused, but not this checkout's editable install (its finder would
find the checkout's dataplane._dpdk).  ~20 s of compiling on a 2-core box.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT_DIR = Path(__file__).resolve().parent.parent
DEFAULT = ROOT_DIR / "config" / "default.toml"

# the builds run the lab (tests/conftest.py skips them without root); the config check at the
# end runs as anyone
ROOT = pytest.mark.root("netns and veth for the default lab")

# Runs in the no-DPDK install: the default lab (renamed for this test) for a few seconds.
RUN = """
import importlib.util, io, json, sys, time
from pathlib import Path
import dataplane
from dataplane import config
from dataplane.run.runner import Run

cfg = config.loads(Path(sys.argv[1]).read_text(), source="default.toml, af_packet receiver")
try:
    config.loads(Path(sys.argv[2]).read_text(), source="default.toml as shipped")
    refused = ""
except config.ConfigError as e:
    refused = str(e)
with Run(cfg, io.StringIO()) as r:
    r.start()
    time.sleep(float(sys.argv[3]))
    res = r.finish()
    report = r.report(res)
t = res.totals
print(json.dumps({
    "package": dataplane.__file__,
    "dpdk_spec": importlib.util.find_spec("dataplane._dpdk") is not None,
    "librte_loaded": any("librte_" in line for line in open("/proc/self/maps")),
    "backends": {w.name: [w.backend, w.backend_reason] for w in cfg.workers},
    "refused": refused,
    "rx_packets": t.rx_packets, "tx_packets": t.tx_packets, "drops": t.drops,
    "streams": list(res.streams.values()), "ok": res.ok, "report": report,
}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def renamed_default(tag: str, rx_driver: str) -> str:
    """config/default.toml with this test's names (so it runs beside anything else)."""
    text = DEFAULT.read_text()
    for old, new in (("dp-gen", f"dpn-{tag}-g"), ("dp-rx", f"dpn-{tag}-r"),
                     ("dpgen0", f"dpn{tag}g"), ("dprx0", f"dpn{tag}r"),
                     ("127.0.0.1:9477", f"127.0.0.1:{free_port()}"),
                     ('driver = "af_xdp"', f'driver = "{rx_driver}"')):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def no_dpdk_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A pip --target install of a copy of the sources, built with DATAPLANE_DPDK=0: the
    directory it went to."""
    tmp = tmp_path_factory.mktemp("nodpdk")
    src, site = tmp / "src", tmp / "site"
    junk = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "_*.c", "build", "*.egg-info")
    for d in ("dataplane", "native"):
        shutil.copytree(ROOT_DIR / d, src / d, ignore=junk)
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT_DIR / f, src / f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAPLANE_")}
    env["DATAPLANE_DPDK"] = "0"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--no-index", "--no-compile",
                            "--disable-pip-version-check", "--target", str(site), str(src)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    yield site


@pytest.fixture(scope="module")
def no_dpdk_python(no_dpdk_install: Path) -> Path:
    """A venv's python that imports dataplane from the no-DPDK install, and the dependencies
    from this environment's site directories (as paths: their .pth files are not run)."""
    venv = no_dpdk_install.parent / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = venv.glob("lib/python3*/site-packages")
    (purelib / "deps.pth").write_text("\n".join([str(no_dpdk_install), *site.getsitepackages()]))
    return venv / "bin" / "python"


@ROOT
def test_no_dpdk_build_has_no_dpdk_worker_and_no_libdpdk(no_dpdk_install: Path) -> None:
    pkg = no_dpdk_install / "dataplane"
    built = sorted(p.name.split(".")[0] for p in pkg.glob("_*.so"))
    assert built == ["_native"], built       # no _dpdk; no _testing in a plain install
    needed = subprocess.run(["ldd", str(next(pkg.glob("_native*.so")))], capture_output=True,
                            text=True, check=True).stdout
    assert "librte_" not in needed and "liburing" in needed, needed
    # the headers and sources an sdist or wheel of this tree needs came along to the build
    src = no_dpdk_install.parent / "src"
    listed = (src / "dataplane.egg-info" / "SOURCES.txt").read_text().split()
    for p in sorted((ROOT_DIR / "native").rglob("*.[ch]")):
        assert str(p.relative_to(ROOT_DIR)) in listed, p


@ROOT
def test_no_dpdk_build_runs_the_default_lab_on_uring(no_dpdk_install: Path, no_dpdk_python: Path,
                                                     tmp_path: Path) -> None:
    tag = f"{os.getpid() % 10000}"
    lab, shipped = tmp_path / "lab.toml", tmp_path / "shipped.toml"
    lab.write_text(renamed_default(tag, "af_packet"))
    shipped.write_text(renamed_default(tag, "af_xdp"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DATAPLANE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(no_dpdk_python), "-c", RUN, str(lab), str(shipped), "3"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["package"].startswith(str(no_dpdk_install)), out["package"]
    assert not out["dpdk_spec"] and not out["librte_loaded"]
    for name, (backend, reason) in out["backends"].items():
        assert backend == "uring" and "no DPDK worker" in reason, (name, backend, reason)
    assert "af_xdp" in out["refused"] and "no DPDK worker" in out["refused"], out["refused"]
    # the books: the generator sent, the receiver got them, every one is accounted for
    assert out["tx_packets"] > 10_000 and out["rx_packets"] > 0, out["report"]
    (s,) = out["streams"]
    assert s["sent"] > 10_000 and s["unique"] > 0 and s["duplicates"] == 0, out["report"]
    assert s["sent"] - s["unique"] <= out["drops"], out["report"]
    assert out["ok"], out["report"]


ONE_PORT_WORKER = """
[[worker]]
name = "w"
{backend}
  [[worker.port]]
  name = "p"
  driver = "{driver}"
  {where}
"""


def worker_config(driver: str, backend: str = "") -> str:
    where = 'iface = "eth0"' if driver in ("af_packet", "af_xdp") else 'pci = "0000:00:03.0"'
    return ONE_PORT_WORKER.format(driver=driver, where=where, backend=backend)


def test_without_the_dpdk_worker_auto_is_uring_and_dpdk_a_config_error(monkeypatch) -> None:
    """The config side of an install without dataplane._dpdk, in this process."""
    from dataplane import config
    from dataplane.config import backends

    monkeypatch.setattr(backends, "dpdk_worker_built", lambda: False)
    w = config.loads(worker_config("af_packet")).workers[0]
    assert (w.backend, w.backend_reason) == ("uring", backends.NO_DPDK_WORKER)
    with pytest.raises(config.ConfigError, match="no DPDK worker.*use backend = .uring"):
        config.loads(worker_config("af_packet", 'backend = "dpdk"'))
    for driver in ("af_xdp", "pci"):
        with pytest.raises(config.ConfigError, match=f"driver {driver} .*no DPDK worker"):
            config.loads(worker_config(driver))
    monkeypatch.setattr(backends, "dpdk_worker_built", lambda: True)
    assert config.loads(worker_config("af_packet", 'backend = "dpdk"')).workers[0].backend == \
        "dpdk"
