"""A node: the broker and the hub of one process, built from Settings, with a lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from config.settings import Settings
from server import extensions, signals
from server.auth import Auth
from server.broker.base import Broker, BrokerOptions, Disconnect, PresenceOptions, create_broker
from server.connection import Flusher
from server.history import Retention
from server.hub import Hub
from server.keepalive import Keepalive
from server.metrics import Metrics, MetricSource
from server.presence import Presence, PresenceWriter, presence_metrics
from server.ratelimit import Limits
from server.topics import is_pattern
from server.wire import WireFormat

log = logging.getLogger("squall.node")

LISTING_TTL = 1.0  # seconds one computed topic listing serves GET /v1/topics


class TopicEntry(NamedTuple):
    topic: str
    subscribers: int
    last_id: str | None

CLOSE_GOING_AWAY = 1001
CLOSE_EVENTS_LOST = 4009
# After a flush that took T, a busy node waits WRITE_PACE * T (at most write_delay)
# before the next: writing then takes at most about a third of its time.
WRITE_PACE = 2.0


class Node:
    """Owns the engine of one process. Handlers reach it through ``initialize``."""

    def __init__(self, settings: Settings, broker: Broker | None = None,
                 limits: Limits | None = None) -> None:
        self.settings = settings
        self.shutting_down = False
        self.auth = Auth.from_settings(settings)
        self.limits = limits or Limits(settings)
        self.name = settings.node_name or socket.gethostname()
        self.broker = broker or create_broker(settings.broker, broker_options(settings))
        self.metrics = Metrics()
        self.metric_sources: list[MetricSource] = []
        self.presence = PresenceWriter(self.broker)
        self.hub = Hub(self.broker, max_subscriptions=settings.max_subscriptions,
                       observe_publish=self.metrics.publish_seconds.observe,
                       observe_fanout=self.metrics.fanout_seconds.observe,
                       flusher=Flusher(WRITE_PACE, settings.write_delay),
                       presence=Presence(self.presence, self.name,
                                         self.broker.options.presence),
                       presence_timeout=settings.broker_timeout)
        self.presence.snapshot = self.hub.presence_entries
        self.keepalive = Keepalive(settings.ping_interval, settings.ping_timeout)
        self.heartbeat = Keepalive(settings.sse_heartbeat, 0)  # answered by no one
        # made here, in the worker: ids are unique across workers and nodes
        self._client_prefix = os.urandom(6).hex()
        self._client_ids = itertools.count(1)
        self.metrics.watch(self)
        self.webhooks = extensions.webhook_dispatcher(settings, self.name)
        self.auth_hook = extensions.auth_hook(settings, self.name)
        self.metric_sources.append(
            lambda: extensions.extension_metrics(self.webhooks, self.auth_hook))
        self.metric_sources.append(lambda: presence_metrics(self.presence))
        self.broker.on_gap = self._on_gap
        self.broker.local_counts = self._count_local
        self.broker.on_presence = self.hub.deliver_presence
        self.broker.on_lifecycle = self._on_lifecycle
        self.broker.on_disconnect = self._on_disconnect
        self.broker.local_names = self._local_names
        self.broker.on_presence_lost = self.hub.rewrite_presence
        self._listing: asyncio.Task[list[TopicEntry]] | None = None
        self._listing_until = 0.0

    async def start(self) -> None:
        await self.broker.start(self.hub.deliver)
        self.presence.start()
        self.keepalive.start()
        self.heartbeat.start()
        if self.webhooks is not None:
            self.webhooks.start()

    async def stop(self) -> None:
        """Shut down: ``drain``, then ``close``."""
        await self.drain(self.settings.shutdown_timeout)
        await self.close()

    async def drain(self, timeout: float) -> None:
        """Turn unready, close every client with 1001 (clients reconnect elsewhere)
        and wait, up to ``timeout``, for publishes under way to finish."""
        self.shutting_down = True
        self.hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
        if not await self.hub.idle(timeout):
            log.warning("publishes still under way after %.0fs", timeout)

    async def close(self) -> None:
        """Take this node's clients out of presence, then release the keepalive, the
        broker, the webhooks and the signal queues."""
        await self.keepalive.stop()
        await self.heartbeat.stop()
        self.hub.forget_all()
        left = await self.presence.close(self.settings.broker_timeout)
        if left:
            log.warning("%d presence changes were not written; the other nodes take "
                        "this node's clients out of presence within presence_ttl", left)
        await self.broker.close()
        timeout = self.settings.shutdown_timeout / 2
        if self.webhooks is not None:
            await self.webhooks.close(timeout)
        await signals.shutdown(timeout)

    def new_client_id(self) -> str:
        """A client id no other worker or node gives out: ``c-`` and 48 random bits
        chosen by this node, then a counter."""
        return f"c-{self._client_prefix}{next(self._client_ids):x}"

    def keepalive_for(self, wire: WireFormat) -> Keepalive | None:
        """What keeps a client on ``wire`` alive: pings it must answer (WebSocket), a
        heartbeat it need not answer (SSE), or nothing (TCP)."""
        if wire.ping is None:
            return None
        return self.keepalive if wire.answers_pings else self.heartbeat

    @property
    def ready(self) -> bool:
        return not self.shutting_down and self.broker.ready

    async def topic_listing(self) -> list[TopicEntry]:
        """Every topic with subscribers on some node or retained history, with its
        cluster-wide subscriber count and last id, sorted; computed at most once per
        ``LISTING_TTL`` seconds, however many ask meanwhile (callers filter by grant)."""
        loop = asyncio.get_running_loop()
        cached = self._listing
        if cached is not None and (not cached.done() or loop.time() < self._listing_until):
            return await asyncio.shield(cached)
        self._listing = loop.create_task(self._list_topics())
        return await asyncio.shield(self._listing)

    async def _list_topics(self) -> list[TopicEntry]:
        try:
            broker = self.broker
            subscribed = [name for name, _ in self.hub.router.names() if not is_pattern(name)]
            retained = await broker.retained_topics()
            counts = await broker.subscriber_counts(sorted(set(subscribed).union(retained)))
            topics = sorted(set(retained).union(topic for topic, n in counts.items() if n))
            last_ids = await broker.last_ids(topics)
        except BaseException:
            self._listing = None  # a failure is not kept: the next caller tries again
            raise
        self._listing_until = asyncio.get_running_loop().time() + LISTING_TTL
        return [TopicEntry(topic, counts.get(topic, 0), last_ids.get(topic))
                for topic in topics]

    def _on_lifecycle(self, name: str, signal: str) -> None:
        signals.SIGNALS[signal].send(self.hub, topic=name)

    def _on_disconnect(self, request: Disconnect) -> None:
        closed = self.hub.disconnect(request)
        if closed:
            log.info("closed %d client(s) with %d: %s", closed, request.code,
                     request.reason or "disconnected by the backend")

    def _local_names(self) -> Iterator[str]:
        return (name for name, _ in self.hub.router.names())

    def _on_gap(self, name: str) -> None:
        self.hub.close_subscribers(name, CLOSE_EVENTS_LOST, "events lost; resume with since")

    def _count_local(self, names: Sequence[str]) -> dict[str, int]:
        """Local connections receiving each topic's events; a pattern's own subscribers."""
        router = self.hub.router
        return {name: router.subscribers(name) if is_pattern(name) else len(router.match(name))
                for name in names}


def broker_options(settings: Settings) -> BrokerOptions:
    retention = Retention(size=settings.history_size, ttl=settings.history_ttl,
                          max_topics=settings.history_max_topics,
                          max_bytes=settings.history_max_bytes,
                          max_replay=settings.max_replay_events)
    presence = PresenceOptions(topics=settings.presence_topics, ttl=settings.presence_ttl,
                               debounce=settings.lifecycle_debounce)
    return BrokerOptions(retention=retention, timeout=settings.broker_timeout,
                         dedupe_window=settings.dedupe_window,
                         dedupe_max_keys=settings.dedupe_max_keys,
                         wait_replicas=settings.redis_wait_replicas, presence=presence)
