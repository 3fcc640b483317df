"""HTTP publishing: one event, or a batch validated whole before any is published.

Limits (settings): ``max_event_bytes`` for one event's data (413 above),
``max_batch_bytes`` and ``max_batch_events`` for a batch, ``publish_rate`` and
``publish_burst`` per API key, token subject or address (429 above). Bodies are JSON
or msgpack by Content-Type (415 otherwise); the reply follows the Accept header.

Auth (server/auth.py) is decided before the body is read: a bad credential is a 401
(and a publish over its rate a 429), a topic the credential may not publish to (or
read the history of) a 403, and a batch is refused whole when any of its topics is.
A refused request of a known length up to ``REFUSED_READ`` is answered after its body
is read (and dropped), so that its connection stays open; a longer one, or one of no
told length, is answered at once, and the connection ends with the answer.
"""

from __future__ import annotations

import contextlib
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from handlers.base import ApiHandler
from handlers.stream import MEDIA_TYPES as STREAM_TYPES
from handlers.stream import NdjsonPublisher, entry_request
from server.auth import EVERYTHING, Grant, Unauthorized, authorize
from server.broker.base import Published, PublishRequest
from server.codec import Codec, dump_json, media_codec
from server.commands import MAX_KEY_LENGTH
from server.errors import SquallError
from server.node import Node
from server.topics import InvalidTopic, validate_pattern, validate_topic

_HEADROOM = 64 * 1024  # bytes read past a limit before the connection is cut
REFUSED_READ = 64 * 1024  # a refused body read (and dropped) to keep its connection
_UNCUT = 2**62  # a body size Tornado never reaches
_DRAIN = 1024 * 1024  # bytes of a stream past its limit read (and dropped) before a cut
BATCH_EXPECTED = '{"events": [{"topic": "orders.eu", "data": {"text": "hi"}}]} as JSON (or msgpack)'
SINGLE_EXPECTED = ('the event\'s data as JSON, such as {"text": "hi"}, with Content-Type: '
                   "application/json (or msgpack with Content-Type: application/msgpack)")


@stream_request_body
class BodyHandler(ApiHandler):
    """Reads a bounded request body; more than ``body_limit`` bytes is a 413."""

    # what a body of this path holds, for the message that answers a bad one
    expected = "a JSON value"

    def body_limit(self) -> int:
        raise NotImplementedError

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.refusal: SquallError | None = None
        if self.request.method == "OPTIONS":
            return
        length = self.request.headers.get("Content-Length", "")
        try:
            if self.request.method == "POST":
                self.rights = publisher(self.node, self.request.headers.get("Authorization"),
                                        self.request.remote_ip or "")
            else:
                self.rights = self.grant()
        except SquallError as exc:
            if not _is_number(length) or _at_most(length, REFUSED_READ) is None:
                raise  # now (Tornado ends the connection with it): not worth reading
            # answered once the short body is read: an answer before the end of the
            # request would make Tornado close the connection, and a keep-alive client
            # would find its next request on a socket that is gone
            self.refusal = exc
            return
        limit = self.body_limit()
        if _is_number(length) and _at_most(length, limit) is None:
            raise _too_large(limit)  # now: the body is not read, and the connection ends
        if self.request.connection is not None:
            self.request.connection.set_max_body_size(limit + _HEADROOM)  # type: ignore[attr-defined]

    def check_refusal(self) -> None:
        """Raise the credential's or the rate limit's refusal, if ``prepare`` met one."""
        if self.refusal is not None:
            raise self.refusal

    async def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.body_limit() and self.refusal is None:
            await self.take(chunk)

    async def take(self, chunk: bytes) -> None:
        """Keep a chunk of the body (a streaming handler uses it at once instead)."""
        self._chunks.append(chunk)

    def decoded_body(self) -> tuple[Any, Codec]:
        """The body as a value, and the codec it came in."""
        if self._size > self.body_limit():
            raise _too_large(self.body_limit())
        return decode_body(self.request.headers.get("Content-Type"), b"".join(self._chunks),
                           self.expected)


class TopicEventsHandler(BodyHandler):
    """``/v1/topics/{topic}/events``: POST publishes the body as the event's data;
    GET lists the retained history (``since``, ``limit``)."""

    expected = SINGLE_EXPECTED

    def body_limit(self) -> int:
        return self.node.settings.max_event_bytes

    async def post(self, topic: str) -> None:
        self.check_refusal()
        if self._size > self.body_limit():
            raise _too_large(self.body_limit())
        headers = self.request.headers
        self.reply(202, await publish_one(
            self.node, self.rights, topic, headers.get("Content-Type"),
            headers.get("Idempotency-Key"), b"".join(self._chunks)))

    async def get(self, topic: str) -> None:
        self.check_refusal()
        try:
            name = validate_pattern(topic, self.node.settings.max_topic_length)
        except InvalidTopic as exc:
            raise SquallError("invalid_topic", str(exc)) from None
        authorize(self.rights, self.rights.check_subscribe, name)
        since = self.get_query_argument("since", None)
        most = self.node.settings.max_replay_events
        limit = _limit(self.get_query_argument("limit", None), most) or most
        replay = await self.node.broker.history(name, since, limit)
        self.reply(200, {"topic": name, "events": [event.as_dict() for event in replay.events],
                         "recovered": replay.recovered})


class BatchHandler(BodyHandler):
    """``POST /v1/events``: ``{"events": [{"topic", "data", "idempotency_key"?}, ...]}``,
    or one event per line with ``Content-Type: application/x-ndjson`` (handlers/stream.py:
    published as the lines arrive, answered line by line)."""

    stream: NdjsonPublisher | None = None
    cut = False  # a streaming body went ``_DRAIN`` past its limit: answered, finished

    expected = BATCH_EXPECTED

    def body_limit(self) -> int:
        if self._streaming():
            return self.node.settings.max_stream_bytes
        return self.node.settings.max_batch_bytes

    def _streaming(self) -> bool:
        media = self.request.headers.get("Content-Type", "").split(";", 1)[0]
        return media.strip().lower() in STREAM_TYPES

    def prepare(self) -> None:
        super().prepare()
        if (self.request.method == "POST" and self._streaming() and self.refusal is None
                and self.request.connection is not None):
            # Tornado must not cut the body itself: it would drop the lines it holds
            # back (it passes small chunks on 64 KiB at a time) and write a 400 into the
            # answer. Past its limit the stream answers ``payload_too_large`` and drops
            # the rest; ``_DRAIN`` bytes further it ends the answer and the connection.
            self.request.connection.set_max_body_size(_UNCUT)  # type: ignore[attr-defined]

    async def data_received(self, chunk: bytes) -> None:
        if not self._streaming() or self.refusal is not None:
            await super().data_received(chunk)
            return
        stream = self._stream()
        room = self.body_limit() - self._size
        self._size += len(chunk)
        if stream.overflowed:  # read and dropped, so that the client reads the answer
            if self._size > self.body_limit() + _DRAIN and not self.cut:
                self.cut = True
                self.finish()  # too far: the answer ends here, and the connection with it
            return
        await stream.feed(chunk[:room] if len(chunk) > room else chunk)
        if len(chunk) > room:
            await stream.overflow(self.body_limit())  # said once; the lines before it stand

    def _stream(self) -> NdjsonPublisher:
        if self.stream is None:
            self.set_status(202)
            self.set_header("Content-Type", "application/x-ndjson")
            self.stream = NdjsonPublisher(self.node.hub, self.rights, self.node.settings,
                                          self._answer)
        return self.stream

    async def _answer(self, lines: bytes) -> None:
        self.write(lines)
        with contextlib.suppress(StreamClosedError):  # the client is gone: nobody to answer
            await self.flush()  # as the lines come: a client may read while it sends

    async def post(self) -> None:
        self.check_refusal()
        if self._streaming():
            await self._end_stream()
            return
        if self._size > self.body_limit():
            raise _too_large(self.body_limit())
        self.reply(202, await publish_batch(self.node, self.rights,
                                            self.request.headers.get("Content-Type"),
                                            b"".join(self._chunks)))

    async def _end_stream(self) -> None:
        stream = self._stream()
        if not stream.overflowed:
            await stream.end()
        if not self.cut:  # (a body far over the limit was finished when it was cut)
            self.finish()


def publisher(node: Node, authorization: str | None, ip: str) -> Grant:
    """The grant of a publish request, counted against its publish rate; raises
    ``unauthorized`` or ``rate_limited``. A request without a credential, where one is
    needed to publish anywhere, is told so before it is counted: a client that forgot
    its key learns that, not to slow down."""
    rights: Grant = node.auth.http_grant(authorization)
    if rights.anonymous and not rights.publish:
        raise Unauthorized("an anonymous client may not publish: send an API key or a token")
    node.limits.check_publish(rights.limit_key or f"ip:{ip}")
    return rights


def decode_body(content_type: str | None, raw: bytes, expected: str) -> tuple[Any, Codec]:
    """A body as a value by its Content-Type, and the codec; ``expected`` says in the
    error what a body of this path holds."""
    codec = media_codec(content_type)
    if codec is None:
        raise SquallError("unsupported_media_type", f"Content-Type {content_type!r:.80} is "
                          "not supported; send application/json or application/msgpack")
    if not raw or (not codec.binary and raw.isspace()):  # (isspace stops at the first byte)
        raise SquallError("invalid_body", f"the body is empty; send {expected}")
    try:
        return codec.loads(raw), codec
    except SquallError as exc:
        raise SquallError(exc.code, f"{exc.message}; send {expected}") from None


async def publish_one(node: Node, rights: Grant, raw_topic: str, content_type: str | None,
                      key: str | None, body: bytes) -> dict[str, Any]:
    """``POST /v1/topics/{topic}/events``, after its grant: the answer's value."""
    topic = _topic(raw_topic, node.settings.max_topic_length)
    authorize(rights, rights.check_publish, topic)
    data, _ = decode_body(content_type, body, SINGLE_EXPECTED)
    if key is not None:
        key = _header_text(key, "Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
        raise SquallError("invalid_body", "Idempotency-Key must be 1 to "
                          f"{MAX_KEY_LENGTH} characters")
    [published] = await node.hub.publish([PublishRequest(topic, data, key)])
    return _outcome(published)


async def publish_batch(node: Node, rights: Grant, content_type: str | None,
                        body: bytes) -> dict[str, Any]:
    """``POST /v1/events`` (not streaming), after its grant: the answer's value."""
    value, codec = decode_body(content_type, body, BATCH_EXPECTED)
    requests = _batch(value, codec, node.settings)
    if rights.publish != EVERYTHING:
        for request in requests:
            authorize(rights, rights.check_publish, request.topic)
    published = await node.hub.publish(requests)
    return {"events": [{"topic": outcome.topic, "id": outcome.id, "ts": outcome.ts}
                       for outcome in published]}


def _batch(body: Any, codec: Codec, settings: Any) -> list[PublishRequest]:
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise SquallError("invalid_body", 'the body must be {"events": [...]}')
    entries = body["events"]
    if not entries:
        raise SquallError("invalid_body", "the batch has no events")
    if len(entries) > settings.max_batch_events:
        raise SquallError("payload_too_large", f"a batch holds at most "
                          f"{settings.max_batch_events} events, got {len(entries)}")
    requests = []
    dumps = codec.dumps if codec.binary else dump_json  # JSON: one call fewer per entry
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "topic" not in entry or "data" not in entry:
            raise SquallError("invalid_body", f'events[{index}] must be {{"topic": ..., '
                              f'"data": ...}}')
        try:
            requests.append(entry_request(entry, settings, dumps, codec.binary))
        except SquallError as exc:
            raise SquallError(exc.code, f"events[{index}]: {exc.message}") from None
    return requests


def _topic(raw: str, max_length: int) -> str:
    try:
        return validate_topic(raw, max_length)
    except InvalidTopic as exc:
        raise SquallError("invalid_topic", str(exc)) from None


def _limit(raw: str | None, most: int) -> int | None:
    if raw is None:
        return None
    value = _at_most(raw, most) if _is_number(raw) else None
    if not value:
        raise SquallError("invalid_body", f"limit must be a whole number from 1 to "
                          f"{most}, got {raw[:20]!r}")
    return value


def _header_text(value: str, name: str) -> str:
    """A header's value as the UTF-8 it was sent in (Tornado reads headers as Latin-1),
    so that a key means the same in a header as in a JSON body."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise SquallError("invalid_body", f"{name} must be UTF-8") from None


def _at_most(digits: str, most: int) -> int | None:
    """The number ``digits`` (ASCII) spell if it is at most ``most``, else None, judged
    by length first: ``int()`` refuses text of over 4,300 digits."""
    significant = digits.lstrip("0")
    if len(significant) > len(str(most)):
        return None
    value = int(significant or "0")
    return value if value <= most else None


def _is_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``²`` and ``①``, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def _too_large(limit: int) -> SquallError:
    return SquallError("payload_too_large", f"the body is larger than {limit} bytes")


def _outcome(published: Published) -> dict[str, Any]:
    return {"topic": published.topic, "id": published.id, "ts": published.ts}
