"""The state journal: every host change is written here, with the value it replaces, before it
is made; `down` (or the next `up` after a crash) undoes the entries newest first.

One JSON file, rewritten whole on every record: written to a new temporary file in the same
directory (0600, O_EXCL|O_NOFOLLOW, every byte: a short write is continued), fsync'd, renamed
over the old one, directory fsync'd.  A crash leaves either the old or the new file, never half
of one; a failed write (ENOSPC) removes the temporary file, keeps the old journal, and raises,
so the change that wanted to be journaled is not made and `down` can still undo the others.  An
entry is recorded *before* its change, so after a SIGKILL the journal may name a change that
never happened; undoing it restores the old value, which is harmless.

The directory holds what root will undo: it must be root's own (the running user's), not a
symbolic link, and not writable by group or other (dataplane.host.files).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from dataplane.host.files import UnsafePath, check_private_dir, open_private, private_dir, write_all

JOURNAL_VERSION = 1
DEFAULT_DIR = Path("/var/lib/dataplane")


class JournalError(RuntimeError):
    """The journal cannot be trusted: nothing is undone until an operator decides."""


class Journal:
    def __init__(self, directory: Path = DEFAULT_DIR):
        self.dir = Path(directory)
        self.path = self.dir / "journal.json"
        self.entries: list[dict[str, Any]] = []
        try:
            check_private_dir(self.dir, "journal_dir")
        except UnsafePath as e:
            raise JournalError(str(e)) from None
        if os.path.lexists(self.path):       # a dangling link too: _load refuses it
            self.entries = self._load()

    def _load(self) -> list[dict[str, Any]]:
        way_out = (f"inspect {self.path}, put back by hand what it lists, then remove it "
                   "(or run `dataplane down --forget-journal` to drop it without undoing)")
        try:
            fd = open_private(self.path, os.O_RDONLY)      # a link here is refused, not read
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read())
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
        """Append an entry and make it durable; call BEFORE making the change it names.  When it
        cannot be written (JournalError), the entry is not recorded: do not make the change."""
        self._write([*self.entries, entry])
        self.entries.append(entry)

    def drop_last(self) -> None:
        """Forget the newest entry (after it was undone)."""
        self._write(self.entries[:-1])
        self.entries.pop()

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Replace the journal by one of `entries`, whole, or leave it as it was and raise."""
        try:
            private_dir(self.dir, "journal_dir")
            if not entries:
                self.path.unlink(missing_ok=True)
            else:
                self._replace(json.dumps({"version": JOURNAL_VERSION, "entries": entries},
                                         indent=1).encode())
            _fsync_dir(self.dir)
        except OSError as e:
            raise JournalError(f"cannot write the journal {self.path} ({e}); it still holds "
                               "the last change that was made, and nothing more was changed"
                               ) from None

    def _replace(self, data: bytes) -> None:
        # a name of our own (O_EXCL): a file or link planted in the directory is never written
        tmp = self.dir / f".journal-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def forget(self) -> None:
        """Drop the journal without undoing anything (the operator's way out)."""
        self.entries = []
        self.path.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
