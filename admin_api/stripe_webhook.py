"""``POST /stripe/webhook`` on the admin service: Stripe's events, verified, applied once.

Answers (Stripe retries every non-2xx answer for up to three days):
    200  applied, a repeat of an event already stored, or a type we do not act on
         (``{"received": true, "duplicate": bool, "outcome": str}``)
    400  no or bad ``Stripe-Signature`` (no configured secret matches), a timestamp more than
         300 s old or in the future, or a body that is not a Stripe event; nothing written
    503  webhook secrets not configured, or Postgres or Stripe unreachable; nothing written
    500  anything else; nothing written (the transaction rolled back)

Never logs payloads or signatures: only event ids, types and outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from admin_api.money_metrics import install_webhook_metrics
from billing.errors import POSTGRES_UNAVAILABLE
from billing.purchases.fulfilment import complete_payment_details, publish_balance
from billing.purchases.stripe_client import (
    InvalidWebhookError,
    StripeRequestError,
    StripeUnavailableError,
    construct_webhook_event,
)
from billing.purchases.stripe_events import WebhookStats, process_event
from runtime import appkeys
from runtime.errors import error_response, json_response
from runtime.resources import stripe_ctx

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/stripe/webhook"
_PAYMENT_DETAILS_TIMEOUT_S = 5.0


def add_webhook_routes(app: web.Application) -> None:
    """Add ``POST /stripe/webhook``, its counters (``appkeys.STRIPE_WEBHOOK_STATS``, and the
    purchases of ``appkeys.PURCHASE_STATS``, set before; exported on the app's registry with
    the fulfilment latency histogram) and the Stripe client's ``cleanup_ctx`` (after the
    app's Postgres and Redis contexts)."""
    app[appkeys.STRIPE_WEBHOOK_STATS] = WebhookStats()
    install_webhook_metrics(app)
    app.cleanup_ctx.append(stripe_ctx)
    app.router.add_post(WEBHOOK_PATH, handle_stripe_webhook)


async def handle_stripe_webhook(request: web.Request) -> web.Response:
    """Verify the delivery, apply its event once, push changed balances to Redis.

    See the module docstring for the answers. After a newly applied event changed a
    balance, the committed balance goes to Redis (a Redis failure is logged, never fails
    the delivery: see ``billing.purchases.fulfilment.publish_balance``). After a fulfilment, the
    charge id and receipt URL are fetched from Stripe, best effort.
    """
    app = request.app
    settings = app[appkeys.SETTINGS]
    stats = app[appkeys.STRIPE_WEBHOOK_STATS]
    if not settings.stripe_webhook_secrets:
        stats.failures["unconfigured"] += 1
        log.error("stripe webhook delivery refused: STRIPE_WEBHOOK_SECRETS is not set")
        return error_response(
            503, "Webhook signing secrets are not configured.", code="webhook_unconfigured"
        )
    payload = await request.read()
    try:
        event = construct_webhook_event(
            payload, request.headers.get("Stripe-Signature"), settings.stripe_webhook_secrets
        )
    except InvalidWebhookError as exc:
        stats.failures["signature"] += 1
        log.warning("stripe webhook delivery rejected: %s", exc)
        return error_response(400, f"Invalid webhook delivery: {exc}", code="invalid_webhook")
    stripe = app.get(appkeys.STRIPE)
    try:
        result = await process_event(app[appkeys.DB_POOL], stripe, event)
    except (StripeUnavailableError, StripeRequestError, *POSTGRES_UNAVAILABLE) as exc:
        stats.failures["unavailable"] += 1
        log.warning(
            "stripe event %s (%s) not applied, retry expected: %s", event["id"], event["type"], exc
        )
        return error_response(503, "Temporarily unable to process the event.", code="unavailable")
    except Exception:
        stats.failures["error"] += 1
        log.exception("stripe event %s (%s) failed", event["id"], event["type"])
        return error_response(500, "Internal error processing the event.", code="internal_error")
    stats.record(str(event["type"]), result)
    update = result.update
    if update is not None:
        session_created = event["data"]["object"].get("created")
        app[appkeys.PURCHASE_STATS].record(update, session_created, time.time())
    if update is not None and update.purchase is not None and update.entries:
        purchase = update.purchase
        await publish_balance(app.get(appkeys.HOLDS), purchase.account_id, update.posted)
        if stripe is not None and purchase.status == "paid":
            try:
                async with asyncio.timeout(_PAYMENT_DETAILS_TIMEOUT_S):
                    await complete_payment_details(app[appkeys.DB_POOL], stripe, purchase)
            except TimeoutError:
                log.warning("purchase %s: payment details timed out", purchase.public_id)
    return json_response(
        {"received": True, "duplicate": result.duplicate, "outcome": result.outcome}, 200
    )
