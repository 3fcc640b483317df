"""Wiring: the Tornado application for a node. No state lives here."""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

from tornado.web import Application, RequestHandler

from handlers.base import NotFoundHandler, StaticHandler
from handlers.info import HealthHandler, MetricsHandler, ReadyHandler, TopicsHandler
from handlers.openapi import OpenApiHandler
from handlers.operator import DisconnectHandler, PresenceHandler
from handlers.publish import BatchHandler, TopicEventsHandler
from server.auth import redacted_uri
from server.logs import direct_line
from server.node import Node
from transports.sse import EventStreamHandler
from transports.websocket import WebSocketHandler

access_log = logging.getLogger("squall.access")

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


class AccessLog:
    """One line per HTTP request (a WebSocket or an SSE stream counts once, when it
    opens), with credentials in the URI masked, and the count by status for metrics."""

    def __init__(self, enabled: bool, requests: collections.Counter[int]) -> None:
        self.enabled = enabled
        self.requests = requests

    def line(self, status: int, method: str, uri: str, path: str, ip: str,
             milliseconds: float) -> None:
        self.requests[status] += 1
        if not self.enabled:
            return
        level = logging.INFO if status < 400 else logging.WARNING
        if status >= 500:
            level = logging.ERROR
        if not access_log.isEnabledFor(level):
            return
        message = f"{status:d} {method} {redacted_uri(uri)} {milliseconds:.1f}ms"
        extra = {"status": status, "method": method, "path": path, "ip": ip,
                 "duration_ms": round(milliseconds, 2)}
        if not direct_line(access_log, level, message, extra):
            access_log.log(level, "%s", message, extra=extra)

    def handler(self, handler: RequestHandler) -> None:
        """Tornado's ``log_function``: the line of a request a handler answered."""
        request = handler.request
        self.line(handler.get_status(), request.method or "", request.uri or "",
                  request.path, request.remote_ip or "", 1000.0 * request.request_time())


def access_log_of(node: Node) -> AccessLog:
    return AccessLog(node.settings.access_log, node.metrics.http_requests)


def make_app(node: Node, **tornado_settings: Any) -> Application:
    """The HTTP, WebSocket and SSE routes of ``node``, with its limits applied."""
    deps = {"node": node, "auth": node.auth}
    routes: list[Any] = [
        (r"/v1/topics/([^/]+)/events", TopicEventsHandler, deps),
        (r"/v1/topics/([^/]+)/presence", PresenceHandler, deps),
        (r"/v1/disconnect", DisconnectHandler, deps),
        (r"/v1/events", BatchHandler, deps),
        (r"/v1/topics", TopicsHandler, deps),
        (r"/v1/ws", WebSocketHandler, deps),
        (r"/v1/sse", EventStreamHandler, deps),
        (r"/healthz", HealthHandler, deps),
        (r"/readyz", ReadyHandler, deps),
        (r"/metrics", MetricsHandler, deps),
        (r"/v1/openapi.json", OpenApiHandler, deps),
        (r"/()", StaticHandler, {"path": STATIC_DIR, "default_filename": "index.html"}),
        (r"/static/(.*)", StaticHandler, {"path": STATIC_DIR}),
    ]
    return Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=access_log_of(node).handler,
        **tornado_settings,
    )
