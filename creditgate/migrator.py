"""Forward-only SQL migrations: ``migrations/NNNN_verb_noun.sql`` applied in order.

Each file runs in its own transaction and is recorded in ``schema_migrations``; a
PostgreSQL advisory lock makes concurrent ``creditgate migrate`` runs safe.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import asyncpg

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_ADVISORY_LOCK_ID = 0x63726564  # "cred"


def default_migrations_dir() -> Path:
    """The shipped migrations: package data ``creditgate.migrations`` (the repository's
    top-level ``migrations/`` folder, mapped in ``pyproject.toml``)."""
    return Path(str(importlib.resources.files("creditgate.migrations")))


def discover(migrations_dir: Path) -> list[Path]:
    """Migration files in order of their 4-digit prefix.

    Raises:
        ValueError: a ``.sql`` file that does not follow ``NNNN_verb_noun.sql``, or two
            files with the same number.
    """
    files = sorted(migrations_dir.glob("*.sql"))
    seen: set[str] = set()
    for path in files:
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must be NNNN_verb_noun.sql: {path.name}")
        if match.group(1) in seen:
            raise ValueError(f"two migrations numbered {match.group(1)}")
        seen.add(match.group(1))
    return files


async def apply_migrations(dsn: str, migrations_dir: Path | None = None) -> list[str]:
    """Apply every migration not yet recorded in ``schema_migrations``.

    Returns:
        The file names applied by this call, in order (empty when up to date).

    Raises:
        asyncpg.PostgresError: a migration failed; it is rolled back and later files are
            not applied. Postgres unreachable: ``OSError`` from the connect.
    """
    files = discover(migrations_dir or default_migrations_dir())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for path in files:
            version = path.name[:4]
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    path.name,
                )
            applied.append(path.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_ID)
        await conn.close()
