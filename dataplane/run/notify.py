"""systemd's service protocol, from the run's side: sd_notify(3) readiness, reload, stop and
watchdog messages, and whether stderr is the journal (sd-daemon(3) priority prefixes).

sd_notify is a few lines over an AF_UNIX datagram socket, written here rather than taken from a
library: Debian's python3-systemd is a system package the project's virtualenv does not see,
`sdnotify` on PyPI adds a dependency for the same dozen lines and handles neither the abstract
namespace nor the watchdog variables, and the protocol is stable (one datagram of
NEWLINE-separated KEY=VALUE assignments; NOTIFY_SOCKET is a path, or '@name' for the abstract
namespace).  Without NOTIFY_SOCKET every call is a no-op, so a run outside systemd behaves as
before.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

# priorities of sd-daemon(3) (syslog's) from a logging level up: crit, err, warning, info
PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class Notifier:
    """Messages to the service manager.  Reads NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID
    once and removes them from the environment, as sd_notify's unset_environment does: the
    workers and transports this run starts inherit it, and none of them speaks for the
    service (systemd would take their READY=1 as the run's under NotifyAccess=all)."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address = _address(env.pop("NOTIFY_SOCKET", ""))
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for: another's (a parent that
        # did not unset it) is not ours to feed
        mine = not pid or pid == str(os.getpid())
        self.watchdog = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self.last_ping = 0.0
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of KEY=VALUE lines; False (logged once) if it could not be sent: the
        service manager going away is no reason to stop the dataplane."""
        if self.address is None:
            return False
        msg = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # never blocks: a manager that stopped reading must not stall the run's loop
                s.sendto(msg, socket.MSG_DONTWAIT, self.address)
            self._failed = False       # the next failure is logged again
            return True
        except OSError as e:
            if not self._failed:
                log.warning("sd_notify to %r failed: %s", self.address, e)
                self._failed = True
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd wants MONOTONIC_USEC with RELOADING=1 (CLOCK_MONOTONIC, as it reads it)
        self.send("RELOADING=1", "STATUS=reloading the configuration",
                  f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def next_ping_in(self, now: float) -> float | None:
        """Seconds until the next watchdog ping is due; None without a watchdog."""
        if not self.watchdog or self.address is None:
            return None
        return max(0.0, self.last_ping + self.watchdog / 2 - now)

    def ping(self, healthy: bool, now: float) -> bool:
        """WATCHDOG=1 every WATCHDOG_USEC/2, only while `healthy`: an unhealthy run lets the
        watchdog expire and systemd act on it (Restart=, WatchdogSignal=)."""
        due = self.next_ping_in(now)
        if due is None or due > 0 or not healthy:
            return False
        self.last_ping = now
        return self.send("WATCHDOG=1")


def _address(value: str) -> str | None:
    """NOTIFY_SOCKET as an address for sendto: '@name' is the abstract namespace (a leading
    NUL byte); a path must be absolute; anything else (vsock, a relative path) is ignored."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        log.warning("NOTIFY_SOCKET=%r: not a socket path or abstract name; not notifying",
                    value)
    return None


def journal_stream() -> bool:
    """True when stderr is the journal: JOURNAL_STREAM ("DEV:INODE") names stderr's file.  It
    is inherited, so a process whose stderr was redirected elsewhere (`dataplane up` writes a
    run's output to a file) must not take it at its word."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


class JournalFormatter(logging.Formatter):
    """'<N>name: message': the priority prefix journald reads (SyslogLevelPrefix=), no time
    of our own (the journal stamps each line).  Continuation lines (tracebacks) carry the same
    prefix, so journald does not log them at its default priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for level, p in PRIORITY if record.levelno >= level), 7)   # 7: debug
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])
