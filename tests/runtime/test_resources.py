"""``runtime.resources``: the Redis a service opens must not evict keys."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web

from devtools.localservices import free_port
from runtime import appkeys
from runtime.resources import RedisEvictionPolicyError, check_eviction_policy, redis_ctx
from tests.harness import gateway_settings


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        # The session's Redis is shared by every test: put the policy back whatever happened.
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


async def test_fixture_redis_runs_noeviction_and_passes(redis_client: aioredis.Redis) -> None:
    assert (await redis_client.config_get("maxmemory-policy"))["maxmemory-policy"] == "noeviction"
    await check_eviction_policy(redis_client)


async def test_redis_ctx_refuses_to_start_on_an_evicting_redis(
    redis_client: aioredis.Redis, redis_url: str, database_url: str
) -> None:
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    app = web.Application()
    app[appkeys.SETTINGS] = gateway_settings(database_url, redis_url, "http://127.0.0.1:1")
    app[appkeys.DB_POOL] = await asyncpg.create_pool(database_url, min_size=0)
    try:
        with pytest.raises(RedisEvictionPolicyError) as raised:
            await anext(redis_ctx(app))
    finally:
        await app[appkeys.DB_POOL].close()
    assert raised.value.policy == "allkeys-lru"
    assert "maxmemory-policy noeviction" in str(raised.value)
    assert appkeys.HOLDS not in app


async def test_unreachable_redis_is_not_checked_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    try:
        with caplog.at_level(logging.WARNING):
            await check_eviction_policy(client)
    finally:
        await client.aclose()
    assert any("not checked" in r.getMessage() for r in caplog.records)


async def test_redis_without_config_command_starts_with_a_warning(
    redis_client: aioredis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Managed Redis often refuses CONFIG: the check warns and lets the service start."""
    await redis_client.acl_setuser(
        "no-config", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"]
    )
    limited = aioredis.from_url(
        redis_url.replace("redis://", "redis://no-config:pw@"), decode_responses=True
    )
    try:
        with caplog.at_level(logging.WARNING):
            await check_eviction_policy(limited)
    finally:
        await limited.aclose()
        await redis_client.acl_deluser("no-config")
    assert any("cannot read Redis maxmemory-policy" in r.getMessage() for r in caplog.records)


def test_creditgate_serve_on_an_evicting_redis_exits_1_with_one_json_error(
    redis_url: str, database_url: str
) -> None:
    """What an operator sees: one JSON document naming the policy and the fix, exit 1."""
    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "volatile-ttl")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "UPSTREAM_API_KEY": "sk-x",
        "PORT": str(free_port()),
        "ADMIN_PORT": str(free_port()),
        "METRICS_PORT": "0",
    }
    try:
        served = subprocess.run(
            [sys.executable, "-m", "creditgate.cli", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    assert served.returncode == 1
    answer = orjson.loads(served.stdout)
    assert answer["type"] == "RedisEvictionPolicyError"
    assert "'volatile-ttl'" in answer["error"]
    assert "maxmemory-policy noeviction" in answer["error"]
    assert "Traceback" not in served.stderr
