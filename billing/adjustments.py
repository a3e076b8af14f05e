"""Operator adjustments: credits and debits with a reason, and forgiving a shortfall.

Every one is a new ``adjustment`` ledger entry written by ``billing.ledger.post_entry`` (the
one writer, which also logs its ``adjustment.posted`` line): corrections are new entries,
never edits. Each call writes one audit row in the same transaction. The caller pushes the
returned posted balance to Redis after the commit
(``billing.purchases.fulfilment.publish_balance``) so the gateways reserve against it.

Idempotency of an adjustment (an ``Idempotency-Key`` chosen by the caller):

| call                                  | outcome                                          |
|---------------------------------------|--------------------------------------------------|
| new key                               | one entry, one audit row                         |
| same key, same request                | the same entry again; nothing written            |
| same key, another request             | ``IdempotencyKeyReusedError``; nothing written   |

"Same request" is the account, signed amount, reason and external reference; the request is
kept in the audit row of the entry (``after.request``), written with it.

Postgres unreachable: ``OSError``/``asyncpg`` errors propagate (``POSTGRES_UNAVAILABLE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

from billing.audit import Actor, record_audit
from billing.errors import AccountNotFoundError, IdempotencyKeyReusedError, NoShortfallError
from billing.ledger import LedgerEntry, PostedBalance, PostingRule, post_entry

ADJUSTMENT_KEY_PREFIX: Final = "admin-adjustment:"
"""Ledger idempotency keys of adjustments: this prefix and the caller's key (one key space
for every account: a key reused for another account is another request)."""


@dataclass(frozen=True, slots=True)
class AdjustmentRequest:
    """What an operator asks for.

    Attributes:
        amount_millicredits: signed: > 0 credits the account, < 0 debits it; never 0.
        reason: why (required; shown in the ledger's ``reference``).
        external_reference: e.g. a ticket or invoice number.
    """

    account_id: int
    amount_millicredits: int
    reason: str
    external_reference: str | None = None

    def snapshot(self) -> dict[str, Any]:
        """The request as JSON-able column names (kept in the audit row)."""
        return {
            "account_id": self.account_id,
            "amount_millicredits": self.amount_millicredits,
            "reason": self.reason,
            "external_reference": self.external_reference,
        }

    @property
    def reference(self) -> str:
        """The ledger entry's ``reference``: the reason, and the external reference if any."""
        if self.external_reference is None:
            return self.reason
        return f"{self.reason} (external reference: {self.external_reference})"


@dataclass(frozen=True, slots=True)
class AdjustmentResult:
    """Outcome of ``post_adjustment``.

    Attributes:
        created: False when the key had been posted before with this request.
        posted: the account's posted balance after the call (push it to Redis).
    """

    entry: LedgerEntry
    created: bool
    posted: PostedBalance


def _entry_snapshot(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "account_id": entry.account_id,
        "entry_type": entry.entry_type,
        "amount_millicredits": entry.amount_millicredits,
        "balance_after_millicredits": entry.balance_after_millicredits,
        "reference": entry.reference,
    }


async def _posted_request(conn: asyncpg.Connection, entry_id: int) -> Any:
    """The request an adjustment entry was posted for (its audit row's ``after.request``)."""
    text = await conn.fetchval(
        """SELECT after -> 'request' FROM audit_log
           WHERE target_type = 'ledger_entry' AND target_id = $1
             AND action = 'adjustment.create'
           ORDER BY id LIMIT 1""",
        str(entry_id),
    )
    return None if text is None else orjson.loads(text)


async def post_adjustment(
    conn: asyncpg.Connection,
    actor: Actor,
    request: AdjustmentRequest,
    *,
    idempotency_key: str,
) -> AdjustmentResult:
    """Post an operator's credit or debit once per idempotency key (see the module's table).

    A debit the posted balance cannot cover is refused whole (``PostingRule.WHOLE``): a
    balance never goes below zero.

    Raises:
        NegativeBalanceError: a debit beyond the posted balance; nothing written.
        IdempotencyKeyReusedError: the key was posted before for another request.
        AccountNotFoundError: no such account.
        ValueError: an amount of 0.
    """
    if request.amount_millicredits == 0:
        raise ValueError("an adjustment moves a non-zero amount")
    async with conn.transaction():
        result = await post_entry(
            conn,
            account_id=request.account_id,
            entry_type="adjustment",
            amount_millicredits=request.amount_millicredits,
            idempotency_key=ADJUSTMENT_KEY_PREFIX + idempotency_key,
            reference=request.reference,
            rule=PostingRule.WHOLE,
            log_fields=actor_log_fields(actor, kind="adjustment"),
        )
        if not result.created:
            if await _posted_request(conn, result.entry.id) != request.snapshot():
                raise IdempotencyKeyReusedError(idempotency_key)
            return AdjustmentResult(result.entry, False, result.posted)
        await record_audit(
            conn,
            actor,
            action="adjustment.create",
            target_type="ledger_entry",
            target_id=result.entry.id,
            after={"request": request.snapshot(), "entry": _entry_snapshot(result.entry)},
        )
    return AdjustmentResult(result.entry, True, result.posted)


def actor_log_fields(actor: Actor, *, kind: str) -> dict[str, object]:
    """Who posted an adjustment, for its ``adjustment.posted`` line (``post_entry``'s
    ``log_fields``): what kind of adjustment, and the actor's ids (never a token)."""
    return {
        "kind": kind,
        "actorKind": actor.kind,
        "adminTokenId": actor.token_id,
        "requestId": actor.request_id,
    }


@dataclass(frozen=True, slots=True)
class ForgivenShortfall:
    """Outcome of ``forgive_shortfall``.

    Attributes:
        forgiven_millicredits: the shortfall that was outstanding and is now cleared.
        entries: the credit and its collection (``adjustment`` entries, net zero).
        posted: the account's posted balance after (shortfall 0; push it to Redis).
    """

    forgiven_millicredits: int
    entries: tuple[LedgerEntry, LedgerEntry]
    posted: PostedBalance


async def forgive_shortfall(
    conn: asyncpg.Connection, actor: Actor, account_id: int, *, reason: str
) -> ForgivenShortfall:
    """Clear an account's outstanding shortfall (reversed credits it had already spent), so
    paid use resumes.

    ``post_ledger_entries`` moves a shortfall only by collecting it (``PostingRule.REPAY``),
    so forgiving is a credit of the shortfall and its collection, two ``adjustment``
    entries in one transaction: the balance is unchanged, the ledger still sums to it, and
    both entries show the write-off. Keys ``forgive-shortfall:<account>:<version>:credit``
    and ``...:collect`` (the version before). One audit row ``account.forgive_shortfall``.

    Raises:
        NoShortfallError: the account owes nothing; nothing written.
        AccountNotFoundError: no such account.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT shortfall_millicredits, balance_millicredits, balance_version "
            "FROM accounts WHERE id = $1 FOR UPDATE",
            account_id,
        )
        if row is None:
            raise AccountNotFoundError(account_id)
        shortfall, balance, version = row
        if shortfall == 0:
            raise NoShortfallError(account_id)
        key = f"forgive-shortfall:{account_id}:{version}"
        reference = f"shortfall forgiven: {reason}"
        credit = await post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=shortfall,
            idempotency_key=key + ":credit",
            reference=reference,
            log_fields=actor_log_fields(actor, kind="forgive_shortfall"),
        )
        collect = await post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=-shortfall,
            idempotency_key=key + ":collect",
            reference=reference,
            rule=PostingRule.REPAY,
            log_fields=actor_log_fields(actor, kind="forgive_shortfall"),
        )
        await record_audit(
            conn,
            actor,
            action="account.forgive_shortfall",
            target_type="account",
            target_id=account_id,
            before={"shortfall_millicredits": shortfall, "balance_millicredits": balance},
            after={
                "shortfall_millicredits": collect.posted.shortfall_millicredits,
                "balance_millicredits": collect.posted.balance_millicredits,
                "reason": reason,
                "entry_ids": [credit.entry.id, collect.entry.id],
            },
        )
    return ForgivenShortfall(shortfall, (credit.entry, collect.entry), collect.posted)
