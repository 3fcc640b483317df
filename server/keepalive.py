"""Server pings for every WebSocket of a node, from one periodic task.

Each connection is pinged every ``interval`` seconds and, if ``timeout`` is set,
closed when no pong has come ``timeout`` seconds after a ping. Tornado would run a
timer task per connection for this (about 1.5 KiB each); here the connections sit in
``SLOTS`` buckets, by the tick at which they joined, and each tick (every ``interval
/ SLOTS`` seconds) checks the bucket pinged ``timeout`` ago and pings the next one.
Times are on that grid: a connection is pinged every ``interval`` (the first time at
most one tick early), and one that does not answer is closed between ``timeout`` and
``timeout + interval / SLOTS`` after the ping. A tick costs its bucket's work, not
all connections'.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from server import tasks

SLOTS = 20


class Peer(Protocol):
    """A connection as the keepalive sees it. Both methods are called from the
    keepalive's task and must not raise."""

    def send_ping(self) -> None:
        """Send a WebSocket ping frame, unless the connection is closing."""

    def ping_timed_out(self) -> None:
        """Close the connection: a ping went unanswered for the timeout."""


class Keepalive:
    """Pings the peers ``add`` registered until ``remove``; ``answered`` notes a pong.

    ``interval`` 0 disables it (no pings, no task); ``timeout`` 0 pings without ever
    closing. A ``timeout`` above ``interval`` acts as ``interval``, as in Tornado.
    """

    def __init__(self, interval: float, timeout: float, slots: int = SLOTS) -> None:
        self.interval = interval
        self.timeout = timeout
        self.step = interval / slots if interval > 0 else 0.0
        self._buckets: list[set[Peer]] = [set() for _ in range(slots)] if interval > 0 else []
        # ticks from a ping to the check of its pong; 0: never checked
        self._deadline = (min(slots, max(1, math.ceil(timeout * slots / interval - 1e-9)))
                          if interval > 0 and timeout > 0 else 0)
        self._unanswered: set[Peer] = set()
        self._tick = 0
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets)

    def add(self, peer: Peer) -> None:
        """Ping ``peer`` from about ``interval`` seconds on."""
        if self._buckets:
            self._buckets[self._tick % len(self._buckets)].add(peer)

    def remove(self, peer: Peer) -> None:
        """Stop pinging ``peer`` (it closed). Idempotent."""
        for bucket in self._buckets:
            bucket.discard(peer)
        self._unanswered.discard(peer)

    def answered(self, peer: Peer) -> None:
        """``peer`` sent a pong."""
        self._unanswered.discard(peer)

    def start(self) -> None:
        """Start the periodic task (not when disabled)."""
        if self._buckets and self._task is None:
            self._task = tasks.supervise("keepalive", lambda: tasks.every(self.step, self.tick))

    async def stop(self) -> None:
        await tasks.stop(self._task)
        self._task = None

    def tick(self) -> None:
        """Close the peers whose pong is overdue, then ping the next bucket."""
        slots = len(self._buckets)
        if not slots:
            return
        self._tick += 1
        if self._deadline:
            checked = self._buckets[(self._tick - self._deadline) % slots]
            for peer in [peer for peer in checked if peer in self._unanswered]:
                self.remove(peer)
                peer.ping_timed_out()
        due = self._buckets[self._tick % slots]
        if self._deadline:
            self._unanswered.update(due)  # before the pings: a pong may come at once
        for peer in list(due):
            peer.send_ping()
