"""A streaming batch: ``POST /v1/events`` with ``Content-Type: application/x-ndjson``.

The body is one event per line, ``{"topic": ..., "data": ..., "idempotency_key"?: ...}``,
of any length up to ``max_stream_bytes``. Lines are published as they arrive: the
complete lines of each chunk the server reads go to the broker together, in order,
and each gets one line of the answer (``application/x-ndjson``, status 202), in the
same order: ``{"topic", "id", "ts"}``, or ``{"error": {"code", "message"}, "line": N}``
for a line that was not published (1-based). A bad line never stops the others.
Blank lines are skipped and get no answer.

Limits: a line longer than ``max_frame_bytes`` is answered ``payload_too_large`` (the
rest of it is skipped); an event's data larger than ``max_event_bytes`` likewise.
Cut-offs: a client that goes away half way has every complete line it sent before
the cut published once; a partial last line is not (at the end of a body, the last
line needs no newline).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from server.auth import EVERYTHING, Grant, authorize
from server.broker.base import Published, PublishRequest
from server.codec import dump_json, load_json, may_hold_long_integers
from server.commands import MAX_KEY_LENGTH
from server.errors import SquallError
from server.hub import Hub
from server.topics import InvalidTopic, validate_topic

MEDIA_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")


class NdjsonPublisher:
    """Publishes an NDJSON body line by line; ``write`` gets the answer lines and
    returns once they are on their way (so a client that does not read its answers
    stops the reading of its body, not the server's memory)."""

    def __init__(self, hub: Hub, rights: Grant, settings: Any,
                 write: Callable[[bytes], Awaitable[None]]) -> None:
        self.hub = hub
        self.rights = rights
        self._checked = rights.publish != EVERYTHING  # else every topic may be published to
        self.settings = settings
        self.write = write
        self.lines = 0  # lines seen, blank ones included
        self.published = 0
        self._partial = bytearray()
        self._skipping = False  # inside a line that went over the limit
        self.overflowed = False
        self._digits_checked = False

    async def feed(self, chunk: bytes) -> None:
        """Publish every line ``chunk`` completes."""
        # one check for all the lines this chunk ends (the first one began earlier)
        self._digits_checked = not may_hold_long_integers(bytes(self._partial) + chunk)
        *complete, rest = chunk.split(b"\n")
        skipped = False  # whether complete[0] ends a line that went over the limit
        if complete:
            complete[0] = bytes(self._partial) + complete[0]
            skipped, self._partial, self._skipping = self._skipping, bytearray(), False
        self._keep_partial(rest)
        await self._publish(complete, skipped)

    async def end(self) -> None:
        """The body ended: its last line needs no newline."""
        last, self._partial = bytes(self._partial), bytearray()
        self._digits_checked = False
        skipped, self._skipping = self._skipping, False
        await self._publish([last] if last.strip() or skipped else [], skipped)

    async def overflow(self, limit: int) -> None:
        """The body went over ``limit``: one error line, and nothing more is read."""
        self.overflowed = True
        self._partial = bytearray()
        await self.write(dump_json({"error": {"code": "payload_too_large", "message": f"the body "
                                        f"is larger than {limit} bytes; the lines before "
                                        "this one were answered"},
                              "line": self.lines + 1}) + b"\n")

    def _keep_partial(self, rest: bytes) -> None:
        if self._skipping:
            return
        self._partial += rest
        if len(self._partial) > self.settings.max_frame_bytes:
            self._partial = bytearray()
            self._skipping = True

    async def _publish(self, lines: list[bytes], first_skipped: bool = False) -> None:
        # one answer per line, in order: its request until it is published, then its
        # outcome; or the error it got
        answers: list[PublishRequest | Published | dict[str, Any]] = []
        requests: list[PublishRequest] = []
        numbers: list[int] = []  # the requests' line numbers
        limit = self.settings.max_frame_bytes
        for index, line in enumerate(lines):
            self.lines += 1
            if (first_skipped and index == 0) or len(line) > limit:
                answers.append(_error(self.lines, SquallError(
                    "payload_too_large", f"the line is longer than {limit} bytes")))
            elif line and not line.isspace():  # blank lines are skipped
                try:
                    request = self._request(line)
                except SquallError as exc:
                    answers.append(_error(self.lines, exc))
                else:
                    requests.append(request)
                    numbers.append(self.lines)
                    answers.append(request)
        if requests:
            await self._send(answers, requests, numbers)
        if answers:
            await self.write(b"".join([_answer(answer) for answer in answers]))

    def _request(self, line: bytes) -> PublishRequest:
        entry = load_json(line, self._digits_checked)
        if not isinstance(entry, dict) or "topic" not in entry or "data" not in entry:
            raise SquallError("invalid_body", 'each line must be {"topic": ..., "data": ...}')
        request = entry_request(entry, self.settings, dump_json, False)
        if self._checked:
            authorize(self.rights, self.rights.check_publish, request.topic)
        return request

    async def _send(self, answers: list[Any], requests: list[PublishRequest],
                    numbers: list[int]) -> None:
        """Publish ``requests`` (those among ``answers``, in order, from lines
        ``numbers``) and put each one's outcome in its place; if the broker failed, its
        error (the group's outcome is unknown: each line says so)."""
        outcomes: Iterator[Published | dict[str, Any]]
        try:
            outcomes = iter(await self.hub.publish(requests))
        except SquallError as exc:
            outcomes = iter([_error(number, exc) for number in numbers])
        else:
            self.published += len(requests)
        for index, answer in enumerate(answers):
            if type(answer) is PublishRequest:
                answers[index] = next(outcomes)


def entry_request(entry: dict[str, Any], settings: Any, dumps: Callable[[Any], bytes],
                  binary: bool) -> PublishRequest:
    """A publish entry of a batch or a stream (a dict with topic and data) as a request;
    ``invalid_topic``, ``invalid_body`` or ``payload_too_large`` saying what is wrong.
    ``dumps`` encodes the data as its body came (kept unless ``binary``)."""
    try:
        topic = validate_topic(entry["topic"], settings.max_topic_length)
    except InvalidTopic as exc:
        raise SquallError("invalid_topic", str(exc)) from None
    key = entry.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH):
        raise SquallError("invalid_body", f"idempotency_key must be a string of 1 to "
                          f"{MAX_KEY_LENGTH} characters")
    data = entry["data"]
    encoded = dumps(data)
    if len(encoded) > settings.max_event_bytes:
        raise SquallError("payload_too_large", f"data is {len(encoded)} bytes; the limit is "
                          f"{settings.max_event_bytes}")
    # made without the named tuple's Python-level __new__: once per entry, at half the cost
    return tuple.__new__(PublishRequest, (topic, data, key, None if binary else encoded))


def _answer(answer: Any) -> bytes:
    """One answer line: a publish's outcome (as bytes: topics and ids need no escaping),
    or an error."""
    if isinstance(answer, Published):
        return b'{"topic":"%s","id":"%s","ts":%d}\n' % (answer.topic.encode(),
                                                       answer.id.encode(), answer.ts)
    return dump_json(answer) + b"\n"


def _error(number: int, exc: SquallError) -> dict[str, Any]:
    """The answer of line ``number`` that failed with ``exc``."""
    return {"error": {"code": exc.code, "message": exc.message}, "line": number}
