"""Finance reports for one UTC month, over all accounts: the credit liability and the revenue,
upstream cost and gross margin by model. Exact integers inside, exact decimal strings out.

Liability (deferred revenue). Every credit sold and not yet used is owed to a customer; the
outstanding liability is the sum of all ledger entries (== the sum of account balances). The
month's movements are the classes of ``billing.statements`` (one SQL text,
``LEDGER_MOVEMENT_SUMS_SQL``, summed over all accounts instead of one):

    closing = opening + purchases + deductions + refunds + disputes + adjustments + reversals

to the millicredit: purchases are deferred revenue taken in, deductions the consumption
recognized as revenue (negative), refunds and disputes the reversals keyed by
``REFUND_KEY_PREFIX`` / ``DISPUTE_KEY_PREFIX`` (``billing.purchases.purchase_ledger``),
adjustments the operators' grants and the shortfall collections, reversals every other
reversal. USD at 1,000 credits = $1.00 (1,000,000 millicredits).

Revenue. A usage event belongs to the month its request started in (``started_at``, the
partition key): its deduction entry is posted in the same transaction (``post_settlements``)
and dated at that start (migration 0012), so the month's revenue equals minus its deductions
exactly, and a statement groups usage the same way.
Upstream cost is priced from the rate card the event references (``rate_card_id``):
``prompt_tokens * upstream_input + completion_tokens * upstream_output`` micro-USD per 1k
tokens, cached input at the input rate (the rate card has no upstream cached rate). Events
without a rate card cost 0 and are counted in ``requests_without_rate_card``. Amounts are
kept in nano-USD (token x micro-USD per 1k tokens), so every USD figure is exact.

Postgres unreachable: ``OSError``/``asyncpg`` errors propagate; nothing is written.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from billing.statements import (
    LEDGER_MOVEMENT_SUMS_SQL,
    LedgerMovements,
    ledger_movements,
    month_bounds,
)
from billing.units import MILLICREDITS_PER_USD, credits_text

NANOUSD_PER_USD = 1_000_000_000
NANOUSD_PER_MILLICREDIT = NANOUSD_PER_USD // MILLICREDITS_PER_USD
#: The model column of the revenue report's total row.
TOTAL_ROW_LABEL = "(total)"

_ALL_ACCOUNTS_SQL = (
    LEDGER_MOVEMENT_SUMS_SQL.format(
        balance="(SELECT COALESCE(sum(balance_millicredits), 0) FROM accounts)"
    )
    + """  FROM ledger_entries
 WHERE created_at >= $1
"""
)

# $1, $2: the month [start, end). Costs are summed as numeric: tokens x rate per event,
# summed over a month, may pass bigint's range.
_REVENUE_SQL = """
SELECT u.model,
       count(*),
       COALESCE(sum(u.prompt_tokens), 0),
       COALESCE(sum(u.cached_tokens), 0),
       COALESCE(sum(u.completion_tokens), 0),
       COALESCE(sum(u.charged_millicredits), 0),
       COALESCE(sum(u.prompt_tokens::numeric * r.upstream_input_microusd_per_1k_tokens
                    + u.completion_tokens::numeric * r.upstream_output_microusd_per_1k_tokens),
                0),
       count(*) FILTER (WHERE r.id IS NULL)
  FROM usage_events u
  LEFT JOIN rate_cards r ON r.id = u.rate_card_id
 WHERE u.started_at >= $1 AND u.started_at < $2
 GROUP BY u.model
 ORDER BY u.model
"""


def usd_text(amount_nanousd: int) -> str:
    """Nano-USD as an exact decimal string of US dollars with 9 decimals (1 -> "0.000000001")."""
    sign = "-" if amount_nanousd < 0 else ""
    whole, frac = divmod(abs(amount_nanousd), NANOUSD_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def millicredits_usd_text(amount_millicredits: int) -> str:
    """Millicredits at 1,000 credits = $1.00 as an exact USD string (6 significant decimals,
    printed with 9 like every USD figure of these reports)."""
    return usd_text(amount_millicredits * NANOUSD_PER_MILLICREDIT)


def month_label(month: date) -> str:
    """``"YYYY-MM"``."""
    return f"{month.year:04d}-{month.month:02d}"


@dataclass(frozen=True, slots=True)
class LiabilityReport:
    """The credit liability of all accounts over one month (signed millicredits)."""

    month: date
    movements: LedgerMovements

    def lines(self) -> list[tuple[str, int]]:
        """(line, signed millicredits) in reading order; opening plus the movements between
        the first and the last line equals the last (closing)."""
        m = self.movements
        return [
            ("opening_outstanding", m.opening_millicredits),
            ("purchases_deferred_revenue", m.purchases_millicredits),
            ("consumption_recognized", m.deductions_millicredits),
            ("refunds", m.refunds_millicredits),
            ("disputes", m.disputes_millicredits),
            ("adjustments", m.adjustments_millicredits),
            ("reversals_other", m.reversals_millicredits),
            ("closing_outstanding", m.closing_millicredits),
        ]


@dataclass(frozen=True, slots=True)
class ModelRevenue:
    """One model's month (or the total row).

    Attributes:
        input_tokens: prompt tokens, cached ones included (OpenAI's ``prompt_tokens``).
        revenue_millicredits: what its usage events charged (== minus their deductions).
        upstream_cost_nanousd: the upstream's price of the tokens, by the referenced rate card.
        requests_without_rate_card: events with no rate card (their upstream cost counts 0).
    """

    model: str
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    revenue_millicredits: int
    upstream_cost_nanousd: int
    requests_without_rate_card: int

    @property
    def revenue_nanousd(self) -> int:
        """Revenue in nano-USD (1 millicredit = 1,000 nano-USD)."""
        return self.revenue_millicredits * NANOUSD_PER_MILLICREDIT

    @property
    def gross_margin_nanousd(self) -> int:
        """Revenue minus upstream cost; negative when the model loses money."""
        return self.revenue_nanousd - self.upstream_cost_nanousd


@dataclass(frozen=True, slots=True)
class RevenueReport:
    """Revenue, upstream cost (COGS) and gross margin by model over one month."""

    month: date
    models: tuple[ModelRevenue, ...]

    @property
    def total(self) -> ModelRevenue:
        """The sum of every model's row, labelled ``TOTAL_ROW_LABEL``."""
        return ModelRevenue(
            TOTAL_ROW_LABEL,
            *(sum(getattr(row, name) for row in self.models) for name in _SUMMED_FIELDS),
        )


_SUMMED_FIELDS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "revenue_millicredits",
    "upstream_cost_nanousd",
    "requests_without_rate_card",
)


async def liability_report(pool: asyncpg.Pool, month: date) -> LiabilityReport:
    """The liability of all accounts for the UTC month of ``month``, in one snapshot."""
    start, end = month_bounds(month)
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        movements = await ledger_movements(conn, _ALL_ACCOUNTS_SQL, start, end)
    return LiabilityReport(start.date(), movements)


async def revenue_by_model(
    conn: asyncpg.Pool | asyncpg.Connection, start: datetime, end: datetime
) -> tuple[ModelRevenue, ...]:
    """Revenue, upstream cost and margin by model of the usage events started in
    ``[start, end)`` (by ``started_at``: the month partitions and its BRIN index, 0012, limit
    the read to the range's pages), ordered by model. The monthly report and the admin
    service's daily gauges (``billing.fleet_gauges``) both read it."""
    rows = await conn.fetch(_REVENUE_SQL, start, end)
    return tuple(ModelRevenue(row[0], *(int(value) for value in row[1:])) for row in rows)


async def revenue_report(pool: asyncpg.Pool, month: date) -> RevenueReport:
    """Revenue, upstream cost and margin by model for the UTC month of ``month``."""
    start, end = month_bounds(month)
    return RevenueReport(start.date(), await revenue_by_model(pool, start, end))


def liability_csv(report: LiabilityReport) -> str:
    """The report as CSV: ``month,line,millicredits,credits,usd`` (exact decimal strings)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "line", "millicredits", "credits", "usd"])
    label = month_label(report.month)
    for line, amount in report.lines():
        writer.writerow(
            [label, line, str(amount), credits_text(amount), millicredits_usd_text(amount)]
        )
    return out.getvalue()


def revenue_csv(report: RevenueReport) -> str:
    """The report as CSV, one row per model and a last total row (exact decimal strings;
    USD with 9 decimals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "month",
            "model",
            "requests",
            "input_tokens",
            "cached_input_tokens",
            "output_tokens",
            "revenue_millicredits",
            "revenue_usd",
            "upstream_cost_usd",
            "gross_margin_usd",
            "requests_without_rate_card",
        ]
    )
    label = month_label(report.month)
    for row in (*report.models, report.total):
        writer.writerow(
            [
                label,
                row.model,
                row.requests,
                row.input_tokens,
                row.cached_input_tokens,
                row.output_tokens,
                row.revenue_millicredits,
                usd_text(row.revenue_nanousd),
                usd_text(row.upstream_cost_nanousd),
                usd_text(row.gross_margin_nanousd),
                row.requests_without_rate_card,
            ]
        )
    return out.getvalue()
