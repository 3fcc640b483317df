"""A node: the broker and the hub of one process, built from Settings, with a lifecycle."""

from __future__ import annotations

import logging
import socket

from config.settings import Settings
from server.broker.base import Broker, BrokerOptions, create_broker
from server.history import Retention
from server.hub import Hub

log = logging.getLogger("squall.node")

CLOSE_GOING_AWAY = 1001


class Node:
    """Owns the engine of one process. Handlers reach it through ``initialize``."""

    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.name = settings.node_name or socket.gethostname()
        self.broker = broker or create_broker(settings.broker, broker_options(settings))
        self.hub = Hub(self.broker, max_subscriptions=settings.max_subscriptions)
        self.shutting_down = False

    async def start(self) -> None:
        await self.broker.start(self.hub.deliver)

    async def stop(self) -> None:
        """Close every connection with 1001 (clients reconnect elsewhere), then the broker."""
        self.shutting_down = True
        self.hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return not self.shutting_down and self.broker.ready


def broker_options(settings: Settings) -> BrokerOptions:
    retention = Retention(size=settings.history_size, ttl=settings.history_ttl,
                          max_topics=settings.history_max_topics,
                          max_bytes=settings.history_max_bytes)
    return BrokerOptions(retention=retention, timeout=settings.broker_timeout,
                         dedupe_window=settings.dedupe_window,
                         dedupe_max_keys=settings.dedupe_max_keys)
