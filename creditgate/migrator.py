"""SQL migrations: numbered DDL files applied once, function files re-applied when they change.

The migrations folder (package data ``creditgate.migrations``) holds two kinds of file:

- ``NNNN_verb_noun.sql``: forward-only DDL (tables, constraints, indexes, types, roles,
  grants), applied once each in number order and recorded with its SHA-256 checksum in
  ``schema_migrations``. An applied file must never change: when one on disk differs from
  its recorded checksum (or is gone), the runner refuses to run at all.
- ``functions/<name>.sql``: the current body of one SQL function ``<name>`` as
  ``CREATE OR REPLACE FUNCTION`` (a trigger function's file also binds its triggers with
  ``CREATE OR REPLACE TRIGGER``). Applied after the numbered files, in name order, whenever
  its checksum differs from the one recorded in ``schema_function_migrations``: a function
  is changed by editing its file, never by restating it in a numbered migration.

Each file runs in its own transaction with its record; a PostgreSQL advisory lock makes
concurrent ``creditgate migrate`` runs safe.

Given a snapshot directory (``MIGRATION_SNAPSHOT_DIR``), ``run_migrations`` first takes a
``pg_dump --format=custom`` of the database into it whenever a numbered migration is pending,
and applies nothing when the dump fails: the runbook's "snapshot before migrating". Function
files alone do not take one (they only replace function bodies, which the next release's
files restore).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

_NUMBERED_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_FUNCTION_NAME = re.compile(r"^([a-z][a-z0-9_]*)\.sql$")
_CREATES_FUNCTION = re.compile(r"\bCREATE\s+(OR\s+REPLACE\s+)?FUNCTION\b", re.IGNORECASE)
_ADVISORY_LOCK_ID = 0x63726564  # "cred"
FUNCTIONS_DIR = "functions"

_CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS schema_function_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(Exception):
    """The migrations on disk cannot be applied to this database; nothing was applied.

    Attributes:
        file_name: the migration file at fault (relative to the migrations folder).
    """

    def __init__(self, file_name: str, problem: str) -> None:
        super().__init__(f"{file_name}: {problem}")
        self.file_name = file_name


@dataclass(frozen=True, slots=True)
class MigrationFile:
    """One migration file and the SHA-256 (hex) of its bytes.

    Attributes:
        name: relative to the migrations folder: ``0001_create_money_path.sql`` or
            ``functions/post_settlements.sql``.
        key: what the database records it by: the 4-digit version of a numbered file, the
            function name of a function file.
    """

    path: Path
    name: str
    key: str
    checksum: str

    @classmethod
    def read(cls, path: Path, name: str, key: str) -> MigrationFile:
        """The file at ``path`` with its checksum."""
        return cls(path, name, key, hashlib.sha256(path.read_bytes()).hexdigest())

    def sql(self) -> str:
        """The file's SQL text."""
        return self.path.read_text(encoding="utf-8")


def default_migrations_dir() -> Path:
    """The shipped migrations: package data ``creditgate.migrations`` (the repository's
    top-level ``migrations/`` folder, mapped in ``pyproject.toml``)."""
    return Path(str(importlib.resources.files("creditgate.migrations")))


def discover(migrations_dir: Path) -> list[Path]:
    """The numbered migration files in order of their 4-digit prefix.

    Raises:
        MigrationError: a ``.sql`` file not named ``NNNN_verb_noun.sql``, two files with the
            same number, or a numbered file that creates a function (function bodies live
            in ``functions/``).
    """
    return [m.path for m in _numbered(migrations_dir)]


def _numbered(migrations_dir: Path) -> list[MigrationFile]:
    found: dict[str, MigrationFile] = {}
    for path in sorted(migrations_dir.glob("*.sql")):
        match = _NUMBERED_NAME.match(path.name)
        if match is None:
            raise MigrationError(path.name, "a migration file must be named NNNN_verb_noun.sql")
        version = match.group(1)
        if version in found:
            raise MigrationError(path.name, f"two migrations numbered {version}")
        migration = MigrationFile.read(path, path.name, version)
        if _CREATES_FUNCTION.search(migration.sql()):
            raise MigrationError(
                path.name, f"creates a function: put its body in {FUNCTIONS_DIR}/<name>.sql"
            )
        found[version] = migration
    return list(found.values())


def discover_functions(migrations_dir: Path) -> list[MigrationFile]:
    """The function files (``functions/<name>.sql``) in name order.

    Raises:
        MigrationError: a file not named ``<name>.sql`` (lower case), or one that does not
            ``CREATE OR REPLACE FUNCTION <name>``.
    """
    found: list[MigrationFile] = []
    for path in sorted((migrations_dir / FUNCTIONS_DIR).glob("*")):
        name = f"{FUNCTIONS_DIR}/{path.name}"
        if path.name == "__init__.py" or path.name.startswith("."):
            continue
        match = _FUNCTION_NAME.match(path.name)
        if match is None:
            raise MigrationError(name, "a function file must be named <function_name>.sql")
        migration = MigrationFile.read(path, name, match.group(1))
        defines = rf"\bCREATE\s+OR\s+REPLACE\s+FUNCTION\s+{migration.key}\s*\("
        if re.search(defines, migration.sql(), re.IGNORECASE) is None:
            raise MigrationError(name, f"must CREATE OR REPLACE FUNCTION {migration.key}(...)")
        found.append(migration)
    return found


@dataclass(frozen=True, slots=True)
class MigrationRun:
    """What one ``run_migrations`` call did.

    Attributes:
        applied: the file names applied, in order (empty when up to date), e.g.
            ``["0001_create_money_path.sql", "functions/post_settlements.sql"]``.
        snapshot: the ``pg_dump --format=custom`` file taken before the first pending
            numbered migration; None when no snapshot directory was given or nothing
            numbered was pending.
    """

    applied: list[str]
    snapshot: Path | None


async def apply_migrations(dsn: str, migrations_dir: Path | None = None) -> list[str]:
    """``run_migrations`` without a snapshot; returns the file names applied."""
    return (await run_migrations(dsn, migrations_dir)).applied


async def run_migrations(
    dsn: str, migrations_dir: Path | None = None, *, snapshot_dir: Path | None = None
) -> MigrationRun:
    """Apply every numbered migration not yet recorded, then every function file whose
    checksum is new or changed; with ``snapshot_dir``, dump the database there first when a
    numbered migration is pending (``take_snapshot``).

    Raises:
        MigrationError: a file on disk is misnamed, an applied numbered migration was
            edited or removed since it was applied, or the snapshot failed; checked before
            anything is applied.
        asyncpg.PostgresError: a migration failed; it is rolled back and later files are
            not applied. Postgres unreachable: ``OSError`` from the connect.
    """
    folder = migrations_dir or default_migrations_dir()
    numbered = _numbered(folder)
    functions = discover_functions(folder)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_ID)
        await conn.execute(_CREATE_TABLES)
        applied_numbered = await _check_applied(conn, numbered)
        applied_functions = {
            r["name"]: r["checksum"]
            for r in await conn.fetch("SELECT name, checksum FROM schema_function_migrations")
        }
        pending = [m for m in numbered if m.key not in applied_numbered]
        snapshot = None
        if snapshot_dir is not None and pending:
            snapshot = await take_snapshot(dsn, snapshot_dir, before=pending[0])
        applied: list[str] = []
        for migration in pending:
            await _apply(
                conn,
                migration,
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.key,
                migration.name,
                migration.checksum,
            )
            applied.append(migration.name)
        for migration in functions:
            if applied_functions.get(migration.key) != migration.checksum:
                await _apply(
                    conn,
                    migration,
                    """INSERT INTO schema_function_migrations (name, checksum) VALUES ($1, $2)
                       ON CONFLICT (name) DO UPDATE
                       SET checksum = EXCLUDED.checksum, applied_at = now()""",
                    migration.key,
                    migration.checksum,
                )
                applied.append(migration.name)
        return MigrationRun(applied, snapshot)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_ID)
        await conn.close()


async def _check_applied(conn: asyncpg.Connection, numbered: list[MigrationFile]) -> set[str]:
    """The versions already applied; raises ``MigrationError`` when one drifted."""
    on_disk = {m.key: m for m in numbered}
    versions: set[str] = set()
    for version, name, checksum in await conn.fetch(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    ):
        migration = on_disk.get(version)
        if migration is None:
            raise MigrationError(name, "applied to this database but no longer on disk")
        if (migration.name, migration.checksum) != (name, checksum):
            raise MigrationError(
                migration.name,
                f"changed after it was applied (recorded {name} sha256 {checksum[:12]}, "
                f"on disk sha256 {migration.checksum[:12]}); write a new numbered "
                "migration instead of editing an applied one",
            )
        versions.add(version)
    return versions


async def _apply(
    conn: asyncpg.Connection, migration: MigrationFile, record_sql: str, *args: object
) -> None:
    async with conn.transaction():
        await conn.execute(migration.sql())
        await conn.execute(record_sql, *args)


def _create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (whatever the umask; never an existing file)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


async def take_snapshot(dsn: str, snapshot_dir: Path, *, before: MigrationFile) -> Path:
    """Dump the database at ``dsn`` with ``pg_dump --format=custom`` into ``snapshot_dir``
    (created if missing) as ``<database>-<UTC time>-before-<version>.dump``; restore it with
    ``pg_restore --clean --if-exists -d DATABASE FILE``.

    A dump is the whole database (emails, key digests, the ledger): a directory this makes
    is 0700 and the file is created 0600 before ``pg_dump`` writes into it, so it is never
    readable by others, not even for a moment (a ``chmod`` after would leave a window).

    Raises:
        MigrationError: ``pg_dump`` is not on PATH, the directory cannot be made, or the dump
            failed (its partial file is removed; its stderr ends the message).
    """
    problem = f"the snapshot before migrating failed, nothing was applied ({snapshot_dir})"
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise MigrationError(before.name, f"{problem}: pg_dump is not on PATH")
    database = urlsplit(dsn).path.lstrip("/") or "postgres"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = snapshot_dir / f"{database}-{stamp}-before-{before.key}.dump"
    try:
        await asyncio.to_thread(snapshot_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        await asyncio.to_thread(_create_private_file, path)
    except OSError as exc:
        raise MigrationError(before.name, f"{problem}: {exc}") from exc
    process = await asyncio.create_subprocess_exec(
        pg_dump,
        "--format=custom",
        f"--file={path}",
        f"--dbname={dsn}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        detail = stderr.decode(errors="replace").strip()
        raise MigrationError(
            before.name, f"{problem}: pg_dump exited with {process.returncode}: {detail}"
        )
    return path
