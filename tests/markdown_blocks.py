"""The code blocks of the docs, and the ``doc-test`` directives that say how to run them.

Every fenced block names its language. ``sh`` blocks are commands; ``console`` blocks
are transcripts (``$ command`` lines, each followed by the output it prints). Both
are run by tests/test_doc_commands.py unless marked illustrative. A directive is an
HTML comment on the line before the fence (invisible once rendered)::

    <!-- doc-test: illustrative: needs a Docker engine -->   not run; say why
    <!-- doc-test: server -->             runs in the background; waits for /healthz
    <!-- doc-test: background; wait-for "subscribed" -->   runs in the background;
                                          waits until its output shows the text
    <!-- doc-test: expect "\\"id\\"" -->  runs to the end; its output shows the text
    <!-- doc-test: background-output "orders.eu" -->   after it, the latest
                                          background block's output shows the text
    <!-- doc-test: exit 2 -->             the exit status every command must have

Clauses are separated by ``;`` (an illustrative reason is the whole rest of the
comment); texts are JSON strings. A block without a directive
runs in the foreground and must exit 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_GLOBS = ("README.md", "docs/*.md", "deploy/README.md")
SHELL = ("sh", "console")
OTHER_LANGUAGES = ("json", "js", "python", "toml", "html", "text", "yaml")
CLAUSES = ("illustrative", "server", "background", "wait-for", "expect",
           "background-output", "exit")

_FENCE = re.compile(r"^(?P<indent> *)```(?P<language>\S*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!-- doc-test: (?P<body>.*?) -->\s*$")
_CLAUSE = re.compile(r'\s*(?P<name>[a-z-]+)(?::\s*(?P<reason>.*)|\s+(?P<text>"(?:[^"\\]|\\.)*"'
                     r"|\d+))?\s*$")


class DocError(ValueError):
    """A doc whose blocks or directives the test cannot read."""


@dataclass
class Directive:
    illustrative: str | None = None  # the reason
    server: bool = False
    background: bool = False
    wait_for: str | None = None
    expect: list[str] = field(default_factory=list)
    background_output: list[str] = field(default_factory=list)
    exit: int = 0


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, from 1
    language: str
    text: str
    directive: Directive

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def transcript(self) -> list[tuple[str, list[str]]]:
        """A ``console`` block's commands, each with the lines it should print."""
        steps: list[tuple[str, list[str]]] = []
        lines = self.text.splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            if not line.startswith("$ "):
                raise DocError(f"{self.where}: a console block starts each command with '$ '")
            command = line[2:]
            while command.endswith("\\") and index + 1 < len(lines):
                index += 1
                command = command[:-1] + "\n" + lines[index]
            output = []
            index += 1
            while index < len(lines) and not lines[index].startswith("$ "):
                output.append(lines[index])
                index += 1
            steps.append((command, output))
        return steps


def doc_paths() -> list[Path]:
    return sorted(path for pattern in DOC_GLOBS for path in ROOT.glob(pattern))


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order; ``DocError`` for an unclosed one."""
    lines = path.read_text().splitlines()
    found = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, start = opening["indent"], index
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index].removeprefix(indent))
            index += 1
        if index == len(lines):
            raise DocError(f"{path.relative_to(ROOT)}:{start + 1}: the block never closes")
        directive = _directive(path, lines, start)
        found.append(Block(path, start + 1, opening["language"], "\n".join(body) + "\n",
                           directive))
        index += 1
    return found


def _directive(path: Path, lines: list[str], fence: int) -> Directive:
    above = lines[fence - 1] if fence else ""
    found = _DIRECTIVE.match(above)
    directive = Directive()
    if not found:
        return directive
    where = f"{path.relative_to(ROOT)}:{fence}"
    body = found["body"]
    clauses = [body] if body.startswith("illustrative") else body.split(";")
    for clause in clauses:
        parsed = _CLAUSE.fullmatch(clause)
        if not parsed or parsed["name"] not in CLAUSES:
            raise DocError(f"{where}: unknown doc-test clause {clause.strip()!r}; known: "
                           f"{', '.join(CLAUSES)}")
        _apply(directive, parsed["name"], parsed["reason"], parsed["text"], where)
    return directive


def _apply(directive: Directive, name: str, reason: str | None, text: str | None,
           where: str) -> None:
    value = json.loads(text) if text is not None else None
    if name == "illustrative":
        if not reason:
            raise DocError(f"{where}: say why a block is illustrative: "
                           "'illustrative: needs a Docker engine'")
        directive.illustrative = reason
    elif name in ("server", "background"):
        setattr(directive, name, True)
    elif value is None:
        raise DocError(f"{where}: doc-test clause {name} needs a value")
    elif name == "wait-for":
        directive.wait_for = str(value)
    elif name == "exit":
        directive.exit = int(value)
    else:
        getattr(directive, name.replace("-", "_")).append(str(value))
