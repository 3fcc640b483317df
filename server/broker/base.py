"""The broker interface: where events get their ids, are retained, and come back from;
who is subscribed where (presence); and the control messages every node hears.

A node publishes through its broker and receives every event (its own and other
nodes') through the ``on_event`` callback the broker was started with. Brokers are
chosen by URL (``memory://``, ``redis://host:6379/0``,
``redis+cluster://host:7000[,host:7001...]``) with ``create_broker``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from server.events import Event, EventId
from server.history import Replay, Retention
from server.topics import covers

OCCUPIED = "topic_occupied"
VACATED = "topic_vacated"

EventHandler = Callable[[Event], None]
GapHandler = Callable[[str], None]
LocalCounts = Callable[[Sequence[str]], Mapping[str, int]]
PresenceNotice = tuple[str, dict[str, Any]]
"""``("join" | "leave", entry)``: one change of a name's presence, as nodes hear it."""
PresenceHandler = Callable[[str, list[PresenceNotice]], None]
LifecycleHandler = Callable[[str, str], None]
DisconnectHandler = Callable[["Disconnect"], None]
LocalNames = Callable[[], Iterable[str]]
LostHandler = Callable[[list[str]], None]


class PublishRequest(NamedTuple):
    """One event to publish; ``idempotency_key`` makes a retry safe. ``data_json`` is
    the data's JSON when the publisher encoded it already (to measure it, say), so
    that nobody encodes it again."""

    topic: str
    data: Any
    idempotency_key: str | None = None
    data_json: bytes | None = None


class Publishable(Protocol):
    """What a broker reads of a publish: a ``PublishRequest``, or anything with its
    fields (a client's ``publish`` command is its own request)."""

    @property
    def topic(self) -> str: ...

    @property
    def data(self) -> Any: ...

    @property
    def idempotency_key(self) -> str | None: ...

    @property
    def data_json(self) -> bytes | None: ...


class Published(NamedTuple):
    """The outcome of one publish. ``duplicate``: a retry answered with the first id."""

    topic: str
    id: str
    ts: int
    duplicate: bool = False


class PresenceChange(NamedTuple):
    """One change of this node's presence: ``client`` (an id) subscribed to ``name`` with
    ``entry`` (its JSON: ``{"id", "sub", "node", "connected_at", "info"}``), or, with
    ``entry`` None, is no longer subscribed to it."""

    name: str
    client: str
    entry: bytes | None


def presence_difference(held: Mapping[str, Mapping[str, bytes]],
                        wanted: Mapping[str, Sequence[tuple[str, bytes]]],
                        ) -> list[PresenceChange]:
    """The changes that turn a node's entries ``held`` (name -> client -> entry) into
    ``wanted`` (see ``Broker.replace_presence``): leaves first, then joins and updates."""
    changes: list[PresenceChange] = []
    for name in sorted({*held, *wanted}):
        old, new = held.get(name, {}), dict(wanted.get(name, ()))
        changes += [PresenceChange(name, client, None) for client in old if client not in new]
        changes += [PresenceChange(name, client, entry) for client, entry in new.items()
                    if old.get(client) != entry]
    return changes


@dataclass(frozen=True)
class PresenceList:
    """Who is subscribed to a name: ``count`` entries on live nodes, at most ``limit``
    of them decoded in ``entries``."""

    count: int
    entries: list[dict[str, Any]]
    truncated: bool


class Disconnect(NamedTuple):
    """An operator's disconnect: every client with this ``sub``, or the one with id
    ``client``, is closed with ``code`` and ``reason``."""

    sub: str | None
    client: str | None
    code: int
    reason: str


@dataclass(frozen=True)
class PresenceOptions:
    """``topics``: patterns whose names announce joins and leaves; ``ttl``: seconds after
    which a node that stopped refreshing its presence is taken out by the others;
    ``debounce``: seconds a name stays empty before it is vacated."""

    topics: tuple[str, ...] = ()
    ttl: float = 30.0
    debounce: float = 2.0

    def announces(self, name: str) -> bool:
        """Whether joins and leaves of ``name`` (a topic or pattern) are announced."""
        return any(covers(pattern, name) for pattern in self.topics)


@dataclass(frozen=True)
class BrokerOptions:
    """Settings every broker honours."""

    retention: Retention = field(default_factory=Retention)
    timeout: float = 3.0
    dedupe_window: float = 300.0
    dedupe_max_keys: int = 100_000
    wait_replicas: int = 0  # replicas that must acknowledge a publish (Redis brokers)
    presence: PresenceOptions = field(default_factory=PresenceOptions)


class Broker(abc.ABC):
    """Publishes events, retains their history and hands every event to the node.

    Guarantees every implementation keeps:

    - Ids are unique, and increase in publish order within a topic and across its id
      space, so one id also says where a pattern subscription of that space stood.
      The memory and Redis brokers are one id space; the cluster broker has one per
      hash tag (a topic's first segment), and a pattern whose topics lie in several
      (``*.created``) is never resumed (``recovered: false``).
    - Events of one topic reach ``on_event`` in publish order, each once.
    - ``publish`` returns only after the event is durable in the broker's history
      and on its way to every node; it raises ``BrokerUnavailable`` when that cannot
      be confirmed within ``options.timeout`` (the event may or may not have been
      published: a retry with the same idempotency key is safe).
    - ``history`` never returns part of a gap: every retained event after ``since``,
      or ``recovered=False`` with nothing, except for an id of an epoch whose history
      the broker lost (a restart without persistence): then every retained event of
      the current epoch, with ``recovered=False``, since each was accepted after the
      loss. ``Replay.last_id`` is the broker's position when it read.
    - ``position(name)`` is the newest id given out in ``name``'s id space (its epoch
      made first if there is none yet): every event of the space published after the
      call returns has a larger id, so a subscription made afterwards can always
      resume from it.
    - When events of a subscribed name were lost to this node and cannot be replayed
      (a broker outage longer than the history), ``on_gap(name)`` is called; the node
      closes that name's subscribers so they resume with ``since``.

    Presence (who is subscribed to which name, on every node) and lifecycle:

    - Entries are kept per name (a topic or a pattern, exactly as subscribed) and
      client id, at most one each. ``update_presence`` applies this node's changes in
      order. A batch whose outcome is unknown (``BrokerUnavailable``) may be sent
      again: that leaves the same entries, and announces nothing twice unless the
      batch itself undid one of its changes (a leave and a join of one client, then
      announced again as a pair).
    - Joins and leaves: for a name ``options.presence.announces``, each change that
      adds an entry that was absent is a ``"join"`` and each that removes one that was
      present a ``"leave"`` (an entry replaced is neither). They reach ``on_presence``
      of every node with a subscription of that very name (this one included), in
      one order that all of them see, the order in which the broker applied them;
      with the name's events too, when the name is a topic. Lost with a lost broker
      connection (not replayed).
    - Lifecycle: ``on_lifecycle(name, OCCUPIED)`` when a name gets its first entry on
      any node while it was not occupied; ``on_lifecycle(name, VACATED)`` once it has
      had none for ``options.presence.debounce`` seconds (so a client back within them
      fires neither), or at once when the last entries were those of a dead node.
      They alternate per name, and exactly one node is told of each.
    - A node that stops refreshing its presence (it died) is taken out by the others
      within ``options.presence.ttl`` seconds: its entries are removed, announced as
      leaves, and the names it leaves empty are vacated. Should it come back, it calls
      ``on_presence_lost(names)`` and the node writes those names' entries again.
      Presence state in the backend expires on its own when no node refreshes it.
    - ``presence(name, limit)`` counts the entries of live nodes only.

    Control: ``disconnect`` reaches ``on_disconnect`` of every node (this one too)
    within about a second, at most once; a node cut off from the broker at the time
    misses it.

    The node sets ``on_gap``, ``local_counts`` (this node's subscribers of each given
    topic or pattern), ``on_presence``, ``on_lifecycle``, ``on_disconnect``,
    ``local_names`` (the names this node's clients are subscribed to) and
    ``on_presence_lost`` before ``start``.
    """

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self._on_event: EventHandler = _ignore
        self.on_gap: GapHandler = _ignore_gap
        self.local_counts: LocalCounts = _no_counts
        self.on_presence: PresenceHandler = _ignore_presence
        self.on_lifecycle: LifecycleHandler = _ignore_lifecycle
        self.on_disconnect: DisconnectHandler = _ignore_disconnect
        self.local_names: LocalNames = _no_names
        self.on_presence_lost: LostHandler = _ignore_lost

    async def start(self, on_event: EventHandler) -> None:
        """Connect, and from now on pass every event to ``on_event``."""
        self._on_event = on_event

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections; publishing after this fails."""

    @abc.abstractmethod
    async def publish(self, requests: Sequence[Publishable]) -> list[Published]:
        """Publish a batch in order; all or, on ``BrokerUnavailable``, unknown."""

    @abc.abstractmethod
    async def history(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        """Retained events of a topic or pattern after ``since``, oldest first."""

    @abc.abstractmethod
    async def position(self, name: str) -> EventId:
        """The newest id given out in the id space of the topic or pattern ``name``;
        raises ``BrokerUnavailable`` (see the class)."""

    @abc.abstractmethod
    async def last_ids(self, topics: Sequence[str]) -> dict[str, str]:
        """The newest retained id of each topic that has one."""

    @abc.abstractmethod
    async def retained_topics(self) -> list[str]:
        """Topics with retained history."""

    @abc.abstractmethod
    async def subscriber_counts(self, topics: Sequence[str]) -> dict[str, int]:
        """Subscribers of each of ``topics`` on every node, and of any other topic some
        node subscribes to by name; topics without subscribers may be left out."""

    @abc.abstractmethod
    async def update_presence(self, changes: Sequence[PresenceChange]) -> None:
        """Apply this node's presence changes in order (see the class); raises
        ``BrokerUnavailable`` when that cannot be confirmed in time."""

    @abc.abstractmethod
    async def replace_presence(self, entries: Mapping[str, Sequence[tuple[str, bytes]]],
                               ) -> None:
        """Make this node's presence exactly ``entries`` (name -> ``(client id, entry)``
        pairs; a name left out has none of this node's clients), announcing and weighing
        what that changes as ``update_presence`` would; ``BrokerUnavailable``. For a node
        whose changes piled up past their bound while the broker did not answer."""

    @abc.abstractmethod
    async def presence(self, name: str, limit: int) -> PresenceList:
        """Who is subscribed to exactly ``name`` on live nodes; ``BrokerUnavailable``."""

    @abc.abstractmethod
    async def disconnect(self, request: Disconnect) -> None:
        """Have every node close the matching clients; raises ``BrokerUnavailable``
        when the request cannot be sent."""

    async def subscribe(self, name: str) -> None:  # noqa: B027 - optional hook
        """The node's first local subscriber of a topic or pattern arrived.

        Returns once ``name``'s events reach ``on_event``; raises ``BrokerUnavailable``
        when that cannot be confirmed (nothing is then subscribed).
        """

    async def unsubscribe(self, name: str) -> None:  # noqa: B027 - optional hook
        """The node's last local subscriber of a topic or pattern left."""

    @property
    def ready(self) -> bool:
        """Whether the broker can publish and deliver now (for ``/readyz``)."""
        return True

    @property
    def reconnects(self) -> int:
        """Times the connection to the backend was made again after it was lost."""
        return 0


def _ignore(event: Event) -> None:
    pass


def _ignore_gap(name: str) -> None:
    pass


def _no_counts(names: Sequence[str]) -> Mapping[str, int]:
    return {}


def _ignore_presence(name: str, notices: list[PresenceNotice]) -> None:
    pass


def _ignore_lifecycle(name: str, signal: str) -> None:
    pass


def _ignore_disconnect(request: Disconnect) -> None:
    pass


def _no_names() -> Iterable[str]:
    return ()


def _ignore_lost(names: list[str]) -> None:
    pass


def create_broker(url: str, options: BrokerOptions) -> Broker:
    """The broker for ``url``; optional dependencies are imported only when used."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        from server.broker.memory import MemoryBroker

        return MemoryBroker(options)
    if scheme in ("redis", "rediss", "unix"):
        from server.broker.redis import RedisBroker

        return RedisBroker(url, options)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from server.broker.redis_cluster import RedisClusterBroker

        return RedisClusterBroker(url, options)
    raise ValueError(f"unsupported broker URL scheme {scheme!r}; use memory://, "
                     "redis://HOST:6379/0 or redis+cluster://HOST:7000,HOST:7001")
