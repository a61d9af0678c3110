"""A transport process's control file (struct dp_transport in native/include/dp_layout.h),
mapped: state, stop, error and counters, shared by the process, its run and the scrape.

An existing file is not trusted: opened without following a link, a regular file of the running
user (or root) nobody else may write, exactly one struct long, before it is mapped."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from dataplane._native import ffi, lib
from dataplane.host.files import open_private
from dataplane.shm.layout import (
    RDMA_COUNTERS,
    TRANSPORT_COUNTERS,
    U64,
    WORKER_STATES,
    LayoutError,
    check_layout,
)


def control_path(name: str) -> str:
    """Where a run keeps transport NAME's control file (its receiver arena: without .ctl).
    "dataplane." then the kind: a worker's arena is "dataplane-NAME", and no name has a dot
    (config checks.label), so no worker, transport or receiver arena shares a file."""
    return f"/dev/shm/dataplane.transport.{name}.ctl"


class Control:
    """A transport's control file, mapped: state, stop, error and counters as u64s.  create=True
    makes a new one (0600, O_EXCL); otherwise the file must be one of this build's version."""

    def __init__(self, path: Path, create: bool = False):
        check_layout()
        self.path = Path(path)
        size = ffi.sizeof("struct dp_transport")
        # O_EXCL refuses an existing file or link; open_private a link, a stranger's file, or
        # one others may write
        fd = open_private(self.path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0))
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise LayoutError(f"{self.path}: {os.fstat(fd).st_size} bytes, a version "
                                  f"{lib.DP_TRANSPORT_VERSION} transport control file has {size}")
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.hdr = ffi.cast("struct dp_transport *", ffi.from_buffer(self._mm))
        if create:
            self.hdr.version = lib.DP_TRANSPORT_VERSION
            self.hdr.size = size
            self.hdr.magic = lib.DP_TRANSPORT_MAGIC
        elif self.hdr.magic != lib.DP_TRANSPORT_MAGIC or \
                self.hdr.version != lib.DP_TRANSPORT_VERSION or self.hdr.size != size:
            raise LayoutError(f"{self.path}: not a version {lib.DP_TRANSPORT_VERSION} "
                              "transport control file")
        self.counters = np.ndarray((len(TRANSPORT_COUNTERS),), dtype=U64, buffer=self._mm,
                                   offset=ffi.offsetof("struct dp_transport", "c"))
        # RDMA_COUNTERS then the registration-time buckets (written by
        # dataplane/transport/rdma/process.py)
        self.rdma = np.ndarray((len(RDMA_COUNTERS) + lib.DP_MR_BUCKETS,), dtype=U64,
                               buffer=self._mm, offset=ffi.offsetof("struct dp_transport", "r"))

    def counter(self, name: str) -> int:
        return int(self.counters[TRANSPORT_COUNTERS.index(name)])

    def snapshot(self) -> dict[str, int]:
        c = self.counters.copy()
        return {n: int(c[i]) for i, n in enumerate(TRANSPORT_COUNTERS)}

    def rdma_snapshot(self) -> dict[str, Any]:
        r = self.rdma.copy()
        out: dict[str, Any] = {n: int(r[i]) for i, n in enumerate(RDMA_COUNTERS)}
        out["mr_reg_buckets"] = [int(x) for x in r[len(RDMA_COUNTERS):]]
        return out

    def state(self) -> str:
        return WORKER_STATES.get(self.hdr.state, "unknown")

    def error(self) -> str:
        return ffi.string(self.hdr.error).decode(errors="replace")

    def close(self) -> None:
        self.counters = self.rdma = None  # type: ignore[assignment]
        self.hdr = None
        try:
            self._mm.close()
        except BufferError:
            pass
