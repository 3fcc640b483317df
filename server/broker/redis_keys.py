"""Where the Redis brokers keep things, and the bytes they put on the wire.

Every key and channel starts with ``squall:``. Ids, history and idempotency keys live
in an id space (``Space``): one counter, one epoch and one set of topic indexes, with
every key of the space under one prefix. A single Redis has one space, ``squall:``
itself; Redis Cluster has one per slot, ``squall:{tag}:`` with a tag that hashes to
the slot, so that one script can touch every key of a space (see redis_cluster.py for
which slot a topic is in). Topic characters (letters, digits and ``_ - : @``, segments joined
by ``.``) never include a space or a brace, so a space separates a topic from an
idempotency key and a topic never changes which part of a key is the hash tag.
Events travel as one msgpack array ``[topic, id, ts, data]``, the same bytes in the
topic's stream and on its channels, so every node decodes each event once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any, NamedTuple

import msgpack
from redis.asyncio import ConnectionPool
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from server.codec import MAX_DEPTH, check_value, dump_msgpack
from server.errors import SquallError
from server.events import Event, EventId
from server.topics import SINGLE, TAIL

PREFIX = "squall:"
# What a failing Redis (or cluster) raises: each is the broker being unavailable, never
# a bug (RedisClusterException is not a RedisError)
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
NODES = PREFIX + "nodes"  # set of node ids that report subscriber counts (single Redis)

_ARRAY_OF_FOUR = b"\x94"


class Space:
    """The keys of one id space. ``name`` is "" for a single Redis, the slot on a
    cluster; ``prefix`` starts every key and channel of the space:

    - ``meta``: hash of epoch, seq (the newest id's) and forgotten (a seq watermark);
    - ``by_seq``: zset of topic -> seq of its newest event; ``by_ts``: topic -> ts of
      its newest retained event; ``gone``: forgotten topic -> seq of its newest event;
    - per topic: ``stream`` (its history), ``channel`` (where its events go out) and
      ``idempotency`` keys (a publish's first outcome, per key).
    """

    __slots__ = ("by_seq", "by_ts", "gone", "meta", "name", "prefix")

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        self.meta = prefix + "meta"
        self.by_seq = prefix + "topics:seq"
        self.by_ts = prefix + "topics:ts"
        self.gone = prefix + "topics:gone"

    @classmethod
    def tagged(cls, tag: str, name: str) -> Space:
        """A space whose every key carries the hash tag ``{tag}``: all in its slot."""
        return cls(name, f"{PREFIX}{{{tag}}}:")

    @property
    def indexes(self) -> list[str]:
        """The keys every script of the space takes first: meta and the topic indexes."""
        return [self.meta, self.by_seq, self.by_ts, self.gone]

    def stream(self, topic: str) -> str:
        return self.prefix + "stream:" + topic

    def channel(self, topic: str) -> bytes:
        return (self.prefix + "event:" + topic).encode()

    def idempotency(self, topic: str, key: str) -> str:
        return self.prefix + "idem:" + topic + " " + key

    def __repr__(self) -> str:
        return f"Space({self.name!r})"


SINGLE_SPACE = Space("", PREFIX)


def stream_key(topic: str) -> str:
    return SINGLE_SPACE.stream(topic)


def channel(topic: str) -> bytes:
    return SINGLE_SPACE.channel(topic)


def node_key(node_id: str, prefix: str = PREFIX) -> str:
    return prefix + "node:" + node_id


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
    return SINGLE_SPACE.channel(".".join(segments))


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


def milliseconds(seconds: float) -> int:
    """``seconds`` in whole milliseconds, at least 1; 0 stays 0 (none)."""
    return max(1, int(seconds * 1000)) if seconds > 0 else 0


def as_text(value: Any) -> str:
    """A reply from Redis (bytes, or already text) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(exc: BaseException) -> str:
    """An exception for a log line: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def run(pipeline: Any, **options: Any) -> list[Any]:
    """A pipeline's answers. redis-py's cluster pipeline may meet a connection closed
    under it while the cluster changes and raise AttributeError from inside (its issue
    3835): that counts as the lost connection it is."""
    try:
        answers: list[Any] = await pipeline.execute(**options)
    except AttributeError as exc:
        raise ConnectionError(f"the redis connection closed under a pipeline ({exc})") from exc
    return answers


@contextlib.contextmanager
def closed_as_lost() -> Iterator[None]:
    """A write to a connection that closed under it is a lost connection. uvloop says
    so with a RuntimeError where asyncio's own loop drops the write (uvloop issue 506),
    and redis-py passes it on: it becomes the ``ConnectionError`` it is."""
    try:
        yield
    except RuntimeError as exc:
        if "handler is closed" not in str(exc):
            raise
        raise RedisConnectionError(f"the redis connection closed under a write ({exc})") from exc


async def disconnect_idle(pool: ConnectionPool | ClusterNode) -> None:
    """Disconnect the idle connections of ``pool`` (a ``ConnectionPool``, or a cluster's
    ``ClusterNode``), one after another, each only while it is still idle: it reconnects
    when a command takes it next. redis-py's own ways (``disconnect(inuse_connections=
    False)``, ``disconnect_free_connections()``) close them in tasks that start a loop step
    later, by when a command may have taken one: it closed under the command, a needless
    503. The one place that reads redis-py's private free lists (a test names them)."""
    idle: Collection[Any] = (pool._free if isinstance(pool, ClusterNode)
                             else pool._available_connections)
    for connection in list(idle):
        if connection in idle:
            with contextlib.suppress(*FAILURES):
                await connection.disconnect(nowait=True)
