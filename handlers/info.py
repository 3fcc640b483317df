"""Read-only endpoints: the topic list, liveness and readiness."""

from __future__ import annotations

from handlers.base import ApiHandler
from server.topics import is_pattern


class TopicsHandler(ApiHandler):
    """``GET /v1/topics``: topics with local subscribers or retained history.

    ``subscribers`` counts this node's connections that receive the topic's events,
    through exact and pattern subscriptions. Pattern names themselves are not
    topics and are not listed.
    """

    async def get(self) -> None:
        hub = self.node.hub
        subscribed = [name for name, _ in hub.router.names() if not is_pattern(name)]
        retained = await self.node.broker.retained_topics()
        topics = sorted(set(subscribed).union(retained))
        last_ids = await self.node.broker.last_ids(topics)
        self.reply(200, {"topics": [
            {"topic": topic, "subscribers": len(hub.router.match(topic)),
             "last_id": last_ids.get(topic)}
            for topic in topics]})


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
