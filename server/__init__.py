"""Squall engine: routing, fan-out, history and brokers. Knows nothing of HTTP handlers."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
