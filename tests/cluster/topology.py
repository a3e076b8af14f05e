"""Changing a local Redis Cluster's topology from a test, without blocking its event loop:
a slot migration in steps (to be caught mid-way) and a manual failover.

Each function talks to the nodes with plain (non-cluster) redis-py clients and asks the
cluster who is master now, never the start order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from devtools.localservices import LocalRedisCluster, wait_for_redis_cluster


@dataclass(frozen=True)
class Node:
    """One node as ``CLUSTER NODES`` lists it."""

    port: int
    node_id: str
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return self.master_id is None


def node_client(port: int) -> aioredis.Redis:
    """A plain client of one node (``decode_responses``)."""
    return aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)


async def nodes(cluster: LocalRedisCluster) -> list[Node]:
    """Every node, as the first node that answers sees the cluster."""
    for port in cluster.ports:
        client = node_client(port)
        try:
            listing = await client.cluster("NODES")
        except (OSError, RedisError):
            continue
        finally:
            await client.aclose()
        return [
            Node(
                port=int(address.rpartition(":")[2]),
                node_id=info["node_id"],
                master_id=None if "master" in info["flags"] else info["master_id"],
                slots=tuple((int(r[0]), int(r[-1])) for r in info["slots"]),
            )
            for address, info in listing.items()
            if "fail" not in info["flags"]
        ]
    raise AssertionError("no cluster node answered")


async def owner(cluster: LocalRedisCluster, slot: int) -> Node:
    """The master that owns ``slot``."""
    for node in await nodes(cluster):
        if node.is_master and any(first <= slot <= last for first, last in node.slots):
            return node
    raise AssertionError(f"no master owns slot {slot}")


async def other_master(cluster: LocalRedisCluster, than: Node) -> Node:
    """A master that is not ``than``."""
    return next(n for n in await nodes(cluster) if n.is_master and n.port != than.port)


async def key_slot(cluster: LocalRedisCluster, key: str) -> int:
    client = node_client(cluster.ports[0])
    try:
        return int(await client.cluster("KEYSLOT", key))
    finally:
        await client.aclose()


async def begin_migration(source: Node, target: Node, slot: int) -> None:
    """``CLUSTER SETSLOT`` IMPORTING on the target, then MIGRATING on the source: from now
    on the source answers ASK for keys it no longer has."""
    for port, state, peer in (
        (target.port, "IMPORTING", source),
        (source.port, "MIGRATING", target),
    ):
        client = node_client(port)
        try:
            await client.execute_command("CLUSTER", "SETSLOT", slot, state, peer.node_id)
        finally:
            await client.aclose()


async def move_keys(source: Node, target: Node, slot: int, keys: list[str] | None = None) -> int:
    """``MIGRATE`` ``keys`` (None: every key of the slot still on the source) to the target;
    returns how many moved."""
    client = node_client(source.port)
    try:
        moved = 0
        while True:
            batch = (
                keys
                if keys is not None
                else await client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            )
            if not batch:
                return moved
            await client.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *batch
            )
            moved += len(batch)
            if keys is not None:
                return moved
    finally:
        await client.aclose()


async def finish_migration(cluster: LocalRedisCluster, target: Node, slot: int) -> None:
    """``CLUSTER SETSLOT slot NODE target`` on the target, then every other master: the slot
    is the target's, and the source answers MOVED."""
    masters = [n for n in await nodes(cluster) if n.is_master]
    ordered = [target, *(n for n in masters if n.port != target.port)]
    for node in ordered:
        client = node_client(node.port)
        try:
            await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        finally:
            await client.aclose()
    await asyncio.to_thread(wait_for_redis_cluster, cluster)  # replicas learn it by gossip


async def migrate_slot(cluster: LocalRedisCluster, slot: int, target: Node | None = None) -> Node:
    """Move ``slot`` with its keys to ``target`` (None: another master); returns the target."""
    source = await owner(cluster, slot)
    target = target or await other_master(cluster, source)
    await begin_migration(source, target, slot)
    await move_keys(source, target, slot)
    await finish_migration(cluster, target, slot)
    return target


async def fail_over(cluster: LocalRedisCluster, master: Node) -> Node:
    """``CLUSTER FAILOVER`` on a replica of ``master`` (the replica waits until it has every
    write of the master, then takes over); returns the promoted node once the cluster is
    stable again."""
    replica = next(n for n in await nodes(cluster) if n.master_id == master.node_id)
    client = node_client(replica.port)
    try:
        await client.execute_command("CLUSTER", "FAILOVER")
        for _ in range(400):
            if (await client.info("replication"))["role"] == "master":
                break
            await asyncio.sleep(0.025)
        else:
            raise AssertionError(f"replica {replica.port} was not promoted")
    finally:
        await client.aclose()
    await asyncio.to_thread(wait_for_redis_cluster, cluster)
    return replica


async def flush_all(cluster: LocalRedisCluster) -> None:
    """FLUSHALL on every master (a replica follows its master)."""
    for node in await nodes(cluster):
        if node.is_master:
            client = node_client(node.port)
            try:
                await client.flushall()
            finally:
                await client.aclose()


async def wait_replicated(replica: Node, key: str, timeout_s: float = 5.0) -> None:
    """Wait until ``replica`` has ``key`` (read with READONLY)."""
    client = node_client(replica.port)
    try:
        await client.execute_command("READONLY")
        for _ in range(int(timeout_s / 0.02)):
            if await client.exists(key):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{key} did not reach replica {replica.port}")
    finally:
        await client.aclose()
