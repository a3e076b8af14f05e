"""``REDIS_CLUSTER``: the setting, the clients ``runtime.resources`` opens with it, and the
start-up eviction check on every node."""

from __future__ import annotations

import pytest

from billing.metering.cluster_channel import ClusterChannel
from billing.metering.script_channel import ScriptChannel
from devtools.localservices import LocalRedisCluster
from runtime.resources import (
    RedisEvictionPolicyError,
    check_eviction_policy,
    open_redis,
    open_script_channel,
)
from runtime.settings import ConfigError, Settings, StoreSettings
from tests.cluster import topology

REQUIRED = {
    "DATABASE_URL": "postgresql://cg@127.0.0.1:5432/cg",
    "REDIS_URL": "redis://10.0.0.5:7000",
    "UPSTREAM_API_KEY": "sk-upstream",
}


def test_redis_cluster_defaults_to_false_and_is_read():
    assert Settings.from_env(REQUIRED).redis_cluster is False
    assert Settings.from_env({**REQUIRED, "REDIS_CLUSTER": "true"}).redis_cluster is True
    store = StoreSettings.from_env({**REQUIRED, "REDIS_CLUSTER": "1"})
    assert store.redis_cluster is True


@pytest.mark.parametrize(
    "url", ["unix:///run/redis.sock", "redis://10.0.0.5:7000/3", "rediss://h:7000/1"]
)
def test_redis_cluster_with_a_url_no_cluster_node_has_is_a_problem(url: str):
    env = {**REQUIRED, "REDIS_URL": url, "REDIS_CLUSTER": "true"}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert [p for p in info.value.problems if "REDIS_CLUSTER" in p]
    with pytest.raises(ConfigError):
        StoreSettings.from_env(env)


def test_open_script_channel_is_a_cluster_channel_with_redis_cluster():
    settings = Settings.from_env({**REQUIRED, "REDIS_CLUSTER": "true"})
    assert isinstance(open_script_channel(settings, name="t"), ClusterChannel)
    single = Settings.from_env(REQUIRED)
    assert type(open_script_channel(single, name="t")) is ScriptChannel
    tls = Settings.from_env({**REQUIRED, "REDIS_URL": "rediss://h:7000"})
    assert open_script_channel(tls, name="t") is None


async def test_open_redis_cluster_client_runs_scripts_on_every_master(
    cluster_url: str, redis_cluster: LocalRedisCluster
):
    client = open_redis(cluster_url, cluster=True, socket_timeout_s=5, connect_timeout_s=5)
    try:
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        keys = [f"cg:test:{{s{i:02d}}}:n" for i in range(64)]
        for key in keys:
            assert await script([key]) == 1
        masters = {
            (await topology.owner(redis_cluster, await topology.key_slot(redis_cluster, k))).port
            for k in keys
        }
        assert len(masters) == 3
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            assert await pipe.execute() == ["1"] * len(keys)
    finally:
        await client.aclose()


async def test_eviction_policy_of_any_node_refuses_a_cluster(
    cluster_url: str, redis_cluster: LocalRedisCluster
):
    client = open_redis(cluster_url, cluster=True)
    await check_eviction_policy(client)  # every node: noeviction
    masters = [node for node in await topology.nodes(redis_cluster) if node.is_master]
    last = topology.node_client(masters[-1].port)
    try:
        await last.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(RedisEvictionPolicyError):
            await check_eviction_policy(client)
    finally:
        await last.config_set("maxmemory-policy", "noeviction")
        await last.aclose()
        await client.aclose()
