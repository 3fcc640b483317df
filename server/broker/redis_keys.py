"""Where the Redis broker keeps things, and the bytes it puts on the wire.

Every key and channel starts with ``squall:``. Topic characters (letters, digits and
``_ - : @``, segments joined by ``.``) never include a space, so a space separates a
topic from an idempotency key. Events travel as one msgpack array
``[topic, id, ts, data]``, the same bytes in the topic's stream and on its channel,
so every node decodes each event once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from server.codec import MAX_DEPTH, check_value, dump_msgpack
from server.errors import SquallError
from server.events import Event, EventId
from server.topics import SINGLE, TAIL

PREFIX = "squall:"
META = PREFIX + "meta"  # hash: epoch, seq (the last id's), forgotten (seq watermark)
TOPICS_BY_SEQ = PREFIX + "topics:seq"  # zset: topic -> seq of its last event
TOPICS_BY_TS = PREFIX + "topics:ts"  # zset: topic -> ts of its last retained event
TOPICS_GONE = PREFIX + "topics:gone"  # zset: forgotten topic -> seq of its last event
STREAM = PREFIX + "stream:"  # + topic: the topic's history
CHANNEL = PREFIX + "event:"  # + topic: where its events are published
NODES = PREFIX + "nodes"  # set of node ids that report subscriber counts
NODE = PREFIX + "node:"  # + node id: hash of subscribed name -> local subscribers
IDEMPOTENCY = PREFIX + "idem:"  # + topic, a space and the key: the first outcome

_ARRAY_OF_FOUR = b"\x94"


def stream_key(topic: str) -> str:
    return STREAM + topic


def channel(topic: str) -> bytes:
    return (CHANNEL + topic).encode()


def node_key(node_id: str) -> str:
    return NODE + node_id


def glob(pattern: str) -> bytes:
    """The Redis PSUBSCRIBE glob for a subscription pattern: a superset of its topics.

    ``*`` (one segment) and ``>`` (one or more trailing segments) both become the
    glob ``*``, which also crosses dots: receivers filter with ``topics.matches``.
    Every other character is escaped, so none is read as glob syntax.
    """
    segments = []
    for segment in pattern.split("."):
        if segment in (SINGLE, TAIL):
            segments.append("*")
        else:
            segments.append("".join(c if c.isalnum() else "\\" + c for c in segment))
    return (CHANNEL + ".".join(segments)).encode()


def encode_head(topic: str) -> bytes:
    """The payload's bytes before the id: the array header and the topic."""
    return _ARRAY_OF_FOUR + dump_msgpack(topic)


def encode_data(data: Any) -> bytes:
    """``data`` as msgpack; raises ``ValueError`` for values msgpack cannot carry."""
    try:
        return dump_msgpack(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None


class StreamEntry(NamedTuple):
    """One retained event and the seq of the event its topic had before it."""

    event: Event
    prev: int


def decode_event(payload: bytes) -> Event | None:
    """The event in a payload, or None when it is not one an event could be (not ours,
    or data no codec could carry, stored before such data was refused)."""
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        check_value(value, MAX_DEPTH + 1)  # the event's array holds the data
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException, SquallError):
        return None
    if not isinstance(value, list) or len(value) != 4:
        return None
    topic, text, ts, data = value
    event_id = EventId.parse(text)
    if not isinstance(topic, str) or event_id is None or not isinstance(ts, int):
        return None
    return Event(topic, text, event_id.seq, ts, data)


def decode_entry(fields: dict[bytes, bytes]) -> StreamEntry | None:
    """A stream entry's event and previous seq, or None when malformed."""
    event = decode_event(fields.get(b"p", b""))
    prev = fields.get(b"v", b"")
    if event is None or not prev.isdigit():
        return None
    return StreamEntry(event, int(prev))
