"""Webhooks: signals delivered to HTTP endpoints as signed JSON POSTs.

``WebhookDispatcher.start()`` connects one plain receiver to each signal some
endpoint names. On a send it builds the JSON body once and hands it to the queue of
every endpoint that wants that signal; nothing more happens on the sender's path.
Each endpoint has its own bounded queue and its own supervised task, which posts one
delivery at a time, so an endpoint that is down or hangs delays only itself.

A delivery is ``POST <url>`` with ``Content-Type: application/json`` and the body of
docs/protocol.md (Webhooks)::

    {"signal": "subscribed", "ts": <ms>, "node": "<node name>",
     "client": {"id": ..., "sub": ..., "ip": ...} or null,
     "topic": "<topic>" or null, "reason": "<reason>" or null}

plus ``"code"`` for ``client_disconnected``, ``"event": {"topic", "id", "ts",
"data"}`` for ``event_published`` (whose ``"topic"`` is the event's topic) and
``"queued_bytes"`` for ``slow_consumer_closed``. Headers:

- ``X-Squall-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes under
  the endpoint's secret (``verify_signature`` checks one).
- ``X-Squall-Delivery: <id>``: the same on every attempt of one delivery, so that
  receivers can drop duplicates (delivery is at least once).

Each attempt has ``timeout`` seconds. Connection errors, timeouts, 5xx, 408 and 429
are retried, up to ``max_attempts`` attempts in all, after a delay drawn uniformly
from ``[0, min(backoff_cap, backoff_base * 2 ** (attempt - 1))]`` (full jitter). Any
other answer that is not 2xx is final. A delivery given up is logged as a warning;
logs name the URL without its user info and query, never the secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from server.codec import dump_json
from server.signals import SIGNALS, ClientInfo, Signal, WorkQueue

log = logging.getLogger("squall.webhooks")

SIGNATURE_HEADER = "X-Squall-Signature"
DELIVERY_HEADER = "X-Squall-Delivery"
_RETRIED_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """One webhook target and its limits. Invalid settings raise ``ValueError``."""

    url: str
    secret: str = field(repr=False)
    signals: tuple[str, ...]
    timeout: float = 5.0
    max_queue: int = 1000
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", tuple(self.signals))
        problem = next((message for bad, message in self._checks() if bad), None)
        if problem:
            raise ValueError(f"webhook {self.safe_url}: {problem}")

    def _checks(self) -> list[tuple[bool, str]]:
        parts = urlsplit(self.url)
        unknown = sorted(set(self.signals) - SIGNALS.keys())
        return [
            (parts.scheme not in ("http", "https") or not parts.hostname,
             "url must be an absolute http:// or https:// URL"),
            (not self.secret, "secret must not be empty"),
            (not self.signals, "signals must name at least one signal"),
            (bool(unknown), f"unknown signals {unknown}; known: {sorted(SIGNALS)}"),
            (self.timeout <= 0, "timeout must be positive"),
            (self.max_queue < 1, "max_queue must be at least 1"),
            (self.max_attempts < 1, "max_attempts must be at least 1"),
            (self.backoff_base < 0, "backoff_base must not be negative"),
            (self.backoff_cap < self.backoff_base, "backoff_cap must be >= backoff_base"),
        ]

    @property
    def safe_url(self) -> str:
        """The URL without user info, query and fragment: fit for logs and metrics."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))


@dataclass(slots=True)
class WebhookStats:
    """Counters of one endpoint, for metrics.

    ``delivered``: deliveries answered with 2xx. ``failed``: attempts that failed
    (error, timeout or an answer other than 2xx), retries included. ``dropped``:
    deliveries given up: queue full, attempts used up, an answer that is not
    retried, or still queued when the dispatcher closed.
    """

    url: str
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


def sign(secret: str, body: bytes) -> str:
    """The ``X-Squall-Signature`` value of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (for Python receivers)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def webhook_body(signal: str, node: str, ts: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body (as a dict) for a send of ``signal`` with ``kwargs``."""
    client = kwargs.get("client")
    event = kwargs.get("event")
    body: dict[str, Any] = {
        "signal": signal, "ts": ts, "node": node,
        "client": client.as_dict() if isinstance(client, ClientInfo) else None,
        "topic": kwargs.get("topic", getattr(event, "topic", None)),
        "reason": kwargs.get("reason"),
    }
    if signal == "client_disconnected":
        body["code"] = kwargs.get("code")
    if event is not None:
        body["event"] = {"topic": event.topic, "id": event.id, "ts": event.ts,
                         "data": event.data}
    if "queued_bytes" in kwargs:
        body["queued_bytes"] = kwargs["queued_bytes"]
    return body


class _Delivery(NamedTuple):
    id: str
    signal: str
    body: bytes


class _Failure(NamedTuple):
    reason: str
    retry: bool


class _EndpointSender:
    """One endpoint's queue, its task and its counters."""

    def __init__(self, endpoint: WebhookEndpoint,
                 http_client: Callable[[], AsyncHTTPClient]) -> None:
        self.endpoint = endpoint
        self.stats = WebhookStats(endpoint.safe_url)
        self.queue = WorkQueue(f"webhook {endpoint.safe_url}", self._deliver,
                               endpoint.max_queue, log)
        self._http_client = http_client

    def offer(self, delivery: _Delivery) -> None:
        if not self.queue.put(delivery):
            self.stats.dropped += 1

    async def _deliver(self, delivery: _Delivery) -> None:
        signature = sign(self.endpoint.secret, delivery.body)
        for attempt in range(1, self.endpoint.max_attempts + 1):
            failure = await self._attempt(delivery, signature)
            if failure is None:
                self.stats.delivered += 1
                return
            self.stats.failed += 1
            if not failure.retry or attempt == self.endpoint.max_attempts:
                self._give_up(delivery, attempt, failure.reason)
                return
            await asyncio.sleep(self.endpoint.backoff(attempt))

    async def _attempt(self, delivery: _Delivery, signature: str) -> _Failure | None:
        request = HTTPRequest(
            self.endpoint.url, method="POST", body=delivery.body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature,
                     DELIVERY_HEADER: delivery.id},
            connect_timeout=self.endpoint.timeout, request_timeout=self.endpoint.timeout,
            follow_redirects=False, user_agent="Squall-Webhooks")
        try:
            response = await self._http_client().fetch(request, raise_error=False)
        except (HTTPClientError, OSError) as exc:
            return _Failure(str(exc) or type(exc).__name__, retry=True)
        if 200 <= response.code < 300:
            return None
        return _Failure(f"answered {response.code}",
                        retry=response.code >= 500 or response.code in _RETRIED_4XX)

    def _give_up(self, delivery: _Delivery, attempts: int, reason: str) -> None:
        self.stats.dropped += 1
        log.warning("webhook %s: dropping %s delivery %s after %d attempt(s): %s",
                    self.endpoint.safe_url, delivery.signal, delivery.id, attempts, reason)


class WebhookDispatcher:
    """Delivers the signals each endpoint names to it; see the module docstring.

    ``http_client``: the client to post with; by default the dispatcher makes its own
    on first use, with one connection slot per endpoint so that a hanging endpoint
    never holds a slot another needs, and closes it in ``close``. A client passed in
    is not closed, and should allow at least as many requests at once as there are
    endpoints.
    """

    def __init__(self, endpoints: Iterable[WebhookEndpoint], node_name: str,
                 http_client: AsyncHTTPClient | None = None) -> None:
        self.node_name = node_name
        self._client = http_client
        self._owns_client = http_client is None
        self._senders = [_EndpointSender(endpoint, self._http_client) for endpoint in endpoints]
        self._routes: dict[str, list[_EndpointSender]] = {}
        for sender in self._senders:
            for name in sender.endpoint.signals:
                self._routes.setdefault(name, []).append(sender)
        self._closed = False

    @property
    def stats(self) -> list[WebhookStats]:
        """Each endpoint's counters, in the order the endpoints were given."""
        return [sender.stats for sender in self._senders]

    def start(self) -> None:
        """Connect to the signals the endpoints name."""
        if self._closed:
            raise RuntimeError("a closed WebhookDispatcher cannot start again")
        for name in self._routes:
            SIGNALS[name].connect(self._on_signal)
        for sender in self._senders:
            sender.queue.start()

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until every queued delivery is done with; False if ``timeout`` ran out."""
        done = await asyncio.gather(*(s.queue.join(timeout) for s in self._senders))
        return all(done)

    async def close(self, timeout: float = 5.0) -> None:
        """Disconnect, give queued deliveries up to ``timeout`` seconds, then stop."""
        if self._closed:
            return
        self._closed = True
        for name in self._routes:
            SIGNALS[name].disconnect(self._on_signal)
        left = await asyncio.gather(*(s.queue.close(timeout) for s in self._senders))
        for sender, count in zip(self._senders, left, strict=True):
            sender.stats.dropped += count
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    def _http_client(self) -> AsyncHTTPClient:
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True,
                                           max_clients=max(10, len(self._senders)))
        return self._client

    def _on_signal(self, signal: Signal, sender: object, **kwargs: Any) -> None:
        senders = self._routes.get(signal.name)
        if not senders:
            return
        ts = int(time.time() * 1000)
        body = dump_json(webhook_body(signal.name, self.node_name, ts, kwargs))
        delivery = _Delivery(uuid.uuid4().hex, signal.name, body)
        for endpoint_sender in senders:
            endpoint_sender.offer(delivery)
