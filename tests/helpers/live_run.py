"""A `dataplane run` of the default lab (renamed for one test) as its own process, as an operator
starts it: the tests of `top` and `status` look at it from outside, through the CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.default_lab import default_text
from tests.helpers.processes import stop_process

ROOT = Path(__file__).resolve().parents[2]
DATAPLANE = [sys.executable, "-m", "dataplane.cli"]


def dp(*args: str, prefix: list[str] | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI, as a process of its own."""
    return subprocess.run([*(prefix or []), *DATAPLANE, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)


@dataclass
class LiveRun:
    proc: subprocess.Popen[str]
    config: Path
    url: str
    out: Path           # the run's stdout
    tag: str

    def output(self) -> str:
        return self.out.read_text()


@contextmanager
def live_run(tmp_path: Path, tag: str, *args: str, rate: int = 20000,
             extra: str = "") -> Iterator[LiveRun]:
    """`dataplane run --config <the default lab, renamed, then `extra`> ARGS` until the block
    ends (SIGINT, as Ctrl-C), once its metrics endpoint answers."""
    text = default_text(tag, ("rate_pps = 20000", f"rate_pps = {rate}")) + extra
    cfg = tmp_path / f"lab-{tag}.toml"
    cfg.write_text(text)
    listen = next(ln.split('"')[1] for ln in text.splitlines() if ln.startswith("listen ="))
    out = tmp_path / f"run-{tag}.out"
    with out.open("w") as f:
        proc = subprocess.Popen([*DATAPLANE, "run", "--config", str(cfg), *args], stdout=f,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    run = LiveRun(proc, cfg, f"http://{listen}/metrics", out, tag)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"run exited {proc.returncode}:\n{run.output()}"
            assert time.monotonic() < deadline, f"no metrics at {run.url}:\n{run.output()}"
            try:
                with urllib.request.urlopen(run.url, timeout=5):
                    break
            except OSError:
                time.sleep(0.3)
        yield run
    finally:
        stop_process(proc, signal.SIGINT, 90)
