"""Two real nodes on a real redis-server that is killed, restarted and frozen.

A publisher POSTs numbered events to node A at a steady rate, each with its own
Idempotency-Key, retrying 503s with the same key; four subscribers (an exact topic
and a pattern on each node) follow the protocol through every close. Each test
injects one fault and checks the promises of docs/protocol.md:

- Redis killed and restarted without persistence: every event accepted after Redis
  came back reaches every subscriber (live, or replayed after ``recovered: false``),
  and the loss of what Redis forgot is signalled (4009, then ``recovered: false``).
- Redis killed and restarted with ``appendfsync always``: nothing is lost at all, and
  no subscriber is told otherwise.
- Redis frozen for 3 s and for 9 s: no publish waits longer than the broker timeout,
  ``/readyz`` turns 503 within about a second and 200 again after, nothing is lost.

Each run's figures go to tests/artifacts/chaos.json (accepted, 503s, delivered,
lost, recovery times).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import Outcome, Publisher, Readiness, Resumer, epoch, received_all
from tests.redis_server import RedisServer, require_redis_server
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.redis, pytest.mark.gen_test(timeout=120)]

ARTIFACTS = Path(__file__).parent / "artifacts"
NAMES = (["chaos.a"], ["chaos.*"])
TOPICS = ["chaos.a", "chaos.b"]
SETTLE = 1.5  # seconds of publishing before the fault and after Redis is back

Fault = Callable[[RedisServer], Awaitable[tuple[float, float]]]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[bool], RedisServer]]:
    """A redis-server of the test's own (it gets killed), persistent or not."""
    made: list[RedisServer] = []

    def make(persistent: bool) -> RedisServer:
        server = RedisServer(require_redis_server(), str(tmp_path) if persistent else None)
        made.append(server.start())
        return server

    yield make
    for server in made:
        server.stop()


async def kill_and_restart(redis: RedisServer) -> tuple[float, float]:
    down = time.monotonic()
    redis.kill()
    await asyncio.sleep(2.0)
    redis.start()
    return down, time.monotonic()


def freeze_for(seconds: float) -> Fault:
    async def freeze(redis: RedisServer) -> tuple[float, float]:
        redis.freeze()
        frozen = time.monotonic()
        await asyncio.sleep(seconds)
        redis.thaw()
        return frozen, time.monotonic()

    return freeze


async def run(redis: RedisServer, fault: Fault, broker_timeout: float) -> dict[str, Any]:
    """Two nodes, four subscribers, a publisher, one fault; what happened."""
    flags = ["--broker", redis.url(), "--broker-timeout", str(broker_timeout),
             "--ping-interval", "0"]
    nodes = [ServerProcess(*flags, "--node-name", name) for name in ("node-a", "node-b")]
    for node in nodes:
        node.start()
    subscribers = [Resumer(f"ws://127.0.0.1:{node.port}/v1/ws", names)
                   for node in nodes for names in NAMES]
    readiness = Readiness([node.url for node in nodes])
    publisher = Publisher([nodes[0].url], TOPICS)
    try:
        for subscriber in subscribers:
            subscriber.start()
            await asyncio.wait_for(subscriber.connected.wait(), 10)
        readiness.start()
        publishing = asyncio.ensure_future(publisher.run())
        await asyncio.sleep(SETTLE)
        started, ended = await fault(redis)
        await asyncio.sleep(SETTLE)
        publisher.stop()
        await publishing
        for subscriber in subscribers:
            await received_all(subscriber, [event for event in publisher.accepted
                                            if event.at > ended], 20)
        await asyncio.sleep(0.5)  # anything more (duplicates, say) would arrive by now
    finally:
        await readiness.stop()
        for subscriber in subscribers:
            await subscriber.stop()
        logs = ["".join(node.log) for node in nodes]
        for node in nodes:
            node.stop()
    return {"publisher": publisher, "subscribers": subscribers, "readiness": readiness,
            "fault": (started, ended), "logs": logs}


def figures(name: str, outcome: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The run's figures, also written to tests/artifacts/chaos.json."""
    publisher: Publisher = outcome["publisher"]
    started, ended = outcome["fault"]
    readiness: Readiness = outcome["readiness"]
    unready = readiness.first(started, all_ready=False)
    ready = readiness.first(ended, all_ready=True)
    results = [Outcome.of(subscriber, publisher.accepted)
               for subscriber in outcome["subscribers"]]
    found = {
        "accepted": len(publisher.accepted), "answered_503": publisher.unavailable,
        "connection_errors": publisher.failed,
        "slowest_503_s": round(publisher.slowest_503, 3),
        "slowest_answer_s": round(publisher.slowest, 3),
        "delivered": sum(result.received for result in results),
        "expected": sum(result.expected for result in results),
        "lost_after_recovery": sum(1 for result in results for event in result.missing
                                   if event.at > ended),
        "lost_before_fault": sum(1 for result in results for event in result.missing
                                 if event.at <= ended),
        "duplicates": sum(subscriber.duplicates for subscriber in outcome["subscribers"]),
        "unready_after_s": None if unready is None else round(unready - started, 3),
        "ready_after_s": None if ready is None else round(ready - ended, 3),
        **extra,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "chaos.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[name] = found
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(name, found)
    return found


def no_tracebacks(outcome: dict[str, Any]) -> None:
    for log in outcome["logs"]:
        assert "Traceback" not in log, log


async def test_redis_killed_without_persistence_loses_only_what_it_forgot(own_redis):
    redis = own_redis(False)
    outcome = await run(redis, kill_and_restart, broker_timeout=1.0)
    found = figures("kill, no persistence", outcome)
    publisher: Publisher = outcome["publisher"]
    before = epoch(publisher.accepted[0].id)
    after = [event for event in publisher.accepted if epoch(event.id) != before]
    assert after, "nothing was accepted after Redis came back"
    for subscriber in outcome["subscribers"]:
        got = Outcome.of(subscriber, after)
        assert got.missing == [], f"{subscriber.names}: accepted after the restart, lost"
        lost = Outcome.of(subscriber, [e for e in publisher.accepted if epoch(e.id) == before])
        assert 4009 in subscriber.closes and subscriber.unrecovered, "the loss went unsaid"
        assert lost.missing == [] or subscriber.unrecovered
    assert found["lost_after_recovery"] == 0 and found["duplicates"] == 0
    assert found["ready_after_s"] is not None and found["ready_after_s"] < 1.0
    no_tracebacks(outcome)


async def test_redis_killed_with_appendfsync_always_loses_nothing(own_redis):
    redis = own_redis(True)
    outcome = await run(redis, kill_and_restart, broker_timeout=1.0)
    found = figures("kill, appendfsync always", outcome)
    for subscriber in outcome["subscribers"]:
        got = Outcome.of(subscriber, outcome["publisher"].accepted)
        assert got.missing == [], subscriber.names
        assert subscriber.unrecovered == [] and 4009 not in subscriber.closes
    assert found["duplicates"] == 0
    assert found["ready_after_s"] is not None and found["ready_after_s"] < 1.0
    no_tracebacks(outcome)


@pytest.mark.parametrize(("seconds", "timeout"), [(3, 1.0), (9, 3.0)])
async def test_a_frozen_redis_delays_no_publish_past_the_timeout(own_redis, seconds, timeout):
    redis = own_redis(False)
    outcome = await run(redis, freeze_for(seconds), broker_timeout=timeout)
    found = figures(f"{seconds} s stall, broker_timeout {timeout:g} s", outcome)
    for subscriber in outcome["subscribers"]:
        got = Outcome.of(subscriber, outcome["publisher"].accepted)
        assert got.missing == [], subscriber.names
        assert subscriber.unrecovered == [] and 4009 not in subscriber.closes
    assert found["answered_503"] > 0
    assert found["slowest_answer_s"] < timeout + 0.25
    assert found["unready_after_s"] is not None and found["unready_after_s"] < 1.5
    assert found["ready_after_s"] is not None and found["duplicates"] == 0
    no_tracebacks(outcome)
