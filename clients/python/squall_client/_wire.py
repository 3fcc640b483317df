"""What both publishers share: URLs, request bodies, batch splitting, answers.

The publishers differ only in how bytes reach the server (``http.client`` for the
sync one, httpx for the async one); everything said on the wire is built here.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from squall_client.errors import SquallError
from squall_client.models import Published

JSON = "application/json"
# Answers that say "try again": the broker could not confirm in time (503), or a
# proxy in front of a restarting server (502, 504). The key makes a retry safe.
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_BATCH_EVENTS = 1000         # the server's max_batch_events default
MAX_BATCH_BYTES = 1024 * 1024   # the server's max_batch_bytes default
MAX_EVENT_BYTES = 64 * 1024     # the server's max_event_bytes default
BATCH_PATH = "/v1/events"

# (topic, data) or (topic, data, idempotency_key)
BatchEntry = tuple[str, Any] | tuple[str, Any, str | None]


@dataclass(frozen=True)
class Endpoint:
    """Where the server's HTTP API is: ``http(s)://host[:port][/prefix]``."""

    scheme: str
    host: str
    port: int
    prefix: str
    netloc: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"),
                   parts.netloc.rpartition("@")[2])

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    def topic_path(self, topic: str) -> str:
        return _topic_path(self.prefix, topic)

    @property
    def batch_path(self) -> str:
        return self.prefix + BATCH_PATH


@functools.lru_cache(maxsize=1024)
def _topic_path(prefix: str, topic: str) -> str:
    return f"{prefix}/v1/topics/{quote(topic, safe=':@')}/events"


def new_key() -> str:
    """A fresh idempotency key: 128 random bits."""
    return os.urandom(16).hex()


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(value: Any) -> bytes:
    """``value`` as compact JSON; NaN and infinities are refused (JSON has none)."""
    return _ENCODER.encode(value).encode()


def base_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": JSON, "Accept": JSON}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def with_key(headers: Mapping[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def failure_of(status: int, body: bytes) -> SquallError | None:
    """None for a 2xx answer; the error to retry for a retryable one (``RETRY_STATUSES``);
    raises the error of any other."""
    if status < 300:
        return None
    failure = error(status, body)
    if status not in RETRY_STATUSES:
        raise failure
    return failure


def published(body: bytes) -> Published:
    """The answer to a single publish."""
    answer = _json(body)
    try:
        return Published(answer["topic"], answer["id"], answer["ts"])
    except (KeyError, TypeError):
        raise _unexpected(body) from None


def published_batch(body: bytes, count: int) -> list[Published]:
    """The answer to a batch of ``count`` events, in order."""
    answer = _json(body)
    try:
        outcomes = [Published(item["topic"], item["id"], item["ts"])
                    for item in answer["events"]]
    except (KeyError, TypeError):
        raise _unexpected(body) from None
    if len(outcomes) != count:
        raise _unexpected(body)
    return outcomes


def error(status: int, body: bytes) -> SquallError:
    """The ``SquallError`` of an error answer: ``{"error": {"code", "message"}}``, or
    whatever a proxy in between sent."""
    try:
        found = json.loads(body)["error"]
        return SquallError(str(found["code"]), str(found["message"]), status)
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return SquallError(f"http_{status}", text or f"HTTP {status}", status)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise _unexpected(body) from None


def _unexpected(body: bytes) -> SquallError:
    return SquallError("invalid_response", "the server's answer is not what docs/protocol.md "
                       f"says: {body[:200]!r}")


@dataclass(frozen=True)
class Batch:
    """One ``POST /v1/events`` body and how many events it carries."""

    body: bytes
    count: int


def split_batches(entries: Iterable[BatchEntry], max_events: int, max_bytes: int,
                  max_event_bytes: int = MAX_EVENT_BYTES) -> list[Batch]:
    """Every entry, encoded once with its idempotency key (the one given, or a new
    one), in bodies of at most ``max_events`` events and ``max_bytes`` bytes, in order.

    Raises ``ValueError`` for a malformed entry and ``SquallError("payload_too_large")``
    for one that no batch can hold or whose data is over ``max_event_bytes`` as JSON,
    before anything is sent; its message gives the entry's index in ``entries``.
    """
    if max_events < 1:
        raise ValueError("max_batch_events must be at least 1")
    batches: list[Batch] = []
    pending: list[bytes] = []
    size = _EMPTY
    for index, entry in enumerate(entries):
        encoded = _entry(entry)
        if len(encoded) > max_event_bytes:  # the entry holds the data: measure the data
            data_size = len(encode(entry[1]))
            if data_size > max_event_bytes:
                raise SquallError("payload_too_large", f"events[{index}]: data is "
                                  f"{data_size} bytes; the limit is {max_event_bytes}")
        if _EMPTY + len(encoded) > max_bytes:
            raise SquallError("payload_too_large", f"events[{index}] is {len(encoded)} bytes "
                              f"in a batch; a batch holds at most {max_bytes}")
        if pending and (len(pending) >= max_events or size + 1 + len(encoded) > max_bytes):
            batches.append(_batch(pending))
            pending, size = [], _EMPTY
        size += len(encoded) + (1 if pending else 0)
        pending.append(encoded)
    if pending:
        batches.append(_batch(pending))
    return batches


_EMPTY = len(b'{"events":[]}')


def _entry(entry: BatchEntry) -> bytes:
    if not isinstance(entry, tuple) or len(entry) not in (2, 3):
        raise ValueError(f"a batch entry is (topic, data) or (topic, data, key), got {entry!r}")
    topic, data = entry[0], entry[1]
    key = entry[2] if len(entry) == 3 else None
    if not isinstance(topic, str):
        raise ValueError(f"a topic is a string, got {topic!r}")
    return encode({"topic": topic, "data": data, "idempotency_key": key or new_key()})


def _batch(entries: list[bytes]) -> Batch:
    return Batch(b'{"events":[' + b",".join(entries) + b"]}", len(entries))
