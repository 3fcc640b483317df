"""Presence, join and leave frames, lifecycle signals and the operator API on one node
(the memory broker), on every transport. Two nodes on Redis: tests/test_presence_nodes.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from server import signals
from server.errors import BrokerUnavailable
from tests.auth_support import API_KEY, SECRET, bearer, token
from tests.transport_clients import HttpRefused
from tests.waiting import eventually

pytestmark = pytest.mark.gen_test(timeout=60)

ALICE = {"name": "Alice", "avatar": "/a.png"}
PRESENCE = pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET,
                                public_topics=("news.>",), presence_topics=("room.>",),
                                lifecycle_debounce=0.4)


def alice(**extra: Any) -> str:
    return token("alice", [">"], [">"], squall={"subscribe": [">"], "publish": [">"],
                                                "info": ALICE}, **extra)


def person(sub: str, info: Any = None, subscribe: tuple[str, ...] = (">",)) -> str:
    rights: dict[str, Any] = {"subscribe": list(subscribe), "publish": []}
    if info is not None:
        rights["info"] = info
    return token(sub, squall=rights)


async def call(http_client: AsyncHTTPClient, base_url: str, method: str, path: str,
               body: Any = None, credential: str | None = API_KEY,
               headers: dict[str, str] | None = None, raw: bytes | None = None,
               ) -> tuple[int, Any]:
    sent = {"Content-Type": "application/json", **(bearer(credential) if credential else {}),
            **(headers or {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    response: HTTPResponse = await http_client.fetch(
        f"{base_url}{path}", method=method, body=data, headers=sent, raise_error=False,
        allow_nonstandard_methods=True)
    return response.code, json.loads(response.body) if response.body else None


async def presence(http_client: AsyncHTTPClient, base_url: str, name: str,
                   credential: str | None = API_KEY) -> dict[str, Any]:
    status, body = await call(http_client, base_url, "GET",
                              f"/v1/topics/{name.replace('>', '%3E')}/presence",
                              credential=credential)
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def subscribed(client: Any) -> dict[str, Any]:
    return await client.recv_type("subscribed")


# -- the presence list ----------------------------------------------------------------------


@PRESENCE
async def test_presence_lists_the_clients_of_exactly_that_name(open_client, http_client,
                                                               base_url, node, transport):
    before = int(time.time() * 1000)
    first = await open_client(("room.1",), token=alice())
    await subscribed(first)
    other = await open_client(("room.*",), token=person("bob"))
    await subscribed(other)
    found = await presence(http_client, base_url, "room.1")
    assert (found["topic"], found["count"], found["truncated"]) == ("room.1", 1, False)
    [entry] = found["clients"]
    assert set(entry) == {"id", "sub", "node", "connected_at", "info"}
    assert entry["id"].startswith("c-") and entry["sub"] == "alice"
    assert entry["node"] == node.name and entry["info"] == ALICE
    assert before <= entry["connected_at"] <= int(time.time() * 1000)
    pattern = await presence(http_client, base_url, "room.*")
    assert [(c["sub"], c["info"]) for c in pattern["clients"]] == [("bob", None)]
    assert (await presence(http_client, base_url, "room.2"))["count"] == 0
    first.close()
    await eventually(lambda: presence(http_client, base_url, "room.1"),
                     what="the list read")
    await eventually(lambda: _count(http_client, base_url, "room.1", 0),
                     what="the closed client gone from presence")


async def _count(http_client: AsyncHTTPClient, base_url: str, name: str, count: int) -> bool:
    return (await presence(http_client, base_url, name))["count"] == count


@PRESENCE
async def test_who_may_read_presence(http_client, base_url, ws_connect):
    client = await ws_connect(query=f"topic=room.r&token={person('carol')}")
    await subscribed(client)
    path = "/v1/topics/room.r/presence"
    assert (await call(http_client, base_url, "GET", path))[0] == 200
    covered = person("dave", subscribe=("room.>",))
    assert (await call(http_client, base_url, "GET", path, credential=covered))[0] == 200
    status, body = await call(http_client, base_url, "GET", path,
                              credential=person("eve", subscribe=("news.>",)))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await call(http_client, base_url, "GET", path, credential=None)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = await call(http_client, base_url, "GET", "/v1/topics/room..x/presence")
    assert (status, body["error"]["code"]) == (400, "invalid_topic")


@PRESENCE
async def test_a_tcp_client_that_authenticates_is_listed_as_who_it_became(
        http_client, base_url, tcp_port):
    from tests.transport_clients import TcpClient

    client = await TcpClient.connect(tcp_port, ("news.x",))
    try:
        await subscribed(client)
        [before] = (await presence(http_client, base_url, "news.x"))["clients"]
        assert (before["sub"], before["info"]) == (None, None)
        await client.send({"type": "auth", "token": alice(), "ref": 1})
        assert (await client.recv_type("authed"))["sub"] == "alice"
        await eventually(lambda: _entry_is(http_client, base_url, "news.x", "alice"),
                         what="the entry rewritten")
        [after] = (await presence(http_client, base_url, "news.x"))["clients"]
        assert (after["id"], after["info"]) == (before["id"], ALICE)
    finally:
        client.close()


async def _entry_is(http_client: AsyncHTTPClient, base_url: str, name: str, sub: str) -> bool:
    return [c["sub"] for c in (await presence(http_client, base_url, name))["clients"]] == [sub]


# -- join and leave frames ----------------------------------------------------------------


@PRESENCE
async def test_join_and_leave_frames_for_the_others(open_client, ws_connect, transport):
    watcher = await ws_connect(query=f"topic=room.j&token={person('watcher')}")
    await subscribed(watcher)
    joiner = await open_client(("room.j",), token=alice())
    await subscribed(joiner)
    join = await watcher.recv_type("join")
    assert join["topic"] == "room.j"
    assert set(join["client"]) == {"id", "sub", "info"}
    assert (join["client"]["sub"], join["client"]["info"]) == ("alice", ALICE)
    late = await ws_connect(query=f"topic=room.j&token={person('late')}")
    await subscribed(late)
    # the joiner's first frame after its own subscribed: the next join, not its own
    assert (await joiner.recv_type("join"))["client"]["sub"] == "late"
    assert (await watcher.recv_type("join"))["client"]["sub"] == "late"
    joiner.close()
    for client in (watcher, late):
        leave = await client.recv_type("leave")
        assert leave["client"] == join["client"] and leave["topic"] == "room.j"
    await late.send({"type": "unsubscribe", "topic": "room.j"})
    await late.recv_type("unsubscribed")
    assert (await watcher.recv_type("leave"))["client"]["sub"] == "late"


@PRESENCE
async def test_frames_keep_their_order_with_the_events_of_the_topic(ws_connect, publish):
    watcher = await ws_connect(query=f"topic=room.o&token={person('w')}")
    await subscribed(watcher)
    assert (await publish("room.o", "before", headers=bearer(API_KEY))).code == 202
    other = await ws_connect(query=f"topic=room.o&token={person('o')}")
    await subscribed(other)
    assert (await publish("room.o", "after", headers=bearer(API_KEY))).code == 202
    frames = [await watcher.recv() for _ in range(3)]
    assert [(f["type"], f.get("data")) for f in frames] == [
        ("event", "before"), ("join", None), ("event", "after")]


@PRESENCE
async def test_names_outside_presence_topics_get_no_frames(ws_connect, publish, http_client,
                                                         base_url):
    first = await ws_connect(query=f"topic=quiet&token={person('f')}")
    await subscribed(first)
    second = await ws_connect(query=f"topic=quiet&token={person('s')}")
    await subscribed(second)
    assert (await publish("quiet", "only this", headers=bearer(API_KEY))).code == 202
    assert (await first.recv())["data"] == "only this"  # no join came before the event
    assert (await presence(http_client, base_url, "quiet"))["count"] == 2


@PRESENCE
async def test_a_pattern_name_has_a_presence_of_its_own(ws_connect):
    watcher = await ws_connect(query=f"topic=room.*&token={person('w')}")
    await subscribed(watcher)
    exact = await ws_connect(query=f"topic=room.p&token={person('exact')}")
    await subscribed(exact)
    pattern = await ws_connect(query=f"topic=room.*&token={person('pattern')}")
    await subscribed(pattern)
    join = await watcher.recv_type("join")
    assert join["topic"] == "room.*" and join["client"]["sub"] == "pattern"


# -- lifecycle signals --------------------------------------------------------------------


@PRESENCE
async def test_occupied_at_once_vacated_after_the_debounce_and_a_reconnect_fires_neither(
        ws_connect, node):
    heard: list[tuple[str, str, float]] = []

    def on_signal(*, signal: signals.Signal, topic: str, **kwargs: Any) -> None:
        heard.append((signal.name, topic, time.monotonic()))

    signals.topic_occupied.connect(on_signal)
    signals.topic_vacated.connect(on_signal)
    try:
        client = await ws_connect(query=f"topic=life.a&token={person('l')}")
        await subscribed(client)
        assert [(name, topic) for name, topic, _ in heard] == [("topic_occupied", "life.a")]
        await client.socket.close()
        again = await ws_connect(query=f"topic=life.a&token={person('l')}")  # back in time
        await subscribed(again)
        await asyncio.sleep(0.6)
        assert len(heard) == 1
        left = time.monotonic()
        await again.socket.close()
        await eventually(lambda: len(heard) == 2, what="topic_vacated")
        assert heard[1][:2] == ("topic_vacated", "life.a") and heard[1][2] - left >= 0.35
    finally:
        signals.topic_occupied.disconnect(on_signal)
        signals.topic_vacated.disconnect(on_signal)


# -- the operator API: disconnects ----------------------------------------------------------


@PRESENCE
async def test_disconnect_by_sub_closes_every_connection_of_that_sub(
        open_client, ws_connect, http_client, base_url, transport):
    target = await open_client(("news.a",), token=alice())
    await subscribed(target)
    bystander = await ws_connect(query=f"topic=news.a&token={person('bob')}")
    await subscribed(bystander)
    started = time.monotonic()
    status, body = await call(http_client, base_url, "POST", "/v1/disconnect", {"sub": "alice"})
    assert (status, body) == (202, {"accepted": True})
    close = await target.recv_type("close")
    assert (close["code"], close["reason"]) == (4010, "disconnected by the backend")
    assert time.monotonic() - started < 1.0
    await bystander.send({"type": "ping", "ref": 1})
    assert await bystander.recv() == {"type": "pong", "ref": 1}


@PRESENCE
async def test_disconnect_by_client_id_with_a_code_and_reason(open_client, ws_connect,
                                                             http_client, base_url, transport):
    target = await open_client(("news.b",), token=alice())
    await subscribed(target)
    same_sub = await ws_connect(query=f"topic=news.b&token={alice()}")
    await subscribed(same_sub)
    listed = (await presence(http_client, base_url, "news.b"))["clients"]
    target_id = listed[0]["id"]
    status, _ = await call(http_client, base_url, "POST", "/v1/disconnect",
                           {"client": target_id, "code": 4321, "reason": "kicked: spam"})
    assert status == 202
    close = await target.recv_type("close")
    assert (close["code"], close["reason"]) == (4321, "kicked: spam")
    await same_sub.send({"type": "ping", "ref": 2})
    assert await same_sub.recv() == {"type": "pong", "ref": 2}


@PRESENCE
async def test_only_api_keys_may_disconnect(http_client, base_url, ws_connect):
    client = await ws_connect(query=f"topic=news.c&token={alice()}")
    await subscribed(client)
    for credential, expected in ((alice(), (403, "forbidden")),
                                 (None, (401, "unauthorized")),
                                 ("not-a-key", (401, "unauthorized"))):
        status, body = await call(http_client, base_url, "POST", "/v1/disconnect",
                                  {"sub": "alice"}, credential=credential)
        assert (status, body["error"]["code"]) == expected, credential
        assert body["error"]["message"]
    await client.send({"type": "ping", "ref": 3})
    assert await client.recv() == {"type": "pong", "ref": 3}


@pytest.mark.parametrize(("body", "problem"), [
    ([], "must be an object"),
    ({}, "exactly one of sub and client"),
    ({"sub": "a", "client": "c-1"}, "exactly one of sub and client"),
    ({"sub": ""}, "sub must be a string"),
    ({"client": 7}, "client must be a string"),
    ({"sub": "a", "code": 1000}, "code must be a whole number from 4000 to 4999"),
    ({"sub": "a", "code": "4010"}, "code must be"),
    ({"sub": "a", "code": True}, "code must be"),
    ({"sub": "a", "reason": "x" * 124}, "reason must be a string of at most 123 bytes"),
    ({"sub": "a", "reason": "é" * 62}, "reason must be"),
    ({"sub": "a", "reason": 5}, "reason must be"),
    ({"sub": "a", "user": "b"}, "unknown fields ['user']"),
])
@PRESENCE
async def test_bad_disconnect_bodies_are_invalid_body(http_client, base_url, body, problem):
    status, answer = await call(http_client, base_url, "POST", "/v1/disconnect", body)
    assert (status, answer["error"]["code"]) == (400, "invalid_body")
    assert problem in answer["error"]["message"]


@PRESENCE
async def test_disconnect_bodies_that_are_no_json_object(http_client, base_url):
    status, answer = await call(http_client, base_url, "POST", "/v1/disconnect", raw=b"{nope")
    assert (status, answer["error"]["code"]) == (400, "invalid_body")
    status, answer = await call(http_client, base_url, "POST", "/v1/disconnect", raw=b"")
    assert (status, answer["error"]["code"]) == (400, "invalid_body")
    status, answer = await call(http_client, base_url, "POST", "/v1/disconnect",
                                raw=b'{"sub": "a"}', headers={"Content-Type": "text/plain"})
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    status, answer = await call(http_client, base_url, "POST", "/v1/disconnect",
                                {"sub": "a", "reason": "x" * 5000})
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")
    status, answer = await call(http_client, base_url, "GET", "/v1/disconnect")
    assert (status, answer["error"]["code"]) == (405, "method_not_allowed")


async def test_with_auth_off_anyone_may_disconnect(http_client, base_url, ws_connect):
    client = await ws_connect(query="topic=open")
    await subscribed(client)
    [entry] = (await presence(http_client, base_url, "open", credential=None))["clients"]
    status, _ = await call(http_client, base_url, "POST", "/v1/disconnect",
                           {"client": entry["id"]}, credential=None)
    assert status == 202
    assert await client.closed_with() == 4010


# -- the token's info ---------------------------------------------------------------------


def _info_of(size: int) -> dict[str, str]:
    """An object whose JSON is exactly ``size`` bytes."""
    return {"n": "x" * (size - len('{"n":""}'))}


@PRESENCE
async def test_info_of_up_to_1_kib_travels_larger_is_refused(open_client, transport,
                                                            http_client, base_url):
    fits = person("frank", _info_of(1024))
    client = await open_client(("room.i",), token=fits)
    await subscribed(client)
    [entry] = (await presence(http_client, base_url, "room.i"))["clients"]
    assert entry["info"] == _info_of(1024)
    deep: Any = "bottom"
    for _ in range(64):  # inside the info object: 65 levels
        deep = [deep]
    carried = "info claim must be a value every codec can carry"
    for too_big, problem in (
            (person("grace", _info_of(1025)),
             "info claim is 1025 bytes as JSON; the limit is 1024"),
            (person("grace", ["not", "an", "object"]), "info claim must be an object"),
            (person("grace", {"n": 2**64}), carried), (person("grace", {"n": deep}), carried),
            (person("grace", {"n": "\ud800"}), carried),  # a lone surrogate, as JSON allows
            (person("gr\udfffce"), "'sub' claim is not valid Unicode")):
        if transport == "sse":
            with pytest.raises(HttpRefused) as refused:
                await open_client(("room.i",), token=too_big)
            assert refused.value.status == 401
            assert problem in refused.value.body["error"]["message"]
        elif transport == "ws":
            refused_ws = await open_client(("room.i",), token=too_big)
            close = await refused_ws.recv_type("close")
            assert close["code"] == 4001 and problem in close["reason"]
        else:
            anonymous = await open_client(("news.i",), token=too_big)
            error = await anonymous.recv_type("error")
            assert error["code"] == "unauthorized" and problem in error["message"]
        status, body = await call(http_client, base_url, "POST", "/v1/topics/room.i/events",
                                  {"x": 1}, credential=too_big)
        assert status == 401 and problem in body["error"]["message"]


async def test_presence_writes_are_counted_in_the_metrics(ws_connect, http_client, base_url):
    client = await ws_connect(query="topic=counted")
    await subscribed(client)
    metrics = (await http_client.fetch(f"{base_url}/metrics")).body.decode()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("squall_presence_")}
    assert values["squall_presence_writes_total"] >= 1
    assert values["squall_presence_write_failures_total"] == 0
    assert values["squall_presence_pending"] == 0


@pytest.mark.settings(broker_timeout=0.3)
async def test_a_batch_that_failed_during_an_overflow_is_not_sent_after_the_rewrite(
        ws_connect, node, monkeypatch):
    """A join in flight when the changes overflow, then failing: the rewrite's snapshot
    (without that client, who left) must be the last word, not the stale join."""
    writer, broker = node.presence, node.broker
    writer.max_pending = 1
    flying, failing = asyncio.Event(), asyncio.Event()
    update = broker.update_presence

    async def fail_first(changes):
        if failing.is_set():
            return await update(changes)
        flying.set()
        await failing.wait()
        raise BrokerUnavailable("the broker did not answer (test)")

    monkeypatch.setattr(broker, "update_presence", fail_first)
    ghost = await ws_connect()
    await ghost.send({"type": "subscribe", "topic": "room.a"})
    await asyncio.wait_for(flying.wait(), 5)  # the ghost's join is with the broker
    await ghost.recv_type("subscribed")  # after the presence timeout
    await ghost.socket.close()
    stays = await ws_connect()
    await stays.send({"type": "subscribe", "topic": "room.a"})
    await eventually(lambda: writer.rewrites == 1, what="the overflow")
    failing.set()
    await stays.recv_type("subscribed")
    assert await writer.written(5)
    listed = await broker.presence("room.a", 10)
    assert [entry["id"] for entry in listed.entries] == [
        next(iter(node.hub.connections)).info.id]
