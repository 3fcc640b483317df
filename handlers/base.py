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
from tornado.web import HTTPError, RequestHandler, StaticFileHandler

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


class JsonErrors(RequestHandler):
    """Every error this handler answers is the protocol's JSON error shape, and only
    unexpected exceptions are logged with a traceback (with credentials masked)."""

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

    def _methods(self) -> list[str]:
        """The methods this handler implements, as ``Allow`` lists them."""
        return [name.upper() for name in ("get", "head", "post", "put", "patch", "delete",
                                          "options")
                if getattr(type(self), name) is not getattr(RequestHandler, name)]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, SquallError):
            return
        if isinstance(value, HTTPError):
            if value.status_code >= 500:
                log.warning("%d %s: %s", value.status_code, self._request_summary(),
                            value.log_message or value.reason or "")
            return
        app_log.error("Uncaught exception %s", self._request_summary(),
                      exc_info=(typ, value, tb))

    def _request_summary(self) -> str:
        # how Tornado names the request in its log lines: with credentials masked
        return request_summary(self.request)


class ApiHandler(JsonErrors):
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

    def grant(self) -> Grant:
        """What the request's credential allows; raises ``unauthorized`` for a bad one."""
        assert self.auth is not None
        return self.auth.http_grant(self.request.headers.get("Authorization"))


class NotFoundHandler(ApiHandler):
    """Every path the API does not have."""

    def prepare(self) -> None:
        raise SquallError("not_found", f"no such path: {self.request.path[:200]}")


class StaticHandler(JsonErrors, StaticFileHandler):
    """The browser client and the demo page; errors are JSON like the API's, and a
    path that cannot name a file (a NUL byte, say) is a 404, never a 500."""

    async def get(self, path: str, include_body: bool = True) -> None:
        if "\x00" in path or not path.isprintable():
            raise SquallError("not_found", "no such file")
        await super().get(path, include_body)
        if self.get_status() == 416:  # Tornado answers it with no body
            self.clear_header("Content-Type")
            self.reply(416, {"error": {"code": "invalid_body", "message": "the Range is "
                                       "outside the file"}})


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
