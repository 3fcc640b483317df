"""Concurrent publishes share script calls: one call at a time per id space.

While a call for a space is under way, later publishes to that space wait and then
go together in the next one (in arrival order, at most ``max_events`` events a
call), so a busy node pays the round trip per group, not per request; publishes to
other spaces (other shards of a cluster) go their own way and never wait behind it.
A publish that comes when nothing is under way for its space goes at once. Each
publish waits at most ``timeout`` from its call, queued or not; a part that gave up
before its group was sent is never sent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from server.broker.redis_keys import Space
from server.errors import BrokerUnavailable

log = logging.getLogger("squall.broker.redis")

Send = Callable[[Space, list[Any]], Awaitable[list[Any]]]


class _Entry:
    __slots__ = ("events", "waiter")

    def __init__(self, events: list[Any], waiter: asyncio.Future[list[Any]]) -> None:
        self.events = events
        self.waiter = waiter


class _Queue:
    __slots__ = ("space", "task", "waiting")

    def __init__(self, space: Space) -> None:
        self.space = space
        self.waiting: collections.deque[_Entry] = collections.deque()
        self.task: asyncio.Task[None] | None = None


class Batches:
    """Groups publishes per space and sends each group with ``send(space, events)``,
    which returns one outcome per event or raises ``BrokerUnavailable`` (every publish
    of the group is then unavailable: it may or may not have happened)."""

    def __init__(self, send: Send, timeout: float, max_events: int) -> None:
        self._send = send
        self._timeout = timeout
        self._max_events = max_events
        self._queues: dict[str, _Queue] = {}

    async def publish(self, parts: Sequence[tuple[Space, list[Any]]]) -> list[list[Any]]:
        """The outcomes of each part's events; ``BrokerUnavailable`` after the timeout,
        or when a part's call failed (then the others' outcomes are unknown too)."""
        loop = asyncio.get_running_loop()
        entries = []
        for space, events in parts:
            entry = _Entry(events, loop.create_future())
            entry.waiter.add_done_callback(_retrieved)  # its publisher may be gone
            queue = self._queues.get(space.name)
            if queue is None:
                queue = self._queues[space.name] = _Queue(space)
            queue.waiting.append(entry)
            if queue.task is None:
                queue.task = loop.create_task(self._run(queue))
            entries.append((queue, entry))
        waiting = asyncio.gather(*(entry.waiter for _, entry in entries),
                                 return_exceptions=True)
        try:
            async with asyncio.timeout(self._timeout):
                outcomes = await asyncio.shield(waiting)
        except (TimeoutError, asyncio.CancelledError) as exc:
            for queue, entry in entries:
                if entry in queue.waiting:  # never sent: not published, now or later
                    queue.waiting.remove(entry)
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable() from None
            raise
        found = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            found.append(outcome)
        return found

    async def close(self) -> None:
        for queue in list(self._queues.values()):
            if queue.task is not None:
                queue.task.cancel()
                await asyncio.gather(queue.task, return_exceptions=True)

    async def _run(self, queue: _Queue) -> None:
        try:
            await self._drain(queue)
        except Exception:  # a bug: logged here, its publishes answered unavailable below
            log.exception("grouping publishes for space %r failed", queue.space.name)
        finally:  # stopped (closing) or a bug: nobody may wait for a call that never comes
            queue.task = None
            while queue.waiting:
                _fail(queue.waiting.popleft())
            if self._queues.get(queue.space.name) is queue:
                del self._queues[queue.space.name]

    async def _drain(self, queue: _Queue) -> None:
        while queue.waiting:
            group = [queue.waiting.popleft()]
            count = len(group[0].events)
            while (queue.waiting
                   and count + len(queue.waiting[0].events) <= self._max_events):
                group.append(queue.waiting.popleft())
                count += len(group[-1].events)
            await self._send_group(queue.space, group)

    async def _send_group(self, space: Space, group: list[_Entry]) -> None:
        try:
            outcomes = await self._send(space, [event for entry in group
                                                for event in entry.events])
        except BrokerUnavailable:
            for entry in group:
                _fail(entry)
            return
        except BaseException:
            for entry in group:
                _fail(entry)
            raise
        at = 0
        for entry in group:
            if not entry.waiter.done():  # its publisher may have gone (cancelled)
                entry.waiter.set_result(outcomes[at:at + len(entry.events)])
            at += len(entry.events)


def _fail(entry: _Entry) -> None:
    if not entry.waiter.done():
        entry.waiter.set_exception(BrokerUnavailable())


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
