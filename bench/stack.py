"""The gateway's own services for a benchmark: PostgreSQL, Redis, a funded account and key.

PostgreSQL runs with its normal durability (``fast=False``: fsync on) and Redis with its
append-only file, as in production, so the settlement poster's numbers mean something.
Everything lives in one temporary directory on loopback and is stopped by ``stop()``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis
import redis.asyncio as aioredis

# The benchmarks run as scripts from a checkout; devtools/ (local PostgreSQL and Redis) is part
# of the checkout, not of the installed package, so the checkout's root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing.metering.backlog import read_outbox_backlog
from devtools.localservices import (
    PostgresServer,
    RedisServer,
    free_port,
    start_postgres,
    start_redis,
)

DATABASE = "creditgate_bench"
ACCOUNT_EMAIL = "bench@example.com"
ACCOUNT_CREDITS = 100_000_000
_CLI_TIMEOUT_S = 120.0
_QUERY_TIMEOUT_S = 10.0


class StackError(RuntimeError):
    """A service could not be started, or a ``creditgate`` command failed."""


@dataclass(frozen=True, slots=True)
class Backlog:
    """The settlement outbox at one moment, summed over every shard's stream
    (``billing.metering.backlog``).

    Attributes:
        length: ``XLEN``: settlements not yet acknowledged (acknowledged entries are
            deleted).
        pending: ``XPENDING`` count: entries a poster has read but not yet acknowledged.
    """

    length: int
    pending: int


@dataclass
class GatewayStack:
    """Running PostgreSQL and Redis, a migrated and seeded database, one funded API key."""

    postgres: PostgresServer
    redis_server: RedisServer
    database_url: str
    account_id: int = 0
    api_key: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        """Connection URL of the Redis server."""
        return self.redis_server.url

    def gateway_env(self, *, upstream_base_url: str, port: int, admin_port: int) -> dict[str, str]:
        """The environment of ``creditgate serve`` (and of the setup commands)."""
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "UPSTREAM_BASE_URL": upstream_base_url,
            "UPSTREAM_API_KEY": "sk-bench",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "ADMIN_HOST": "127.0.0.1",
            "ADMIN_PORT": str(admin_port),
            "METRICS_PORT": "0",  # no fixed port: a `make run` beside the bench keeps 9464
        }

    def usage_rows(self) -> int:
        """Rows in ``usage_events``: settlements recorded in Postgres so far."""
        return int(_run(_fetchval(self.database_url, "SELECT count(*) FROM usage_events")))

    def usage_by_source(self) -> dict[str, int]:
        """``usage_events`` rows per ``usage_source/status`` (e.g. ``upstream/completed``)."""
        rows = _run(
            _fetch(
                self.database_url,
                "SELECT usage_source || '/' || status AS kind, count(*) AS n"
                " FROM usage_events GROUP BY 1 ORDER BY 1",
            )
        )
        return {row["kind"]: int(row["n"]) for row in rows}

    def backlog(self) -> Backlog:
        """The outbox now. Redis unreachable: ``StackError``."""
        try:
            backlog = _run(_read_backlog(self.redis_url))
        except redis.RedisError as exc:
            raise StackError(f"redis: {exc}") from exc
        return Backlog(backlog.entries, backlog.pending)

    def stop(self) -> None:
        """Stop Redis and PostgreSQL (each is attempted even if the other fails)."""
        try:
            self.redis_server.stop()
        finally:
            self.postgres.stop()


def start_stack(base_dir: Path) -> GatewayStack:
    """Start PostgreSQL and Redis under ``base_dir`` and create the benchmark database.

    Raises:
        devtools.localservices.LocalServiceError: a server would not start.
    """
    postgres = start_postgres(base_dir / "postgres", fast=False)
    try:
        redis_server = start_redis(base_dir / "redis", appendonly=True)
    except BaseException:
        postgres.stop()
        raise
    stack = GatewayStack(postgres, redis_server, postgres.dsn_for(DATABASE))
    try:
        _run(_execute(postgres.dsn, f'CREATE DATABASE "{DATABASE}"'))
    except BaseException:
        stack.stop()
        raise
    return stack


def provision(stack: GatewayStack, env: dict[str, str]) -> None:
    """``creditgate migrate``, ``seed``, a funded account and its API key (kept on ``stack``).

    Raises:
        StackError: a command failed, timed out, or printed no JSON (its output is quoted).
    """
    stack.env = env
    cli(env, "migrate")
    cli(env, "seed")
    account = cli(
        env, "accounts", "create", "--email", ACCOUNT_EMAIL, "--credits", str(ACCOUNT_CREDITS)
    )
    stack.account_id = int(account["id"])
    key = cli(env, "keys", "create", "--account", str(stack.account_id), "--name", "bench")
    stack.api_key = str(key["key"])


def creditgate_executable() -> str:
    """The ``creditgate`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "creditgate"
    if beside.is_file():
        return str(beside)
    found = shutil.which("creditgate")
    if found is None:
        raise StackError("the creditgate console script is not installed (pip install -e .)")
    return found


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run ``creditgate ARGS`` and return the JSON document it printed.

    Raises:
        StackError: non-zero exit, a timeout, or output that is not a JSON object.
    """
    argv = [creditgate_executable(), *args]
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_CLI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"`creditgate {' '.join(args)}` took over {_CLI_TIMEOUT_S} s") from exc
    try:
        doc = json.loads(done.stdout)
    except json.JSONDecodeError:
        doc = None
    if done.returncode != 0 or not isinstance(doc, dict) or "error" in doc:
        raise StackError(
            f"`creditgate {' '.join(args)}` failed (status {done.returncode})\n"
            f"--- stdout ---\n{done.stdout.strip()}\n--- stderr ---\n{done.stderr.strip()[-3000:]}"
        )
    return doc


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, _QUERY_TIMEOUT_S))


async def _read_backlog(url: str) -> Any:
    client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return await read_outbox_backlog(client)
    finally:
        await client.aclose()


async def _fetchval(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn, timeout=_QUERY_TIMEOUT_S)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=_QUERY_TIMEOUT_S)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=_QUERY_TIMEOUT_S)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
