"""perf/report.py: docs/performance.md is what the committed results give, and every benchmark
script answers --help.

No root, no lab, a few seconds: `report.py --from-results` regenerates the page into a scratch
directory from perf/results/*.json; the page it writes must equal the committed one (so the
page cannot drift from its figures), and every plot the page links must exist, committed and
freshly drawn.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
PAGE = ROOT / "docs/performance.md"
sys.path.insert(0, str(PERF))
from report import BENCHES, MARKER  # noqa: E402 - perf/ is not a package


def test_page_is_what_the_results_give(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    shutil.copy(PAGE, page)
    res = subprocess.run([sys.executable, str(PERF / "report.py"), "--from-results", "--page",
                          str(page), "--plots", str(tmp_path / "perf"), "--results",
                          str(PERF / "results")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "has no <!-- report:" not in res.stderr, res.stderr
    assert page.read_text() == PAGE.read_text(), (
        "docs/performance.md differs from what perf/results gives: run "
        "`.venv/bin/python perf/report.py --from-results` and commit the page")
    links = re.findall(r"!\[[^]]*\]\((perf/[\w.-]+\.png)\)", PAGE.read_text())
    drawn = {f"perf/{p.name}" for p in (tmp_path / "perf").glob("*.png")}
    assert drawn == set(links), "a plot drawn and not linked, or linked and not drawn"
    for link in links:
        assert (ROOT / "docs" / link).is_file(), f"{link} is not committed"
        assert (tmp_path / link).stat().st_size > 0, link


def test_every_result_has_a_block_and_a_benchmark() -> None:
    blocks = {m.group(2) for m in MARKER.finditer(PAGE.read_text())}
    stored = {p.name.rsplit("-", 3)[0] for p in (PERF / "results").glob("*.json")}
    assert stored, "no stored result"
    assert stored <= set(BENCHES), stored - set(BENCHES)
    assert stored <= blocks, f"results without a block on the page: {stored - blocks}"
    assert "summary" in blocks


def test_report_runs_every_benchmark_script() -> None:
    scripts = {p.name for p in PERF.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    assert scripts - {"report.py"} == {b.script for b in BENCHES.values()}


@pytest.mark.parametrize("script", sorted({b.script for b in BENCHES.values()} | {"report.py"}))
def test_help(script: str) -> None:
    res = subprocess.run([sys.executable, str(PERF / script), "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout
