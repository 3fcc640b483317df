"""Squall's entry point: ``python run.py [flags]`` serves; ``--help`` lists every flag.

``python run.py token --sub alice --subscribe 'chat.*' --publish 'chat.*' --ttl 3600``
prints a JWT for development, signed with the configured ``jwt_secret``;
``python run.py token --help`` tells more.
"""

from __future__ import annotations

import argparse
import sys

from config.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["token"]:
        return token_command(args[1:])
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"squall: {exc}", file=sys.stderr)
        return 2
    from server.serve import serve

    return serve(settings)


def token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py token", description="Print a JWT for development, signed (HS256) with "
        "the configured jwt_secret: --jwt-secret, else SQUALL_JWT_SECRET, else the --config "
        "file. Patterns use the subscription syntax (chat.*, orders.>).")
    parser.add_argument("--sub", required=True, help="whom the token is for (its sub claim)")
    parser.add_argument("--subscribe", action="append", default=[], metavar="PATTERNS",
                        help="topic patterns it may subscribe to (comma-separated, repeatable)")
    parser.add_argument("--publish", action="append", default=[], metavar="PATTERNS",
                        help="topic patterns it may publish to (comma-separated, repeatable)")
    parser.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS",
                        help="seconds until it expires (default: 3600)")
    parser.add_argument("--jwt-secret", metavar="TEXT", help="the HS256 secret")
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    return parser


def token_command(argv: list[str]) -> int:
    """``run.py token``: print a signed token, or explain on stderr and return 2."""
    options = token_parser().parse_args(argv)
    layers = ["--config", options.config] if options.config else []
    if options.jwt_secret:
        layers += ["--jwt-secret", options.jwt_secret]
    try:
        secret = load_settings(layers).jwt_secret
        subscribe = _patterns("--subscribe", options.subscribe)
        publish = _patterns("--publish", options.publish)
        if not secret:
            raise SettingsError("no JWT secret: pass --jwt-secret, set SQUALL_JWT_SECRET or "
                                "put jwt_secret in the --config file")
        if not options.ttl > 0:
            raise SettingsError("--ttl must be a positive number of seconds")
    except SettingsError as exc:
        print(f"squall: {exc}", file=sys.stderr)
        return 2
    from server.auth import issue_token

    print(issue_token(secret, options.sub, subscribe, publish, options.ttl))
    return 0


def _patterns(flag: str, given: list[str]) -> list[str]:
    from server.topics import InvalidTopic, validate_pattern

    patterns = [part.strip() for text in given for part in text.split(",") if part.strip()]
    try:
        return [validate_pattern(pattern) for pattern in patterns]
    except InvalidTopic as exc:
        raise SettingsError(f"{flag}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
