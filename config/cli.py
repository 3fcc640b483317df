"""The command line: ``run.py [flags]`` serves, ``run.py token [flags]`` prints a JWT.

Every setting that is not TOML-only is a flag, listed by ``--help`` in its group with
its default and, for a setting with choices, the choices. A bad command line is one
line on stderr (``Parser.error`` raises ``SettingsError``), never the usage text.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any, NoReturn

from config.settings import (
    CONFIG_VARIABLE,
    FIELDS,
    GROUPS,
    SettingsError,
    flag,
    shown_default,
)

PROG = "run.py"
USAGE = f"{PROG} [--config FILE] [--FLAG VALUE ...]\n       {PROG} token --sub NAME [...]"
EPILOG = """\
commands:
  token    print a development JWT signed with the configured jwt_secret
           ({prog} token --help)

Every flag is also a SQUALL_* environment variable (--max-event-bytes is
SQUALL_MAX_EVENT_BYTES) and a key of the TOML file given with --config or
{variable} (max_event_bytes). Flags win over the environment, which wins
over the file. A bad value stops the start with one line naming the setting.
In the TOML file only: {toml_only} (docs/hooks.md)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``SettingsError`` line."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(f"{message}; {self.prog} --help lists every flag")

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """Parse ``argv``; an unknown flag is named, with the nearest known one."""
        options, extra = self.parse_known_args(list(argv))
        if extra:
            self.error(self._unknown(extra[0]))
        return options

    def _unknown(self, given: str) -> str:
        if not given.startswith("-"):
            return f"unexpected argument {given!r}: {self.prog} takes flags only"
        name = given.split("=", 1)[0]
        close = difflib.get_close_matches(name, list(self._option_string_actions), n=1,
                                        cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown flag {name}{hint}"


def build_parser(prog: str = PROG) -> Parser:
    """The serve command's flags: one per setting, grouped, defaults shown."""
    from server import __version__

    toml_only = ", ".join(name for name, spec in FIELDS.items() if not spec.metadata["cli"])
    parser = Parser(prog=prog, usage=USAGE, epilog=EPILOG.format(
        prog=prog, variable=CONFIG_VARIABLE, toml_only=toml_only),
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Squall: a realtime event server. Serves with the given "
                    "settings until SIGTERM or SIGINT.")
    parser.add_argument("--version", action="version", version=f"squall {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML settings file (also {CONFIG_VARIABLE})")
    groups = {group: parser.add_argument_group(title.lower())
              for group, title in GROUPS.items()}
    for name, spec in FIELDS.items():
        if spec.metadata["cli"]:
            target = groups.get(spec.metadata["group"], parser)
            target.add_argument(flag(name), dest=name, metavar=_metavar(spec.default),
                                help=flag_help(name), default=None)
    return parser


def flag_help(name: str) -> str:
    """A setting's help as ``--help`` shows it: what, the choices, the default."""
    spec = FIELDS[name]
    text: str = spec.metadata["help"]
    choices = spec.metadata["choices"]
    if choices:
        text += ": " + ", ".join(choices[:-1]) + " or " + choices[-1]
    if spec.metadata["secret"]:
        return text
    return f"{text} (default: {shown_default(name)})".replace("%", "%%")


def _metavar(default: Any) -> str:
    if isinstance(default, bool):
        return "BOOL"
    if isinstance(default, int | float):
        return "N"
    return "LIST" if isinstance(default, tuple) else "TEXT"
