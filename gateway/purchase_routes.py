"""Buying credits on the gateway: packages, starting Checkout, and the return page.

Routes (``checkout_routes``):
    GET  /api/billing/packages               the active packages (no authentication)
    POST /api/billing/checkout               ``{"packageCode", "returnTo"?}`` -> Checkout URL
                                             (a bearer key, or the session cookie + CSRF)
    GET  /api/billing/purchases/{purchaseId}  one of the caller's purchases
    GET  /credits                            plain status page; Checkout's success and cancel
                                             URLs land here (``?purchase=...&session_id=...``)

The success return fulfils through the same idempotent function as the webhook, so credits
show at once even when the webhook is late. Errors use OpenAI's envelope through the
gateway's error answers (``runtime.errors.answer_errors``), chosen by class.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from billing.errors import POSTGRES_UNAVAILABLE, AccountDeactivatedError, BillingUnavailableError
from billing.ledger import PostedBalance, posted_balance
from billing.purchases.fulfilment import (
    CREDITS_PATH,
    fulfil_from_stripe,
    start_checkout,
    status_url,
)
from billing.purchases.packages import (
    Package,
    UnknownPackageError,
    list_packages,
    price_per_1k_credits,
    savings_percent,
)
from billing.purchases.purchase_records import Purchase, PurchaseNotFoundError, get_purchase
from billing.purchases.stripe_client import StripeClient, StripeRequestError, StripeUnavailableError
from billing.units import millicredits_to_credits, millicredits_to_usd, money_fields
from gateway.billing_session import billing_caller
from runtime import appkeys
from runtime.errors import GatewayError, InvalidRequestError, NotFoundError, json_response
from runtime.return_to import validated_return_to

log = logging.getLogger(__name__)


class PurchasesUnavailableError(GatewayError):
    """Purchases are switched off (``PURCHASES_ENABLED=false``) or Stripe is not configured,
    or Stripe is unreachable (503)."""

    status = 503
    error_type = "server_error"
    code = "purchases_unavailable"


class CheckoutRefusedError(GatewayError):
    """Stripe refused to create the Checkout Session: our configuration is wrong (502)."""

    status = 502
    error_type = "server_error"
    code = "checkout_failed"


def checkout_routes() -> list[tuple[str, str, Handler]]:
    """The purchase routes as ``(method, path, handler)``; the gateway app adds them with its
    error answers, and ``stripe_ctx`` after its Postgres and Redis contexts."""
    return [
        ("GET", "/api/billing/packages", handle_packages),
        ("POST", "/api/billing/checkout", handle_checkout),
        ("GET", "/api/billing/purchases/{purchase_id}", handle_purchase),
        ("GET", CREDITS_PATH, handle_credits_page),
    ]


def package_json(package: Package, reference: Package | None = None) -> dict[str, Any]:
    """A package at the JSON edge: money as strings, display numbers beside them.

    Shape: ``{"code", "name", "badge", "tagline", "currency", "price": "9.99",
    "priceMinorUnits": "999",
    "baseMillicredits": "9990000", "baseCredits": 9990.0, "baseUsd": 9.99, "bonus...",
    "total...", "pricePer1kCredits": "1.0000", "savingsPercent": "0.0"}``; savings are
    against ``reference`` (Starter), or null without one.
    """
    return {
        "object": "package",
        "code": package.code,
        "name": package.name,
        "badge": package.badge,
        "tagline": package.tagline,
        "currency": package.currency,
        "price": str(package.price),
        "priceMinorUnits": str(package.price_minor_units),
        **money_fields("base", package.base_millicredits),
        **money_fields("bonus", package.bonus_millicredits),
        **money_fields("total", package.total_millicredits),
        "pricePer1kCredits": str(price_per_1k_credits(package)),
        "savingsPercent": str(savings_percent(package, reference)) if reference else None,
    }


def purchase_json(purchase: Purchase, balance: PostedBalance | None = None) -> dict[str, Any]:
    """A purchase at the JSON edge (status, package, price, credits, receipt)."""
    body: dict[str, Any] = {
        "object": "purchase",
        "id": purchase.public_id,
        "status": purchase.status,
        "packageCode": purchase.package_code,
        "currency": purchase.currency,
        "priceMinorUnits": str(purchase.price_minor_units),
        **money_fields("credits", purchase.total_millicredits),
        "checkoutSessionId": purchase.checkout_session_id,
        "checkoutUrl": purchase.checkout_url if purchase.status == "pending" else None,
        "receiptUrl": purchase.receipt_url,
        "createdAt": purchase.created_at.isoformat(),
        "paidAt": purchase.paid_at.isoformat() if purchase.paid_at else None,
    }
    if balance is not None:
        body.update(money_fields("balance", balance.balance_millicredits))
        body.update(money_fields("shortfall", balance.shortfall_millicredits))
    return body


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            "The request body is not valid JSON.", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body


def _stripe_or_503(app: web.Application) -> StripeClient:
    if not app[appkeys.CONTROL].flags.purchases_enabled:
        raise PurchasesUnavailableError(
            "Credit purchases are temporarily disabled. Your balance and API access are not "
            "affected; please try again later."
        )
    stripe = app.get(appkeys.STRIPE)
    if stripe is None:
        raise PurchasesUnavailableError(
            "Credit purchases are not available: payments are not configured on this server."
        )
    return stripe


async def handle_packages(request: web.Request) -> web.Response:
    """``GET /api/billing/packages``: ``{"object": "list", "data": [package...]}``."""
    try:
        packages = await list_packages(request.app[appkeys.DB_POOL])
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    reference = next((p for p in packages if p.code == "starter"), None)
    return json_response(
        {"object": "list", "data": [package_json(p, reference) for p in packages]}, 200
    )


async def handle_checkout(request: web.Request) -> web.Response:
    """``POST /api/billing/checkout``: start buying a package.

    Body: ``{"packageCode": "starter" | "professional" | "enterprise", "returnTo"?: "/..."}``
    (``returnPath`` is the older name of ``returnTo``; ``runtime.return_to`` validates it);
    any amount or credits field is ignored. Answers 201 with ``{"object":
    "checkout_session", "purchaseId", "checkoutSessionId", "checkoutUrl", "statusUrl",
    "status": "pending", "package": {...}}``.

    Caller: a bearer key, or the billing session cookie with ``X-CSRF-Token``
    (``gateway.billing_session``).

    Errors: 401 bad key or not signed in; 403 ``csrf_failed``, or ``account_deactivated``
    (the account is suspended); 400 malformed body, unknown package, bad return path; 503
    purchases disabled, Stripe not configured or unreachable, Postgres down; 502 Stripe
    refused.
    """
    caller = await billing_caller(request, state_changing=True)
    if caller.account_suspended:
        raise AccountDeactivatedError(caller.account_id)
    stripe = _stripe_or_503(request.app)
    body = await _json_object(request)
    code = body.get("packageCode")
    if not isinstance(code, str) or not code:
        raise InvalidRequestError(
            "packageCode is required: one of the codes from GET /api/billing/packages.",
            param="packageCode",
            code="missing_package_code",
        )
    settings = request.app[appkeys.SETTINGS]
    field = "returnTo" if "returnTo" in body else "returnPath"
    return_path = validated_return_to(body.get(field), settings.return_to_origins, param=field)
    try:
        started = await start_checkout(
            request.app[appkeys.DB_POOL],
            stripe,
            account_id=caller.account_id,
            package_code=code,
            return_path=return_path,
            public_base_url=settings.public_base_url,
        )
    except UnknownPackageError as exc:
        raise InvalidRequestError(
            f"Unknown package {exc.code!r}: use a code from GET /api/billing/packages.",
            param="packageCode",
            code="unknown_package",
        ) from exc
    except StripeUnavailableError as exc:
        raise PurchasesUnavailableError(
            "The payment provider could not be reached. You have not been charged; "
            "please try again in a moment."
        ) from exc
    except StripeRequestError as exc:
        raise CheckoutRefusedError(
            "Checkout could not be started. You have not been charged; please contact support."
        ) from exc
    purchase = started.purchase
    return json_response(
        {
            "object": "checkout_session",
            "purchaseId": purchase.public_id,
            "checkoutSessionId": started.session.id,
            "checkoutUrl": started.session.url,
            "statusUrl": status_url(settings.public_base_url, purchase.public_id),
            "status": purchase.status,
            "package": package_json(started.package),
        },
        201,
    )


async def handle_purchase(request: web.Request) -> web.Response:
    """``GET /api/billing/purchases/{purchaseId}``: one of the caller's purchases, with the
    account's balance and shortfall. 404 for unknown ids and other accounts' purchases."""
    caller = await billing_caller(request)
    pool = request.app[appkeys.DB_POOL]
    public_id = request.match_info["purchase_id"]
    try:
        purchase = await get_purchase(pool, public_id, account_id=caller.account_id)
        balance = await posted_balance(pool, caller.account_id)
    except PurchaseNotFoundError as exc:
        raise NotFoundError(
            f"No purchase {public_id!r}.", param="purchaseId", code="purchase_not_found"
        ) from exc
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    return json_response(purchase_json(purchase, balance), 200)


async def handle_credits_page(request: web.Request) -> web.Response:
    """``GET /credits``: a plain page with a purchase's status (until the Credits page).

    Query: ``purchase`` (the public id), ``session_id`` (Checkout's success return: while
    the purchase is pending and the id is its session's, the session is retrieved from
    Stripe and applied, so the credits show at once), ``checkout=cancelled`` (the cancel
    return). The public id and session id are unguessable; the page shows no personal data
    beyond the balance. Stripe down: the page says "pending" (the webhook will fulfil).
    Postgres down: 503.
    """
    public_id = request.query.get("purchase")
    session_id = request.query.get("session_id")
    cancelled = request.query.get("checkout") == "cancelled"
    pool = request.app[appkeys.DB_POOL]
    try:
        if not public_id:
            return _page("Credits", _packages_html(await list_packages(pool)))
        try:
            purchase = await get_purchase(pool, public_id)
        except PurchaseNotFoundError:
            return _page("Purchase not found", "<p>We could not find this purchase.</p>", 404)
        if session_id and session_id == purchase.checkout_session_id:
            purchase = await _fulfil_on_return(request.app, purchase, session_id)
        balance = await posted_balance(pool, purchase.account_id)
    except POSTGRES_UNAVAILABLE as exc:
        log.warning("credits page: postgres: %s", exc)
        return _page(
            "Credits", "<p>We cannot show this right now. Please reload in a moment.</p>", 503
        )
    return _page(
        "Your purchase",
        _purchase_html(purchase, balance, cancelled=cancelled, returned=bool(session_id)),
        refresh_s=5 if purchase.status in ("pending", "processing") and session_id else None,
    )


async def _fulfil_on_return(app: web.Application, purchase: Purchase, session_id: str) -> Purchase:
    """Apply the session as Stripe has it now, while the purchase still waits for payment."""
    stripe = app.get(appkeys.STRIPE)
    if stripe is None or purchase.status not in ("pending", "processing"):
        return purchase
    try:
        update = await fulfil_from_stripe(
            app[appkeys.DB_POOL],
            stripe,
            app.get(appkeys.HOLDS),
            session_id,
            public_id=purchase.public_id,
        )
    except (StripeUnavailableError, StripeRequestError, BillingUnavailableError) as exc:
        # The webhook fulfils it; until then the page says "pending".
        log.warning("success return for %s not applied: %s", purchase.public_id, exc)
        return purchase
    return update.purchase or purchase


def _credits_text(amount_millicredits: int) -> str:
    return f"{millicredits_to_credits(amount_millicredits):,.2f}"


_STATUS_TEXT = {
    "paid": "Payment received. {credits} credits were added to your account.",
    "processing": (
        "Purchase pending: your payment is being processed by your bank. {credits} credits "
        "will be added as soon as it clears; you do not need to stay on this page."
    ),
    "failed": (
        "The payment did not go through. You have not been charged and no credits were added."
    ),
    "expired": "This checkout expired before payment. You have not been charged.",
    "needs_review": (
        "We received your payment and are checking it before adding {credits} credits. "
        "Our support team has been notified; no action is needed from you."
    ),
}


def _purchase_html(
    purchase: Purchase, balance: PostedBalance | None, *, cancelled: bool, returned: bool
) -> str:
    credits = _credits_text(purchase.total_millicredits)
    if purchase.status == "pending" and cancelled:
        text = (
            "Checkout was cancelled. You have not been charged and no credits were added. "
            "You can buy credits whenever you like."
        )
    elif purchase.status == "pending":
        text = (
            "Purchase pending: we are waiting for the payment provider to confirm your "
            f"payment. {credits} credits will be added as soon as it does."
            if returned
            else "This purchase has not been paid yet."
        )
    else:
        text = _STATUS_TEXT[purchase.status].format(credits=credits)
    parts = [
        f'<p id="status" data-status="{html.escape(purchase.status)}">{html.escape(text)}</p>',
        f"<p>Package: {html.escape(purchase.package_code.title())} ({credits} credits)</p>",
    ]
    if balance is not None:
        parts.append(
            f'<p id="balance">Balance: {_credits_text(balance.balance_millicredits)} Credits '
            f"(~${millicredits_to_usd(balance.balance_millicredits):,.2f} USD equivalent)</p>"
        )
    if purchase.receipt_url:
        parts.append(f'<p><a href="{html.escape(purchase.receipt_url)}">Receipt</a></p>')
    parts.append(
        f'<p><a href="{html.escape(purchase.return_path or CREDITS_PATH)}">Continue</a></p>'
    )
    return "\n".join(parts)


def _packages_html(packages: list[Package]) -> str:
    rows = "\n".join(
        f"<li>{html.escape(p.name)}: ${p.price:.2f} for "
        f"{_credits_text(p.total_millicredits)} credits"
        + (f" ({html.escape(p.badge)})" if p.badge else "")
        + (f": {html.escape(p.tagline)}" if p.tagline else "")
        + "</li>"
        for p in packages
    )
    return (
        "<p>Credits are prepaid. 1,000 Credits = $1.00. You only pay for actual token "
        "usage.</p>\n"
        f"<ul>{rows}</ul>\n<p>Buy with <code>POST /api/billing/checkout</code>.</p>"
    )


def _page(
    title: str, body: str, status: int = 200, *, refresh_s: int | None = None
) -> web.Response:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="robots" content="noindex">'
        f"{refresh}<title>{html.escape(title)}</title></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    return web.Response(
        text=document,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
