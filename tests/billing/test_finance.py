"""Finance reports over real Postgres: a month with an opening balance, purchases, usage on two
models, a refund, a dispute and an adjustment, plus usage before and after the month that
must stay out of it. Every figure is checked against numbers worked out by hand and against
the ledger itself."""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg
import pytest

from billing import finance, ledger
from billing.metering.outbox import posting_row
from billing.metering.posting import post_settlements
from billing.statements import month_bounds
from tests.billing.money import usage_record

MONTH = date(2026, 5, 1)
START, END = month_bounds(MONTH)
BEFORE = START - timedelta(days=3)
AFTER = END + timedelta(hours=1)


@dataclass
class Books:
    """What the test posted: account ids and the rate cards' ids by model."""

    accounts: tuple[int, int]
    rate_cards: dict[str, int]


async def _post(
    conn: asyncpg.Connection,
    account_id: int,
    entry_type: str,
    amount: int,
    key: str,
    reverses: int | None = None,
) -> int:
    result = await ledger.post_entry(
        conn,
        account_id=account_id,
        entry_type=entry_type,
        amount_millicredits=amount,
        idempotency_key=key,
        reverses_entry_id=reverses,
    )
    return result.entry.id


async def _use(
    conn: asyncpg.Connection,
    account_id: int,
    request_id: str,
    model: str,
    rate_card_id: int | None,
    tokens: tuple[int, int, int],
    cost: int,
) -> None:
    prompt, cached, completion = tokens
    record = usage_record(request_id=request_id, account_id=account_id, cost_millicredits=cost)
    record = record._replace(
        model=model,
        rate_card_id=rate_card_id,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
    )
    await post_settlements(
        conn, "[" + posting_row(record.to_json(), charged_millicredits=cost) + "]"
    )


async def _move(conn: asyncpg.Connection, when: datetime, keys: list[str]) -> None:
    """Date entries (and their usage events) to ``when``: as a superuser with triggers off,
    since the ledger is append-only and every entry is dated ``now()``."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE ledger_entries SET created_at = $1 WHERE idempotency_key = ANY($2)", when, keys
        )
        await conn.execute(
            "UPDATE usage_events SET recorded_at = $1 WHERE 'usage:' || request_id = ANY($2)",
            when,
            keys,
        )


async def _books(pool: asyncpg.Pool) -> Books:
    tag = uuid.uuid4().hex[:8]
    async with pool.acquire() as conn:
        cards = {}
        for model, upstream_in, upstream_out in (("fin-a", 150, 600), ("fin-b", 2_500, 10_000)):
            cards[model] = await conn.fetchval(
                """INSERT INTO rate_cards (model, model_kind, input_millicredits_per_1k_tokens,
                       output_millicredits_per_1k_tokens, max_output_tokens,
                       upstream_input_microusd_per_1k_tokens,
                       upstream_output_microusd_per_1k_tokens, effective_at)
                   VALUES ($1, 'chat', 1000, 4000, 4096, $2, $3, $4) RETURNING id""",
                model,
                upstream_in,
                upstream_out,
                BEFORE,
            )
        first = await ledger.create_account(conn, f"a-{tag}@example.com")
        second = await ledger.create_account(conn, f"b-{tag}@example.com")
        # Before the month: a grant, and a request on fin-a (its charge is in the opening).
        await _post(conn, first, "adjustment", 5_000_000, f"grant:{tag}:old")
        await _use(conn, first, f"{tag}-old", "fin-a", cards["fin-a"], (999, 0, 999), 700)
        await _move(conn, BEFORE, [f"grant:{tag}:old", f"usage:{tag}-old"])
        # The month.
        bought = await _post(conn, first, "purchase", 10_000_000, f"purchase:cs_{tag}")
        await _post(conn, second, "purchase", 2_000_000, f"purchase:cs_{tag}_2")
        await _use(conn, first, f"{tag}-a1", "fin-a", cards["fin-a"], (1_000, 200, 500), 3_000)
        await _use(conn, first, f"{tag}-a2", "fin-a", cards["fin-a"], (333, 0, 77), 457)
        await _use(
            conn, second, f"{tag}-b1", "fin-b", cards["fin-b"], (2_000, 1_000, 1_000), 20_000
        )
        await _use(conn, second, f"{tag}-x", "fin-x", None, (10, 0, 10), 5)
        await _post(conn, first, "reversal", -2_500_000, f"refund:re_{tag}", bought)
        await _post(conn, first, "reversal", -1_000_000, f"dispute:dp_{tag}:opened", bought)
        await _post(conn, first, "adjustment", 123, f"grant:{tag}:goodwill")
        in_month = [
            f"purchase:cs_{tag}",
            f"purchase:cs_{tag}_2",
            f"usage:{tag}-a1",
            f"usage:{tag}-a2",
            f"usage:{tag}-b1",
            f"usage:{tag}-x",
            f"refund:re_{tag}",
            f"dispute:dp_{tag}:opened",
            f"grant:{tag}:goodwill",
        ]
        await _move(conn, START + timedelta(days=10), in_month)
        # After the month: a request on fin-b and a grant, in neither report.
        await _use(conn, second, f"{tag}-late", "fin-b", cards["fin-b"], (5, 0, 5), 999)
        await _post(conn, first, "adjustment", 77, f"grant:{tag}:late")
        await _move(conn, AFTER, [f"usage:{tag}-late", f"grant:{tag}:late"])
    return Books((first, second), cards)


async def test_liability_report_month_ties_out_with_the_ledger(pool: asyncpg.Pool) -> None:
    await _books(pool)

    report = await finance.liability_report(pool, MONTH)

    assert report.lines() == [
        ("opening_outstanding", 5_000_000 - 700),
        ("purchases_deferred_revenue", 12_000_000),
        ("consumption_recognized", -(3_000 + 457 + 20_000 + 5)),
        ("refunds", -2_500_000),
        ("disputes", -1_000_000),
        ("adjustments", 123),
        ("reversals_other", 0),
        ("closing_outstanding", 5_000_000 - 700 + 12_000_000 - 23_462 - 3_500_000 + 123),
    ]
    opening, *movements, closing = (amount for _, amount in report.lines())
    assert opening + sum(movements) == closing
    # The books of record: the closing plus what came after is every balance.
    balances = await pool.fetchval("SELECT sum(balance_millicredits) FROM accounts")
    assert closing + 77 - 999 == balances


async def test_liability_csv_prints_exact_decimals() -> None:
    movements = finance.LedgerMovements(1_234_567, 1, -2, 0, 0, 0, 0, 1_234_566)

    text = finance.liability_csv(finance.LiabilityReport(MONTH, movements))

    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["month", "line", "millicredits", "credits", "usd"]
    assert rows[1] == ["2026-05", "opening_outstanding", "1234567", "1234.567", "1.234567000"]
    assert rows[3] == ["2026-05", "consumption_recognized", "-2", "-0.002", "-0.000002000"]


async def test_revenue_report_month_by_model_ties_out_with_deductions(pool: asyncpg.Pool) -> None:
    await _books(pool)

    report = await finance.revenue_report(pool, MONTH)
    liability = await finance.liability_report(pool, MONTH)

    by_model = {row.model: row for row in report.models}
    assert list(by_model) == ["fin-a", "fin-b", "fin-x"]
    a, b, x = by_model["fin-a"], by_model["fin-b"], by_model["fin-x"]
    assert (a.requests, a.input_tokens, a.cached_input_tokens, a.output_tokens) == (
        2,
        1_333,
        200,
        577,
    )
    assert a.revenue_millicredits == 3_457
    # 1,333 x 150 + 577 x 600 nano-USD: cached input at the input rate.
    assert a.upstream_cost_nanousd == 1_333 * 150 + 577 * 600 == 546_150
    assert a.gross_margin_nanousd == 3_457_000 - 546_150
    assert b.upstream_cost_nanousd == 2_000 * 2_500 + 1_000 * 10_000
    assert b.gross_margin_nanousd == 20_000_000 - 15_000_000
    assert (x.requests_without_rate_card, x.upstream_cost_nanousd) == (1, 0)
    total = report.total
    assert total.model == finance.TOTAL_ROW_LABEL
    assert total.requests == 4
    assert total.revenue_millicredits == -liability.movements.deductions_millicredits == 23_462

    rows = list(csv.DictReader(io.StringIO(finance.revenue_csv(report))))
    assert [row["model"] for row in rows] == ["fin-a", "fin-b", "fin-x", "(total)"]
    assert rows[0]["revenue_usd"] == "0.003457000"
    assert rows[0]["upstream_cost_usd"] == "0.000546150"
    assert rows[0]["gross_margin_usd"] == "0.002910850"
    assert rows[3]["revenue_millicredits"] == "23462"
    assert rows[3]["gross_margin_usd"] == finance.usd_text(23_462_000 - 546_150 - 15_000_000)


@pytest.mark.parametrize(
    ("nanousd", "text"), [(0, "0.000000000"), (-1, "-0.000000001"), (1_500_000_000, "1.500000000")]
)
def test_usd_text_exact(nanousd: int, text: str) -> None:
    assert finance.usd_text(nanousd) == text
