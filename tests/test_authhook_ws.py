"""The authorization webhook deciding real WebSocket connects and subscribes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from config.settings import Settings

SECRET = "hook-secret"


class Backend:
    """Allows connects whose query says ``user=alice`` (granting ``room.1``), denies
    others; approves subscribes to ``room.2`` only; hangs for ``user=slow``."""

    def __init__(self) -> None:
        self.questions: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    def app(self) -> Application:
        backend = self

        class Decide(RequestHandler):
            async def post(self) -> None:
                question = json.loads(self.request.body)
                backend.questions.append(question)
                self.finish(await backend.decide(question))

        return Application([(r"/auth", Decide)])

    async def decide(self, question: dict[str, Any]) -> dict[str, Any]:
        if question["action"] == "subscribe":
            return {"allow": question["topic"] == "room.2"}
        if question["action"] == "publish":
            return {"allow": question["topic"] == "room.2"}
        user = question["request"]["query"].get("user", [""])[0]
        if user == "slow":
            await self.release.wait()
        if user != "alice":
            return {"allow": False, "reason": "unknown user"}
        return {"allow": True, "sub": "alice", "subscribe": ["room.1"], "publish": []}


@pytest.fixture
def backend(io_loop: Any) -> Iterator[tuple[Backend, int]]:
    backend = Backend()
    sock, port = bind_unused_port()
    server = HTTPServer(backend.app())
    server.add_sockets([sock])
    yield backend, port
    backend.release.set()
    server.stop()


@pytest.fixture
def squall_settings(backend: tuple[Backend, int]) -> Settings:
    return Settings(ping_interval=0, auth_webhook_url=f"http://127.0.0.1:{backend[1]}/auth",
                    auth_webhook_secret=SECRET, auth_webhook_timeout=0.5)


@pytest.mark.gen_test(timeout=20)
async def test_backend_admits_and_grants(backend, ws_connect):
    client = await ws_connect(query="user=alice")
    assert "recovered" not in await client.subscribe("room.1")  # granted at connect
    assert [q["action"] for q in backend[0].questions] == ["connect"]
    await client.subscribe("room.2")  # beyond the grant: asked, approved
    await client.send({"type": "subscribe", "topic": "room.3", "ref": 7})
    error = await client.recv_type("error")
    assert (error["code"], error["ref"]) == ("forbidden", 7)
    assert [q.get("topic") for q in backend[0].questions] == [None, "room.2", "room.3"]
    await client.send({"type": "publish", "topic": "room.1", "data": 1})
    assert (await client.recv_type("error"))["code"] == "forbidden"


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("user", ["mallory", "slow"])
async def test_backend_denial_or_silence_closes_with_4003(backend, ws_url, user):
    started = asyncio.get_running_loop().time()
    async with websockets.connect(f"{ws_url}?user={user}") as socket:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
    assert asyncio.get_running_loop().time() - started < 3


@pytest.mark.gen_test(timeout=20)
async def test_the_webhook_alone_turns_auth_on_and_decides_publishes(backend, ws_connect,
                                                                     http_client, base_url):
    response = await http_client.fetch(f"{base_url}/v1/topics/room.1/events", method="POST",
                                       body="1", raise_error=False)
    assert response.code == 401  # no credential can publish: auth is on, not off
    client = await ws_connect(query="user=alice")
    await client.send({"type": "publish", "topic": "room.2", "data": 2, "ref": 1})
    assert (await client.recv_type("published"))["ref"] == 1
    await client.send({"type": "publish", "topic": "room.3", "data": 3, "ref": 2})
    assert (await client.recv_type("error"))["code"] == "forbidden"
    asked = [(q["action"], q.get("topic")) for q in backend[0].questions]
    assert asked == [("connect", None), ("publish", "room.2"), ("publish", "room.3")]


@pytest.mark.gen_test(timeout=20)
async def test_pipelined_publishes_are_each_decided_and_answered_in_order(backend, ws_connect):
    client = await ws_connect(query="user=alice")
    watcher = await ws_connect(query="user=alice")
    await watcher.subscribe("room.2")
    for ref, topic in enumerate(["room.2", "room.3", "room.2", "room.2"]):
        await client.send({"type": "publish", "topic": topic, "data": ref, "ref": ref})
    replies = [await client.recv() for _ in range(4)]
    assert [(reply["type"], reply["ref"]) for reply in replies] == [
        ("published", 0), ("error", 1), ("published", 2), ("published", 3)]
    assert replies[1]["code"] == "forbidden"
    assert [event["data"] for event in await watcher.events(3)] == [0, 2, 3]
    asked = [q.get("topic") for q in backend[0].questions if q["action"] == "publish"]
    assert asked == ["room.2", "room.3", "room.2", "room.2"]
