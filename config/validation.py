"""Checks on a whole ``Settings``: ranges, choices, URLs, patterns, files, and the
settings that must agree with each other.

Each failure is a ``SettingsError`` made by ``bad_value``: one line with the setting,
its value, where the value came from (a flag, a variable, a key of a file, or the
default) and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from config.settings import (
    DEFAULT,
    FIELDS,
    KiB,
    Settings,
    SettingsError,
    allowed,
    bad_value,
    shown_value,
)

# broker URL schemes that server/broker/base.py's create_broker serves
BROKER_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s]+/?")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
QUEUE_HEADROOM = 16 * KiB  # a frame's header and envelope around its event's data


class _Checker:
    """Makes the error of one setting, naming the source of its value."""

    def __init__(self, settings: Settings, sources: Mapping[str, str]) -> None:
        self.settings = settings
        self.sources = sources

    def source(self, name: str) -> str:
        return self.sources.get(name, DEFAULT)

    def fail(self, name: str, problem: str) -> SettingsError:
        return bad_value(name, getattr(self.settings, name), self.source(name), problem)

    def other(self, name: str) -> str:
        """Another setting as a message names it: ``max_event_bytes = 65536 (default)``."""
        source = self.source(name)
        where = source if source == DEFAULT else f"from {source}"
        return f"{name} = {shown_value(getattr(self.settings, name))} ({where})"


def validate(settings: Settings, sources: Mapping[str, str]) -> None:
    """Raise ``SettingsError`` for the first setting that cannot be used."""
    check = _Checker(settings, sources)
    for name, spec in FIELDS.items():
        value = getattr(settings, name)
        low, high = spec.metadata["minimum"], spec.metadata["maximum"]
        choices = spec.metadata["choices"]
        if ((low is not None and value < low) or (high is not None and value > high)
                or (choices is not None and value not in choices)):
            raise check.fail(name, "must be " + allowed(name))
    _check_together(check)
    _check_broker(check)
    _check_auth(check)
    _check_extensions(check)


def _check_together(check: _Checker) -> None:
    settings = check.settings
    need = settings.max_event_bytes + QUEUE_HEADROOM
    if settings.send_queue_bytes < need:
        raise check.fail("send_queue_bytes", f"must hold one largest event: at least "
                         f"max_event_bytes + {QUEUE_HEADROOM} = {need}, with "
                         f"{check.other('max_event_bytes')}")
    if settings.max_pending_bytes < settings.max_frame_bytes:
        raise check.fail("max_pending_bytes", f"must hold one largest frame: at least "
                         f"{check.other('max_frame_bytes')}")
    if settings.ping_interval and settings.ping_timeout > settings.ping_interval:
        raise check.fail("ping_timeout", f"must not exceed {check.other('ping_interval')}")
    if settings.workers > 1 and settings.broker.startswith("memory:"):
        raise check.fail("workers", f"more than 1 needs a shared broker, and "
                         f"{check.other('broker')}: use --broker redis://HOST:6379/0, "
                         "or --workers 1")


def _check_broker(check: _Checker) -> None:
    url = check.settings.broker
    scheme, found, _ = url.partition("://")
    problem = None
    if not found or scheme.lower() not in BROKER_SCHEMES:
        problem = "must be memory://, or a Redis URL: redis://HOST:6379/0, rediss://HOST:6379/0 " \
                  "(TLS) or unix:///PATH/redis.sock, or redis+cluster://HOST:7000,HOST:7001 " \
                  "for Redis Cluster"
    elif scheme.lower() in ("redis", "rediss"):
        problem = _redis_url_problem(url)
    elif scheme.lower().endswith("+cluster"):
        from server.broker.redis_cluster import parse_cluster_url

        try:
            parse_cluster_url(url)
        except ValueError as exc:
            problem = f"is no cluster URL: {exc}"
    if problem:
        raise check.fail("broker", problem)


def _redis_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number 0-65535
    except ValueError:
        return "has a port that is not a number from 0 to 65535; e.g. redis://HOST:6379/0"
    database = parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):  # not "²"
        return "must end in a database number, as in redis://HOST:6379/0"
    return None


def _check_auth(check: _Checker) -> None:
    """Public and presence patterns, origins and the public key file, each named when bad."""
    from server.topics import InvalidTopic, validate_pattern

    settings = check.settings
    for name in ("public_topics", "presence_topics"):
        for pattern in getattr(settings, name):
            try:
                validate_pattern(pattern)
            except InvalidTopic as exc:
                raise check.fail(name, f"must hold topic patterns: {exc}") from None
    for origin in settings.allowed_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise check.fail("allowed_origins", f"must hold * or origins such as "
                             f"https://app.example.com (no path), not {origin[:100]!r}")
    if settings.auth_webhook_url and not _is_http_url(settings.auth_webhook_url):
        raise check.fail("auth_webhook_url", "must be an absolute http:// or https:// URL, "
                         "such as https://backend.example/squall/authorize")
    if settings.jwt_public_key:
        problem = _public_key_problem(settings.jwt_public_key)
        if problem:
            raise check.fail("jwt_public_key", problem)


def _is_http_url(url: str) -> bool:
    if not url.isprintable() or " " in url:  # (urlsplit drops some of these silently)
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # (a bad port, or an unclosed IPv6 bracket)
        return False


def _public_key_problem(path: str) -> str | None:
    from server.auth import load_public_key

    try:
        with open(path, "rb") as handle:
            pem = handle.read(1024 * 1024)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror}"
    try:
        load_public_key(pem)
    except ValueError as exc:
        return f"the file {exc}"
    return None


def _check_extensions(check: _Checker) -> None:
    """Hook module names and webhook tables (importing a hook happens at start)."""
    settings = check.settings
    for module in settings.hooks:
        if not isinstance(module, str) or not _MODULE.fullmatch(module):
            raise check.fail("hooks", "must list module names such as "
                             f"'myapp.squall_hooks', not {str(module)[:100]!r}")
    if settings.webhooks:
        from server.extensions import webhook_endpoints

        webhook_endpoints(settings.webhooks, origin=check.source("webhooks"))

