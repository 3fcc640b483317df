"""What every HTTP handler shares: JSON/msgpack replies, protocol errors, auth, CORS.

Any ``SquallError`` raised by a handler becomes ``{"error": {"code", "message"}}``
with the code's status. Anything else is logged with its traceback and answered
``500 internal_error`` with no detail: a response never carries a traceback, and
the logged request line has any ``?token=`` masked.

CORS: a request whose ``Origin`` is allowed (``allowed_origins``, see server/auth.py)
gets ``Access-Control-Allow-Origin`` with that origin; ``OPTIONS`` answers a preflight
with the methods the path has and the headers clients send (``CORS_HEADERS``). A
refused origin gets no CORS headers, so the browser keeps the answer from the page.
"""

from __future__ import annotations

import logging
from typing import Any

from tornado.log import app_log
from tornado.web import HTTPError, RequestHandler

from server.auth import Auth, Grant, request_summary
from server.codec import accept_codec
from server.errors import SquallError
from server.node import Node

log = logging.getLogger("squall.http")

CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key, Accept"
CORS_MAX_AGE = 600

_CODE_FOR_STATUS = {
    400: "invalid_body", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
    429: "rate_limited", 503: "broker_unavailable",
}


class ApiHandler(RequestHandler):
    """Base of the HTTP API handlers; the node comes in through ``initialize``."""

    node: Node
    auth: Auth | None = None

    def initialize(self, node: Node, auth: Auth) -> None:
        self.node = node
        self.auth = auth
        self.set_default_headers()

    def set_default_headers(self) -> None:
        # also runs when an error reply clears the headers: errors keep CORS too
        if "Origin" not in self.request.headers:
            return
        self.set_header("Vary", "Origin")
        origin = self._allowed_origin()
        if origin is not None:
            self.set_header("Access-Control-Allow-Origin", origin)

    def _allowed_origin(self) -> str | None:
        origin = self.request.headers.get("Origin")
        if self.auth is None or origin is None:
            return None
        return origin if self.auth.origin_allowed(origin, self.request.host) else None

    def options(self, *args: str) -> None:
        """A CORS preflight (or a plain OPTIONS): the methods and headers allowed."""
        methods = ", ".join(self._methods())
        self.set_header("Allow", methods)
        if self._allowed_origin() is not None:
            self.set_header("Access-Control-Allow-Methods", methods)
            self.set_header("Access-Control-Allow-Headers", CORS_HEADERS)
            self.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE))
        self.set_status(204)
        self.finish()

    def _methods(self) -> list[str]:
        own = [name.upper() for name in ("get", "post", "put", "patch", "delete")
               if getattr(type(self), name) is not getattr(RequestHandler, name)]
        return [*own, "OPTIONS"]

    def grant(self) -> Grant:
        """What the request's credential allows; raises ``unauthorized`` for a bad one."""
        assert self.auth is not None
        return self.auth.http_grant(self.request.headers.get("Authorization"))

    def reply(self, status: int, value: Any) -> None:
        """Finish with ``value`` encoded as the client accepts (JSON by default)."""
        codec = accept_codec(self.request.headers.get("Accept"))
        self.set_status(status)
        self.set_header("Content-Type", "application/msgpack" if codec.binary
                        else "application/json")
        self.finish(codec.dumps(value))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        status, code, message = _describe(exc_info, status_code)
        self.clear_header("Content-Type")
        if status == 405:
            message = self._not_allowed()
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="squall"')
        retry_after = getattr(exc_info[1] if exc_info else None, "retry_after", None)
        if retry_after:
            self.set_header("Retry-After", str(retry_after))
        self.reply(status, {"error": {"code": code, "message": message}})

    def _not_allowed(self) -> str:
        """The 405 message, with the ``Allow`` header RFC 9110 asks for."""
        methods = ", ".join(self._methods())
        self.set_header("Allow", methods)
        method = (self.request.method or "")[:20]
        allowed = " and ".join(methods.rsplit(", ", 1))
        return f"{method} is not allowed on {self.request.path[:200]}; this path takes {allowed}"

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, SquallError):
            return
        if isinstance(value, HTTPError):
            super().log_exception(typ, value, tb)
            return
        app_log.error("Uncaught exception %s", self._request_summary(),
                      exc_info=(typ, value, tb))

    def _request_summary(self) -> str:
        # how Tornado names the request in its log lines: with ?token= masked
        return request_summary(self.request)


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
