"""Read-only endpoints: the topic list, liveness and readiness."""

from __future__ import annotations

from handlers.base import ApiHandler
from server.metrics import CONTENT_TYPE


class TopicsHandler(ApiHandler):
    """``GET /v1/topics``: topics with subscribers on any node, or retained history.

    ``subscribers`` counts the connections, on every node of the cluster, that
    receive the topic's events through exact and pattern subscriptions (other
    nodes' counts are as they last reported them, a few seconds old at most).
    Pattern names themselves are not topics and are not listed. With auth on, a
    caller sees only the topics it may subscribe to.
    """

    async def get(self) -> None:
        grant = self.grant()
        listing = await self.node.topic_listing()
        self.reply(200, {"topics": [entry._asdict() for entry in listing
                                    if grant.may_subscribe(entry.topic)]})


class MetricsHandler(ApiHandler):
    """``GET /metrics``: Prometheus text format."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.node.metrics.render())


class HealthHandler(ApiHandler):
    """``GET /healthz``: the process serves."""

    def get(self) -> None:
        self.reply(200, {"status": "ok"})


class ReadyHandler(ApiHandler):
    """``GET /readyz``: 200 while the broker is reachable and no shutdown is under way."""

    def get(self) -> None:
        node = self.node
        if node.ready:
            self.reply(200, {"status": "ready"})
            return
        reason = "shutting down" if node.shutting_down else "broker unavailable"
        self.reply(503, {"status": "unavailable", "reason": reason})
