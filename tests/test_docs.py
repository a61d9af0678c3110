"""The documentation's examples run here, so they cannot drift from the code.

What the docs show, and how it is checked (docs/testing.md says the same for readers):
  - every `dataplane ...` command in the fenced `sh` and `console` blocks of README.md, docs/ and
    perf/README-perf.md, and in the CLI's own --help examples, parses with the CLI's parser;
  - `console` blocks run: each `$ dataplane ...` line goes through the venv's `dataplane` in a
    scratch directory (where the block's `toml` files, those whose first line is `# NAME.toml`,
    are written, and `config` points at the repository's), and every output line shown must be
    in what it prints.  `console lab` blocks were taken on the lab machine with root and a host
    to change: they are only parsed.  `console exit=N` expects exit status N (default 0);
  - the other `toml` blocks of the docs, and the TOML examples in the modules' docstrings, load
    through the config loader on top of the default config;
  - docs/testing.md names every test module; the scripts the docs run exist, and each perf/
    script's --help knows the flags shown;
  - every dataplane_* metric the docs name is one the code exports;
  - internal links and the repository paths the docs name exist, and docs/design.md's
    rooms name every module and native folder there is; comments cite
    docs/design.md's invariants by the numbers it has, and nothing outside the repository;
  - the modules' doctest examples run.
No root, no lab, no guest: a few seconds.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "perf/README-perf.md"]
DATAPLANE = Path(sys.executable).parent / "dataplane"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.M | re.S)


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    tags: list[str]
    text: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(lang: str | None = None) -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            info = m.group(1).split()
            b = Block(doc, text.count("\n", 0, m.start()) + 1, info[0] if info else "",
                      info[1:], m.group(2))
            if lang is None or b.lang == lang:
                found.append(b)
    return found


def commands(block: Block) -> list[list[str]]:
    """The command lines of an sh or console block, as argv lists, comments dropped."""
    out = []
    for line in block.text.splitlines():
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def dataplane_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `dataplane` (with or without sudo), or None for another command."""
    if argv[:1] == ["sudo"]:
        argv = argv[1:]
    if argv and Path(argv[0]).name == "dataplane":
        return argv[1:]
    return None


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for b in blocks():
        if b.lang in ("sh", "console"):
            for argv in commands(b):
                args = dataplane_argv(argv)
                if args is not None:
                    found.append((str(b), args))
    return found


def cli_example_commands() -> list[tuple[str, list[str]]]:
    """The `examples:` lines of `dataplane --help` and of every subcommand's --help."""
    import argparse

    from dataplane.cli import build_parser

    found = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for line in (parser.epilog or "").splitlines():
            argv = shlex.split(line.strip(), comments=True) if line.strip() else []
            args = dataplane_argv(argv) if argv else None
            if args is not None:
                found.append((where, args))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")

    walk(build_parser(), "dataplane --help")
    return found


def test_the_docs_have_examples() -> None:
    # A parser that finds nothing would make every test below pass vacuously.
    assert len(doc_commands()) >= 10
    assert len([b for b in blocks("console") if "lab" not in b.tags]) >= 3
    assert len(blocks("toml")) >= 4
    assert len(cli_example_commands()) >= 10


@pytest.mark.parametrize("where,args", doc_commands() + cli_example_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_command_parses(where: str, args: list[str]) -> None:
    from dataplane.cli import build_parser

    if "--help" in args or "-h" in args:
        return  # run for real in test_help_runs
    try:
        build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `dataplane {shlex.join(args)}` does not parse (exit {e.code})")


def test_help_runs() -> None:
    for args in (["--help"], *([c, "--help"] for c in
                               ("run", "lab", "status", "plan", "up", "down", "config"))):
        r = subprocess.run([str(DATAPLANE), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout.startswith("usage: dataplane"), args


def _console_cases() -> list[Block]:
    return [b for b in blocks("console") if "lab" not in b.tags]


@pytest.mark.parametrize("block", _console_cases(), ids=str)
def test_console_block_runs(block: Block, tmp_path: Path) -> None:
    for b in blocks("toml"):
        first = b.text.splitlines()[0] if b.text else ""
        if b.doc == block.doc and re.fullmatch(r"# [\w.-]+\.toml", first):
            (tmp_path / first[2:]).write_text(b.text)
    (tmp_path / "config").symlink_to(ROOT / "config")
    want_rc = next((int(t[5:]) for t in block.tags if t.startswith("exit=")), 0)
    env = dict(os.environ, COLUMNS="100")
    steps = re.split(r"^\$ ", block.text, flags=re.M)[1:]
    assert steps, f"{block}: no `$ ` command in a console block"
    for step in steps:
        cmd, _, shown = step.partition("\n")
        argv = shlex.split(cmd, comments=True)
        args = dataplane_argv(argv)
        assert args is not None and argv[0] != "sudo", \
            f"{block}: `{cmd}` needs root or is not dataplane: mark the block `console lab`"
        r = subprocess.run([str(DATAPLANE), *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, env=env)
        printed = [line.strip() for line in (r.stdout + r.stderr).splitlines()]
        assert r.returncode == want_rc, f"{block}: `{cmd}` exited {r.returncode}\n{r.stderr}"
        for line in shown.splitlines():
            if line.strip():
                assert any(line.strip() in p for p in printed), \
                    f"{block}: `{cmd}` no longer prints {line.strip()!r}; it printed:\n" + \
                    "\n".join(printed)


def _base_config(fragment: str) -> str:
    """The default config to put a fragment on: without its [[worker]] tables when the fragment
    brings its own (the default's would clash by name)."""
    text = (ROOT / "config/default.toml").read_text()
    if re.search(r"^\[\[worker\]\]", fragment, re.M):
        text = text[:re.search(r"^\[\[worker\]\]", text, re.M).start()]
    return text


def _docstring_toml() -> list[tuple[str, str]]:
    """Indented TOML examples in the modules' docstrings: blocks of lines that start at one
    indentation with a config table ([[worker]], [[transport]], [[consumer]], [host])."""
    found = []
    for path in sorted((ROOT / "dataplane").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"^( +)(\[\[worker\]\]|\[\[transport\]\]|\[\[consumer\]\]|\[host\])\n"
                             r"((?:\1.*\n|\n(?=\1))*)", text, re.M):
            indent = m.group(1)
            body = m.group(2) + "\n" + m.group(3)
            lines = [ln[len(indent):] if ln.startswith(indent) else ln for ln in body.splitlines()]
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            found.append((where, "\n".join(lines) + "\n"))
    return found


def _toml_cases() -> list[tuple[str, str]]:
    cases = [(str(b), b.text) for b in blocks("toml")
             if not re.match(r"# [\w.-]+\.toml\n", b.text)]
    return cases + _docstring_toml()


@pytest.mark.parametrize("where,fragment", _toml_cases(), ids=lambda v: v.split("\n")[0])
def test_toml_example_loads(where: str, fragment: str) -> None:
    from dataplane import config

    try:
        config.loads(_base_config(fragment) + "\n" + fragment, source=where)
    except config.ConfigError as e:
        pytest.fail(f"{where}: the example no longer loads:\n{e}")


def test_readme_quick_start_is_what_ci_runs() -> None:
    quick = next(b for b in blocks("sh") if b.doc.name == "README.md")
    argvs = commands(quick)
    assert ["./scripts/run", "--duration", "10"] in argvs
    assert ["./scripts/test"] in argvs


def test_scripts_and_perf_flags_exist() -> None:
    checked = 0
    for b in blocks():
        if b.lang not in ("sh", "console"):
            continue
        for argv in commands(b):
            argv = argv[1:] if argv[:1] == ["sudo"] else argv
            if argv[:1] == ["sh"]:
                argv = argv[1:]
            script = next((a for a in argv if a.startswith(("./scripts/", "scripts/", "perf/"))),
                          None)
            if script is None:
                continue
            path = ROOT / script
            assert path.is_file(), f"{b}: {script} does not exist"
            checked += 1
            flags = [a.split("=")[0] for a in argv if a.startswith("--")]
            if script.startswith("perf/") and flags:
                r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                                   text=True, timeout=60, cwd=ROOT)
                assert r.returncode == 0, f"{b}: {script} --help failed:\n{r.stderr}"
                for flag in flags:
                    assert flag in r.stdout, f"{b}: {script} has no {flag}"
    assert checked >= 8


def test_metrics_named_in_docs_are_exported() -> None:
    # the examples export theirs too (examples/consumers: docs/consumers.md)
    source = "\n".join(p.read_text() for d in ("dataplane", "examples")
                       for p in (ROOT / d).rglob("*.py"))
    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"\bdataplane_[a-z0-9_]*[a-z0-9]\b", doc.read_text()))
    assert len(named) > 50
    missing = []
    for name in sorted(named):
        stems = {name} | {name.removesuffix(s) for s in ("_total", "_bucket", "_count", "_sum")}
        if not any(f'"{stem}"' in source for stem in stems):
            missing.append(name)
    assert not missing, f"named in the docs, exported nowhere: {missing}"


def test_links_resolve() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: link {target}"


def test_paths_named_in_docs_exist() -> None:
    # `native/include/dp_layout.h`, `dataplane/shm/`...: a file moved without its docs fails here.
    named = re.compile(r"`((?:dataplane|native|perf|config|scripts|tests|docs)/[\w./-]*)`")
    for doc in DOCS:
        for path in named.findall(doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.relative_to(ROOT)}: {path} does not exist"


def test_design_rooms_match_the_tree() -> None:
    # docs/design.md's table of rooms names every module of each room and every native folder;
    # a module added, moved or removed without its line there fails here.
    rows = dict(re.findall(r"^\| `((?:dataplane|native)/[\w/]*)` \| (.*) \|$",
                           (ROOT / "docs/design.md").read_text(), re.M))
    rooms = sorted(p for p in (ROOT / "dataplane").iterdir() if (p / "__init__.py").exists())
    assert rooms and len(rows) > len(rooms)
    for room in rooms:
        row = rows.get(f"dataplane/{room.name}/")
        assert row is not None, f"docs/design.md has no row for dataplane/{room.name}/"
        named = set(re.findall(r"`([\w/]+\.py)`", row))
        have = {str(m.relative_to(room)) for m in room.rglob("*.py") if m.name != "__init__.py"}
        bare = {m.rsplit("/", 1)[-1] for m in have}
        assert named <= have | bare, f"dataplane/{room.name}/: no such module {named - have - bare}"
        assert bare <= named, f"docs/design.md, dataplane/{room.name}/: add {bare - named}"
    native = rows["native/"]
    folders = {p.name for p in (ROOT / "native").iterdir() if p.is_dir() and p.name[0] != "_"}
    named = set(re.findall(r"`(\w+)/`", native))
    assert named == folders, f"docs/design.md, native/: names {named}, the tree has {folders}"


def test_testing_doc_names_every_suite() -> None:
    text = (ROOT / "docs/testing.md").read_text()
    missing = [t.name for t in sorted((ROOT / "tests").glob("test_*.py")) if t.name not in text]
    assert not missing, f"docs/testing.md does not say what these need: {missing}"


def test_comments_cite_only_the_repository() -> None:
    design = (ROOT / "docs/design.md").read_text()
    numbers = {int(n) for n in re.findall(r"^(\d+)\. \*\*", design, re.M)}
    assert numbers == set(range(1, len(numbers) + 1)) and len(numbers) >= 7
    outside = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared")
    cited = re.compile(r"[Ii]nvariants? (\d+)")
    for top in ("dataplane", "native", "tests", "perf", "scripts", "docs"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in (".py", ".c", ".h", ".md", "") or not path.is_file():
                continue
            if path == Path(__file__).resolve():
                continue
            text = path.read_text(errors="replace")
            assert not outside.search(text), f"{path.relative_to(ROOT)} cites outside the repo"
            for n in cited.findall(text):
                assert int(n) in numbers, f"{path.relative_to(ROOT)}: invariant {n} is not in" \
                                          " docs/design.md"


def _doctest_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "dataplane").rglob("*.py")):
        if ">>>" in path.read_text():
            rel = path.relative_to(ROOT).with_suffix("")
            names.append(".".join(p for p in rel.parts if p != "__init__"))
    return names


@pytest.mark.parametrize("name", _doctest_modules())
def test_module_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: no example ran"
    assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed"
