"""The operator API and presence: ``POST /v1/disconnect``, ``GET /v1/topics/{name}/presence``.

``POST /v1/disconnect`` takes ``{"sub": ...}`` or ``{"client": ...}``, an optional
``code`` (4000 to 4999, default 4010) and ``reason`` (at most ``MAX_REASON_BYTES``
of UTF-8, what a WebSocket close frame carries); every node closes the matching
connections, and the answer is ``202 {"accepted": true}`` once the broker took the
request. API keys only: a token gets 403, no credential 401. The body is JSON or
msgpack of at most ``MAX_BODY_BYTES``.

``GET /v1/topics/{name}/presence``: the clients subscribed to exactly that name (a
topic or a pattern) on every live node, oldest first, at most ``MAX_LIST``. API
keys, or a token whose subscribe grant covers the name.
"""

from __future__ import annotations

from typing import Any

from handlers.base import ApiHandler
from handlers.publish import decode_body
from server.auth import Forbidden, Unauthorized
from server.broker.base import Disconnect
from server.errors import SquallError
from server.presence import MAX_LIST
from server.topics import InvalidTopic, validate_pattern

DEFAULT_CODE = 4010
MAX_REASON_BYTES = 123
MAX_BODY_BYTES = 4096
_FIELDS = ("sub", "client", "code", "reason")
EXPECTED = '{"sub": "alice"} or {"client": "c-..."}, with "code" and "reason" if wanted'


class DisconnectHandler(ApiHandler):
    """``POST /v1/disconnect``: close a subject's or a client's connections everywhere."""

    async def post(self) -> None:
        self.grant().check_operator("disconnecting clients")
        request = parse_disconnect(self._body())
        await self.node.broker.disconnect(request)
        self.reply(202, {"accepted": True})

    def _body(self) -> Any:
        body = self.request.body
        if len(body) > MAX_BODY_BYTES:
            raise SquallError("payload_too_large", f"the body is larger than "
                              f"{MAX_BODY_BYTES} bytes")
        return decode_body(self.request.headers.get("Content-Type"), body, EXPECTED)[0]


def parse_disconnect(body: Any) -> Disconnect:
    """The request in a decoded body; ``invalid_body`` saying what is wrong."""
    if not isinstance(body, dict):
        raise SquallError("invalid_body", f"the body must be an object; send {EXPECTED}")
    unknown = sorted(str(key)[:40] for key in body if key not in _FIELDS)
    if unknown:
        raise SquallError("invalid_body", f"unknown fields {unknown}; send {EXPECTED}")
    targets = [key for key in ("sub", "client") if key in body]
    if len(targets) != 1:
        raise SquallError("invalid_body", f"give exactly one of sub and client; send {EXPECTED}")
    target = body[targets[0]]
    if not isinstance(target, str) or not 0 < len(target) <= 1024:
        raise SquallError("invalid_body", f"{targets[0]} must be a string of 1 to 1024 "
                          "characters")
    code = body.get("code", DEFAULT_CODE)
    if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
        raise SquallError("invalid_body", "code must be a whole number from 4000 to 4999")
    reason = body.get("reason", "disconnected by the backend")
    if not isinstance(reason, str) or not _fits(reason):
        raise SquallError("invalid_body", f"reason must be a string of at most "
                          f"{MAX_REASON_BYTES} bytes of UTF-8")
    if targets[0] == "sub":
        return Disconnect(target, None, code, reason)
    return Disconnect(None, target, code, reason)


def _fits(reason: str) -> bool:
    """Whether ``reason`` is UTF-8 (no lone surrogates) of at most ``MAX_REASON_BYTES``."""
    try:
        return len(reason.encode()) <= MAX_REASON_BYTES
    except UnicodeEncodeError:
        return False


class PresenceHandler(ApiHandler):
    """``GET /v1/topics/{name}/presence``: who is subscribed to that exact name."""

    async def get(self, raw: str) -> None:
        try:
            name = validate_pattern(raw, self.node.settings.max_topic_length)
        except InvalidTopic as exc:
            raise SquallError("invalid_topic", str(exc)) from None
        grant = self.grant()
        if not grant.operator:
            if grant.anonymous:
                raise Unauthorized("presence needs an API key or a token whose subscribe "
                                   f"grant covers {name!r}")
            if not grant.may_subscribe(name):
                raise Forbidden(f"this credential may not subscribe to {name!r}, so it may "
                                "not see who does")
        found = await self.node.broker.presence(name, MAX_LIST)
        clients = sorted((_client(entry) for entry in found.entries),
                         key=lambda client: (client["connected_at"], client["id"]))
        self.reply(200, {"topic": name, "count": found.count, "clients": clients,
                         "truncated": found.truncated})


def _client(entry: dict[str, Any]) -> dict[str, Any]:
    connected_at = entry.get("connected_at")
    return {"id": str(entry.get("id")), "sub": entry.get("sub"), "node": entry.get("node"),
            "connected_at": connected_at if isinstance(connected_at, int) else 0,
            "info": entry.get("info")}
