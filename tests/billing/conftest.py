"""Fixtures for the money-path tests: a Postgres pool, a Redis client and a HoldStore on them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from billing import ledger
from billing.metering.holds import HoldStore
from tests.billing.purchase_world import World


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    """The purchase tests' world, on a pool of its own: 50 concurrent deliveries need 50
    sessions."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=60)
    try:
        yield World(pool)
    finally:
        await pool.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def holds(redis_client: aioredis.Redis, pool: asyncpg.Pool) -> HoldStore:
    return HoldStore(redis_client, lambda account_id: ledger.posted_balance(pool, account_id))
