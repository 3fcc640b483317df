"""Several real ``run.py`` processes on one real Redis: the cluster as users see it.

Two nodes share topics, ids and history; a fault run kills the Redis pub/sub
connections and freezes Redis while publishes keep coming; ``--workers 2`` serves
one port from two processes that each run their own node.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from server.broker.redis_keys import NODES, node_key
from server.events import EventId
from tests.conftest import Client
from tests.server_process import ServerProcess
from tests.waiting import eventually

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = [pytest.mark.redis, pytest.mark.gen_test(timeout=120)]

BROKER_TIMEOUT = 1.0
WAIT = 10.0


def start_node(url: str, *flags: str) -> ServerProcess:
    return ServerProcess("--broker", url, "--broker-timeout", str(BROKER_TIMEOUT),
                         "--ping-interval", "0", *flags).start()


@pytest.fixture
def cluster(redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two nodes on one Redis."""
    first = start_node(redis_url, "--node-name", "node-a")
    try:
        second = start_node(redis_url, "--node-name", "node-b")
    except RuntimeError:
        first.stop()
        raise
    yield first, second
    for node in (first, second):
        node.stop()


class Clients:
    """WebSocket clients of any node; all closed at the end of the test."""

    def __init__(self) -> None:
        self.opened: list[Client] = []

    async def connect(self, node: ServerProcess, *topics: str, codec: str = "json") -> Client:
        query = "&".join(f"topic={topic}" for topic in topics)
        url = f"ws://127.0.0.1:{node.port}/v1/ws" + (f"?{query}" if query else "")
        socket = await websockets.connect(url, subprotocols=[f"squall.v1.{codec}"],
                                          open_timeout=WAIT)
        client = Client(socket, codec == "msgpack")
        self.opened.append(client)
        for _ in topics:
            await client.recv_type("subscribed")
        return client

    async def close(self) -> None:
        for client in self.opened:
            await client.socket.close()


@pytest.fixture
def clients(io_loop: Any) -> Iterator[Clients]:
    opened = Clients()
    yield opened
    io_loop.run_sync(opened.close)


async def post(node: ServerProcess, topic: str, data: Any, key: str | None = None,
               timeout: float = WAIT) -> HTTPResponse:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await AsyncHTTPClient().fetch(
        f"{node.url}/v1/topics/{topic}/events", method="POST", body=json.dumps(data),
        headers=headers, raise_error=False, request_timeout=timeout)


async def get(node: ServerProcess, path: str) -> tuple[int, Any]:
    response = await AsyncHTTPClient().fetch(node.url + path, raise_error=False,
                                             request_timeout=WAIT)
    return response.code, json.loads(response.body)


def seq(event_id: str) -> int:
    parsed = EventId.parse(event_id)
    assert parsed is not None
    return parsed.seq


# -- two nodes ----------------------------------------------------------------------------

async def test_an_event_published_on_one_node_reaches_subscribers_of_the_other(
        cluster, clients):
    a, b = cluster
    json_client = await clients.connect(b, "orders.eu")
    msgpack_client = await clients.connect(b, "orders.*", codec="msgpack")
    local = await clients.connect(a, "orders.>")
    response = await post(a, "orders.eu", {"n": 1, "text": "héllo"})
    assert response.code == 202
    accepted = json.loads(response.body)
    for client in (json_client, msgpack_client, local):
        assert await client.recv_type("event") == {
            "type": "event", "topic": "orders.eu", "id": accepted["id"], "ts": accepted["ts"],
            "data": {"n": 1, "text": "héllo"}}

    async def counted() -> bool:
        code, body = await get(a, "/v1/topics")
        entry = next((t for t in body["topics"] if t["topic"] == "orders.eu"), None)
        return code == 200 and entry == {"topic": "orders.eu", "subscribers": 3,
                                         "last_id": accepted["id"]}

    await eventually(counted, what="node a to count node b's subscribers")


async def test_a_client_resumes_on_another_node_with_since(cluster, clients):
    a, b = cluster
    first = await clients.connect(a, "resume.t")
    for n in range(5):
        assert (await post(a, "resume.t", n)).code == 202
    seen = await first.events(5)
    for n in range(5, 10):
        assert (await post(b, "resume.t", n)).code == 202
    second = await clients.connect(b)
    await second.send({"type": "subscribe", "topic": "resume.t", "since": seen[2]["id"]})
    replayed = await second.events(7)
    assert [event["data"] for event in replayed] == list(range(3, 10))
    assert (await second.recv_type("subscribed"))["recovered"] is True
    assert (await post(a, "resume.t", "live")).code == 202
    assert (await second.recv_type("event"))["data"] == "live"


# -- faults -------------------------------------------------------------------------------

class PublishLoop:
    """Publishes 0, 1, 2, ... alternately on two nodes, one at a time, each with a key."""

    def __init__(self, nodes: tuple[ServerProcess, ServerProcess]) -> None:
        self.nodes = nodes
        self.outcomes: dict[int, tuple[int, float, Any]] = {}  # n -> status, seconds, body
        self.count = 0
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()

    async def run(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            started = time.monotonic()
            response = await post(self.nodes[n % 2], "fault.t", n, key=f"key-{n}")
            body = json.loads(response.body) if response.body else None
            self.outcomes[n] = (response.code, time.monotonic() - started, body)
            self.count = n + 1
            self._progress.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT * 3):
            while self.count < count:
                self._progress.clear()
                await self._progress.wait()

    def stop(self) -> None:
        self._stop.set()


async def test_redis_faults_lose_no_accepted_event_and_never_hang(cluster, clients,
                                                                  redis_server: RedisServer):
    a, b = cluster
    subscribers = [await clients.connect(b, "fault.t"),
                   await clients.connect(a, "fault.*", codec="msgpack")]
    loop = PublishLoop(cluster)
    publishing = asyncio.ensure_future(loop.run())
    try:
        await loop.wait_for(20)
        with redis_server.client() as admin:
            assert admin.client_kill_filter(_type="pubsub") == 2
        await loop.wait_for(loop.count + 20)
        await eventually(lambda: all_ready(cluster, True), what="both nodes listening again")
        await loop.wait_for(loop.count + 10)
        redis_server.freeze()
        try:
            await eventually(lambda: all_ready(cluster, False), what="both nodes unready")
            await asyncio.sleep(2 * BROKER_TIMEOUT)  # publishes keep failing meanwhile
        finally:
            redis_server.thaw()
        await eventually(lambda: all_ready(cluster, True), what="both nodes ready again")
        await loop.wait_for(loop.count + 20)
    finally:
        loop.stop()
        await publishing

    statuses = {status for status, _, _ in loop.outcomes.values()}
    assert statuses == {202, 503}, statuses
    failed = [n for n, (status, _, _) in loop.outcomes.items() if status == 503]
    slowest = max(seconds for status, seconds, _ in loop.outcomes.values() if status == 503)
    assert slowest < BROKER_TIMEOUT + 1.0
    accepted = {n: body["id"] for n, (status, _, body) in loop.outcomes.items()
                if status == 202}
    for n in failed:  # a retry with the same key never publishes twice
        response = await post(cluster[n % 2], "fault.t", n, key=f"key-{n}")
        assert response.code == 202
        accepted[n] = json.loads(response.body)["id"]
    expected = sorted(accepted.items(), key=lambda item: seq(item[1]))
    assert len({event_id for _, event_id in expected}) == len(expected)
    for subscriber in subscribers:
        events = await subscriber.events(len(expected))
        assert [(event["data"], event["id"]) for event in events] == expected
        await subscriber.send({"type": "ping", "ref": "after"})
        assert await subscriber.recv() == {"type": "pong", "ref": "after"}


async def all_ready(nodes: tuple[ServerProcess, ...], ready: bool) -> bool:
    codes = [(await get(node, "/readyz"))[0] for node in nodes]
    return all(code == (200 if ready else 503) for code in codes)


# -- workers ------------------------------------------------------------------------------

async def test_two_workers_share_one_port_and_their_events(redis_url, redis_server, clients):
    server = start_node(redis_url, "--workers", "2")
    try:
        await _check_workers(server, redis_server, clients)
    finally:
        assert server.stop() == 0


async def _check_workers(server: ServerProcess, redis_server: RedisServer,
                         clients: Clients) -> None:
    by_topic: dict[str, Client] = {}
    owners: dict[str, str] = {}
    for batch in range(8):  # until clients landed on both workers
        for n in range(batch * 8, batch * 8 + 8):
            by_topic[f"w.c{n}"] = await clients.connect(server, f"w.c{n}", "w.all")
        owners = await eventually(lambda: workers_of(redis_server, len(by_topic)),
                                  what="every worker to report its subscribers")
        if len(set(owners.values())) == 2:
            break
    assert len(set(owners.values())) == 2, "every client landed on one worker"
    sender = next(topic for topic in by_topic if owners[topic] != owners["w.c0"])
    await by_topic[sender].send({"type": "publish", "topic": "w.c0", "data": "hi", "ref": 1})
    published = await by_topic[sender].recv_type("published")
    event = await by_topic["w.c0"].recv_type("event")
    assert (event["id"], event["data"]) == (published["id"], "hi")

    async def counted() -> bool:
        code, body = await get(server, "/v1/topics")
        counts = {entry["topic"]: entry["subscribers"] for entry in body["topics"]}
        return code == 200 and counts.get("w.all") == len(by_topic)

    await eventually(counted, what="cluster-wide subscriber counts")


async def workers_of(redis_server: RedisServer, clients: int) -> dict[str, str]:
    """Topic -> node id, from the counts each worker writes to Redis; {} until complete."""
    owners: dict[str, str] = {}
    with redis_server.client() as admin:
        for member in admin.smembers(NODES):
            node_id = member.decode()
            for name in admin.hkeys(node_key(node_id)):
                owners[name.decode()] = node_id
    found = {topic: node for topic, node in owners.items() if topic.startswith("w.c")}
    return found if len(found) == clients else {}
