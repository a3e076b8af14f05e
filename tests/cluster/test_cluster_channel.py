"""The hot path's cluster channel against a real Redis Cluster: routing by slot, MOVED after a
slot migration, ASK and TRYAGAIN during one, a promoted replica, scripts on every node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.exceptions

from billing.metering.cluster_channel import ClusterChannel, command_slot, parse_redirect
from devtools.localservices import LocalRedisCluster, wait_for_redis_cluster
from tests.cluster import topology

_SET_BOTH = (
    "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return ARGV[1]"
)


@pytest.fixture
async def channel(cluster_url: str) -> AsyncIterator[ClusterChannel]:
    ch = ClusterChannel(cluster_url, timeout_s=2.0)
    try:
        yield ch
    finally:
        await ch.close()


def test_command_slot_uses_the_first_key():
    key = "cg:v2:{s07}:acct:7:account"
    slot = command_slot(("GET", key))
    assert slot == command_slot(("EVALSHA", "abc", 2, key, "cg:v2:{s07}:x", "arg"))
    assert slot == command_slot(("XREADGROUP", "GROUP", "g", "c", "STREAMS", key, ">"))
    assert slot == command_slot((b"XADD", key.encode(), "*", "f", "v"))
    assert slot != command_slot(("GET", "cg:v2:{s08}:acct:8:account"))
    assert command_slot(("EVAL", "return 1", 0)) == 0


def test_parse_redirect_reads_moved_ask_and_retries():
    asked = ("127.0.0.1", 7000)
    moved = parse_redirect("MOVED 3999 127.0.0.1:7001", asked)
    assert moved is not None and (moved.kind, moved.slot, moved.address) == (
        "MOVED",
        3999,
        ("127.0.0.1", 7001),
    )
    ask = parse_redirect("ASK 12 :7002", asked)
    assert ask is not None and ask.address == ("127.0.0.1", 7002)
    retry = parse_redirect("TRYAGAIN Multiple keys request during rehashing of slot", asked)
    assert retry is not None and retry.kind == "TRYAGAIN" and retry.address is None
    assert parse_redirect("ERR wrong number of arguments", asked) is None


async def test_commands_go_to_the_master_of_their_slot(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    keys = [f"cg:test:{{s{i:02d}}}:k" for i in range(64)]
    # Concurrent commands to every master, pipelined per node.
    await asyncio.gather(*(channel.execute("SET", key, key) for key in keys))
    assert await asyncio.gather(*(channel.execute("GET", key) for key in keys)) == keys
    masters_used = set()
    for key in keys:
        node = await topology.owner(redis_cluster, await topology.key_slot(redis_cluster, key))
        client = topology.node_client(node.port)
        try:
            assert await client.get(key) == key  # stored on the slot's master, not elsewhere
        finally:
            await client.aclose()
        masters_used.add(node.port)
    assert len(masters_used) == 3


async def test_submit_before_connecting_is_none_then_bare_future(channel: ClusterChannel):
    assert channel.submit("GET", "cg:test:{a}:k") is None  # no slot map yet
    await channel.execute("SET", "cg:test:{a}:k", "v")
    reply = channel.submit("GET", "cg:test:{a}:k")
    assert reply is not None
    assert await reply == "v"


async def test_moved_after_a_slot_migration_is_followed(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    key = "cg:test:{moved}:k"
    await channel.execute("SET", key, "before")
    slot = await topology.key_slot(redis_cluster, key)
    source = await topology.owner(redis_cluster, slot)
    assert channel.owner_of(slot) == ("127.0.0.1", source.port)

    target = await topology.migrate_slot(redis_cluster, slot)

    # The channel's map still names the source, which answers MOVED.
    assert await channel.execute("GET", key) == "before"
    assert channel.owner_of(slot) == ("127.0.0.1", target.port)
    sent = channel.send("SET", key, "after")
    assert sent is not None
    assert await sent[0] == "OK"
    assert await sent[1] is True
    client = topology.node_client(target.port)
    try:
        assert await client.get(key) == "after"
    finally:
        await client.aclose()


async def test_ask_during_a_slot_migration_is_followed(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    stays, moves = "cg:test:{ask}:stays", "cg:test:{ask}:moves"
    await channel.execute("SET", stays, "s")
    await channel.execute("SET", moves, "m")
    slot = await topology.key_slot(redis_cluster, stays)
    source = await topology.owner(redis_cluster, slot)
    target = await topology.other_master(redis_cluster, source)
    await topology.begin_migration(source, target, slot)
    try:
        assert await topology.move_keys(source, target, slot, [moves]) == 1
        # The source still owns the slot: a key it has is served there, a key it has not
        # is answered with ASK and read from the target after ASKING.
        assert await channel.execute("GET", stays) == "s"
        assert await channel.execute("GET", moves) == "m"
        new_key = "cg:test:{ask}:new"
        assert await channel.execute("SET", new_key, "n") == "OK"
        assert channel.owner_of(slot) == ("127.0.0.1", source.port)  # ASK changes no map
    finally:
        await topology.move_keys(source, target, slot)
        await topology.finish_migration(redis_cluster, target, slot)
    client = topology.node_client(target.port)
    try:
        assert await client.get(new_key) == "n"  # written on the target (by ASK)
    finally:
        await client.aclose()


async def test_tryagain_during_a_slot_migration_is_retried_until_it_ends(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    first, second = "cg:test:{again}:a", "cg:test:{again}:b"
    await channel.execute("SET", first, "0")
    await channel.execute("SET", second, "0")
    slot = await topology.key_slot(redis_cluster, first)
    source = await topology.owner(redis_cluster, slot)
    target = await topology.other_master(redis_cluster, source)
    await topology.begin_migration(source, target, slot)
    await topology.move_keys(source, target, slot, [second])
    # One key on each node: the script cannot run anywhere until the migration ends.
    script = channel.execute("EVAL", _SET_BOTH, 2, first, second, "done")
    running = asyncio.ensure_future(script)
    await asyncio.sleep(0.1)
    assert not running.done()
    await topology.move_keys(source, target, slot)
    await topology.finish_migration(redis_cluster, target, slot)
    assert await asyncio.wait_for(running, 5) == "done"
    assert await channel.execute("GET", first) == "done"


async def test_a_promoted_replica_is_reached_after_a_failover(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    key = "cg:test:{failover}:k"
    await channel.execute("SET", key, "v")
    slot = await topology.key_slot(redis_cluster, key)
    master = await topology.owner(redis_cluster, slot)

    promoted = await topology.fail_over(redis_cluster, master)

    assert await channel.execute("INCR", "cg:test:{failover}:n") == 1
    assert await channel.execute("GET", key) == "v"
    assert channel.owner_of(slot) == ("127.0.0.1", promoted.port)


async def test_a_killed_connection_fails_in_flight_then_the_next_command_works(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    key = "cg:test:{kill}:k"
    await channel.execute("SET", key, "v")
    node = await topology.owner(redis_cluster, await topology.key_slot(redis_cluster, key))
    blocked = asyncio.ensure_future(channel.execute("BLPOP", "cg:test:{kill}:empty", 5))
    await asyncio.sleep(0.05)
    client = topology.node_client(node.port)
    try:
        await client.client_kill_filter(_type="normal", skipme=True)
    finally:
        await client.aclose()
    with pytest.raises(redis.exceptions.ConnectionError):
        await blocked  # never re-sent: it may have run
    assert await channel.execute("GET", key) == "v"


async def test_preloaded_scripts_run_by_sha_on_every_master(channel: ClusterChannel):
    script = "return KEYS[1] .. ARGV[1]"
    channel.preload(script)
    sha = await channel.execute("SCRIPT", "LOAD", script)  # one node only
    keys = [f"cg:test:{{s{i:02d}}}:k" for i in range(64)]
    replies = await asyncio.gather(*(channel.execute("EVALSHA", sha, 1, k, "!") for k in keys))
    assert replies == [f"{k}!" for k in keys]


async def test_evalsha_after_script_flush_loads_the_script_where_needed(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    script = "return ARGV[1] .. '?'"
    keys = [f"cg:test:{{s{i:02d}}}:k" for i in range(64)]
    sha = await channel.execute("SCRIPT", "LOAD", script)
    for node in await topology.nodes(redis_cluster):
        client = topology.node_client(node.port)
        try:
            await client.script_flush()
        finally:
            await client.aclose()
    replies = await asyncio.gather(*(channel.evalsha(sha, script, [k], ["x"]) for k in keys))
    assert replies == ["x?"] * len(keys)


async def test_wait_idle_waits_for_redirected_commands(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    key = "cg:test:{idle}:k"
    await channel.execute("SET", key, "v")
    slot = await topology.key_slot(redis_cluster, key)
    await topology.migrate_slot(redis_cluster, slot)
    reply = channel.submit("GET", key)  # to the old owner: MOVED, then the new one
    assert reply is not None
    await channel.wait_idle()
    assert reply.done() and reply.result() == "v"


async def test_a_dead_master_s_slots_are_reached_on_its_promoted_replica(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    key = "cg:test:{dead}:k"
    await channel.execute("SET", key, "v")
    slot = await topology.key_slot(redis_cluster, key)
    master = await topology.owner(redis_cluster, slot)
    replica = next(n for n in await topology.nodes(redis_cluster) if n.master_id == master.node_id)
    await topology.wait_replicated(replica, key)
    server = next(node for node in redis_cluster.nodes if node.port == master.port)

    await asyncio.to_thread(server.stop)
    errors = 0
    try:
        for _ in range(300):  # the replica takes over after cluster-node-timeout (2 s)
            try:
                value = await channel.execute("GET", key)
                break
            except redis.exceptions.ConnectionError:
                errors += 1  # the map points at the dead master until the election
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the promoted replica was never reached")
        assert value == "v"
        assert errors > 0
        assert channel.owner_of(slot) == ("127.0.0.1", replica.port)
    finally:
        await asyncio.to_thread(redis_cluster.restart, master.port)
        await asyncio.to_thread(wait_for_redis_cluster, redis_cluster)


async def test_a_command_redirected_too_often_fails_with_the_last_reply(
    channel: ClusterChannel, redis_cluster: LocalRedisCluster
):
    first, second = "cg:test:{bounded}:a", "cg:test:{bounded}:b"
    await channel.execute("SET", first, "0")
    await channel.execute("SET", second, "0")
    slot = await topology.key_slot(redis_cluster, first)
    source = await topology.owner(redis_cluster, slot)
    target = await topology.other_master(redis_cluster, source)
    await topology.begin_migration(source, target, slot)
    try:
        await topology.move_keys(source, target, slot, [second])
        reply = channel.submit("EVAL", _SET_BOTH, 2, first, second, "x")
        assert reply is not None
        await channel.wait_idle()  # waits out the TRYAGAIN retries, then their failure
        assert reply.done()
        with pytest.raises(redis.exceptions.ResponseError, match="TRYAGAIN"):
            reply.result()
    finally:
        await topology.move_keys(source, target, slot)
        await topology.finish_migration(redis_cluster, target, slot)
    assert await channel.execute("GET", first) == "0"  # the script never ran
