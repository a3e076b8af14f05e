"""Shared service resources opened and closed in an aiohttp ``cleanup_ctx``.

Both the gateway and the admin service use them: a Postgres pool (``DB_POOL``) and a Redis
client with the ``HoldStore`` scripts registered (``REDIS``, ``HOLDS``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from billing.errors import POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.ledger import PostedBalance, posted_balance
from billing.metering.holds import HoldStore
from billing.metering.script_channel import ScriptChannel
from billing.purchases.stripe_client import StripeClient
from runtime import appkeys

log = logging.getLogger(__name__)

REQUIRED_EVICTION_POLICY = "noeviction"


class RedisEvictionPolicyError(Exception):
    """Redis may evict keys (``maxmemory-policy`` is not ``noeviction``): a hold, a balance or
    an outbox entry could vanish under memory pressure, so the service refuses to start.

    Attributes:
        policy: the ``maxmemory-policy`` Redis reported, e.g. ``allkeys-lru``.
    """

    def __init__(self, policy: str) -> None:
        super().__init__(
            f"Redis maxmemory-policy is {policy!r}; creditgate needs {REQUIRED_EVICTION_POLICY!r} "
            "(evicted keys would lose holds, balances and unposted settlements). Fix: "
            f"`CONFIG SET maxmemory-policy {REQUIRED_EVICTION_POLICY}` and the same line in "
            "redis.conf (`maxmemory-policy noeviction`), or your provider's parameter group."
        )
        self.policy = policy


async def check_eviction_policy(client: aioredis.Redis) -> None:
    """Refuse a Redis that may evict keys; ``CONFIG GET maxmemory-policy`` once at start-up.

    CONFIG disabled or not permitted (managed Redis): a warning, and the service starts.
    Redis unreachable: a warning (the service starts and fails closed until Redis is back;
    the policy is then not checked).

    Raises:
        RedisEvictionPolicyError: the policy is anything but ``noeviction``.
    """
    try:
        reply = await client.config_get("maxmemory-policy")
    except ResponseError as exc:
        log.warning(
            "cannot read Redis maxmemory-policy (%s); make sure it is %s",
            exc,
            REQUIRED_EVICTION_POLICY,
        )
        return
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        log.warning("Redis unreachable at start-up, maxmemory-policy not checked: %s", exc)
        return
    policy = str(reply.get("maxmemory-policy", REQUIRED_EVICTION_POLICY))
    if policy != REQUIRED_EVICTION_POLICY:
        raise RedisEvictionPolicyError(policy)


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the asyncpg pool for ``SETTINGS.database_url``; close it at shutdown."""
    settings = app[appkeys.SETTINGS]
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
    app[appkeys.DB_POOL] = pool
    yield
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except TimeoutError:  # a connection never came back: do not hang the shutdown
        pool.terminate()


async def redis_ctx(app: web.Application, *, pipelined: bool = False) -> AsyncIterator[None]:
    """Open the Redis client and register the hold scripts; needs ``DB_POOL`` first (a
    missing cached balance is loaded from Postgres). ``pipelined`` adds the hot path's
    ``ScriptChannel`` (the gateway; see ``billing.metering.script_channel``).

    Raises:
        RedisEvictionPolicyError: Redis may evict keys (``check_eviction_policy``).
    """
    client = aioredis.from_url(
        app[appkeys.SETTINGS].redis_url,
        decode_responses=True,
        health_check_interval=30,
        max_connections=64,
    )
    try:
        await check_eviction_policy(client)
    except RedisEvictionPolicyError:
        await client.aclose()
        raise
    pool = app[appkeys.DB_POOL]

    async def load_balance(account_id: int) -> PostedBalance:
        try:
            return await posted_balance(pool, account_id)
        except POSTGRES_UNAVAILABLE as exc:
            raise BillingUnavailableError(f"postgres: {exc}") from exc

    url = app[appkeys.SETTINGS].redis_url
    channel = ScriptChannel(url) if pipelined and url.startswith("redis://") else None
    app[appkeys.REDIS] = client
    app[appkeys.HOLDS] = HoldStore(client, load_balance, channel=channel)
    yield
    if channel is not None:
        await channel.close()
    await client.aclose()


def gateway_redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """``redis_ctx`` with the pipelined script channel (the gateway's hot path)."""
    return redis_ctx(app, pipelined=True)


async def stripe_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the ``StripeClient`` (``appkeys.STRIPE``) when ``STRIPE_API_KEY`` is set, close
    it at shutdown. Shared by the gateway and the admin service; a second use is a no-op."""
    settings = app[appkeys.SETTINGS]
    if not settings.stripe_api_key or appkeys.STRIPE in app:
        yield
        return
    stripe = StripeClient.connect(settings.stripe_api_key, api_base=settings.stripe_api_base)
    app[appkeys.STRIPE] = stripe
    yield
    await stripe.close()
