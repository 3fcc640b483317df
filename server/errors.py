"""The error catalogue of docs/protocol.md: every failure a client can cause has a code."""

from __future__ import annotations

# code -> HTTP status
STATUS: dict[str, int] = {
    "invalid_topic": 400,
    "invalid_body": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "upgrade_required": 426,
    "too_many_subscriptions": 429,
    "internal_error": 500,
    "broker_unavailable": 503,
}


class SquallError(Exception):
    """An error a client caused or must be told about, with its protocol code.

    Handlers turn it into ``{"error": {"code", "message"}}`` with the code's HTTP
    status, or into a WebSocket ``error`` frame.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 400)


class BrokerUnavailable(SquallError):
    """The broker could not confirm an operation within its timeout."""

    def __init__(self, message: str = "the broker could not confirm the publish in time") -> None:
        super().__init__("broker_unavailable", message)
