"""The migration runner: numbered DDL once, function files on checksum change, drift refused."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from creditgate.migrator import (
    MigrationError,
    apply_migrations,
    default_migrations_dir,
    discover,
    discover_functions,
)
from devtools.localservices import PostgresServer


@pytest.fixture
async def empty_database_url(pg_server: PostgresServer) -> AsyncIterator[str]:
    """A database with nothing applied, dropped when the test ends."""
    name = f"m_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield pg_server.dsn_for(name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A copy of the shipped migrations that a test may edit."""
    folder = tmp_path / "migrations"
    shutil.copytree(default_migrations_dir(), folder)
    return folder


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def test_apply_fresh_database_applies_numbered_then_function_files(
    empty_database_url: str,
) -> None:
    folder = default_migrations_dir()
    applied = await apply_migrations(empty_database_url)

    numbered = [p.name for p in discover(folder)]
    functions = [f.name for f in discover_functions(folder)]
    assert applied == numbered + functions
    assert numbered[:2] == ["0001_create_money_path.sql", "0002_create_purchases.sql"]
    assert "functions/post_ledger_entries.sql" in functions
    recorded = await _fetch(
        empty_database_url, "SELECT name, checksum FROM schema_migrations ORDER BY version"
    )
    assert [(r["name"], r["checksum"]) for r in recorded] == [
        (name, hashlib.sha256((folder / name).read_bytes()).hexdigest()) for name in numbered
    ]
    defined = await _fetch(
        empty_database_url,
        "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
    )
    assert {f.key for f in discover_functions(folder)} <= {r["proname"] for r in defined}


async def test_apply_second_run_applies_nothing(empty_database_url: str) -> None:
    await apply_migrations(empty_database_url)
    assert await apply_migrations(empty_database_url) == []


async def test_apply_edited_applied_numbered_file_refused_and_nothing_applied(
    empty_database_url: str, migrations_copy: Path
) -> None:
    await apply_migrations(empty_database_url, migrations_copy)
    edited = migrations_copy / "0002_create_purchases.sql"
    edited.write_text(edited.read_text() + "\nALTER TABLE packages ADD COLUMN note text;\n")
    # Also pending: a new numbered file and a changed function; neither may run.
    (migrations_copy / "0099_create_marker.sql").write_text("CREATE TABLE marker (id int);\n")
    function_file = migrations_copy / "functions" / "ledger_entries_append_only.sql"
    function_file.write_text(function_file.read_text() + "\n-- edited\n")

    with pytest.raises(MigrationError, match="changed after it was applied") as err:
        await apply_migrations(empty_database_url, migrations_copy)

    assert err.value.file_name == "0002_create_purchases.sql"
    tables = await _fetch(
        empty_database_url,
        "SELECT to_regclass('marker') AS marker, "
        "(SELECT count(*) FROM information_schema.columns "
        " WHERE table_name = 'packages' AND column_name = 'note') AS note",
    )
    assert (tables[0]["marker"], tables[0]["note"]) == (None, 0)
    recorded = await _fetch(
        empty_database_url,
        "SELECT checksum FROM schema_function_migrations WHERE name = 'ledger_entries_append_only'",
    )
    assert recorded[0]["checksum"] != hashlib.sha256(function_file.read_bytes()).hexdigest()


async def test_apply_removed_applied_numbered_file_refused(
    empty_database_url: str, migrations_copy: Path
) -> None:
    await apply_migrations(empty_database_url, migrations_copy)
    (migrations_copy / "0003_create_settlement_record.sql").unlink()
    with pytest.raises(MigrationError, match="no longer on disk") as err:
        await apply_migrations(empty_database_url, migrations_copy)
    assert err.value.file_name == "0003_create_settlement_record.sql"


async def test_apply_edited_function_file_reapplied_and_its_body_in_force(
    empty_database_url: str, migrations_copy: Path
) -> None:
    await apply_migrations(empty_database_url, migrations_copy)
    function_file = migrations_copy / "functions" / "ledger_entries_append_only.sql"
    function_file.write_text(
        function_file.read_text().replace(
            "'% is append-only: % is not allowed'",
            "'% is append-only (edited body): % is not allowed'",
        )
    )

    applied = await apply_migrations(empty_database_url, migrations_copy)

    assert applied == ["functions/ledger_entries_append_only.sql"]
    assert await apply_migrations(empty_database_url, migrations_copy) == []
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"\(edited body\)"):
            await conn.execute("TRUNCATE ledger_entries CASCADE")  # a statement trigger
        recorded = await conn.fetchval(
            "SELECT checksum FROM schema_function_migrations "
            "WHERE name = 'ledger_entries_append_only'"
        )
    finally:
        await conn.close()
    assert recorded == hashlib.sha256(function_file.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("relative_path", "text", "problem"),
    [
        ("notes.sql", "SELECT 1;", "must be named NNNN_verb_noun.sql"),
        ("0004-Add Things.sql", "SELECT 1;", "must be named NNNN_verb_noun.sql"),
        ("0001_duplicate_number.sql", "SELECT 1;", "two migrations numbered 0001"),
        (
            "0004_create_helper.sql",
            "CREATE FUNCTION helper() RETURNS int LANGUAGE sql AS 'SELECT 1';",
            "creates a function",
        ),
        ("functions/Post-Things.sql", "SELECT 1;", "must be named <function_name>.sql"),
        (
            "functions/some_function.sql",
            "CREATE OR REPLACE FUNCTION other_function() RETURNS int LANGUAGE sql AS 'SELECT 1';",
            "must CREATE OR REPLACE FUNCTION some_function",
        ),
    ],
)
async def test_apply_unknown_or_misplaced_file_refused_before_anything_runs(
    empty_database_url: str, migrations_copy: Path, relative_path: str, text: str, problem: str
) -> None:
    (migrations_copy / relative_path).write_text(text)
    with pytest.raises(MigrationError, match=problem) as err:
        await apply_migrations(empty_database_url, migrations_copy)
    assert err.value.file_name == relative_path
    applied = await _fetch(empty_database_url, "SELECT to_regclass('accounts') AS accounts")
    assert applied[0]["accounts"] is None
