"""An in-process gateway wired to real Postgres and Redis and the simulated upstream.

``GatewayHarness`` serves ``gateway.app.create_app`` on a loopback port so the official
``openai`` SDK talks to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import openai
from aiohttp import web

from billing import api_keys, ledger
from billing.metering.backlog import read_outbox_backlog
from billing.metering.holds import HoldStore
from billing.metering.pricing import charge_millicredits
from billing.metering.rate_cards import seed_rate_cards
from creditgate.migrator import apply_migrations
from devtools.localservices import free_port
from devtools.simulator import Simulator
from gateway import appkeys as gateway_keys
from gateway.app import create_app
from runtime.http_protocol import edge_runner
from runtime.resources import open_redis
from runtime.settings import Settings


def gateway_settings(
    database_url: str, redis_url: str, upstream_base_url: str, /, **overrides: Any
):
    """Settings for an in-process gateway; ``overrides`` replace fields (the three URLs too:
    ``make_gateway(redis_url=...)`` points one gateway at a dead Redis)."""
    base = Settings(
        database_url=database_url,
        redis_url=redis_url,
        upstream_api_key="sk-upstream-operator",
        upstream_base_url=upstream_base_url,
        host="127.0.0.1",
        port=free_port(),
        public_base_url="http://127.0.0.1:9999",
        sweep_interval_s=0.2,
        settlement_claim_idle_ms=500,
        auth_cache_ttl_s=0.0,
    )
    return dataclasses.replace(base, **overrides)


async def seed_database(database_url: str) -> None:
    """Apply migrations (a no-op on a migrated template) and the default rate cards."""
    await apply_migrations(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await seed_rate_cards(conn)
    finally:
        await conn.close()


class GatewayHarness:
    """A running gateway plus direct Postgres/Redis handles for assertions."""

    def __init__(self, settings: Settings, sim: Simulator) -> None:
        self.settings = settings
        self.sim = sim
        self.app = create_app(settings)
        self.runner = edge_runner(
            self.app, settings, access_log=None, handler_cancellation=True, shutdown_timeout=1
        )
        self.base_url = f"http://127.0.0.1:{settings.port}/v1"
        self._clients: list[openai.AsyncOpenAI] = []

    async def start(self) -> GatewayHarness:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.settings.port).start()
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=1, max_size=4)
        self.redis = open_redis(self.settings.redis_url, cluster=self.settings.redis_cluster)
        self.holds = HoldStore(self.redis, lambda a: ledger.posted_balance(self.pool, a))
        return self

    async def stop(self) -> None:
        for client in self._clients:
            await client.close()
        await self.runner.cleanup()
        await self.redis.aclose()
        await self.pool.close()

    def client(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        """The official SDK pointed at the gateway (no retries, so every call is one)."""
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, **kwargs)
        self._clients.append(client)
        return client

    async def create_account(self, credits_millicredits: int = 0) -> tuple[int, str]:
        """A new account with an adjustment of ``credits_millicredits``; returns (id, key)."""
        async with self.pool.acquire() as conn:
            return await create_account_with_key(conn, credits_millicredits)

    async def settled(self, timeout_s: float = 10.0) -> None:
        """Wait until the settlement poster has posted every outbox entry (every shard's) to
        Postgres: acknowledged entries are deleted, so until every stream is empty."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            backlog = await read_outbox_backlog(self.redis)
            if backlog.entries == 0:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"outbox not drained: {backlog.entries} entries, {backlog.pending} pending"
                )
            await asyncio.sleep(0.02)

    async def balance(self, account_id: int) -> int:
        """Posted balance in Postgres (millicredits)."""
        return (await ledger.posted_balance(self.pool, account_id)).balance_millicredits

    async def ledger_sum(self, account_id: int) -> int:
        """Sum of the account's ledger entries (millicredits)."""
        return await self.pool.fetchval(
            "SELECT COALESCE(sum(amount_millicredits), 0) FROM ledger_entries "
            "WHERE account_id = $1",
            account_id,
        )

    async def usage(self, request_id: str) -> asyncpg.Record | None:
        """The usage event of a request id, or None."""
        return await self.pool.fetchrow(
            "SELECT * FROM usage_events WHERE request_id = $1", request_id
        )

    async def assert_charged_upstream_usage(
        self,
        request_id: str,
        account_id: int,
        *,
        opening_millicredits: int,
        prompt_tokens: int,
        completion_tokens: int,
        model: str = "gpt-4o-mini",
    ) -> None:
        """After ``settled()``: the request's usage event is the upstream's reported usage,
        completed and charged at the rate card, and it is the account's only charge."""
        usage = await self.usage(request_id)
        assert usage is not None, f"no usage event for {request_id}"
        assert (usage["usage_source"], usage["status"]) == ("upstream", "completed")
        expected = charge_millicredits(
            self.rate_cards.get(model),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        assert usage["charged_millicredits"] == expected
        assert await self.balance(account_id) == opening_millicredits - expected

    async def state(self, account_id: int):
        """Redis's view of the account (held, pending, balance)."""
        return await self.holds.account_state(account_id)

    @property
    def rate_cards(self):
        return self.app[gateway_keys.RATE_CARDS]


#: How long ``start_serve`` waits for ``creditgate serve`` to print READY (seconds).
SERVE_READY_TIMEOUT_S = 60.0


def serve_env(
    database_url: str, redis_url: str, upstream_base_url: str, port: int, **settings: str
) -> dict[str, str]:
    """The environment of a ``creditgate serve`` subprocess on loopback: this process's
    environment, the stores, the simulated upstream, the gateway on ``port``, the admin service
    on a free port, no ``/metrics`` (``METRICS_PORT=0``) and one process (``WORKERS=1``)
    unless ``settings`` says otherwise; ``settings`` (``ACCESS_LOG="false"``, ...) last."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "UPSTREAM_BASE_URL": upstream_base_url,
        "UPSTREAM_API_KEY": "sk-upstream-operator",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ADMIN_PORT": str(free_port()),
        "METRICS_PORT": "0",
        "WORKERS": "1",
        **settings,
    }


async def create_account_with_key(
    conn: asyncpg.Connection, credits_millicredits: int = 0, *, name: str = "test"
) -> tuple[int, str]:
    """A new account with an adjustment of ``credits_millicredits`` (none when 0) and a key
    named ``name``; returns (account id, key)."""
    account_id = await ledger.create_account(conn, f"{uuid.uuid4().hex}@example.com")
    if credits_millicredits:
        await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=credits_millicredits,
            idempotency_key=f"test-grant:{uuid.uuid4()}",
        )
    key, _ = await api_keys.create_api_key(conn, account_id, name=name)
    return account_id, key


def _spawn_serve(env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "creditgate.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )


async def start_serve(env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    """``creditgate serve`` as a subprocess with ``env``, its stdout and stderr in the files
    ``out`` and ``err``, once it printed READY (within ``SERVE_READY_TIMEOUT_S``; else it is
    killed and the test fails with the end of its stderr)."""
    process = await asyncio.to_thread(_spawn_serve, env, out, err)
    deadline = time.monotonic() + SERVE_READY_TIMEOUT_S
    while b"READY" not in await asyncio.to_thread(out.read_bytes):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = (await asyncio.to_thread(err.read_text))[-3000:]
            raise AssertionError("creditgate serve did not start:\n" + tail)
        await asyncio.sleep(0.05)
    return process
