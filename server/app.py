"""Wiring: the Tornado application for a node. No state lives here."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter
from tornado.web import Application, RequestHandler

from handlers.base import NotFoundHandler, StaticHandler
from handlers.info import HealthHandler, MetricsHandler, ReadyHandler, TopicsHandler
from handlers.openapi import OpenApiHandler
from handlers.operator import DisconnectHandler, PresenceHandler
from handlers.publish import BatchHandler, TopicEventsHandler
from server.auth import redacted_uri
from server.node import Node
from transports.sse import EventStreamHandler
from transports.websocket import WebSocketHandler

access_log = logging.getLogger("squall.access")

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


def access_logger(enabled: bool, requests: Counter) -> Callable[[RequestHandler], None]:
    """One line per HTTP request (a WebSocket or an SSE stream counts once, when it
    opens)."""

    def log_request(handler: RequestHandler) -> None:
        status = handler.get_status()
        requests.labels(str(status)).inc()
        if not enabled:
            return
        level = logging.INFO if status < 400 else logging.WARNING
        if status >= 500:
            level = logging.ERROR
        request = handler.request
        duration = 1000.0 * request.request_time()
        uri = redacted_uri(request.uri or "")
        access_log.log(level, "%d %s %s %.1fms", status, request.method, uri, duration,
                       extra={"status": status, "method": request.method, "path": request.path,
                              "ip": request.remote_ip, "duration_ms": round(duration, 2)})

    return log_request


def make_app(node: Node, **tornado_settings: Any) -> Application:
    """The HTTP, WebSocket and SSE routes of ``node``, with its limits applied."""
    settings = node.settings
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
        log_function=access_logger(settings.access_log, node.metrics.http_requests),
        **tornado_settings,
    )
