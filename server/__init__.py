"""Squall engine: routing, fan-out, history and brokers. Knows nothing of HTTP handlers."""
