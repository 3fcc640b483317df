"""The asyncio publisher: the sync publisher's contract over an httpx connection pool."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import httpx

from squall_client._wire import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    BatchEntry,
    Endpoint,
    base_headers,
    encode,
    failure_of,
    new_key,
    published,
    published_batch,
    split_batches,
    with_key,
)
from squall_client.backoff import PUBLISH_BACKOFF, Backoff, RetrySchedule
from squall_client.errors import SquallError
from squall_client.models import Published


class AsyncPublisher:
    """Publishes events over HTTP from asyncio code, with the same guarantees as
    ``Publisher``: one ``Idempotency-Key`` per event, reused on every retry; 503s,
    502/504s, timeouts and connection errors retried with capped exponential backoff
    until ``deadline``; any other error answer raised at once as ``SquallError``.

    Keeps at most ``max_connections`` connections open (concurrent publishes share
    them). Use it as an async context manager, or ``await aclose()``.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 10.0,
                 deadline: float = 30.0, backoff: Backoff = PUBLISH_BACKOFF,
                 max_connections: int = 16, max_batch_events: int = MAX_BATCH_EVENTS,
                 max_batch_bytes: int = MAX_BATCH_BYTES,
                 max_event_bytes: int = MAX_EVENT_BYTES,
                 verify: ssl.SSLContext | bool = True) -> None:
        self._endpoint = Endpoint.parse(url)
        self._headers = base_headers(api_key)
        self.timeout = timeout
        self.deadline = deadline
        self.backoff = backoff
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.max_event_bytes = max_event_bytes
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(base_url=self._endpoint.origin, limits=limits,
                                         timeout=timeout, verify=verify, trust_env=False)
        self._closed = False

    async def publish(self, topic: str, data: Any, *,
                      idempotency_key: str | None = None) -> Published:
        """Publish ``data`` (any JSON value) to ``topic``; its id and timestamp."""
        headers = with_key(self._headers, idempotency_key or new_key())
        answer = await self._post(self._endpoint.topic_path(topic), encode(data), headers)
        return published(answer)

    async def publish_many(self, events: Iterable[BatchEntry]) -> list[Published]:
        """As ``Publisher.publish_many``: batches within the limits, sent in order."""
        outcomes: list[Published] = []
        for batch in split_batches(events, self.max_batch_events, self.max_batch_bytes,
                                   self.max_event_bytes):
            answer = await self._post(self._endpoint.batch_path, batch.body, self._headers)
            outcomes.extend(published_batch(answer, batch.count))
        return outcomes

    async def aclose(self) -> None:
        """Close every connection; publishing afterwards raises ``SquallError("closed")``."""
        self._closed = True
        await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        schedule = RetrySchedule(self.deadline, self.timeout, self.backoff)
        while True:
            if self._closed:
                raise SquallError("closed", "the publisher is closed")
            try:
                response = await self._client.post(path, content=body, headers=headers,
                                                   timeout=schedule.timeout())
            except httpx.TransportError as exc:
                delay = schedule.next_delay(f"{type(exc).__name__}: {exc}", exc)
            else:
                failure = failure_of(response.status_code, response.content)
                if failure is None:
                    return response.content
                delay = schedule.next_delay(str(failure), failure)
            await asyncio.sleep(delay)
