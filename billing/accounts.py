"""Accounts as operators manage them: create, find, suspend, reactivate, spend controls.

Each change runs in one transaction with its audit row (``billing.audit.record_audit``) and,
where running gateways must re-read the account (its status or spend controls), its control
event (``billing.control.notify_control``, delivered at commit). Balances move only through
``billing.ledger.post_entry``. ``balance_fields`` is the one builder of an account's balance
document (posted, held, pending, available, shortfall), for the CLI and the admin API.

Postgres unreachable: ``OSError``/``asyncpg`` errors propagate (``POSTGRES_UNAVAILABLE``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from billing import ledger
from billing.adjustments import actor_log_fields
from billing.audit import Actor, record_audit
from billing.control import ControlKind, notify_control
from billing.errors import AccountNotFoundError, DuplicateAccountError
from billing.ledger import PostedBalance
from billing.metering.holds import HoldStore
from billing.spend_controls import (
    CONTROL_COLUMNS,
    Limits,
    limits_from_record,
    limits_snapshot,
    update_columns,
)
from billing.units import money_fields

_SELECT_ACCOUNT = (
    "SELECT id, email, external_id, status, created_at, suspended_at, suspension_reason, "
    "balance_millicredits, balance_version, shortfall_millicredits, "
    + ", ".join(CONTROL_COLUMNS)
    + " FROM accounts"
)

UPDATABLE_COLUMNS: Final = frozenset({"external_id", *CONTROL_COLUMNS})
"""What ``update_account`` may change."""

STARTING_GRANT_REFERENCE = "starting credits"


@dataclass(frozen=True, slots=True)
class Account:
    """An account as stored in Postgres (its Redis holds are not part of it).

    Attributes:
        status: ``"active"`` or ``"suspended"`` (by an operator; a shortfall is separate).
        posted: posted balance, ledger version and outstanding shortfall.
    """

    id: int
    email: str
    external_id: str | None
    status: str
    created_at: datetime
    suspended_at: datetime | None
    suspension_reason: str | None
    posted: PostedBalance
    controls: Limits


def _account(row: asyncpg.Record) -> Account:
    return Account(
        id=row["id"],
        email=row["email"],
        external_id=row["external_id"],
        status=row["status"],
        created_at=row["created_at"],
        suspended_at=row["suspended_at"],
        suspension_reason=row["suspension_reason"],
        posted=PostedBalance(
            row["balance_millicredits"], row["balance_version"], row["shortfall_millicredits"]
        ),
        controls=limits_from_record(row),
    )


def account_snapshot(account: Account) -> dict[str, Any]:
    """The account as a JSON-able dict of its column names (audit ``before``/``after``)."""
    return {
        "id": account.id,
        "email": account.email,
        "external_id": account.external_id,
        "status": account.status,
        "suspension_reason": account.suspension_reason,
        "balance_millicredits": account.posted.balance_millicredits,
        "shortfall_millicredits": account.posted.shortfall_millicredits,
        **limits_snapshot(account.controls),
    }


async def get_account(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: int, *, for_update: bool = False
) -> Account:
    """One account; ``for_update`` locks its row until the transaction ends.

    Raises:
        AccountNotFoundError: no such account.
    """
    row = await conn.fetchrow(
        _SELECT_ACCOUNT + " WHERE id = $1" + (" FOR UPDATE" if for_update else ""), account_id
    )
    if row is None:
        raise AccountNotFoundError(account_id)
    return _account(row)


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching strings that start with ``text`` (its wildcards escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def search_accounts(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    email_prefix: str | None = None,
    account_id: int | None = None,
    external_id: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[Account]:
    """Accounts matching every filter given, newest (highest id) first.

    Args:
        email_prefix: case-insensitive prefix of the email (``accounts_email_lower_idx``).
        before_id: the cursor: only accounts with a lower id.
        limit: at most this many.
    """
    query, args = ledger.newest_first_query(
        _SELECT_ACCOUNT,
        [
            (
                "lower(email) LIKE lower({})",
                None if email_prefix is None else _like_prefix(email_prefix),
            ),
            ("id = {}", account_id),
            ("external_id = {}", external_id),
        ],
        before_id=before_id,
        limit=limit,
    )
    rows = await conn.fetch(query, *args)
    return [_account(row) for row in rows]


def _duplicate(exc: asyncpg.UniqueViolationError) -> DuplicateAccountError:
    field = "external_id" if exc.constraint_name == "accounts_external_id_key" else "email"
    return DuplicateAccountError(field)


async def create_account(
    conn: asyncpg.Connection,
    actor: Actor,
    *,
    email: str,
    external_id: str | None = None,
    starting_millicredits: int = 0,
) -> Account:
    """Create an account, with an optional starting grant (an ``adjustment`` entry).

    One transaction: the account, its grant (idempotency key ``account-grant:<id>``) and the
    audit row ``account.create``. Redis learns the balance at the account's first reserve.

    Raises:
        DuplicateAccountError: the email or external id is taken; nothing written.
        ValueError: ``starting_millicredits`` < 0.
    """
    if starting_millicredits < 0:
        raise ValueError("a starting grant cannot be negative")
    async with conn.transaction():
        try:
            async with conn.transaction():
                account_id = await ledger.create_account(conn, email, external_id=external_id)
        except asyncpg.UniqueViolationError as exc:
            raise _duplicate(exc) from None
        if starting_millicredits:
            await ledger.post_entry(
                conn,
                account_id=account_id,
                entry_type="adjustment",
                amount_millicredits=starting_millicredits,
                idempotency_key=f"account-grant:{account_id}",
                reference=STARTING_GRANT_REFERENCE,
                log_fields=actor_log_fields(actor, kind="starting_grant"),
            )
        account = await get_account(conn, account_id)
        await record_audit(
            conn,
            actor,
            action="account.create",
            target_type="account",
            target_id=account_id,
            after=account_snapshot(account),
        )
    return account


async def _change(
    conn: asyncpg.Connection,
    actor: Actor,
    account_id: int,
    *,
    action: str,
    statement: str,
    args: tuple[Any, ...],
) -> Account:
    """Lock the account, run ``statement`` ($1 is the id), audit, notify, in one transaction."""
    async with conn.transaction():
        before = await get_account(conn, account_id, for_update=True)
        await conn.execute(statement, account_id, *args)
        after = await get_account(conn, account_id)
        await record_audit(
            conn,
            actor,
            action=action,
            target_type="account",
            target_id=account_id,
            before=account_snapshot(before),
            after=account_snapshot(after),
        )
        await notify_control(conn, ControlKind.ACCOUNTS, account_id=account_id)
    return after


async def suspend_account(
    conn: asyncpg.Connection, actor: Actor, account_id: int, *, reason: str
) -> Account:
    """Suspend an account: every gateway refuses its requests once it drops its cached keys
    (the control event). Suspending a suspended account keeps its ``suspended_at`` and
    takes the new reason.

    Raises:
        AccountNotFoundError: no such account.
    """
    return await _change(
        conn,
        actor,
        account_id,
        action="account.suspend",
        statement="""UPDATE accounts SET status = 'suspended',
                         suspended_at = COALESCE(suspended_at, now()), suspension_reason = $2
                     WHERE id = $1""",
        args=(reason,),
    )


async def reactivate_account(conn: asyncpg.Connection, actor: Actor, account_id: int) -> Account:
    """Make a suspended account active again (an active one stays as it is).

    Raises:
        AccountNotFoundError: no such account.
    """
    return await _change(
        conn,
        actor,
        account_id,
        action="account.reactivate",
        statement="""UPDATE accounts SET status = 'active', suspended_at = NULL,
                         suspension_reason = NULL
                     WHERE id = $1""",
        args=(),
    )


async def update_account(
    conn: asyncpg.Connection, actor: Actor, account_id: int, changes: Mapping[str, Any]
) -> Account:
    """Set the account's external id and spend controls named in ``changes`` (column name ->
    value; None clears a cap or the model list). Audit ``account.update`` and a control event.

    Raises:
        AccountNotFoundError: no such account.
        DuplicateAccountError: the external id belongs to another account.
        ValueError: a column outside ``UPDATABLE_COLUMNS``.
    """
    async with conn.transaction():
        before = await get_account(conn, account_id, for_update=True)
        try:
            async with conn.transaction():
                await update_columns(
                    conn, "accounts", account_id, changes, allowed=UPDATABLE_COLUMNS
                )
        except asyncpg.UniqueViolationError as exc:
            raise _duplicate(exc) from None
        after = await get_account(conn, account_id)
        await record_audit(
            conn,
            actor,
            action="account.update",
            target_type="account",
            target_id=account_id,
            before=account_snapshot(before),
            after=account_snapshot(after),
        )
        await notify_control(conn, ControlKind.ACCOUNTS, account_id=account_id)
    return after


HOLDS_UNKNOWN: Final = (
    "REDIS_URL is not set: held and pending-settlement amounts, and so the available "
    "balance, are unknown; balance is the posted balance in Postgres."
)


async def balance_fields(
    holds: HoldStore | None, account_id: int, posted: PostedBalance
) -> dict[str, Any]:
    """An account's money at the JSON edge: ``balance`` (posted), ``held``,
    ``pendingSettlement`` (settled, not yet posted), ``available`` (posted - held -
    pending, never below 0) and ``shortfall``, each as ``money_fields``.

    Without a hold store (no Redis configured) held, pending and available are None and a
    ``note`` says why.

    Raises:
        BillingUnavailableError: Redis unreachable (``HoldStore.account_state``).
    """
    doc: dict[str, Any] = money_fields("balance", posted.balance_millicredits)
    if holds is None:
        for prefix in ("held", "pendingSettlement", "available"):
            doc.update(dict.fromkeys(money_fields(prefix, 0)))
        doc["note"] = HOLDS_UNKNOWN
    else:
        state = await holds.account_state(account_id)
        held = state.held_millicredits
        pending = state.pending_millicredits
        available = max(posted.balance_millicredits - held - pending, 0)
        doc.update(money_fields("held", held))
        doc.update(money_fields("pendingSettlement", pending))
        doc.update(money_fields("available", available))
    doc.update(money_fields("shortfall", posted.shortfall_millicredits))
    return doc
