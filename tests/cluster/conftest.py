"""A local Redis Cluster for the tests in this directory: three masters with one replica
each on loopback (``devtools.localservices.start_redis_cluster``), one per session.

- ``redis_cluster``: the session's cluster. Tests change its topology (failovers, slot
  migrations), so they ask it who owns what (``tests.cluster.topology``).
- ``cluster_url``: a node's URL, every master emptied (FLUSHALL) before the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from devtools.localservices import LocalRedisCluster, start_redis_cluster
from tests.cluster import topology


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """The session's Redis Cluster."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """A node of the session's cluster, emptied."""
    # Its own event loop in a thread: pytest-asyncio's loop may be running already.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, topology.flush_all(redis_cluster)).result()
    return redis_cluster.url
