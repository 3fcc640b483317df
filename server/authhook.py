"""The authorization webhook: the team's own backend approves connects and subscribes.

With ``auth_webhook_url`` set, auth is on (even without API keys or JWT keys), and
Squall asks the backend before it admits a WebSocket, and before a subscribe or a
WebSocket publish that the client's grant does not already cover. Each question
is ``POST <url>`` with ``Content-Type: application/json``, signed like every webhook
(``X-Squall-Signature: sha256=<hex>``, HMAC-SHA256 of the body under
``auth_webhook_secret``)::

    {"action": "connect", "node": "squall-1",
     "client": {"id": "c-8f2a", "sub": null, "ip": "203.0.113.7"},
     "request": {"origin": "...", "cookie": "...", "authorization": "...",
                 "user_agent": "...", "query": {"room": ["42"]}}}

    {"action": "subscribe", "node": "squall-1", "client": {...}, "topic": "orders.*"}
    {"action": "publish", "node": "squall-1", "client": {...}, "topic": "chat.room1"}

The backend answers ``200`` with ``{"allow": true}`` or ``{"allow": false, "reason":
"..."}``. A connect answer may also name who the client is and what it may do:
``"sub"``, ``"subscribe": [patterns]``, ``"publish": [patterns]``; those lists then
replace the client's grant (subscribes they cover need no further question).

Fail closed: no answer within ``auth_webhook_timeout`` seconds, an error status, or a
body that is not such an object denies the request, and the failure is logged (never
with the secret or the client's cookies). The webhook never blocks the IOLoop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from server.auth import Forbidden, Grant
from server.codec import dump_json, load_json
from server.errors import SquallError
from server.signals import ClientInfo
from server.topics import InvalidTopic, validate_pattern
from server.webhooks import SIGNATURE_HEADER, sign

log = logging.getLogger("squall.authhook")

MAX_CONCURRENT = 256  # questions in flight at once; more wait (and may time out: denied)
FORWARDED_HEADERS = {"origin": "Origin", "cookie": "Cookie", "authorization": "Authorization",
                     "user_agent": "User-Agent"}


class AuthHook:
    """Asks the authorization webhook; every method denies by raising ``Forbidden``."""

    def __init__(self, url: str, secret: str, timeout: float, node: str,
                 http_client: AsyncHTTPClient | None = None) -> None:
        self.url = url
        self._secret = secret
        self._timeout = timeout
        self._node = node
        self._client = http_client
        self.failures = 0
        self.denials = 0

    async def connect(self, client: ClientInfo, grant: Grant, headers: Mapping[str, str],
                      query: Mapping[str, Sequence[str]]) -> Grant:
        """The grant to admit the client with; ``Forbidden`` when the backend says no."""
        request: dict[str, Any] = {key: headers[name] for key, name in FORWARDED_HEADERS.items()
                                   if name in headers}
        request["query"] = {key: list(values) for key, values in query.items()
                            if key != "token"}
        answer = await self._ask({"action": "connect", "client": client.as_dict(),
                                  "request": request})
        return _granted(grant, answer)

    async def subscribe(self, client: ClientInfo, grant: Grant, topic: str) -> None:
        """Return if ``topic`` may be subscribed to, by the grant or by the backend."""
        if grant.may_subscribe(topic):
            return
        await self._ask({"action": "subscribe", "client": client.as_dict(), "topic": topic})

    async def publish(self, client: ClientInfo, grant: Grant, topic: str) -> None:
        """Return if a client may publish to ``topic``, by its grant or by the backend."""
        if grant.may_publish(topic):
            return
        await self._ask({"action": "publish", "client": client.as_dict(), "topic": topic})

    async def _ask(self, question: dict[str, Any]) -> dict[str, Any]:
        body = dump_json({**question, "node": self._node})
        try:
            response = await self._http().fetch(HTTPRequest(
                self.url, method="POST", body=body, request_timeout=self._timeout,
                connect_timeout=self._timeout, follow_redirects=False,
                headers={"Content-Type": "application/json",
                         SIGNATURE_HEADER: sign(self._secret, body)}))
            answer = load_json(response.body)
        except (HTTPClientError, OSError, SquallError) as exc:
            return self._fail(question["action"], _describe(exc))
        if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
            return self._fail(question["action"], 'the answer is not {"allow": true|false}')
        if not answer["allow"]:
            self.denials += 1
            reason = answer.get("reason")
            raise Forbidden(str(reason)[:200] if reason else f"{question['action']} denied")
        return answer

    def _fail(self, action: str, why: str) -> dict[str, Any]:
        self.failures += 1
        log.warning("authorization webhook failed for %s (%s); denying", action, why)
        raise Forbidden("authorization is unavailable; try again later")

    def _http(self) -> AsyncHTTPClient:
        if self._client is None:  # its own client: webhooks and others never take its slots
            self._client = AsyncHTTPClient(force_instance=True, max_clients=MAX_CONCURRENT)
        return self._client


def _granted(grant: Grant, answer: Mapping[str, Any]) -> Grant:
    changes: dict[str, Any] = {}
    if isinstance(answer.get("sub"), str):
        changes["sub"] = answer["sub"]
    for action in ("subscribe", "publish"):
        if action in answer:
            changes[action] = _patterns(answer[action], action)
    return replace(grant, **changes) if changes else grant


def _patterns(value: Any, action: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Forbidden(f"the authorization answer's {action!r} is not a list")
    try:
        return tuple(validate_pattern(pattern) for pattern in value)
    except InvalidTopic:
        raise Forbidden(f"the authorization answer's {action!r} has a bad pattern") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, HTTPClientError):
        return f"HTTP {exc.code}"
    if isinstance(exc, SquallError):
        return "the answer is not JSON"
    return type(exc).__name__
