"""Every ``phyllome ...`` example in README.md, docs/*.md and the CLI's module docstrings is
one the real command accepts: its subcommands and flags exist (parsed by the argparse parser
of cli/main.py), and the image ids it names exist in the catalogue (built-in images, or
osinfo-db where this machine has it), pulled with ``--allow-unverified`` where the image
has no published sha256.

Commands in code blocks must parse whole; a command quoted in prose (`` `phyllome images
pull` ``) may leave out its positional arguments, nothing else.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from cli.main import parser
from services.catalogue.sources import builtin, osinfo
from shared.messages.catalogue import CatalogueEntry

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI_MODULES = sorted((REPO / "cli").glob("*.py"))
OSINFO_DIR = Path("/usr/share/osinfo")
INLINE = re.compile(r"`(phyllome [^`]+)`")
SEPARATORS = {";", "&&", "||", "|"}


def commands_in_shell(text: str) -> list[list[str]]:
    """The ``phyllome`` commands of a shell snippet: continuations joined, comments, prompts
    and ``VAR=value`` prefixes dropped, ``;``/``&&``/``|`` lists split. An indented line is
    not a command (a diagram's label, a continued line)."""
    lines = [line for line in text.replace("\\\n", " ").splitlines() if not line[:1].isspace()]
    if any(line.startswith("$ ") for line in lines):  # a transcript: only prompts are input
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    out = []
    for line in lines:
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        command: list[str] = []
        for token in [*lex, ";"]:
            if token in SEPARATORS:
                while command and re.match(r"^[A-Z_]+=", command[0]):
                    command.pop(0)
                if command[:1] == ["phyllome"]:
                    out.append(command[1:])
                command = []
            else:
                command.append(token)
    return out


def examples() -> list[tuple[str, list[str], bool]]:
    """(where, argv, whole) of every example; ``whole``: from a code block, so complete."""
    found = []
    for path in DOCS:
        block: list[str] | None = None
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.lstrip().startswith("```"):
                if block is None:
                    block, start = [], n
                else:
                    found += [(f"{path.name}:{start}", argv, True)
                              for argv in commands_in_shell("\n".join(block))]
                    block = None
            elif block is not None:
                block.append(line)
            else:
                for quoted in INLINE.findall(line):
                    words = quoted.replace("[", "").replace("]", "")
                    found += [(f"{path.name}:{n}", argv, False)
                              for argv in commands_in_shell(words)]
    for path in CLI_MODULES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for n, line in enumerate(doc.splitlines(), start=1):
            if line.strip().startswith("phyllome "):  # [--flag]: optional, as in a synopsis
                words = line.strip().replace("[", "").replace("]", "")
                found += [(f"cli/{path.name}:{n}", argv, True)
                          for argv in commands_in_shell(words)]
    return found


EXAMPLES = examples()


def parse(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """The parsed arguments, or None and argparse's complaint."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser(argv).parse_args(argv), ""
        except SystemExit:
            return None, err.getvalue().strip().splitlines()[-1]


@cache
def catalogue() -> dict[str, CatalogueEntry]:
    """The image ids a fresh host's catalogue lists without any configured source."""
    entries = builtin.entries("/nonexistent")
    if OSINFO_DIR.is_dir():
        entries += osinfo.load(OSINFO_DIR)
    return {e.id: e for e in entries}


def test_the_docs_have_examples() -> None:
    where = {w.split(":")[0] for w, _, _ in EXAMPLES}
    assert {"README.md", "cluster.md", "deploy.md", "cli/vm.py", "cli/jobs.py"} <= {
        w.removeprefix("docs/") for w in where}
    assert sum(whole for _, _, whole in EXAMPLES) >= 30


@pytest.mark.parametrize("where, argv, whole", EXAMPLES,
                         ids=[f"{w} {' '.join(a)}" for w, a, _ in EXAMPLES])
def test_example_parses(where: str, argv: list[str], whole: bool) -> None:
    args, complaint = parse(argv)
    if args is None and not whole:  # prose may name a command without its arguments
        assert "the following arguments are required" in complaint, (where, complaint)
        return
    assert args is not None, f"{where}: `phyllome {' '.join(argv)}`: {complaint}"
    assert getattr(args, "func", None), f"{where}: `phyllome {' '.join(argv)}` does nothing"
    image = (getattr(args, "id", None) if argv[:1] == ["images"] and len(argv) > 1
             and argv[1] in ("pull", "info") else getattr(args, "image", None))
    if not image or image.isupper():  # none, or a placeholder such as ID
        return
    if image not in catalogue() and not OSINFO_DIR.is_dir():
        pytest.skip(f"{image}: no osinfo-db here to check it against")
    entry = catalogue().get(image)
    assert entry is not None, f"{where}: no image {image!r} in the built-in set or osinfo-db"
    if argv[:2] == ["images", "pull"] and entry.source != builtin.SOURCE:
        assert entry.downloads or any(m.url for m in entry.media), \
            f"{where}: {image} has no downloadable disk image nor install media"
        unverified = not any(d.sha256 for d in entry.downloads)
        assert not unverified or args.allow_unverified, (
            f"{where}: {image} has no published sha256: the example needs --allow-unverified")


@pytest.mark.parametrize("argv, why", [
    (["vm", "job", "cancel", "x"], "invalid choice: 'job'"),
    (["images", "pull", "x", "--verify"], "unrecognized arguments: --verify"),
])
def test_a_wrong_example_is_caught(argv: list[str], why: str) -> None:
    args, complaint = parse(argv)
    assert args is None and why in complaint


def test_shell_snippets_are_split_into_commands() -> None:
    assert commands_in_shell(
        "$ phyllome vm start web; phyllome vm info web --json  # a comment\n"
        "output line\n"
        "$ PHYLLOME_HOST=a phyllome up --detach \\\n    --replicas 3 | tee log && ls") == [
        ["vm", "start", "web"], ["vm", "info", "web", "--json"],
        ["up", "--detach", "--replicas", "3"]]
