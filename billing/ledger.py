"""The Postgres ledger of record: accounts, append-only ledger entries, usage events.

Every write that changes a balance inserts a ledger entry and updates the account's
``balance_millicredits`` and ``balance_version`` in the same transaction, under a row lock.
Entries are keyed by a unique idempotency key: a repeat changes nothing.

Postgres unreachable: the functions raise ``OSError``/``asyncpg`` errors; callers on the
request path map them to ``BillingUnavailableError`` (503).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing.errors import AccountNotFoundError, NegativeBalanceError


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


@dataclass(frozen=True, slots=True)
class PostResult:
    """Outcome of ``post_entry``.

    Attributes:
        entry: the entry with this idempotency key (new or the one posted before).
        created: False when the key had been posted already (nothing changed).
        posted: the account's balance and version after the call.
        shortfall_millicredits: the part of a negative amount that the balance could not
            cover (only with ``allow_partial``); added to the account's outstanding shortfall.
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
    )


async def create_account(conn: asyncpg.Connection, email: str) -> int:
    """Create an account with a zero balance; returns its id.

    Raises:
        asyncpg.UniqueViolationError: the email is taken.
    """
    account_id: int = await conn.fetchval(
        "INSERT INTO accounts (email) VALUES ($1) RETURNING id", email
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


async def post_entry(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    entry_type: str,
    amount_millicredits: int,
    idempotency_key: str,
    reference: str | None = None,
    reverses_entry_id: int | None = None,
    allow_partial: bool = False,
) -> PostResult:
    """Append one ledger entry and move the account's balance, at most once per key.

    Args:
        entry_type: one of ``ENTRY_TYPES``.
        amount_millicredits: signed; credits granted > 0, taken < 0.
        idempotency_key: unique per real-world event (e.g. ``purchase:cs_...``).
        allow_partial: for negative amounts: take what the balance holds and report the
            rest as ``shortfall_millicredits`` (added to ``accounts.shortfall_millicredits``)
            instead of failing.

    Raises:
        NegativeBalanceError: the entry would take the balance below zero (and not
            ``allow_partial``); nothing written.
        AccountNotFoundError: no such account.
        ValueError: unknown entry type.
    """
    if entry_type not in ENTRY_TYPES:
        raise ValueError(f"unknown ledger entry type {entry_type!r}")
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT balance_millicredits, balance_version, shortfall_millicredits "
            "FROM accounts WHERE id = $1 FOR UPDATE",
            account_id,
        )
        if row is None:
            raise AccountNotFoundError(account_id)
        balance, version, shortfall = row
        existing = await conn.fetchrow(
            "SELECT * FROM ledger_entries WHERE idempotency_key = $1", idempotency_key
        )
        if existing is not None:
            return PostResult(_entry(existing), False, PostedBalance(balance, version, shortfall))
        amount = amount_millicredits
        missing = 0
        if balance + amount < 0:
            if not allow_partial:
                raise NegativeBalanceError(
                    account_id=account_id,
                    balance_millicredits=balance,
                    amount_millicredits=amount_millicredits,
                )
            missing = -(balance + amount)
            amount = -balance
        entry_row = await conn.fetchrow(
            """INSERT INTO ledger_entries (account_id, entry_type, amount_millicredits,
                   balance_after_millicredits, idempotency_key, reference, reverses_entry_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
            account_id,
            entry_type,
            amount,
            balance + amount,
            idempotency_key,
            reference,
            reverses_entry_id,
        )
        new = await conn.fetchrow(
            """UPDATE accounts SET balance_millicredits = balance_millicredits + $2,
                   balance_version = balance_version + 1,
                   shortfall_millicredits = shortfall_millicredits + $3
               WHERE id = $1
               RETURNING balance_millicredits, balance_version, shortfall_millicredits""",
            account_id,
            amount,
            missing,
        )
        return PostResult(_entry(entry_row), True, PostedBalance(*new), missing)


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
