"""Settings: defaults < TOML file < ``SQUALL_*`` environment < command-line flags.

Every setting is one field of the frozen ``Settings`` object, and each field is at
once a TOML key (``max_event_bytes``), an environment variable
(``SQUALL_MAX_EVENT_BYTES``) and a flag (``--max-event-bytes``). Values are checked
at start; a bad one raises ``SettingsError`` whose one-line message names the
setting and where the value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.topics import InvalidTopic, validate_pattern

ENV_PREFIX = "SQUALL_"
KiB = 1024
MiB = 1024 * KiB


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line, fit for a user."""


def _setting(default: Any, help: str, *, minimum: float | None = None,
             choices: Sequence[str] | None = None, secret: bool = False,
             cli: bool = True) -> Any:
    metadata = {"help": help, "minimum": minimum, "choices": choices, "secret": secret,
                "cli": cli}
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything a node is configured with. Built by ``load_settings``."""

    # serving
    host: str = _setting("127.0.0.1", "address to listen on")
    trust_proxy_headers: bool = _setting(False, "take the client address from "
                                         "X-Forwarded-For / X-Real-Ip (only behind a proxy)")
    port: int = _setting(8888, "port to listen on", minimum=0)
    broker: str = _setting("memory://", "broker URL: memory:// or redis://host:6379/0")
    workers: int = _setting(1, "processes serving one port (more than 1 needs Redis)",
                            minimum=1)
    node_name: str = _setting("", "this node's name in webhooks and logs (default: host name)")
    log_level: str = _setting("info", "log level",
                              choices=("debug", "info", "warning", "error", "critical"))
    log_format: str = _setting("text", "log format", choices=("text", "json"))
    access_log: bool = _setting(True, "log one line per HTTP request")
    shutdown_timeout: float = _setting(10.0, "seconds a graceful shutdown may take", minimum=0)
    # auth
    api_keys: tuple[str, ...] = _setting((), "API keys with full publish rights (comma-separated)",
                                         secret=True)
    jwt_secret: str = _setting("", "HS256 secret for JWTs", secret=True)
    jwt_public_key: str = _setting("", "file with an RS256/ES256 public key (PEM) for JWTs")
    public_topics: tuple[str, ...] = _setting(
        (), "patterns anonymous clients may subscribe to (comma-separated)")
    allowed_origins: tuple[str, ...] = _setting(
        (), "origins allowed for WebSocket handshakes and CORS; empty: same origin; *: all")
    # limits
    max_event_bytes: int = _setting(64 * KiB, "largest event data, in bytes (413 above)",
                                    minimum=1)
    max_batch_bytes: int = _setting(1 * MiB, "largest batch publish body, in bytes", minimum=1)
    max_batch_events: int = _setting(1000, "most events in one batch publish", minimum=1)
    max_stream_bytes: int = _setting(64 * MiB, "largest streaming batch (application/"
                                     "x-ndjson) body, in bytes", minimum=1)
    max_frame_bytes: int = _setting(128 * KiB, "largest WebSocket message from a client "
                                    "(closed with 1009 above)", minimum=125)
    max_topic_length: int = _setting(255, "longest topic name", minimum=1)
    max_subscriptions: int = _setting(100, "most subscriptions per connection", minimum=1)
    max_bad_frames: int = _setting(20, "bad frames a connection may send before it is "
                                   "closed with 4000", minimum=1)
    max_http_connections: int = _setting(0, "TCP connections (HTTP and WebSocket) this "
                                         "process holds at most; ones waiting for a request "
                                         "make room for new ones (0: as many as the "
                                         "open-file limit allows, less 256)", minimum=0)
    max_http_connections_per_ip: int = _setting(2000, "TCP connections per client address; "
                                                "its ones waiting for a request make room "
                                                "for new ones (0: no limit)", minimum=0)
    header_timeout: float = _setting(20.0, "seconds a client has to send a request's "
                                     "headers; also how long an idle keep-alive "
                                     "connection stays open", minimum=0.1)
    body_timeout: float = _setting(60.0, "seconds a client has to send a request's body",
                                   minimum=0.1)
    max_header_bytes: int = _setting(64 * KiB, "largest request head (request line and "
                                     "headers), in bytes (431 above)", minimum=1024)
    max_connections: int = _setting(20_000, "WebSocket connections this process holds at "
                                    "most; more are closed with 4029 (0: no limit)", minimum=0)
    max_connections_per_ip: int = _setting(1000, "WebSocket connections per client address; "
                                           "more are closed with 4029 (0: no limit)", minimum=0)
    frame_rate: float = _setting(100.0, "frames a second one connection may send on average; "
                                 "more get rate_limited, then a close with 4029 (0: no limit)",
                                 minimum=0)
    frame_burst: int = _setting(200, "frames one connection may send at once above "
                                "frame_rate", minimum=1)
    publish_rate: float = _setting(0.0, "HTTP publishes a second per API key, token "
                                   "subject or address; more get 429 (0: no limit)", minimum=0)
    publish_burst: int = _setting(2000, "HTTP publishes at once above publish_rate", minimum=1)
    publish_rate_clients: int = _setting(100_000, "clients whose HTTP publish rate is "
                                         "tracked at once", minimum=1)
    send_queue_bytes: int = _setting(1 * MiB, "bytes queued for one connection before it "
                                     "is closed as a slow consumer (4008)", minimum=1024)
    write_delay: float = _setting(0.02, "seconds a busy server may hold frames to write "
                                  "many events per send (0: every loop pass)", minimum=0)
    ping_interval: float = _setting(20.0, "seconds between server WebSocket pings (0: none)",
                                    minimum=0)
    ping_timeout: float = _setting(20.0, "seconds to wait for a pong before closing "
                                   "(0: never close)",
                                   minimum=0)
    # history and broker
    history_size: int = _setting(100, "events retained per topic (0: no history)", minimum=0)
    history_ttl: float = _setting(300.0, "seconds events are retained (0: no age limit)",
                                  minimum=0)
    history_max_topics: int = _setting(10_000, "topics retained at most; least recently "
                                       "published go first", minimum=1)
    history_max_bytes: int = _setting(64 * MiB, "bytes of history retained at most",
                                      minimum=1)
    max_replay_events: int = _setting(10_000, "events one history read returns at most; a "
                                      "resume that missed more gets recovered: false",
                                      minimum=1)
    broker_timeout: float = _setting(3.0, "seconds a publish may wait for the broker "
                                     "(503 after)", minimum=0.01)
    dedupe_window: float = _setting(300.0, "seconds an Idempotency-Key is remembered",
                                    minimum=0)
    dedupe_max_keys: int = _setting(100_000, "Idempotency-Keys remembered at most", minimum=0)
    # extension points
    signal_queue: int = _setting(10_000, "async signal receiver calls queued at most "
                                 "(more are dropped and counted)", minimum=1)
    auth_webhook_url: str = _setting("", "URL of the backend that approves connects and "
                                     "subscribes (empty: none)")
    auth_webhook_secret: str = _setting("", "secret signing authorization webhook requests",
                                        secret=True)
    auth_webhook_timeout: float = _setting(2.0, "seconds to wait for the authorization "
                                           "webhook before denying", minimum=0.01)
    hooks: tuple[str, ...] = _setting((), "modules imported at start to connect receivers",
                                      cli=False)
    webhooks: tuple[Mapping[str, Any], ...] = _setting((), "webhook endpoints", cli=False)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.jwt_secret or self.jwt_public_key
                    or self.auth_webhook_url)

    def redacted(self) -> dict[str, Any]:
        """The settings with every secret masked, fit for logs."""
        shown: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            shown[spec.name] = "***" if spec.metadata["secret"] and value else value
        return shown


FIELDS = {spec.name: spec for spec in dataclasses.fields(Settings)}


def load_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None,
                  config_file: str | None = None) -> Settings:
    """Settings from every layer; raises ``SettingsError``."""
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(list(argv)))
    config_file = flags.pop("config") or config_file or environ.get(ENV_PREFIX + "CONFIG")
    raw: dict[str, tuple[Any, str]] = {}
    if config_file:
        raw.update(_from_toml(config_file))
    raw.update(_from_env(environ))
    raw.update({name: (value, f"--{_flag(name)}") for name, value in flags.items()
                if value is not None})
    values = {name: _convert(name, value, source) for name, (value, source) in raw.items()}
    return _validated(Settings(**values))


def build_parser(prog: str = "run.py") -> argparse.ArgumentParser:
    """The serve command's flags: one per setting, defaults shown."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Squall: a realtime event server. Every flag is also a "
        "SQUALL_* environment variable and a key of the --config TOML file.")
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    for name, spec in FIELDS.items():
        if not spec.metadata["cli"]:
            continue
        default = spec.default
        shown = "" if spec.metadata["secret"] else f" (default: {_show(default)})"
        parser.add_argument(f"--{_flag(name)}", dest=name, metavar=_metavar(default),
                            help=spec.metadata["help"] + shown, default=None,
                            choices=spec.metadata["choices"])
    return parser


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _metavar(default: Any) -> str:
    if isinstance(default, bool):
        return "BOOL"
    if isinstance(default, int | float):
        return "N"
    return "LIST" if isinstance(default, tuple) else "TEXT"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value) if value != "" else "none"


def _from_toml(path: str) -> dict[str, tuple[Any, str]]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    found: dict[str, tuple[Any, str]] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise SettingsError(f"unknown setting {key!r} in config file {path}")
        found[name] = (value, f"{key} in {path}")
    return found


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for name, spec in FIELDS.items():
        variable = ENV_PREFIX + name.upper()
        if variable in environ and spec.metadata["cli"]:
            found[name] = (environ[variable], variable)
    return found


def _convert(name: str, value: Any, source: str) -> Any:
    """``value`` as the type of the setting's default, or ``SettingsError``."""
    default = FIELDS[name].default
    try:
        if isinstance(default, tuple):
            return _as_tuple(value)
        if isinstance(default, bool):
            return _as_bool(value)
        if isinstance(default, int):
            return _as_number(value, int)
        if isinstance(default, float):
            return float(_as_number(value, float))
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {value!r}")
        return value
    except ValueError as exc:
        shown = "***" if FIELDS[name].metadata["secret"] else None
        message = str(exc) if shown is None else "has an invalid value"
        raise SettingsError(f"setting {name} (from {source}) {message}") from None


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(value)
    raise ValueError(f"must be a list or comma-separated text, got {value!r}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _as_number(value: Any, kind: type[int] | type[float]) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    if isinstance(value, int | float) and (kind is float or isinstance(value, int)):
        return value
    try:
        return kind(str(value).strip())
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ValueError(f"must be {noun}, got {value!r}") from None


def _validated(settings: Settings) -> Settings:
    for name, spec in FIELDS.items():
        value = getattr(settings, name)
        minimum = spec.metadata["minimum"]
        if minimum is not None and value < minimum:
            raise SettingsError(f"setting {name} must be at least {minimum:g}, got {value}")
        choices = spec.metadata["choices"]
        if choices is not None and value not in choices:
            raise SettingsError(f"setting {name} must be one of {', '.join(choices)}, "
                                f"got {value!r}")
    if settings.port > 65535:
        raise SettingsError(f"setting port must be at most 65535, got {settings.port}")
    if settings.send_queue_bytes < settings.max_event_bytes + 16 * KiB:
        raise SettingsError(f"setting send_queue_bytes ({settings.send_queue_bytes}) must "
                            f"hold one largest event: at least max_event_bytes + 16384")
    if settings.ping_interval and settings.ping_timeout > settings.ping_interval:
        raise SettingsError(f"setting ping_timeout ({settings.ping_timeout:g}) must not exceed "
                            f"ping_interval ({settings.ping_interval:g})")
    if "://" not in settings.broker:
        raise SettingsError(f"setting broker must be a URL such as memory:// or "
                            f"redis://localhost:6379/0, got {settings.broker!r}")
    if settings.workers > 1 and settings.broker.startswith("memory:"):
        raise SettingsError(f"setting workers={settings.workers} needs a shared broker: "
                            "use --broker redis://HOST:6379/0 or --workers 1")
    _check_auth(settings)
    return settings


def _check_auth(settings: Settings) -> None:
    """Public patterns, origins and the public key file, each named when bad."""
    for pattern in settings.public_topics:
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise SettingsError(f"setting public_topics has a bad pattern: {exc}") from None
    for origin in settings.allowed_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise SettingsError(f"setting allowed_origins must hold * or origins such as "
                                f"https://app.example.com, got {origin[:100]!r}")
    if settings.jwt_public_key:
        _check_public_key(settings.jwt_public_key)


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s]+/?")


def _check_public_key(path: str) -> None:
    from server.auth import load_public_key

    try:
        with open(path, "rb") as handle:
            pem = handle.read(1024 * 1024)
    except OSError as exc:
        raise SettingsError(f"setting jwt_public_key: cannot read {path}: "
                            f"{exc.strerror}") from None
    try:
        load_public_key(pem)
    except ValueError as exc:
        raise SettingsError(f"setting jwt_public_key: {path} {exc}") from None
