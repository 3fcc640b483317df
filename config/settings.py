"""Settings: defaults < TOML file < ``SQUALL_*`` environment < command-line flags.

Every setting is one field of the frozen ``Settings`` object, and each field is at
once a TOML key (``max_event_bytes``), an environment variable
(``SQUALL_MAX_EVENT_BYTES``) and a flag (``--max-event-bytes``); a few (``hooks``,
``webhooks``) are TOML keys only. Values are checked at start; a bad one raises
``SettingsError``, whose message is one line: the setting, the value, where it came
from and what is allowed.

The help of each field is the one text ``--help``, the settings tables in the docs
(``make docs``, config/doc_tables.py) and the error messages draw on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "SQUALL_"
CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"
KiB = 1024
MiB = 1024 * KiB

# group -> its title in --help and in the docs' tables, in the order shown
GROUPS = {
    "serving": "Serving",
    "auth": "Auth",
    "limits": "Limits",
    "history": "History and broker",
    "presence": "Presence and topic lifecycle",
    "extensions": "Extension points",
}


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line, fit for a user."""


def _setting(default: Any, help: str, *, group: str | None = None,
             minimum: float | None = None, maximum: float | None = None,
             choices: Sequence[str] | None = None, secret: bool = False, cli: bool = True,
             shown: str | None = None) -> Any:
    """A field of ``Settings``. ``group``: one of ``GROUPS``; ``shown``: how the docs
    show the default, when its value would say less (an empty name: the host name)."""
    metadata = {"help": help, "group": group, "minimum": minimum, "maximum": maximum,
                "choices": choices, "secret": secret, "cli": cli, "shown": shown}
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything a node is configured with. Built by ``load_settings``."""

    host: str = _setting("127.0.0.1", "address to listen on", group="serving")
    trust_proxy_headers: bool = _setting(False, "take the client address from "
                                         "X-Forwarded-For / X-Real-Ip (only behind a proxy)",
                                         group="serving")
    port: int = _setting(8888, "port to listen on (0: any free port)", group="serving",
                         minimum=0, maximum=65535)
    tcp_port: int = _setting(0, "port of the TCP line protocol, on --host (0: off)",
                             group="serving", minimum=0, maximum=65535)
    broker: str = _setting("memory://", "broker URL: memory://, or redis://HOST:6379/0 "
                           "(also rediss:// and unix://) for a Redis shared by every node, "
                           "or redis+cluster://HOST:7000,HOST:7001 for Redis Cluster",
                           group="serving")
    workers: int = _setting(1, "processes serving one port (more than 1 needs Redis)",
                            group="serving", minimum=1)
    node_name: str = _setting("", "this node's name in webhooks and logs", group="serving",
                              shown="the host name")
    log_level: str = _setting("info", "log level", group="serving",
                              choices=("debug", "info", "warning", "error", "critical"))
    log_format: str = _setting("text", "log format (json: one object per line)",
                               group="serving", choices=("text", "json"))
    access_log: bool = _setting(True, "log one line per HTTP request", group="serving")
    shutdown_timeout: float = _setting(10.0, "seconds a graceful shutdown may take",
                                       group="serving", minimum=0)
    event_loop: str = _setting("uvloop", "the asyncio event loop: uvloop (faster) or the "
                               "standard library's", group="serving",
                               choices=("uvloop", "asyncio"))
    api_keys: tuple[str, ...] = _setting((), "API keys with full publish rights "
                                         "(comma-separated)", group="auth", secret=True)
    jwt_secret: str = _setting("", "HS256 secret for JWTs", group="auth", secret=True)
    jwt_public_key: str = _setting("", "file with an RS256/ES256 public key (PEM) for JWTs",
                                   group="auth")
    public_topics: tuple[str, ...] = _setting(
        (), "patterns anonymous clients may subscribe to (comma-separated)", group="auth")
    allowed_origins: tuple[str, ...] = _setting(
        (), "origins allowed for WebSocket handshakes and CORS besides the server's own; "
        "*: all", group="auth")
    max_event_bytes: int = _setting(64 * KiB, "largest event data, in bytes (413 above)",
                                    group="limits", minimum=1)
    max_batch_bytes: int = _setting(1 * MiB, "largest batch publish body, in bytes "
                                    "(413 above)", group="limits", minimum=1)
    max_batch_events: int = _setting(1000, "most events in one batch publish (413 above)",
                                     group="limits", minimum=1)
    max_stream_bytes: int = _setting(64 * MiB, "largest streaming batch (application/"
                                     "x-ndjson) body, in bytes", group="limits", minimum=1)
    max_frame_bytes: int = _setting(128 * KiB, "largest message from a client: a WebSocket "
                                    "message or a TCP line (closed with 1009 above)",
                                    group="limits", minimum=125)
    max_topic_length: int = _setting(255, "longest topic name", group="limits", minimum=1)
    max_subscriptions: int = _setting(100, "most subscriptions per connection; more get "
                                      "the error too_many_subscriptions", group="limits",
                                      minimum=1)
    max_bad_frames: int = _setting(20, "bad frames a connection may send before it is "
                                   "closed with 4000", group="limits", minimum=1)
    max_http_connections: int = _setting(0, "TCP connections (HTTP and WebSocket) this "
                                         "process holds at most; ones waiting for a request "
                                         "make room for new ones (0: as many as the "
                                         "open-file limit allows, less 256)",
                                         group="limits", minimum=0)
    max_http_connections_per_ip: int = _setting(2000, "TCP connections per client address; "
                                                "its ones waiting for a request make room "
                                                "for new ones (0: no limit)", group="limits",
                                                minimum=0)
    header_timeout: float = _setting(20.0, "seconds a client has to send a request's "
                                     "headers; also how long an idle keep-alive "
                                     "connection stays open", group="limits", minimum=0.1)
    body_timeout: float = _setting(60.0, "seconds a client has to send a request's body",
                                   group="limits", minimum=0.1)
    max_header_bytes: int = _setting(64 * KiB, "largest request head (request line and "
                                     "headers), in bytes (431 above)", group="limits",
                                     minimum=1024)
    max_connections: int = _setting(20_000, "client connections (WebSocket, SSE, TCP) this "
                                    "process holds at most; more are closed with 4029 "
                                    "(0: no limit)", group="limits", minimum=0)
    max_connections_per_ip: int = _setting(1000, "client connections per client address; "
                                           "more are closed with 4029 (0: no limit)",
                                           group="limits", minimum=0)
    frame_rate: float = _setting(100.0, "frames a second one connection may send on average; "
                                 "more get rate_limited, then a close with 4029 (0: no limit)",
                                 group="limits", minimum=0)
    frame_burst: int = _setting(200, "frames one connection may send at once above "
                                "frame_rate", group="limits", minimum=1)
    max_pending_bytes: int = _setting(1 * MiB, "bytes of client frames one connection may "
                                      "have waiting behind one under way (a replay, a "
                                      "publish); more get rate_limited", group="limits",
                                      minimum=1024)
    publish_rate: float = _setting(0.0, "HTTP publishes a second per API key, token "
                                   "subject or address; more get 429 (0: no limit)",
                                   group="limits", minimum=0)
    publish_burst: int = _setting(2000, "HTTP publishes at once above publish_rate",
                                  group="limits", minimum=1)
    publish_rate_clients: int = _setting(100_000, "clients whose HTTP publish rate is "
                                         "tracked at once; the least recently seen is "
                                         "forgotten first", group="limits", minimum=1)
    send_queue_bytes: int = _setting(1 * MiB, "bytes queued for one connection before it "
                                     "is closed as a slow consumer (4008)", group="limits",
                                     minimum=1024)
    write_delay: float = _setting(0.02, "seconds a busy server may hold frames to write "
                                  "many events per send (0: every loop pass)",
                                  group="limits", minimum=0)
    ping_interval: float = _setting(20.0, "seconds between server WebSocket pings (0: none)",
                                    group="limits", minimum=0)
    ping_timeout: float = _setting(20.0, "seconds to wait for a pong before closing "
                                   "with 1001 (0: never close)", group="limits", minimum=0)
    sse_heartbeat: float = _setting(15.0, "seconds between comment lines on idle SSE streams "
                                    "(0: none)", group="limits", minimum=0)
    sse_retry: float = _setting(3.0, "seconds an EventSource waits before it reconnects "
                                "(the stream's retry: field)", group="limits", minimum=0)
    history_size: int = _setting(100, "events retained per topic (0: no history)",
                                 group="history", minimum=0)
    history_ttl: float = _setting(300.0, "seconds events are retained (0: no age limit)",
                                  group="history", minimum=0)
    history_max_topics: int = _setting(10_000, "topics retained at most; least recently "
                                       "published go first", group="history", minimum=1)
    history_max_bytes: int = _setting(64 * MiB, "bytes of history retained at most",
                                      group="history", minimum=1)
    max_replay_events: int = _setting(10_000, "events one history read returns at most; a "
                                      "resume that missed more gets recovered: false",
                                      group="history", minimum=1)
    broker_timeout: float = _setting(3.0, "seconds a publish may wait for the broker "
                                     "(503 after)", group="history", minimum=0.01)
    dedupe_window: float = _setting(300.0, "seconds an Idempotency-Key is remembered",
                                    group="history", minimum=0)
    dedupe_max_keys: int = _setting(100_000, "Idempotency-Keys remembered at most",
                                    group="history", minimum=0)
    redis_wait_replicas: int = _setting(0, "Redis replicas that must acknowledge a publish "
                                        "(WAIT) before it is answered 202; 0: the master's "
                                        "word is enough", group="history", minimum=0)
    presence_topics: tuple[str, ...] = _setting(
        (), "patterns whose subscribers get join and leave frames for the other clients "
        "subscribing to the same name (comma-separated)", group="presence")
    lifecycle_debounce: float = _setting(2.0, "seconds a name must stay without subscribers "
                                         "before topic_vacated fires (a client back within "
                                         "them fires neither signal)", group="presence",
                                         minimum=0)
    presence_ttl: float = _setting(30.0, "seconds after which the other nodes take the "
                                   "clients of a node that stopped (or died) out of presence",
                                   group="presence", minimum=0.5)
    signal_queue: int = _setting(10_000, "async signal receiver calls queued at most "
                                 "(more are dropped and counted)", group="extensions",
                                 minimum=1)
    auth_webhook_url: str = _setting("", "URL of the backend that approves connects, "
                                     "subscribes and WebSocket publishes (turns auth on)",
                                     group="extensions")
    auth_webhook_secret: str = _setting("", "secret signing authorization webhook requests",
                                        group="extensions", secret=True)
    auth_webhook_timeout: float = _setting(2.0, "seconds to wait for the authorization "
                                           "webhook before denying", group="extensions",
                                           minimum=0.01)
    hooks: tuple[str, ...] = _setting((), "modules imported at start to connect receivers",
                                      group="extensions", cli=False)
    webhooks: tuple[Mapping[str, Any], ...] = _setting(
        (), "webhook endpoints: [[webhooks]] tables with url, secret and signals",
        group="extensions", cli=False)

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
DEFAULT = "default"  # the source of a value nobody gave


def load_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None,
                  config_file: str | None = None) -> Settings:
    """Settings from every layer; raises ``SettingsError`` (also for a bad flag)."""
    from config.cli import build_parser
    from config.validation import validate

    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse(list(argv)))
    config_file = flags.pop("config") or config_file or environ.get(CONFIG_VARIABLE)
    raw: dict[str, tuple[Any, str]] = {}
    if config_file:
        raw.update(_from_toml(config_file))
    raw.update(_from_env(environ))
    raw.update({name: (value, flag(name)) for name, value in flags.items()
                if value is not None})
    values = {name: convert(name, value, source) for name, (value, source) in raw.items()}
    settings = Settings(**values)
    validate(settings, {name: source for name, (_, source) in raw.items()})
    return settings


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def variable(name: str) -> str:
    return ENV_PREFIX + name.upper()


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
            raise SettingsError(f"unknown setting {key!r} in config file {path}"
                                f"{_did_you_mean(name, FIELDS)}; run.py --help lists them all")
        found[name] = (value, f"{key} in {path}")
    return found


def _did_you_mean(given: str, known: Sequence[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for name, spec in FIELDS.items():
        key = variable(name)
        if key not in environ:
            continue
        if not spec.metadata["cli"]:
            raise SettingsError(f"setting {name} (from {key}) can only be set in the TOML "
                                f"file given with --config or {CONFIG_VARIABLE}")
        found[name] = (environ[key], key)
    return found


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``SQUALL_*`` variable that names no setting (it is ignored:
    other software may share the prefix, as Kubernetes' service variables do)."""
    known = {variable(name) for name in FIELDS} | {CONFIG_VARIABLE}
    return [f"warning: {key} names no setting and is ignored"
            f"{_did_you_mean(key, sorted(known))}"
            for key in sorted(environ) if key.startswith(ENV_PREFIX) and key not in known]


# -- values ---------------------------------------------------------------------------


def convert(name: str, value: Any, source: str) -> Any:
    """``value`` as the type of the setting's default, or ``SettingsError``."""
    default = FIELDS[name].default
    try:
        if isinstance(default, tuple):
            items = _as_tuple(value)
            if name != "webhooks" and not all(isinstance(item, str) for item in items):
                raise ValueError
            return items
        if isinstance(default, bool):
            return _as_bool(value)
        if isinstance(default, int):
            return _as_number(value, int)
        if isinstance(default, float):
            return float(_as_number(value, float))
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, OverflowError):
        raise bad_value(name, value, source, "must be " + allowed(name)) from None


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(value)
    raise ValueError


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _as_number(value: Any, kind: type[int] | type[float]) -> int | float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float) and (kind is float or isinstance(value, int)):
        if not math.isfinite(value):
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    number = kind(value.strip())
    if not math.isfinite(number):  # nan, inf and 1e999 are no durations or sizes
        raise ValueError
    return number


def allowed(name: str) -> str:
    """What a setting accepts, in words: ``a whole number from 0 to 65535``."""
    spec = FIELDS[name]
    default, choices = spec.default, spec.metadata["choices"]
    if choices:
        return "one of " + ", ".join(choices)
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int | float):
        noun = "a whole number" if isinstance(default, int) else "a number"
        low, high = spec.metadata["minimum"], spec.metadata["maximum"]
        if low is not None and high is not None:
            return f"{noun} from {low:g} to {high:g}"
        return f"{noun} of at least {low:g}" if low is not None else noun
    if name == "webhooks":
        return "[[webhooks]] tables"
    if isinstance(default, tuple):
        return "a TOML list of strings, or comma-separated text"
    return "text"


def bad_value(name: str, value: Any, source: str, problem: str) -> SettingsError:
    """The one-line error for a setting: ``setting port = 99999 (from --port): ...``."""
    shown = "" if FIELDS[name].metadata["secret"] else f" = {shown_value(value)}"
    return SettingsError(f"setting {name}{shown} (from {source}): {problem}")


def shown_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value) if not isinstance(value, bool | int | float) else show(value)
    return text if len(text) <= 100 else text[:97] + "..."


def show(value: Any) -> str:
    """A value as --help and the docs show it: ``true``, ``20``, ``a,b``, ``none``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value) if value != "" else "none"


def shown_default(name: str) -> str:
    spec = FIELDS[name]
    return spec.metadata["shown"] or show(spec.default)
