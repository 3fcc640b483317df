"""The smallest Tornado server that takes Squall's single publish: the framework's own
ceiling for one event per HTTP request, measured beside Squall in the same run.

It reads the JSON body, answers 202 with an id, and does nothing else: no history, no
auth, no logging, no subscribers. Tornado's default event loop (asyncio's).

    python bench/minimal_server.py --port 8898
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

from tornado import web

IDS = itertools.count(1)


class PublishHandler(web.RequestHandler):
    def post(self, topic: str) -> None:
        json.loads(self.request.body)
        self.set_status(202)
        self.write({"topic": topic, "id": str(next(IDS)), "ts": int(time.time() * 1000)})


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


async def main(host: str, port: int) -> None:
    application = web.Application([(r"/v1/topics/([^/]+)/events", PublishHandler),
                                   (r"/healthz", HealthHandler)])
    application.listen(port, host)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8898)
    options = parser.parse_args()
    asyncio.run(main(options.host, options.port))
