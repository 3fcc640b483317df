"""The synchronous publisher: keep-alive ``http.client`` connections, safe retries.

``http.client`` rather than a higher-level library because the publisher's own cost
per request is most of what a client adds to a round trip: measured here, httpx's
sync client reached about 0.6x and urllib3 about 0.8x the events/s of raw keep-alive
``http.client`` POSTs, this publisher 0.96x to 1.01x (bench/client.py,
docs/performance.md).
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

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

# A kept-alive connection the server closed while it was idle fails with one of these
# on its next use; the request is sent again at once on a new connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)
_FAILURES = (OSError, http.client.HTTPException)


class Publisher:
    """Publishes events over HTTP from synchronous code; safe to share between threads.

    Every event gets an ``Idempotency-Key`` (a new random one unless given) that is
    sent again on every retry, so the server publishes it once. A 503, a 502 or 504
    from a proxy, a timeout or a connection error is retried with capped exponential
    backoff (``backoff``) until ``deadline`` seconds have passed since the call
    began; each attempt may take ``timeout`` seconds. A publish that returns has been
    accepted exactly once; one that raises ``SquallError("unavailable")`` may or may
    not have been (publish again with the same key to be sure). Any other answer
    (4xx) raises ``SquallError`` with the server's ``code``, ``status`` and
    ``message`` at once, never retried.

    Connections are kept alive, at most ``pool_size`` of them idle. Use it as a
    context manager, or call ``close()``.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 10.0,
                 deadline: float = 30.0, backoff: Backoff = PUBLISH_BACKOFF,
                 pool_size: int = 8, max_batch_events: int = MAX_BATCH_EVENTS,
                 max_batch_bytes: int = MAX_BATCH_BYTES,
                 max_event_bytes: int = MAX_EVENT_BYTES,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._endpoint = Endpoint.parse(url)
        self._headers = base_headers(api_key)
        self.timeout = timeout
        self.deadline = deadline
        self.backoff = backoff
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.max_event_bytes = max_event_bytes
        self._pool = _Pool(self._endpoint, pool_size, ssl_context)

    def publish(self, topic: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        """Publish ``data`` (any JSON value) to ``topic``; its id and timestamp."""
        headers = with_key(self._headers, idempotency_key or new_key())
        return published(self._post(self._endpoint.topic_path(topic), encode(data), headers))

    def publish_many(self, events: Iterable[BatchEntry]) -> list[Published]:
        """Publish ``(topic, data)`` or ``(topic, data, idempotency_key)`` entries in
        order, as few ``POST /v1/events`` batches as the limits allow
        (``max_batch_events``, ``max_batch_bytes``: the server's, by default); data
        over ``max_event_bytes`` raises ``payload_too_large`` before anything is sent.

        Each batch is published whole or not at all and retried like ``publish``. If a
        later batch fails, the earlier ones stay published: pass your own keys to make
        running the whole call again safe.
        """
        outcomes: list[Published] = []
        for batch in split_batches(events, self.max_batch_events, self.max_batch_bytes,
                                   self.max_event_bytes):
            answer = self._post(self._endpoint.batch_path, batch.body, self._headers)
            outcomes.extend(published_batch(answer, batch.count))
        return outcomes

    def close(self) -> None:
        """Close every connection; publishing afterwards raises ``SquallError("closed")``."""
        self._pool.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """The body of the first 2xx answer; retries what may succeed later."""
        started = time.monotonic()
        timeout = min(self.timeout, self.deadline)
        schedule: RetrySchedule | None = None  # made on the first failure
        cause: Exception
        while True:
            try:
                status, answer = self._pool.post(path, body, headers, timeout)
            except _FAILURES as exc:
                why, cause = f"{type(exc).__name__}: {exc}", exc
            else:
                failure = failure_of(status, answer)
                if failure is None:
                    return answer
                why, cause = str(failure), failure
            if schedule is None:
                schedule = RetrySchedule(self.deadline, self.timeout, self.backoff,
                                         started=started)
            time.sleep(schedule.next_delay(why, cause))
            timeout = schedule.timeout()


class _Pool:
    """Idle keep-alive connections to one server; each is used by one thread at a time."""

    def __init__(self, endpoint: Endpoint, size: int, ssl_context: ssl.SSLContext | None) -> None:
        self._endpoint = endpoint
        self._size = size
        self._ssl_context = ssl_context
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def post(self, path: str, body: bytes, headers: dict[str, str],
             timeout: float) -> tuple[int, bytes]:
        """One POST: the status and body of the answer."""
        connection = self._take()
        reused = connection.sock is not None
        try:
            try:
                answer = _exchange(connection, path, body, headers, timeout)
            except _STALE:
                if not reused:
                    raise
                connection.close()
                answer = _exchange(connection, path, body, headers, timeout)
        except BaseException:
            connection.close()
            raise
        self._give_back(connection)
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._closed:
                raise SquallError("closed", "the publisher is closed")
            if self._idle:
                return self._idle.pop()
        endpoint = self._endpoint
        if endpoint.scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(endpoint.host, endpoint.port, context=context)
        return http.client.HTTPConnection(endpoint.host, endpoint.port)

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._size:
                self._idle.append(connection)
                return
        connection.close()


def _exchange(connection: http.client.HTTPConnection, path: str, body: bytes,
              headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    connection.timeout = timeout
    if connection.sock is not None:
        connection.sock.settimeout(timeout)
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    return response.status, response.read()
