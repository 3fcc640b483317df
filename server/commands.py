"""Client frames turned into typed commands, with a clear error for every bad one."""

from __future__ import annotations

from typing import Any, NamedTuple

from server.errors import SquallError
from server.topics import InvalidTopic, validate_pattern, validate_topic

MAX_REF_LENGTH = 256
MAX_KEY_LENGTH = 256


# Commands are named tuples: one is made per client frame, and a tuple is the cheapest
# object to make.


class FrameError(SquallError):
    """A bad client frame; ``ref`` is echoed in the error frame when it was readable."""

    def __init__(self, code: str, message: str, ref: Any = None) -> None:
        super().__init__(code, message)
        self.ref = ref


class Subscribe(NamedTuple):
    topic: str
    since: str | None = None
    ref: Any = None


class Unsubscribe(NamedTuple):
    topic: str
    ref: Any = None


class Publish(NamedTuple):
    """Also the broker's ``PublishRequest`` for it (the same first four fields): no
    second tuple is made per published frame."""

    topic: str
    data: Any
    idempotency_key: str | None = None
    data_json: bytes | None = None
    ref: Any = None


class Ping(NamedTuple):
    ref: Any = None


class Auth(NamedTuple):
    """The TCP line protocol's way in for a credential (an API key or a JWT)."""

    token: str
    ref: Any = None


Command = Subscribe | Unsubscribe | Publish | Ping | Auth


def parse_command(frame: Any, max_topic_length: int, allow_auth: bool = False) -> Command:
    """The command in a decoded client frame; raises ``FrameError``.

    ``auth`` frames are commands only where ``allow_auth`` (the TCP line protocol).
    """
    if not isinstance(frame, dict):
        raise FrameError("invalid_body", "a frame must be an object with a 'type'")
    ref = frame.get("ref")
    if ref is not None and type(ref) is not int:
        ref = _ref(ref)
    kind = frame.get("type")
    try:
        if kind == "publish":  # the common frame first
            if "data" not in frame:
                raise SquallError("invalid_body", "publish frame has no 'data'")
            key = frame.get("idempotency_key")
            # made without the named tuple's Python-level __new__: half the cost
            return tuple.__new__(Publish, (_name(frame, max_topic_length, pattern=False),
                                           frame["data"], key if key is None else _key(key),
                                           None, ref))
        if kind == "subscribe":
            return Subscribe(_name(frame, max_topic_length, pattern=True),
                             _since(frame), ref)
        if kind == "unsubscribe":
            return Unsubscribe(_name(frame, max_topic_length, pattern=True), ref)
        if kind == "ping":
            return Ping(ref)
        if kind == "auth" and allow_auth:
            return Auth(_token(frame), ref)
    except SquallError as exc:
        raise FrameError(exc.code, exc.message, ref) from None
    if kind is None:
        raise FrameError("invalid_body", "frame has no 'type'", ref)
    expected = "subscribe, unsubscribe, publish, ping or auth" if allow_auth else (
        "subscribe, unsubscribe, publish or ping")
    raise FrameError("invalid_body", f"unknown frame type {str(kind)[:40]!r}; expected "
                     f"{expected}", ref)


def _ref(ref: Any) -> Any:
    if isinstance(ref, int | float) and not isinstance(ref, bool):
        return ref
    if isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH:
        return ref
    raise FrameError("invalid_body", f"'ref' must be a number or a string of at most "
                     f"{MAX_REF_LENGTH} characters")


def _name(frame: dict[str, Any], max_length: int, pattern: bool) -> str:
    if "topic" not in frame:
        raise SquallError("invalid_body", f"{frame['type']} frame has no 'topic'")
    try:
        if pattern:
            return validate_pattern(frame["topic"], max_length)
        return validate_topic(frame["topic"], max_length)
    except InvalidTopic as exc:
        raise SquallError("invalid_topic", str(exc)) from None


def _since(frame: dict[str, Any]) -> str | None:
    """Any string: one that is not a known id is answered with ``recovered: false``."""
    since = frame.get("since")
    if since is None or isinstance(since, str):
        return since
    raise SquallError("invalid_body", "'since' must be an event id string")


def _token(frame: dict[str, Any]) -> str:
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        raise SquallError("invalid_body", "auth frame needs a 'token' string (an API key or JWT)")
    return token


def _key(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise SquallError("invalid_body", f"'idempotency_key' must be a non-empty string of "
                          f"at most {MAX_KEY_LENGTH} characters")
    return value


def with_ref(message: dict[str, Any], ref: Any) -> dict[str, Any]:
    """``message`` carrying the client's ``ref`` back, when it gave one."""
    if ref is not None:
        message["ref"] = ref
    return message


def error_frame(exc: SquallError, ref: Any = None) -> dict[str, Any]:
    return with_ref({"type": "error", "code": exc.code, "message": exc.message}, ref)
