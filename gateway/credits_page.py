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
import secrets
from importlib import resources
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from billing.api_keys import KEY_PREFIX
from billing.errors import POSTGRES_UNAVAILABLE, BillingUnavailableError
from billing.purchases.fulfilment import CREDITS_PATH, fulfil_from_stripe
from billing.purchases.purchase_records import (
    PUBLIC_ID_PREFIX,
    Purchase,
    PurchaseNotFoundError,
    get_purchase,
)
from billing.purchases.stripe_client import StripeRequestError, StripeUnavailableError
from gateway import appkeys as gateway_keys
from gateway.billing_api import MAX_ESTIMATE_TOKENS
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
_PURCHASE_ID = re.compile(re.escape(PUBLIC_ID_PREFIX) + r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,255}", re.ASCII)


def credits_page_routes() -> list[tuple[str, str, Handler]]:
    """The page's routes as ``(method, path, handler)``; the gateway app adds them with its
    error answers after ``setup_credits_page``."""
    return [
        ("GET", CREDITS_PATH, handle_credits_page),
        ("HEAD", CREDITS_PATH, handle_credits_page),
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
    """``strings.json`` with ``faq.refundA`` and ``faq.expiryA`` from settings, and the API
    keys' prefix (``billing.api_keys.KEY_PREFIX``) in ``signIn.keyHint``."""
    strings: dict[str, Any] = orjson.loads(
        resources.files("gateway.credits").joinpath("strings.json").read_bytes()
    )
    strings["faq"]["refundA"] = settings.credits_refund_policy_text
    strings["faq"]["expiryA"] = settings.credits_expiry_text
    strings["signIn"]["keyHint"] = strings["signIn"]["keyHint"].replace("{keyPrefix}", KEY_PREFIX)
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
    Checkout returns: ``purchase`` (public id), ``session_id`` (success), ``checkout=cancelled``.

    The request carries no session (the cookie's path is ``/api/billing``), so the server
    cannot tell who asks: it shows a purchase (status, amount, stored returnTo) only on
    Checkout's success return, where ``session_id`` is the purchase's Checkout Session id
    (holding Stripe's session id is the proof); while that purchase is pending the session is
    retrieved from Stripe and applied. Any other ``purchase=`` (no, another or a malformed
    session id, an unknown purchase) renders nothing about it: the script looks it up with the
    session cookie (``GET /api/billing/purchases/{id}``, 404 for other accounts). A cancel
    return says that checkout was cancelled, without amounts. Postgres down: 503 with the page
    and a notice (the webhook still fulfils). Stripe down: the purchase shows as pending.
    """
    status = 200
    purchase: Purchase | None = None
    problem: str | None = None
    public_id = _well_formed(_PURCHASE_ID, request.query.get("purchase"))
    session_id = _well_formed(_SESSION_ID, request.query.get("session_id"))
    if public_id and session_id:
        try:
            purchase = await _returned_purchase(request, public_id, session_id)
        except POSTGRES_UNAVAILABLE as exc:
            log.warning("credits page: postgres: %s", exc)
            status, problem = 503, "unavailable"
    context = {
        "strings": request.app[gateway_keys.CREDITS_STRINGS],
        "notice": _purchase_notice(request, public_id, purchase, problem),
        "return_to": _return_to(request, purchase),
        "max_estimate_tokens": MAX_ESTIMATE_TOKENS,
    }
    response = aiohttp_jinja2.render_template("credits.html", request, context, status=status)
    response.headers.update(PAGE_HEADERS)
    return response


def _well_formed(shape: re.Pattern[str], value: str | None) -> str | None:
    """``value`` when it has the id's shape (ASCII), else None (never sent to Postgres)."""
    return value if value is not None and shape.fullmatch(value) else None


async def _returned_purchase(
    request: web.Request, public_id: str, session_id: str
) -> Purchase | None:
    """The purchase of a success return whose ``session_id`` is its Checkout Session's (then
    applied as Stripe has it), else None: unknown purchase or not its session."""
    try:
        purchase = await get_purchase(request.app[appkeys.DB_POOL], public_id)
    except PurchaseNotFoundError:
        return None
    if purchase.checkout_session_id is None or not secrets.compare_digest(
        session_id, purchase.checkout_session_id
    ):
        return None
    return await _fulfil_on_return(request.app, purchase, session_id)


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
            stats=app[appkeys.PURCHASE_STATS],
        )
    except (StripeUnavailableError, StripeRequestError, BillingUnavailableError) as exc:
        # The webhook fulfils it; until then the page says "pending".
        log.warning("success return for %s not applied: %s", purchase.public_id, exc)
        return purchase
    return update.purchase or purchase


def _purchase_notice(
    request: web.Request, public_id: str | None, purchase: Purchase | None, problem: str | None
) -> dict[str, Any]:
    """What the page says about the purchase it was opened for: ``{"status", "key",
    "credits", "purchaseId", "follow", "lookup"}``. ``key`` names the text in ``purchase.*``
    or ``page.*`` ("" = nothing shown); ``follow``: the script polls the purchase (a proven
    success return); ``lookup``: the script asks the API about ``purchaseId`` with the
    session cookie and shows it only to its owner."""
    notice: dict[str, Any] = {
        "status": "",
        "key": "",
        "credits": "",
        "purchaseId": "",
        "follow": False,
        "lookup": False,
    }
    cancelled = request.query.get("checkout") == "cancelled"
    if problem is not None:
        notice.update(status="error", key=problem)
    elif purchase is not None:
        key = "cancelled" if cancelled and purchase.status == "pending" else purchase.status
        notice.update(
            status=purchase.status,
            key=key,
            credits=_credits_2dp(purchase.total_millicredits),
            purchaseId=purchase.public_id,
            follow=purchase.status in _FOLLOWED and not cancelled,
        )
    elif cancelled and public_id is not None:
        notice.update(status="cancelled", key="cancelled")
    elif public_id is not None:
        notice.update(purchaseId=public_id, lookup=True)
    return notice


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
