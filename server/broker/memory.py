"""The memory broker: one process, history in memory, ids from a local counter."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping, Sequence

from server.broker.base import (
    Broker,
    BrokerOptions,
    Disconnect,
    EventHandler,
    PresenceChange,
    PresenceList,
    Publishable,
    Published,
)
from server.broker.local_presence import LocalPresence
from server.dedupe import DedupeWindow
from server.errors import BrokerUnavailable
from server.events import Event, EventId
from server.history import MemoryHistory, Replay
from server.tasks import every, stop, supervise

# A named tuple made without its Python-level __new__ (every field given): half the
# cost, in the loop that runs once per published event.
_new = tuple.__new__

_EPOCH_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_epoch() -> str:
    """A short random epoch; a new one per process start makes old ids unrecoverable."""
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(6))


class MemoryBroker(Broker):
    """A broker for a single process.

    - Ids: ``<epoch>-<seq>``, a fresh random epoch per start; history does not
      survive a restart, and ids from before it get ``recovered: false``.
    - Publishing is synchronous inside ``publish``: the event is retained and handed
      to ``on_event`` before the call returns, so it can never be unavailable.
    - Nodes: only this one. ``--workers`` above 1 needs a shared broker. Presence
      and disconnects stay in the process (server/broker/local_presence.py): a
      presence change is announced before ``update_presence`` returns.
    """

    def __init__(self, options: BrokerOptions) -> None:
        super().__init__(options)
        self.epoch = new_epoch()
        self._history = MemoryHistory(options.retention, self.epoch)
        self._dedupe: DedupeWindow[Published] = DedupeWindow(
            options.dedupe_window, options.dedupe_max_keys)
        self._seq = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._presence = LocalPresence(options.presence, self)

    async def start(self, on_event: EventHandler) -> None:
        await super().start(on_event)
        self._sweeper = supervise("memory-broker-sweeper", lambda: every(1.0, self._sweep))

    async def close(self) -> None:
        self._closed = True
        await stop(self._sweeper)
        self._presence.close()

    @property
    def ready(self) -> bool:
        return not self._closed

    async def publish(self, requests: Sequence[Publishable]) -> list[Published]:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        ts = int(time.time() * 1000)  # one batch, one time
        outcomes: list[Published] = []
        events: list[Event] = []
        epoch, dedupe = self.epoch, self._dedupe
        try:
            for request in requests:  # one loop, no call per event: the ingest paths' floor
                key = request.idempotency_key
                if key is not None:
                    first = dedupe.recall(request.topic, key)
                    if first is not None:
                        outcomes.append(first._replace(duplicate=True))
                        continue
                self._seq = seq = self._seq + 1
                event = Event(request.topic, f"{epoch}-{seq}", seq, ts, request.data,
                              request.data_json)
                event.size  # noqa: B018 - encodes it: one that cannot fails here
                events.append(event)
                published = _new(Published, (event.topic, event.id, ts, False))
                if key is not None:
                    dedupe.remember(request.topic, key, published)
                outcomes.append(published)
        finally:  # what was made is published, as if one at a time
            self._history.extend(events)
            deliver = self._on_event
            for event in events:
                deliver(event)
        return outcomes

    async def history(self, name: str, since: str | None, limit: int | None = None) -> Replay:
        return self._history.since(name, since, limit)

    async def position(self, name: str) -> EventId:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        return EventId(self.epoch, self._seq)

    async def last_ids(self, topics: Sequence[str]) -> dict[str, str]:
        found = {topic: self._history.last_id(topic) for topic in topics}
        return {topic: last for topic, last in found.items() if last is not None}

    async def retained_topics(self) -> list[str]:
        return list(self._history.topics())

    async def subscriber_counts(self, topics: Sequence[str]) -> dict[str, int]:
        """This node is the only one: its local counts."""
        return dict(self.local_counts(topics))

    async def update_presence(self, changes: Sequence[PresenceChange]) -> None:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        self._presence.apply(changes)

    async def replace_presence(self, entries: Mapping[str, Sequence[tuple[str, bytes]]],
                               ) -> None:
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        self._presence.replace(entries)

    async def presence(self, name: str, limit: int) -> PresenceList:
        return self._presence.listing(name, limit)

    async def disconnect(self, request: Disconnect) -> None:
        """This node is every node: its clients are closed before this returns."""
        if self._closed:
            raise BrokerUnavailable("the broker is closed")
        self.on_disconnect(request)

    def _sweep(self) -> None:
        self._history.expire()
        self._dedupe.expire()
