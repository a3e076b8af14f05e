"""The local PostgreSQL and Redis servers and the fixtures built on them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from creditgate.migrator import default_migrations_dir, discover
from devtools.localservices import PostgresServer, start_postgres


async def test_pg_server_select_1_answers_1(pg_server: PostgresServer) -> None:
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_redis_server_ping_answers_pong(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_database_url_fresh_database_has_every_migration(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        names = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [row["name"] for row in names] == [p.name for p in discover(default_migrations_dir())]


# Run twice: had both runs shared a database, the second CREATE TABLE would fail.
@pytest.mark.parametrize("run", [1, 2])
async def test_database_url_table_from_another_test_is_absent(database_url: str, run: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TABLE isolation_probe (run int)")
        await conn.execute("INSERT INTO isolation_probe VALUES ($1)", run)
    finally:
        await conn.close()


@pytest.mark.parametrize("run", [1, 2])
async def test_redis_url_key_from_another_test_is_absent(redis_url: str, run: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.set("isolation_probe", run, nx=True) is True
    finally:
        await client.aclose()


async def test_start_postgres_persistent_running_server_is_adopted_and_data_kept() -> None:
    # A directory the postgres user can enter when the tests run as root (see conftest).
    with tempfile.TemporaryDirectory(prefix="creditgate-pg-", ignore_cleanup_errors=True) as tmp:
        first = await asyncio.to_thread(start_postgres, Path(tmp), fast=True, persistent=True)
        try:
            await _execute(first.dsn, "CREATE TABLE kept (x int)")
            pid = (first.data_dir / "postmaster.pid").read_text().split()[0]

            again = await asyncio.to_thread(start_postgres, Path(tmp), first.port, persistent=True)
            assert again.port == first.port
            assert (again.data_dir / "postmaster.pid").read_text().split()[0] == pid

            await asyncio.to_thread(again.stop)
            assert not first.is_running()
            restarted = await asyncio.to_thread(start_postgres, Path(tmp), persistent=True)
            await _execute(restarted.dsn, "SELECT x FROM kept")
        finally:
            await asyncio.to_thread(first.stop)


# Started in a child process that is then killed outright: only the watchdog can stop them.
_OWNER_SCRIPT = """
import sys, time
from pathlib import Path
from devtools import localservices
start = getattr(localservices, sys.argv[1])
print(start(Path(sys.argv[2])).port, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("start", ["start_postgres", "start_redis"])
def test_start_server_owner_killed_server_stops(start: str) -> None:
    with tempfile.TemporaryDirectory(prefix="creditgate-", ignore_cleanup_errors=True) as tmp:
        with subprocess.Popen(
            [sys.executable, "-c", _OWNER_SCRIPT, start, tmp], stdout=subprocess.PIPE, text=True
        ) as owner:
            assert owner.stdout is not None
            port = int(owner.stdout.readline())
            assert _listening(port)
            owner.kill()
        deadline = time.monotonic() + 30
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _listening(port)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
