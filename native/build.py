"""cffi builds of the native code, one extension per part:

    dataplane._native   the core (arena, ring, parser, generator: core/), the io_uring worker
                        (uring/) and the TCP transport (transport/); needs liburing, never DPDK
    dataplane._dpdk     the DPDK worker (dpdk/); built only when pkg-config finds libdpdk and
                        DATAPLANE_DPDK is not "0"
    dataplane._testing  test producers and a consumer (testing/); built only when
                        DATAPLANE_TESTING=1 (scripts/bootstrap.sh sets it), never shipped

-Wall -Wextra always; -Werror only with DATAPLANE_WERROR=1 (scripts/bootstrap.sh sets it).

_dpdk and _testing include _native's declarations (ffi.include), so a struct made with
dataplane._native's ffi is the same type to them; the core sources they call are compiled into
each of them too (an extension cannot link against another's symbols).

The headers (native/include/) are the only definition of the layout.  The declarations cffi sees
(its cdef) are produced from them here, at build time: each header marks what cffi should see
between the lines `/* cffi: begin */` and `/* cffi: end */`, and `cdef_of` turns that part into
cffi's dialect of C: comments go, every `#define NAME value` becomes `#define NAME ...`,
`_Alignas(...)` and `__attribute__((...))` go, every sized array becomes `[...]` and every struct
ends in `...;`, so the values, offsets, array lengths and sizes all come from the C compiler, not
from this file.  What lies outside the markers (static inline helpers, private prototypes) cffi
never sees.

Run by setuptools at install time (setup.py asks `cffi_modules()` which to build), or by hand:
    python native/build.py        (builds them into the current directory)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
INCLUDE = "native/include"   # relative to the project root: setuptools insists on that

CORE = ["core/arena.c", "core/common.c", "core/parse.c", "core/gen.c", "core/flowkey.c"]
URING = ["uring/uring_sock.c", "uring/uring_worker.c"]
TRANSPORT = ["transport/transport_common.c", "transport/transport_recv.c",
             "transport/transport_send.c"]
DPDK = ["dpdk/dpdk_port.c", "dpdk/dpdk_worker.c", "dpdk/kernel_drops.c", "dpdk/intr_guard.c"]
TESTING = ["testing/ring_bench.c", "testing/transport_produce.c"]
CAPTURE = ["core/capture.c"]   # live capture's BPF filter: _native only, it alone links libpcap

# The headers of dataplane._native's declarations.  _dpdk and _testing include them too: cffi
# checks the included declarations against the compiler in every module that includes them.
NATIVE_HEADERS = ("dp_layout.h", "dp_worker.h", "dp_transport.h")
# -Werror only where the warnings are ours to fix: development and CI builds set
# DATAPLANE_WERROR=1 (scripts/bootstrap.sh does); a user's install on another compiler
# version must not fail on a warning that version added.
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter",
          *(["-Werror"] if os.environ.get("DATAPLANE_WERROR", "") == "1" else [])]

_MARKED = re.compile(r"/\* cffi: begin \*/(.*?)/\* cffi: end \*/", re.S)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(?!\()[ \t]+\S.*$", re.M)
_SIZED_ARRAY = re.compile(r"\[[^\]\s][^\]]*\]")
_STRUCT_END = re.compile(r"(\bstruct\s+\w+\s*\{[^{}]*?)\}", re.S)


def _strip_call(text: str, name: str) -> str:
    """text without every `name(...)`, nested parentheses included."""
    while (i := text.find(name)) >= 0:
        j, depth = text.index("(", i), 0
        for k in range(j, len(text)):
            depth += {"(": 1, ")": -1}.get(text[k], 0)
            if depth == 0:
                break
        text = text[:i] + text[k + 1:]
    return text


def cdef_of(header: str) -> str:
    """What cffi should see of native/include/<header>: its marked part, in cffi's dialect."""
    text = (HERE / "include" / header).read_text()
    parts = _MARKED.findall(text)
    if not parts:
        raise SystemExit(f"native/include/{header}: no /* cffi: begin */ ... /* cffi: end */")
    out = _COMMENT.sub(" ", "\n".join(parts))
    out = _DEFINE.sub(r"#define \1 ...", out)
    out = _strip_call(_strip_call(out, "_Alignas"), "__attribute__")
    out = _SIZED_ARRAY.sub("[...]", out)
    out = _STRUCT_END.sub(r"\1 ...; }", out)
    return f"/* native/include/{header} */\n{out}"


def _includes(*headers: str) -> str:
    return "".join(f'#include "{h}"\n' for h in headers)


def _sources(names: list[str]) -> list[str]:
    return [f"native/{n}" for n in names]   # relative: setuptools insists


def _pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "libdpdk"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pkg-config libdpdk failed ({out.stderr.strip()}): install "
                         "libdpdk-dev (scripts/bootstrap.sh), or build without the DPDK "
                         "worker: DATAPLANE_DPDK=0")
    return out.stdout.split()


def dpdk_wanted() -> bool:
    """Build dataplane._dpdk: libdpdk found by pkg-config, and DATAPLANE_DPDK is not "0"."""
    if os.environ.get("DATAPLANE_DPDK", "") == "0" or shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "libdpdk"]).returncode == 0


def testing_wanted() -> bool:
    """Build dataplane._testing: development and test installs only (DATAPLANE_TESTING=1)."""
    return os.environ.get("DATAPLANE_TESTING", "") == "1"


def native() -> FFI:
    """dataplane._native: core, io_uring worker, TCP transport."""
    ffi = FFI()
    ffi.cdef("\n".join(cdef_of(h) for h in (*NATIVE_HEADERS, "dp_capture.h")))
    ffi.set_source("dataplane._native", _includes(*NATIVE_HEADERS, "dp_capture.h"),
                   sources=_sources(CORE + URING + TRANSPORT + CAPTURE), include_dirs=[INCLUDE],
                   extra_compile_args=CFLAGS, extra_link_args=["-luring", "-lpcap"])
    return ffi


def _on_native(module: str, header: str, sources: list[str], cflags: list[str] | None = None,
               libs: list[str] | None = None) -> FFI:
    """An extension that uses dataplane._native's types: its own declarations from header."""
    ffi = FFI()
    ffi.include(native())
    ffi.cdef(cdef_of(header))
    ffi.set_source(f"dataplane.{module}", _includes(header, *NATIVE_HEADERS),
                   sources=_sources(CORE + sources), include_dirs=[INCLUDE],
                   extra_compile_args=[*(cflags or []), *CFLAGS], extra_link_args=libs or [])
    return ffi


def dpdk() -> FFI:
    """dataplane._dpdk: the DPDK worker, on the core's types."""
    return _on_native("_dpdk", "dp_dpdk.h", DPDK, _pkg_config("--cflags"), _pkg_config("--libs"))


def testing() -> FFI:
    """dataplane._testing: the ring and transport test producers, on the core's types."""
    return _on_native("_testing", "dp_testing.h", TESTING)


def cffi_modules() -> list[str]:
    """setup.py's cffi_modules: the extensions this build makes (see the module docstring)."""
    mods = ["native/build.py:native"]
    if dpdk_wanted():
        mods.append("native/build.py:dpdk")
    if testing_wanted():
        mods.append("native/build.py:testing")
    return mods


if __name__ == "__main__":
    os.chdir(HERE.parent)
    for entry in cffi_modules():
        globals()[entry.rsplit(":", 1)[1]]().compile(tmpdir=".", verbose=True)
