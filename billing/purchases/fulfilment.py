"""Buying a package: start a Checkout Session, fulfil from a retrieved session, tell Redis.

The steps that join Postgres, Stripe and Redis for the purchase endpoint, the success return
and the webhook; the HTTP layers (``gateway.purchase_routes``, ``admin_api.stripe_webhook``) only
translate requests and errors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg
from redis.exceptions import RedisError

from billing.errors import POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.ledger import PostedBalance
from billing.metering.holds import HoldStore
from billing.metering.redis_keys import account_key
from billing.purchases.money_events import PurchaseStats, log_money_events
from billing.purchases.packages import Package, get_package
from billing.purchases.purchase_records import (
    Purchase,
    PurchaseUpdate,
    apply_checkout_session,
    attach_checkout_session,
    create_purchase,
    mark_checkout_not_started,
    record_payment_details,
    stripe_id,
)
from billing.purchases.stripe_client import (
    CheckoutSessionRef,
    StripeClient,
    StripeRequestError,
    StripeUnavailableError,
)

log = logging.getLogger(__name__)


CREDITS_PATH = "/credits"


@dataclass(frozen=True, slots=True)
class StartedCheckout:
    """A pending purchase and the Checkout Session created for it."""

    purchase: Purchase
    package: Package
    session: CheckoutSessionRef


def status_url(public_base_url: str, public_id: str) -> str:
    """The gateway page showing a purchase's status."""
    return f"{public_base_url}{CREDITS_PATH}?purchase={quote(public_id)}"


def success_url(public_base_url: str, public_id: str) -> str:
    """Where Checkout sends the user after paying; Stripe fills in ``{CHECKOUT_SESSION_ID}``."""
    return status_url(public_base_url, public_id) + "&session_id={CHECKOUT_SESSION_ID}"


def cancel_url(public_base_url: str, public_id: str) -> str:
    """Where Checkout sends the user who backs out."""
    return status_url(public_base_url, public_id) + "&checkout=cancelled"


async def start_checkout(
    pool: asyncpg.Pool,
    stripe: StripeClient,
    *,
    account_id: int,
    package_code: str,
    return_path: str | None,
    public_base_url: str,
) -> StartedCheckout:
    """Record a pending purchase of the package and create its Checkout Session.

    The price and credits come from the ``packages`` row for ``package_code`` alone.

    Raises:
        UnknownPackageError: no active package with that code (nothing written).
        BillingUnavailableError: Postgres unreachable (503).
        StripeUnavailableError / StripeRequestError: Stripe failed or refused; the purchase
            is marked ``failed`` (nothing was charged).
    """
    try:
        async with pool.acquire() as conn:
            package = await get_package(conn, package_code)
            purchase = await create_purchase(
                conn, account_id=account_id, package=package, return_path=return_path
            )
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    try:
        session = await stripe.create_checkout_session(
            purchase=purchase,
            package=package,
            success_url=success_url(public_base_url, purchase.public_id),
            cancel_url=cancel_url(public_base_url, purchase.public_id),
        )
    except (StripeUnavailableError, StripeRequestError) as exc:
        log.warning("purchase %s: checkout session not created: %s", purchase.public_id, exc)
        try:
            await mark_checkout_not_started(pool, purchase.id, str(exc))
        except POSTGRES_UNAVAILABLE:
            log.exception("purchase %s: could not mark it failed", purchase.public_id)
        raise
    try:
        purchase = await attach_checkout_session(
            pool,
            purchase.id,
            checkout_session_id=session.id,
            checkout_url=session.url,
        )
    except POSTGRES_UNAVAILABLE as exc:
        # The session exists and names the purchase in its metadata, so its webhook still
        # finds it; but the user gets no URL from us this time.
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    log.info(
        "purchase %s started: account %d, package %s, session %s",
        purchase.public_id,
        account_id,
        package.code,
        session.id,
    )
    return StartedCheckout(purchase, package, session)


async def publish_balance(
    holds: HoldStore | None, account_id: int, posted: PostedBalance | None
) -> None:
    """Push a committed posted balance to Redis (``HoldStore.sync_balance``); never raises.

    Redis failing here must not undo or fail the purchase, which is committed. On failure
    the cached balance fields (``bal``, ``ver``; never the holds) are dropped, best effort,
    so the next reserve reloads the balance and shortfall from Postgres. If even that
    fails, Redis is unreachable and every reserve fails closed (503) until it is back; the
    stale cache is corrected by the account's next ledger write (versions only go up).
    """
    if holds is None or posted is None:
        return
    try:
        await holds.sync_balance(account_id, posted)
        return
    except RedisError as exc:
        log.warning("account %d: balance not pushed to redis: %s", account_id, exc)
    try:
        await holds.redis.hdel(account_key(account_id), "bal", "ver")
    except RedisError as exc:
        log.error("account %d: stale cached balance could not be dropped: %s", account_id, exc)


async def fulfil_from_stripe(
    pool: asyncpg.Pool,
    stripe: StripeClient,
    holds: HoldStore | None,
    checkout_session_id: str,
    *,
    public_id: str | None = None,
    stats: PurchaseStats | None = None,
) -> PurchaseUpdate:
    """Retrieve a Checkout Session from Stripe and apply it (the success return).

    Goes through the same idempotent ``apply_checkout_session`` as the webhook, so a user
    whose webhook is late sees the credits at once, and the webhook later changes nothing.
    The session is trusted only as Stripe returns it, never as the browser describes it.

    Args:
        public_id: the purchase the return URL names; a session for another purchase is
            not applied.
        stats: counts the fulfilment when this call made it (the webhook then finds
            nothing to do).

    Returns:
        The update; ``purchase`` is None when the session is not this purchase's.

    Raises:
        StripeUnavailableError / StripeRequestError: retrieval failed (the purchase shows
            as pending; the webhook will fulfil it).
        BillingUnavailableError: Postgres unreachable.
    """
    session = await stripe.retrieve_checkout_session(checkout_session_id)
    named = (session.get("metadata") or {}).get("purchase_id")
    if public_id is not None and named != public_id:
        log.warning(
            "return for purchase %s carried session %s of %s", public_id, session["id"], named
        )
        return PurchaseUpdate(None)
    try:
        async with pool.acquire() as conn:
            update = await apply_checkout_session(conn, session)
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    if update.purchase is not None:
        log_money_events(update, stripe_event_id=None)
        if stats is not None:
            stats.record(update, session.get("created"), time.time())
        await publish_balance(holds, update.purchase.account_id, update.posted)
    return update


async def complete_payment_details(
    pool: asyncpg.Pool, stripe: StripeClient, purchase: Purchase
) -> None:
    """After a webhook fulfilled a purchase from the event's session (payment intent id
    only), fetch the charge id and receipt URL from Stripe. Best effort: failures are
    logged; the purchase and its credits do not depend on it."""
    if purchase.checkout_session_id is None or purchase.receipt_url is not None:
        return
    try:
        session = await stripe.retrieve_checkout_session(purchase.checkout_session_id)
        payment_intent = session.get("payment_intent")
        charge = payment_intent.get("latest_charge") if isinstance(payment_intent, dict) else None
        await record_payment_details(
            pool,
            purchase.id,
            payment_intent_id=stripe_id(payment_intent),
            charge_id=stripe_id(charge),
            receipt_url=charge.get("receipt_url") if isinstance(charge, dict) else None,
        )
    except (StripeUnavailableError, StripeRequestError, *POSTGRES_UNAVAILABLE) as exc:
        log.warning("purchase %s: payment details not fetched: %s", purchase.public_id, exc)
