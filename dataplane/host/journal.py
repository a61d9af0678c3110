"""The state journal: every host change is written here, with the value it replaces, before it
is made; `down` (or the next `up` after a crash) undoes the entries newest first.

One JSON file, rewritten whole on every record: written to a temporary file (0600), fsync'd,
renamed over the old one, directory fsync'd.  A crash leaves either the old or the new file,
never half of one.  An entry is recorded *before* its change, so after a SIGKILL the journal may
name a change that never happened; undoing it restores the old value, which is harmless.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1
DEFAULT_DIR = Path("/var/lib/dataplane")


class JournalError(RuntimeError):
    """The journal cannot be trusted: nothing is undone until an operator decides."""


class Journal:
    def __init__(self, directory: Path = DEFAULT_DIR):
        self.dir = Path(directory)
        self.path = self.dir / "journal.json"
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            self.entries = self._load()

    def _load(self) -> list[dict[str, Any]]:
        way_out = (f"inspect {self.path}, put back by hand what it lists, then remove it "
                   "(or run `dataplane down --forget-journal` to drop it without undoing)")
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise JournalError(f"{self.path} is damaged ({e}); {way_out}") from None
        if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
            v = doc.get("version") if isinstance(doc, dict) else None
            raise JournalError(f"{self.path} has journal version {v!r}, this dataplane reads "
                               f"version {JOURNAL_VERSION}; undo it with the dataplane that "
                               f"wrote it, or {way_out}")
        entries = doc.get("entries")
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("kind"), str) for e in entries):
            raise JournalError(f"{self.path}: entries are not a list of changes; {way_out}")
        return entries

    def record(self, entry: dict[str, Any]) -> None:
        """Append an entry and make it durable; call BEFORE making the change it names."""
        self.entries.append(entry)
        self._write()

    def drop_last(self) -> None:
        """Forget the newest entry (after it was undone)."""
        self.entries.pop()
        self._write()

    def _write(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.entries:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.dir)
            return
        data = json.dumps({"version": JOURNAL_VERSION, "entries": self.entries}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".journal-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data.encode())
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(self.dir)

    def forget(self) -> None:
        """Drop the journal without undoing anything (the operator's way out)."""
        self.entries = []
        self.path.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
