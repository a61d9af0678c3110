"""`dataplane run --log-file FILE`: the run's stdout and stderr go to FILE, rotated so that it
never grows without bound (`dataplane up` starts its background run with its journal
directory's run.log; under systemd the journal takes the output and no file is kept).

Not logging.handlers.RotatingFileHandler: that rotates log records only, while the run's file
also takes its printed lines (the report, events) and whatever its workers' native libraries
(EAL, libbpf) write to the stderr they inherit.  So the file is put on file descriptors 1 and 2
themselves, and a rotation renames it and puts a new one there (os.dup2): Python's streams and
logging write on, unchanged.  A worker started before a rotation writes on into the renamed
file until it is restarted, which is a few lines.  Files are opened as every file root writes
(dataplane.host.files): never through a link, never someone else's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dataplane.host.files import check_private_dir, open_private

MAX_BYTES = 4 << 20     # run.log, then run.log.1 .. run.log.KEEP: at most 16 MiB in all
KEEP = 3


class LogFile:
    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_BYTES, keep: int = KEEP):
        self.path = Path(path).absolute()
        self.max_bytes = max_bytes
        self.keep = keep
        check_private_dir(self.path.parent, "the run's log directory")
        self._attach()

    def _attach(self) -> None:
        fd = open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for std in (sys.stdout, sys.stderr):
                std.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    def rotate_if_full(self) -> bool:
        """FILE -> FILE.1 -> ... -> FILE.KEEP (the oldest dropped) once FILE reaches max_bytes;
        True when it rotated.  Called once a second by the run's loop."""
        try:
            if os.fstat(1).st_size < self.max_bytes:
                return False
        except OSError:
            return False
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._attach()
        return True
