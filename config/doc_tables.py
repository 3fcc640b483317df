"""The settings tables of the docs, generated from ``Settings``: ``make docs``.

A doc marks where a table goes, and which settings it lists::

    <!-- settings-table: all -->            every setting, one table per group
    <!-- settings-table: group limits -->   the settings of one group
    <!-- settings-table: api_keys jwt_secret -->   these settings, in this order
    ...generated, overwritten by make docs...
    <!-- /settings-table -->

``python -m config.doc_tables`` rewrites every marked region of ``DOCS`` in place;
``--check`` only reports stale ones (tests/test_doc_tables.py fails on them).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from config.settings import (
    CONFIG_VARIABLE,
    FIELDS,
    GROUPS,
    KiB,
    MiB,
    flag,
    shown_default,
    variable,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md", "deploy/README.md")
COMMAND = "make docs"
_REGION = re.compile(r"(<!-- settings-table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)"
                     r"(<!-- /settings-table -->)", re.DOTALL)
_HEAD = "| setting | flag / environment variable | default | what it is |\n|---|---|---|---|\n"


def doc_paths(root: Path = ROOT) -> list[Path]:
    return sorted(path for pattern in DOCS for path in root.glob(pattern))


def render(text: str, where: str = "") -> str:
    """``text`` with every marked region regenerated; ``ValueError`` for a bad marker."""
    return _REGION.sub(lambda found: found.group(1) + _table(found.group("spec"), where)
                       + found.group(4), text)


def _table(spec: str, where: str) -> str:
    words = spec.split()
    if words == ["all"]:
        return "\n".join(_group_table(group, title, first=index == 0)
                         for index, (group, title) in enumerate(GROUPS.items()))
    if len(words) == 2 and words[0] == "group" and words[1] in GROUPS:
        return _HEAD + "".join(_row(name) for name in _members(words[1])) + "\n"
    unknown = [word for word in words if word not in FIELDS]
    if not words or unknown:
        raise ValueError(f"{where}: settings-table marker {spec!r} names no settings "
                         f"{unknown}: use all, group NAME ({', '.join(GROUPS)}) or names")
    return _HEAD + "".join(_row(name) for name in words) + "\n"


def _group_table(group: str, title: str, first: bool) -> str:
    config = (f"| | `--config FILE` / `{CONFIG_VARIABLE}` | none | a TOML file with any of "
              "these settings |\n") if first else ""
    rows = "".join(_row(name) for name in _members(group))
    return f"**{title}**\n\n{_HEAD}{config}{rows}"


def _members(group: str) -> list[str]:
    return [name for name, spec in FIELDS.items() if spec.metadata["group"] == group]


def _row(name: str) -> str:
    spec = FIELDS[name]
    names = (f"`{flag(name)}` / `{variable(name)}`" if spec.metadata["cli"]
             else "TOML file only")
    return f"| `{name}` | {names} | {_default(name)} | {_cell(_what(name))} |\n"


def _default(name: str) -> str:
    spec = FIELDS[name]
    shown = shown_default(name)
    if spec.metadata["shown"]:
        return shown
    if shown == "none":
        return "none"
    size = _size(spec.default) if name.endswith("_bytes") else ""
    return f"`{shown}`{size}"


def _size(value: object) -> str:
    if not isinstance(value, int) or value < KiB:
        return ""
    return f" ({value // MiB} MiB)" if value % MiB == 0 else f" ({value / KiB:g} KiB)"


def _what(name: str) -> str:
    spec = FIELDS[name]
    choices = spec.metadata["choices"]
    text: str = spec.metadata["help"]
    if choices:
        text += ": " + ", ".join(f"`{choice}`" for choice in choices)
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*")


def stale(root: Path = ROOT) -> list[Path]:
    """The docs whose tables ``make docs`` would change."""
    return [path for path in doc_paths(root)
            if render(text := path.read_text(), str(path)) != text]


def main(argv: Sequence[str]) -> int:
    """Rewrite the tables (or, with ``--check``, list the stale docs and return 1)."""
    if "--check" in argv:
        found = stale()
        for path in found:
            print(f"{path.relative_to(ROOT)}: settings tables are stale; run {COMMAND}")
        return 1 if found else 0
    for path in doc_paths():
        text = path.read_text()
        updated = render(text, str(path))
        if updated != text:
            path.write_text(updated)
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
