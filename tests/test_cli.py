"""The ``creditgate`` command line, run as a real process against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import math
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from billing import ledger
from billing.api_keys import ActiveKey, find_active_key
from billing.metering.holds import HoldStore
from billing.metering.posting import dead_letter_id
from billing.metering.rate_cards import DEFAULT_RATES
from billing.metering.redis_keys import account_key, outbox_key, shard_of
from creditgate.migrator import default_migrations_dir, discover, discover_functions
from tests.billing.finance_books import post_month_of_books
from tests.billing.money import usage_record

REPO_ROOT = Path(__file__).resolve().parents[1]


async def run_cli_text(env: dict[str, str], *args: str) -> tuple[int, bytes, bytes]:
    """Run ``python -m creditgate.cli ARGS`` with exactly ``env`` (plus PATH); returns the exit
    status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "creditgate.cli",
        *args,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, Any]:
    """``run_cli_text``, for the commands that print one JSON document: returns the exit
    status and that document."""
    returncode, stdout, stderr = await run_cli_text(env, *args)
    try:
        doc = orjson.loads(stdout)
    except orjson.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON document: {stdout!r}; stderr: {stderr.decode()}")
    return returncode, doc


@pytest.fixture
def cli_env(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "UPSTREAM_API_KEY": "sk-upstream-test",
        "METRICS_PORT": "0",  # never the default 9464 (a shared machine)
    }


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
async def empty_database_url(pg_server) -> AsyncIterator[str]:
    """A database with no tables at all (``database_url`` is already migrated)."""
    name = f"t_empty_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield pg_server.dsn_for(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _create_account(cli_env: dict[str, str], credits: str | None = None) -> dict:
    args = ["accounts", "create", "--email", f"{uuid.uuid4().hex}@example.com"]
    if credits is not None:
        args += ["--credits", credits]
    code, doc = await run_cli(cli_env, *args)
    assert code == 0, doc
    return doc


# -- migrate, seed ----------------------------------------------------------------------


async def test_migrate_fresh_database_applies_all_then_nothing(empty_database_url, redis_url):
    env = {
        "DATABASE_URL": empty_database_url,
        "REDIS_URL": redis_url,
        "UPSTREAM_API_KEY": "sk-upstream-test",
    }
    numbered = [path.name for path in discover(default_migrations_dir())]
    functions = [f.name for f in discover_functions(default_migrations_dir())]
    code, first = await run_cli(env, "migrate")
    assert code == 0
    assert first == {"applied": numbered + functions}
    code, second = await run_cli(env, "migrate")
    assert code == 0
    assert second == {"applied": []}
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(numbered)
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 0
    finally:
        await conn.close()


async def test_seed_twice_adds_rate_cards_once(cli_env, conn):
    code, first = await run_cli(cli_env, "seed")
    assert code == 0
    assert sorted(first["rateCardsAdded"]) == sorted(rate.model for rate in DEFAULT_RATES)
    code, second = await run_cli(cli_env, "seed")
    assert code == 0
    assert second["rateCardsAdded"] == []
    assert await conn.fetchval("SELECT count(*) FROM rate_cards") == len(DEFAULT_RATES)
    packages = await conn.fetchval("SELECT count(*) FROM packages")
    assert packages == len(second["packages"]) == len(first["packages"])


async def test_seed_keeps_existing_prices(cli_env, conn):
    await conn.execute(
        """INSERT INTO rate_cards (model, model_kind, input_millicredits_per_1k_tokens,
               output_millicredits_per_1k_tokens, max_output_tokens)
           VALUES ('gpt-4o', 'chat', 1, 2, 100)"""
    )
    code, doc = await run_cli(cli_env, "seed")
    assert code == 0
    assert "gpt-4o" not in doc["rateCardsAdded"]
    rows = await conn.fetch(
        "SELECT input_millicredits_per_1k_tokens FROM rate_cards WHERE model = 'gpt-4o'"
    )
    assert [row[0] for row in rows] == [1]


# -- accounts ---------------------------------------------------------------------------


async def test_accounts_create_decimal_credits_reports_string_millicredits(cli_env, conn):
    doc = await _create_account(cli_env, "12.5")
    assert doc["balanceMillicredits"] == "12500"
    assert doc["balanceCredits"] == 12.5
    assert doc["availableMillicredits"] == "12500"
    assert doc["heldMillicredits"] == "0"
    entries = await conn.fetch(
        "SELECT entry_type, amount_millicredits FROM ledger_entries WHERE account_id = $1",
        doc["id"],
    )
    assert [tuple(entry) for entry in entries] == [("adjustment", 12_500)]
    balance = await conn.fetchval(
        "SELECT balance_millicredits FROM accounts WHERE id = $1", doc["id"]
    )
    assert balance == 12_500


async def test_accounts_create_without_credits_has_zero_balance(cli_env):
    doc = await _create_account(cli_env)
    assert doc["balanceMillicredits"] == "0"
    assert doc["availableMillicredits"] == "0"


async def test_accounts_show_reports_held_and_available(cli_env, database_url, redis_url):
    account = (await _create_account(cli_env, "20"))["id"]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        holds = HoldStore(client, lambda a: ledger.posted_balance(pool, a))
        await holds.reserve(account, 2_500, request_id="req_cli_show_test")
        code, doc = await run_cli(cli_env, "accounts", "show", str(account))
    finally:
        await client.aclose()
        await pool.close()
    assert code == 0
    assert doc["id"] == account
    assert doc["balanceMillicredits"] == "20000"
    assert doc["heldMillicredits"] == "2500"
    assert doc["availableMillicredits"] == "17500"
    assert doc["availableCredits"] == 17.5


# -- keys -------------------------------------------------------------------------------


async def test_keys_create_prints_key_once_and_stores_only_its_digest(cli_env, conn):
    account = (await _create_account(cli_env))["id"]
    code, doc = await run_cli(cli_env, "keys", "create", "--account", str(account), "--name", "ci")
    assert code == 0
    key = doc["key"]
    assert key.startswith("cg_live_")
    assert len(key) > len("cg_live_") + 40
    assert doc["accountId"] == account
    assert doc["keyPrefix"] == key[:12]
    row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", doc["id"])
    assert bytes(row["key_digest"]) == hashlib.sha256(key.encode()).digest()
    stored_text = " ".join(str(value) for value in row.values())
    assert key not in stored_text
    assert await find_active_key(conn, key) == ActiveKey(doc["id"], account, None)


async def test_keys_revoke_deactivates_key_once(cli_env, conn):
    account = (await _create_account(cli_env))["id"]
    _, created = await run_cli(cli_env, "keys", "create", "--account", str(account))
    code, first = await run_cli(cli_env, "keys", "revoke", str(created["id"]))
    assert (code, first["revoked"]) == (0, True)
    code, second = await run_cli(cli_env, "keys", "revoke", str(created["id"]))
    assert (code, second["revoked"]) == (0, False)
    assert await find_active_key(conn, created["key"]) is None


# -- credits ----------------------------------------------------------------------------


async def test_credits_grant_adds_adjustment_entry_with_reason(cli_env, conn):
    account = (await _create_account(cli_env, "1"))["id"]
    code, doc = await run_cli(
        cli_env,
        "credits",
        "grant",
        "--account",
        str(account),
        "--credits",
        "2.345",
        "--reason",
        "goodwill: ticket 42",
    )
    assert code == 0
    assert doc["amountMillicredits"] == "2345"
    assert doc["balanceAfterMillicredits"] == "3345"
    assert doc["reason"] == "goodwill: ticket 42"
    entry = await conn.fetchrow("SELECT * FROM ledger_entries WHERE id = $1", doc["entryId"])
    assert entry["entry_type"] == "adjustment"
    assert entry["amount_millicredits"] == 2_345
    assert entry["reference"] == "goodwill: ticket 42"
    assert entry["account_id"] == account
    assert (
        await conn.fetchval("SELECT balance_millicredits FROM accounts WHERE id = $1", account)
        == 3_345
    )


async def test_credits_grant_same_idempotency_key_applies_once(cli_env, conn):
    account = (await _create_account(cli_env))["id"]
    args = [
        "credits",
        "grant",
        "--account",
        str(account),
        "--credits",
        "5",
        "--reason",
        "promo",
        "--idempotency-key",
        "promo-2026-ci",
    ]
    _, first = await run_cli(cli_env, *args)
    _, second = await run_cli(cli_env, *args)
    assert (first["created"], second["created"]) == (True, False)
    assert first["entryId"] == second["entryId"]
    assert (
        await conn.fetchval("SELECT balance_millicredits FROM accounts WHERE id = $1", account)
        == 5_000
    )


async def test_credits_grant_negative_beyond_balance_fails_and_writes_nothing(cli_env, conn):
    account = (await _create_account(cli_env, "1"))["id"]
    code, doc = await run_cli(
        cli_env,
        "credits",
        "grant",
        "--account",
        str(account),
        "--credits",
        "-2",
        "--reason",
        "correction",
    )
    assert code == 1
    assert "error" in doc
    count = await conn.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE account_id = $1", account
    )
    assert count == 1


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["accounts", "show", "987654"],
        ["keys", "create", "--account", "987654"],
        ["credits", "grant", "--account", "987654", "--credits", "1", "--reason", "x"],
    ],
    ids=["accounts-show", "keys-create", "credits-grant"],
)
async def test_cli_unknown_account_prints_json_error_and_exits_1(cli_env, args):
    code, doc = await run_cli(cli_env, *args)
    assert code == 1
    assert isinstance(doc["error"], str)
    assert "987654" in doc["error"]


async def test_cli_credits_with_four_decimals_exits_1(cli_env):
    account = (await _create_account(cli_env))["id"]
    code, doc = await run_cli(
        cli_env,
        "credits",
        "grant",
        "--account",
        str(account),
        "--credits",
        "1.2345",
        "--reason",
        "x",
    )
    assert code == 1
    assert "decimals" in doc["error"]


async def test_cli_serve_missing_env_exits_1_listing_every_problem():
    code, doc = await run_cli({"METRICS_PORT": "0"}, "serve")
    assert code == 1
    problems = doc["problems"]
    for name in ("DATABASE_URL", "REDIS_URL", "UPSTREAM_API_KEY"):
        assert any(name in problem for problem in problems), (name, problems)
        assert name in doc["error"]
    assert len(problems) == 3


@pytest.mark.parametrize(
    "args",
    [["migrate"], ["seed"], ["accounts", "show", "1"], ["keys", "revoke", "1"]],
    ids=["migrate", "seed", "accounts-show", "keys-revoke"],
)
async def test_cli_store_command_without_env_asks_only_for_database_url(args):
    code, doc = await run_cli({}, *args)
    assert code == 1
    assert doc["problems"] == ["DATABASE_URL is required"]


@pytest.mark.parametrize(
    "args",
    [["settle"], ["credits", "grant", "--account", "1", "--credits", "1", "--reason", "x"]],
    ids=["settle", "credits-grant"],
)
async def test_cli_command_that_moves_balances_asks_for_database_and_redis(args):
    code, doc = await run_cli({}, *args)
    assert code == 1
    assert doc["problems"] == ["DATABASE_URL is required", "REDIS_URL is required"]


async def test_cli_serve_malformed_env_exits_1_listing_every_problem(cli_env):
    env = {
        **cli_env,
        "DATABASE_URL": "mysql://nope",
        "ROUNDING_MODE": "floor",
        "CHARGING_ENABLED": "perhaps",
    }
    code, doc = await run_cli(env, "serve")
    assert code == 1
    joined = "\n".join(doc["problems"])
    for name in ("DATABASE_URL", "ROUNDING_MODE", "CHARGING_ENABLED"):
        assert name in joined


async def test_cli_store_command_malformed_urls_all_reported_and_others_ignored():
    env = {"DATABASE_URL": "mysql://nope", "REDIS_URL": "http://cache", "PORT": "eighty"}
    code, doc = await run_cli(env, "accounts", "show", "1")
    assert code == 1
    assert len(doc["problems"]) == 2
    assert "DATABASE_URL" in doc["problems"][0]
    assert "REDIS_URL" in doc["problems"][1]


# -- only DATABASE_URL set (a second terminal beside `make run`) --------------------------


async def test_migrate_refuses_a_database_whose_applied_migration_differs(empty_database_url):
    """Drift (the recorded checksum of an applied file differs from the shipped file) is
    refused with a JSON error naming the file and exit status 1, not a traceback."""
    env = {"DATABASE_URL": empty_database_url}
    assert (await run_cli(env, "migrate"))[0] == 0
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            "UPDATE schema_migrations SET checksum = 'edited' WHERE version = '0001'"
        )
    finally:
        await conn.close()
    code, doc = await run_cli(env, "migrate")
    assert code == 1
    assert doc["type"] == "MigrationError"
    assert doc["error"].startswith("0001_create_money_path.sql: ")


async def test_cli_database_only_migrate_seed_accounts_and_keys_work(database_url, conn):
    env = {"DATABASE_URL": database_url}
    code, _ = await run_cli(env, "migrate")
    assert code == 0
    code, _ = await run_cli(env, "seed")
    assert code == 0
    email = f"{uuid.uuid4().hex}@example.com"
    code, created = await run_cli(env, "accounts", "create", "--email", email, "--credits", "3")
    assert code == 0, created
    assert created["balanceMillicredits"] == "3000"
    code, key = await run_cli(env, "keys", "create", "--account", str(created["id"]))
    assert code == 0, key
    code, revoked = await run_cli(env, "keys", "revoke", str(key["id"]))
    assert (code, revoked["revoked"]) == (0, True)
    assert await find_active_key(conn, key["key"]) is None


async def test_cli_accounts_show_without_redis_says_holds_are_unknown(cli_env, database_url):
    account = (await _create_account(cli_env, "20"))["id"]
    code, doc = await run_cli({"DATABASE_URL": database_url}, "accounts", "show", str(account))
    assert code == 0, doc
    assert doc["balanceMillicredits"] == "20000"
    assert doc["shortfallMillicredits"] == "0"
    for prefix in ("held", "pendingSettlement", "available"):
        assert doc[f"{prefix}Millicredits"] is None
    assert "REDIS_URL is not set" in doc["note"]


async def test_credits_grant_small_negative_amount_prints_no_negative_zero(cli_env):
    account = (await _create_account(cli_env, "5"))["id"]
    code, doc = await run_cli(
        cli_env,
        "credits",
        "grant",
        "--account",
        str(account),
        "--credits",
        "-1",
        "--reason",
        "correction",
    )
    assert code == 0, doc
    assert doc["amountMillicredits"] == "-1000"
    assert doc["amountUsd"] == 0.0
    assert math.copysign(1.0, doc["amountUsd"]) == 1.0


# -- outbox dead letters ----------------------------------------------------------------


async def _append_settlement(redis_url: str, record: Any) -> str:
    """An outbox entry as settle.lua appends it, its charge added to ``pending``; its dead
    letter's id (``posting.dead_letter_id``)."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    stream = outbox_key(shard_of(record.account_id))
    try:
        entry_id: str = await client.xadd(
            stream,
            {"p": record.to_json(), "c": record.cost_millicredits, "a": record.account_id},
        )
        await client.hincrby(account_key(record.account_id), "pending", record.cost_millicredits)
    finally:
        await client.aclose()
    return dead_letter_id(stream, entry_id)


async def test_outbox_replay_posts_a_dead_letter_once_its_account_exists(cli_env, conn):
    """A settlement naming an account not created yet is dead-lettered by ``settle`` (it no
    longer blocks the outbox), listed, refused on replay until the account exists, then
    posted once; a second replay says it did nothing."""
    account_id = (await _create_account(cli_env))["id"] + 1  # the next account's id
    record = usage_record(request_id="req-early", account_id=account_id, cost_millicredits=400)
    entry_id = await _append_settlement(cli_env["REDIS_URL"], record)

    code, settled = await run_cli(cli_env, "settle")
    assert code == 0, settled
    assert (settled["recorded"], settled["deadLettered"]) == (0, 1)
    code, listed = await run_cli(cli_env, "outbox", "dead-letters")
    assert code == 0, listed
    (letter,) = listed["deadLetters"]
    assert (letter["entryId"], letter["requestId"], letter["accountId"]) == (
        entry_id,
        "req-early",
        account_id,
    )
    assert letter["chargedMillicredits"] == "400"
    assert letter["replayedAt"] is None
    assert str(account_id) in letter["error"]

    code, refused = await run_cli(cli_env, "outbox", "replay", entry_id)
    assert code == 1
    assert str(account_id) in refused["error"]

    assert (await _create_account(cli_env, "10"))["id"] == account_id
    code, replayed = await run_cli(cli_env, "outbox", "replay", entry_id)
    assert code == 0, replayed
    assert replayed["outcome"] == "posted"
    assert replayed["chargedMillicredits"] == "400"
    assert replayed["deadLetter"]["replayedAt"] is not None
    code, again = await run_cli(cli_env, "outbox", "replay", entry_id)
    assert code == 0, again
    assert again["outcome"] == "already_replayed"
    assert again["chargedMillicredits"] == "0"
    replays = await conn.fetch("SELECT * FROM audit_log WHERE action = 'dead_letter.replay'")
    assert [(row["target_id"], row["actor_kind"]) for row in replays] == [(entry_id, "cli")]

    code, shown = await run_cli(cli_env, "accounts", "show", str(account_id))
    assert (shown["balanceMillicredits"], shown["availableMillicredits"]) == ("9600", "9600")
    assert (
        await conn.fetchval("SELECT count(*) FROM usage_events WHERE request_id = 'req-early'") == 1
    )
    assert (await run_cli(cli_env, "outbox", "dead-letters"))[1] == {"deadLetters": []}
    code, everything = await run_cli(cli_env, "outbox", "dead-letters", "--all")
    assert [d["entryId"] for d in everything["deadLetters"]] == [entry_id]


async def test_outbox_replay_of_a_request_posted_since_is_a_no_op(cli_env, conn):
    account_id = (await _create_account(cli_env, "10"))["id"]
    stray = usage_record(request_id="req-twice", account_id=account_id + 1, cost_millicredits=300)
    entry_id = await _append_settlement(cli_env["REDIS_URL"], stray)
    assert (await run_cli(cli_env, "settle"))[1]["deadLettered"] == 1
    posted = usage_record(request_id="req-twice", account_id=account_id, cost_millicredits=300)
    await _append_settlement(cli_env["REDIS_URL"], posted)
    assert (await run_cli(cli_env, "settle"))[1]["recorded"] == 1

    code, doc = await run_cli(cli_env, "outbox", "replay", entry_id)

    assert code == 0, doc
    assert doc["outcome"] == "already_posted"
    assert doc["deadLetter"]["replayedAt"] is not None
    assert (
        await conn.fetchval("SELECT count(*) FROM usage_events WHERE request_id = 'req-twice'") == 1
    )


async def test_outbox_replay_unknown_entry_exits_1(cli_env):
    code, doc = await run_cli(cli_env, "outbox", "replay", "1-0")
    assert code == 1
    assert doc["type"] == "DeadLetterNotFoundError"


# -- admin tokens and the audit of mutating commands ------------------------------------


async def _audit_rows(conn: asyncpg.Connection, action: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM audit_log WHERE action = $1 ORDER BY id", action)


async def test_admin_create_token_prints_it_once_audited_as_cli(database_url, conn):
    env = {"DATABASE_URL": database_url}
    code, doc = await run_cli(
        env, "admin", "create-token", "--role", "admin", "--name", "first", "--expires-in-days", "2"
    )
    assert code == 0, doc
    token = doc["token"]
    assert token.startswith("cg_admin_") and len(token) == len("cg_admin_") + 43
    assert (doc["role"], doc["name"], doc["createdByTokenId"]) == ("admin", "first", None)
    assert doc["expiresAt"] is not None
    row = await conn.fetchrow("SELECT * FROM admin_tokens WHERE id = $1", doc["id"])
    assert bytes(row["token_digest"]) == hashlib.sha256(token.encode()).digest()
    (audit,) = await _audit_rows(conn, "admin_token.create")
    assert (audit["actor_kind"], audit["actor_name"], audit["actor_token_id"]) == (
        "cli",
        "cli",
        None,
    )
    assert audit["target_id"] == str(doc["id"])

    code, listed = await run_cli(env, "admin", "tokens")
    assert code == 0
    assert [item["id"] for item in listed["tokens"]] == [doc["id"]]
    assert "token" not in listed["tokens"][0]

    code, revoked = await run_cli(env, "admin", "revoke-token", str(doc["id"]))
    assert code == 0, revoked
    assert revoked["revokedAt"] is not None
    assert len(await _audit_rows(conn, "admin_token.revoke")) == 1
    code, again = await run_cli(env, "admin", "revoke-token", str(doc["id"]))
    assert code == 1
    assert "revoked" in again["error"]


async def test_admin_create_token_refuses_unknown_role(database_url):
    code, _, _ = await run_cli_text(
        {"DATABASE_URL": database_url}, "admin", "create-token", "--role", "root"
    )
    assert code == 2


async def test_mutating_commands_write_one_cli_audit_row_each(cli_env, conn):
    account = (await _create_account(cli_env, "5"))["id"]
    _, key = await run_cli(cli_env, "keys", "create", "--account", str(account))
    await run_cli(cli_env, "keys", "revoke", str(key["id"]))
    await run_cli(cli_env, "keys", "revoke", str(key["id"]))  # no change: no row
    grant = ["credits", "grant", "--account", str(account), "--credits", "1", "--reason", "r"]
    _, granted = await run_cli(cli_env, *grant, "--idempotency-key", "once")
    await run_cli(cli_env, *grant, "--idempotency-key", "once")  # a repeat: no row
    code, _ = await run_cli(
        cli_env, "credits", "grant", "--account", str(account), "--credits", "-99", "--reason", "r"
    )
    assert code == 1  # refused: rolled back with no row

    rows = await conn.fetch("SELECT * FROM audit_log ORDER BY id")
    assert [(row["action"], row["target_id"]) for row in rows] == [
        ("account.create", str(account)),
        ("key.create", str(key["id"])),
        ("key.revoke", str(key["id"])),
        ("credits.grant", str(granted["entryId"])),
    ]
    assert {(row["actor_kind"], row["actor_name"]) for row in rows} == {("cli", "cli")}
    key_row = rows[1]
    assert key["key"] not in str(key_row["after"])


async def test_accounts_create_with_taken_email_writes_no_audit_row(cli_env, conn):
    email = f"{uuid.uuid4().hex}@example.com"
    assert (await run_cli(cli_env, "accounts", "create", "--email", email))[0] == 0
    code, _ = await run_cli(cli_env, "accounts", "create", "--email", email, "--credits", "1")
    assert code == 1
    assert len(await _audit_rows(conn, "account.create")) == 1


# -- reconcile ---------------------------------------------------------------------------


async def test_reconcile_clean_database_exits_0_and_records_the_run(cli_env, conn):
    account = (await _create_account(cli_env, "5"))["id"]
    code, doc = await run_cli(cli_env, "reconcile")
    assert code == 0, doc
    assert doc["ok"] is True
    assert doc["mismatches"] == []
    assert doc["counts"]["accounts"] == 1
    assert doc["counts"]["redisChecked"] == 1
    assert doc["counts"]["redisBalancesCompared"] == 1, account
    assert doc["counts"]["complete"] == 1
    row = await conn.fetchrow("SELECT id, source, ok FROM reconciliation_runs")
    assert (row["id"], row["source"], row["ok"]) == (doc["runId"], "cli", True)


async def test_reconcile_corrupted_balance_exits_1_naming_the_account(cli_env, conn):
    account = (await _create_account(cli_env, "5"))["id"]
    await conn.execute("UPDATE accounts SET balance_millicredits = 1 WHERE id = $1", account)
    code, doc = await run_cli(cli_env, "reconcile", "--since", "2026-01-01")
    assert code == 1
    assert doc["ok"] is False
    assert doc["since"] == "2026-01-01"
    assert doc["mismatchCounts"]["account_balance"] == 1
    [mismatch] = [m for m in doc["mismatches"] if m["check"] == "account_balance"]
    assert mismatch["accountId"] == account
    assert (mismatch["expectedMillicredits"], mismatch["actualMillicredits"]) == ("5000", "1")
    assert await conn.fetchval("SELECT ok FROM reconciliation_runs") is False


async def test_reconcile_malformed_since_is_a_usage_error(cli_env):
    code, _, stderr = await run_cli_text(cli_env, "reconcile", "--since", "last week")
    assert code == 2
    assert b"--since" in stderr


@pytest.mark.parametrize("since", ["9999-12-31", "tomorrow", "1999-12-31"])
async def test_reconcile_since_outside_2000_to_today_is_a_usage_error(cli_env, conn, since):
    """A `--since` after today checks no day and would record a clean run: refused."""
    if since == "tomorrow":
        since = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    code, _, stderr = await run_cli_text(cli_env, "reconcile", "--since", since)
    assert code == 2
    assert b"--since" in stderr and b"from 2000-01-01 to today" in stderr
    assert await conn.fetchval("SELECT count(*) FROM reconciliation_runs") == 0


async def test_reconcile_redis_unreachable_exits_1_with_json_error(cli_env, conn):
    env = {**cli_env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    code, doc = await run_cli(env, "reconcile")
    assert code == 1
    assert doc["type"] == "BillingUnavailableError"
    assert doc["error"].startswith("redis: ")
    assert await conn.fetchval("SELECT count(*) FROM reconciliation_runs") == 0


async def test_reconcile_without_redis_url_skips_the_redis_checks(cli_env):
    await _create_account(cli_env, "5")
    env = {name: value for name, value in cli_env.items() if name != "REDIS_URL"}
    code, doc = await run_cli(env, "reconcile")
    assert code == 0, doc
    assert doc["counts"]["redisChecked"] == 0
    assert "redisBalancesCompared" not in doc["counts"]
    assert doc["counts"]["complete"] == 0  # partial: its success is no success for the gauges


# -- report ---------------------------------------------------------------------------------


async def test_report_liability_prints_csv_that_ties_out(cli_env, pool):
    await post_month_of_books(pool)

    code, stdout, stderr = await run_cli_text(cli_env, "report", "liability", "--month", "2026-05")

    assert code == 0, stderr
    rows = list(csv.DictReader(io.StringIO(stdout.decode())))
    amounts = {row["line"]: int(row["millicredits"]) for row in rows}
    assert amounts["purchases_deferred_revenue"] == 12_000_000
    assert amounts["consumption_recognized"] == -23_462
    assert amounts["refunds"] == -2_500_000
    assert amounts["disputes"] == -1_000_000
    assert amounts["adjustments"] == 123
    *_, closing = rows
    assert closing["line"] == "closing_outstanding"
    assert sum(amounts.values()) - amounts["closing_outstanding"] == amounts["closing_outstanding"]
    purchases = next(row for row in rows if row["line"] == "purchases_deferred_revenue")
    assert (purchases["credits"], purchases["usd"]) == ("12000.000", "12.000000000")


async def test_report_revenue_prints_a_row_per_model_and_a_total(cli_env, pool):
    await post_month_of_books(pool)

    code, stdout, stderr = await run_cli_text(cli_env, "report", "revenue", "--month", "2026-05")

    assert code == 0, stderr
    rows = list(csv.DictReader(io.StringIO(stdout.decode())))
    assert [row["model"] for row in rows] == ["fin-a", "fin-b", "fin-x", "(total)"]
    assert rows[-1]["revenue_millicredits"] == "23462"
    assert rows[1]["upstream_cost_usd"] == "0.015000000"
    assert rows[1]["gross_margin_usd"] == "0.005000000"


@pytest.mark.parametrize("month", ["2026-13", "2026-5", "May"])
async def test_report_malformed_month_is_a_usage_error(cli_env, month):
    code, stdout, stderr = await run_cli_text(cli_env, "report", "revenue", "--month", month)

    assert code == 2
    assert b"--month" in stderr
    assert stdout == b""


# -- migrate: the snapshot before migrating (MIGRATION_SNAPSHOT_DIR) --------------------


async def _table_names(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


def _dump_magic_and_listing(dump: Path) -> tuple[bytes, str]:
    """A dump file's first 5 bytes and its table of contents (``pg_restore --list``)."""
    listing = subprocess.run(
        ["pg_restore", "--list", str(dump)], capture_output=True, text=True, check=True
    ).stdout
    return dump.read_bytes()[:5], listing


async def test_migrate_takes_a_pg_dump_snapshot_before_pending_migrations(
    empty_database_url, tmp_path
):
    snapshots = tmp_path / "snapshots"  # does not exist yet: migrate creates it
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            "CREATE TABLE before_migrating (id int); INSERT INTO before_migrating VALUES (7)"
        )
    finally:
        await conn.close()
    env = {"DATABASE_URL": empty_database_url, "MIGRATION_SNAPSHOT_DIR": str(snapshots)}
    code, first = await run_cli(env, "migrate")
    assert code == 0, first
    snapshot = Path(first["snapshot"])
    assert snapshot.parent == snapshots
    assert snapshot.name.endswith("-before-0001.dump")
    # A whole-database dump: readable by its owner only, in a directory only it can list.
    modes = [stat.S_IMODE(os.stat(path).st_mode) for path in (snapshots, snapshot)]
    assert modes == [0o700, 0o600]
    assert first["applied"][0] == "0001_create_money_path.sql"
    magic, listing = _dump_magic_and_listing(snapshot)
    assert magic == b"PGDMP"  # pg_dump's custom format
    # The snapshot is the database as it was: the table made before, none of the migrations.
    assert "TABLE public before_migrating" in listing
    assert "TABLE public accounts" not in listing
    # Nothing pending: no snapshot, no key.
    code, second = await run_cli(env, "migrate")
    assert (code, second) == (0, {"applied": []})
    assert list(snapshots.iterdir()) == [snapshot]


async def test_migrate_without_snapshot_dir_takes_none(empty_database_url, tmp_path):
    code, doc = await run_cli({"DATABASE_URL": empty_database_url}, "migrate")
    assert code == 0
    assert "snapshot" not in doc
    assert "accounts" in await _table_names(empty_database_url)


async def test_migrate_refuses_to_migrate_when_the_snapshot_fails(empty_database_url, tmp_path):
    # A real pg_dump failure: libpq (pg_dump) reads PGOPTIONS, asyncpg (migrate) does not,
    # so only the dump's connection is refused by the server.
    env = {
        "DATABASE_URL": empty_database_url,
        "MIGRATION_SNAPSHOT_DIR": str(tmp_path),
        "PGOPTIONS": "-c creditgate_no_such_setting=1",
    }
    code, doc = await run_cli(env, "migrate")
    assert code == 1
    assert doc["type"] == "MigrationError"
    assert "snapshot before migrating failed, nothing was applied" in doc["error"]
    assert "pg_dump exited" in doc["error"]
    assert list(tmp_path.iterdir()) == []  # the partial dump is removed
    assert await _table_names(empty_database_url) <= {
        "schema_migrations",
        "schema_function_migrations",
    }


async def test_migrate_relative_snapshot_dir_is_a_config_error(empty_database_url):
    env = {"DATABASE_URL": empty_database_url, "MIGRATION_SNAPSHOT_DIR": "snapshots"}
    code, doc = await run_cli(env, "migrate")
    assert code == 1
    assert doc["problems"] == ["MIGRATION_SNAPSHOT_DIR must be an absolute path, got 'snapshots'"]


def _adjustment_lines(stderr: bytes) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    return [line for line in lines if line.get("event") == "adjustment.posted"]


async def test_grant_and_starting_credits_each_log_one_adjustment_posted(cli_env):
    email = f"{uuid.uuid4().hex}@example.com"
    code, stdout, stderr = await run_cli_text(
        cli_env, "accounts", "create", "--email", email, "--credits", "3"
    )
    assert code == 0, stderr
    account = orjson.loads(stdout)["id"]
    [created] = _adjustment_lines(stderr)
    assert (created["accountId"], created["millicredits"]) == (account, "3000")
    assert (created["kind"], created["actorKind"]) == ("starting_grant", "cli")

    grant = ["credits", "grant", "--account", str(account), "--credits", "1.5", "--reason", "r"]
    code, stdout, stderr = await run_cli_text(cli_env, *grant, "--idempotency-key", "g-1")
    assert code == 0, stderr
    [granted] = _adjustment_lines(stderr)
    assert (granted["accountId"], granted["millicredits"]) == (account, "1500")
    assert granted["ledgerEntryId"] == orjson.loads(stdout)["entryId"]
    assert granted["balanceAfterMillicredits"] == "4500"
    code, _, stderr = await run_cli_text(cli_env, *grant, "--idempotency-key", "g-1")
    assert (code, _adjustment_lines(stderr)) == (0, [])  # a repeat posts and logs nothing
