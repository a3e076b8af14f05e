"""Real PostgreSQL and Redis for the tests: one server of each per session, on loopback.

- ``pg_server``, ``redis_server``: the session's servers (``devtools.localservices``).
- ``template_database``: ``cg_template``, every migration applied once per session.
- ``database_url``: a fresh database per test, copied from that template, dropped after.
- ``redis_url``: the session's Redis, emptied (FLUSHALL) before each test.
- ``sim``: the simulated OpenAI upstream; ``make_gateway(**overrides)`` / ``gw``: an in-process
  gateway on a loopback port wired to all three (``tests.harness.GatewayHarness``).

The fixtures are synchronous so sync and async tests alike can use them; the little database
work they do runs on private event loops in a worker thread, apart from pytest-asyncio's loops.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import redis

from creditgate.migrator import apply_migrations
from devtools.localservices import PostgresServer, RedisServer, start_postgres, start_redis
from devtools.simulator import Simulator
from devtools.stripe_sim import StripeStub
from tests.harness import GatewayHarness, gateway_settings, seed_database

TEMPLATE_DATABASE = "cg_template"

_T = TypeVar("_T")


def _run_in_thread(coro: Coroutine[Any, Any, _T]) -> _T:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (fsync off; its data die with the session)."""
    # Not tmp_path_factory: pytest makes its base directory 0700, and the postgres user, who
    # runs the server when the tests run as root, could not enter it.
    with tempfile.TemporaryDirectory(prefix="creditgate-pg-", ignore_cleanup_errors=True) as tmp:
        server = start_postgres(Path(tmp), fast=True)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's Redis server."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_database(pg_server: PostgresServer) -> str:
    """Name of a database with every migration applied, the template of ``database_url``."""
    _run_in_thread(_execute(pg_server.dsn, f'CREATE DATABASE "{TEMPLATE_DATABASE}"'))
    _run_in_thread(apply_migrations(pg_server.dsn_for(TEMPLATE_DATABASE)))
    return TEMPLATE_DATABASE


@pytest.fixture
def database_url(pg_server: PostgresServer, template_database: str) -> Iterator[str]:
    """URL of a migrated database of this test's own, dropped when the test ends."""
    name = f"t_{uuid.uuid4().hex}"
    _run_in_thread(
        _execute(pg_server.dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    )
    yield pg_server.dsn_for(name)
    _run_in_thread(_execute(pg_server.dsn, f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on this test's database."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
async def stripe_stub() -> AsyncIterator[StripeStub]:
    """The simulated Stripe API (``devtools.stripe_sim``), on a free loopback port."""
    stub = StripeStub()
    await stub.start()
    try:
        yield stub
    finally:
        await stub.stop()


@pytest.fixture
async def make_gateway(database_url: str, redis_url: str, sim: Simulator):
    """Factory: ``await make_gateway(**settings_overrides)`` starts a gateway."""
    await seed_database(database_url)
    started: list[GatewayHarness] = []

    async def make(**overrides) -> GatewayHarness:
        settings = gateway_settings(database_url, redis_url, sim.base_url, **overrides)
        harness = await GatewayHarness(settings, sim).start()
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.stop()


@pytest.fixture
async def gw(make_gateway) -> GatewayHarness:
    return await make_gateway()
