"""Files and directories root writes (the journal, run.log, lock files, the run directory):
never through a symbolic link, only if they belong to the running user and nobody else may
write them, and written whole.  A directory others may write lets them plant a link where root
is about to write; a link in place of a file makes root write wherever it points.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsafePath(PermissionError):
    """A path root was about to write is a link, someone else's, or writable by others."""


def _problem(st: os.stat_result, want_dir: bool, refused: int = 0o022) -> str:
    """Why a file or directory with this stat is not private to the running user (root's files
    are private to any user: only root may change them); '' when it is.  `refused` are the mode
    bits that disqualify it: group/other write by default, all group/other access for a key."""
    kind = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not kind:
        return "not a directory" if want_dir else "not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not by root or the running user (uid {os.geteuid()})"
    if st.st_mode & refused:
        access = "write" if refused & 0o044 == 0 else "read or write"
        return (f"mode {stat.S_IMODE(st.st_mode):04o}: group or others may {access} it "
                f"(chmod {'go-w' if access == 'write' else 'go='})")
    return ""


def dir_problem(path: Path) -> str:
    """Why a directory is not a safe place for root's files (a symlink, another user's, writable
    by group or other); '' when it is, or when it does not exist yet (made 0700 when needed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link; refusing to follow it"
    return _problem(st, want_dir=True)


def check_private_dir(path: Path, what: str) -> None:
    """Raise UnsafePath when dir_problem() finds one."""
    why = dir_problem(path)
    if why:
        raise UnsafePath(f"{what} {path}: {why}; refusing to write there")


def private_dir(path: Path, what: str) -> Path:
    """The directory, created 0700 if missing, checked as check_private_dir does."""
    check_private_dir(path, what)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(path, what)
    return path


def open_private(path: Path, flags: int, mode: int = 0o600, refused: int = 0o022) -> int:
    """os.open with O_NOFOLLOW and O_CLOEXEC, refusing a file that is not a regular file of the
    running user (or root) or that has any of the `refused` mode bits (by default: others may
    write it): a planted link or file is refused, not used."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:      # O_NOFOLLOW: the last component is a symbolic link
            raise UnsafePath(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    why = _problem(os.fstat(fd), want_dir=False, refused=refused)
    if why:
        os.close(fd)
        raise UnsafePath(f"{path}: {why}; refusing to use it")
    return fd


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a write may be short (a signal, a full disk), and
    a short one raises nothing.  A full disk raises OSError(ENOSPC) on the next write."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
