"""Squall's entry point: ``.venv/bin/python run.py [flags]`` serves; ``--help`` lists
every flag, ``--version`` prints the version.

``.venv/bin/python run.py token --sub alice --subscribe 'chat.*' --ttl 3600`` prints a
JWT for development, signed with the configured ``jwt_secret``;
``run.py token --help`` tells more.

Whatever is wrong with the command line or a setting is one line on stderr, starting
``squall:``, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from config.cli import PROG, Parser
from config.settings import CONFIG_VARIABLE, SettingsError, load_settings, unknown_variables

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["token"]:
            return token_command(args[1:])
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"squall: {exc}", file=sys.stderr)
        return USAGE_ERROR
    for warning in unknown_variables(os.environ):
        print(f"squall: {warning}", file=sys.stderr)
    from server.serve import serve

    return serve(settings)


def token_parser() -> Parser:
    parser = Parser(
        prog=f"{PROG} token", description="Print a JWT for development, signed (HS256) with "
        f"the configured jwt_secret: --jwt-secret, else SQUALL_JWT_SECRET, else the --config "
        f"file (or {CONFIG_VARIABLE}). Patterns use the subscription syntax (chat.*, orders.>).")
    parser.add_argument("--sub", required=True, help="whom the token is for (its sub claim)")
    parser.add_argument("--subscribe", action="append", default=[], metavar="PATTERNS",
                        help="topic patterns it may subscribe to (comma-separated, repeatable)")
    parser.add_argument("--publish", action="append", default=[], metavar="PATTERNS",
                        help="topic patterns it may publish to (comma-separated, repeatable)")
    parser.add_argument("--info", metavar="JSON",
                        help='an object the token carries into presence, join and leave '
                        'frames and webhooks (squall.info), e.g. \'{"name": "Alice"}\'')
    parser.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS",
                        help="seconds until it expires (default: 3600)")
    parser.add_argument("--jwt-secret", metavar="TEXT", help="the HS256 secret")
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    return parser


def token_command(argv: list[str]) -> int:
    """``run.py token``: print a signed token; raises ``SettingsError``."""
    options = token_parser().parse(argv)
    from server.auth import issue_token

    print(issue_token(_secret(options), options.sub, _patterns("--subscribe", options.subscribe),
                      _patterns("--publish", options.publish), _ttl(options.ttl),
                      info=_info(options.info)))
    return 0


def _secret(options: argparse.Namespace) -> str:
    layers = ["--config", options.config] if options.config else []
    if options.jwt_secret:
        layers += ["--jwt-secret", options.jwt_secret]
    secret = load_settings(layers).jwt_secret
    if not secret:
        raise SettingsError("no JWT secret: pass --jwt-secret, set SQUALL_JWT_SECRET or put "
                            f"jwt_secret in the --config file (or {CONFIG_VARIABLE})")
    return secret


def _ttl(ttl: float) -> float:
    import math

    if not (ttl > 0 and math.isfinite(ttl)):
        raise SettingsError(f"--ttl must be a positive number of seconds, not {ttl:g}")
    return ttl


def _info(text: str | None) -> dict[str, object] | None:
    import json

    from server.auth import MAX_INFO_BYTES
    from server.codec import dump_json

    if text is None:
        return None
    problem = SettingsError("--info must be a JSON object, such as '{\"name\": \"Alice\"}'")
    try:
        info = json.loads(text)
    except ValueError:
        raise problem from None
    if not isinstance(info, dict):
        raise problem
    if len(dump_json(info)) > MAX_INFO_BYTES:  # measured as the server measures it
        raise SettingsError(f"--info must be at most {MAX_INFO_BYTES} bytes as JSON")
    return info


def _patterns(flag: str, given: list[str]) -> list[str]:
    from server.topics import InvalidTopic, validate_pattern

    patterns = [part.strip() for text in given for part in text.split(",") if part.strip()]
    try:
        return [validate_pattern(pattern) for pattern in patterns]
    except InvalidTopic as exc:
        raise SettingsError(f"{flag}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
