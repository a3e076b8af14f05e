"""Exact monthly totals (migration 0013): ``account_month_ledger`` and ``account_month_usage``
equal the sums of the rows they total after every kind of posting, replays add nothing, a
late settlement counts in its own month, statements read them and match the raw rows (also
after a month is detached), and reconciliation reports a corrupted total."""

from __future__ import annotations

from datetime import UTC, date, datetime

import asyncpg

from billing import ledger, partitions, reconciliation, statements
from billing.ledger import PostingRule
from billing.metering import outbox, posting
from billing.partitions import add_months, month_start
from billing.purchases.purchase_ledger import DISPUTE_KEY_PREFIX, REFUND_KEY_PREFIX
from tests.billing.money import grant, new_account, usage_record

# The statement as it was computed before the totals: straight from the rows.
_RAW_LEDGER_SQL = (
    statements.LEDGER_MOVEMENT_SUMS_SQL.format(
        balance="(SELECT balance_millicredits FROM accounts WHERE id = $5)"
    )
    + " FROM ledger_entries WHERE account_id = $5 AND created_at >= $1"
)
_RAW_USAGE_SQL = """
SELECT model, count(*), sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens),
       sum(charged_millicredits)
  FROM usage_events WHERE account_id = $1 AND started_at >= $2 AND started_at < $3
 GROUP BY model ORDER BY model
"""
_LEDGER_ROW_SUMS = """
SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date, entry_type,
       CASE WHEN entry_type = 'reversal' AND strpos(idempotency_key, ':') > 0
            THEN split_part(idempotency_key, ':', 1) || ':' ELSE '' END,
       sum(amount_millicredits), count(*)
  FROM ledger_entries WHERE account_id = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
_LEDGER_TOTALS = """
SELECT month, entry_type, key_prefix, amount_millicredits, entries
  FROM account_month_ledger WHERE account_id = $1 AND entries <> 0 ORDER BY 1, 2, 3
"""
_USAGE_ROW_SUMS = """
SELECT date_trunc('month', started_at AT TIME ZONE 'UTC')::date, model, count(*),
       sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), sum(charged_millicredits)
  FROM usage_events WHERE account_id = $1 GROUP BY 1, 2 ORDER BY 1, 2
"""
_USAGE_TOTALS = """
SELECT month, model, requests, prompt_tokens, cached_tokens, completion_tokens,
       charged_millicredits
  FROM account_month_usage WHERE account_id = $1 AND requests <> 0 ORDER BY 1, 2
"""


def _ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)


def _batch(account_id: int, request_ids: list[str], started: date, cost: int) -> str:
    rows = []
    for request_id in request_ids:
        record = usage_record(request_id=request_id, account_id=account_id, cost_millicredits=cost)
        record = record._replace(started_at_ms=_ms(started), finished_at_ms=_ms(started) + 250)
        rows.append(outbox.posting_row(record.to_json(), charged_millicredits=cost))
    return "[" + ",".join(rows) + "]"


async def _entry(pool: asyncpg.Pool, account_id: int, entry_type: str, amount: int, key: str):
    async with pool.acquire() as conn:
        return await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type=entry_type,
            amount_millicredits=amount,
            idempotency_key=key,
            rule=PostingRule.OWE if amount < 0 else PostingRule.WHOLE,
        )


async def _totals_match_rows(pool: asyncpg.Pool, account_id: int) -> None:
    async with pool.acquire() as conn:
        assert [tuple(r) for r in await conn.fetch(_LEDGER_TOTALS, account_id)] == [
            tuple(r) for r in await conn.fetch(_LEDGER_ROW_SUMS, account_id)
        ]
        assert [tuple(r) for r in await conn.fetch(_USAGE_TOTALS, account_id)] == [
            tuple(r) for r in await conn.fetch(_USAGE_ROW_SUMS, account_id)
        ]


async def _raw_statement(
    pool: asyncpg.Pool, account_id: int, month: date
) -> tuple[statements.LedgerMovements, list[tuple[object, ...]]]:
    start, end = statements.month_bounds(month)
    async with pool.acquire() as conn:
        movements = await statements.ledger_movements(conn, _RAW_LEDGER_SQL, start, end, account_id)
        usage = [tuple(r) for r in await conn.fetch(_RAW_USAGE_SQL, account_id, start, end)]
    return movements, usage


async def _assert_statement_is_raw(pool: asyncpg.Pool, account_id: int, month: date) -> None:
    statement = await statements.monthly_statement(pool, account_id, month)
    movements, usage = await _raw_statement(pool, account_id, month)
    assert (
        statement.opening_balance_millicredits,
        statement.purchases_millicredits,
        statement.deductions_millicredits,
        statement.refunds_millicredits,
        statement.disputes_millicredits,
        statement.adjustments_millicredits,
        statement.reversals_millicredits,
        statement.closing_balance_millicredits,
    ) == (
        movements.opening_millicredits,
        movements.purchases_millicredits,
        movements.deductions_millicredits,
        movements.refunds_millicredits,
        movements.disputes_millicredits,
        movements.adjustments_millicredits,
        movements.reversals_millicredits,
        movements.closing_millicredits,
    )
    assert [
        (
            u.model,
            u.requests,
            u.input_tokens,
            u.cached_input_tokens,
            u.output_tokens,
            u.charged_millicredits,
        )
        for u in statement.usage
    ] == usage


async def _busy_account(pool: asyncpg.Pool) -> tuple[int, date, date]:
    """An account with every kind of entry this month, settlements this month and a late one
    dated last month; returns (account, this month, last month)."""
    this_month = month_start(datetime.now(UTC).date())
    last_month = add_months(this_month, -1)
    account = await new_account(pool)
    await grant(pool, account, 1_000_000)
    purchase = await _entry(pool, account, "purchase", 500_000, "purchase:cs_1")
    await _entry(pool, account, "refund", -20_000, "refund-entry:1")
    async with pool.acquire() as conn:
        for key, amount in (
            (f"{REFUND_KEY_PREFIX}re_1", -30_000),
            (f"{DISPUTE_KEY_PREFIX}dp_1", -40_000),
            ("fix:1", -50),
        ):
            await ledger.post_entry(
                conn,
                account_id=account,
                entry_type="reversal",
                amount_millicredits=amount,
                idempotency_key=key,
                reverses_entry_id=purchase.entry.id,
                rule=PostingRule.OWE,
            )
        await posting.post_settlements(
            conn, _batch(account, ["req-a", "req-b"], datetime.now(UTC).date(), 700)
        )
        # A late settlement: started last month, posted now.
        await posting.post_settlements(conn, _batch(account, ["req-late"], last_month, 333))
    return account, this_month, last_month


async def test_totals_equal_the_row_sums_and_replays_add_nothing(pool: asyncpg.Pool) -> None:
    account, this_month, last_month = await _busy_account(pool)
    await _totals_match_rows(pool, account)
    before = await pool.fetch(
        "SELECT * FROM account_month_usage WHERE account_id = $1 ORDER BY month, model", account
    )
    ledger_before = await pool.fetch(
        "SELECT * FROM account_month_ledger WHERE account_id = $1 ORDER BY 2, 3, 4", account
    )
    async with pool.acquire() as conn:  # replays: the outbox's repeat, a repeated key
        replay = await posting.post_settlements(
            conn, _batch(account, ["req-a", "req-b"], datetime.now(UTC).date(), 700)
        )
        replay += await posting.post_settlements(
            conn, _batch(account, ["req-late"], last_month, 333)
        )
        assert [p.posted for p in replay] == [0, 0]
    await _entry(pool, account, "purchase", 500_000, "purchase:cs_1")
    assert (
        await pool.fetch(
            "SELECT * FROM account_month_usage WHERE account_id = $1 ORDER BY month, model",
            account,
        )
        == before
    )
    assert (
        await pool.fetch(
            "SELECT * FROM account_month_ledger WHERE account_id = $1 ORDER BY 2, 3, 4", account
        )
        == ledger_before
    )
    late = await pool.fetchrow(
        "SELECT requests, charged_millicredits FROM account_month_usage"
        " WHERE account_id = $1 AND month = $2",
        account,
        last_month,
    )
    assert tuple(late) == (1, 333)
    by_line = {
        (r["entry_type"], r["key_prefix"]): r["amount_millicredits"]
        for r in ledger_before
        if r["month"] == this_month
    }
    assert by_line[("reversal", REFUND_KEY_PREFIX)] == -30_000
    assert by_line[("reversal", DISPUTE_KEY_PREFIX)] == -40_000
    assert by_line[("reversal", "fix:")] == -50
    assert by_line[("deduction", "")] == -1_400


async def test_statements_equal_the_raw_rows_before_and_after_detach(pool: asyncpg.Pool) -> None:
    account, this_month, last_month = await _busy_account(pool)
    old = add_months(this_month, -14)
    await partitions.create_ahead(pool, months_ahead=0, today=old)
    async with pool.acquire() as conn:
        await posting.post_settlements(conn, _batch(account, ["req-old"], old, 900))
    for month in (old, last_month, this_month, add_months(this_month, 1)):
        await _assert_statement_is_raw(pool, account, month)
    async with pool.acquire() as conn:
        await partitions.detach_before(conn, add_months(old, 1))
    for month in (last_month, this_month):
        await _assert_statement_is_raw(pool, account, month)
    report = await reconciliation.reconcile(pool, None, since=old)
    assert report.mismatch_counts["month_totals"] == 0  # the detached month is not compared


async def test_reconciliation_reports_a_corrupted_month_total(pool: asyncpg.Pool) -> None:
    account, this_month, _ = await _busy_account(pool)
    since = datetime.now(UTC).date()
    clean = await reconciliation.reconcile(pool, None, since=since)
    assert clean.mismatch_counts["month_totals"] == 0
    await pool.execute(
        "UPDATE account_month_ledger SET amount_millicredits = amount_millicredits - 1"
        " WHERE account_id = $1 AND month = $2 AND entry_type = 'purchase'",
        account,
        this_month,
    )
    await pool.execute(
        "UPDATE account_month_usage SET prompt_tokens = prompt_tokens + 1"
        " WHERE account_id = $1 AND month = $2",
        account,
        this_month,
    )
    report = await reconciliation.reconcile(pool, None, since=since)
    assert report.mismatch_counts["month_totals"] == 2
    found = {
        (m.account_id, m.day, m.expected_millicredits - (m.actual_millicredits or 0))
        for m in report.mismatches
        if m.check == "month_totals" and m.expected_millicredits is not None
    }
    assert found == {(account, this_month, 1), (account, this_month, 0)}
    assert not report.ok
