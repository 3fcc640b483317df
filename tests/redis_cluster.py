"""Fixtures for tests on a real Redis Cluster (tests/cluster_nodes.py).

``redis_cluster`` is one cluster of 3 masters with a replica each, shared by the test
session (tests must not break it); ``cluster_url`` is its ``redis+cluster://`` URL,
every master flushed. ``local_cluster(...)`` makes one of a test's own. Without
redis-server and redis-cli the tests that need them are skipped, except under CI,
where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster_nodes import LocalCluster, find_cluster_tools


def local_cluster(**options: Any) -> LocalCluster:
    """A cluster (not started), or skip (fail under CI) saying what is missing."""
    tools = find_cluster_tools()
    if tools is None:
        reason = ("NO REDIS CLUSTER TOOLS: cluster tests need redis-server and redis-cli "
                  "on PATH (apt-get install redis-server redis-tools)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return LocalCluster(*tools, **options)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    cluster = local_cluster(masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The session cluster's URL, every master flushed."""
    redis_cluster.flush()
    return redis_cluster.url()
