"""An example hooks module: Squall imports it at start when the settings name it.

    hooks = ["examples.squall_hooks"]

Importing the module connects its receivers. Plain receivers run inline when the
server sends a signal, so they must be quick and must not block (no network or disk
I/O); an ``async def`` receiver runs off the server's path on the signals queue.
Receivers take keyword arguments only and end with ``**kwargs``, so that arguments
added in later versions do not break them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from server.signals import (
    ClientInfo,
    Signal,
    client_connected,
    client_disconnected,
    receiver,
    slow_consumer_closed,
    subscribed,
)

log = logging.getLogger("squall.hooks.example")


@dataclass
class ConnectionCount:
    open: int = 0
    total: int = 0


connections = ConnectionCount()


@receiver(subscribed)
def log_subscription(*, client: ClientInfo, topic: str, **kwargs: Any) -> None:
    log.info("%s (%s, %s) subscribed to %s", client.sub or "anonymous", client.id,
             client.ip, topic)


@receiver([client_connected, client_disconnected])
def count_connections(*, signal: Signal, **kwargs: Any) -> None:
    if signal is client_connected:
        connections.open += 1
        connections.total += 1
    else:
        connections.open -= 1


@receiver(slow_consumer_closed)
async def report_slow_consumer(*, client: ClientInfo, queued_bytes: int, **kwargs: Any) -> None:
    # An async receiver could await a non-blocking call here (an HTTP client, a queue).
    log.warning("closed slow consumer %s with %d bytes queued", client.id, queued_bytes)
