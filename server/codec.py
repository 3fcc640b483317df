"""Codecs: JSON and msgpack values to bytes and back (framing is in server/wire.py).

Every payload a client sends is decoded here, and every error is a ``SquallError``
with code ``invalid_body``: callers never see a parser's own exception types.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from server.errors import SquallError

# curl -d sends application/x-www-form-urlencoded; a body it sends is taken as JSON
JSON_TYPES = ("application/json", "application/x-www-form-urlencoded")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")

# Values nested deeper than this (arrays and maps in each other) are refused: every
# encoder and decoder on the way recurses, and no event needs more.
MAX_DEPTH = 64


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(digits: str) -> int:
    """An integer of a JSON text, refused past 20 digits (before ``int()``, which
    refuses text of over 4,300 digits with a message about Python, not the contract)."""
    if len(digits) > 21 or (len(digits) == 21 and digits[0] != "-"):
        raise _not_carried(f"a number has {len(digits.lstrip('-'))} digits")
    return int(digits)


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_parse_int)
# An integer beyond 64 bits, which orjson would make a float, has 20 digits or more, or
# is negative with 19 (every positive one of 19 is below 2^64): found by turning every
# digit into 0 and looking for such a run. (Nanosecond clocks and snowflake ids have 19.)
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * 20
_LONG_NEGATIVE = b"-" + b"0" * 19
_DIGITS_AND_OPENERS = b"0123456789[{"
_SHORT = 1024  # bytes: longer texts are checked without counting them first
# digits and brackets in all below which a text holds neither a long run nor too deep
# a value (derived, so that a lower MAX_DEPTH keeps the shortcut right)
_PLAIN_BELOW = min(len(_LONG_NEGATIVE) - 1, MAX_DEPTH + 1)
_ORJSON_DEPTH = 254  # the deepest value orjson encodes
# bytes from which a text's depth is checked without counting its brackets first: the
# count then costs about what the check does (about 2.5 µs, most of it the probe's levels)
_PROBE_FROM = 4096
_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_safe(value: Any) -> Any:
    """A copy of a msgpack value that JSON can carry.

    bytes become base64 strings, non-string map keys strings (the JSON text of the key
    converted: ``1``, ``true``, ``null``), non-finite floats and extension types null,
    timestamps milliseconds (null beyond 64 bits). Only called when plain encoding failed.
    """
    if isinstance(value, dict):
        return {key if isinstance(key, str) else _key_text(key): json_safe(item)
                for key, item in value.items()}
    if isinstance(value, msgpack.ExtType):  # (a named tuple: before the arrays)
        return None
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, msgpack.Timestamp):
        milliseconds = value.to_unix_nano() // 1_000_000
        return milliseconds if -2**63 <= milliseconds < 2**64 else None
    return None


def _key_text(key: Any) -> str:
    converted = json_safe(key)
    return converted if isinstance(converted, str) else orjson.dumps(converted).decode()


def dump_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; values from msgpack that JSON lacks are converted."""
    try:
        return orjson.dumps(value)
    except TypeError:  # bytes, non-string keys, extension types: made JSON-safe
        safe = json_safe(value)
    try:
        return orjson.dumps(safe)
    except TypeError:  # integers beyond 64 bits (never from the edge, which refuses them)
        return _json_encoder.encode(safe).encode()


def check_value(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``invalid_body`` unless ``value`` nests at most ``max_depth`` levels and
    holds only finite numbers (JSON has no NaN or infinity; ``1e999`` parses as one)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise _not_finite()
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                raise SquallError("invalid_body", f"the value is nested more than "
                                  f"{max_depth} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, dict | list | tuple | float))


def may_hold_long_integers(raw: bytes) -> bool:
    """Whether ``raw`` has a run of 20 digits, or of 19 after a minus sign (for checking
    many values' text at once)."""
    digits = raw.translate(_DIGITS_AS_ZERO)
    return _LONG_RUN in digits or _LONG_NEGATIVE in digits


def load_json(raw: bytes | str, digits_checked: bool = False) -> Any:
    """Parse strict JSON (no NaN/Infinity), or raise ``invalid_body``.

    The value must also be one every codec can carry (finite numbers, at most
    ``MAX_DEPTH`` levels, no lone surrogates, integers within 64 bits), so that no
    subscriber's encoding can fail later. orjson parses (it refuses non-finite numbers
    and lone surrogates itself); a body whose digits may spell an integer beyond 64 bits
    (``may_hold_long_integers``), which orjson would turn into a float, goes through the
    standard parser, which keeps it an integer for the 64-bit check to refuse.
    ``digits_checked``: the caller found no such run in a text that holds this one.

    Note orjson's own depth limit (1024 to parse, ``_ORJSON_DEPTH`` to encode) is
    above ``MAX_DEPTH``, so the depth is checked here.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")  # orjson refuses what this lets through
    # Most messages are short with few digits and brackets: fewer than _PLAIN_BELOW of
    # them in all can make neither a long run of digits nor more than MAX_DEPTH levels.
    plain = len(raw) <= _SHORT and (
        len(raw) - len(raw.translate(None, _DIGITS_AND_OPENERS)) < _PLAIN_BELOW)
    if not plain and not digits_checked and may_hold_long_integers(raw):
        return _load_json_exactly(raw)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if exc.msg.startswith("depth limit"):
            raise _too_deep() from None
        if "infinity" in exc.msg:
            raise _not_finite() from None
        raise _malformed(exc) from None
    if not plain and (len(raw) >= _PROBE_FROM or _containers(raw) > MAX_DEPTH):
        _check_depth(value)  # (else it has too few brackets to be too deep)
    return value


def _containers(raw: bytes) -> int:
    """How many arrays and objects ``raw`` may open at most: a bound on its depth."""
    return raw.count(b"[") + raw.count(b"{")


def _malformed(exc: json.JSONDecodeError) -> SquallError:
    """What is wrong with a JSON text, and where: ``... at line 1 column 2``."""
    return SquallError("invalid_body", f"malformed JSON: {exc.msg} at line {exc.lineno} "
                       f"column {exc.colno}")


def _depth_probe() -> tuple[list[Any], list[Any]]:
    """Lists nested ``_ORJSON_DEPTH - MAX_DEPTH`` levels deep: the outermost and the
    innermost, whose one item is the value being checked."""
    innermost: list[Any] = [None]
    outermost = innermost
    for _ in range(_ORJSON_DEPTH - MAX_DEPTH - 1):
        outermost = [outermost]
    return outermost, innermost


_PROBE, _PROBE_SLOT = _depth_probe()


def _check_depth(value: Any) -> None:
    """``invalid_body`` if ``value`` nests deeper than ``MAX_DEPTH``, at C speed: orjson
    refuses to encode past ``_ORJSON_DEPTH`` levels, so the value is encoded inside
    lists made once (``_PROBE``) that leave exactly ``MAX_DEPTH`` levels for it. (Only
    the loop's thread parses, and orjson calls no Python code while it encodes.)"""
    _PROBE_SLOT[0] = value
    try:
        orjson.dumps(_PROBE)
    except TypeError:
        raise _too_deep() from None
    finally:
        _PROBE_SLOT[0] = None


def _load_json_exactly(raw: bytes | str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        value = _json_decoder.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except json.JSONDecodeError as exc:
        raise _malformed(exc) from None
    except ValueError as exc:
        raise SquallError("invalid_body", f"malformed JSON: {_first_line(exc)}") from None
    check_value(value)
    try:
        dump_msgpack(value)
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        raise _not_carried(_first_line(exc)) from None
    return value


def _not_carried(why: str) -> SquallError:
    return SquallError("invalid_body", "the value cannot be carried by every codec "
                       f"(integers must fit 64 bits, strings be valid Unicode): {why}")


def _not_finite() -> SquallError:
    return SquallError("invalid_body", "numbers must be finite (no NaN, no infinity, "
                       "nothing beyond 1.8e308)")


def _too_deep() -> SquallError:
    return SquallError("invalid_body", f"the value is nested more than {MAX_DEPTH} levels deep")


# One packer for every encoding: ``packb`` makes (and frees) a packer and its buffer
# per call, 40% of a small value's cost. The loop's thread is the only one encoding,
# and a packer starts afresh after a value it cannot carry.
_PACKER = msgpack.Packer(use_bin_type=True, datetime=False)


def dump_msgpack(value: Any) -> bytes:
    return _PACKER.pack(value)


def load_msgpack(raw: bytes) -> Any:
    """Parse one msgpack value, or raise ``invalid_body`` (as for JSON, numbers must
    be finite and nesting at most ``MAX_DEPTH`` levels)."""
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise SquallError("invalid_body", f"malformed msgpack: {_first_line(exc)}") from None
    check_value(value)
    return value


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


@dataclass(frozen=True, eq=False)
class Codec:
    """One encoding: how values become bytes, and the WebSocket subprotocol naming it.

    Codecs are singletons (``JSON``, ``MSGPACK``) compared and hashed by identity.
    """

    name: str
    subprotocol: str
    binary: bool

    def dumps(self, value: Any) -> bytes:
        return dump_msgpack(value) if self.binary else dump_json(value)

    def loads(self, raw: bytes | str) -> Any:
        if self.binary:
            if isinstance(raw, str):
                raise SquallError("invalid_body", "text frame on the msgpack subprotocol")
            return load_msgpack(raw)
        return load_json(raw)


JSON = Codec("json", "squall.v1.json", binary=False)
MSGPACK = Codec("msgpack", "squall.v1.msgpack", binary=True)
CODECS = (JSON, MSGPACK)


def media_codec(content_type: str | None) -> Codec | None:
    """The codec for a request's Content-Type (JSON when absent), None if unsupported."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES:
        return JSON
    if media in MSGPACK_TYPES:
        return MSGPACK
    return None


def accept_codec(accept: str | None) -> Codec:
    """The codec for a response: msgpack only when the client asked for it by name and
    prefers it to JSON: a higher ``q`` than ``application/json``'s when that is named
    too (a tie: JSON, the default), else at least the ``q`` a wildcard (``*/*``,
    ``application/*``) gives JSON. JSON otherwise."""
    if not accept or "msgpack" not in accept.lower():
        return JSON
    msgpack_q, json_q, wildcard_q = 0.0, -1.0, 0.0
    for media_range in accept.lower().split(","):
        media, *parameters = media_range.split(";")
        media, q = media.strip(), 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                q = _quality(value)
        if media in MSGPACK_TYPES:
            msgpack_q = max(msgpack_q, q)
        elif media == "application/json":
            json_q = max(json_q, q)
        elif media in ("*/*", "application/*"):
            wildcard_q = max(wildcard_q, q)
    if json_q >= 0:  # named
        return MSGPACK if msgpack_q > json_q else JSON
    return MSGPACK if msgpack_q > 0 and msgpack_q >= wildcard_q else JSON


def _quality(text: str) -> float:
    """An ``Accept`` range's ``q`` (0 to 1); one that is not a number counts as 0."""
    try:
        q = float(text.strip())
    except ValueError:
        return 0.0
    return q if 0.0 <= q <= 1.0 else 0.0
