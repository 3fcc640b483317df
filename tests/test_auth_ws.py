"""Auth and origins on the WebSocket, against a real server with real clients."""

from __future__ import annotations

import dataclasses
import time

import pytest
import websockets

from server import signals
from tests.auth_support import (
    API_KEY,
    EC_P256,
    OTHER_SECRET,
    RSA,
    SECRET,
    bearer,
    make_key_pair,
    token,
    unsigned_token,
)
from tests.conftest import TIMEOUT

pytestmark = pytest.mark.gen_test(timeout=20)

AUTH_ON = pytest.mark.settings(api_keys=(API_KEY,), jwt_secret=SECRET,
                               public_topics=("news.>", "status"))


async def still_serving(client) -> None:
    await client.send({"type": "ping", "ref": "alive"})
    assert await client.recv() == {"type": "pong", "ref": "alive"}


async def expect_error(client, code: str) -> dict:
    frame = await client.recv_type("error")
    assert frame["code"] == code, frame
    return frame


# -- anonymous ---------------------------------------------------------------------------


@AUTH_ON
async def test_anonymous_clients_read_public_topics_only(ws_connect, publish):
    client = await ws_connect()
    for allowed in ("news.eu", "news.*", "news.>", "status"):
        await client.subscribe(allowed)
    for refused in ("orders", ">", "*", "news", "status.x", "*.eu"):
        await client.send({"type": "subscribe", "topic": refused, "ref": refused})
        frame = await expect_error(client, "forbidden")
        assert frame["ref"] == refused and repr(refused) in frame["message"]
    await still_serving(client)
    assert (await publish("news.eu", "hello", headers=bearer(API_KEY))).code == 202
    assert (await client.recv_type("event"))["data"] == "hello"


@AUTH_ON
async def test_anonymous_clients_publish_nowhere(ws_connect):
    client = await ws_connect(query="topic=news.eu")
    await client.recv_type("subscribed")
    await client.send({"type": "publish", "topic": "news.eu", "data": 1, "ref": 7})
    assert (await expect_error(client, "forbidden"))["ref"] == 7
    await still_serving(client)


@AUTH_ON
async def test_forbidden_query_topics_get_error_frames(ws_connect):
    client = await ws_connect(query="topic=orders.eu&topic=news.eu")
    await expect_error(client, "forbidden")
    assert (await client.recv_type("subscribed"))["topic"] == "news.eu"
    await still_serving(client)


# -- tokens ------------------------------------------------------------------------------


@AUTH_ON
async def test_token_claims_rule_subscribe_and_publish(ws_connect):
    alice = await ws_connect(query=f"token={token('alice', ['chat.*'], ['chat.*'])}")
    for allowed in ("chat.*", "chat.room1", "news.eu"):  # news.eu: public to everyone
        await alice.subscribe(allowed)
    await alice.send({"type": "subscribe", "topic": "chat.>", "ref": 1})
    await expect_error(alice, "forbidden")
    await alice.send({"type": "publish", "topic": "chat.room1.x", "data": 0, "ref": 2})
    await expect_error(alice, "forbidden")
    await alice.send({"type": "publish", "topic": "orders", "data": 0, "ref": 3})
    await expect_error(alice, "forbidden")
    await alice.send({"type": "publish", "topic": "chat.room1", "data": "hi", "ref": 4})
    frames = [await alice.recv(), await alice.recv()]
    assert sorted(frame["type"] for frame in frames) == ["event", "published"]
    await still_serving(alice)


@AUTH_ON
async def test_token_from_the_authorization_header(ws_connect):
    client = await ws_connect(additional_headers=bearer(token("bob", ["orders.>"])))
    await client.subscribe("orders.eu.*")
    await client.send({"type": "subscribe", "topic": "chat.x", "ref": 1})
    await expect_error(client, "forbidden")


@AUTH_ON
async def test_api_key_in_the_header_may_do_everything(ws_connect):
    client = await ws_connect(additional_headers=bearer(API_KEY))
    await client.subscribe(">")
    await client.send({"type": "publish", "topic": "any.where", "data": 1})
    frames = [await client.recv(), await client.recv()]
    assert sorted(frame["type"] for frame in frames) == ["event", "published"]


@pytest.fixture
def connected_clients():
    seen: list[signals.ClientInfo] = []

    def receiver(signal, sender, client, **kwargs):
        seen.append(client)

    signals.client_connected.connect(receiver)
    yield seen
    signals.client_connected.disconnect(receiver)


@AUTH_ON
async def test_the_token_subject_names_the_client(ws_connect, connected_clients):
    client = await ws_connect(query=f"token={token('alice')}")
    await still_serving(client)
    anonymous = await ws_connect()
    await still_serving(anonymous)
    assert [info.sub for info in connected_clients] == ["alice", None]


BAD = {
    "alg none": lambda: unsigned_token(subscribe=[">"]),
    "wrong secret": lambda: token(subscribe=[">"], key=OTHER_SECRET),
    "expired": lambda: token(subscribe=[">"], ttl=-1),
    "malformed": lambda: "abc.def",
    "api key in the query": lambda: API_KEY,
    "no exp": lambda: token(exp=None),
}


@AUTH_ON
@pytest.mark.parametrize("kind", BAD)
async def test_bad_tokens_close_with_4001(ws_connect, kind):
    bystander = await ws_connect(query="topic=news.a")
    await bystander.recv_type("subscribed")
    refused = await ws_connect(query=f"token={BAD[kind]()}&topic=news.a")
    assert await refused.closed_with() == 4001
    await still_serving(bystander)


@AUTH_ON
async def test_bad_header_token_closes_with_4001(ws_connect):
    client = await ws_connect(additional_headers={"Authorization": "Basic abc"})
    assert await client.closed_with() == 4001
    client = await ws_connect(additional_headers=bearer(token(key=OTHER_SECRET)))
    assert await client.closed_with() == 4001


@AUTH_ON
async def test_an_expiring_token_closes_the_connection_at_exp(ws_connect, publish):
    bystander = await ws_connect(query=f"token={token('bob', ['chat.*'])}")
    await bystander.subscribe("chat.room")
    expires = int(time.time()) + 2
    alice = await ws_connect(query=f"token={token('alice', ['chat.*'], exp=expires)}")
    await alice.subscribe("chat.room")
    assert (await publish("chat.room", "before", headers=bearer(API_KEY))).code == 202
    assert (await alice.recv_type("event"))["data"] == "before"
    assert await alice.closed_with(timeout=TIMEOUT) == 4001
    assert time.time() >= expires - 0.05  # closed at exp, not before
    assert (await publish("chat.room", "after", headers=bearer(API_KEY))).code == 202
    assert [event["data"] for event in await bystander.events(2)] == ["before", "after"]


# -- public keys -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ws-keys")
    return {"rsa": make_key_pair(folder, "rsa", *RSA), "ec": make_key_pair(folder, "ec", *EC_P256),
            "ec2": make_key_pair(folder, "ec2", *EC_P256)}


@pytest.fixture
def key_name() -> str | None:
    """The key pair whose public key the node verifies tokens with (parametrized)."""
    return None


@pytest.fixture
def squall_settings(squall_settings, key_name, pairs):
    if key_name is None:
        return squall_settings
    return dataclasses.replace(squall_settings, jwt_public_key=str(pairs[key_name].public_path))


@pytest.mark.parametrize("key_name", ["rsa"])
async def test_rs256_tokens_with_the_public_key(ws_connect, pairs, key_name):
    good = token("rsa-user", ["a.*"], key=pairs["rsa"].private, algorithm="RS256")
    client = await ws_connect(query=f"token={good}")
    await client.subscribe("a.b")
    forged = token("rsa-user", [">"], key=SECRET)  # HS256 when only a public key is set
    assert await (await ws_connect(query=f"token={forged}")).closed_with() == 4001


@pytest.mark.parametrize("key_name", ["ec"])
async def test_es256_tokens_with_the_public_key(ws_connect, pairs, key_name):
    good = token("ec-user", ["a.*"], key=pairs["ec"].private, algorithm="ES256")
    client = await ws_connect(query=f"token={good}")
    await client.subscribe("a.b")
    other = token("ec-user", ["a.*"], key=pairs["ec2"].private, algorithm="ES256")
    assert await (await ws_connect(query=f"token={other}")).closed_with() == 4001


# -- origins ---------------------------------------------------------------------------


async def test_cross_origin_handshakes_close_with_4003_by_default(ws_connect, http_port):
    bystander = await ws_connect()
    refused = await ws_connect(origin="https://evil.example")
    assert await refused.closed_with() == 4003
    same = await ws_connect(origin=f"http://127.0.0.1:{http_port}")
    await still_serving(same)
    await still_serving(bystander)  # no Origin: a non-browser client


@pytest.mark.settings(allowed_origins=("https://app.example.com",))
async def test_listed_origins_are_allowed(ws_connect):
    await still_serving(await ws_connect(origin="https://app.example.com"))
    assert await (await ws_connect(origin="https://app.example.org")).closed_with() == 4003


@pytest.mark.settings(allowed_origins=("*",))
async def test_star_allows_every_origin(ws_connect):
    await still_serving(await ws_connect(origin="https://anyone.example"))


@AUTH_ON
async def test_origin_is_checked_before_the_token(ws_connect):
    client = await ws_connect(query=f"token={token(subscribe=['>'])}",
                              origin="https://evil.example")
    assert await client.closed_with() == 4003


async def test_auth_off_lets_everyone_subscribe_and_publish(ws_connect):
    client = await ws_connect(query="token=whatever")
    await client.subscribe(">")
    await client.send({"type": "publish", "topic": "x.y", "data": 1})
    frames = [await client.recv(), await client.recv()]
    assert sorted(frame["type"] for frame in frames) == ["event", "published"]


async def test_an_origin_that_is_no_url_is_a_400(ws_url):
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url, origin="https://[", open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 400
    assert b"Origin" in refused.value.response.body
