"""Shared service resources opened and closed in an aiohttp ``cleanup_ctx``.

Both the gateway and the admin service use them: a Postgres pool (``DB_POOL``), a Redis
client with the ``HoldStore`` scripts registered (``REDIS``, ``HOLDS``), the per-key request
rate limiter (``RATE_LIMITER``) and the control listener with the live flags (``CONTROL``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from billing.control import ControlKind
from billing.errors import POSTGRES_UNAVAILABLE, REDIS_UNAVAILABLE, BillingUnavailableError
from billing.ledger import PostedBalance, posted_balance
from billing.metering.cluster_channel import ClusterChannel
from billing.metering.holds import HoldStore
from billing.metering.rate_limit import RateLimiter
from billing.metering.script_channel import PipelinedChannel, ScriptChannel
from billing.purchases.stripe_client import StripeClient
from billing.spend_controls import SpendWindows, window_spend
from runtime import appkeys
from runtime.control import ControlListener, Reaction
from runtime.settings import Settings
from runtime.supervision import cancel_and_wait, supervise

#: The hot path's script channel as ``CLIENT LIST`` names it.
SCRIPT_CHANNEL_NAME = "creditgate-scripts"

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
    """Refuse a Redis that may evict keys; ``CONFIG GET maxmemory-policy`` once at start-up
    (on a cluster client: on every node it knows, and any node's policy refuses).

    CONFIG disabled or not permitted (managed Redis): a warning, and the service starts.
    Redis unreachable: a warning (the service starts and fails closed until Redis is back;
    the policy is then not checked).

    Raises:
        RedisEvictionPolicyError: the policy is anything but ``noeviction``.
    """
    try:
        if isinstance(client, RedisCluster):
            per_node: dict[str, Any] = await client.config_get(
                "maxmemory-policy", target_nodes=RedisCluster.ALL_NODES
            )
            replies = list(per_node.values())
        else:
            replies = [await client.config_get("maxmemory-policy")]
    except ResponseError as exc:
        log.warning(
            "cannot read Redis maxmemory-policy (%s); make sure it is %s",
            exc,
            REQUIRED_EVICTION_POLICY,
        )
        return
    except REDIS_UNAVAILABLE as exc:
        log.warning("Redis unreachable at start-up, maxmemory-policy not checked: %s", exc)
        return
    for reply in replies:
        policy = str(reply.get("maxmemory-policy", REQUIRED_EVICTION_POLICY))
        if policy != REQUIRED_EVICTION_POLICY:
            raise RedisEvictionPolicyError(policy)


def open_redis(
    url: str,
    *,
    cluster: bool,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float | None = None,
) -> aioredis.Redis:
    """The redis-py client of ``url`` (``REDIS_URL``), strings decoded. ``cluster``
    (``REDIS_CLUSTER``): a cluster client (``redis.asyncio.cluster.RedisCluster``), which
    finds every node from the one named and routes each command by its key's slot. A command
    fails after ``socket_timeout_s`` without a reply and a connect after
    ``connect_timeout_s`` (None: no limit).

    The cluster client is typed as ``aioredis.Redis``: it has the same command methods
    (``redis.commands``), and what creditgate uses of them (single-key commands, scripts
    routed by their first key, pipelines without transactions, per-shard commands) runs
    against a real cluster in ``tests/cluster``.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 30,
        "max_connections": 64,  # per node for a cluster client
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
    }
    if cluster:
        return cast(aioredis.Redis, RedisCluster.from_url(url, **options))
    return aioredis.from_url(url, **options)


def open_script_channel(
    settings: Settings, *, name: str, decode_responses: bool = True
) -> PipelinedChannel | None:
    """A pipelined channel to ``REDIS_URL`` (``billing.metering.script_channel``): a
    ``ClusterChannel`` with ``REDIS_CLUSTER``; None for a URL the channels do not speak
    (``rediss://``, ``unix://``: redis-py serves those callers instead)."""
    if not settings.redis_url.startswith("redis://"):
        return None
    kind: type[ScriptChannel | ClusterChannel] = (
        ClusterChannel if settings.redis_cluster else ScriptChannel
    )
    return kind(
        settings.redis_url,
        timeout_s=settings.redis_socket_timeout_s,
        name=name,
        decode_responses=decode_responses,
    )


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the asyncpg pool for ``SETTINGS.database_url`` (``DB_POOL``) and a read-only one
    for read traffic (``READ_POOL``: on ``DATABASE_REPLICA_URL``, else ``DATABASE_URL``);
    close them at shutdown.

    A statement without an answer after ``POSTGRES_COMMAND_TIMEOUT_S`` (a connect after
    ``POSTGRES_CONNECT_TIMEOUT_S``) raises ``TimeoutError`` (an ``OSError``, so one of
    ``billing.errors.POSTGRES_UNAVAILABLE``: 503 on the request path, a retry in background
    loops) instead of waiting forever on a Postgres that stopped answering."""
    settings = app[appkeys.SETTINGS]
    timeouts = {
        "timeout": settings.postgres_connect_timeout_s,
        "command_timeout": settings.postgres_command_timeout_s,
    }
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10, **timeouts)
    app[appkeys.DB_POOL] = pool
    # min_size 0: opened on the first read (a replica that is down does not stop the service;
    # its reads answer 503). Custom plans: a read names a time range of the month-partitioned
    # tables, and the generic plan a prepared statement gets after five runs neither prunes
    # months nor sees that the range covers the month (23 ms against 0.7 ms for a heavy
    # account's month page, bench/ledger_scale.py); the money path keeps its cached plans.
    app[appkeys.READ_POOL] = await asyncpg.create_pool(
        settings.database_replica_url or settings.database_url,
        min_size=0,
        max_size=10,
        server_settings={
            "default_transaction_read_only": "on",
            "plan_cache_mode": "force_custom_plan",
        },
        **timeouts,
    )
    yield
    for opened in (app[appkeys.READ_POOL], pool):
        try:
            await asyncio.wait_for(opened.close(), timeout=10)
        except TimeoutError:  # a connection never came back: do not hang the shutdown
            opened.terminate()


async def redis_ctx(app: web.Application, *, pipelined: bool = False) -> AsyncIterator[None]:
    """Open the Redis client and register the hold scripts; needs ``DB_POOL`` first (a
    missing cached balance is loaded from Postgres). ``pipelined`` adds the hot path's
    ``ScriptChannel`` (the gateway; see ``billing.metering.script_channel``).

    Every Redis command here fails after ``REDIS_SOCKET_TIMEOUT_S`` without a reply (and a
    connect after ``REDIS_CONNECT_TIMEOUT_S``) instead of waiting for a stalled Redis forever:
    the sweeper, the poster's claims and the admin service retry or answer 503.

    Raises:
        RedisEvictionPolicyError: Redis may evict keys (``check_eviction_policy``).
    """
    settings = app[appkeys.SETTINGS]
    client = open_redis(
        settings.redis_url,
        cluster=settings.redis_cluster,
        socket_timeout_s=settings.redis_socket_timeout_s,
        connect_timeout_s=settings.redis_connect_timeout_s,
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

    async def load_spend(
        account_id: int, api_key_id: int, windows: SpendWindows
    ) -> tuple[int, int, int, int]:
        try:
            return await window_spend(pool, account_id, api_key_id, windows)
        except POSTGRES_UNAVAILABLE as exc:
            raise BillingUnavailableError(f"postgres: {exc}") from exc

    channel = open_script_channel(settings, name=SCRIPT_CHANNEL_NAME) if pipelined else None
    app[appkeys.REDIS] = client
    app[appkeys.HOLDS] = HoldStore(client, load_balance, channel=channel, load_spend=load_spend)
    app[appkeys.RATE_LIMITER] = RateLimiter(client)
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


async def control_ctx(
    app: web.Application, *, reactions: Mapping[ControlKind, Reaction] | None = None
) -> AsyncIterator[None]:
    """Start the application's control listener (``CONTROL``, ``runtime.control``) after one
    read of the flags, with ``reactions`` to control events; stop it at shutdown. Needs
    ``DB_POOL`` first.

    Postgres unreachable at start: the environment's flags are in force until it answers
    (the listener retries every ``CONTROL_REFRESH_S``); the service starts all the same.
    """
    settings = app[appkeys.SETTINGS]
    listener = ControlListener(
        settings.database_url,
        app[appkeys.DB_POOL],
        settings.initial_flags(),
        refresh_s=settings.control_refresh_s,
        connect_timeout_s=settings.postgres_connect_timeout_s,
    )
    for kind, reaction in (reactions or {}).items():
        listener.react(kind, reaction)
    await listener.refresh_flags()
    app[appkeys.CONTROL] = listener
    task = asyncio.create_task(
        supervise("control-listener", listener.run, restarts=app.get(appkeys.TASK_RESTARTS)),
        name="control",
    )
    yield
    await cancel_and_wait(task)
