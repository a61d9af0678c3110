"""`dataplane status`: what a config's run looks like now, read-only, as text or one JSON object.

The host changes applied (the journal), the hugepage pools and mounts, the lab, each worker's
arena (state, pid, heartbeat age, its counters) and each [[transport]]'s control file (state,
connection, counters, handshake failures).  Nothing here changes anything, and nothing needs a
run of this process: it reads the shared memory and /proc.

The exit code says whether the config's workers and transports run (exit_code()): a script or a
health check needs no parsing to know.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dataplane.config import Config, arena_filename
from dataplane.host.proc import pid_alive

# exit codes beyond the CLI's 0/1/2, as the LSB init scripts' `status` uses 3 for "not running"
ALL_UP, NONE_UP, SOME_DOWN = 0, 3, 4
EXIT_CODES = (f"{ALL_UP} every worker and transport of the config runs; {NONE_UP} none of them "
              f"runs (stopped, never started); {SOME_DOWN} some run and at least one is down "
              "(failed, process gone, heartbeat stale, not running); 1 status itself failed "
              "(e.g. a damaged journal); 2 a usage or config error")
# the supervisor's default: a heartbeat older than this gets a worker killed and restarted
STALE_HEARTBEAT = 3.0


def report(cfg: Config) -> dict[str, Any]:
    """Everything `status` shows, as one JSON-able object; "down" names what is not running."""
    from dataplane.host import hugepages
    dirs = [*hugepages.hugetlbfs_mounts(), Path("/dev/shm")]
    workers = [worker(w.name, [p.name for p in w.ports], dirs) for w in cfg.workers]
    transports = [transport(x) for x in cfg.transports]
    down = [f"{kind} {x['name']}: {x['why']}" for kind, xs in
            (("worker", workers), ("transport", transports)) for x in xs if not x["up"]]
    # the per-stream books live in the run's process: asked of its endpoint (/streams), and
    # only while a worker runs, so a stopped config costs no connection attempt
    from dataplane.run import streams
    books = (streams.fetch(cfg) if any(w["up"] for w in workers)
             else {"streams": None, "why": "no worker runs"})
    return {"config": str(cfg.source), "host": host(cfg), "lab": lab(cfg), "workers": workers,
            "transports": transports, "streams": books, "down": down, "ok": not down}


def exit_code(rep: dict[str, Any]) -> int:
    parts = rep["workers"] + rep["transports"]
    if not rep["down"]:
        return ALL_UP
    return NONE_UP if not any(x["up"] for x in parts) else SOME_DOWN


def to_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, sort_keys=True)


def lines(cfg: Config, rep: dict[str, Any] | None = None) -> Iterator[str]:
    """Every line `dataplane status` prints for cfg (from `rep`, report(cfg), if given)."""
    from dataplane.host import hugepages
    from dataplane.run import updown
    rep = rep or report(cfg)
    yield from updown.status_lines(cfg)
    yield hugepages.show()     # what `dpdk-hugepages.py -s` shows: pools per node, mounts
    if rep["lab"] is not None:
        yield f"lab: {'up' if rep['lab']['up'] else 'down'}"
        yield from lab_lines(rep["lab"])
    for w in rep["workers"]:
        yield from worker_lines(w)
    for x in rep["transports"]:
        yield from transport_lines(x)
    if rep["streams"]["streams"]:
        from dataplane.run.streams import lines as stream_lines
        yield from stream_lines(rep["streams"]["streams"])
    yield ("all running" if rep["ok"] else
           f"DOWN: {len(rep['down'])}: " + "; ".join(rep["down"]))


def host(cfg: Config) -> dict[str, Any]:
    """The journal of host changes `up` applied, and the run it started."""
    from dataplane.host.journal import Journal
    from dataplane.run.updown import running
    journal = Journal(cfg.host.journal_dir)
    return {"journal": str(journal.path), "changes": list(journal.entries),
            "run_pid": running(journal) if journal.entries else None}


def lab(cfg: Config) -> dict[str, Any] | None:
    if cfg.lab is None:
        return None
    from dataplane.run import lab as lab_
    return {"up": lab_.exists(cfg), **lab_.status(cfg)}


def lab_lines(st: dict[str, Any]) -> Iterator[str]:
    """The lab's namespaces and links, from dataplane.run.lab.status()."""
    for ns, present in st["namespaces"].items():
        yield f"netns {ns}: {'present' if present else 'absent'}"
    for lk in st["links"]:
        yield (f"  {lk['netns']}/{lk['name']}: {lk['state']} {lk['mac']} "
               f"{' '.join(lk['addresses'])}").rstrip()
    if d := st.get("dut"):
        yield (f"dut {d['mode']} in {d['netns']}: {d['ingress']} -> {d['egress']}, "
               + ("set up" if d["present"] else "not set up")
               + (f", pids {' '.join(map(str, d['pids']))}" if d["pids"] else ""))


def worker(name: str, ports: list[str], dirs: list[Path]) -> dict[str, Any]:
    """One worker, from the newest of its arena files in dirs: up only when its arena says
    running, its process lives and its heartbeat is fresh."""
    from dataplane.shm.arena import Arena
    from dataplane.shm.layout import LayoutError
    from dataplane.workers.rate import generator_streams
    found = find_arenas(name, dirs)
    w: dict[str, Any] = {"name": name, "arena": str(found[0]) if found else None,
                         "state": "not running", "up": False}
    if not found:
        return {**w, "why": "no arena (not running)"}
    try:
        with Arena.open(found[0]) as a:
            h = a.header
            w.update(state=a.worker_state(), pid=h.pid, alive=pid_alive(h.pid),
                     restarts=int(h.restarts), error=a.worker_error(),
                     heartbeat_age=((time.monotonic_ns() - h.heartbeat_ns) / 1e9
                                    if h.heartbeat_ns else None),
                     ports=port_counters(a, ports), generator=generator_streams(a))
    except (OSError, LayoutError) as e:
        return {**w, "state": "unknown", "why": f"arena {found[0]} unreadable: {e}"}
    w["counters"] = {k: sum(p[k] for p in w["ports"]) for k in w["ports"][0]
                     if k != "port"} if w["ports"] else {}
    why = _why_worker(w)
    return {**w, "up": not why, **({"why": why} if why else {})}


def _why_worker(w: dict[str, Any]) -> str:
    """Why a worker whose arena was read is down, or "" when it is up."""
    if w["state"] != "running":
        return f"state {w['state']}" + (f": {w['error']}" if w["error"] else "")
    if not w["alive"]:
        return f"process {w['pid']} gone"
    age = w["heartbeat_age"]
    if age is None or age > STALE_HEARTBEAT:
        return "no heartbeat" if age is None else f"heartbeat {age:.1f} s old"
    return ""


def port_counters(a: Any, names: list[str]) -> list[dict[str, Any]]:
    """Per port: what its rings received and what the port sent and dropped."""
    from dataplane.shm.layout import PORT_COUNTERS, RING_COUNTERS
    out = []
    pc = a.port_counters[:a.n_ports].copy()
    for p in range(a.n_ports):
        d: dict[str, Any] = {"port": names[p] if p < len(names) else str(p)}
        d |= dict.fromkeys(RING_COUNTERS, 0)
        for r in a.rings:
            if r.port == p:
                for i, k in enumerate(RING_COUNTERS):
                    d[k] += int(r.counters[i])
        d |= {k: int(pc[p, i]) for i, k in enumerate(PORT_COUNTERS) if k != "gen_seq"}
        out.append(d)
    return out


def worker_lines(w: dict[str, Any]) -> Iterator[str]:
    if w["arena"] is None or "pid" not in w:
        yield f"worker {w['name']}: {w['why']}"
        return
    age = w["heartbeat_age"]
    beat = f"heartbeat {age:.2f} s ago" if age is not None else "no heartbeat yet"
    yield (f"worker {w['name']}: arena {w['arena']} state={w['state']} pid={w['pid']} "
           f"({'alive' if w['alive'] else 'gone'}) {beat}, restarts {w['restarts']}"
           + (f" error: {w['error']}" if w["error"] else ""))
    c = w["counters"]
    if c:
        yield (f"  rx {c['rx_packets']} packets ({c['rx_bytes']} bytes), tx {c['tx_packets']} "
               f"packets; drops: ring {c['ring_full_drops']}, nic {c['nic_missed']}, tx "
               f"{c['tx_drops']}, no-mbuf {c['rx_nombuf']}; malformed {c['malformed']}")
    for g in w.get("generator", []):   # docs/lab.md, Traffic
        yield (f"  stream {g['stream']}: {g['rate_pps'] or 'max'} pps, sent {g['tx_packets']}, "
               f"tx drops {g['tx_drops']}, " + (f"with trailer {g['with_trailer']}" if
                                                 g["tracked"] else "sequence tracking off"))


def transport(x: Any) -> dict[str, Any]:
    """One [[transport]] of the config, from its control file when a run has one."""
    from dataplane.shm.control import Control, control_path
    from dataplane.shm.layout import LayoutError
    from dataplane.transport.auth import REASONS
    path = Path(control_path(x.name))
    t: dict[str, Any] = {"name": x.name, "kind": x.kind, "role": x.role,
                         "peer": f"{x.host}:{x.tcp_port}", "control": str(path),
                         "state": "not running", "up": False, "insecure": bool(x.insecure)}
    if not path.exists():
        return {**t, "why": f"not running (no {path})"}
    try:
        ctl = Control(path)
    except (OSError, LayoutError) as e:
        return {**t, "state": "unknown", "why": f"control file {path} unreadable: {e}"}
    try:
        h = ctl.hdr
        t.update(state=ctl.state(), pid=h.pid, alive=pid_alive(h.pid),
                 connected=bool(h.connected), restarts=int(h.restarts), error=ctl.error(),
                 insecure=bool(x.insecure or h.auth.insecure), counters=ctl.snapshot(),
                 auth={"ok": int(h.auth.ok), "failures": {
                     r: int(h.auth.failures[i]) for i, r in enumerate(REASONS)}})
        if x.kind == "rdma":
            from dataplane.metrics.rdma import status_line
            t["rdma"], t["rdma_line"] = ctl.rdma_snapshot(), status_line(x.role, x.device, ctl)
    finally:
        ctl.close()
    why = (f"state {t['state']}" + (f": {t['error']}" if t["error"] else "")
           if t["state"] != "running" else "" if t["alive"] else f"process {t['pid']} gone")
    return {**t, "up": not why, **({"why": why} if why else {})}


def transport_lines(t: dict[str, Any]) -> Iterator[str]:
    head = (f"transport {t['name']} ({t['kind']} {t['role']} "
            f"{'to' if t['role'] == 'send' else 'on'} {t['peer']})")
    if "pid" not in t:
        yield f"{head}: {t['why']}"
        return
    c = t["counters"]
    yield (f"{head}: state={t['state']} pid={t['pid']} "
           f"({'alive' if t['alive'] else 'gone'}) "
           f"{'connected' if t['connected'] else 'not connected'}, batches {c['batches']}, "
           f"packets {c['packets']}, lost {c['lost_packets']}, auth failures "
           f"{sum(t['auth']['failures'].values())}, restarts {t['restarts']}"
           + (", INSECURE (no key)" if t["insecure"] else "")
           + (f" error: {t['error']}" if t["error"] else ""))
    if "rdma_line" in t:
        yield t["rdma_line"]


def find_arenas(worker: str, dirs: list[Path]) -> list[Path]:
    """The worker's arena files, newest first: plan() names them dataplane-NAME, the supervisor
    dataplane-RUNID-NAME (the run's pid: digits, so worker "b" does not find "a-b"'s file)."""
    pattern = re.compile(rf"{re.escape(arena_filename(''))}([0-9]+-)?{re.escape(worker)}")
    found = [f for d in dirs if d.is_dir() for f in d.iterdir() if pattern.fullmatch(f.name)]
    return sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)
