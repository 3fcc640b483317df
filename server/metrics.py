"""Prometheus metrics of one node, in its own registry (no global state).

Counts that move on the fan-out path (events delivered, frames dropped) are plain
integers kept by the hub and read at scrape time by a collector, so delivering an
event costs no lock and no call. Latencies are histograms observed once per publish
and once per fan-out, never per subscriber; they are ``Timing``s, plain bucket counts
(the IOLoop is one thread: no lock is needed), exported at scrape time. HTTP requests
are counted by status the same way. No metric has a per-topic label.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.node import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0)


class Timing:
    """A latency histogram for one thread: ``observe`` is a bisect and two additions."""

    def __init__(self, name: str, documentation: str,
                 buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def family(self) -> HistogramMetricFamily:
        cumulative = list(itertools.accumulate(self.counts))
        buckets = [(repr(bound), count) for bound, count in zip(self.bounds, cumulative,
                                                                 strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                     sum_value=self.total)


class Metrics:
    """The node's registry and the instruments handlers observe directly."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.publish_seconds = Timing(
            "squall_publish_duration_seconds", "Time to publish through the broker, per request")
        self.fanout_seconds = Timing(
            "squall_fanout_duration_seconds", "Time to queue a run of events (consecutive "
            "events of one topic, one loop pass) for every local subscriber")
        self.http_requests: collections.Counter[int] = collections.Counter()  # by status

    def watch(self, node: Node) -> None:
        """Export the node's own counters and gauges at every scrape."""
        self.registry.register(_NodeCollector(node))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        metrics = self._node.metrics
        yield metrics.publish_seconds.family()
        yield metrics.fanout_seconds.family()
        requests = CounterMetricFamily("squall_http_requests", "HTTP requests answered, by "
                                       "status code", labels=["status"])
        for status, count in sorted(metrics.http_requests.items()):
            requests.add_metric([str(status)], count)
        yield requests
        hub = self._node.hub
        broker = self._node.broker
        connections = list(hub.connections)
        yield _counter("squall_events_published", "Events published by this node",
                       hub.published)
        yield _counter("squall_events_delivered", "Events enqueued for subscribers",
                       hub.delivered)
        yield _counter("squall_events_dropped", "Events a subscriber lost because its queue "
                       "overflowed and it was closed", hub.dropped)
        yield _counter("squall_slow_consumer_closes", "Connections closed as slow consumers",
                       hub.slow_closes)
        yield _counter("squall_broker_reconnects", "Times the broker connection was "
                       "re-established", broker.reconnects)
        yield _gauge("squall_connections", "Open WebSocket connections", len(connections))
        yield _gauge("squall_subscriptions", "Subscriptions held by open connections",
                     sum(len(c.subscriptions) for c in connections))
        yield _gauge("squall_topics", "Topics and patterns with local subscribers",
                     sum(1 for _ in hub.router.names()))
        yield _gauge("squall_queued_bytes", "Bytes waiting in connection send queues",
                     sum(c.queued_bytes for c in connections))
        yield _gauge("squall_broker_up", "1 when the broker is reachable", int(broker.ready))
        yield _gauge("squall_ready", "1 when the node is ready to serve", int(self._node.ready))
        for extra in self._node.metric_sources:
            yield from extra()


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


MetricSource = Callable[[], Iterator[Metric]]
