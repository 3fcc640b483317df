"""The subscriber against real memory servers: patterns, gaps, tokens, closes, a slow
consumer."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from squall_client import (
    AsyncPublisher,
    Backoff,
    Disconnected,
    Event,
    Gap,
    SquallError,
    Subscriber,
    SubscriptionError,
    mint_token,
)
from tests.client.support import FAST, data_of, run, take, ws_url
from tests.server_process import ServerProcess
from tests.waiting import eventually

SECRET = "test-jwt-secret-0123456789-abcdef"
API_KEY = "test-subscriber-key"


@pytest.fixture(scope="module")
def squall() -> Iterator[ServerProcess]:
    """A memory server with auth off and a long history."""
    with ServerProcess("--history-size", "1000") as server:
        yield server


@pytest.fixture(scope="module")
def secured() -> Iterator[ServerProcess]:
    """A memory server that wants tokens, and allows one origin only."""
    with ServerProcess("--jwt-secret", SECRET, "--api-keys", API_KEY,
                       "--allowed-origins", "https://app.example.com") as server:
        yield server


def test_patterns_get_what_they_match_once_in_order(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with Subscriber(ws_url(squall)) as subscriber, \
                AsyncPublisher(squall.url) as publisher:
            await subscriber.subscribe("shop.*")
            await subscriber.subscribe("chat.>")
            await subscriber.subscribe("shop.eu")  # overlaps shop.*: still once per event
            assert subscriber.topics == ["shop.*", "chat.>", "shop.eu"]
            await publisher.publish_many([
                ("shop.eu", 1), ("shop.eu.deep", "no"), ("chat.room.a", 2), ("other", "no"),
                ("shop.us", 3), ("chat", "no"), ("chat.b", 4), ("shop.eu", 5)])
            items = await take(subscriber, 5)
            assert data_of(items) == [1, 2, 3, 4, 5]
            assert [item.topic for item in items] == ["shop.eu", "chat.room.a", "shop.us",
                                                      "chat.b", "shop.eu"]
            assert subscriber.position("shop.*") == items[4].id  # type: ignore[union-attr]
            assert subscriber.position("chat.>") == items[3].id  # type: ignore[union-attr]

    run(scenario())


def test_unsubscribe_stops_the_events_of_that_subscription(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with Subscriber(ws_url(squall)) as subscriber, \
                AsyncPublisher(squall.url) as publisher:
            await subscriber.subscribe("unsub.a")
            await subscriber.subscribe("unsub.b")
            await subscriber.unsubscribe("unsub.a")
            await publisher.publish("unsub.a", "gone")
            await publisher.publish("unsub.b", "kept")
            assert data_of(await take(subscriber, 1)) == ["kept"]

    run(scenario())


def test_msgpack_subprotocol(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with Subscriber(ws_url(squall), msgpack=True) as subscriber, \
                AsyncPublisher(squall.url) as publisher:
            await subscriber.subscribe("packed.*")
            sent = await publisher.publish("packed.one", {"n": 1, "list": [1.5, None, "é"]})
            [event] = await take(subscriber, 1)
            assert event == Event("packed.one", sent.id, sent.ts,
                                  {"n": 1, "list": [1.5, None, "é"]})

    run(scenario())


def test_a_refused_subscription_raises_and_the_others_go_on(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with Subscriber(ws_url(squall)) as subscriber:
            await subscriber.subscribe("fine")
            with pytest.raises(SubscriptionError) as refused:
                await subscriber.subscribe("bad..topic")
            assert (refused.value.code, refused.value.topic) == ("invalid_topic", "bad..topic")
            assert subscriber.topics == ["fine"]
            async with AsyncPublisher(squall.url) as publisher:
                await publisher.publish("fine", "still here")
            assert data_of(await take(subscriber, 1)) == ["still here"]

    run(scenario())


def test_since_replays_what_came_after_it(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with AsyncPublisher(squall.url) as publisher:
            sent = await publisher.publish_many([("since.t", n) for n in range(5)])
            async with Subscriber(ws_url(squall)) as subscriber:
                await subscriber.subscribe("since.t", since=sent[1].id)
                await publisher.publish("since.t", "live")
                assert data_of(await take(subscriber, 4)) == [2, 3, 4, "live"]

    run(scenario())


def test_gap_after_a_memory_server_restart_then_the_new_events() -> None:
    """The restarted server has a new epoch: the old position cannot be resumed, so
    the subscriber yields Gap first, then every event of the new epoch, once."""
    server = ServerProcess().start()

    async def scenario() -> None:
        async with Subscriber(ws_url(server), backoff=FAST) as subscriber:
            await subscriber.subscribe("news")
            async with AsyncPublisher(server.url) as publisher:
                await publisher.publish_many([("news", n) for n in range(3)])
            assert data_of(await take(subscriber, 3)) == [0, 1, 2]
            await asyncio.to_thread(server.restart)
            async with AsyncPublisher(server.url) as publisher:  # races with the resume
                await publisher.publish_many([("news", n) for n in range(3, 6)])
            assert data_of(await take(subscriber, 4)) == [("gap", "news", "not_recovered"),
                                                          3, 4, 5]
            async with AsyncPublisher(server.url) as publisher:
                await publisher.publish("news", 6)
            assert data_of(await take(subscriber, 1)) == [6]

    try:
        run(scenario())
    finally:
        server.stop()


def test_pings_find_a_server_that_stopped_answering() -> None:
    """The server process is frozen (SIGSTOP: its sockets stay open, nothing answers):
    no pong comes, the subscriber gives the connection up and, once the server runs
    again, resumes where it was."""
    server = ServerProcess().start()
    assert server.process is not None

    async def scenario() -> None:
        async with Subscriber(ws_url(server), ping_interval=0.2, ping_timeout=0.3,
                              close_timeout=0.3, open_timeout=1.0,
                              backoff=FAST) as subscriber, \
                AsyncPublisher(server.url) as publisher:
            await subscriber.subscribe("alive")
            await publisher.publish("alive", 1)
            assert data_of(await take(subscriber, 1)) == [1]
            server.process.send_signal(signal.SIGSTOP)
            try:
                await eventually(lambda: subscriber.reconnects >= 1, what="a reconnect")
            finally:
                server.process.send_signal(signal.SIGCONT)
            await publisher.publish("alive", 2)
            assert data_of(await take(subscriber, 1)) == [2]

    try:
        run(scenario())
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_4001_gets_a_new_token_from_the_provider_and_resumes(secured: ServerProcess,
                                                            kind: str) -> None:
    """Tokens that expire within a second: the server closes with 4001 at expiry (or
    refuses one already expired); the provider gives a new one and the subscription
    resumes with nothing lost."""
    calls = itertools.count(1)
    issued: list[int] = []

    def fresh() -> str:
        issued.append(next(calls))
        return mint_token(SECRET, sub="alice", subscribe=["rotating.*"], ttl=1)

    async def fresh_async() -> str:
        await asyncio.sleep(0)
        return fresh()

    async def scenario() -> None:
        provider = fresh if kind == "sync" else fresh_async
        async with Subscriber(ws_url(secured), token_provider=provider,
                              backoff=FAST) as subscriber, \
                AsyncPublisher(secured.url, api_key=API_KEY) as publisher:
            await subscriber.subscribe("rotating.a")
            assert issued  # asked for the first connection: no token was given
            await publisher.publish("rotating.a", 1)
            assert data_of(await take(subscriber, 1)) == [1]
            await eventually(lambda: len(issued) >= 2, what="a second token")
            await publisher.publish("rotating.a", 2)
            await eventually(lambda: len(issued) >= 3, what="a third token")
            await publisher.publish("rotating.a", 3)
            assert data_of(await take(subscriber, 2)) == [2, 3]

    run(scenario())


def test_4001_without_a_provider_ends_the_iteration(secured: ServerProcess) -> None:
    async def scenario() -> None:
        # expires 1 to 2 s from now (exp is in whole seconds): after the subscribe
        token = mint_token(SECRET, sub="alice", subscribe=["expiring"], ttl=2)
        async with Subscriber(ws_url(secured), token=token, backoff=FAST) as subscriber:
            await subscriber.subscribe("expiring")
            with pytest.raises(Disconnected) as ended:
                await take(subscriber, 1)
            assert (ended.value.code, ended.value.close_code) == ("unauthorized", 4001)
            with pytest.raises(Disconnected):  # it stays ended
                await take(subscriber, 1)
            with pytest.raises(Disconnected):
                await subscriber.subscribe("expiring.more")

    run(scenario())


def test_a_provider_without_a_token_ends_it_too(secured: ServerProcess) -> None:
    async def scenario() -> None:
        async with Subscriber(ws_url(secured), token_provider=lambda: None) as subscriber:
            with pytest.raises(Disconnected) as ended:
                await subscriber.subscribe("anything")
            assert ended.value.code == "unauthorized"

    run(scenario())


def test_a_forbidden_pattern_is_refused(secured: ServerProcess) -> None:
    async def scenario() -> None:
        token = mint_token(SECRET, sub="bob", subscribe=["mine.*"], ttl=60)
        async with Subscriber(ws_url(secured), token=token) as subscriber:
            await subscriber.subscribe("mine.a")
            with pytest.raises(SubscriptionError) as refused:
                await subscriber.subscribe("theirs.a")
            assert refused.value.code == "forbidden"

    run(scenario())


async def close_with(code: int, reason: str) -> tuple[list[Event | Gap | str], int]:
    """A scripted peer (Squall has no path that sends ``code`` today): on each
    connection it confirms the subscribe; the first time it then closes with
    ``code``, after that it sends one event. What the subscriber yielded (or the
    exception it raised, as text), and how many times it connected."""
    connections = itertools.count(1)
    count = 0

    async def peer(socket: ServerConnection) -> None:
        nonlocal count
        count = next(connections)
        frame = json.loads(await socket.recv())
        await socket.send(json.dumps({"type": "subscribed", "topic": frame["topic"],
                                      "ref": frame["ref"], "last_id": "e-1"}))
        if count == 1:
            await socket.close(code, reason)
            return
        await socket.send(json.dumps({"type": "event", "topic": frame["topic"],
                                      "id": "e-2", "ts": 1, "data": "after"}))
        await socket.wait_closed()

    async with serve(peer, "127.0.0.1", 0,
                     subprotocols=[Subprotocol("squall.v1.json")]) as server:
        port = server.sockets[0].getsockname()[1]
        async with Subscriber(f"ws://127.0.0.1:{port}", backoff=FAST) as subscriber:
            await subscriber.subscribe("t")
            try:
                items: list[Event | Gap | str] = [*await take(subscriber, 1)]
            except Disconnected as ended:
                assert ended.close_code == code
                items = [f"{ended.code}: {ended.reason}"]
    return items, count


@pytest.mark.parametrize(("code", "outcome"), [
    (1000, "normal_close: bye"),
    (4010, "disconnected: bye"),
    (4000, "protocol_abuse: bye"),
    (1009, "message_too_big: bye"),
    (4003, "forbidden: bye"),
])
def test_final_close_codes_end_the_iteration(code: int, outcome: str) -> None:
    items, connections = run(close_with(code, "bye"))
    assert (items, connections) == ([outcome], 1)


@pytest.mark.parametrize("code", [1001, 4008, 4009, 4029, 1011])
def test_other_close_codes_reconnect_and_resume(code: int) -> None:
    items, connections = run(close_with(code, "again"))
    assert (data_of(items), connections) == (["after"], 2)  # type: ignore[arg-type]


def test_4003_for_an_origin_not_allowed(secured: ServerProcess) -> None:
    async def scenario() -> None:
        token = mint_token(SECRET, sub="dave", subscribe=["room"], ttl=60)
        async with Subscriber(ws_url(secured), token=token,
                              origin="https://evil.example.com") as subscriber:
            with pytest.raises(Disconnected) as ended:
                await subscriber.subscribe("room")
            assert (ended.value.code, ended.value.close_code) == ("forbidden", 4003)

    run(scenario())


def test_a_slow_consumer_falls_behind_and_loses_nothing(squall: ServerProcess) -> None:
    """Far more events than the buffer holds arrive while nobody reads: the subscriber
    gives the connection up and resumes from history as the consumer catches up."""

    async def scenario() -> None:
        async with Subscriber(ws_url(squall), buffer_size=50, backoff=FAST) as subscriber, \
                AsyncPublisher(squall.url) as publisher:
            await subscriber.subscribe("slow.a")
            await publisher.publish_many([("slow.a", n) for n in range(500)])
            await eventually(lambda: subscriber.overflows >= 1, what="an overflow")
            items = await take(subscriber, 500)
            assert data_of(items) == list(range(500))
            assert subscriber.overflows >= 2  # it fell behind again after each resume

    run(scenario())


def test_a_consumer_behind_more_than_the_history_is_told_with_a_gap() -> None:
    """The history (100 events) no longer has what the consumer missed when it comes
    back: the events it had, then a Gap, then what is published after."""
    with ServerProcess("--history-size", "100") as short:
        async def scenario() -> None:
            async with Subscriber(ws_url(short), buffer_size=50, backoff=FAST) as subscriber, \
                    AsyncPublisher(short.url) as publisher:
                await subscriber.subscribe("slow.b")
                await publisher.publish_many([("slow.b", n) for n in range(500)])
                await eventually(lambda: subscriber.overflows >= 1, what="an overflow")
                items: list[Event | Gap] = []
                while not items or not isinstance(items[-1], Gap):
                    items += await take(subscriber, 1)
                found = data_of(items)
                assert found[-1] == ("gap", "slow.b", "not_recovered")
                assert found[:-1] == list(range(len(found) - 1))  # a whole prefix, then it
                assert len(found) - 1 >= 50
                await publisher.publish("slow.b", "after the gap")
                assert data_of(await take(subscriber, 1)) == ["after the gap"]

        run(scenario())


def test_overlapping_subscriptions_resume_without_duplicates(squall: ServerProcess) -> None:
    """Three subscriptions that share events resume after the consumer fell behind
    (near the end, so the room left takes more than one replay): their replays
    overlap, and the iterator still yields every event once, in order."""

    async def scenario() -> None:
        async with Subscriber(ws_url(squall), buffer_size=250, backoff=FAST) as subscriber, \
                AsyncPublisher(squall.url) as publisher:
            await subscriber.subscribe("ov.*")
            await subscriber.subscribe("ov.a")
            await subscriber.subscribe("ov.>")
            sent = [(f"ov.{'ab'[n % 3 == 0]}", n) for n in range(300)]
            await publisher.publish_many(sent)
            await eventually(lambda: subscriber.overflows >= 1, what="an overflow")
            items = await take(subscriber, 300)
            assert data_of(items) == list(range(300))
            await publisher.publish("ov.a", "end")
            assert data_of(await take(subscriber, 1)) == ["end"]

    run(scenario())


def test_a_replay_larger_than_replay_size_is_skipped_after_a_gap(squall: ServerProcess) -> None:
    async def scenario() -> None:
        async with AsyncPublisher(squall.url) as publisher:
            sent = await publisher.publish_many([("big.replay", n) for n in range(100)])
            async with Subscriber(ws_url(squall), replay_size=20) as subscriber:
                await subscriber.subscribe("big.replay", since=sent[0].id)
                assert subscriber.position("big.replay") == sent[-1].id
                await publisher.publish("big.replay", "after")
                assert data_of(await take(subscriber, 2)) == [
                    ("gap", "big.replay", "replay_too_large"), "after"]

    run(scenario())


def test_close_ends_the_iteration_and_pending_subscribes(squall: ServerProcess) -> None:
    async def scenario() -> None:
        subscriber = Subscriber(ws_url(squall))
        await subscriber.subscribe("closing")
        consumer = asyncio.ensure_future(take(subscriber, 1))
        await asyncio.sleep(0)
        await subscriber.close()
        assert await consumer == []
        with pytest.raises(SquallError) as closed:
            await subscriber.subscribe("again")
        assert closed.value.code == "closed"

    run(scenario())


def test_gap_and_event_are_plain_values() -> None:
    assert Gap("a.*", "not_recovered") == Gap("a.*", "not_recovered")
    assert Event("a", "x-1", 1, None).data is None


@dataclass(frozen=True)
class _Recording(Backoff):
    """A fast backoff that notes the attempt numbers it is asked for."""

    attempts: list[int] = field(default_factory=list)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        self.attempts.append(attempt)
        return 0.01


def test_the_backoff_grows_while_the_server_stays_away() -> None:
    """After a good connection, failed connects count up: one client must not try
    again every fraction of a second through an outage."""
    backoff = _Recording()
    servers: list[Any] = []

    async def once(socket: ServerConnection) -> None:
        frame = json.loads(await socket.recv())
        await socket.send(json.dumps({"type": "subscribed", "topic": frame["topic"],
                                      "ref": frame["ref"], "last_id": "e-1"}))
        servers[0].close(close_connections=False)  # no more connections from now on
        await socket.close(1001, "going away")

    async def main() -> None:
        server = await serve(once, "127.0.0.1", 0, subprotocols=[Subprotocol("squall.v1.json")])
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        async with Subscriber(f"ws://127.0.0.1:{port}", backoff=backoff) as subscriber:
            await subscriber.subscribe("t")
            await eventually(lambda: len(backoff.attempts) >= 5, what="five reconnects")
        await server.wait_closed()
        assert backoff.attempts[:5] == [0, 1, 2, 3, 4]

    run(main())
