"""One fault case's own world: PostgreSQL, Redis, fault proxies, the simulated upstream and a
``creditgate serve`` subprocess, each of which the case may kill, pause or cut.

PostgreSQL is not initialised per case: ``PostgresTemplate`` runs initdb, the migrations and the
rate-card seed once per session into a stopped data directory, and each case starts its own
server on a copy of it (a few hundred milliseconds instead of seconds).

``CG_FAULTS_GATEWAY_PYTHONPATH=/path/to/checkout`` runs the gateway subprocess from another
checkout (to try a branch's gateway before a merge; the schema still comes from this one).
``CG_FAULTS_KEEP=1`` keeps each case's directory (gateway logs, Redis files).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from billing import api_keys, ledger
from billing.metering.pricing import RateCard
from billing.metering.rate_cards import rate_cards_in_force
from devtools.localservices import (
    PostgresServer,
    RedisServer,
    _as_pg_user,
    free_port,
    start_postgres,
    start_redis,
)
from devtools.simulator import Simulator
from tests.faults.tcp_proxy import FaultProxy
from tests.harness import seed_database

DATABASE = "creditgate"
UPSTREAM_KEY = "sk-upstream-operator"
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0

# Short settings: every recovery path (sweeper, claims of stale entries, hold expiry) acts
# within seconds, so each case stays bounded.
FAULT_SETTINGS: dict[str, str] = {
    "HOLD_TTL_S": "4",
    "SWEEP_INTERVAL_S": "0.2",
    "SETTLEMENT_CLAIM_IDLE_MS": "500",
    "AUTH_CACHE_TTL_S": "5",
    "UPSTREAM_CONNECT_TIMEOUT_S": "2",
    "UPSTREAM_READ_TIMEOUT_S": "10",
    "RATE_CARD_REFRESH_S": "1",
    "METRICS_PORT": "0",  # no fixed port shared by every case (0 disables the endpoint)
    "WORKERS": "1",  # the cases kill, pause and cut the one serving process
}


_OUR_APPLICATION_NAME = "cg-fault-suite"


async def _our_pool(dsn: str) -> asyncpg.Pool:
    """The suite's own pool, named so ``terminate_gateway_backends`` spares it."""
    return await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=4,
        server_settings={"application_name": _OUR_APPLICATION_NAME},
    )


class PostgresTemplate:
    """A stopped, migrated and seeded PostgreSQL data directory to copy per case."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    def build(self) -> PostgresTemplate:
        server = start_postgres(self.base_dir, fast=True)
        try:
            asyncio.run(_prepare_database(server))
        finally:
            server.stop()
        return self

    def copy(self) -> Path:
        """A new base directory holding a copy of the template's cluster (owners kept)."""
        target = Path(tempfile.mkdtemp(prefix="cg-fault-pg-"))
        subprocess.run(
            ["cp", "-a", str(self.base_dir / "pgdata"), str(target / "pgdata")], check=True
        )
        return target


async def _prepare_database(server: PostgresServer) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    await seed_database(server.dsn_for(DATABASE))


class GatewayProcess:
    """``creditgate serve`` as a subprocess; stdout and stderr go to files in ``log_dir``."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.port = int(env["PORT"])
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._generation = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        self._generation += 1
        out = self.log_dir / f"gateway-{self._generation}.out"
        err = self.log_dir / f"gateway-{self._generation}.err"
        self.process = await asyncio.to_thread(_spawn_gateway, self.env, out, err)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while b"READY" not in out.read_bytes():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"creditgate serve exited ({self.process.returncode}):\n"
                    + err.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("creditgate serve not ready within 60 s")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after 30 s."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, _STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def rss_kib(self) -> int:
        """Resident set size of the gateway process (KiB, from /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log_text(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("gateway-*.err"))
        )


def _spawn_gateway(env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "creditgate.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )


class FaultStack:
    """Everything one case runs and breaks. Use ``async with FaultStack(template) as stack``.

    The gateway reaches Redis and PostgreSQL through ``redis_proxy`` and ``pg_proxy``; the
    verdict and the case's own handles (``pool``, ``redis``) connect directly.
    """

    def __init__(self, template: PostgresTemplate, **settings: str) -> None:
        self.template = template
        self.settings = settings
        self.work_dir = Path(tempfile.mkdtemp(prefix="cg-fault-"))
        self.pg: PostgresServer | None = None
        self.redis_server: RedisServer | None = None
        self.sim = Simulator()
        self._pg_base: Path | None = None
        self.pool: asyncpg.Pool
        self.redis: aioredis.Redis
        self.gateway: GatewayProcess
        self.rate_cards: dict[str, RateCard] = {}

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> FaultStack:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _start(self) -> None:
        self._pg_base = await asyncio.to_thread(self.template.copy)
        # Durable settings (not ``fast``): with synchronous_commit off a crash loses commits
        # the poster already acknowledged, which is the test setup's loss, not the gateway's.
        self.pg = await asyncio.to_thread(start_postgres, self._pg_base, None)
        self.redis_server = await asyncio.to_thread(start_redis, self.work_dir / "redis")
        self.pg_proxy = await FaultProxy("127.0.0.1", self.pg.port).start()
        self.redis_proxy = await FaultProxy("127.0.0.1", self.redis_server.port).start()
        await self.sim.start()
        self.pool = await _our_pool(self.database_url)
        self.redis = aioredis.from_url(self.redis_server.url, decode_responses=True)
        self.rate_cards = await rate_cards_in_force(self.pool)
        env = {
            **os.environ,
            **FAULT_SETTINGS,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{self.pg_proxy.port}/{DATABASE}",
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            "UPSTREAM_BASE_URL": self.sim.base_url,
            "UPSTREAM_API_KEY": UPSTREAM_KEY,
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "ADMIN_PORT": str(free_port()),
            "PURCHASES_ENABLED": "false",
            **self.settings,
        }
        if os.environ.get("CG_FAULTS_GATEWAY_PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["CG_FAULTS_GATEWAY_PYTHONPATH"]
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # read another checkout, write nothing there
        self.gateway = GatewayProcess(env, self.work_dir)
        await self.gateway.start()

    async def _stop(self) -> None:
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            await gateway.stop()
        await self.sim.stop()
        for name in ("pg_proxy", "redis_proxy"):
            proxy = getattr(self, name, None)
            if proxy is not None:
                await proxy.stop()
        if hasattr(self, "redis"):
            await self.redis.aclose()
        if hasattr(self, "pool"):
            self.pool.terminate()
        if self.redis_server is not None:
            await asyncio.to_thread(self.redis_server.stop)
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)
        if self._pg_base is not None:
            shutil.rmtree(self._pg_base, ignore_errors=True)
        if os.environ.get("CG_FAULTS_KEEP") is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    @property
    def database_url(self) -> str:
        assert self.pg is not None
        return self.pg.dsn_for(DATABASE)

    # --- accounts ---------------------------------------------------------------------------

    async def create_account(self, credits_millicredits: int = 50_000_000) -> tuple[int, str]:
        """A new account granted ``credits_millicredits``; returns ``(account_id, api_key)``."""
        async with self.pool.acquire() as conn:
            account_id = await ledger.create_account(conn, f"{uuid.uuid4().hex}@example.com")
            await ledger.post_entry(
                conn,
                account_id=account_id,
                entry_type="adjustment",
                amount_millicredits=credits_millicredits,
                idempotency_key=f"fault-grant:{uuid.uuid4()}",
            )
            key, _ = await api_keys.create_api_key(conn, account_id, name="fault")
        return account_id, key

    # --- Redis faults -----------------------------------------------------------------------

    async def redis_command(self, *args: Any) -> Any:
        """One command on a fresh direct connection (the shared one may be broken)."""
        assert self.redis_server is not None
        client = aioredis.from_url(self.redis_server.url, decode_responses=True)
        try:
            return await asyncio.wait_for(client.execute_command(*args), 10)
        finally:
            await client.aclose()

    async def kill_redis(self, *, keep_data: bool) -> None:
        """SIGKILL Redis; without ``keep_data`` its append-only files are deleted too."""
        assert self.redis_server is not None
        process = self.redis_server._process
        process.kill()
        await asyncio.to_thread(process.wait)
        await asyncio.to_thread(self.redis_server.stop)  # dismisses the watchdog
        if not keep_data:
            for path in (self.work_dir / "redis").iterdir():
                if path.name not in ("redis.conf", "redis.log"):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    async def shutdown_redis_nosave(self) -> None:
        """``SHUTDOWN NOSAVE``: Redis exits at once; with AOF on, the log has the writes."""
        assert self.redis_server is not None
        client = aioredis.from_url(self.redis_server.url)
        try:
            await client.execute_command("SHUTDOWN", "NOSAVE")
        except Exception:  # the connection closes under the reply
            pass
        finally:
            await client.aclose()
        await asyncio.to_thread(self.redis_server._process.wait, 30)
        await asyncio.to_thread(self.redis_server.stop)

    async def start_redis_again(self) -> None:
        """Start Redis again on the same port and directory (its AOF, if any, is loaded)."""
        assert self.redis_server is not None
        port = self.redis_server.port
        self.redis_server = await asyncio.to_thread(start_redis, self.work_dir / "redis", port)
        await self.redis.aclose()
        self.redis = aioredis.from_url(self.redis_server.url, decode_responses=True)

    # --- PostgreSQL faults ------------------------------------------------------------------

    async def stop_postgres(self, mode: str) -> None:
        """``pg_ctl stop -m MODE`` (``immediate``: a crash, recovery on the next start)."""
        assert self.pg is not None
        self.pool.terminate()
        command = [
            *(str(self.pg.bindir / "pg_ctl"), "-D", str(self.pg.data_dir)),
            *("-m", mode, "-w", "-t", "30", "stop"),
        ]
        result = await asyncio.to_thread(
            subprocess.run, _as_pg_user(command), capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr
        await asyncio.to_thread(self.pg.stop)  # stopped already: dismisses the watchdog

    async def start_postgres_again(self) -> None:
        assert self.pg is not None and self._pg_base is not None
        self.pg = await asyncio.to_thread(start_postgres, self._pg_base, self.pg.port)
        self.pool = await _our_pool(self.database_url)

    async def terminate_gateway_backends(self) -> int:
        """``pg_terminate_backend`` every connection to the database but our own pool's."""
        return int(
            await self.pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND backend_type = 'client backend' "
                "AND application_name <> $2",
                DATABASE,
                _OUR_APPLICATION_NAME,
            )
        )
