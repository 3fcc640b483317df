"""One subscriber connection: a byte-bounded send queue and its writer.

Publishing never waits on a socket. ``enqueue`` appends ready-made frame bytes to the
connection's queue in O(1); the ``Flusher`` then hands each connection that got data
its whole queue as one ``Transport.write``. The transport (the adapter that owns the
socket, see transports/) takes what the kernel takes at once and keeps the rest in
order; the connection waits for that write to finish before the next one, so at most
one batch sits in the transport's buffer and frames never interleave.

Fan-out to N sockets costs N writes per flush, whatever the number of events in it,
so flushes are paced: at low rates each flush runs on the next loop pass, and when
events keep coming the next flush waits a bounded while (a multiple of the last
flush's duration, at most ``max_delay``) to carry all of them at once.

The queue counts queued plus in-flight bytes. Past ``max_queue_bytes`` the
connection is a slow consumer: its queue is dropped and it is closed with 4008.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from server.wire import WireFormat

log = logging.getLogger("squall.connection")

CLOSE_SLOW_CONSUMER = 4008
CLOSE_INTERNAL_ERROR = 1011


class Transport(Protocol):
    """The socket side of a connection: an adapter in transports/ implements it.

    The adapter tells the connection's owner (the session) when the socket is gone;
    writes after that are dropped without an error.
    """

    def write(self, data: bytes | memoryview) -> asyncio.Future[None] | None:
        """Send ``data`` after everything written before, without blocking.

        None when it is all gone (to the kernel, or lost with a closed socket); else a
        future done once the rest has left, or failed when the socket broke first.
        """

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` after what was written (the WebSocket close frame, the
        SSE ``close`` event or the TCP ``close`` line carries it). Idempotent."""


class Flusher:
    """Writes every connection that got data, once per flush.

    A flush runs on the loop pass after the first frame was queued, but not before
    ``pace`` times the previous flush's duration (at most ``max_delay`` seconds) has
    passed since that flush ended. Busy flushes therefore take at most about
    ``1 / (1 + pace)`` of the loop's time, and everything queued meanwhile goes out
    in the same write; a flush after a quiet spell does not wait. ``before`` runs at
    the start of every flush (the hub queues the frames of recent events there).
    """

    def __init__(self, pace: float = 0.0, max_delay: float = 0.0) -> None:
        self.pace = pace
        self.max_delay = max_delay
        self.before: Callable[[], None] | None = None
        self._dirty: list[Connection] = []
        self._scheduled = False
        self._not_before = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, connection: Connection) -> None:
        """``connection`` has data to write: write it at the next flush."""
        self._dirty.append(connection)
        if not self._scheduled:
            self.schedule()

    def schedule(self) -> None:
        """Make sure a flush is coming (for ``before`` to run, say)."""
        if self._scheduled:
            return
        self._scheduled = True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._not_before > loop.time():
            loop.call_at(self._not_before, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        loop = self._loop
        assert loop is not None
        started = loop.time()
        if self.before is not None:
            try:
                self.before()
            except Exception:  # a bug there must not stop every connection's writes
                log.exception("preparing a flush failed")
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            try:
                connection.flush()
            except Exception:
                log.exception("writing to %s failed", connection.info)
                connection.close(CLOSE_INTERNAL_ERROR, "internal error")
        ended = loop.time()
        self._not_before = ended + min(self.max_delay, (ended - started) * self.pace)


class Connection:
    """A subscriber's outgoing side. Single-threaded: use from the IOLoop only."""

    __slots__ = (
        "__weakref__",
        "_drain_waiter",
        "_flusher",
        "_inflight",
        "_marked",
        "_pending",
        "_pending_frames",
        "_queued",
        "_transport",
        "_writing",
        "closed",
        "dropped_frames",
        "hold",
        "info",
        "max_queue_bytes",
        "on_slow",
        "subscriptions",
        "wire",
    )

    def __init__(self, transport: Transport, wire: WireFormat, flusher: Flusher,
                 max_queue_bytes: int, info: Any = None,
                 on_slow: Callable[[Connection], None] | None = None) -> None:
        self.wire = wire
        self.info = info
        self.max_queue_bytes = max_queue_bytes
        self.on_slow = on_slow
        self.closed = False
        self.dropped_frames = 0  # frames thrown away when this closed as a slow consumer
        # owned by the hub: subscribed names, and live events held back during a replay
        self.subscriptions: dict[str, bool] = {}  # name -> its presence entry was written
        self.hold: Any = None
        self._transport = transport
        self._flusher = flusher
        self._pending: list[bytes | memoryview] = []
        self._pending_frames = 0
        self._queued = 0
        self._inflight = 0
        self._marked = False
        self._writing = False
        self._drain_waiter: tuple[int, asyncio.Future[None]] | None = None

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in this connection's queue or in flight to its socket."""
        return self._queued

    def enqueue(self, frames: bytes | memoryview, count: int = 1) -> None:
        """Queue ``count`` complete frames (their bytes, joined) for sending; a memoryview
        lets many connections share one buffer (never changed afterwards).

        O(1); never blocks or raises.
        """
        if self.closed:
            return
        queued = self._queued + len(frames)
        if queued > self.max_queue_bytes:
            self._overflow(count)
            return
        self._queued = queued
        self._pending.append(frames)
        self._pending_frames += count
        if queued > self.max_queue_bytes // 2 and not self._writing:
            # a fast reader must not look slow because a flush is being paced: write now
            self.flush()
            return
        if not self._marked:
            self._marked = True
            self._flusher.mark(self)

    def drained(self, low_water: int) -> asyncio.Future[None]:
        """A future done once at most ``low_water`` bytes are queued, or on close.

        For producers of large bursts (history replays) that must not overflow the
        queue: enqueue up to a budget, then wait for this.
        """
        future = asyncio.get_running_loop().create_future()
        if self.closed or self._queued <= low_water:
            future.set_result(None)
        else:
            self._drain_waiter = (low_water, future)
        return future

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and (self.closed or self._queued <= waiter[0]):
            future = waiter[1]
            self._drain_waiter = None
            if not future.done():
                future.set_result(None)

    def send(self, message: dict[str, Any]) -> None:
        """Encode and queue a control message (replies, errors) in this wire format."""
        self.enqueue(self.wire.frame(message))

    def close(self, code: int, reason: str, drain: bool = False) -> None:
        """Close the transport with ``code``; queued frames go first if ``drain``."""
        if self.closed:
            return
        if drain:
            self._drain()
        self.mark_closed()
        self._transport.close(code, reason)

    def _drain(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_frames = 0
        self._transport.write(data)  # behind any write in flight: the transport keeps order

    def mark_closed(self) -> None:
        """The transport closed: stop writing and release the queue."""
        self.closed = True
        self._pending.clear()
        self._pending_frames = 0
        self._queued = self._inflight
        self._wake_drain()

    def flush(self) -> None:
        """Write the whole queue in one go (called by the Flusher)."""
        self._marked = False
        if self._writing or self.closed or not self._pending:
            return
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_frames = 0
        future = self._transport.write(data)
        if future is None:
            self._queued -= len(data)
            if self._drain_waiter is not None:
                self._wake_drain()
            return
        self._writing = True
        self._inflight = len(data)
        future.add_done_callback(self._on_written)

    def _on_written(self, future: asyncio.Future[None]) -> None:
        self._writing = False
        self._queued -= self._inflight
        self._inflight = 0
        self._wake_drain()
        if future.cancelled() or future.exception() is not None:
            self.mark_closed()
            return
        if self._pending and not self._marked and not self.closed:
            self._marked = True
            self._flusher.mark(self)

    def _overflow(self, count: int) -> None:
        self.dropped_frames = self._pending_frames + count
        queued = self._queued
        log.info("closing slow consumer %s: %d bytes queued", self.info, queued)
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
        if self.on_slow is not None:
            self.on_slow(self)
