"""The Credits page: a server-rendered shell whose JavaScript calls the user billing API.

Routes (``credits_page_routes``):
    GET /credits                the page (``gateway/credits/templates/credits.html``); Checkout's
                                success and cancel URLs land here
                                (``?purchase=<id>&session_id=<cs>`` / ``&checkout=cancelled``)
    GET /credits/static/{name}  its script and style sheet (``gateway/credits/static/``)

Every string the page shows lives in ``gateway/credits/strings.json`` (the template reads it,
and embeds it as ``<script type="application/json" id="strings">`` for the script); the FAQ's
refund and expiry answers come from settings (``CREDITS_REFUND_POLICY_TEXT``,
``CREDITS_EXPIRY_TEXT``). The page carries no account data: the script fetches it with the
billing session cookie (``Path=/api/billing``). A success return still applies the Checkout
Session at once (``_fulfil_on_return``, the webhook's idempotent fulfilment), so the credits
show even when the webhook is late; the page then follows the purchase until it is paid.

Security headers on the page: a Content-Security-Policy without
inline scripts or styles, ``nosniff``, ``no-referrer``, ``no-store``.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from billing.errors import POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.purchases.fulfilment import CREDITS_PATH, fulfil_from_stripe
from billing.purchases.purchase_records import Purchase, PurchaseNotFoundError, get_purchase
from billing.purchases.stripe_client import StripeRequestError, StripeUnavailableError
from gateway import appkeys as gateway_keys
from runtime import appkeys
from runtime.errors import InvalidRequestError, NotFoundError
from runtime.return_to import validated_return_to
from runtime.settings import Settings

log = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATIC_NAME = re.compile(r"[a-z0-9-]+\.(?:js|css)")
_STATIC_TYPES = {"js": "text/javascript", "css": "text/css"}
_FOLLOWED = ("pending", "processing")


def credits_page_routes() -> list[tuple[str, str, Handler]]:
    """The page's routes as ``(method, path, handler)``; the gateway app adds them with its
    error answers after ``setup_credits_page``."""
    return [
        ("GET", CREDITS_PATH, handle_credits_page),
        ("GET", CREDITS_PATH + "/static/{name}", handle_static),
    ]


def setup_credits_page(app: web.Application, settings: Settings) -> None:
    """Load the string catalogue (with the configured FAQ answers) and the templates
    (autoescaped jinja2 from the ``gateway.credits`` package)."""
    app[gateway_keys.CREDITS_STRINGS] = load_strings(settings)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("gateway.credits", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def load_strings(settings: Settings) -> dict[str, Any]:
    """``strings.json`` with ``faq.refundA`` and ``faq.expiryA`` from settings."""
    strings: dict[str, Any] = orjson.loads(
        resources.files("gateway.credits").joinpath("strings.json").read_bytes()
    )
    strings["faq"]["refundA"] = settings.credits_refund_policy_text
    strings["faq"]["expiryA"] = settings.credits_expiry_text
    return strings


def link_expired_page(request: web.Request) -> web.Response:
    """The 410 page for a portal link that was used, expired or never existed."""
    context = {"strings": request.app[gateway_keys.CREDITS_STRINGS], "credits_path": CREDITS_PATH}
    response = aiohttp_jinja2.render_template("link_expired.html", request, context, status=410)
    response.headers.update(PAGE_HEADERS)
    return response


async def handle_credits_page(request: web.Request) -> web.Response:
    """``GET /credits``: the page.

    Query: ``returnTo`` (where "Return to app" leads; invalid ones are ignored), and the
    Checkout returns: ``purchase`` (public id), ``session_id`` (success: while the purchase
    is pending and the id is its session's, the session is retrieved from Stripe and
    applied), ``checkout=cancelled``. An unknown purchase: 404 with the page and a notice.
    Postgres down: 503 with the page and a notice (the webhook still fulfils). Stripe down:
    the purchase shows as pending.
    """
    status = 200
    purchase: Purchase | None = None
    public_id = request.query.get("purchase")
    problem: str | None = None
    if public_id:
        try:
            purchase = await _returned_purchase(request, public_id)
        except PurchaseNotFoundError:
            status, problem = 404, "notFound"
        except POSTGRES_UNAVAILABLE as exc:
            log.warning("credits page: postgres: %s", exc)
            status, problem = 503, "unavailable"
    context = {
        "strings": request.app[gateway_keys.CREDITS_STRINGS],
        "notice": _purchase_notice(request, purchase, problem),
        "return_to": _return_to(request, purchase),
    }
    response = aiohttp_jinja2.render_template("credits.html", request, context, status=status)
    response.headers.update(PAGE_HEADERS)
    return response


async def _returned_purchase(request: web.Request, public_id: str) -> Purchase:
    purchase = await get_purchase(request.app[appkeys.DB_POOL], public_id)
    session_id = request.query.get("session_id")
    if session_id and session_id == purchase.checkout_session_id:
        purchase = await _fulfil_on_return(request.app, purchase, session_id)
    return purchase


async def _fulfil_on_return(app: web.Application, purchase: Purchase, session_id: str) -> Purchase:
    """Apply the session as Stripe has it now, while the purchase still waits for payment."""
    stripe = app.get(appkeys.STRIPE)
    if stripe is None or purchase.status not in _FOLLOWED:
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


def _purchase_notice(
    request: web.Request, purchase: Purchase | None, problem: str | None
) -> dict[str, Any] | None:
    """What the page says about the purchase it was opened for: ``{"status", "key",
    "credits", "purchaseId", "follow"}`` (``key`` names the text in ``purchase.*`` or
    ``page.*``), or None without one. ``follow``: the script polls the purchase."""
    if problem is not None:
        return {"status": "error", "key": problem, "credits": "", "purchaseId": "", "follow": False}
    if purchase is None:
        return None
    returned = "session_id" in request.query
    key = purchase.status
    if purchase.status == "pending":
        if request.query.get("checkout") == "cancelled":
            key = "cancelled"
        elif not returned:
            key = "unpaid"
    return {
        "status": purchase.status,
        "key": key,
        "credits": _credits_2dp(purchase.total_millicredits),
        "purchaseId": purchase.public_id,
        "follow": returned and purchase.status in _FOLLOWED,
    }


def _credits_2dp(amount_millicredits: int) -> str:
    """Credits with thousands separators and 2 decimals, rounded half up (the page's style)."""
    cents = (amount_millicredits + 5) // 10
    whole, frac = divmod(cents, 100)
    return f"{whole:,}.{frac:02d}"


def _return_to(request: web.Request, purchase: Purchase | None) -> str | None:
    """The "Return to app" target: the purchase's (validated when Checkout started), else the
    query's ``returnTo`` when valid."""
    if purchase is not None and purchase.return_path:
        return purchase.return_path
    try:
        return validated_return_to(
            request.query.get("returnTo"), request.app[appkeys.SETTINGS].return_to_origins
        )
    except InvalidRequestError:
        return None


async def handle_static(request: web.Request) -> web.StreamResponse:
    """``GET /credits/static/{name}``: the page's script or style sheet (revalidated by ETag).

    Raises:
        NotFoundError: not one of the package's ``.js``/``.css`` files (404 envelope).
    """
    name = request.match_info["name"]
    path = resources.files("gateway.credits").joinpath("static", name)
    if not _STATIC_NAME.fullmatch(name) or not path.is_file():
        raise NotFoundError(f"No static file {name!r}.", code="not_found")
    with resources.as_file(path) as file_path:
        response = web.FileResponse(
            file_path,
            headers={
                "Content-Type": _STATIC_TYPES[name.rsplit(".", 1)[1]] + "; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
            },
        )
    return response
