"""Monthly statements: an account's balance movements and usage over one UTC month.

Every total comes from the exact per-account monthly totals of the ledger of record
(``account_month_ledger``) and of the usage events (``account_month_usage``, by model),
which the tables' triggers keep in the posting's own transaction (migration 0013), read
in one snapshot, as exact integer millicredits: a few rows a month however many requests:

    closing = opening + purchases + deductions + refunds + disputes + adjustments + reversals

holds exactly, because each term is a sum over the same entries split by type and time
(closing: the posted balance less the entries after the month; opening: less the entries
from its start). Deductions, refunds
and disputes are mostly negative. A customer refund or a dispute of a purchase is posted as a
``reversal`` (``billing.purchases.purchase_ledger``); its idempotency key says which
(``REFUND_KEY_PREFIX``, ``DISPUTE_KEY_PREFIX``), so:

    refunds   = refund entries + refund reversals (a failed refund's reinstatement, > 0, too)
    disputes  = dispute reversals (a won dispute's return, > 0, too)
    reversals = every other reversal (an operator's correction of an earlier entry)
 The per-model usage totals are what the usage events recorded
(requests started in the month); they explain the deductions but need not equal them to the
millicredit (a request started on the last evening of a month is posted the next).

Postgres unreachable: ``OSError``/``asyncpg`` errors propagate (the route answers 503).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

import asyncpg

from billing.errors import AccountNotFoundError
from billing.purchases.purchase_ledger import DISPUTE_KEY_PREFIX, REFUND_KEY_PREFIX

#: The years the billing API takes in dates and statement months: the end of any month in
#: them (``month_bounds``) is a date Python can hold (its last year is 9999).
FIRST_YEAR = 1900
LAST_YEAR = 9000

_MONTH = re.compile(r"[0-9]{4}-[0-9]{2}")  # ASCII digits only (``\d`` takes "２" too)


def parse_month(text: str) -> date:
    """``"YYYY-MM"`` -> the month's first day.

    Raises:
        ValueError: another shape, month outside 01-12, year outside ``FIRST_YEAR`` to
            ``LAST_YEAR``.
    """
    if not _MONTH.fullmatch(text):
        raise ValueError(f"not a month (YYYY-MM): {text!r}")
    year, month = int(text[:4]), int(text[5:])
    if not FIRST_YEAR <= year <= LAST_YEAR or not 1 <= month <= 12:
        raise ValueError(f"not a month (YYYY-MM): {text!r}")
    return date(year, month, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """The UTC instants ``[start, end)`` of the month that ``month`` falls in."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    if month.month == 12:
        return start, datetime(month.year + 1, 1, 1, tzinfo=UTC)
    return start, datetime(month.year, month.month + 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """One model's usage in the month (requests started in it).

    Attributes:
        input_tokens: prompt tokens, cached ones included (OpenAI's ``prompt_tokens``).
        cached_input_tokens: the cached part of ``input_tokens``.
        charged_millicredits: what was collected for them.
    """

    model: str
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    charged_millicredits: int


@dataclass(frozen=True, slots=True)
class Statement:
    """One account's month. Signed millicredits: credits in > 0, taken < 0."""

    account_id: int
    email: str
    month: date
    period_start: datetime
    period_end: datetime
    opening_balance_millicredits: int
    purchases_millicredits: int
    deductions_millicredits: int
    refunds_millicredits: int
    disputes_millicredits: int
    adjustments_millicredits: int
    reversals_millicredits: int
    closing_balance_millicredits: int
    usage: tuple[ModelUsage, ...]

    @property
    def label(self) -> str:
        """``"YYYY-MM"``."""
        return f"{self.month.year:04d}-{self.month.month:02d}"

    def summary_lines(self) -> list[tuple[str, int]]:
        """The summary as people read it, in order: (label, signed millicredits); the CSV
        and PDF statements both print these."""
        return [
            ("Opening balance", self.opening_balance_millicredits),
            ("Purchases", self.purchases_millicredits),
            ("Usage deductions", self.deductions_millicredits),
            ("Refunds", self.refunds_millicredits),
            ("Disputes", self.disputes_millicredits),
            ("Adjustments", self.adjustments_millicredits),
            ("Reversals", self.reversals_millicredits),
            ("Closing balance", self.closing_balance_millicredits),
        ]

    @property
    def movements_millicredits(self) -> int:
        """The month's net movement: closing - opening."""
        return (
            self.purchases_millicredits
            + self.deductions_millicredits
            + self.refunds_millicredits
            + self.disputes_millicredits
            + self.adjustments_millicredits
            + self.reversals_millicredits
        )


# The sums of one pass over the ledger entries from the month's start on: $1 is the month's
# start, $2 and $3 the refund and dispute key prefixes, $4 the month's end. Opening and
# closing are counted back from the posted balance ({balance}, read in the same snapshot;
# the balance is the sum of every entry, reconciliation's first check), so the pass reads no
# month before this one: it stays short for a recent month however long the history, and
# right after old months were detached for archiving (billing.partitions). Each entry of the
# month is in exactly one movement sum. ``billing.finance`` (all accounts) adds the balance
# and the FROM/WHERE; one account's statement reads the same sums from its monthly totals
# (``_LEDGER_MONTH_TOTALS_SQL``).
LEDGER_MOVEMENT_SUMS_SQL = """
SELECT {balance} - COALESCE(sum(amount_millicredits), 0),
       COALESCE(sum(amount_millicredits) FILTER (WHERE created_at < $4
                                                   AND entry_type = 'purchase'), 0),
       COALESCE(sum(amount_millicredits) FILTER (WHERE created_at < $4
                                                   AND entry_type = 'deduction'), 0),
       COALESCE(sum(amount_millicredits) FILTER (
           WHERE created_at < $4
             AND (entry_type = 'refund'
                  OR (entry_type = 'reversal' AND starts_with(idempotency_key, $2)))), 0),
       COALESCE(sum(amount_millicredits) FILTER (
           WHERE created_at < $4
             AND entry_type = 'reversal' AND starts_with(idempotency_key, $3)), 0),
       COALESCE(sum(amount_millicredits) FILTER (WHERE created_at < $4
                                                   AND entry_type = 'adjustment'), 0),
       COALESCE(sum(amount_millicredits) FILTER (
           WHERE created_at < $4
             AND entry_type = 'reversal' AND NOT starts_with(idempotency_key, $2)
             AND NOT starts_with(idempotency_key, $3)), 0),
       {balance} - COALESCE(sum(amount_millicredits) FILTER (WHERE created_at >= $4), 0)
"""


@dataclass(frozen=True, slots=True)
class LedgerMovements:
    """One month's ledger totals, signed millicredits (credits in > 0, taken < 0):
    ``closing == opening + purchases + deductions + refunds + disputes + adjustments +
    reversals`` exactly (see the module docstring for the classes)."""

    opening_millicredits: int
    purchases_millicredits: int
    deductions_millicredits: int
    refunds_millicredits: int
    disputes_millicredits: int
    adjustments_millicredits: int
    reversals_millicredits: int
    closing_millicredits: int


async def ledger_movements(
    conn: asyncpg.Connection, sql: str, start: datetime, end: datetime, *args: object
) -> LedgerMovements:
    """Run ``sql`` (``LEDGER_MOVEMENT_SUMS_SQL`` plus its FROM/WHERE; ``args`` are its
    parameters from $5 on) for the month ``[start, end)``."""
    row = await conn.fetchrow(sql, start, REFUND_KEY_PREFIX, DISPUTE_KEY_PREFIX, end, *args)
    assert row is not None  # an aggregate without GROUP BY answers one row
    return LedgerMovements(*(int(value) for value in row))


# The same sums from the monthly totals (account_month_ledger, migration 0013; kept by the
# ledger's triggers in the posting's transaction): a few rows per month, however many
# entries. $1 the month's first day, $2 and $3 the refund and dispute key prefixes, $4 the
# account. Opening and closing are counted back from the posted balance, as above, so the
# months before this one (maybe detached) are never read.
_LEDGER_MONTH_TOTALS_SQL = """
SELECT b.balance - COALESCE(sum(t.amount_millicredits), 0),
       COALESCE(sum(t.amount_millicredits) FILTER (WHERE t.month = $1
                                                     AND t.entry_type = 'purchase'), 0),
       COALESCE(sum(t.amount_millicredits) FILTER (WHERE t.month = $1
                                                     AND t.entry_type = 'deduction'), 0),
       COALESCE(sum(t.amount_millicredits) FILTER (
           WHERE t.month = $1
             AND (t.entry_type = 'refund'
                  OR (t.entry_type = 'reversal' AND t.key_prefix = $2))), 0),
       COALESCE(sum(t.amount_millicredits) FILTER (
           WHERE t.month = $1 AND t.entry_type = 'reversal' AND t.key_prefix = $3), 0),
       COALESCE(sum(t.amount_millicredits) FILTER (WHERE t.month = $1
                                                     AND t.entry_type = 'adjustment'), 0),
       COALESCE(sum(t.amount_millicredits) FILTER (
           WHERE t.month = $1 AND t.entry_type = 'reversal'
             AND t.key_prefix <> $2 AND t.key_prefix <> $3), 0),
       b.balance - COALESCE(sum(t.amount_millicredits) FILTER (WHERE t.month > $1), 0)
  FROM (SELECT balance_millicredits AS balance FROM accounts WHERE id = $4) AS b
  LEFT JOIN account_month_ledger t ON t.account_id = $4 AND t.month >= $1
 GROUP BY b.balance
"""

# The month's usage by model, from account_month_usage (0013); a model whose events were all
# moved out of the month (a correction) keeps a row of zeros: left out, as the rows show none.
_USAGE_TOTALS_SQL = """
SELECT model, requests, prompt_tokens, cached_tokens, completion_tokens, charged_millicredits
  FROM account_month_usage
 WHERE account_id = $1 AND month = $2 AND requests <> 0
 ORDER BY model
"""


async def monthly_statement(pool: asyncpg.Pool, account_id: int, month: date) -> Statement:
    """The statement of ``account_id`` for the UTC month of ``month``, read in one
    repeatable-read snapshot (so the totals agree with each other).

    Raises:
        AccountNotFoundError: no such account.
    """
    start, end = month_bounds(month)
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        email = await conn.fetchval("SELECT email FROM accounts WHERE id = $1", account_id)
        if email is None:
            raise AccountNotFoundError(account_id)
        row = await conn.fetchrow(
            _LEDGER_MONTH_TOTALS_SQL,
            start.date(),
            REFUND_KEY_PREFIX,
            DISPUTE_KEY_PREFIX,
            account_id,
        )
        assert row is not None  # the account exists: one row
        totals = LedgerMovements(*(int(value) for value in row))
        usage_rows = await conn.fetch(_USAGE_TOTALS_SQL, account_id, start.date())
    return Statement(
        account_id=account_id,
        email=email,
        month=start.date(),
        period_start=start,
        period_end=end,
        opening_balance_millicredits=totals.opening_millicredits,
        purchases_millicredits=totals.purchases_millicredits,
        deductions_millicredits=totals.deductions_millicredits,
        refunds_millicredits=totals.refunds_millicredits,
        disputes_millicredits=totals.disputes_millicredits,
        adjustments_millicredits=totals.adjustments_millicredits,
        reversals_millicredits=totals.reversals_millicredits,
        closing_balance_millicredits=totals.closing_millicredits,
        usage=tuple(ModelUsage(row[0], *(int(value) for value in row[1:])) for row in usage_rows),
    )
