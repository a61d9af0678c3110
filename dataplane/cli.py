"""The `dataplane` command: run the workers, manage the lab, show status, check configs.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error (also: missing privileges, which
are checked before anything is changed).  Modules that need the native build, scapy or the
runner are imported inside the commands that use them, so `--help` and `config check` stay fast
and the CLI works before every part of the project exists.

Over 400 lines on purpose: every command's handler sits next to its parser, with its help and
examples, so one file is the whole user-facing surface (completion and the man page are
generated from it); the work itself is in the rooms the handlers import.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dataplane import about, config
from dataplane.config.specs import describe
from dataplane.config.tables import checks
from dataplane.host.proc import missing_caps
from dataplane.metrics.scrape import add_endpoint_args

log = logging.getLogger("dataplane")
OK, FAILED, USAGE = 0, 1, 2


class Usage(Exception):
    """A problem the user fixes (flags, config, privileges): exit 2, nothing changed."""


def need_root(what: str, example: str) -> None:
    """Refuse, before changing anything, when CAP_NET_ADMIN or CAP_SYS_ADMIN is missing."""
    missing = missing_caps(["CAP_NET_ADMIN", "CAP_SYS_ADMIN"])
    if missing:
        raise Usage(f"{what} needs CAP_NET_ADMIN and CAP_SYS_ADMIN (missing: "
                    f"{', '.join(missing)}) to create and enter network namespaces; "
                    f"run as root: sudo {example}")


def cmd_run(args: argparse.Namespace) -> int:
    need_root("dataplane run", "dataplane run")       # first: before anything is read or made
    log_file = None
    if args.log_file:       # then: everything after goes to the file, a config error too
        from dataplane.run.logfile import LogFile
        log_file = LogFile(args.log_file)
    if args.metrics is not None:
        bad = checks.host_port(args.metrics)
        if bad:
            raise Usage(f"--metrics {args.metrics}: {bad}")
    if args.duration is not None and args.duration <= 0:
        raise Usage(f"--duration {args.duration:g}: expected seconds > 0")

    def load() -> config.Config:     # at start, and again at each SIGHUP (reload)
        cfg = config.load(args.config)
        if args.metrics is not None:
            host, _, port = args.metrics.rpartition(":")
            # only the address: the config's web_config and max_connections still hold
            m = cfg.metrics
            m.listen, m.host, m.port = args.metrics, host.strip("[]"), int(port)
        return cfg

    cfg = load()
    from dataplane.run import runner  # here, not at the top: --help stays fast
    rc = runner.run(cfg, duration=args.duration, books_json=args.json,
                    progress=True if args.progress else None, load=load,
                    log_file=log_file)
    return int(rc or 0)


def cmd_lab(args: argparse.Namespace) -> int:
    from dataplane.run import lab
    if args.action in ("up", "down"):
        need_root(f"dataplane lab {args.action}", f"dataplane lab {args.action}")
    cfg = config.load(args.config)
    if cfg.lab is None:
        raise Usage(f"{cfg.source}: no [lab] table: nothing to bring {args.action}")
    if args.action in ("up", "down"):
        (lab.up if args.action == "up" else lab.down)(cfg)
        log.info("lab %s: %s", args.action, ", ".join(cfg.lab.namespaces))
    from dataplane.run.status import lab_lines
    for ln in lab_lines(lab.status(cfg)):
        print(ln)
    return OK


def need_caps(what: str, example: str, why: dict[str, str]) -> None:
    """Refuse, before changing anything, naming each missing capability and what needs it."""
    missing = [f"{n} ({why[n]})" for n in missing_caps(list(why))]
    if missing:
        raise Usage(f"{what} needs {', '.join(missing)}; nothing was changed; run as root: "
                    f"sudo {example}")


# CAP_SYS_RESOURCE (raising the memlock limit) is checked by that change itself: a process
# with CAP_IPC_LOCK needs no higher limit, and a profile may not ask for one
HOST_CAPS = {"CAP_SYS_ADMIN": "sysfs and sysctl writes, hugetlbfs mounts, driver binding",
             "CAP_NET_ADMIN": "qdiscs, namespaces, interfaces"}


def cmd_plan(args: argparse.Namespace) -> int:
    from dataplane.host.plan import plan_lines
    cfg = config.load(args.config)
    lines = plan_lines(cfg)
    if not lines:
        print("host: the config has no [host] changes")
    for ln in lines:
        print(ln)
    from dataplane.host.plan import host_changes, problems
    blocked = problems(host_changes(cfg))
    for b in blocked:
        print(f"BLOCKED: {b}")
    if cfg.workers:
        print(f"then: dataplane run ({len(cfg.workers)} worker(s): "
              f"{', '.join(w.name for w in cfg.workers)})")
    return OK


def cmd_up(args: argparse.Namespace) -> int:
    need_caps("dataplane up", "dataplane up", HOST_CAPS)
    from dataplane.run import updown
    cfg = config.load(args.config)
    try:
        lines = updown.up(cfg, args.config, host_only=args.host_only)
    except updown.Blocked as e:
        raise Usage(str(e)) from None
    for ln in lines:
        print(ln)
    return OK


def cmd_down(args: argparse.Namespace) -> int:
    need_caps("dataplane down", "dataplane down", HOST_CAPS)
    from dataplane.run import updown
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        # the host must come back even when the config was broken after `up` (a refused
        # reload, an edit before a stop): what `down` needs is only where the journal is and
        # which workers' arenas may be stale
        log.warning("%s", e)
        cfg = updown.down_config(args.config)
        log.warning("going on with journal_dir %s from %s", cfg.host.journal_dir, cfg.source)
    if args.forget_journal:   # not loaded: the journal may be the damaged thing
        path = Path(cfg.host.journal_dir) / "journal.json"
        with updown.HostLock(updown.HOST_LOCK, "dataplane down --forget-journal", cfg.source):
            path.unlink(missing_ok=True)        # not while an `up` or `down` writes it
        print(f"forgot {path} without undoing anything: put the host back by hand")
        return OK
    for ln in updown.down(cfg):
        print(ln)
    return OK


def cmd_status(args: argparse.Namespace) -> int:
    from dataplane.run import status
    cfg = config.load(args.config)
    rep = status.report(cfg)
    if args.json:
        print(status.to_json(rep))
    else:
        for ln in status.lines(cfg, rep):
            print(ln)
    return status.exit_code(rep)


def cmd_rate(args: argparse.Namespace) -> int:
    from dataplane.run.rate import set_stream_rate
    try:
        old, new = set_stream_rate(config.load(args.config), args.worker, args.stream, args.rate)
    except ValueError as e:
        raise Usage(str(e)) from None
    except PermissionError as e:     # the arena is the run's user's (root's), 0600
        raise Usage(f"{e}: run as the run's user: sudo dataplane rate ...") from None
    print(f"worker {args.worker} stream {args.stream}: {old or 'max'} -> {new or 'max'} pps")
    return OK


def cmd_top(args: argparse.Namespace) -> int:
    from dataplane.metrics.scrape import DEFAULT_URL, endpoint_of
    from dataplane.run import top
    if args.interval <= 0:
        raise Usage(f"--interval {args.interval:g}: expected seconds > 0")
    if args.frames is not None and args.frames < 1:
        raise Usage(f"-n {args.frames}: expected at least one frame")
    try:
        ep = endpoint_of(args, args.url or DEFAULT_URL)
    except ValueError as e:
        raise Usage(str(e)) from None
    frames = 1 if args.once else args.frames
    return top.main(ep, args.interval, frames, lambda m: print(f"dataplane top: {m}",
                                                               file=sys.stderr))


def cmd_flows(args: argparse.Namespace) -> int:
    from dataplane.metrics.scrape import endpoint_of
    from dataplane.run import flows
    if not 0 < args.n <= flows.MAX_N:
        raise Usage(f"-n {args.n}: expected 1..{flows.MAX_N}")
    try:
        ep = endpoint_of(args, args.url or flows.url_of(config.load(args.config)))
    except ValueError as e:
        raise Usage(str(e)) from None
    return flows.main(ep, args.n, args.json, sys.stdout,
                      lambda m: print(f"dataplane flows: {m}", file=sys.stderr))


def cmd_config(args: argparse.Namespace) -> int:
    cfg = config.load(args.file)
    if args.action == "check":
        from dataplane.consumers.registry import ConsumerLoadError, resolve
        try:
            for c in cfg.consumers:    # imported, not made: a factory may open sockets
                resolve(c)
        except ConsumerLoadError as e:
            raise Usage(f"{cfg.source}: {e}") from None
        lab = f", lab of {len(cfg.lab.namespaces)} namespaces" if cfg.lab else ""
        print(f"{cfg.source}: ok ({len(cfg.workers)} workers{lab}, "
              f"{len(cfg.warnings)} warnings, logged above)")
        return OK
    specs = config.plan(cfg)
    if args.json:
        print("[" + ",\n ".join(s.to_json() for s in specs) + "]")
        return OK
    print(f"config {cfg.source}; metrics on {cfg.metrics.listen}")
    for ln in describe(specs):
        print(ln)
    return OK


def cmd_transport(args: argparse.Namespace) -> int:
    from dataplane.transport.auth import generate_key, write_key

    try:
        write_key(Path(args.file), generate_key())
    except FileExistsError:
        raise Usage(f"{args.file} exists: a key is never overwritten (remove it first, and "
                    "give the new one to both ends)") from None
    except OSError as e:
        raise Usage(f"{args.file}: {e.strerror}") from None
    print(f"{args.file}: new transport key (0600); copy it to the other end over a channel "
          "you trust and set key_file = \"<its absolute path>\" on both [[transport]] tables")
    return OK


EPILOG_MAIN = """examples:
  sudo dataplane lab up                    # namespaces dp-gen, dp-rx and a veth pair
  sudo dataplane run --duration 10         # the default lab: generate and receive for 10 s
  dataplane status                         # lab state, each worker's state and heartbeat
  dataplane config show                    # what the embedded default config plans
  dataplane config check my.toml           # every problem in a file, with its key path
  sudo dataplane lab down
  dataplane plan -c config/appliance.toml  # host changes, current -> desired; changes nothing
  sudo dataplane up -c config/appliance.toml    # apply (journaled), start in the background
  sudo dataplane down -c config/appliance.toml  # stop, restore the host exactly

Exit codes: 0 ok, 1 runtime failure, 2 usage, config or privilege error."""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="debug logging (the ip commands run, the plan)")
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("--config", "-c", metavar="FILE",
                             help="TOML config (default: the embedded default lab)")
    p = argparse.ArgumentParser(prog="dataplane", description="Kernel-bypass dataplane: DPDK "
                                "workers, shared-memory rings, numpy consumers, Prometheus.",
                                epilog=EPILOG_MAIN, formatter_class=fmt)
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    p.add_argument("--version", action=about.VersionAction,
                   help="print the version, the arena layout and whether DPDK is built")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [common, with_config]
    _add_run_commands(sub, parents, fmt)
    from dataplane.run import capture  # light: its parser; the rest when it runs
    capture.add_command(sub, common, fmt)
    from dataplane.bench import command as bench  # light: its parser; the rest when it runs
    bench.add_command(sub, parents, fmt)
    _add_host_commands(sub, parents, fmt)
    _add_config_command(sub, common, fmt)
    _add_transport_command(sub, common, fmt)
    about.add_commands(p, sub, common, fmt)   # completion, man
    return p


def _add_run_commands(sub, parents: list[argparse.ArgumentParser], fmt: type) -> None:
    """run, lab, status: the dataplane itself."""
    common, with_config = parents

    r = sub.add_parser("run", parents=[common, with_config], formatter_class=fmt,
                       help="start the workers, exporter and consumers (root)",
                       description="Start every worker the config plans, the consumers and the "
                       "Prometheus exporter; stop on Ctrl-C or after --duration.",
                       epilog="examples:\n  sudo dataplane run\n  sudo dataplane run --config "
                       "config/appliance.toml --metrics 127.0.0.1:9477 -v\n  sudo dataplane "
                       "run --duration 30")
    r.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    r.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics here instead of [metrics] listen "
                   "(a non-loopback address exposes the counters)")
    r.add_argument("--json", action="store_true",
                   help="end with the books as one JSON object, the last line of stdout")
    r.add_argument("--progress", action="store_true",
                   help="print the line a second even when stdout is not a terminal")
    r.add_argument("--log-file", metavar="FILE",
                   help="stdout and stderr to FILE, rotated at 4 MiB (3 kept): what `up` gives "
                   "its background run")
    r.set_defaults(func=cmd_run)

    lb = sub.add_parser("lab", parents=[common, with_config], formatter_class=fmt,
                        help="create or remove the veth/netns lab (root)",
                        description="up: create the [lab] namespaces and veth pairs (idempotent)."
                        "\ndown: delete exactly those, by name (idempotent; works after a "
                        "crash).\nstatus: show what is there.",
                        epilog="examples:\n  sudo dataplane lab up\n  sudo dataplane lab down "
                        "--config my.toml\n  dataplane lab status")
    lb.add_argument("action", choices=("up", "down", "status"))
    lb.set_defaults(func=cmd_lab)

    from dataplane.run.status import EXIT_CODES as STATUS_CODES  # light: config, /proc
    st = sub.add_parser("status", parents=[common, with_config], formatter_class=fmt,
                        help="host changes, lab, workers and transports of a run",
                        description="Read-only: the host changes applied (journal), hugepage "
                        "pools, the lab's namespaces and links, each worker's arena file "
                        "(hugetlbfs or /dev/shm) with state, pid and heartbeat age, and each "
                        "[[transport]]: state, connection, batches; for RDMA its queue pairs "
                        "against the device's max_qp, credits, errors, reconnects, lost packets "
                        "and the memory-registration cache.  Each worker's and transport's "
                        "counters too.",
                        epilog="examples:\n  dataplane status\n  "
                        "dataplane status --config config/appliance.toml\n  "
                        "dataplane status --json         # one JSON object\n\nexit codes: "
                        + STATUS_CODES)
    st.add_argument("--json", action="store_true",
                    help="one JSON object: host changes, lab, workers, transports, what is down")
    st.set_defaults(func=cmd_status)
    ra = sub.add_parser("rate", parents=[common, with_config], formatter_class=fmt,
                        help="change a running generator stream's rate (root)",
                        description="Write a new rate into the worker's arena; the generator "
                        "takes it within ~10 ms and its stream's sequence numbers go on, so the "
                        "books stay exact (docs/lab.md, Traffic).",
                        epilog="examples:\n  sudo dataplane rate gen 1 50kpps\n  sudo dataplane "
                        "rate gen 2 200Mbps\n  sudo dataplane rate gen 1 0      # as fast as the "
                        "port takes them")
    ra.add_argument("worker", help="the generating worker's name")
    ra.add_argument("stream", type=int, help="the stream id (its trailers carry it)")
    ra.add_argument("rate", help='"100kpps", "2.5Mpps", "50Mbps", "1Gbps", or packets/s')
    ra.set_defaults(func=cmd_rate)
    _add_top_command(sub, common, fmt)
    fl = sub.add_parser("flows", parents=[common, with_config], formatter_class=fmt,
                        help="the biggest flows of a running dataplane, from its /flows",
                        description="The flow caches' biggest active flows and the statistics'"
                        " top flows, read from /flows on the metrics endpoint of the config's "
                        "[metrics] listen (no root needed).  docs/flows.md",
                        epilog="examples:\n  dataplane flows\n  dataplane flows -c my.toml -n "
                        "20 --json\n\nexit codes: 0 ok, 1 the endpoint could not be read, 2 "
                        "usage error")
    fl.add_argument("-n", type=int, default=10, help="flows per table (default: %(default)s)")
    fl.add_argument("--json", action="store_true", help="the /flows document as it is")
    add_endpoint_args(fl, "read this /flows URL instead of the config's")
    fl.set_defaults(func=cmd_flows)


def _add_top_command(sub, common: argparse.ArgumentParser, fmt: type) -> None:
    """top: the live view, from the metrics endpoint."""
    t = sub.add_parser("top", parents=[common], formatter_class=fmt,
                       help="live view of a running dataplane, from its metrics endpoint",
                       description="Rates per port, drops by reason, ring occupancy and "
                       "latency, workers and transports, refreshed every --interval, read from "
                       "the metrics endpoint (no root needed; any run: `run`, `up`, systemd). "
                       "q quits.  Not on a terminal, or with --once / -n, it prints frames as "
                       "plain text.",
                       epilog="examples:\n  dataplane top\n  dataplane top --once\n  "
                       "dataplane top --url https://10.0.0.5:9477/metrics --ca ca.crt --user "
                       "prometheus --password-file pw\n\nexit codes: 0 ok, 1 the endpoint "
                       "could not be read (the reason is printed), 2 usage error")
    add_endpoint_args(t, "the metrics endpoint (default: http://127.0.0.1:9477/metrics)")
    t.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="between frames; rates are over this interval (default: 1)")
    t.add_argument("--once", action="store_true", help="print one frame as text and exit")
    t.add_argument("-n", "--frames", type=int, metavar="N",
                   help="print N frames as text and exit")
    t.set_defaults(func=cmd_top)


def _add_host_commands(sub, parents: list[argparse.ArgumentParser], fmt: type) -> None:
    """plan, up, down: the host changes of a [host] table."""
    common, with_config = parents
    pl = sub.add_parser("plan", parents=[common, with_config], formatter_class=fmt,
                        help="print every host change `up` would make; change nothing",
                        description="Read the host now and print, for each change the [host] "
                        "table asks for (hugepages, mounts, NIC binding, sysctls, qdiscs, "
                        "memlock), current value -> desired value, with what blocks it.",
                        epilog="examples:\n  dataplane plan --config config/appliance.toml")
    pl.set_defaults(func=cmd_plan)
    u = sub.add_parser("up", parents=[common, with_config], formatter_class=fmt,
                       help="apply the plan (journaled) and start the dataplane (root)",
                       description="Journal then apply each change of `dataplane plan`, then "
                       "start `dataplane run` in the background.  If anything fails, what was "
                       "applied is undone.  Harmless when already up.  After a crash, restores "
                       "the unfinished journal first.",
                       epilog="examples:\n  sudo dataplane up --config config/appliance.toml\n"
                       "  sudo dataplane status --config config/appliance.toml")
    u.add_argument("--host-only", action="store_true",
                   help="prepare the host (journaled) but start no run: for a service manager "
                   "that runs `dataplane run` itself (config/systemd/dataplane.service)")
    u.set_defaults(func=cmd_up)
    d = sub.add_parser("down", parents=[common, with_config], formatter_class=fmt,
                       help="stop the dataplane and restore the host from the journal (root)",
                       description="Undo every journaled change, newest first: stop the "
                       "background run, restore sysctls, qdiscs, drivers (and interface names), "
                       "unmount and release hugepages.  Harmless when already down.",
                       epilog="examples:\n  sudo dataplane down --config config/appliance.toml"
                       "\n  sudo dataplane down --forget-journal   # damaged journal: drop it")
    d.add_argument("--forget-journal", action="store_true",
                   help="drop a damaged or foreign journal WITHOUT undoing it (you restore by "
                   "hand what it listed)")
    d.set_defaults(func=cmd_down)


def _add_config_command(sub, common: argparse.ArgumentParser, fmt: type) -> None:
    """config check | show."""
    c = sub.add_parser("config", parents=[common], formatter_class=fmt,
                       help="check a config, or show what it plans",
                       description="check: validate a file and list every problem (exit 2).\n"
                       "show: print the plan: workers, cores, ports, DPDK devargs, generators.",
                       epilog="examples:\n  dataplane config check config/appliance.toml\n  "
                       "dataplane config show\n  dataplane config show my.toml --json")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    ck = csub.add_parser("check", parents=[common], help="validate FILE (or the default)",
                         epilog="examples:\n  dataplane config check my.toml\n  dataplane "
                         "config check               # the embedded default lab",
                         formatter_class=fmt)
    ck.add_argument("file", metavar="FILE", nargs="?", help="default: the embedded default lab")
    sh = csub.add_parser("show", parents=[common], help="print the plan of FILE (or the default)",
                         epilog="examples:\n  dataplane config show\n  dataplane config show "
                         "my.toml --json", formatter_class=fmt)
    sh.add_argument("file", metavar="FILE", nargs="?", help="default: the embedded default lab")
    sh.add_argument("--json", action="store_true", help="the WorkerSpecs as JSON")
    c.set_defaults(func=cmd_config)


def _add_transport_command(sub, common: argparse.ArgumentParser, fmt: type) -> None:
    """transport keygen."""
    t = sub.add_parser("transport", parents=[common], formatter_class=fmt,
                       help="make the pre-shared key a transport link authenticates with",
                       description="keygen: write a new random key (32 bytes, base64) to FILE, "
                       "mode 0600, never over an existing file. Both ends of a link use the "
                       "same key file (key_file in their [[transport]] tables); each proves "
                       "it holds the key before anything crosses the connection.",
                       epilog="example:\n  dataplane transport keygen /etc/dataplane/link.key")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    kg = tsub.add_parser("keygen", parents=[common], help="write a new key to FILE",
                         epilog="example:\n  dataplane transport keygen /etc/dataplane/link.key",
                         formatter_class=fmt)
    kg.add_argument("file", metavar="FILE")
    t.set_defaults(func=cmd_transport)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dataplane.run.notify import JournalFormatter, journal_stream
    level = logging.DEBUG if args.verbose else logging.INFO
    if journal_stream():     # stderr is the journal: its priorities, its timestamps
        handler = logging.StreamHandler()
        handler.setFormatter(JournalFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: "
                            "%(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (config.ConfigError, Usage) as e:
        print(f"dataplane: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return FAILED
    except Exception as e:     # a runtime failure: say what, keep the traceback for -v
        log.error("%s: %s", type(e).__name__, e, exc_info=bool(args.verbose))
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
