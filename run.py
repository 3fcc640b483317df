"""Squall's entry point: ``python run.py [flags]`` serves; ``--help`` lists every flag."""

from __future__ import annotations

import sys

from config.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"squall: {exc}", file=sys.stderr)
        return 2
    from server.serve import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
