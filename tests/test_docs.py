"""The docs stay true to the code: settings tables, names of flags and variables,
commands in prose, links, and where the protocol is written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from config import doc_tables
from config.cli import build_parser
from config.settings import CONFIG_VARIABLE, FIELDS, SettingsError, load_settings, variable
from run import token_parser
from tests.markdown_blocks import OTHER_LANGUAGES, ROOT, SHELL, blocks, doc_paths
from tests.test_doc_commands import checkout_files

DOCS = doc_paths()
IDS = [str(path.relative_to(ROOT)) for path in DOCS]


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_code_block_names_its_language(doc: Path) -> None:
    for block in blocks(doc):
        assert block.language in (*SHELL, *OTHER_LANGUAGES), (
            f"{block.where}: name the block's language: sh for commands, console for a "
            f"transcript ($ lines), or one of {', '.join(OTHER_LANGUAGES)}")


def test_the_settings_tables_are_made_from_the_settings() -> None:
    stale = [str(path.relative_to(ROOT)) for path in doc_tables.stale()]
    assert not stale, (f"settings tables out of date in {', '.join(stale)}: run "
                       f"`{doc_tables.COMMAND}` and commit the result")


def test_the_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "<!-- settings-table: all -->" in readme
    for name in FIELDS:
        assert f"| `{name}` |" in readme, name


def test_a_table_naming_an_unknown_setting_is_refused() -> None:
    marked = "<!-- settings-table: port prot -->\n<!-- /settings-table -->\n"
    with pytest.raises(ValueError, match="prot"):
        doc_tables.render(marked, "x.md")
    assert "| `port` |" in doc_tables.render(marked.replace(" prot", ""), "x.md")


def test_make_docs_rewrites_a_stale_table(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("Intro\n<!-- settings-table: group auth -->\nold\n<!-- /settings-table -->\n")
    updated = doc_tables.render(doc.read_text())
    assert "old" not in updated and "| `jwt_secret` |" in updated and updated.startswith("Intro")
    assert doc_tables.render(updated) == updated


def _doc_texts() -> list[tuple[Path, str]]:
    extra = [ROOT / "Dockerfile", ROOT / "deploy" / "docker-compose.yml"]
    return [(path, path.read_text()) for path in [*DOCS, *extra]]


def test_every_squall_variable_the_docs_name_exists() -> None:
    known = {variable(name) for name, spec in FIELDS.items() if spec.metadata["cli"]}
    known.add(CONFIG_VARIABLE)
    for path, text in _doc_texts():
        for found in set(re.findall(r"\bSQUALL_[A-Z_]*[A-Z]\b", text)):
            assert found in known, f"{path.relative_to(ROOT)} names {found}, which is no setting"


def _not_run(path: Path, text: str) -> str:
    """``text`` without the blocks tests/test_doc_commands.py runs (and so checks)."""
    if path.suffix != ".md":
        return text
    for block in blocks(path):
        if block.language in SHELL and block.directive.illustrative is None:
            text = text.replace(block.text, "")
    return text


_RUN_PY = re.compile(r"(?<![\w/])run\.py( token)?((?: +--?[a-z][a-z-]*(?:[ =][^\s`|]+)?)+)")


def test_every_flag_given_to_run_py_in_the_docs_exists() -> None:
    """In prose and in blocks that are not run: the others are checked by running."""
    serve = set(build_parser()._option_string_actions)
    token = set(token_parser()._option_string_actions)
    for path, text in _doc_texts():
        for line in _not_run(path, text).splitlines():
            for command in _RUN_PY.findall(line):
                flags = re.findall(r"(?<![\w-])--?[a-z][a-z-]*", command[1])
                allowed = token if command[0] else serve
                unknown = [flag for flag in flags if flag not in allowed]
                assert not unknown, f"{path.relative_to(ROOT)}: {line.strip()}: {unknown}"


# inline `code` that starts like a command someone would paste
_INLINE = re.compile(r"`([^`\n]+)`")
_BARE = re.compile(r"^(python3?|pip3?) +\S+ +\S")  # `python run.py` alone names the program


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_commands_in_prose_work_after_make_run(doc: Path) -> None:
    """A command shown inline (with arguments) names the environment's Python, and its
    flags parse."""
    prose = doc.read_text()
    for block in blocks(doc):
        prose = prose.replace(block.text, "")
    for span in _INLINE.findall(prose):
        assert not _BARE.match(span), (
            f"{doc.relative_to(ROOT)}: `{span}` fails after make run; write "
            "`.venv/bin/python ...` (the README says how to activate .venv once)")
        if span.startswith(".venv/bin/python run.py"):
            _check_flags(doc, span)


def _check_flags(doc: Path, span: str) -> None:
    words = shlex.split(span)[2:]
    try:
        if words[:1] == ["token"]:
            token_parser().parse([*words[1:], "--sub", "docs"] if "--sub" not in words
                                 else words[1:])
        elif "--help" not in words and "--version" not in words:
            load_settings(words, environ={})
    except SettingsError as exc:
        pytest.fail(f"{doc.relative_to(ROOT)}: `{span}`: {exc}")


_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?:#[^)\s]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_links_between_files_resolve(doc: Path) -> None:
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}"


# Owned by others right now: their docstring or comment still names the protocol
# without its docs/ folder, to be fixed with their next change.


def test_the_protocol_is_cited_where_it_is() -> None:
    listed = checkout_files()
    assert "docs/protocol.md" in listed
    for name in listed:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".json", ".js", ".html"):
            continue
        for found in re.finditer(r"[\w./]*protocol\.md", path.read_text()):
            cited = found.group()
            resolved = (path.parent / cited).resolve() if name.startswith("docs/") else None
            assert cited.endswith("docs/protocol.md") or (
                resolved == ROOT / "docs/protocol.md"), (
                f"{name} cites {cited}: the protocol is docs/protocol.md")


# a setting named in prose, then its default: "`signal_queue`, default 10,000",
# "`--history-size` events (default 100)", "`SQUALL_SHUTDOWN_TIMEOUT` seconds (10 by default"
_PROSE_DEFAULT = re.compile(
    r"(?:`(?P<key>[a-z][a-z_]+)`|`?--(?P<flag>[a-z][a-z-]+)`?|`?SQUALL_(?P<env>[A-Z_]+)`?)"
    r"[^.`;]{0,40}?(?:default:?\s+(?P<first>\d[\d,.]*)|(?P<then>\d[\d,.]*) by default)")


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_defaults_given_in_prose_are_the_settings_defaults(doc: Path) -> None:
    """Tables are generated; a default repeated in a sentence is checked here."""
    for found in _PROSE_DEFAULT.finditer(_not_run(doc, doc.read_text())):
        name = found["key"] or (found["flag"] or "").replace("-", "_") or (
            found["env"] or "").lower()
        if name not in FIELDS:
            continue
        given = (found["first"] or found["then"]).rstrip(".,").replace(",", "")
        default = FIELDS[name].default
        assert float(given) == float(default), (
            f"{doc.relative_to(ROOT)}: {found.group()!r}, but {name} defaults to {default}")
