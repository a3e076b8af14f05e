"""The Postgres ledger of record: accounts, append-only ledger entries, usage events.

Every write that changes a balance inserts a ledger entry and updates the account's
``balance_millicredits`` and ``balance_version`` in the same statement, under a row lock:
the SQL function ``post_ledger_entries`` (``migrations/functions/``) is the only code that
does, for ``post_entry`` here and for settlement batches (``post_settlements``). Entries are
keyed by a unique idempotency key: a repeat changes nothing.

Postgres unreachable: the functions raise ``OSError``/``asyncpg`` errors; callers on the
request path map them to ``BillingUnavailableError`` (503).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing.errors import AccountNotFoundError, NegativeBalanceError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PostedBalance:
    """An account's posted balance as of a ledger version (from Postgres)."""

    balance_millicredits: int
    version: int
    shortfall_millicredits: int = 0


ENTRY_TYPES = frozenset({"purchase", "deduction", "refund", "adjustment", "reversal"})


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One append-only ledger row; ``amount_millicredits`` is signed (credits in > 0)."""

    id: int
    account_id: int
    entry_type: str
    amount_millicredits: int
    balance_after_millicredits: int
    idempotency_key: str
    reference: str | None
    reverses_entry_id: int | None
    created_at: datetime
    receipt_url: str | None = None
    """Set by ``list_ledger_entries`` on a purchase entry: its payment's receipt (the
    purchase whose Checkout Session is the entry's reference), when Stripe gave one."""


@dataclass(frozen=True, slots=True)
class PostResult:
    """Outcome of ``post_entry``.

    Attributes:
        entry: the entry with this idempotency key (new or the one posted before).
        created: False when the key had been posted already (nothing changed).
        posted: the account's balance and version after the call.
        shortfall_millicredits: the part of a negative amount that the balance could not
            cover (only with ``PostingRule.OWE``); added to the account's outstanding
            shortfall.
    """

    entry: LedgerEntry
    created: bool
    posted: PostedBalance
    shortfall_millicredits: int = 0


def _entry(row: asyncpg.Record) -> LedgerEntry:
    return LedgerEntry(
        id=row["id"],
        account_id=row["account_id"],
        entry_type=row["entry_type"],
        amount_millicredits=row["amount_millicredits"],
        balance_after_millicredits=row["balance_after_millicredits"],
        idempotency_key=row["idempotency_key"],
        reference=row["reference"],
        reverses_entry_id=row["reverses_entry_id"],
        created_at=row["created_at"],
        receipt_url=row.get("receipt_url"),
    )


async def create_account(
    conn: asyncpg.Connection, email: str, *, external_id: str | None = None
) -> int:
    """Create an account with a zero balance; returns its id.

    Raises:
        asyncpg.UniqueViolationError: the email (constraint ``accounts_email_key``) or the
            external id (``accounts_external_id_key``) is taken.
    """
    account_id: int = await conn.fetchval(
        "INSERT INTO accounts (email, external_id) VALUES ($1, $2) RETURNING id",
        email,
        external_id,
    )
    return account_id


async def posted_balance(conn: asyncpg.Connection | asyncpg.Pool, account_id: int) -> PostedBalance:
    """The account's posted balance, version and outstanding shortfall.

    Raises:
        AccountNotFoundError: no such account.
    """
    row = await conn.fetchrow(
        "SELECT balance_millicredits, balance_version, shortfall_millicredits "
        "FROM accounts WHERE id = $1",
        account_id,
    )
    if row is None:
        raise AccountNotFoundError(account_id)
    return PostedBalance(row[0], row[1], row[2])


class PostingRule(enum.StrEnum):
    """What a debit does when the balance cannot cover it (``post_ledger_entries``'s rules).

    WHOLE: refused (``NegativeBalanceError``), nothing written.
    OWE: takes what the balance holds; the rest is added to the account's shortfall
        (refunds and disputes of credits already spent).
    CAP: takes what the balance holds; the rest is only reported; taking 0 writes no entry
        (settlement deductions, whose usage event records the shortfall).
    REPAY: as WHOLE, and the amount taken also lowers the account's shortfall (collecting
        an outstanding shortfall from new credits).
    """

    WHOLE = "whole"
    OWE = "owe"
    CAP = "cap"
    REPAY = "repay"


# The one writer of entries and balances (migrations/functions/post_ledger_entries.sql),
# here with one entry.
_POST_ONE_SQL = """
SELECT out_entry_id, out_created, out_amount_millicredits, out_balance_after_millicredits,
       out_uncovered_millicredits, out_balance_millicredits, out_balance_version,
       out_shortfall_millicredits, now()
  FROM post_ledger_entries(ARRAY[$1::bigint], ARRAY[$2::text], ARRAY[$3::bigint],
                           ARRAY[$4::text], ARRAY[$5::text], ARRAY[$6::bigint], ARRAY[$7::text])
"""
_NEVER_BELOW_ZERO = "ledger_balance_never_below_zero"


async def post_entry(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    entry_type: str,
    amount_millicredits: int,
    idempotency_key: str,
    reference: str | None = None,
    reverses_entry_id: int | None = None,
    rule: PostingRule = PostingRule.WHOLE,
    log_fields: Mapping[str, object] | None = None,
) -> PostResult:
    """Append one ledger entry and move the account's balance, at most once per key.

    Posts through ``post_ledger_entries`` (``migrations/functions/``), the only writer of
    ledger entries and balances; one statement, under the account's row lock.

    Every ``adjustment`` entry it creates (operator adjustments, starting grants, the CLI's
    grants, forgiven shortfalls) writes one ``adjustment.posted`` log line here, the one
    place all of them pass, so no path logs twice or not at all; a repeated key writes none.
    The line is written inside the caller's transaction: if that rolls back later, the line
    names a ledger entry id that was never committed (the ledger is the record).

    Args:
        entry_type: one of ``ENTRY_TYPES``.
        amount_millicredits: signed; credits granted > 0, taken < 0.
        idempotency_key: unique per real-world event (e.g. ``purchase:cs_...``).
        rule: what a debit does when the balance cannot cover it (``PostingRule``); with
            ``OWE`` the uncovered part is ``PostResult.shortfall_millicredits``.
        log_fields: more fields for the ``adjustment.posted`` line (who posted it: ids
            only, never a secret).

    Raises:
        NegativeBalanceError: the entry would take the balance below zero under ``WHOLE`` or
            ``REPAY``; nothing written.
        AccountNotFoundError: no such account.
        ValueError: unknown entry type.
    """
    if entry_type not in ENTRY_TYPES:
        raise ValueError(f"unknown ledger entry type {entry_type!r}")
    try:
        # A savepoint inside the caller's transaction: a refusal leaves that usable.
        async with conn.transaction():
            row = await conn.fetchrow(
                _POST_ONE_SQL,
                account_id,
                entry_type,
                amount_millicredits,
                idempotency_key,
                reference,
                reverses_entry_id,
                rule.value,
            )
    except asyncpg.NoDataFoundError:
        raise AccountNotFoundError(account_id) from None
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name != _NEVER_BELOW_ZERO:
            raise
        balance = await posted_balance(conn, account_id)
        raise NegativeBalanceError(
            account_id=account_id,
            balance_millicredits=balance.balance_millicredits,
            amount_millicredits=amount_millicredits,
        ) from None
    assert row is not None  # one input entry, one answer row
    entry_id, created, amount, balance_after, uncovered, *posted, created_at = row
    if not created:
        existing = await conn.fetchrow(
            "SELECT * FROM ledger_entries WHERE idempotency_key = $1", idempotency_key
        )
        return PostResult(_entry(existing), False, PostedBalance(*posted))
    entry = LedgerEntry(
        id=entry_id,
        account_id=account_id,
        entry_type=entry_type,
        amount_millicredits=amount,
        balance_after_millicredits=balance_after,
        idempotency_key=idempotency_key,
        reference=reference,
        reverses_entry_id=reverses_entry_id,
        created_at=created_at,
    )
    if entry_type == "adjustment":
        _log_adjustment(entry, log_fields)
    shortfall = uncovered if rule is PostingRule.OWE else 0
    return PostResult(entry, True, PostedBalance(*posted), shortfall)


def _log_adjustment(entry: LedgerEntry, log_fields: Mapping[str, object] | None) -> None:
    """The ``adjustment.posted`` money event (amounts as strings; the reason stays in the
    ledger entry and the audit row, not in the log)."""
    log.info(
        "adjustment posted",
        extra={
            "event": "adjustment.posted",
            "accountId": entry.account_id,
            "ledgerEntryId": entry.id,
            "millicredits": str(entry.amount_millicredits),
            "balanceAfterMillicredits": str(entry.balance_after_millicredits),
            **(log_fields or {}),
        },
    )


async def ledger_sum_matches_balance(conn: asyncpg.Connection, account_id: int) -> bool:
    """Reconciliation check for one account: sum(entries) == posted balance."""
    row = await conn.fetchrow(
        """SELECT a.balance_millicredits,
                  COALESCE((SELECT sum(amount_millicredits) FROM ledger_entries
                            WHERE account_id = a.id), 0) AS total
           FROM accounts a WHERE a.id = $1""",
        account_id,
    )
    if row is None:
        raise AccountNotFoundError(account_id)
    return bool(row[0] == row[1])


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One billed request as posted (``usage_events``), with the rates in force when it
    happened (the rate card snapshot, millicredits per 1k tokens)."""

    id: int
    request_id: str
    account_id: int
    api_key_id: int | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    rate_card_id: int | None
    input_millicredits_per_1k_tokens: int
    cached_input_millicredits_per_1k_tokens: int
    output_millicredits_per_1k_tokens: int
    rounding_mode: str
    cost_millicredits: int
    charged_millicredits: int
    shortfall_millicredits: int
    usage_source: str
    status: str
    started_at: datetime
    finished_at: datetime
    key_prefix: str | None = None
    """The visible prefix of the API key (``api_keys.key_prefix``), set by
    ``list_usage_events``; None without a key."""


# Each list reads a derived table of the rows with their joined fields (the filters of
# ``newest_first_query`` then name plain columns); Postgres flattens it, so the account's
# (account_id, id) index still serves the newest-first scan.
_ENTRIES_WITH_RECEIPTS = f"""SELECT * FROM (
    SELECT {", ".join("e." + f for f in LedgerEntry.__dataclass_fields__ if f != "receipt_url")},
           p.receipt_url
      FROM ledger_entries e
      LEFT JOIN purchases p
        ON e.entry_type = 'purchase' AND p.checkout_session_id = e.reference
) AS entries"""
_EVENTS_WITH_KEY_PREFIXES = f"""SELECT * FROM (
    SELECT {", ".join("u." + f for f in UsageEvent.__dataclass_fields__ if f != "key_prefix")},
           k.key_prefix
      FROM usage_events u
      LEFT JOIN api_keys k ON k.id = u.api_key_id
) AS events"""


def newest_first_query(
    select: str, filters: list[tuple[str, object]], *, before_id: int | None, limit: int
) -> tuple[str, list[object]]:
    """``select`` with ``WHERE`` conditions for the filters that are not None (each SQL
    with ``{}`` for its parameter's number), newest (highest id) first, after a cursor."""
    conditions: list[str] = []
    args: list[object] = []
    for sql, value in [*filters, ("id < {}", before_id)]:
        if value is not None:
            args.append(value)
            conditions.append(sql.format(f"${len(args)}"))
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    args.append(limit)
    return f"{select}{where} ORDER BY id DESC LIMIT ${len(args)}", args


async def list_ledger_entries(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    account_id: int | None = None,
    entry_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[LedgerEntry]:
    """Ledger entries matching every filter given, newest first, each purchase with its
    ``receipt_url``.

    Args:
        since, until: ``since <= created_at < until``.
        before_id: the cursor: only entries with a lower id.
    """
    query, args = newest_first_query(
        _ENTRIES_WITH_RECEIPTS,
        [
            ("account_id = {}", account_id),
            ("entry_type = {}", entry_type),
            ("created_at >= {}", since),
            ("created_at < {}", until),
        ],
        before_id=before_id,
        limit=limit,
    )
    return [_entry(row) for row in await conn.fetch(query, *args)]


async def list_usage_events(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    account_id: int | None = None,
    model: str | None = None,
    api_key_id: int | None = None,
    key_prefix: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[UsageEvent]:
    """Usage events matching every filter given, newest first, each with its key's
    ``key_prefix``.

    Args:
        key_prefix: the visible prefix of the key that made the request (exact).
        since, until: ``since <= started_at < until`` (the request's start, as spend
            windows count it).
        before_id: the cursor: only events with a lower id.
    """
    query, args = newest_first_query(
        _EVENTS_WITH_KEY_PREFIXES,
        [
            ("account_id = {}", account_id),
            ("model = {}", model),
            ("api_key_id = {}", api_key_id),
            ("key_prefix = {}", key_prefix),
            ("started_at >= {}", since),
            ("started_at < {}", until),
        ],
        before_id=before_id,
        limit=limit,
    )
    return [UsageEvent(*row) for row in await conn.fetch(query, *args)]
