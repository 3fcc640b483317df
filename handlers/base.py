"""What every HTTP handler shares: JSON/msgpack replies and protocol errors.

Any ``SquallError`` raised by a handler becomes ``{"error": {"code", "message"}}``
with the code's status. Anything else is logged with its traceback and answered
``500 internal_error`` with no detail: a response never carries a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from tornado.web import HTTPError, RequestHandler

from server.codec import accept_codec
from server.errors import SquallError
from server.node import Node

log = logging.getLogger("squall.http")

_CODE_FOR_STATUS = {
    400: "invalid_body", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
    429: "rate_limited", 503: "broker_unavailable",
}


class ApiHandler(RequestHandler):
    """Base of the HTTP API handlers; the node comes in through ``initialize``."""

    node: Node

    def initialize(self, node: Node) -> None:
        self.node = node

    def reply(self, status: int, value: Any) -> None:
        """Finish with ``value`` encoded as the client accepts (JSON by default)."""
        codec = accept_codec(self.request.headers.get("Accept"))
        self.set_status(status)
        self.set_header("Content-Type", "application/msgpack" if codec.binary
                        else "application/json")
        self.finish(codec.dumps(value))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        status, code, message = _describe(kwargs.get("exc_info"), status_code)
        self.clear_header("Content-Type")
        self.reply(status, {"error": {"code": code, "message": message}})

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, SquallError):
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(ApiHandler):
    """Every path the API does not have."""

    def prepare(self) -> None:
        raise SquallError("not_found", f"no such path: {self.request.path[:200]}")


def _describe(exc_info: Any, status: int) -> tuple[int, str, str]:
    """Status, code and message for an error; internal details never leave."""
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, SquallError):
        return exc.status, exc.code, exc.message
    code = _CODE_FOR_STATUS.get(status, "internal_error" if status >= 500 else "invalid_body")
    if status >= 500:
        return status, code, "internal error"
    if isinstance(exc, HTTPError) and exc.log_message and not exc.args:
        return status, code, exc.log_message
    return status, code, exc.reason if isinstance(exc, HTTPError) and exc.reason else code
