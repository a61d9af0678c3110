"""`dataplane capture`: attach to the running dataplane's capture socket
(dataplane.consumers.capture), ask for a worker's port and a BPF filter, and write what comes
back as pcapng (dataplane.run.pcapng), to a file, a ring of files or stdout.

SIGINT and SIGTERM end it cleanly: the request side of the socket is closed, the run flushes
what it queued and sends its books, and the statistics blocks are written before it exits.
This module is imported to build the CLI's parser: numpy and the rest come inside run().
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from dataplane.consumers.capture_wire import (
    MAX_MESSAGE,
    PKTS_HEAD,
    SOCKET,
    message,
    recv_message,
)
from dataplane.host.proc import missing_caps

OK, FAILED, USAGE = 0, 1, 2
STOP_WAIT = 10.0      # after Ctrl-C, for the run's last packets and books


class CaptureError(Exception):
    def __init__(self, msg: str, code: int = FAILED):
        super().__init__(msg)
        self.code = code


def add_command(sub, common: argparse.ArgumentParser, fmt: type) -> None:
    c = sub.add_parser(
        "capture", parents=[common], formatter_class=fmt,
        help="capture packets of the running dataplane to pcapng (root)",
        description="Attach to the running dataplane and write the packets its consumers see "
        "(after its workers received them) as pcapng: nanosecond timestamps, one interface "
        "per worker:port, the drop counts in the statistics at the end. The filter is "
        "tcpdump's syntax, run in C on the shared memory. A capture that cannot keep up drops "
        "packets and counts them; it never slows the workers.",
        epilog="examples:\n  sudo dataplane capture -w rx.pcapng -c 100\n  sudo dataplane "
        "capture --worker rx --port in -f 'udp src port 1025' -w flow.pcapng\n  "
        "sudo dataplane capture -s 96 -C 10 -W 5 -w ring.pcapng")
    c.add_argument("--worker", default="", metavar="W", help="only this worker's rings")
    c.add_argument("--port", default="", metavar="P", help="only rings of this port label")
    c.add_argument("-f", "--filter", default="", metavar="BPF", help="a tcpdump filter")
    c.add_argument("-c", "--count", type=int, default=0, metavar="N",
                   help="stop after N packets")
    c.add_argument("-s", "--snaplen", type=int, default=0, metavar="SNAPLEN",
                   help="keep at most this many bytes of each packet (0: all)")
    c.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S s")
    c.add_argument("-w", "--write", required=True, metavar="FILE",
                   help="pcapng file, or - for stdout")
    c.add_argument("-C", "--file-size", type=float, default=0.0, metavar="MB",
                   help="start a new file when this one would pass MB million bytes")
    c.add_argument("-W", "--files", type=int, default=0, metavar="N",
                   help="with -C: keep a ring of N files (FILE0..), overwriting the oldest")
    c.add_argument("--socket", default=str(SOCKET), help=argparse.SUPPRESS)   # tests
    c.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except CaptureError as e:
        print(f"dataplane capture: {e}", file=sys.stderr)
        return e.code


def _check(args: argparse.Namespace) -> None:
    bad = [f"{flag} {v:g}: expected 0 or more" for flag, v in
           (("-c", args.count), ("-s", args.snaplen), ("--duration", args.duration),
            ("-C", args.file_size), ("-W", args.files)) if v < 0]
    if args.files and not args.file_size:
        bad.append("-W needs -C (the size at which the next file of the ring starts)")
    if args.write == "-" and args.file_size:
        bad.append("-C and -W write files: not with -w -")
    if bad:
        raise CaptureError("; ".join(bad), USAGE)
    if os.geteuid() != 0 or missing_caps(["CAP_NET_ADMIN"]):
        raise CaptureError("it reads every packet of the run: run as root: sudo dataplane "
                           "capture ...", USAGE)


def connect(path: Path, request: dict) -> tuple[socket.socket, list[str]]:
    """Connected, the request accepted: the socket and the interfaces' names."""
    if not path.exists():
        raise CaptureError(f"no dataplane is running (no {path})")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise CaptureError(f"no dataplane is running ({path}: {e.strerror})") from None
    sock.sendall(message(b"CAPT", json.dumps(request).encode()))
    got = recv_message(sock, MAX_MESSAGE)
    if got is None:
        sock.close()
        raise CaptureError(f"the run closed {path} without an answer")
    kind, body = got
    if kind != b"OKAY":
        sock.close()
        why = json.loads(body).get("error", body.decode(errors="replace"))
        raise CaptureError(why, USAGE if kind == b"FAIL" else FAILED)
    return sock, json.loads(body)["interfaces"]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from dataplane.run import pcapng
    _check(args)
    request = {"worker": args.worker, "port": args.port, "filter": args.filter,
               "snaplen": args.snaplen, "count": args.count, "duration": args.duration}
    sock, names = connect(Path(args.socket), request)
    start_ns = time.time_ns()
    ifaces = [pcapng.Interface(n, args.snaplen, args.filter) for n in names]
    out = pcapng.FileRing(args.write, pcapng.header(ifaces), int(args.file_size * 1e6),
                          args.files)
    print(f"capturing on {', '.join(names)} to {args.write}"
          + (f", filter {args.filter!r}" if args.filter else ""), file=sys.stderr, flush=True)
    written = [0] * len(names)

    def stop(_signum: int, _frame: object) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)     # the run ends the capture and sends its books
            sock.settimeout(STOP_WAIT)
        except OSError:
            pass

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    books: dict = {}
    try:
        while True:
            try:
                got = recv_message(sock, MAX_MESSAGE)
            except (TimeoutError, ConnectionError):
                got = None
            if got is None:
                break
            kind, body = got
            if kind == b"DONE":
                books = json.loads(body)
                break
            if kind != b"PKTS":
                continue
            i, n = PKTS_HEAD.unpack_from(body)
            o = PKTS_HEAD.size
            ts = np.frombuffer(body, "<u8", n, o).tolist()
            caplen = np.frombuffer(body, "<u4", n, o + 8 * n)
            orig = np.frombuffer(body, "<u4", n, o + 12 * n).tolist()
            ends = (o + 16 * n + np.cumsum(caplen, dtype=np.int64)).tolist()
            pos = o + 16 * n
            for t, ln, end in zip(ts, orig, ends, strict=True):   # the client's side: pcapng
                out.write(pcapng.packet(i, t, ln, body[pos:end]))  # is one block per packet
                pos = end
            written[i] += n
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()
        _finish(out, books, written, start_ns)
    return OK if books else FAILED


def _finish(out, books: dict, written: list[int], start_ns: int) -> None:
    """The statistics blocks, the files closed, and the summary line."""
    from dataplane.run import pcapng
    end_ns = time.time_ns()
    per = books.get("interfaces") or [{} for _ in written]
    for i, (n, b) in enumerate(zip(written, per, strict=True)):
        dropped = int(b.get("dropped", 0))
        out.write(pcapng.statistics(i, pcapng.Stats(
            start_ns, end_ns, received=int(b.get("seen", 0)),
            ring_drops=int(b.get("ring_full_drops", 0)), accepted=n + dropped,
            dropped=dropped, delivered=n)), rotate=False)
    out.close()
    if not books:
        print("dataplane capture: the run ended the capture without its books (stopped or "
              "gone); the counts below are this side's", file=sys.stderr)
    print(f"{sum(written)} packets captured, {books.get('dropped', 0)} dropped by capture, "
          f"{books.get('not_matching', 0)} not matching"
          + (f", {books['bad']} with a descriptor outside the arena" if books.get("bad") else "")
          + (f" ({books['ended']})" if books.get("ended") else ""), file=sys.stderr)
