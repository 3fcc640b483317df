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
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import Outcome, Publisher, epoch, figures, lost, no_tracebacks, two_nodes
from tests.redis_server import RedisServer, require_redis_server

pytestmark = [pytest.mark.redis, pytest.mark.gen_test(timeout=120)]

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
    """Two nodes on ``redis``, four subscribers, a publisher, one fault."""
    return await two_nodes(redis.url(), lambda: fault(redis), broker_timeout)


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
        assert got.missing == [], lost(subscriber, got.missing, outcome)
        assert 4009 in subscriber.closes and subscriber.unrecovered, "the loss went unsaid"
    assert found["lost_after_recovery"] == 0 and found["duplicates"] == 0
    assert found["ready_after_s"] is not None and found["ready_after_s"] < 1.0
    no_tracebacks(outcome)


async def test_redis_killed_with_appendfsync_always_loses_nothing(own_redis):
    redis = own_redis(True)
    outcome = await run(redis, kill_and_restart, broker_timeout=1.0)
    found = figures("kill, appendfsync always", outcome)
    for subscriber in outcome["subscribers"]:
        got = Outcome.of(subscriber, outcome["publisher"].accepted)
        assert got.missing == [], lost(subscriber, got.missing, outcome)
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
        assert got.missing == [], lost(subscriber, got.missing, outcome)
        assert subscriber.unrecovered == [] and 4009 not in subscriber.closes
    assert found["answered_503"] > 0
    assert found["slowest_answer_s"] < timeout + 0.25
    assert found["unready_after_s"] is not None and found["unready_after_s"] < 1.5
    assert found["ready_after_s"] is not None and found["duplicates"] == 0
    no_tracebacks(outcome)
