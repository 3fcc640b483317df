"""What reaches the subscriber's consumer: each event once, in order, within bounds.

Events for live subscriptions go into a buffer of ``buffer_size`` items that the
iterator empties. While a subscribe is unanswered, events are *held* instead (at
most ``replay_size``), since its replay comes before its ``subscribed`` and a
``Gap`` may have to go first; they are let through, each once, when no subscribe
is left unanswered. Gaps and errors are queued whatever the bound.

A full buffer is an *overflow*: nothing more is taken (the subscriber gives the
connection up) until the consumer has read half of it, and no subscription's
position moves past what was buffered, so a resume replays the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from squall_client._registry import Registry, Subscription
from squall_client.errors import SquallError
from squall_client.models import Event, Gap
from squall_client.topics import matches

log = logging.getLogger("squall_client")

Item = Event | Gap


class Raise:
    """An exception the iterator raises when it reaches this point of the stream."""

    __slots__ = ("error",)

    def __init__(self, error: SquallError) -> None:
        self.error = error


class Delivery:
    """The buffer, the hold and the copies seen. Used from the event loop only."""

    def __init__(self, buffer_size: int, replay_size: int) -> None:
        if buffer_size < 1 or replay_size < 1:
            raise ValueError("buffer_size and replay_size must be at least 1")
        self.buffer_size = buffer_size
        self.replay_size = replay_size
        self.overflowed = False
        self.overflows = 0  # times the consumer fell buffer_size behind
        self.room = asyncio.Event()  # set once an overflowed buffer is half read
        self._buffer: deque[Item | Raise] = deque()
        self._held: list[Event] = []
        # events delivered while a subscription is not live: its replay may repeat them
        self._seen: dict[tuple[str, str], None] = {}
        self._waiter: asyncio.Future[None] | None = None

    # -- the consumer's side --------------------------------------------------------

    def pop(self) -> Item | None:
        """The next item, None when there is none; raises a queued error."""
        buffer = self._buffer
        if not buffer:
            return None
        item = buffer.popleft()
        if self.overflowed and len(buffer) <= self.buffer_size // 2:
            self.room.set()
        if isinstance(item, Raise):
            raise item.error
        return item

    async def wait(self) -> None:
        """Until something is queued (or ``wake`` is called)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._buffer.clear()

    # -- the reader's side ----------------------------------------------------------

    def accept(self, event: Event, matching: tuple[Subscription, ...]) -> bool:
        """Buffer ``event`` for the live subscriptions it matches, once; False when the
        buffer is full (see the module). The path of every event: kept short."""
        if self.overflowed:
            return False  # nothing more until the reconnect, or positions would skip
        seen = self._seen
        if seen and (event.topic, event.id) in seen:
            _advance(matching, event.id)  # a copy: delivered already
            return True
        buffer = self._buffer
        if len(buffer) >= self.buffer_size:
            if any(subscription.live for subscription in matching):
                self._overflow()
                return False
            return True
        wanted = unsettled = False
        for subscription in matching:
            if subscription.live:
                wanted = True
                if _after(event.id, subscription.position):
                    subscription.position = event.id
            else:
                unsettled = True
        if wanted:
            buffer.append(event)
            if unsettled:
                self._remember((event.topic, event.id))
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return True

    def push(self, item: Item | Raise) -> None:
        """Queue a gap or an error: these are never dropped, whatever the bound."""
        self._buffer.append(item)
        self.wake()

    def hold(self, event: Event) -> bool:
        """Hold ``event`` until no subscribe is unanswered; False past ``replay_size``."""
        self._held.append(event)
        return len(self._held) <= self.replay_size

    def holds_for(self, name: str) -> bool:
        """Whether a held event matches the subscription ``name``."""
        return any(matches(name, event.topic) for event in self._held)

    def release(self, registry: Registry) -> None:
        """Let the held events through, each once (no subscribe is unanswered now)."""
        held, self._held = self._held, []
        if held:
            self._deliver(held, registry)
        if not registry.unsettled:
            self._seen.clear()

    def skip(self, name: str, registry: Registry) -> str | None:
        """Empty the hold: let through what live subscriptions want; the id of the
        last held event of ``name`` (whose replay is being skipped), if any."""
        held, self._held = self._held, []
        last = None
        for event in held:
            if matches(name, event.topic):
                last = event.id
        self._deliver(held, registry)
        return last

    def resumed(self) -> None:
        """The overflow is over: a new connection takes events again."""
        self.overflowed = False

    def disconnected(self) -> None:
        """What the connection held is dropped: the next one replays it."""
        self._held.clear()
        self._seen.clear()

    def _deliver(self, held: list[Event], registry: Registry) -> None:
        matching = registry.matching
        if len(registry) == 1:  # one subscription, one replay: no copies to drop
            for event in held:
                if not self.accept(event, matching(event.topic)):
                    return
            return
        # a copy replayed later (another subscription's replay) stands where it is in order
        last = {(event.topic, event.id): index for index, event in enumerate(held)}
        for index, event in enumerate(held):
            if last[event.topic, event.id] == index and not self.accept(event,
                                                                        matching(event.topic)):
                return

    def _remember(self, key: tuple[str, str]) -> None:
        seen = self._seen
        seen[key] = None
        if len(seen) > 2 * self.buffer_size:
            del seen[next(iter(seen))]

    def _overflow(self) -> None:
        if not self.overflowed:
            self.overflows += 1
            log.warning("the squall consumer fell %d events behind; pausing and resuming "
                        "from the server's history", self.buffer_size)
        self.overflowed = True
        self.room.clear()


def _advance(matching: tuple[Subscription, ...], event_id: str) -> None:
    for subscription in matching:
        if subscription.live and _after(event_id, subscription.position):
            subscription.position = event_id


def _after(event_id: str, position: str | None) -> bool:
    """Whether ``event_id`` comes after ``position``. Squall's ids are
    ``<epoch>-<seq>``, the seq growing across topics (docs/protocol.md): events of two
    topics may come out of that order in a resume's merged replays, and a pattern
    subscription's position must not go back then, or its next resume would replay
    what it delivered. Another epoch (the history behind the old one was lost), or an
    id of another shape, is taken as it comes."""
    if position is None:
        return True
    epoch, _, seq = event_id.rpartition("-")
    at_epoch, _, at_seq = position.rpartition("-")
    if epoch != at_epoch or not (seq.isdigit() and at_seq.isdigit()):
        return True
    return int(seq) > int(at_seq)
