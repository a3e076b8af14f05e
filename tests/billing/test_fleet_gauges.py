"""The fleet readings (billing/fleet_gauges.py) over a month of books: one UTC day's revenue,
upstream cost and margin per model tie out with the finance report's arithmetic; the refresh
loop of the admin service keeps the gauges current."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from admin_api.app import create_admin_app
from admin_api.money_metrics import FLEET_GAUGES
from billing import finance
from billing.fleet_gauges import OTHER_MODEL, read_fleet
from billing.reconciliation import ReconciliationReport, record_run
from runtime import appkeys
from tests.admin_api.conftest import admin_settings
from tests.billing.finance_books import AFTER, BEFORE, START, post_month_of_books
from tests.billing.money import grant, new_account


async def test_read_fleet_one_day_by_model_with_other(pool: asyncpg.Pool) -> None:
    await post_month_of_books(pool)

    reading = await read_fleet(pool, now=START + timedelta(hours=5))

    assert reading.day == START.date()
    by_model = {row.model: row for row in reading.models}
    # fin-x has no rate card: summed under "other"; the usage before and after the day is out.
    assert list(by_model) == ["fin-a", "fin-b", OTHER_MODEL]
    a, b, other = by_model["fin-a"], by_model["fin-b"], by_model[OTHER_MODEL]
    assert (a.requests, a.revenue_millicredits) == (2, 3_457)
    assert a.upstream_cost_nanousd == 1_333 * 150 + 577 * 600
    assert a.gross_margin_nanousd == 3_457_000 - 546_150
    assert b.gross_margin_nanousd == 20_000_000 - 15_000_000
    assert (other.requests, other.revenue_millicredits, other.upstream_cost_nanousd) == (1, 5, 0)
    # The day is the whole month's usage here: the same numbers as the monthly report.
    month = await finance.revenue_report(pool, START.date())
    assert sum(r.revenue_millicredits for r in reading.models) == month.total.revenue_millicredits
    assert sum(r.gross_margin_nanousd for r in reading.models) == (month.total.gross_margin_nanousd)
    balances = await pool.fetchval("SELECT sum(balance_millicredits) FROM accounts")
    ledger_sum = await pool.fetchval("SELECT sum(amount_millicredits) FROM ledger_entries")
    assert reading.outstanding_millicredits == balances == ledger_sum
    assert reading.accounts_in_shortfall == 0
    assert reading.reconciliation is None
    for day in (BEFORE, AFTER):
        other_day = await read_fleet(pool, now=day)
        assert other_day.models and all(r.requests == 1 for r in other_day.models)


async def test_refresh_loop_keeps_the_gauges_current(
    database_url: str, redis_url: str, aiohttp_client: Any
) -> None:
    settings = admin_settings(database_url, redis_url, metrics_db_refresh_s=0.05)
    client = await aiohttp_client(create_admin_app(settings))
    gauges = client.app[FLEET_GAUGES]
    pool = client.app[appkeys.DB_POOL]
    account = await new_account(pool)
    await grant(pool, account, 12_345)

    for _ in range(1000):  # the loop's next rounds see the grant (no timing asserted)
        reading = gauges.reading
        if reading is not None and reading.outstanding_millicredits == 12_345:
            break
        await asyncio.sleep(0.01)
    assert gauges.reading is not None
    assert gauges.reading.outstanding_millicredits == 12_345


async def _run(
    pool: asyncpg.Pool,
    started_at: datetime,
    *,
    complete: bool,
    account_balance_mismatches: int = 0,
    mismatched_millicredits: int = 0,
) -> datetime:
    """Record a run (as ``record_run`` does for a real one); returns its finish."""
    report = ReconciliationReport(
        since=started_at.date(),
        started_at=started_at,
        finished_at=started_at + timedelta(seconds=5),
        counts={
            "complete": int(complete),
            "mismatchedMillicredits": mismatched_millicredits,
            "dailyDeductionsMillicredits": 7_000,
        },
    )
    report.mismatch_counts["account_balance"] = account_balance_mismatches
    await record_run(pool, report, source="cli")
    assert report.finished_at is not None
    return report.finished_at


async def test_a_partial_clean_run_never_hides_a_mismatch_nor_counts_as_success(
    pool: asyncpg.Pool,
) -> None:
    """The reviewer's repro: `reconcile --since <future>` (or without Redis) after a mismatch
    left the mismatch gauges at zero and moved the last success to now."""
    t0 = datetime(2026, 11, 1, 3, tzinfo=UTC)
    await _run(pool, t0, complete=True, account_balance_mismatches=1, mismatched_millicredits=9)
    await _run(pool, t0 + timedelta(hours=1), complete=False)  # partial, clean

    reading = (await read_fleet(pool)).reconciliation
    assert reading is not None and reading.shown is not None
    assert reading.shown.mismatch_counts["account_balance"] == 1
    assert reading.shown.mismatched_millicredits == 9
    assert reading.shown.daily_deductions_millicredits == 7_000
    assert reading.last_success_at is None
    assert reading.runs_by_outcome == {"ok": 1, "mismatch": 1}

    # A complete clean run clears it and is the last success.
    success = await _run(pool, t0 + timedelta(hours=2), complete=True)
    reading = (await read_fleet(pool)).reconciliation
    assert reading is not None and reading.shown is not None
    assert (reading.shown.ok, reading.shown.mismatched_millicredits) == (True, 0)
    assert reading.last_success_at == success

    # A newer partial run that found a mismatch wins over the complete clean one.
    await _run(
        pool,
        t0 + timedelta(hours=3),
        complete=False,
        account_balance_mismatches=2,
        mismatched_millicredits=40,
    )
    reading = (await read_fleet(pool)).reconciliation
    assert reading is not None and reading.shown is not None
    assert reading.shown.mismatch_counts["account_balance"] == 2
    assert reading.shown.mismatched_millicredits == 40
    assert reading.last_success_at == success


async def test_only_partial_clean_runs_show_no_run_and_no_success(pool: asyncpg.Pool) -> None:
    await _run(pool, datetime(2026, 11, 1, 3, tzinfo=UTC), complete=False)

    reading = (await read_fleet(pool)).reconciliation

    assert reading is not None
    assert reading.shown is None
    assert reading.last_success_at is None
    assert reading.runs_by_outcome == {"ok": 1, "mismatch": 0}
