"""The client's exceptions: one base class carrying the protocol's error code."""

from __future__ import annotations


class SquallError(Exception):
    """An error Squall answered, or a failure the client gave up on.

    ``code`` is the protocol's error code (``invalid_topic``, ``forbidden``,
    ``payload_too_large``, ...; see docs/protocol.md) or one of the client's own:
    ``unavailable`` (retries ran out before the deadline) and ``closed`` (the client
    was closed). ``status`` is the HTTP status of the answer, None when no HTTP answer
    carried the error (WebSocket error frames, network failures).
    """

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        shown = f"{self.code}: {self.message}"
        return f"{shown} (HTTP {self.status})" if self.status is not None else shown

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, status={self.status!r})"


class SubscriptionError(SquallError):
    """The server refused a subscription (``forbidden``, ``invalid_topic``,
    ``too_many_subscriptions``, ...). The subscription is dropped; others go on."""

    def __init__(self, code: str, message: str, topic: str) -> None:
        super().__init__(code, message)
        self.topic = topic


class Disconnected(SquallError):
    """The server ended the connection for good, so the subscriber stopped.

    ``close_code`` is the WebSocket close code (docs/protocol.md, Close codes): 1000
    (normal close), 4003 (forbidden), 4010 (disconnected by the backend), 1009 and
    4000 (the client sent something the server would not take), or 4001 when no new
    token could be had. ``code`` names it in words (``normal_close``, ``forbidden``,
    ``disconnected``, ``message_too_big``, ``protocol_abuse``, ``unauthorized``).
    """

    def __init__(self, code: str, message: str, close_code: int | None,
                 reason: str = "") -> None:
        super().__init__(code, message)
        self.close_code = close_code
        self.reason = reason
