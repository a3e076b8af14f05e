"""Buying credits on the gateway: packages and starting Checkout.

Routes (``checkout_routes``):
    GET  /api/billing/packages               the active packages (no authentication)
    POST /api/billing/checkout               ``{"packageCode", "returnTo"?}`` -> Checkout URL
                                             (a bearer key, or the session cookie + CSRF)
    GET  /api/billing/purchases/{purchaseId}  one of the caller's purchases

Checkout's success and cancel URLs land on the Credits page (``gateway.credits_page``).
The checkout route's answers are counted by status (``count_checkout_answers``).
Errors use OpenAI's envelope through the gateway's error answers
(``runtime.errors.answer_errors``), chosen by class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from billing.errors import POSTGRES_UNAVAILABLE, AccountDeactivatedError, BillingUnavailableError
from billing.ledger import PostedBalance, posted_balance
from billing.purchases.fulfilment import (
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
from billing.units import money_fields
from gateway import appkeys as gateway_keys
from gateway.billing_session import billing_caller
from gateway.json_body import json_object
from runtime import appkeys
from runtime.errors import GatewayError, InvalidRequestError, NotFoundError, json_response
from runtime.return_to import validated_return_to


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


#: The checkout route, whose answers ``count_checkout_answers`` counts.
CHECKOUT_ROUTE = ("POST", "/api/billing/checkout")


def checkout_routes() -> list[tuple[str, str, Handler]]:
    """The purchase routes as ``(method, path, handler)``; the gateway app adds them with its
    error answers (``CHECKOUT_ROUTE``'s inside ``count_checkout_answers``), and
    ``stripe_ctx`` after its Postgres and Redis contexts."""
    return [
        ("GET", "/api/billing/packages", handle_packages),
        (*CHECKOUT_ROUTE, handle_checkout),
        ("GET", "/api/billing/purchases/{purchase_id}", handle_purchase),
    ]


def count_checkout_answers(answer: Handler) -> Handler:
    """``answer`` (the checkout handler wrapped in its error answers) counting every answer
    by HTTP status (``TrafficMetrics.count_checkout``); an exception nothing answered counts
    as the 500 aiohttp sends. A client that left (a cancellation) is not counted."""

    async def counted(request: web.Request) -> web.StreamResponse:
        traffic = request.app[gateway_keys.TRAFFIC]
        try:
            response = await answer(request)
        except web.HTTPException as exc:
            traffic.count_checkout(exc.status)
            raise
        except Exception:
            traffic.count_checkout(500)
            raise
        traffic.count_checkout(response.status)
        return response

    return counted


#: The package whose price per credit the others' ``savingsPercent`` is measured against.
REFERENCE_PACKAGE_CODE = "starter"


def reference_package(packages: Sequence[Package]) -> Package | None:
    """Starter among ``packages`` (the reference of ``package_json``), None if not offered."""
    return next((p for p in packages if p.code == REFERENCE_PACKAGE_CODE), None)


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
    reference = reference_package(packages)
    return json_response(
        {"object": "list", "data": [package_json(p, reference) for p in packages]}, 200
    )


async def handle_checkout(request: web.Request) -> web.Response:
    """``POST /api/billing/checkout``: start buying a package.

    Body: ``{"packageCode": "starter" | "professional" | "enterprise", "returnTo"?: "/..."}``
    (``returnPath`` is the older name of ``returnTo``; ``runtime.return_to`` validates it);
    any amount or credits field is ignored. Answers 201 with ``{"object":
    "checkout_session", "purchaseId", "checkoutSessionId", "checkoutUrl", "statusUrl",
    "status": "pending", "package": {...}}`` (the package as ``GET /api/billing/packages``
    shows it, savings against Starter included).

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
    body = json_object(await request.read())
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
    pool = request.app[appkeys.DB_POOL]
    try:
        # Read before Stripe is asked: a Postgres failure after it would lose the session URL.
        reference = reference_package(await list_packages(pool))
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    try:
        started = await start_checkout(
            pool,
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
            "package": package_json(started.package, reference),
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
