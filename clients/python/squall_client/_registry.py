"""The subscriber's subscriptions: where each one stands, and which match a topic.

A subscription is *live* once the current connection confirmed it (``subscribed``),
*in flight* while its subscribe is sent and unanswered (``ref`` is set), and
*waiting* otherwise (not yet sent on this connection, or to be sent again after a
``broker_unavailable``). Its ``position`` is the id to resume from: the last event
it delivered, or the ``last_id`` the server gave when it took effect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from squall_client.topics import matches

# Topics whose matching subscriptions are remembered; past it the memo starts afresh.
MEMO_TOPICS = 10_000


class Subscription:
    """One subscribed name (a topic or a pattern) and its resume state."""

    __slots__ = ("attempt", "confirmed", "live", "name", "no_position", "position", "ref",
                 "retry", "skipped_to", "skipping", "started")

    def __init__(self, name: str, since: str | None) -> None:
        self.name = name
        self.position = since
        self.live = False
        self.ref: int | None = None
        self.started = False        # confirmed once: the application counts on it
        self.attempt = 0            # retries after broker_unavailable, for the backoff
        self.retry: asyncio.TimerHandle | None = None
        self.no_position = False    # resumed blind (an older server): owes a Gap
        self.skipping = False       # its replay did not fit: dropping it
        self.skipped_to: str | None = None
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.confirmed.add_done_callback(_retrieve)

    def __repr__(self) -> str:
        state = "live" if self.live else "in flight" if self.ref is not None else "waiting"
        return f"<Subscription {self.name!r} {state} at {self.position!r}>"


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark an outcome nobody awaited as seen (asyncio would log it otherwise)."""
    if not future.cancelled():
        future.exception()


class Registry:
    """Subscriptions by name, in the order they were made, and by in-flight ref."""

    def __init__(self) -> None:
        self.by_name: dict[str, Subscription] = {}
        self.in_flight: dict[int, Subscription] = {}  # in the order they were sent
        self._memo: dict[str, tuple[Subscription, ...]] = {}
        self.unsettled = 0  # subscriptions not live on this connection

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self.by_name.values()))

    def __len__(self) -> int:
        return len(self.by_name)

    def add(self, subscription: Subscription) -> None:
        self.by_name[subscription.name] = subscription
        self._changed()

    def remove(self, subscription: Subscription) -> None:
        if self.by_name.get(subscription.name) is subscription:
            del self.by_name[subscription.name]
        if subscription.ref is not None:
            self.in_flight.pop(subscription.ref, None)
            subscription.ref = None
        if subscription.retry is not None:
            subscription.retry.cancel()
            subscription.retry = None
        self._changed()

    def sent(self, subscription: Subscription, ref: int) -> None:
        subscription.ref = ref
        self.in_flight[ref] = subscription

    def answered(self, ref: object) -> Subscription | None:
        """The in-flight subscription ``ref`` answers, now no longer in flight."""
        subscription = self.in_flight.pop(ref, None) if isinstance(ref, int) else None
        if subscription is not None:
            subscription.ref = None
        return subscription

    def first_in_flight(self) -> Subscription | None:
        """The subscribe the server answers next (it answers them in order)."""
        return next(iter(self.in_flight.values()), None)

    def set_live(self, subscription: Subscription, live: bool) -> None:
        subscription.live = live
        self._changed()

    def disconnected(self) -> None:
        """The connection is gone: nothing is live or in flight any more."""
        self.in_flight.clear()
        for subscription in self.by_name.values():
            subscription.live = False
            subscription.ref = None
            subscription.skipping = False
            if subscription.retry is not None:
                subscription.retry.cancel()
                subscription.retry = None
        self._changed()

    def matching(self, topic: str) -> tuple[Subscription, ...]:
        """Every subscription whose name matches ``topic``, live or not."""
        found = self._memo.get(topic)
        if found is None:
            if len(self._memo) >= MEMO_TOPICS:
                self._memo.clear()
            found = self._memo[topic] = tuple(
                subscription for subscription in self.by_name.values()
                if matches(subscription.name, topic))
        return found

    def _changed(self) -> None:
        self._memo.clear()
        self.unsettled = sum(1 for subscription in self.by_name.values()
                             if not subscription.live)
