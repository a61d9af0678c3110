"""What this install is, and its shell completion and man page.

`build_info()` is what `dataplane --version` prints and what the dataplane_build_info metric
exports: the package version, the arena layout version the native code was built with
(DP_LAYOUT_VERSION: two processes share an arena only when theirs agree) and whether the DPDK
worker was built (an install built without libdpdk, or with DATAPLANE_DPDK=0, has none).

`dataplane completion bash|zsh` (shtab) and `dataplane man` (argparse-manpage) generate their
output from the parser of the installed command when asked, so they cannot drift from it and no
build step has to import the native extension to make them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dataplane import __version__

SHELLS = ("bash", "zsh")


def build_info() -> dict[str, str]:
    """version, layout, dpdk ("true"/"false"): the labels of dataplane_build_info."""
    # imported here: the parser (and so --help) is built without loading the extension
    from dataplane._native import lib
    from dataplane.config.backends import dpdk_worker_built
    return {"version": __version__, "layout": str(lib.DP_LAYOUT_VERSION),
            "dpdk": "true" if dpdk_worker_built() else "false"}


def version_text() -> str:
    info = build_info()
    dpdk = ("built" if info["dpdk"] == "true" else
            "not built (no libdpdk at build time, or DATAPLANE_DPDK=0): the io_uring backend")
    return f"dataplane {info['version']}\narena layout {info['layout']}\nDPDK worker: {dpdk}"


class VersionAction(argparse.Action):
    """--version: print version_text() and exit 0.  Not argparse's "version" action, whose text
    is computed when the parser is built (every command would load the extension for it)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit()


def _mark_files(parser: argparse.ArgumentParser) -> None:
    """Every argument whose metavar is FILE completes to file names (shtab reads .complete)."""
    import shtab
    for action in parser._actions:           # argparse has no public walk; shtab reads it too
        if action.metavar == "FILE":
            action.complete = shtab.FILE     # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_files(sub)


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` for `shell` (one of SHELLS)."""
    import shtab
    _mark_files(parser)
    return shtab.complete(parser, shell=shell)


def manpage(parser: argparse.ArgumentParser) -> str:
    """The man page (roff, section 1) of `parser`."""
    from argparse_manpage.manpage import Manpage
    page = Manpage(parser)
    page.source = f"dataplane {__version__}"
    page.manual = "dataplane manual"
    page.description = "kernel-bypass network dataplane"
    return str(page)


def add_commands(root: argparse.ArgumentParser, sub: Any, common: argparse.ArgumentParser,
                 fmt: type) -> None:
    """`completion SHELL` and `man`, on the subcommands `sub` of `root` (whose parser they
    print)."""
    c = sub.add_parser("completion", parents=[common], formatter_class=fmt,
                       help="print the shell completion script (bash or zsh)",
                       description="Print a completion script for SHELL, generated from this "
                       "command's parser.",
                       epilog="examples:\n  dataplane completion bash   # > /etc/bash_completion.d/"
                       "dataplane\n  dataplane completion zsh    # > /usr/local/share/zsh/"
                       "site-functions/_dataplane")
    c.add_argument("shell", choices=SHELLS, metavar="SHELL", help=" or ".join(SHELLS))
    c.set_defaults(func=lambda args: _print(completion(root, args.shell)))
    m = sub.add_parser("man", parents=[common], formatter_class=fmt,
                       help="print the man page (roff)",
                       description="Print the manual page, generated from this command's parser.",
                       epilog="examples:\n  dataplane man     # | man -l -   (read it now)\n"
                       "  dataplane man     # > /usr/local/share/man/man1/dataplane.1")
    m.set_defaults(func=lambda args: _print(manpage(root)))


def _print(text: str) -> int:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
