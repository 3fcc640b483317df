"""Chat-demo style Tornado fan-out server: the baseline the bench compares Squall against.

Deliberately naive, like Tornado's chat demo: a global registry of handlers and one
``write_message()`` per subscriber per event (each call encodes the JSON again and
creates its own future), no write-buffer bound, no shared frame. It serves the same
paths as Squall so the same load generator drives both.

    python bench/baseline_server.py --port 8899
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

from tornado import ioloop, web, websocket

SUBSCRIBERS: dict[str, set[SubscribeHandler]] = {}
EVENT_IDS = itertools.count(1)


def publish(topic: str, data: Any) -> dict[str, Any]:
    """Send one event to every subscriber of ``topic``, one ``write_message`` each."""
    event: dict[str, Any] = {"type": "event", "topic": topic, "id": str(next(EVENT_IDS))}
    event.update(ts=int(time.time() * 1000), data=data)
    for handler in list(SUBSCRIBERS.get(topic, ())):
        try:
            handler.write_message(event)
        except websocket.WebSocketClosedError:
            SUBSCRIBERS[topic].discard(handler)
    return {"topic": topic, "id": event["id"], "ts": event["ts"]}


class EventsHandler(web.RequestHandler):
    def post(self, topic: str) -> None:
        self.set_status(202)
        self.write(publish(topic, json.loads(self.request.body)))


class BatchHandler(web.RequestHandler):
    def post(self) -> None:
        events = json.loads(self.request.body)["events"]
        self.set_status(202)
        self.write({"events": [publish(e["topic"], e["data"]) for e in events]})


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


class SubscribeHandler(websocket.WebSocketHandler):
    def initialize(self) -> None:
        self.topics: list[str] = []

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return "squall.v1.json" if "squall.v1.json" in subprotocols else None

    def open(self) -> None:
        self.topics = self.get_arguments("topic")
        for topic in self.topics:
            SUBSCRIBERS.setdefault(topic, set()).add(self)
            self.write_message({"type": "subscribed", "topic": topic})

    def on_message(self, message: str | bytes) -> None:
        frame = json.loads(message)
        if frame.get("type") == "publish":
            reply = publish(frame["topic"], frame.get("data"))
            self.write_message({"type": "published", **reply, "ref": frame.get("ref")})

    def on_close(self) -> None:
        for topic in self.topics:
            SUBSCRIBERS.get(topic, set()).discard(self)


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description="chat-demo style baseline server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8899)
    args = parser.parse_args()
    app = web.Application(
        [
            (r"/v1/topics/([^/]+)/events", EventsHandler),
            (r"/v1/events", BatchHandler),
            (r"/v1/ws", SubscribeHandler),
            (r"/healthz", HealthHandler),
        ]
    )
    app.listen(args.port, args.host)
    ioloop.IOLoop.current().start()


if __name__ == "__main__":
    main()
