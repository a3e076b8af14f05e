"""The ledger of record partitioned by month (migration 0012, ``billing.partitions``):
partitions made ahead by the service, settlements in their month's partition and posted once,
old months detached for archiving, and the migration moving existing rows."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import pytest

from billing import ledger, partitions, reconciliation, statements
from billing.metering import outbox, posting
from billing.partitions import DetachRefusedError, add_months, month_start
from creditgate.migrator import apply_migrations, default_migrations_dir
from devtools.localservices import PostgresServer
from tests.billing.money import grant, new_account, usage_record
from tests.harness import GatewayHarness
from tests.test_cli import run_cli


def _ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)


def _batch(account_id: int, request_id: str, started: date, cost: int) -> str:
    """A one-settlement posting batch for a request that started at noon UTC on ``started``."""
    record = usage_record(request_id=request_id, account_id=account_id, cost_millicredits=cost)
    record = record._replace(started_at_ms=_ms(started), finished_at_ms=_ms(started) + 250)
    return "[" + outbox.posting_row(record.to_json(), charged_millicredits=cost) + "]"


async def _where(conn: asyncpg.Connection, request_id: str) -> tuple[list[str], list[str]]:
    """The partitions holding the request's usage rows and its deduction entries."""
    usage = await conn.fetch(
        "SELECT tableoid::regclass::text FROM usage_events WHERE request_id = $1", request_id
    )
    entries = await conn.fetch(
        "SELECT tableoid::regclass::text FROM ledger_entries WHERE idempotency_key = $1",
        f"usage:{request_id}",
    )
    return [r[0] for r in usage], [r[0] for r in entries]


def _name(table: str, month: date) -> str:
    return f"{table}_p{month:%Y_%m}"


async def test_partitions_exist_for_this_month_and_ahead_after_startup(
    gw: GatewayHarness,
) -> None:
    this_month = month_start(datetime.now(UTC).date())
    wanted = {
        _name(table, add_months(this_month, n))
        for table in partitions.PARTITIONED_TABLES
        for n in range(partitions.MONTHS_AHEAD + 1)
    }
    for _ in range(100):
        found = {p.name for p in await partitions.list_partitions(gw.pool)}
        if wanted <= found:
            break
        await asyncio.sleep(0.05)
    assert wanted <= found
    assert {"usage_events_default", "ledger_entries_default"} <= found


async def test_create_ahead_is_idempotent(pool: asyncpg.Pool) -> None:
    first = await partitions.create_ahead(pool)
    again = await partitions.create_ahead(pool)
    assert first is not None and again is not None
    assert any(m.created for m in first)
    assert not any(m.created for m in again)
    assert [m.name for m in first] == [m.name for m in again]


async def test_settlement_of_a_future_month_lands_in_its_partition(pool: asyncpg.Pool) -> None:
    await partitions.create_ahead(pool)
    account = await new_account(pool)
    await grant(pool, account, 10_000)
    future = add_months(month_start(datetime.now(UTC).date()), 2)
    async with pool.acquire() as conn:
        await posting.post_settlements(conn, _batch(account, "req-future", future, 700))
        usage, entries = await _where(conn, "req-future")
    assert usage == [_name("usage_events", future)]
    assert entries == [_name("ledger_entries", future)]


async def test_a_month_without_partition_lands_in_default(pool: asyncpg.Pool) -> None:
    account = await new_account(pool)
    await grant(pool, account, 10_000)
    async with pool.acquire() as conn:
        await posting.post_settlements(conn, _batch(account, "req-old", date(2001, 3, 4), 300))
        usage, entries = await _where(conn, "req-old")
    assert (usage, entries) == (["usage_events_default"], ["ledger_entries_default"])


async def test_the_same_settlement_twice_is_one_usage_row_and_one_entry(
    pool: asyncpg.Pool,
) -> None:
    account = await new_account(pool)
    await grant(pool, account, 10_000)
    today = datetime.now(UTC).date()
    batch = _batch(account, "req-twice", today, 700)
    async with pool.acquire() as conn:
        first = await posting.post_settlements(conn, batch)
        second = await posting.post_settlements(conn, batch)
        both = await posting.post_settlements(conn, batch[:-1] + "," + batch[1:])
        usage, entries = await _where(conn, "req-twice")
        balance = await ledger.posted_balance(conn, account)
    assert (first[0].posted, second[0].posted, both[0].posted) == (1, 0, 0)
    assert (len(usage), len(entries)) == (1, 1)
    assert balance.balance_millicredits == 10_000 - 700


async def test_detach_refuses_the_current_month_and_the_reconciliation_window() -> None:
    today = date(2026, 12, 3)
    with pytest.raises(DetachRefusedError, match="not fully in the past"):
        partitions.check_detachable(date(2027, 1, 1), today=today)
    with pytest.raises(DetachRefusedError, match="reconciliation still covers"):
        partitions.check_detachable(date(2026, 12, 1), today=today)
    assert partitions.check_detachable(date(2026, 11, 1), today=today) == date(2026, 11, 1)


async def test_detach_an_old_month_keeps_its_table_and_the_balances(pool: asyncpg.Pool) -> None:
    old = add_months(month_start(datetime.now(UTC).date()), -14)
    async with pool.acquire() as conn:
        await partitions.create_ahead(pool, months_ahead=0, today=old)
    account = await new_account(pool)
    await grant(pool, account, 10_000)
    async with pool.acquire() as conn:
        await posting.post_settlements(conn, _batch(account, "req-archived", old, 900))
        await posting.post_settlements(
            conn, _batch(account, "req-kept", datetime.now(UTC).date(), 100)
        )
        with pytest.raises(DetachRefusedError):
            await partitions.detach_before(conn, datetime.now(UTC).date())
        detached = await partitions.detach_before(conn, add_months(old, 1))
        usage, entries = await _where(conn, "req-archived")
        kept = await conn.fetchval(
            f"SELECT count(*) FROM {_name('ledger_entries', old)} WHERE account_id = $1", account
        )
        archived = await conn.fetchval(
            "SELECT amount_millicredits FROM ledger_archived_totals WHERE account_id = $1",
            account,
        )
    assert set(detached) == {_name("usage_events", old), _name("ledger_entries", old)}
    assert (usage, entries) == ([], [])
    assert kept == 1 and archived == -900
    report = await reconciliation.reconcile(pool, None, since=datetime.now(UTC).date())
    assert report.mismatch_counts["account_balance"] == 0
    # This month's statement still closes on the balance, counted back from it (its opening
    # is -900: the archived deduction is dated 14 months back, before this month's grant).
    statement = await statements.monthly_statement(pool, account, datetime.now(UTC).date())
    balance = await ledger.posted_balance(pool, account)
    assert statement.closing_balance_millicredits == balance.balance_millicredits == 9_000
    assert statement.opening_balance_millicredits == -900


async def _sums(conn: asyncpg.Connection) -> tuple[object, ...]:
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM usage_events), (SELECT sum(charged_millicredits)
                                                         FROM usage_events),
                  (SELECT array_agg(id ORDER BY id) FROM usage_events),
                  (SELECT count(*) FROM ledger_entries),
                  (SELECT sum(amount_millicredits) FROM ledger_entries),
                  (SELECT array_agg(id ORDER BY id) FROM ledger_entries),
                  (SELECT sum(balance_millicredits) FROM accounts)"""
    )
    assert row is not None
    return tuple(row)


async def test_the_migration_moves_existing_rows(pg_server: PostgresServer, tmp_path: Path) -> None:
    """Migrations 0001-0011 applied, rows posted, then 0012: every row moved, ids and sums
    kept, and posting still works on the partitioned tables."""
    shipped = default_migrations_dir()
    before = tmp_path / "migrations"
    shutil.copytree(shipped, before)
    for path in before.glob("*.sql"):
        if path.name >= "0012":
            path.unlink()
    for path in (before / "functions").glob("count_*_in_month_totals.sql"):
        path.unlink()  # their triggers write 0013's tables
    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_server.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = pg_server.dsn_for(name)
    try:
        await apply_migrations(dsn, before)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            account = await new_account(pool)
            await grant(pool, account, 50_000)
            async with pool.acquire() as conn:
                assert (
                    await conn.fetchval(
                        "SELECT relkind::text FROM pg_class WHERE relname = 'usage_events'"
                    )
                    == "r"
                )
                for n, day in enumerate([date(2026, 1, 31), date(2026, 2, 1), date(2026, 3, 9)]):
                    await posting.post_settlements(conn, _batch(account, f"req-m{n}", day, 1_000))
                expected = await _sums(conn)
            applied = await apply_migrations(dsn)
            assert "0012_ledger_partition_by_month.sql" in applied
            async with pool.acquire() as conn:
                assert await _sums(conn) == expected
                assert (
                    await conn.fetchval(
                        "SELECT relkind::text FROM pg_class WHERE relname = 'usage_events'"
                    )
                    == "p"
                )
                usage, entries = await _where(conn, "req-m1")
                assert len(usage) == 1 and len(entries) == 1
                assert usage[0].startswith("usage_events_p") and entries[0].startswith(
                    "ledger_entries_p"
                )
                again = await posting.post_settlements(
                    conn, _batch(account, "req-m1", date(2026, 2, 1), 1_000)
                )
                assert again[0].posted == 0
                assert await _sums(conn) == expected
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_the_application_role_creates_partitions_but_cannot_detach(
    database_url: str,
) -> None:
    """The service runs as creditgate_app: create_month_partitions (SECURITY DEFINER) works
    for it; detaching (archiving the ledger) needs the owner."""
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, server_settings={"role": "creditgate_app"}
    )
    try:
        assert await pool.fetchval("SELECT current_user") == "creditgate_app"
        months = await partitions.create_ahead(pool, months_ahead=5)
        assert months is not None and any(m.created for m in months)
        old = add_months(month_start(datetime.now(UTC).date()), -14)
        # SECURITY DEFINER, so it refuses any table but the two.
        with pytest.raises(asyncpg.InvalidParameterValueError, match="not a month-partitioned"):
            await pool.fetch("SELECT * FROM create_month_partitions('accounts', $1, $1)", old)
        await partitions.create_ahead(pool, months_ahead=0, today=old)
        async with pool.acquire() as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await partitions.detach_before(conn, add_months(old, 1))
    finally:
        await pool.close()


async def test_cli_lists_creates_ahead_and_refuses_to_detach_this_month(
    database_url: str,
) -> None:
    env = {"DATABASE_URL": database_url}
    this_month = month_start(datetime.now(UTC).date())

    status, ahead = await run_cli(env, "partitions", "create-ahead", "--months", "2")
    listed_status, listed = await run_cli(env, "partitions", "list")
    refused_status, refused = await run_cli(
        env, "partitions", "detach", "--before", f"{add_months(this_month, 1):%Y-%m}"
    )

    assert status == 0 and {m["partition"] for m in ahead["months"]} >= {
        _name("ledger_entries", add_months(this_month, 2))
    }
    assert listed_status == 0
    months = {(p["table"], p["month"]) for p in listed["partitions"]}
    assert ("usage_events", f"{add_months(this_month, 2):%Y-%m}") in months
    assert ("usage_events", None) in months  # the DEFAULT partition
    assert refused_status == 1 and "not fully in the past" in refused["error"]
