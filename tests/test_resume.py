"""Gap-free resume with ``since`` over real sockets, and the history endpoints."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.errors import BrokerUnavailable

pytestmark = pytest.mark.gen_test(timeout=60)


@pytest.mark.settings(history_size=1000)
async def test_resume_gets_exactly_the_missed_events_then_live(ws_connect, publish):
    first = await ws_connect()
    await first.subscribe("chat.room")
    for n in range(10):
        await publish("chat.room", n)
    seen = await first.events(10)
    last_id = seen[-1]["id"]
    await first.socket.close()

    async def publish_range(start, stop):
        for n in range(start, stop):
            assert (await publish("chat.room", n)).code == 202

    await publish_range(10, 200)
    # more publishes race with the reconnect
    racing = asyncio.ensure_future(publish_range(200, 400))
    second = await ws_connect()
    await second.send({"type": "subscribe", "topic": "chat.room", "since": last_id, "ref": 1})
    frames = []
    while True:
        frame = await second.recv()
        if frame["type"] == "subscribed":
            assert frame == {"type": "subscribed", "topic": "chat.room", "ref": 1,
                             "recovered": True, "last_id": frame["last_id"]}
            break
        frames.append(frame)
    await racing
    await publish("chat.room", "live")
    replayed = [frame["data"] for frame in frames]
    assert replayed == list(range(10, 10 + len(replayed)))  # replay: in order, no gap
    rest = await second.events(400 - 10 - len(replayed) + 1)
    assert replayed + [event["data"] for event in rest] == [*range(10, 400), "live"]


@pytest.mark.settings(history_size=100_000, max_replay_events=100_000)
async def test_replay_live_boundary_under_a_continuous_publish_loop(ws_connect, publish):
    stop = asyncio.Event()

    async def publish_forever():
        n = 0
        while not stop.is_set():
            assert (await publish("race", n)).code == 202
            n += 1

    watcher = await ws_connect(query="topic=race")
    await watcher.recv_type("subscribed")
    loop = asyncio.ensure_future(publish_forever())
    last = await watcher.recv_type("event")
    await watcher.socket.close()  # it would fall behind: it reads no more
    for _ in range(5):  # resume from a moving point, again and again, while publishing
        client = await ws_connect()
        await client.send({"type": "subscribe", "topic": "race", "since": last["id"]})
        received = []
        while len(received) < 30:
            frame = await client.recv()
            if frame["type"] == "event":
                received.append(frame)
            else:
                assert frame["recovered"] is True
        data = [frame["data"] for frame in received]
        assert data == list(range(last["data"] + 1, last["data"] + 31))
        last = received[-1]
        await client.socket.close()
    stop.set()
    await loop


@pytest.mark.settings(history_size=1000, send_queue_bytes=64 * 1024)
async def test_a_replay_larger_than_the_send_queue_is_paced_not_dropped(
        ws_connect, http_client, base_url):
    events = [{"topic": "big", "data": {"n": n, "pad": "x" * 1000}} for n in range(500)]
    response = await http_client.fetch(f"{base_url}/v1/events", method="POST",
                                       body=json.dumps({"events": events}))
    first = json.loads(response.body)["events"][0]["id"]
    client = await ws_connect(max_queue=4)  # reads slowly: the replay must wait for it
    await client.send({"type": "subscribe", "topic": "big", "since": first})
    replayed = [event["data"]["n"] for event in await client.events(499)]
    assert replayed == list(range(1, 500))
    assert (await client.recv_type("subscribed"))["recovered"] is True


@pytest.mark.settings(history_size=5)
async def test_unrecoverable_resume_says_so_and_replays_nothing(ws_connect, publish):
    client = await ws_connect()
    await client.subscribe("t")
    await publish("t", 0)
    old_id = (await client.recv_type("event"))["id"]
    for n in range(1, 10):
        await publish("t", n)
    resumed = await ws_connect()
    for since in (old_id, "garbage", f"{old_id.rpartition('-')[0]}-999"):
        reply = await resumed.subscribe("t", since=since)
        assert reply["recovered"] is False
    await publish("t", "live")
    assert (await resumed.recv_type("event"))["data"] == "live"


@pytest.mark.settings(history_size=5)
async def test_a_resume_from_a_forgotten_epoch_gets_everything_retained_now(ws_connect,
                                                                           publish):
    """An id of an epoch whose history is gone (the server restarted): the loss is said,
    and every event retained since comes first, so nothing accepted since is lost."""
    ids = [json.loads((await publish("fe.t", n)).body)["id"] for n in range(8)]
    epoch = ids[0].rpartition("-")[0]
    forgotten = ("y" if epoch[0] == "z" else "z") + epoch[1:] + "-3"
    client = await ws_connect()
    await client.send({"type": "subscribe", "topic": "fe.*", "since": forgotten, "ref": 7})
    replayed = await client.events(5)
    assert [event["data"] for event in replayed] == [3, 4, 5, 6, 7]
    reply = await client.recv_type("subscribed")
    assert (reply["recovered"], reply["ref"], reply["last_id"]) == (False, 7, ids[-1])
    await publish("fe.t", "live")
    assert (await client.recv_type("event"))["data"] == "live"


async def test_pattern_subscription_resumes_across_matching_topics(ws_connect, publish):
    client = await ws_connect()
    await client.subscribe("shop.*")
    await publish("shop.a", "start")
    last = (await client.recv_type("event"))["id"]
    await client.socket.close()
    for topic, data in [("shop.b", 1), ("other", 2), ("shop.a", 3), ("shop.c.d", 4)]:
        await publish(topic, data)
    resumed = await ws_connect()
    await resumed.send({"type": "subscribe", "topic": "shop.*", "since": last})
    assert [(await resumed.recv_type("event"))["data"] for _ in range(2)] == [1, 3]
    assert (await resumed.recv_type("subscribed"))["recovered"] is True


async def test_history_endpoint(http_client, base_url, publish):
    ids = [json.loads((await publish("hist.a", n)).body)["id"] for n in range(5)]
    await publish("hist.b", "other")

    async def get(path):
        response = await http_client.fetch(base_url + path, raise_error=False)
        return response.code, json.loads(response.body)

    code, body = await get("/v1/topics/hist.a/events")
    assert code == 200 and body["recovered"] is True and body["topic"] == "hist.a"
    assert [event["id"] for event in body["events"]] == ids
    assert body["events"][0] == {"type": "event", "topic": "hist.a", "id": ids[0],
                                 "ts": body["events"][0]["ts"], "data": 0}
    code, body = await get(f"/v1/topics/hist.a/events?since={ids[1]}&limit=2")
    assert [event["data"] for event in body["events"]] == [2, 3]
    code, body = await get("/v1/topics/hist.a/events?since=garbage")
    assert (body["events"], body["recovered"]) == ([], False)
    code, body = await get("/v1/topics/hist.a/events?since=old-1")  # a forgotten epoch
    assert ([event["id"] for event in body["events"]], body["recovered"]) == (ids, False)
    code, body = await get("/v1/topics/nothing.here/events")
    assert (code, body["events"], body["recovered"]) == (200, [], True)


async def test_topic_list(http_client, base_url, publish, ws_connect):
    client = await ws_connect(query="topic=listed.live&topic=listed.*")
    await client.recv_type("subscribed")
    await client.recv_type("subscribed")
    last = json.loads((await publish("listed.kept", 1)).body)["id"]
    response = await http_client.fetch(base_url + "/v1/topics")
    topics = {entry["topic"]: entry for entry in json.loads(response.body)["topics"]}
    assert topics["listed.kept"] == {"topic": "listed.kept", "subscribers": 1, "last_id": last}
    assert topics["listed.live"] == {"topic": "listed.live", "subscribers": 1, "last_id": None}
    assert "listed.*" not in topics


async def test_the_topic_list_is_computed_once_for_many_callers(http_client, base_url,
                                                                publish, node):
    await publish("listed.once", 1)
    reads = []
    original = node.broker.retained_topics

    async def counted() -> list[str]:
        reads.append(1)
        return await original()

    node.broker.retained_topics = counted
    responses = await asyncio.gather(*(http_client.fetch(base_url + "/v1/topics")
                                       for _ in range(20)))
    assert len(reads) == 1
    assert all("listed.once" in response.body.decode() for response in responses)


@pytest.mark.parametrize("failing", ["subscribe", "history"])
async def test_a_subscribe_that_fails_delivers_nothing_of_its_name(ws_connect, publish, node,
                                                                  monkeypatch, failing):
    """Events of a name may arrive while its subscribe is under way (through the other
    names of the node); if the subscribe then fails, the client must get none of them:
    it would resume from such an event, past every one it never got."""
    held, release = asyncio.Event(), asyncio.Event()
    broker = node.broker
    original = getattr(broker, failing)

    async def fail_once(name, *args, **kwargs):
        if name != "fs.*" or release.is_set():
            return await original(name, *args, **kwargs)
        held.set()
        await release.wait()
        raise BrokerUnavailable("the broker did not answer (test)")

    monkeypatch.setattr(broker, failing, fail_once)
    other = await ws_connect()
    await other.subscribe("fs.a")
    first = json.loads((await publish("fs.a", "before")).body)["id"]
    client = await ws_connect()
    await client.subscribe("elsewhere")
    await client.send({"type": "subscribe", "topic": "fs.*", "since": first, "ref": "r"})
    await asyncio.wait_for(held.wait(), 5)
    await publish("fs.a", "during")
    await publish("elsewhere", "unrelated")
    assert [event["data"] for event in await other.events(2)] == ["before", "during"]
    release.set()
    frames = {frame["type"]: frame for frame in [await client.recv(), await client.recv()]}
    assert (frames["error"]["code"], frames["error"]["ref"]) == ("broker_unavailable", "r")
    assert frames["event"]["data"] == "unrelated"  # held back, then released
    await client.send({"type": "subscribe", "topic": "fs.*", "since": first})
    assert (await client.recv_type("event"))["data"] == "during"  # the retry misses nothing
    assert (await client.recv_type("subscribed"))["recovered"] is True
    await publish("fs.a", "after")
    assert (await client.recv_type("event"))["data"] == "after"
