"""Run the perf/ benchmarks and write docs/performance.md from their figures: one command for
the whole picture.

    sudo .venv/bin/python perf/report.py                      # every benchmark, then the page
    sudo .venv/bin/python perf/report.py exporter consumers   # only these, then the page
    .venv/bin/python perf/report.py --from-results            # the page from stored JSON only
    .venv/bin/python perf/report.py --import rx rx.out        # a run's output kept as its result

Each benchmark runs alone, as root, holding /tmp/dp-host.lock (and /tmp/dp-guest.lock for those
that boot the QEMU guest) so no other measurement or test overlaps it.  Its last output line,
one JSON object, is kept in perf/results/NAME-DATE.json with the command, the date and the load
average before it started; the newest file of each benchmark is what the page shows.

The page keeps its hand-written text: only what lies between `<!-- report: NAME -->` and
`<!-- /report -->` is generated (a table of ours, the reference and the ratio, the machine, the
date and the load, and links to the plots in docs/perf/); `<!-- report: summary -->` gets one
headline row per benchmark.  A script may give its own rows as `"headline": [{"what", "ours",
"reference", "ratio"}]` in its JSON; otherwise the figures are read from the fields each script
prints today (perf/report_figures.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from report_figures import Row, rows_for
from report_plots import plot_all

PERF = Path(__file__).resolve().parent
ROOT = PERF.parent
RESULTS = PERF / "results"
PAGE = ROOT / "docs/performance.md"
PLOTS = ROOT / "docs/perf"
HOST_LOCK, GUEST_LOCK = "/tmp/dp-host.lock", "/tmp/dp-guest.lock"
MARKER = re.compile(r"(<!-- report: ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


@dataclass(frozen=True)
class Bench:
    script: str
    args: tuple[str, ...] = ()
    guest: bool = False         # boots the QEMU guest: holds the guest lock too
    title: str = ""


# short name -> script; the order is the page's summary order
BENCHES: dict[str, Bench] = {
    "rx": Bench("rx_vs_testpmd.py", title="RX path against dpdk-testpmd rxonly"),
    "ceiling": Bench("consumer_ceiling.py", title="Python consumer against a C consumer"),
    "consumers": Bench("consumers_cost.py", ("--seconds", "4", "--repeat", "3"),
                       title="capture + flow export on the lab"),
    "exporter": Bench("exporter_cost.py", ("--seconds", "4", "--repeat", "3"),
                      title="10 Hz /metrics scrapes on a lab of 8 workers"),
    "ingest": Bench("ingest_vs_recvmmsg.py", ("--seconds", "3", "--rounds", "3"),
                    title="io_uring ingest against recvmmsg and TPACKET_V3"),
    "transport": Bench("transport_bench.py", ("--seconds", "3",),
                       title="TCP transport against iperf3"),
    "mr_cache": Bench("mr_cache_bench.py", guest=True,
                      title="MR cache hit against a fresh registration"),
    "rdma": Bench("rdma_bench.py", guest=True, title="RDMA transport against ib_write_bw"),
}


def last_json(text: str) -> dict:
    """The benchmark's contract: its last non-empty line is one JSON object."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output")
    obj = json.loads(lines[-1])
    if not isinstance(obj, dict):
        raise ValueError("the last line is not a JSON object")
    return obj


def store(name: str, result: dict, command: list[str], load: float,
          results: Path = RESULTS) -> Path:
    """Keep a run's JSON with how and when it was taken; one file per benchmark and day."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    result = {**result, "report": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "command": " ".join(command),
                                   "loadavg_1m_before": round(load, 2)}}
    results.mkdir(exist_ok=True)
    path = results / f"{name}-{day}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return path


def run(name: str, extra: list[str], results: Path) -> Path | None:
    """One benchmark under the locks, its output streamed; its JSON stored."""
    b = BENCHES[name]
    cmd = [sys.executable, str(PERF / b.script), *(extra or b.args)]
    shown = ["sudo", ".venv/bin/python", f"perf/{b.script}", *(extra or b.args)]
    locks = [open(HOST_LOCK, "a")]      # noqa: SIM115 - held until the run ends
    if b.guest:
        locks.append(open(GUEST_LOCK, "a"))  # noqa: SIM115
    try:
        for f in locks:
            print(f"report: {name}: waiting for {f.name}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        load = os.getloadavg()[0]
        print(f"report: {name}: {' '.join(shown)} (load {load:.2f})", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        out = []
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            out.append(line)
        rc = proc.wait()
    finally:
        for f in locks:
            f.close()
    try:
        result = last_json("".join(out))
    except ValueError as e:
        print(f"report: {name}: exit {rc}, no result kept ({e})", file=sys.stderr)
        return None
    path = store(name, result, shown, load, results)
    print(f"report: {name}: kept {path.relative_to(ROOT)}", flush=True)
    return path


def newest(results: Path) -> dict[str, dict]:
    """The newest stored result of each benchmark (the date is in the file name)."""
    found: dict[str, dict] = {}
    for name in BENCHES:
        files = sorted(results.glob(f"{name}-[0-9]*.json"))
        if files:
            found[name] = json.loads(files[-1].read_text())
    return found


def cell(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def table(rows: list[Row]) -> list[str]:
    out = ["| figure | ours | reference | ratio |", "|---|---|---|---|"]
    out += [f"| {r.what} | {r.ours} | {r.reference} | {r.ratio_text or cell(r.ratio)} |"
            for r in rows]
    return out


def machine_line(res: dict) -> str:
    m, rep = res.get("machine", {}), res.get("report", {})
    load = next((m[k] for k in ("loadavg_1m_at_start", "loadavg_1m", "host_loadavg_1m")
                 if isinstance(m.get(k), int | float)), rep.get("loadavg_1m_before"))
    cpu = m.get("host_cpu") or m.get("cpu", "?")
    cores = m.get("host_cores") or m.get("cores", "?")
    where = m.get("where") or (f"Linux {m['kernel']}" if "kernel" in m else "")
    load_s = f"{load:.2f}" if isinstance(load, int | float) else "?"
    return (f"{cpu}, {cores} cores{', ' + where if where else ''}; load average {load_s}; "
            f"{rep.get('date', 'date not recorded')}")


def block(name: str, res: dict, plots: list[Path], page_dir: Path) -> str:
    lines = table(rows_for(name, res))
    lines += ["", f"Measured on {machine_line(res)}."]
    if res.get("report", {}).get("command"):
        lines += ["", f"`{res['report']['command']}`"]
    for p in plots:
        rel = os.path.relpath(p, page_dir)
        lines += ["", f"![{name}: {p.stem.split('-', 1)[-1]}]({rel})"]
    return "\n".join(lines) + "\n"


def summary(found: dict[str, dict]) -> str:
    lines = ["| benchmark | figure | ours | reference | ratio | load | date |",
             "|---|---|---|---|---|---|---|"]
    for name, res in found.items():
        rows = rows_for(name, res)
        if not rows:
            continue
        r = rows[0]
        m = machine_line(res).split("; ")
        lines.append(f"| `{name}` ({BENCHES[name].title}) | {r.what} | {r.ours} | "
                     f"{r.reference} | {r.ratio_text or cell(r.ratio)} | "
                     f"{m[-2].removeprefix('load average ')} | {m[-1]} |")
    return "\n".join(lines) + "\n"


def write_page(page: Path, plots_dir: Path, results: Path) -> list[str]:
    """Regenerate every marked block of `page` from the stored results; the rest is kept."""
    found = newest(results)
    text = page.read_text()
    missing = [n for n in found if f"<!-- report: {n} -->" not in text]

    def fill(m: re.Match[str]) -> str:
        name = m.group(2)
        if name == "summary":
            body = summary(found)
        elif name in found:
            body = block(name, found[name], plot_all(name, found[name], plots_dir),
                         page.parent)
        else:
            body = ""       # nothing stored yet: the hand-written text stands alone
        return m.group(1) + body + m.group(4)

    page.write_text(MARKER.sub(fill, text))
    return missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run (default: all): {', '.join(BENCHES)}")
    ap.add_argument("--from-results", action="store_true",
                    help="run nothing: write the page from the stored results")
    ap.add_argument("--import", dest="imports", nargs=2, action="append", default=[],
                    metavar=("NAME", "FILE"),
                    help="keep FILE's last line (a benchmark's output) as NAME's result")
    ap.add_argument("--args", dest="extra", default="",
                    help="arguments for the benchmark instead of its defaults (one NAME only)")
    ap.add_argument("--page", type=Path, default=PAGE, help="the page to write")
    ap.add_argument("--plots", type=Path, default=PLOTS, help="where the PNG plots go")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where results are kept")
    args = ap.parse_args()
    unknown = [n for n in args.names + [n for n, _ in args.imports] if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark {unknown}: choose from {', '.join(BENCHES)}")
    if args.extra and len(args.names) != 1:
        ap.error("--args goes with exactly one NAME")
    for name, file in args.imports:
        res = last_json(Path(file).read_text())
        kept = store(name, res, [f"(imported from {file})"], 0.0, args.results)
        print(f"report: {name}: kept {kept}")
    if not args.from_results and not args.imports:
        if os.geteuid() != 0:
            ap.error("running the benchmarks needs root (or --from-results)")
        for name in args.names or list(BENCHES):
            run(name, args.extra.split(), args.results)
    args.plots.mkdir(parents=True, exist_ok=True)
    for name in write_page(args.page, args.plots, args.results):
        print(f"report: {args.page} has no <!-- report: {name} --> block: its table is not "
              "shown", file=sys.stderr)
    print(f"report: wrote {args.page} and the plots in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
