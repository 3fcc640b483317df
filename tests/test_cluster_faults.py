"""Two real nodes on a real Redis Cluster (3 masters, 2 replicas each) through faults.

The same publisher and protocol-following subscribers as tests/test_redis_faults.py
(tests/chaos.py): events POSTed to node A at a steady rate, each with its own
Idempotency-Key, 503s retried with the same key; an exact topic and a pattern
subscribed on each node, resumed with ``since`` after every close. Each test injects
one fault into the shard that holds the topics:

- master killed: publishes to its slots get 503 until a replica takes over, then 202
  again, with no operator action. With ``--redis-wait-replicas 1`` no accepted event
  is lost; without it, what the replica had not received when its master died is
  (``lost_by_redis``: accepted events that are no longer in the history after the
  failover, measured).
- replica promoted (``CLUSTER FAILOVER``): nothing lost, nobody told otherwise.
- slot moved (``redis-cli --cluster reshard`` while publishing): MOVED and ASK are
  followed, nothing lost, nothing duplicated, nobody told otherwise.
- whole cluster restarted without persistence: every event accepted after it came
  back reaches every subscriber, and the loss of what it forgot is signalled (4009,
  then ``recovered: false``).

Each run's figures go to tests/artifacts/chaos.json.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from server.broker.base import BrokerOptions
from server.broker.redis_cluster import RedisClusterBroker
from server.history import Retention
from tests.chaos import Outcome, Publisher, epoch, figures, lost, no_tracebacks, two_nodes
from tests.cluster_nodes import LocalCluster
from tests.redis_cluster import local_cluster
from tests.test_broker_contract import Received
from tests.waiting import eventually

pytestmark = [pytest.mark.redis, pytest.mark.cluster, pytest.mark.gen_test(timeout=180)]

BROKER_TIMEOUT = 1.0
FAILOVER = 30.0  # seconds a replica may take to be promoted, at most
FLAGS = ("--history-size", "1000")  # every event of a run stays in the history


@pytest.fixture
def own_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """A cluster of the test's own (it gets broken)."""
    made: list[LocalCluster] = []

    def make(persistent: bool = False) -> LocalCluster:
        cluster = local_cluster(masters=3, replicas=2, persistent=persistent)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()


def names_for(segment: str) -> dict[str, Any]:
    return {"topics": [f"{segment}.a", f"{segment}.b"],
            "names": ([f"{segment}.a"], [f"{segment}.*"])}


async def lost_by_redis(cluster: LocalCluster, publisher: Publisher, pattern: str) -> int:
    """Accepted events that the cluster's history no longer has."""
    broker = RedisClusterBroker(cluster.url(), BrokerOptions(
        retention=Retention(size=1000), timeout=5.0))
    await broker.start(Received())
    try:
        kept = {event.id for event in (await broker.history(pattern, None)).events}
    finally:
        await broker.close()
    return sum(1 for event in publisher.accepted if event.id not in kept)


async def promoted(cluster: LocalCluster, slot: int, old: Any) -> float:
    """Wait until a node other than ``old`` serves ``slot``; when it did."""
    async def other_master() -> bool:
        try:
            return await asyncio.to_thread(cluster.master_of_slot, slot) != old
        except (LookupError, RuntimeError):
            return False
    await eventually(other_master, timeout=FAILOVER, what="another master for the slot")
    return time.monotonic()


def kill_master(cluster: LocalCluster, slot: int) -> Callable[[], Any]:
    async def fault() -> tuple[float, float]:
        master = await asyncio.to_thread(cluster.master_of_slot, slot)
        started = time.monotonic()
        cluster.kill(master)
        return started, await promoted(cluster, slot, master)
    return fault


def promote_replica(cluster: LocalCluster, slot: int) -> Callable[[], Any]:
    async def fault() -> tuple[float, float]:
        master = await asyncio.to_thread(cluster.master_of_slot, slot)
        [replica, *_] = await asyncio.to_thread(cluster.replicas_of, master)
        started = time.monotonic()
        await asyncio.to_thread(cluster.promote, replica)
        return started, await promoted(cluster, slot, master)
    return fault


def reshard(cluster: LocalCluster, source: Any, target: Any, slots: int) -> Callable[[], Any]:
    async def fault() -> tuple[float, float]:
        started = time.monotonic()
        process = cluster.reshard(source, target, slots)
        assert await asyncio.to_thread(process.wait, 120) == 0
        return started, time.monotonic()
    return fault


def restart_all(cluster: LocalCluster) -> Callable[[], Any]:
    async def fault() -> tuple[float, float]:
        started = time.monotonic()
        await asyncio.to_thread(cluster.restart_all)
        return started, time.monotonic()
    return fault


def everything_arrived(outcome: dict[str, Any]) -> None:
    for subscriber in outcome["subscribers"]:
        got = Outcome.of(subscriber, outcome["publisher"].accepted)
        assert got.missing == [], lost(subscriber, got.missing, outcome)


@pytest.mark.parametrize("wait_replicas", [1, 0])
async def test_master_killed(own_cluster, wait_replicas):
    cluster = own_cluster()
    slot = key_slot(b"chaos")
    outcome = await two_nodes(cluster.url(), kill_master(cluster, slot), BROKER_TIMEOUT,
                              *FLAGS, "--redis-wait-replicas", str(wait_replicas))
    lost = await lost_by_redis(cluster, outcome["publisher"], "chaos.*")
    found = figures(f"cluster: master killed, redis_wait_replicas {wait_replicas}", outcome,
                    lost_by_redis=lost, failover_s=round(outcome["fault"][1]
                                                         - outcome["fault"][0], 3))
    assert found["answered_503"] > 0 and found["lost_after_recovery"] == 0
    assert found["ready_after_s"] is not None and found["ready_after_s"] < 3.0
    assert found["duplicates"] == 0
    if wait_replicas:
        assert lost == 0, "an event answered 202 was lost with its master"
        everything_arrived(outcome)
    no_tracebacks(outcome)


async def test_replica_promoted(own_cluster):
    cluster = own_cluster()
    slot = key_slot(b"chaos")
    outcome = await two_nodes(cluster.url(), promote_replica(cluster, slot), BROKER_TIMEOUT,
                              *FLAGS)
    lost = await lost_by_redis(cluster, outcome["publisher"], "chaos.*")
    found = figures("cluster: replica promoted", outcome, lost_by_redis=lost)
    assert lost == 0 and found["duplicates"] == 0
    everything_arrived(outcome)
    no_tracebacks(outcome)


async def test_slot_moved(own_cluster):
    cluster = own_cluster()
    source = cluster.masters()[0]
    first = min(int(part.split("-")[0]) for row in cluster.view()
                if row["address"] == source.address for part in row["slots"].split())
    segment = next(f"moved{n}" for n in range(100_000)
                   if first <= key_slot(f"moved{n}".encode()) < first + 50)
    target = next(node for node in cluster.masters() if node != source)
    outcome = await two_nodes(cluster.url(), reshard(cluster, source, target, 100),
                              BROKER_TIMEOUT, *FLAGS, **names_for(segment))
    assert cluster.master_of_slot(key_slot(segment.encode())) == target
    lost = await lost_by_redis(cluster, outcome["publisher"], f"{segment}.*")
    found = figures("cluster: slot moved", outcome, lost_by_redis=lost)
    assert lost == 0 and found["duplicates"] == 0
    everything_arrived(outcome)
    for subscriber in outcome["subscribers"]:
        assert subscriber.unrecovered == [] and 4009 not in subscriber.closes
    no_tracebacks(outcome)


async def test_whole_cluster_restarted(own_cluster):
    cluster = own_cluster()
    outcome = await two_nodes(cluster.url(), restart_all(cluster), BROKER_TIMEOUT, *FLAGS)
    found = figures("cluster: whole cluster restarted, no persistence", outcome)
    publisher: Publisher = outcome["publisher"]
    before = epoch(publisher.accepted[0].id)
    after = [event for event in publisher.accepted if epoch(event.id) != before]
    assert after, "nothing was accepted after the cluster came back"
    for subscriber in outcome["subscribers"]:
        missing = Outcome.of(subscriber, after).missing
        assert missing == [], lost(subscriber, missing, outcome)
        assert 4009 in subscriber.closes and subscriber.unrecovered, "the loss went unsaid"
    assert found["lost_after_recovery"] == 0 and found["duplicates"] == 0
    no_tracebacks(outcome)
