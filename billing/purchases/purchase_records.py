"""Purchases of credit packages, and what Stripe reports about them, applied exactly once.

A purchase is recorded ``pending`` when the user starts Checkout. Afterwards every fact Stripe
reports (a Checkout Session's state, a refund, a dispute) is stored on its own row, keyed by
Stripe's id, and the purchase's ledger entries are recomputed from the stored facts by
``billing.purchases.purchase_ledger.settle_purchase``. Entries are posted with idempotency keys
derived
from Stripe's ids, so the ledger depends on which facts arrived, not on how often or in which
order: Stripe's at-least-once, unordered delivery cannot double-grant or double-reverse.

Locks, always in this order, all inside the caller's transaction:
    1. ``pg_advisory_xact_lock`` on the payment intent (else the charge) id: a refund or
       dispute that arrives before its checkout event and the checkout event itself
       serialize, so the refund is either seen by the fulfilment or finds the purchase;
    2. the ``purchases`` row (``FOR UPDATE``);
    3. the ``accounts`` row (taken by ``billing.ledger.post_entry``).

The functions take Stripe objects as plain dicts (``StripeObject.to_dict()`` or the JSON of a
webhook event) and never call Stripe. Postgres unreachable: ``OSError``/``asyncpg`` errors
propagate and nothing is written (the webhook answers 503 and Stripe retries).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from billing.errors import BillingError
from billing.ledger import LedgerEntry, PostedBalance
from billing.purchases.packages import Package
from billing.purchases.purchase_ledger import settle_purchase

log = logging.getLogger(__name__)

PUBLIC_ID_PREFIX = "pur_"

# Status order: a later event can move a purchase forward, never back. ``paid`` outranks
# ``failed``/``expired`` because money that arrived must become credits whatever the order.
_STATUS_RANK = {
    "pending": 0,
    "processing": 1,
    "failed": 2,
    "expired": 2,
    "paid": 3,
    "needs_review": 4,
}
# Stripe refund statuses by rank: a counted refund may later fail or be canceled.
_REFUND_STATUS_RANK = {
    "pending": 1,
    "requires_action": 1,
    "succeeded": 2,
    "failed": 3,
    "canceled": 3,
}
# Stripe dispute statuses: open ones, then final ones.
_DISPUTE_FINAL = frozenset({"won", "lost", "warning_closed", "prevented"})

_PURCHASE_COLUMNS = """id, public_id, account_id, package_id, package_code, price_minor_units,
    currency, total_millicredits, return_path, status, failure_reason, checkout_session_id,
    checkout_url, payment_intent_id, charge_id, receipt_url, amount_paid_minor_units,
    purchase_entry_id, created_at, updated_at, paid_at"""


class PurchaseNotFoundError(BillingError):
    """No purchase with that public id (for that account)."""

    def __init__(self, public_id: str) -> None:
        super().__init__(f"purchase {public_id!r} not found")
        self.public_id = public_id


@dataclass(frozen=True, slots=True)
class Purchase:
    """One purchase attempt (a row of ``purchases``; see the migration for statuses).

    Attributes:
        public_id: unguessable ``pur_...`` id; shown to the user, sent to Stripe as
            ``metadata.purchase_id``.
        price_minor_units / currency: the package's price when the purchase started.
        total_millicredits: credits granted when paid (snapshot of the package's total).
        amount_paid_minor_units: Stripe's ``amount_total`` once paid, else None.
        purchase_entry_id: the purchase ledger entry once paid, else None.
    """

    id: int
    public_id: str
    account_id: int
    package_id: int
    package_code: str
    price_minor_units: int
    currency: str
    total_millicredits: int
    return_path: str | None
    status: str
    failure_reason: str | None
    checkout_session_id: str | None
    checkout_url: str | None
    payment_intent_id: str | None
    charge_id: str | None
    receipt_url: str | None
    amount_paid_minor_units: int | None
    purchase_entry_id: int | None
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None


@dataclass(slots=True)
class PurchaseUpdate:
    """What applying one Stripe object did.

    Attributes:
        purchase: the purchase after the change, or None when the object matches no
            purchase of ours (yet: a refund seen before its checkout is kept and applied
            when the checkout arrives).
        entries: ledger entries created by this call (empty on a repeat).
        posted: the account's posted balance after the call when entries were created; push
            it to Redis (``HoldStore.sync_balance``) after the transaction commits.
        rejected: set when Stripe's object contradicts the purchase (amount, currency or
            account); the purchase is ``needs_review`` and no credits moved.
    """

    purchase: Purchase | None
    entries: list[LedgerEntry] = field(default_factory=list)
    posted: PostedBalance | None = None
    rejected: str | None = None


def stripe_id(value: object) -> str | None:
    """The id of a Stripe reference that may be expanded: ``"pi_1"`` or ``{"id": "pi_1"}``."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        inner = value.get("id")
        return inner if isinstance(inner, str) else None
    return None


def _timestamp(value: object) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


def _purchase(row: asyncpg.Record) -> Purchase:
    return Purchase(*row)


async def create_purchase(
    conn: asyncpg.Connection, *, account_id: int, package: Package, return_path: str | None
) -> Purchase:
    """Record a pending purchase of ``package`` for the account (before Checkout starts).

    Args:
        return_path: a path on our own site (validated by the caller), or None.

    Raises:
        asyncpg.ForeignKeyViolationError: no such account.
    """
    row = await conn.fetchrow(
        f"""INSERT INTO purchases (public_id, account_id, package_id, package_code,
                price_minor_units, currency, total_millicredits, return_path)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_PURCHASE_COLUMNS}""",
        PUBLIC_ID_PREFIX + secrets.token_urlsafe(18),
        account_id,
        package.id,
        package.code,
        package.price_minor_units,
        package.currency,
        package.total_millicredits,
        return_path,
    )
    return _purchase(row)


async def attach_checkout_session(
    conn: asyncpg.Connection | asyncpg.Pool,
    purchase_id: int,
    *,
    checkout_session_id: str,
    checkout_url: str,
) -> Purchase:
    """Store the Checkout Session created for a pending purchase (its id and URL)."""
    row = await conn.fetchrow(
        f"""UPDATE purchases SET checkout_session_id = $2, checkout_url = $3, updated_at = now()
            WHERE id = $1 RETURNING {_PURCHASE_COLUMNS}""",
        purchase_id,
        checkout_session_id,
        checkout_url,
    )
    return _purchase(row)


async def mark_checkout_not_started(
    conn: asyncpg.Connection | asyncpg.Pool, purchase_id: int, reason: str
) -> None:
    """Mark a pending purchase ``failed`` because Stripe refused or failed to create its
    Checkout Session (nothing was charged)."""
    await conn.execute(
        """UPDATE purchases SET status = 'failed', failure_reason = $2, updated_at = now()
           WHERE id = $1 AND status = 'pending'""",
        purchase_id,
        reason[:500],
    )


async def get_purchase(
    conn: asyncpg.Connection | asyncpg.Pool, public_id: str, *, account_id: int | None = None
) -> Purchase:
    """The purchase with this public id (and, when given, this account).

    Raises:
        PurchaseNotFoundError: no such purchase, or another account's.
    """
    row = await conn.fetchrow(
        f"SELECT {_PURCHASE_COLUMNS} FROM purchases WHERE public_id = $1", public_id
    )
    if row is None or (account_id is not None and row["account_id"] != account_id):
        raise PurchaseNotFoundError(public_id)
    return _purchase(row)


async def _settle(conn: asyncpg.Connection, purchase: Purchase) -> PurchaseUpdate:
    ledger = await settle_purchase(conn, purchase)
    if ledger.purchase_entry_id != purchase.purchase_entry_id:
        purchase = dataclasses.replace(purchase, purchase_entry_id=ledger.purchase_entry_id)
    return PurchaseUpdate(purchase, ledger.entries, ledger.posted)


async def _lock_payment(conn: asyncpg.Connection, payment_ref: str | None) -> None:
    if payment_ref:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "stripe-payment:" + payment_ref
        )


def _next_status(current: str, proposed: str) -> str:
    return proposed if _STATUS_RANK[proposed] > _STATUS_RANK[current] else current


def _session_problem(purchase: Purchase, session: Mapping[str, Any], paid: bool) -> str | None:
    """Why the session cannot be this purchase's payment, or None when it matches."""
    if session.get("client_reference_id") != str(purchase.account_id):
        return "client_reference_id does not match the purchase's account"
    if session.get("payment_status") == "no_payment_required":
        return "checkout completed without collecting a payment (no_payment_required)"
    if paid:
        if session.get("amount_total") != purchase.price_minor_units:
            return (
                f"amount_total {session.get('amount_total')!r} != price "
                f"{purchase.price_minor_units}"
            )
        if str(session.get("currency", "")).lower() != purchase.currency:
            return f"currency {session.get('currency')!r} != {purchase.currency!r}"
    return None


async def apply_checkout_session(
    conn: asyncpg.Connection,
    session: Mapping[str, Any],
    *,
    async_payment_failed: bool = False,
) -> PurchaseUpdate:
    """Apply a Checkout Session's state to its purchase; fulfil it once when paid.

    Used by the webhook (``checkout.session.completed``, ``.async_payment_succeeded``,
    ``.async_payment_failed``, ``.expired``) and by the success return (a session retrieved
    from Stripe). ``payment_status == "paid"`` grants the purchase's credits as one
    ``purchase`` entry keyed ``purchase:{checkout_session_id}``; every later call changes
    nothing. A completed but unpaid session (asynchronous payment) is ``processing``.

    Args:
        session: a Checkout Session object; ``payment_intent`` may be an id or expanded
            (with ``latest_charge`` expanded too, the charge id and receipt URL are kept).
        async_payment_failed: the event said the asynchronous payment failed (the session
            object alone does not).

    Returns:
        ``PurchaseUpdate``; ``purchase`` is None for a session that is not one of ours.
    """
    session_id = session["id"]
    metadata = session.get("metadata") or {}
    public_id = metadata.get("purchase_id")
    payment_intent = session.get("payment_intent")
    payment_intent_id = stripe_id(payment_intent)
    async with conn.transaction():
        await _lock_payment(conn, payment_intent_id)
        row = await conn.fetchrow(
            f"""SELECT {_PURCHASE_COLUMNS} FROM purchases
                WHERE public_id = $1 OR checkout_session_id = $2
                ORDER BY (public_id = $1) DESC NULLS LAST LIMIT 1 FOR UPDATE""",
            public_id,
            session_id,
        )
        if row is None:
            return PurchaseUpdate(None)
        purchase = _purchase(row)
        if purchase.checkout_session_id not in (None, session_id):
            log.warning(
                "checkout session %s names purchase %s, which belongs to session %s: ignored",
                session_id,
                purchase.public_id,
                purchase.checkout_session_id,
            )
            return PurchaseUpdate(None)

        paid = session.get("payment_status") == "paid"
        problem = _session_problem(purchase, session, paid)
        if problem is not None and purchase.status == "paid":
            # Credits were granted on a matching session state; keep them, tell a human.
            log.error("purchase %s: later session state disagrees: %s", purchase.public_id, problem)
            problem = None
        if problem is not None:
            proposed, reason = "needs_review", problem
        elif paid:
            proposed, reason = "paid", None
        elif async_payment_failed:
            proposed, reason = "failed", "async_payment_failed"
        elif session.get("status") == "expired":
            proposed, reason = "expired", "checkout_session_expired"
        elif session.get("status") == "complete":
            proposed, reason = "processing", None
        else:
            proposed, reason = "pending", None
        status = _next_status(purchase.status, proposed)
        charge = (
            payment_intent.get("latest_charge") if isinstance(payment_intent, Mapping) else None
        )
        row = await conn.fetchrow(
            f"""UPDATE purchases SET
                    status = $2,
                    failure_reason = CASE WHEN $2 <> status THEN $3 ELSE failure_reason END,
                    checkout_session_id = $4,
                    payment_intent_id = COALESCE(payment_intent_id, $5),
                    charge_id = COALESCE(charge_id, $6),
                    receipt_url = COALESCE(receipt_url, $7),
                    amount_paid_minor_units = CASE WHEN $2 = 'paid'
                        THEN COALESCE(amount_paid_minor_units, $8) END,
                    paid_at = CASE WHEN $2 = 'paid' THEN COALESCE(paid_at, now()) END,
                    updated_at = now()
                WHERE id = $1 RETURNING {_PURCHASE_COLUMNS}""",
            purchase.id,
            status,
            reason,
            session_id,
            payment_intent_id,
            stripe_id(charge),
            charge.get("receipt_url") if isinstance(charge, Mapping) else None,
            session.get("amount_total"),
        )
        purchase = _purchase(row)
        await _adopt_orphans(conn, purchase)
        update = await _settle(conn, purchase)
        if problem is not None and purchase.status == "needs_review":
            update.rejected = problem
        return update


async def _adopt_orphans(conn: asyncpg.Connection, purchase: Purchase) -> None:
    """Attach refunds and disputes that arrived before the purchase knew its payment."""
    if purchase.payment_intent_id is None and purchase.charge_id is None:
        return
    for table in ("purchase_refunds", "purchase_disputes"):
        await conn.execute(
            f"""UPDATE {table} SET purchase_id = $1, updated_at = now()
                WHERE purchase_id IS NULL AND (payment_intent_id = $2 OR charge_id = $3)""",
            purchase.id,
            purchase.payment_intent_id,
            purchase.charge_id,
        )


async def _purchase_for_payment(
    conn: asyncpg.Connection, payment_intent_id: str | None, charge_id: str | None
) -> Purchase | None:
    row = await conn.fetchrow(
        f"""SELECT {_PURCHASE_COLUMNS} FROM purchases
            WHERE payment_intent_id = $1 OR charge_id = $2
            ORDER BY (payment_intent_id = $1) DESC NULLS LAST LIMIT 1 FOR UPDATE""",
        payment_intent_id,
        charge_id,
    )
    return _purchase(row) if row is not None else None


async def _remember_charge(
    conn: asyncpg.Connection, purchase: Purchase, charge_id: str | None, receipt_url: str | None
) -> Purchase:
    if (charge_id is None or purchase.charge_id is not None) and (
        receipt_url is None or purchase.receipt_url is not None
    ):
        return purchase
    row = await conn.fetchrow(
        f"""UPDATE purchases SET charge_id = COALESCE(charge_id, $2),
                receipt_url = COALESCE(receipt_url, $3), updated_at = now()
            WHERE id = $1 RETURNING {_PURCHASE_COLUMNS}""",
        purchase.id,
        charge_id,
        receipt_url,
    )
    return _purchase(row)


async def apply_refund(conn: asyncpg.Connection, refund: Mapping[str, Any]) -> PurchaseUpdate:
    """Record a refund (from ``refund.created``/``.updated``, ``charge.refund.updated`` or a
    charge's refund list) and reverse the refunded share of the purchase's credits, once.

    Policy (docs/stripe.md, "Refunds"): a refund counts from its first sighting as
    ``pending``/``requires_action``/``succeeded``; it reverses
    ``floor(total_millicredits * refund.amount / amount paid)`` as a ``reversal`` entry keyed
    ``refund:{refund_id}``, linked to the purchase entry, taking at most the balance (the
    rest becomes the account's shortfall). A refund that ends ``failed`` or ``canceled``
    gives the credits back (``refund:{refund_id}:reinstated``). The same refund id seen
    through several events counts once.

    Returns:
        ``PurchaseUpdate``; ``purchase`` is None while the payment is unknown (the refund is
        kept and applied when the purchase's checkout event arrives).
    """
    refund_id = refund["id"]
    payment_intent_id = stripe_id(refund.get("payment_intent"))
    charge_id = stripe_id(refund.get("charge"))
    status = str(refund.get("status") or "pending")
    async with conn.transaction():
        await _lock_payment(conn, payment_intent_id or charge_id)
        purchase = await _purchase_for_payment(conn, payment_intent_id, charge_id)
        await conn.execute(
            """INSERT INTO purchase_refunds (refund_id, purchase_id, payment_intent_id, charge_id,
                   amount_minor_units, currency, status, stripe_created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (refund_id) DO NOTHING""",
            refund_id,
            purchase.id if purchase else None,
            payment_intent_id,
            charge_id,
            int(refund.get("amount") or 0),
            str(refund.get("currency") or "").lower(),
            status,
            _timestamp(refund.get("created")),
        )
        current = await conn.fetchval(
            "SELECT status FROM purchase_refunds WHERE refund_id = $1 FOR UPDATE", refund_id
        )
        if _REFUND_STATUS_RANK.get(status, 0) > _REFUND_STATUS_RANK.get(current, 0):
            await conn.execute(
                "UPDATE purchase_refunds SET status = $2, updated_at = now() WHERE refund_id = $1",
                refund_id,
                status,
            )
        if purchase is None:
            return PurchaseUpdate(None)
        purchase = await _remember_charge(conn, purchase, charge_id, None)
        await _adopt_orphans(conn, purchase)
        return await _settle(conn, purchase)


async def apply_charge(conn: asyncpg.Connection, charge: Mapping[str, Any]) -> PurchaseUpdate:
    """Keep a charge's id and receipt URL on its purchase (from ``charge.*`` events), and
    apply any refunds the charge object lists (``refunds.data``, when Stripe included it).

    Returns:
        ``PurchaseUpdate`` of the last change; ``purchase`` is None for an unknown payment.
    """
    charge_id = stripe_id(charge.get("id"))
    payment_intent_id = stripe_id(charge.get("payment_intent"))
    update = PurchaseUpdate(None)
    async with conn.transaction():
        await _lock_payment(conn, payment_intent_id or charge_id)
        purchase = await _purchase_for_payment(conn, payment_intent_id, charge_id)
        if purchase is not None:
            purchase = await _remember_charge(conn, purchase, charge_id, charge.get("receipt_url"))
            await _adopt_orphans(conn, purchase)
            update = await _settle(conn, purchase)
        refunds = charge.get("refunds")
        listed = refunds.get("data") if isinstance(refunds, Mapping) else None
        entries, posted = list(update.entries), update.posted
        for refund in listed or ():
            if isinstance(refund, Mapping) and refund.get("id"):
                update = await apply_refund(conn, refund)
                entries.extend(update.entries)
                posted = update.posted or posted  # the latest is the newest version
        update.entries, update.posted = entries, posted
        return update


async def apply_dispute(conn: asyncpg.Connection, dispute: Mapping[str, Any]) -> PurchaseUpdate:
    """Record a dispute's state (``charge.dispute.*`` events) and hold back or restore the
    disputed share of the purchase's credits, once per dispute.

    Policy (docs/stripe.md, "Disputes"): Stripe takes the disputed amount when a dispute
    opens, so the credits are held back at once: a ``reversal`` entry keyed
    ``dispute:{dispute_id}:opened`` of ``floor(total_millicredits * dispute.amount / amount
    paid)``, taking at most the balance (the rest is shortfall, which stops paid use). A
    lost dispute keeps it. A won one (also ``warning_closed``: an inquiry that closed) gives
    the whole held amount back as ``dispute:{dispute_id}:won``, which first pays the
    account's outstanding shortfall.

    Returns:
        ``PurchaseUpdate``; ``purchase`` is None while the payment is unknown.
    """
    dispute_id = dispute["id"]
    payment_intent_id = stripe_id(dispute.get("payment_intent"))
    charge_id = stripe_id(dispute.get("charge"))
    status = str(dispute.get("status") or "needs_response")
    async with conn.transaction():
        await _lock_payment(conn, payment_intent_id or charge_id)
        purchase = await _purchase_for_payment(conn, payment_intent_id, charge_id)
        await conn.execute(
            """INSERT INTO purchase_disputes (dispute_id, purchase_id, payment_intent_id,
                   charge_id, amount_minor_units, currency, status, reason, stripe_created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (dispute_id) DO NOTHING""",
            dispute_id,
            purchase.id if purchase else None,
            payment_intent_id,
            charge_id,
            int(dispute.get("amount") or 0),
            str(dispute.get("currency") or "").lower(),
            status,
            dispute.get("reason"),
            _timestamp(dispute.get("created")),
        )
        current = await conn.fetchval(
            "SELECT status FROM purchase_disputes WHERE dispute_id = $1 FOR UPDATE", dispute_id
        )
        # A final status is never replaced (a late "under_review" cannot reopen a won one).
        if current not in _DISPUTE_FINAL and status != current:
            await conn.execute(
                """UPDATE purchase_disputes SET status = $2, updated_at = now()
                   WHERE dispute_id = $1""",
                dispute_id,
                status,
            )
        if purchase is None:
            return PurchaseUpdate(None)
        purchase = await _remember_charge(conn, purchase, charge_id, None)
        await _adopt_orphans(conn, purchase)
        return await _settle(conn, purchase)


async def record_payment_details(
    conn: asyncpg.Connection | asyncpg.Pool,
    purchase_id: int,
    *,
    payment_intent_id: str | None,
    charge_id: str | None,
    receipt_url: str | None,
) -> None:
    """Fill in a purchase's payment intent, charge and receipt URL where still missing (after
    retrieving the session from Stripe once fulfilment is done). Never overwrites."""
    await conn.execute(
        """UPDATE purchases SET payment_intent_id = COALESCE(payment_intent_id, $2),
               charge_id = COALESCE(charge_id, $3), receipt_url = COALESCE(receipt_url, $4),
               updated_at = now()
           WHERE id = $1""",
        purchase_id,
        payment_intent_id,
        charge_id,
        receipt_url,
    )
