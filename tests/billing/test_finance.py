"""Finance reports over real Postgres (the books: ``tests.billing.finance_books``). Every
figure is checked against numbers worked out by hand and against the ledger itself."""

from __future__ import annotations

import csv
import io

import asyncpg
import pytest

from billing import finance
from tests.billing.finance_books import MONTH, post_month_of_books


async def test_liability_report_month_ties_out_with_the_ledger(pool: asyncpg.Pool) -> None:
    await post_month_of_books(pool)

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


def test_liability_csv_prints_exact_decimals() -> None:
    movements = finance.LedgerMovements(1_234_567, 1, -2, 0, 0, 0, 0, 1_234_566)

    text = finance.liability_csv(finance.LiabilityReport(MONTH, movements))

    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["month", "line", "millicredits", "credits", "usd"]
    assert rows[1] == ["2026-05", "opening_outstanding", "1234567", "1234.567", "1.234567000"]
    assert rows[3] == ["2026-05", "consumption_recognized", "-2", "-0.002", "-0.000002000"]


async def test_revenue_report_month_by_model_ties_out_with_deductions(pool: asyncpg.Pool) -> None:
    await post_month_of_books(pool)

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
