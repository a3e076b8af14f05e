"""``make restore-drill``: back up a live database under paid traffic, restore it to a point in
time into a fresh server, and check the copy with ``creditgate reconcile`` (docs/backups.md).

What it does, all on 127.0.0.1 in a temporary directory:

1. a PostgreSQL with WAL archiving into ``wal-archive/`` (docker-compose.yml's WAL settings,
   read from that file, its archive directory replaced), migrated and seeded; a Redis; the simulated
   upstream; ``creditgate serve``; an account with credits and a key;
2. paid traffic (``/v1/chat/completions``) while ``postgres/backup.sh once`` (the compose
   ``backup`` service's script: ``pg_basebackup`` as tar, then pruning) takes a base backup;
3. traffic stops, the outbox drains into Postgres, the ledger entry ids are noted, then the
   target time; more paid traffic follows (after the target: the copy must not have it), the
   WAL is switched and archived;
4. the base backup is unpacked into a fresh data directory with ``recovery.signal``,
   ``restore_command`` from the archive and ``recovery_target_time``, started on another port
   and promoted;
5. ``creditgate reconcile`` on the copy (DATABASE_URL only: Redis's checks skip).

Prints one JSON summary on stdout (progress on stderr). Exit status 0 only when reconcile
passes, the copy has every ledger entry committed before the target time and none after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml

from devtools.devstack import SIMULATED_API_KEY
from devtools.localservices import (
    PostgresServer,
    free_port,
    start_postgres,
    start_redis,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKUP_SCRIPT = REPO_ROOT / "postgres" / "backup.sh"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_WAL_ARCHIVE = "/wal-archive"
_WAL_SETTINGS = (
    "wal_level",
    "archive_mode",
    "archive_command",
    "archive_timeout",
    "synchronous_commit",
)
DATABASE = "creditgate"
MODEL = "gpt-4o-mini"
_PG_USER = "postgres"
_READY_TIMEOUT_S = 60.0
_CONCURRENCY = 4


class DrillError(RuntimeError):
    """A step of the drill failed; the message says which."""


def _log(message: str) -> None:
    print(f"restore-drill: {message}", file=sys.stderr, flush=True)


def _as_pg_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", _PG_USER, "--", *args] if os.geteuid() == 0 else args


def _pg_owned_dir(path: Path, mode: int = 0o700) -> Path:
    """Make ``path`` a directory the PostgreSQL programs (run as ``postgres`` when we are
    root) own."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if os.geteuid() == 0:
        shutil.chown(path, _PG_USER, _PG_USER)
    return path


def _console_script() -> str:
    return str(Path(sys.executable).parent / "creditgate")


def _creditgate(env: dict[str, str], *args: str, check: bool = True) -> tuple[int, Any]:
    result = subprocess.run(
        [_console_script(), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise DrillError(f"creditgate {args[0]} failed: {result.stdout}{result.stderr[-2000:]}")
    return result.returncode, json.loads(result.stdout)


def _wait_for_port(process: subprocess.Popen[bytes], port: int, what: str, log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise DrillError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise DrillError(f"{what} did not listen on 127.0.0.1:{port}")
        time.sleep(0.1)


def _spawn(
    stack: contextlib.ExitStack, args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    stack.callback(stop)
    return process


# --- the source database ------------------------------------------------------------------


def compose_wal_settings(archive: Path) -> dict[str, str]:
    """The WAL and commit settings of docker-compose.yml's ``postgres`` service (its
    ``-c name=value`` arguments), with its archive directory ``/wal-archive`` replaced by
    ``archive``: the drill archives exactly as the compose stack does."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    command: list[str] = compose["services"]["postgres"]["command"]
    settings = dict(
        value.split("=", 1) for flag, value in itertools.pairwise(command) if flag == "-c"
    )
    return {
        name: settings[name].replace(COMPOSE_WAL_ARCHIVE, str(archive)) for name in _WAL_SETTINGS
    }


def _start_source(stack: contextlib.ExitStack, base: Path, archive: Path) -> PostgresServer:
    """A PostgreSQL archiving its WAL into ``archive`` as the compose one does (a restart
    turns archive_mode on)."""
    server = start_postgres(base)
    statements = [
        f"ALTER SYSTEM SET {name} = '{value}'"
        for name, value in compose_wal_settings(archive).items()
    ]
    asyncio.run(_execute(server.dsn, *statements, f'CREATE DATABASE "{DATABASE}"'))
    server.stop()
    server = start_postgres(base, server.port)
    stack.callback(server.stop)
    return server


async def _execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


# --- traffic --------------------------------------------------------------------------------


class _Traffic:
    """Paid chat completions from ``_CONCURRENCY`` clients until ``stop`` is set."""

    def __init__(self, base_url: str, key: str) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {key}"}
        self.ok = 0
        self.failed = 0

    async def run(self, stop: asyncio.Event, limit: int | None = None) -> None:
        async with aiohttp.ClientSession(headers=self.headers) as session:
            await asyncio.gather(*(self._client(session, stop, limit) for _ in range(_CONCURRENCY)))

    async def _client(
        self, session: aiohttp.ClientSession, stop: asyncio.Event, limit: int | None
    ) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "restore drill"}]}
        while not stop.is_set() and (limit is None or self.ok + self.failed < limit):
            async with session.post(self.url, json=body) as response:
                await response.read()
                if response.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1


async def _wait_settled(dsn: str, expected: int) -> None:
    """Until Postgres has a usage row for each of ``expected`` answered requests."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while (count := await conn.fetchval("SELECT count(*) FROM usage_events")) < expected:
            if time.monotonic() > deadline:
                raise DrillError(f"{count} of {expected} requests settled in Postgres")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _ledger_ids(dsn: str) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {row["id"] for row in await conn.fetch("SELECT id FROM ledger_entries")}
    finally:
        await conn.close()


async def _database_now(dsn: str) -> datetime:
    conn = await asyncpg.connect(dsn)
    try:
        now: datetime = await conn.fetchval("SELECT clock_timestamp()")
        return now
    finally:
        await conn.close()


async def _switch_and_archive_wal(dsn: str) -> str:
    """Close the current WAL segment and wait until the archiver copied it; returns its name."""
    conn = await asyncpg.connect(dsn)
    try:
        segment: str = await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            archived = await conn.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
            if archived is not None and archived >= segment:
                return segment
            if time.monotonic() > deadline:
                raise DrillError(f"WAL segment {segment} was not archived (last: {archived})")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _traffic_during_backup(
    traffic: _Traffic, backup_env: dict[str, str], backup_log: Path
) -> int:
    """Paid traffic from before ``postgres/backup.sh once`` starts until after it ends;
    returns the script's exit status."""
    stop = asyncio.Event()
    running = asyncio.create_task(traffic.run(stop))
    await asyncio.sleep(0.5)  # traffic under way before the backup starts
    with backup_log.open("ab") as log:
        backup = await asyncio.create_subprocess_exec(
            *_as_pg_user(["sh", str(BACKUP_SCRIPT), "once"]),
            env=backup_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        returncode = await backup.wait()
    await asyncio.sleep(0.5)  # and after it ends
    stop.set()
    await running
    return returncode


# --- the restore ----------------------------------------------------------------------------


def _restore(backup: Path, base: Path, archive: Path, target: datetime) -> Path:
    """Unpack ``backup`` (base.tar.gz, pg_wal.tar.gz) into ``base/pgdata``, set up recovery
    to ``target`` from ``archive``; returns the data directory."""
    data_dir = _pg_owned_dir(_pg_owned_dir(base) / "pgdata")
    for archive_name, into in (("base.tar.gz", data_dir), ("pg_wal.tar.gz", data_dir / "pg_wal")):
        result = subprocess.run(
            _as_pg_user(["tar", "-xzf", str(backup / archive_name), "-C", str(into)]),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DrillError(f"unpacking {archive_name} failed: {result.stderr}")
    settings = (
        "\n# restore drill: point-in-time recovery, then a server of its own\n"
        f"restore_command = 'cp {archive}/%f %p'\n"
        f"recovery_target_time = '{target.isoformat()}'\n"
        "recovery_target_action = 'promote'\n"
        "archive_mode = 'off'\n"
    )
    with (data_dir / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
        conf.write(settings)
    (data_dir / "recovery.signal").touch()
    if os.geteuid() == 0:
        shutil.chown(data_dir / "recovery.signal", _PG_USER, _PG_USER)
    return data_dir


async def _wait_promoted(dsn: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                return
        finally:
            await conn.close()
        if time.monotonic() > deadline:
            raise DrillError("the restored server did not finish recovery")
        await asyncio.sleep(0.1)


async def _row_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("accounts", "ledger_entries", "usage_events")
        }
    finally:
        await conn.close()


# --- the drill --------------------------------------------------------------------------------


def drill(work: Path, *, after_target_requests: int = 10) -> dict[str, Any]:
    """Run the drill in ``work`` (an empty directory the postgres user can enter); returns
    the summary (``ok``)."""
    with contextlib.ExitStack() as stack:
        archive = _pg_owned_dir(work / "wal-archive")
        backups = _pg_owned_dir(work / "backups")
        _log("starting PostgreSQL with WAL archiving, Redis, the simulator, creditgate serve")
        source = _start_source(stack, work / "source", archive)
        redis = start_redis(work / "redis")
        stack.callback(redis.stop)
        simulator_port, port, admin_port = free_port(), free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": source.dsn_for(DATABASE),
            "REDIS_URL": redis.url,
            "UPSTREAM_BASE_URL": f"http://127.0.0.1:{simulator_port}/v1",
            "UPSTREAM_API_KEY": SIMULATED_API_KEY,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "ADMIN_PORT": str(admin_port),
            "METRICS_PORT": "0",
        }
        _creditgate(env, "migrate")
        _creditgate(env, "seed")
        simulator_log = work / "simulator.log"
        simulator = _spawn(
            stack,
            [sys.executable, "-m", "devtools.simulator", "--port", str(simulator_port)],
            {**env, "PYTHONPATH": str(REPO_ROOT)},
            simulator_log,
        )
        _wait_for_port(simulator, simulator_port, "the simulator", simulator_log)
        serve_log = work / "serve.log"
        serve = _spawn(stack, [_console_script(), "serve"], env, serve_log)
        _wait_for_port(serve, port, "creditgate serve", serve_log)
        _, account = _creditgate(
            env, "accounts", "create", "--email", "drill@example.com", "--credits", "1000000"
        )
        _, key = _creditgate(env, "keys", "create", "--account", str(account["id"]))
        traffic = _Traffic(f"http://127.0.0.1:{port}", key["key"])

        _log("paid traffic while postgres/backup.sh takes a base backup")
        backup_env = {
            "PATH": env["PATH"],
            "PGHOST": "127.0.0.1",
            "PGPORT": str(source.port),
            "PGUSER": "postgres",
            "BACKUP_DIR": str(backups),
            "WAL_ARCHIVE_DIR": str(archive),
        }
        backup_log = work / "backup.log"
        returncode = asyncio.run(_traffic_during_backup(traffic, backup_env, backup_log))
        if returncode != 0:
            raise DrillError(f"backup.sh failed ({returncode}): {backup_log.read_text()[-2000:]}")
        asyncio.run(_wait_settled(env["DATABASE_URL"], traffic.ok))
        before_ids = asyncio.run(_ledger_ids(env["DATABASE_URL"]))
        time.sleep(0.2)
        target = asyncio.run(_database_now(env["DATABASE_URL"]))
        time.sleep(0.2)
        during_backup = traffic.ok
        _log(f"{during_backup} paid requests; target time {target.isoformat()}; more traffic")
        asyncio.run(traffic.run(asyncio.Event(), limit=traffic.ok + after_target_requests))
        asyncio.run(_wait_settled(env["DATABASE_URL"], traffic.ok))
        after_ids = asyncio.run(_ledger_ids(env["DATABASE_URL"])) - before_ids
        asyncio.run(_switch_and_archive_wal(env["DATABASE_URL"]))

        (backup,) = sorted(backups.glob("base-*Z"))
        _log(f"restoring {backup.name} to {target.isoformat()} into a fresh server")
        _restore(backup, work / "copy", archive, target)
        copy = start_postgres(work / "copy")
        stack.callback(copy.stop)
        copy_dsn = copy.dsn_for(DATABASE)
        asyncio.run(_wait_promoted(copy_dsn))
        copy_ids = asyncio.run(_ledger_ids(copy_dsn))
        reconcile_env = {"PATH": env["PATH"], "DATABASE_URL": copy_dsn}  # no REDIS_URL
        reconcile_status, report = _creditgate(reconcile_env, "reconcile", check=False)
        missing = sorted(before_ids - copy_ids)
        after_target = sorted(after_ids & copy_ids)
        ok = reconcile_status == 0 and not missing and not after_target and traffic.failed == 0
        return {
            "ok": ok,
            "targetTime": target.isoformat(),
            "baseBackup": backup.name,
            "paidRequests": {"beforeTarget": during_backup, "afterTarget": after_target_requests},
            "failedRequests": traffic.failed,
            "rowsRestored": asyncio.run(_row_counts(copy_dsn)),
            "ledgerEntriesBeforeTarget": len(before_ids),
            "ledgerEntriesMissingFromCopy": missing,
            "ledgerEntriesAfterTargetInCopy": after_target,
            "reconcile": {
                "ok": reconcile_status == 0 and bool(report.get("ok")),
                "mismatchCounts": report.get("mismatchCounts"),
                "error": report.get("error"),
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.restore_drill", description=__doc__)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (logs, backup, data); a failed drill always does",
    )
    args = parser.parse_args(argv)
    # Under /tmp, not the checkout: the postgres user must be able to enter it.
    work = Path(tempfile.mkdtemp(prefix="creditgate-drill-"))
    work.chmod(0o755)
    started = time.monotonic()
    try:
        summary = drill(work)
    except Exception as exc:
        summary = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    keep = args.keep or not summary["ok"]  # a failed drill keeps its logs to read
    if keep:
        summary["directory"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
