"""Stripe webhook events, each applied at most once.

``process_event`` stores the event id in ``stripe_events`` and applies the event in the same
transaction. The insert is ``ON CONFLICT DO NOTHING``: of any number of concurrent deliveries
of one event, the first inserts (the others wait on the primary key until it commits, then
find the row and change nothing); if the first fails, its transaction rolls back, the id is
not stored, and Stripe's retry is processed as new. Effects themselves are idempotent by
Stripe ids too (see ``billing.purchases.purchase_ledger``), so two different events carrying the
same
fact (``refund.created`` and ``charge.refunded``) also count once.

Events acted on:
    checkout.session.completed, .async_payment_succeeded   fulfil when paid
    checkout.session.async_payment_failed, .expired        mark the purchase, no credits
    refund.created, refund.updated, charge.refund.updated  reverse the refunded share
    charge.refunded                                         the charge's refunds, as above
    charge.dispute.created, .updated, .closed,
    charge.dispute.funds_withdrawn, .funds_reinstated      hold back / restore credits
Any other type is stored as ``unhandled``, logged and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from billing.purchases.money_events import log_money_events, reversal_kind
from billing.purchases.purchase_records import (
    PurchaseUpdate,
    apply_charge,
    apply_checkout_session,
    apply_dispute,
    apply_refund,
)
from billing.purchases.stripe_client import StripeClient, StripeRequestError

log = logging.getLogger(__name__)

CHECKOUT_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    }
)
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "charge.refund.updated"})
DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)
CHARGE_REFUNDED = "charge.refunded"
HANDLED_EVENTS = CHECKOUT_EVENTS | REFUND_EVENTS | DISPUTE_EVENTS | {CHARGE_REFUNDED}
"""The types to subscribe the webhook endpoint to (docs/stripe.md)."""


@dataclass(slots=True)
class WebhookStats:
    """Counters of the webhook, exported at scrape time by ``admin_api.money_metrics``
    (``creditgate_stripe_webhook_*``, ``creditgate_reversed_*``). Purchases fulfilled are
    counted by ``billing.purchases.money_events.PurchaseStats`` (the success return fulfils
    too).

    Attributes:
        events: deliveries by ``(event type, outcome)``: the type when in ``HANDLED_EVENTS``,
            else ``other``; outcomes are the ``stripe_events`` outcomes plus ``duplicate``.
        failures: deliveries answered with an error, by reason (``unconfigured``,
            ``signature``, ``unavailable``, ``error``).
        reversed_millicredits: credits taken back by refunds and disputes, by kind
            (``refund``, ``dispute``); credits given back later (a failed refund, a won
            dispute) are not subtracted (a counter only grows; they are logged).
    """

    events: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    reversed_millicredits: Counter[str] = field(default_factory=Counter)

    def record(self, event_type: str, result: EventResult) -> None:
        """Count one processed delivery and the credits its reversals took back."""
        label = event_type if event_type in HANDLED_EVENTS else "other"
        self.events[(label, result.outcome)] += 1
        update = result.update
        if update is None or update.purchase is None:
            return
        for entry in update.entries:
            kind = reversal_kind(entry)
            if kind is not None and entry.amount_millicredits < 0:
                self.reversed_millicredits[kind] -= entry.amount_millicredits


@dataclass(frozen=True, slots=True)
class EventResult:
    """What processing one delivery did.

    Attributes:
        duplicate: the event id was stored already; nothing changed.
        outcome: ``processed``, ``ignored``, ``unhandled`` or ``rejected`` (as stored).
        update: the purchase change (None for duplicates and unhandled types). Its
            ``posted`` balance is committed and should be pushed to Redis.
    """

    duplicate: bool
    outcome: str
    update: PurchaseUpdate | None = None


def _created_at(event: Mapping[str, Any]) -> datetime | None:
    created = event.get("created")
    if isinstance(created, int) and not isinstance(created, bool):
        return datetime.fromtimestamp(created, UTC)
    return None


async def _charge_with_refunds(stripe: StripeClient, charge: Mapping[str, Any]) -> dict[str, Any]:
    """The charge with its complete refund list: as embedded when Stripe sent all of it,
    else listed from the API (events rendered at API versions since 2022-11-15 omit it).

    Stripe refusing the listing (4xx: a restricted key without Refunds read access, ...)
    leaves the charge as it came: its refunds still count through the ``refund.*`` events,
    and retrying would not help. Stripe unreachable raises (the delivery is retried).
    """
    refunds = charge.get("refunds")
    embedded = isinstance(refunds, Mapping) and isinstance(refunds.get("data"), list)
    if embedded and not refunds.get("has_more"):  # type: ignore[union-attr]
        return dict(charge)
    if not int(charge.get("amount_refunded") or 0) > 0 or not charge.get("id"):
        return dict(charge)
    try:
        listed = await stripe.list_refunds(str(charge["id"]))
    except StripeRequestError as exc:
        log.warning(
            "charge %s: refunds not listed, relying on refund events: %s", charge["id"], exc
        )
        return dict(charge)
    return {**charge, "refunds": {"object": "list", "data": listed, "has_more": False}}


async def process_event(
    pool: asyncpg.Pool, stripe: StripeClient | None, event: Mapping[str, Any]
) -> EventResult:
    """Apply a verified event at most once (see the module docstring).

    Args:
        event: a verified event (``billing.purchases.stripe_client.construct_webhook_event``).
        stripe: for ``charge.refunded`` without an embedded refund list (the refunds are
            listed from the API before the transaction); None when Stripe is not configured.

    Raises:
        StripeUnavailableError: listing refunds failed (Stripe unreachable or failing);
            nothing was written (the webhook answers 503 and Stripe retries).
        OSError / asyncpg errors: Postgres unreachable or failing; nothing was written.
    """
    event_type = str(event["type"])
    obj: Mapping[str, Any] = event["data"]["object"]
    if event_type == CHARGE_REFUNDED and stripe is not None:
        obj = await _charge_with_refunds(stripe, obj)
    async with pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            """INSERT INTO stripe_events (event_id, event_type, object_id, livemode,
                   stripe_created_at)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (event_id) DO NOTHING RETURNING true""",
            event["id"],
            event_type,
            obj.get("id"),
            bool(event.get("livemode", False)),
            _created_at(event),
        )
        if not inserted:
            return EventResult(duplicate=True, outcome="duplicate")
        update = await _dispatch(conn, event_type, obj)
        outcome = _outcome(event_type, update)
        await conn.execute(
            "UPDATE stripe_events SET outcome = $2, purchase_id = $3 WHERE event_id = $1",
            event["id"],
            outcome,
            update.purchase.id if update and update.purchase else None,
        )
    _log_result(event, outcome, update)
    if update is not None:
        log_money_events(update, stripe_event_id=str(event["id"]))
    return EventResult(duplicate=False, outcome=outcome, update=update)


async def _dispatch(
    conn: asyncpg.Connection, event_type: str, obj: Mapping[str, Any]
) -> PurchaseUpdate | None:
    if event_type in CHECKOUT_EVENTS:
        return await apply_checkout_session(
            conn,
            obj,
            async_payment_failed=event_type == "checkout.session.async_payment_failed",
        )
    if event_type in REFUND_EVENTS:
        return await apply_refund(conn, obj)
    if event_type == CHARGE_REFUNDED:
        return await apply_charge(conn, obj)
    if event_type in DISPUTE_EVENTS:
        return await apply_dispute(conn, obj)
    return None


def _outcome(event_type: str, update: PurchaseUpdate | None) -> str:
    if update is None:
        return "unhandled"
    if update.rejected:
        return "rejected"
    if update.purchase is None and event_type in CHECKOUT_EVENTS:
        return "ignored"
    # A refund or dispute of a payment not (yet) known is stored for adoption: processed.
    return "processed"


def _log_result(event: Mapping[str, Any], outcome: str, update: PurchaseUpdate | None) -> None:
    purchase = update.purchase if update else None
    if outcome == "rejected" and update is not None:
        log.error(
            "stripe event %s (%s): purchase %s needs review: %s",
            event["id"],
            event["type"],
            purchase.public_id if purchase else None,
            update.rejected,
        )
    elif outcome == "unhandled":
        log.info("stripe event %s: unhandled type %s", event["id"], event["type"])
    else:
        log.info(
            "stripe event %s (%s): %s; purchase %s; %d ledger entries",
            event["id"],
            event["type"],
            outcome,
            purchase.public_id if purchase else None,
            len(update.entries) if update else 0,
        )
