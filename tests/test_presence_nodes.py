"""Presence, join and leave frames, lifecycle webhooks and disconnects across two real
nodes (``run.py`` processes) on a real Redis and on a real Redis Cluster, on every
transport, and a node killed with ``kill -9``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from server.webhooks import verify_signature
from tests.auth_support import API_KEY, SECRET, token
from tests.server_process import ServerProcess, free_port, run_async
from tests.transport_clients import SseClient, TcpClient, TransportClient, WsClient
from tests.waiting import eventually

pytest_plugins = ["tests.redis_server", "tests.redis_cluster"]
pytestmark = pytest.mark.redis

HOOK_SECRET = "hook-secret"
DEBOUNCE = 1.0
TTL = 2.0


class Hooks:
    """A backend receiving signed lifecycle webhooks."""

    def __init__(self) -> None:
        self.bodies: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signed = verify_signature(HOOK_SECRET, body, self.headers["X-Squall-Signature"])
                with hooks.lock:
                    hooks.bodies.append((time.monotonic(), {**json.loads(body),
                                                            "signed": signed}))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def of(self, topic: str) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(at, body) for at, body in self.bodies if body["topic"] == topic]

    async def until(self, topic: str, count: int, timeout: float = 10.0,
                    ) -> list[tuple[float, dict[str, Any]]]:
        await eventually(lambda: len(self.of(topic)) >= count, timeout,
                         what=f"{count} webhooks of {topic}", every=0.02)
        return self.of(topic)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_pair(redis_url: str, hooks: Hooks, folder: Path) -> tuple[ServerProcess, ...]:
    config = folder / "squall.toml"
    config.write_text(f'[[webhooks]]\nurl = "{hooks.url}"\nsecret = "{HOOK_SECRET}"\n'
                      'signals = ["topic_occupied", "topic_vacated"]\n')
    flags = ("--broker", redis_url, "--api-keys", API_KEY, "--jwt-secret", SECRET,
             "--presence-topics", "room.>", "--presence-ttl", str(TTL),
             "--lifecycle-debounce", str(DEBOUNCE), "--ping-interval", "0",
             "--config", str(config))
    nodes = []
    try:
        for name in ("a", "b"):
            nodes.append(ServerProcess(*flags, "--node-name", name,
                                       "--tcp-port", str(free_port())).start())
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return tuple(nodes)


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    made = Hooks()
    yield made
    made.close()


@pytest.fixture(scope="module", params=["redis", "cluster"])
def pair(request: pytest.FixtureRequest, hooks: Hooks,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ...]]:
    """Two nodes on one Redis, or on a Redis Cluster (every master flushed first)."""
    if request.param == "redis":
        redis = request.getfixturevalue("redis_server")
        with redis.client() as admin:
            admin.flushall()
        url = redis.url()
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        url = cluster.url()
    with hooks.lock:
        hooks.bodies.clear()
    nodes = start_pair(url, hooks, tmp_path_factory.mktemp("pair"))
    yield nodes
    for node in nodes:
        node.stop()


def person(sub: str, info: Any = None) -> str:
    rights: dict[str, Any] = {"subscribe": [">"], "publish": []}
    if info is not None:
        rights["info"] = info
    return token(sub, squall=rights)


async def connect(node: ServerProcess, kind: str, topic: str, credential: str,
                  opened: list[TransportClient]) -> TransportClient:
    """A client of ``kind`` on ``node``, subscribed to ``topic``."""
    if kind == "tcp":
        client: TransportClient = await TcpClient.connect(node.tcp_port, (topic,),
                                                          token=credential)  # authed
    elif kind == "sse":
        client = await SseClient.connect(node.port, (topic,), token=credential)
    else:
        client = await WsClient.connect(node.port, (topic,), token=credential)
    opened.append(client)
    assert (await client.recv_type("subscribed"))["topic"] == topic
    return client


def request(node: ServerProcess, method: str, path: str, body: Any = None,
            credential: str | None = API_KEY) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if credential:
        headers["Authorization"] = f"Bearer {credential}"
    data = json.dumps(body).encode() if body is not None else None
    call = urllib.request.Request(node.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def presence(node: ServerProcess, name: str) -> dict[str, Any]:
    status, body = request(node, "GET", f"/v1/topics/{name}/presence")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def frames(client: TransportClient, count: int) -> list[tuple[str, str | None]]:
    """The next ``count`` join and leave frames: (type, sub)."""
    found = [await client.recv() for _ in range(count)]
    assert all(frame["type"] in ("join", "leave") for frame in found), found
    return [(frame["type"], frame["client"]["sub"]) for frame in found]


def run(scenario: Callable[[list[TransportClient]], Awaitable[None]]) -> None:
    """Run ``scenario(opened)`` on a loop of its own, closing every client it opened."""

    async def closing() -> None:
        opened: list[TransportClient] = []
        try:
            await scenario(opened)
        finally:
            for client in opened:
                client.close()
            await asyncio.sleep(0)

    run_async(closing())


def test_presence_and_frames_across_nodes_on_every_transport(pair, hooks):
    a, b = pair

    async def scenario(opened: list[TransportClient]) -> None:
        watcher = await connect(a, "ws", "room.t", person("watcher"), opened)
        alice = await connect(b, "sse", "room.t", person("alice", {"name": "Alice"}), opened)
        bob = await connect(b, "tcp", "room.t", person("bob"), opened)
        await connect(a, "ws", "room.t", person("carol"), opened)
        assert await frames(watcher, 3) == [("join", "alice"), ("join", "bob"),
                                            ("join", "carol")]
        assert await frames(alice, 2) == [("join", "bob"), ("join", "carol")]
        for node in pair:
            listed = presence(node, "room.t")
            assert (listed["count"], listed["truncated"]) == (4, False)
            assert [(c["sub"], c["node"]) for c in listed["clients"]] == [
                ("watcher", "a"), ("alice", "b"), ("bob", "b"), ("carol", "a")]
            assert listed["clients"][1]["info"] == {"name": "Alice"}
        bob.close()
        assert await frames(watcher, 1) == [("leave", "bob")]  # after the entry is gone
        assert await frames(alice, 1) == [("leave", "bob")]
        [(_, occupied)] = await hooks.until("room.t", 1)
        assert (occupied["signal"], occupied["node"], occupied["signed"]) == (
            "topic_occupied", "a", True)
        assert occupied["client"] is None

    run(scenario)
    assert [body["signal"] for _, body in hooks.of("room.t")] == ["topic_occupied"]


@pytest.mark.parametrize("kind", ["ws", "sse", "tcp"])
def test_disconnect_by_sub_and_by_client_across_nodes(pair, kind):
    a, b = pair
    sub = f"dave-{kind}"

    async def scenario(opened: list[TransportClient]) -> None:
        here = await connect(a, kind, "news.d", person(sub), opened)
        there = await connect(b, kind, "news.d", person(sub), opened)
        other = await connect(b, kind, "news.d", person(f"erin-{kind}"), opened)
        started = time.monotonic()
        assert request(b, "POST", "/v1/disconnect", {"sub": sub}) == (202, {"accepted": True})
        for client in (here, there):
            close = await client.recv_type("close")
            assert (close["code"], close["reason"]) == (4010, "disconnected by the backend")
        assert time.monotonic() - started < 1.0
        await eventually(lambda: presence(a, "news.d")["count"] == 1,
                         what="the closed clients out of presence")
        [entry] = presence(a, "news.d")["clients"]  # erin is left
        assert entry["sub"] == f"erin-{kind}"
        status, _ = request(a, "POST", "/v1/disconnect",
                            {"client": entry["id"], "code": 4400, "reason": "moved"})
        assert status == 202
        close = await other.recv_type("close")
        assert (close["code"], close["reason"]) == (4400, "moved")
        assert time.monotonic() - started < 2.0

    run(scenario)


def test_the_operator_api_refuses_tokens(pair):
    a, _ = pair
    status, body = request(a, "POST", "/v1/disconnect", {"sub": "x"}, credential=person("x"))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = request(a, "POST", "/v1/disconnect", {"sub": "x"}, credential=None)
    assert (status, body["error"]["code"]) == (401, "unauthorized")


def test_a_reconnect_within_the_debounce_fires_neither_signal(pair, hooks):
    a, b = pair

    async def scenario(opened: list[TransportClient]) -> None:
        first = await connect(a, "ws", "life.t", person("frank"), opened)
        await hooks.until("life.t", 1)
        first.close()
        await eventually(lambda: presence(b, "life.t")["count"] == 0,
                         what="the first connection gone from presence, on the other node")
        again = await connect(b, "sse", "life.t", person("frank"), opened)  # another node
        await asyncio.sleep(DEBOUNCE + 0.5)
        assert [body["signal"] for _, body in hooks.of("life.t")] == ["topic_occupied"]
        again.close()
        left = time.monotonic()
        [_, (at, vacated)] = await hooks.until("life.t", 2)
        assert (vacated["signal"], vacated["signed"]) == ("topic_vacated", True)
        assert DEBOUNCE - 0.1 <= at - left < DEBOUNCE + 1.5

    run(scenario)
    assert [body["signal"] for _, body in hooks.of("life.t")] == [
        "topic_occupied", "topic_vacated"]


def test_a_killed_node_leaves_nobody_behind(pair, hooks):
    """The last test of the module: it kills node b of the pair."""
    a, b = pair
    try:
        run(lambda opened: _kill_scenario(a, b, hooks, opened))
    finally:
        print("".join(a.log[-40:]))  # shown when the test fails


async def _kill_scenario(a: ServerProcess, b: ServerProcess, hooks: Hooks,
                         opened: list[TransportClient]) -> None:
    watcher = await connect(a, "ws", "room.k", person("watcher"), opened)
    await connect(b, "sse", "room.k", person("gina"), opened)
    await connect(b, "tcp", "room.k", person("hank"), opened)
    await connect(b, "ws", "solo.k", person("ivan"), opened)
    brief = await connect(b, "ws", "brief.k", person("jane"), opened)
    assert await frames(watcher, 2) == [("join", "gina"), ("join", "hank")]
    for name in ("solo.k", "brief.k"):
        await hooks.until(name, 1)
    brief.close()  # brief.k is left vacating on b, which dies before its debounce ends
    await eventually(lambda: presence(a, "brief.k")["count"] == 0, what="jane gone")
    assert b.process is not None
    b.process.kill()
    killed = time.monotonic()
    assert sorted(await frames(watcher, 2)) == [("leave", "gina"), ("leave", "hank")]
    assert time.monotonic() - killed < TTL + 0.5
    [_, (_, solo)] = await hooks.until("solo.k", 2, timeout=TTL + 2)
    assert (solo["signal"], solo["node"]) == ("topic_vacated", "a")
    [_, (_, brief_vacated)] = await hooks.until("brief.k", 2, timeout=TTL + 2)
    assert (brief_vacated["signal"], brief_vacated["node"]) == ("topic_vacated", "a")
    await eventually(lambda: [(c["sub"], c["node"]) for c in presence(a, "room.k")["clients"]]
                     == [("watcher", "a")], what="only the watcher left")
    assert presence(a, "solo.k")["count"] == 0
    assert [body["signal"] for _, body in hooks.of("room.k")] == ["topic_occupied"]
