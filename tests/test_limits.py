"""Limits: token buckets, connection counts, frame and publish rates; each abuse is
felt by the abuser only. Time is a manual clock, so recovery needs no waiting."""

from __future__ import annotations

import json

import pytest

from server.node import Node
from server.ratelimit import ConnectionCounter, KeyedBuckets, Limits, TokenBucket, Verdict
from tests.auth_support import API_KEY, OTHER_API_KEY, SECRET, bearer, token
from tests.conftest import Client

pytestmark = pytest.mark.gen_test(timeout=20)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def node(squall_settings, io_loop, clock):
    node = Node(squall_settings, limits=Limits(squall_settings, clock=clock))
    io_loop.run_sync(node.start)
    yield node
    io_loop.run_sync(node.stop)


# -- the pieces --------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate(clock):
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == pytest.approx(0.5)
    clock.advance(0.5)
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.advance(100)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_token_bucket_debt_refuses_then_closes(clock):
    bucket = TokenBucket(rate=1, burst=2, clock=clock, debt=2)
    verdicts = [bucket.take_or_owe() for _ in range(5)]
    assert verdicts == [Verdict.ALLOW, Verdict.ALLOW, Verdict.REFUSE, Verdict.REFUSE,
                        Verdict.CLOSE]


def test_token_bucket_debt_is_paid_back_by_waiting(clock):
    bucket = TokenBucket(rate=1, burst=2, clock=clock, debt=2)
    for _ in range(4):
        bucket.take_or_owe()  # two allowed, two refused: -2 owed
    clock.advance(2.5)
    assert bucket.take_or_owe() is Verdict.REFUSE  # half a token is not a token
    clock.advance(1.5)
    assert bucket.take_or_owe() is Verdict.ALLOW


def test_connection_counter_per_ip_and_total():
    counter = ConnectionCounter(max_total=3, max_per_ip=2)
    assert [counter.admit("a"), counter.admit("a")] == [None, None]
    assert "per address" in (counter.admit("a") or "")
    assert counter.admit("b") is None
    assert "at most 3" in (counter.admit("c") or "")
    counter.release("a")
    assert counter.admit("c") is None and counter.total == 3
    for ip in ("a", "b", "c"):
        counter.release(ip)
    assert counter.total == 0 and counter.from_ip("a") == 0


def test_zero_means_no_limit(clock):
    counter = ConnectionCounter(max_total=0, max_per_ip=0)
    assert all(counter.admit("a") is None for _ in range(1000))
    buckets = KeyedBuckets(rate=0, burst=1, capacity=1, clock=clock)
    assert all(buckets.take("a") == 0 for _ in range(1000)) and len(buckets) == 0


def test_keyed_buckets_keep_busy_clients_when_bounded(clock):
    buckets = KeyedBuckets(rate=0.1, burst=2, capacity=3, clock=clock)
    assert [buckets.take("busy"), buckets.take("busy")] == [0, 0]
    for name in ("idle-1", "idle-2", "idle-3", "idle-4"):
        buckets.take(name)
        assert buckets.take("busy") > 0  # refused, and recently used: kept
    assert len(buckets) == 3


def test_keyed_buckets_drop_the_least_recently_used(clock):
    buckets = KeyedBuckets(rate=1, burst=1, capacity=2, clock=clock)
    for name in ("a", "b", "c"):
        buckets.take(name)
    assert len(buckets) == 2
    assert buckets.take("a") == 0  # forgotten, so new
    assert buckets.take("c") > 0


# -- WebSocket frame rate --------------------------------------------------------------


async def ping(client: Client, ref: object) -> dict:
    await client.send({"type": "ping", "ref": ref})
    return await client.recv()


@pytest.mark.settings(frame_rate=1, frame_burst=3)
async def test_frame_rate_trips_recovers_and_closes_when_it_persists(ws_connect, publish,
                                                                     clock):
    bystander = await ws_connect(query="topic=feed")
    await bystander.recv_type("subscribed")
    flood = await ws_connect()
    assert [(await ping(flood, n))["type"] for n in range(3)] == ["pong"] * 3
    refused = await ping(flood, 3)
    assert refused["type"] == "error" and refused["code"] == "rate_limited"
    assert "ref" not in refused  # refused unread: not parsed
    assert (await ping(bystander, "b"))["type"] == "pong"
    clock.advance(2)  # one token owed, two refilled: one frame may pass
    assert (await ping(flood, 4)) == {"type": "pong", "ref": 4}
    await flood.send({"type": "ping"})
    assert (await flood.recv())["code"] == "rate_limited"
    for _ in range(3):  # it keeps on while refused: the debt passes the burst
        await flood.send({"type": "ping"})
    assert await flood.closed_with() == 4029
    assert (await publish("feed", "still here")).code == 202
    assert (await bystander.recv_type("event"))["data"] == "still here"


@pytest.mark.settings(frame_rate=0)
async def test_frame_rate_zero_is_no_limit(ws_connect):
    client = await ws_connect()
    for n in range(500):
        await client.send({"type": "ping", "ref": n})
    assert [(await client.recv())["ref"] for _ in range(500)] == list(range(500))


# -- connections -----------------------------------------------------------------------


@pytest.mark.settings(max_connections_per_ip=2)
async def test_connections_per_ip_close_with_4029_and_free_their_place(ws_connect):
    first, second = await ws_connect(), await ws_connect()
    third = await ws_connect()
    assert await third.closed_with() == 4029
    other_address = await ws_connect(local_addr=("127.0.0.2", 0))  # another client: unaffected
    assert (await ping(other_address, 1))["type"] == "pong"
    await second.socket.close()
    replacement = await ws_connect()
    assert (await ping(replacement, 2))["type"] == "pong"
    assert (await ping(first, 3))["type"] == "pong"


@pytest.mark.settings(max_connections=2)
async def test_connections_per_process_close_with_4029(ws_connect, node):
    first, _ = await ws_connect(), await ws_connect()
    assert await (await ws_connect()).closed_with() == 4029
    assert (await ping(first, 1))["type"] == "pong"
    assert node.limits.connections.total == 2


@pytest.mark.settings(max_connections=1, api_keys=(API_KEY,), jwt_secret=SECRET)
async def test_refused_handshakes_do_not_take_places(ws_connect):
    for _ in range(3):
        bad = await ws_connect(query="token=bad")
        assert await bad.closed_with() == 4001
    evil = await ws_connect(origin="https://evil.example")
    assert await evil.closed_with() == 4003
    assert (await ping(await ws_connect(), 1))["type"] == "pong"


@pytest.mark.settings(max_bad_frames=2)
async def test_bad_frames_close_with_4000_and_only_the_abuser(ws_connect):
    bystander = await ws_connect()
    abuser = await ws_connect()
    for _ in range(3):
        await abuser.socket.send("not json")
    assert await abuser.closed_with() == 4000
    assert (await ping(bystander, 1))["type"] == "pong"


# -- HTTP publish rate -----------------------------------------------------------------


@pytest.mark.settings(publish_rate=1, publish_burst=2, api_keys=(API_KEY, OTHER_API_KEY),
                      jwt_secret=SECRET)
async def test_publish_rate_per_key_with_retry_after_and_recovery(publish, clock):
    busy, calm = bearer(API_KEY), bearer(OTHER_API_KEY)
    assert [(await publish("t", n, headers=busy)).code for n in range(2)] == [202, 202]
    limited = await publish("t", 2, headers=busy)
    assert limited.code == 429 and limited.headers["Retry-After"] == "1"
    assert json.loads(limited.body)["error"]["code"] == "rate_limited"
    assert (await publish("t", 3, headers=calm)).code == 202  # another key: its own budget
    alice = bearer(token("alice", publish=[">"]))
    assert (await publish("t", 4, headers=alice)).code == 202
    clock.advance(1)
    assert (await publish("t", 5, headers=busy)).code == 202
    assert (await publish("t", 6, headers=busy)).code == 429


@pytest.mark.settings(publish_rate=1, publish_burst=1)
async def test_publish_rate_per_address_without_auth(http_client, base_url, publish, clock):
    assert (await publish("t", 1)).code == 202
    assert (await publish("t", 2)).code == 429
    body = json.dumps({"events": [{"topic": "t", "data": 3}]})
    batch = await http_client.fetch(f"{base_url}/v1/events", method="POST", body=body,
                                    headers={"Content-Type": "application/json"},
                                    raise_error=False)
    assert batch.code == 429
    reads = await http_client.fetch(f"{base_url}/v1/topics/t/events", raise_error=False)
    assert reads.code == 200  # reading is not publishing
    clock.advance(1)
    assert (await publish("t", 4)).code == 202
