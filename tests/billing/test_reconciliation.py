"""Reconciliation (billing/reconciliation.py) over real Postgres and Redis: a clean database
passes; one row corrupted as the superuser is reported with its account or day."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from billing.metering import outbox
from billing.metering.holds import HoldStore
from billing.metering.posting import post_settlements
from billing.metering.redis_keys import account_key
from billing.reconciliation import (
    DailyReconciliation,
    ReconciliationReport,
    check_rate_snapshots,
    check_redis,
    check_since,
    default_since,
    reconcile,
    record_run,
)
from runtime.supervision import cancel_and_wait
from tests.billing.money import grant, new_account, usage_record


async def _settle_in_postgres(
    pool: asyncpg.Pool, holds: HoldStore, account_id: int, cost_millicredits: int
) -> str:
    """Post one settlement as the poster does and give Redis the balance; returns its
    request id."""
    request_id = f"req-{uuid.uuid4().hex}"
    record = usage_record(
        request_id=request_id, account_id=account_id, cost_millicredits=cost_millicredits
    )
    batch = "[" + outbox.posting_row(record.to_json(), charged_millicredits=cost_millicredits) + "]"
    async with pool.acquire() as conn:
        [posting] = await post_settlements(conn, batch)
    await holds.sync_balance(account_id, posting.balance)
    return request_id


async def _world(pool: asyncpg.Pool, holds: HoldStore) -> tuple[int, int, str]:
    """Two accounts with grants, usage and an open hold; returns (first, second, a request
    id of the first)."""
    first = await new_account(pool)
    second = await new_account(pool)
    await grant(pool, first, 50_000, holds=holds)
    await grant(pool, second, 20_000, holds=holds)
    request_id = await _settle_in_postgres(pool, holds, first, 1_234)
    await _settle_in_postgres(pool, holds, first, 766)
    await _settle_in_postgres(pool, holds, second, 5_000)
    await holds.reserve(second, 1_000, request_id="open-hold", ttl_s=600)
    return first, second, request_id


def _checks(report: ReconciliationReport) -> set[str]:
    return {check for check, count in report.mismatch_counts.items() if count}


async def test_reconcile_clean_database_is_ok(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    await _world(pool, holds)
    report = await reconcile(pool, redis_client, since=default_since())
    assert report.ok, report.to_doc()
    assert report.mismatches == []
    assert report.counts["accounts"] == 2
    assert report.counts["days"] == 1
    assert report.counts["redisBalancesCompared"] == 2
    assert report.counts["holds"] == 1
    assert report.counts["deductedMillicredits"] == 7_000
    assert report.counts["dailyDeductionsMillicredits"] == 7_000
    assert report.counts["mismatchedMillicredits"] == 0
    assert report.counts["complete"] == 1
    assert report.to_doc()["ok"] is True


async def test_reconcile_balance_updated_by_superuser_reports_account(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    first, _, _ = await _world(pool, holds)
    await pool.execute(
        "UPDATE accounts SET balance_millicredits = balance_millicredits + 1 WHERE id = $1", first
    )
    report = await reconcile(pool, None, since=default_since())
    assert not report.ok
    assert _checks(report) == {"account_balance"}
    [mismatch] = report.mismatches
    assert mismatch.account_id == first
    assert (mismatch.expected_millicredits, mismatch.actual_millicredits) == (48_000, 48_001)
    assert report.counts["mismatchedMillicredits"] == 1
    assert report.counts["complete"] == 0  # no Redis checked: a partial run


async def test_reconcile_balance_off_by_190_percent_of_a_day_counts_the_amount(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    """The amount off counts every amount-bearing check, not only the per-day one: a balance
    corrupted by 190% of the day's deductions is 190% of an average day (the page)."""
    first, _, _ = await _world(pool, holds)
    await pool.execute(
        "UPDATE accounts SET balance_millicredits = balance_millicredits + 13300 WHERE id = $1",
        first,
    )
    report = await reconcile(pool, None, since=default_since())
    assert _checks(report) == {"account_balance"}
    assert report.counts["dailyDeductionsMillicredits"] == 7_000
    assert report.counts["mismatchedMillicredits"] == 13_300  # 1.9 x 7,000


async def test_reconcile_daily_deductions_are_an_average_day(
    pool: asyncpg.Pool, holds: HoldStore
) -> None:
    """Seven days of usage, one day 0.5% off: the day's difference against an average day's
    deductions (window / days), not against the whole window."""
    account = await new_account(pool)
    await grant(pool, account, 10_000_000, holds=holds)
    request_ids = [await _settle_in_postgres(pool, holds, account, 100_000) for _ in range(7)]
    today = datetime.now(UTC).date()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for days_ago, request_id in enumerate(request_ids):
            moved_to = datetime.now(UTC) - timedelta(days=days_ago)
            await conn.execute(
                "UPDATE usage_events SET recorded_at = $1 WHERE request_id = $2",
                moved_to,
                request_id,
            )
            await conn.execute(
                "UPDATE ledger_entries SET created_at = $1 WHERE idempotency_key = $2",
                moved_to,
                f"usage:{request_id}",
            )
        # One day's deduction 500 short (0.5% of the day): charged differs from deducted.
        await conn.execute(
            "UPDATE usage_events SET charged_millicredits = 100500 WHERE request_id = $1",
            request_ids[3],
        )
    report = await reconcile(pool, None, since=today - timedelta(days=6))
    assert report.counts["days"] == 7
    assert report.counts["deductedMillicredits"] == 700_000
    assert report.counts["dailyDeductionsMillicredits"] == 100_000
    assert report.counts["mismatchedMillicredits"] == 500
    # 0.5% of an average day: above the alert's 0.1%.
    ratio = report.counts["mismatchedMillicredits"] / report.counts["dailyDeductionsMillicredits"]
    assert ratio > 0.001


def test_check_since_accepts_2000_to_today_only() -> None:
    today = date(2026, 12, 3)
    assert check_since(today, today=today) == today
    assert check_since(date(2000, 1, 1), today=today) == date(2000, 1, 1)
    for refused in (date(2026, 12, 4), date(9999, 12, 31), date(1999, 12, 31)):
        with pytest.raises(ValueError, match="from 2000-01-01 to today"):
            check_since(refused, today=today)


async def test_reconcile_deleted_deduction_reports_day_and_request(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    first, _, request_id = await _world(pool, holds)
    async with pool.acquire() as conn, conn.transaction():
        # The append-only trigger refuses even the owner; a superuser can switch triggers off.
        await conn.execute("SET LOCAL session_replication_role = replica")
        deleted = await conn.execute(
            "DELETE FROM ledger_entries WHERE idempotency_key = $1", f"usage:{request_id}"
        )
    assert deleted == "DELETE 1"
    report = await reconcile(pool, None, since=default_since())
    assert _checks(report) == {"account_balance", "daily_deductions", "deduction_pairing"}
    today = datetime.now(UTC).date()
    [daily] = [m for m in report.mismatches if m.check == "daily_deductions"]
    assert daily.day == today
    assert (daily.expected_millicredits, daily.actual_millicredits) == (7_000, 5_766)
    assert report.counts["deductedMillicredits"] == 5_766
    # The balance's 1,234 (ledger sum vs balance) and the day's 1,234; not the pairing again.
    assert report.counts["mismatchedMillicredits"] == 2_468
    [pair] = [m for m in report.mismatches if m.check == "deduction_pairing"]
    assert (pair.request_id, pair.account_id, pair.day) == (request_id, first, today)
    assert (pair.expected_millicredits, pair.actual_millicredits) == (1_234, None)


async def test_reconcile_since_after_the_usage_checks_no_day(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    _, _, request_id = await _world(pool, holds)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "DELETE FROM ledger_entries WHERE idempotency_key = $1", f"usage:{request_id}"
        )
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    report = await reconcile(pool, redis_client, since=tomorrow)
    assert report.counts["days"] == 0
    assert _checks(report) == {"account_balance"}
    # Later than the default window's first day: partial, even with Redis checked.
    assert report.counts["redisChecked"] == 1
    assert report.counts["complete"] == 0
    assert not report.complete


async def test_reconcile_redis_balance_differing_at_same_version_reported(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    first, second, _ = await _world(pool, holds)
    await redis_client.hincrby(account_key(second), "bal", -10)
    # A Redis version behind Postgres is an update in flight, not a mismatch.
    await redis_client.hincrby(account_key(first), "ver", -1)
    await redis_client.hincrby(account_key(first), "bal", 999)
    report = await reconcile(pool, redis_client, since=default_since())
    assert _checks(report) == {"redis_balance"}
    [mismatch] = report.mismatches
    assert mismatch.account_id == second
    assert report.counts["mismatchedMillicredits"] == 10
    assert (mismatch.expected_millicredits, mismatch.actual_millicredits) == (15_000, 14_990)
    assert report.counts["redisBalancesStale"] == 1


async def test_reconcile_hold_past_its_deadline_reported(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    _, second, _ = await _world(pool, holds)
    report = ReconciliationReport(since=default_since(), started_at=datetime.now(UTC))
    an_hour_later_ms = int(time.time() * 1000) + 3_600_000
    await check_redis(pool, redis_client, report, now_ms=an_hour_later_ms)
    assert _checks(report) == {"expired_hold"}
    [mismatch] = report.mismatches
    assert (mismatch.account_id, mismatch.request_id) == (second, "open-hold")
    assert mismatch.actual_millicredits == 1_000


async def test_reconcile_usage_row_without_rate_snapshot_reported(
    pool: asyncpg.Pool, holds: HoldStore
) -> None:
    first, _, request_id = await _world(pool, holds)
    # The columns are NOT NULL today; the check guards against a future change losing them.
    await pool.execute(
        "ALTER TABLE usage_events ALTER COLUMN output_millicredits_per_1k_tokens DROP NOT NULL"
    )
    await pool.execute(
        "UPDATE usage_events SET output_millicredits_per_1k_tokens = NULL WHERE request_id = $1",
        request_id,
    )
    report = ReconciliationReport(since=default_since(), started_at=datetime.now(UTC))
    async with pool.acquire() as conn:
        await check_rate_snapshots(
            conn, report, recorded_before=datetime.now(UTC) + timedelta(minutes=1)
        )
    assert report.counts["usageRowsSampled"] == 3
    assert _checks(report) == {"rate_snapshot"}
    [mismatch] = report.mismatches
    assert (mismatch.account_id, mismatch.request_id) == (first, request_id)


async def test_daily_reconciliation_runs_once_a_day_and_records_it(
    pool: asyncpg.Pool, holds: HoldStore, redis_client: aioredis.Redis
) -> None:
    await _world(pool, holds)
    daily = DailyReconciliation(pool, redis_client)
    other_process = DailyReconciliation(pool, redis_client)
    report = await daily.run_once()
    assert report is not None and report.ok
    assert await other_process.run_once() is None
    assert daily.last_report is report and daily.runs == 1
    row = await pool.fetchrow("SELECT source, ok, counts, mismatch_counts FROM reconciliation_runs")
    assert (row["source"], row["ok"]) == ("scheduled", True)


async def test_daily_reconciliation_skips_while_another_process_holds_the_lock(
    pool: asyncpg.Pool, database_url: str
) -> None:
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", 0x7265636E)
        assert await DailyReconciliation(pool, None).run_once() is None
    finally:
        await other.close()
    assert await pool.fetchval("SELECT count(*) FROM reconciliation_runs") == 0
    assert await DailyReconciliation(pool, None).run_once() is not None


async def test_record_run_as_application_role(pool: asyncpg.Pool) -> None:
    report = await reconcile(pool, None, since=default_since())
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE creditgate_app")
        run_id = await record_run(conn, report, source="cli")
        assert await conn.fetchval("SELECT ok FROM reconciliation_runs WHERE id = $1", run_id)


async def test_daily_reconciliation_loop_runs_after_its_first_delay(pool: asyncpg.Pool) -> None:
    daily = DailyReconciliation(pool, None, first_check_s=0, check_interval_s=0.01)
    loop = asyncio.create_task(daily.run())
    try:
        for _ in range(500):
            if daily.runs:
                break
            await asyncio.sleep(0.01)
    finally:
        await cancel_and_wait(loop)
    assert daily.runs == 1  # later checks found today's run recorded
    assert await pool.fetchval("SELECT count(*) FROM reconciliation_runs") == 1
