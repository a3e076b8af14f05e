"""A purchase's ledger entries, computed from the facts Stripe reported about it.

``settle_purchase`` derives the entries a purchase should have from its stored state (paid
or not, its refunds, its disputes) and posts each through ``billing.ledger.post_entry`` with
an idempotency key made of Stripe ids. Posting an entry that exists changes nothing, so the
function can run after every event, in any order, any number of times, and the ledger ends
the same. The entries (all linked to the purchase entry through ``reverses_entry_id``):

    purchase:{checkout_session_id}         purchase    +total           when paid
    refund:{refund_id}                     reversal    -share(refund)   refund counted
    refund:{refund_id}:reinstated          reversal    +same            refund failed/canceled
    dispute:{dispute_id}:opened            reversal    -share(dispute)  any dispute
    dispute:{dispute_id}:won               reversal    +same            won / warning_closed
    shortfall:{key of a positive entry}    adjustment  -collected       see below

``share(x) = floor(total_millicredits * x.amount / amount paid)``, and all reversals of one
purchase together never exceed its total. A reversal takes at most the balance
(``post_entry(rule=PostingRule.OWE)``); the rest is added to ``accounts.shortfall_millicredits``,
which stops paid use (the Redis reserve script answers SUSPENDED, HTTP 402). Credits that
later come in through Stripe (a purchase, a reinstated refund, a won dispute) first pay the
outstanding shortfall: a ``shortfall:...`` adjustment takes ``min(shortfall, balance)`` and
lowers the shortfall by as much (``PostingRule.REPAY``: entry, balance and shortfall move in
one step of the ledger's one writer). Admins see the shortfall on the account and per refund or
dispute (``purchase_refunds`` / ``purchase_disputes.shortfall_millicredits``).

Runs inside the caller's transaction with the purchase row locked (see
``billing.purchases.purchase_records``).
Postgres unreachable: ``OSError``/``asyncpg`` errors propagate; nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

from billing.ledger import LedgerEntry, PostedBalance, PostingRule, PostResult, post_entry

if TYPE_CHECKING:
    from billing.purchases.purchase_records import Purchase

#: Idempotency-key prefixes of the ``reversal`` entries of refunds and of disputes (the table
#: above); ``billing.statements`` sorts reversals into refunds and disputes by them.
REFUND_KEY_PREFIX = "refund:"
DISPUTE_KEY_PREFIX = "dispute:"

COUNTED_REFUND_STATUSES = frozenset({"pending", "requires_action", "succeeded"})
FAILED_REFUND_STATUSES = frozenset({"failed", "canceled"})
RESTORED_DISPUTE_STATUSES = frozenset({"won", "warning_closed"})


@dataclass(slots=True)
class PurchaseLedger:
    """What ``settle_purchase`` posted.

    Attributes:
        entries: entries created by this call (empty when everything existed).
        posted: the account's balance after the call when entries were created, else None.
        purchase_entry_id: the purchase entry, once the purchase is paid.
    """

    entries: list[LedgerEntry] = field(default_factory=list)
    posted: PostedBalance | None = None
    purchase_entry_id: int | None = None


def share_millicredits(
    total_millicredits: int, part_minor_units: int, paid_minor_units: int
) -> int:
    """The credits a part of a payment bought: ``floor(total * part / paid)``, in [0, total].

    Rounding down favours the user by under 1 millicredit per refund; a full refund (part ==
    paid) reverses exactly the total.
    """
    if paid_minor_units <= 0 or part_minor_units <= 0:
        return 0
    return min(total_millicredits, total_millicredits * part_minor_units // paid_minor_units)


class _Poster:
    """Posts one purchase's entries on one account and keeps what changed."""

    def __init__(self, conn: asyncpg.Connection, account_id: int) -> None:
        self._conn = conn
        self._account_id = account_id
        self.result = PurchaseLedger()

    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement on the same connection (and transaction)."""
        await self._conn.execute(sql, *args)

    async def post(
        self,
        entry_type: str,
        amount_millicredits: int,
        *,
        key: str,
        reference: str,
        reverses_entry_id: int | None = None,
        rule: PostingRule = PostingRule.WHOLE,
    ) -> PostResult:
        """Post one entry of the purchase; a credit first pays any outstanding shortfall."""
        posted = await post_entry(
            self._conn,
            account_id=self._account_id,
            entry_type=entry_type,
            amount_millicredits=amount_millicredits,
            idempotency_key=key,
            reference=reference,
            reverses_entry_id=reverses_entry_id,
            rule=rule,
        )
        if posted.created:
            self.result.entries.append(posted.entry)
            self.result.posted = posted.posted
            if amount_millicredits > 0:
                await self._collect_shortfall(key, posted.posted)
        return posted

    async def _collect_shortfall(self, source_key: str, after: PostedBalance) -> None:
        collected = min(after.shortfall_millicredits, after.balance_millicredits)
        if collected <= 0:
            return
        posted = await post_entry(
            self._conn,
            account_id=self._account_id,
            entry_type="adjustment",
            amount_millicredits=-collected,
            idempotency_key=f"shortfall:{source_key}",
            reference=source_key,
            rule=PostingRule.REPAY,
        )
        if posted.created:
            self.result.entries.append(posted.entry)
            self.result.posted = posted.posted


async def settle_purchase(conn: asyncpg.Connection, purchase: Purchase) -> PurchaseLedger:
    """Post whatever entries of the purchase are missing (see the module docstring).

    The purchase row must be locked by the caller (``SELECT ... FOR UPDATE``) in the
    current transaction. A purchase that is not ``paid`` has no entries: nothing was
    granted, so refunds and disputes reported against it reverse nothing.

    Raises:
        AccountNotFoundError: the purchase's account is gone (cannot happen with the FK).
    """
    if purchase.status != "paid" or purchase.checkout_session_id is None:
        return PurchaseLedger(purchase_entry_id=purchase.purchase_entry_id)
    poster = _Poster(conn, purchase.account_id)
    total = purchase.total_millicredits
    session_id = purchase.checkout_session_id
    grant = await poster.post("purchase", total, key=f"purchase:{session_id}", reference=session_id)
    grant_id = grant.entry.id
    poster.result.purchase_entry_id = grant_id
    if purchase.purchase_entry_id != grant_id:
        await conn.execute(
            "UPDATE purchases SET purchase_entry_id = $2 WHERE id = $1", purchase.id, grant_id
        )
    paid = purchase.amount_paid_minor_units or purchase.price_minor_units
    reversed_net = 0  # credits reversed by this purchase's refunds and open/lost disputes

    refunds = await conn.fetch(
        """SELECT refund_id, amount_minor_units, status, reversal_millicredits
           FROM purchase_refunds WHERE purchase_id = $1
           ORDER BY stripe_created_at NULLS LAST, refund_id FOR UPDATE""",
        purchase.id,
    )
    for refund_id, amount_minor, status, recorded in refunds:
        if status not in COUNTED_REFUND_STATUSES | FAILED_REFUND_STATUSES:
            continue
        share = _share(recorded, total, amount_minor, paid, reversed_net)
        if share > 0:
            reversed_net += await _reverse_share(
                poster,
                grant_id=grant_id,
                share=share,
                reference=refund_id,
                take_key=f"{REFUND_KEY_PREFIX}{refund_id}",
                restore_key=f"{REFUND_KEY_PREFIX}{refund_id}:reinstated",
                record_sql=_RECORD_REFUND_SQL,
                restore=status in FAILED_REFUND_STATUSES,
            )

    disputes = await conn.fetch(
        """SELECT dispute_id, amount_minor_units, status, held_millicredits
           FROM purchase_disputes WHERE purchase_id = $1
           ORDER BY stripe_created_at NULLS LAST, dispute_id FOR UPDATE""",
        purchase.id,
    )
    for dispute_id, amount_minor, status, recorded in disputes:
        share = _share(recorded, total, amount_minor, paid, reversed_net)
        if share > 0:
            reversed_net += await _reverse_share(
                poster,
                grant_id=grant_id,
                share=share,
                reference=dispute_id,
                take_key=f"{DISPUTE_KEY_PREFIX}{dispute_id}:opened",
                restore_key=f"{DISPUTE_KEY_PREFIX}{dispute_id}:won",
                record_sql=_RECORD_DISPUTE_SQL,
                restore=status in RESTORED_DISPUTE_STATUSES,
            )
    return poster.result


_RECORD_REFUND_SQL = """UPDATE purchase_refunds SET reversal_millicredits = $2,
       shortfall_millicredits = $3, updated_at = now()
   WHERE refund_id = $1"""
_RECORD_DISPUTE_SQL = """UPDATE purchase_disputes SET held_millicredits = $2,
       shortfall_millicredits = $3, updated_at = now()
   WHERE dispute_id = $1"""


def _share(
    recorded: int | None, total: int, amount_minor: int, paid: int, reversed_net: int
) -> int:
    """The millicredits a refund or dispute takes back: what was recorded when it was first
    posted, else its proportional share, never more than is still unreversed."""
    if recorded is not None:
        return recorded
    return min(share_millicredits(total, amount_minor, paid), total - reversed_net)


async def _reverse_share(
    poster: _Poster,
    *,
    grant_id: int,
    share: int,
    reference: str,
    take_key: str,
    restore_key: str,
    record_sql: str,
    restore: bool,
) -> int:
    """Take ``share`` back from the purchase (once, by ``take_key``; what the balance cannot
    cover becomes a shortfall), note it on its refund or dispute row, and give it back once
    (``restore_key``) when ``restore``. Returns what stays reversed: ``share`` or 0."""
    taken = await poster.post(
        "reversal",
        -share,
        key=take_key,
        reference=reference,
        reverses_entry_id=grant_id,
        rule=PostingRule.OWE,
    )
    if taken.created:
        await poster.execute(record_sql, reference, share, taken.shortfall_millicredits)
    if not restore:
        return share
    await poster.post(
        "reversal", share, key=restore_key, reference=reference, reverses_entry_id=taken.entry.id
    )
    return 0
