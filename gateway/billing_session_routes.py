"""Signing in to the Credits page: portal links, the sign-in form's API, sign-out.

Routes (``billing_session_routes``):
    POST /api/billing/portal-sessions  (bearer key) ``{"returnTo"?}`` -> 201 a portal link
    GET  /credits/portal/{token}       a link's confirmation page (names the account; a
                                       Continue button POSTs here); the link stays unused
    POST /credits/portal/{token}       (Origin checked) use the link up: new session, 303 to
                                       its returnTo or /credits; used, expired, unknown: 410
    GET  /api/billing/session          the signed-in session (with its CSRF token), or 401
    POST /api/billing/session          ``{"apiKey"}`` -> 201 a session for the key's account
    POST /api/billing/sign-out         (CSRF) the session deleted, its cookie cleared

How sessions and CSRF work: ``gateway.billing_session``; links: ``billing.portal_links``.
"""

from __future__ import annotations

import aiohttp_jinja2
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from billing.errors import POSTGRES_UNAVAILABLE, REDIS_UNAVAILABLE, BillingUnavailableError
from billing.portal_links import (
    PORTAL_PATH,
    LinkGrant,
    SessionHolder,
    consume_portal_link,
    create_portal_link,
    peek_portal_link,
    portal_link_document,
    session_holder,
)
from billing.purchases.fulfilment import CREDITS_PATH
from gateway import appkeys as gateway_keys
from gateway.auth import INVALID_KEY_MESSAGE
from gateway.billing_session import (
    bearer_caller,
    check_csrf,
    check_origin,
    end_billing_session,
    load_billing_session,
    session_json,
    signed_in_session,
    start_billing_session,
)
from gateway.credits_page import PAGE_HEADERS, link_expired_page
from gateway.json_body import json_object
from runtime import appkeys
from runtime.errors import AuthenticationError, InvalidRequestError, json_response
from runtime.return_to import validated_return_to

_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}


def billing_session_routes() -> list[tuple[str, str, Handler]]:
    """The sign-in routes as ``(method, path, handler)``; the gateway app adds them with its
    error answers."""
    return [
        ("POST", "/api/billing/portal-sessions", handle_create_portal_session),
        ("GET", PORTAL_PATH + "/{token}", handle_show_portal_link),
        ("HEAD", PORTAL_PATH + "/{token}", handle_show_portal_link),
        ("POST", PORTAL_PATH + "/{token}", handle_open_portal_link),
        ("GET", "/api/billing/session", handle_get_session),
        ("POST", "/api/billing/session", handle_sign_in),
        ("POST", "/api/billing/sign-out", handle_sign_out),
    ]


async def handle_create_portal_session(request: web.Request) -> web.Response:
    """``POST /api/billing/portal-sessions``: a single-use sign-in link for the bearer key's
    account (a session cookie cannot make one: a session cannot extend itself).

    Body: ``{"returnTo"?: "/..."}`` (or a URL on ``RETURN_TO_ORIGINS``). Answers 201
    ``portal_link_document``.
    Errors: 401 bad key; 400 malformed body or returnTo; 503 Redis or Postgres down.
    """
    caller = await bearer_caller(request)
    body = json_object(await request.read(), empty_is_object=True)
    settings = request.app[appkeys.SETTINGS]
    return_to = validated_return_to(body.get("returnTo"), settings.return_to_origins)
    try:
        link = await create_portal_link(
            request.app[appkeys.REDIS],
            account_id=caller.account_id,
            api_key_id=caller.api_key_id,
            return_to=return_to,
            public_base_url=settings.public_base_url,
            ttl_s=settings.portal_link_ttl_s,
        )
    except REDIS_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc
    return json_response(portal_link_document(link), 201)


async def handle_show_portal_link(request: web.Request) -> web.Response:
    """``GET /credits/portal/{token}``: the confirmation page. It names the link's account
    and has a "Continue" button, a form that POSTs to the same URL; the link is NOT used up
    (a GET, a HEAD, a mail scanner's prefetch or an attacker's link in a victim's browser
    signs nobody in: login CSRF).

    A used, expired or unknown link, or one whose account is gone or whose key was revoked
    since: 410, an HTML page pointing to ``/credits``. Redis or Postgres down: 503.
    """
    try:
        grant = await peek_portal_link(request.app[appkeys.REDIS], request.match_info["token"])
    except REDIS_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc
    holder = await _holder(request, grant)
    if holder is None:
        return link_expired_page(request)
    context = {"strings": request.app[gateway_keys.CREDITS_STRINGS], "email": holder.email}
    response = aiohttp_jinja2.render_template("portal_link.html", request, context)
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the
    # form's POST, which check_origin refuses.
    response.headers.update({**PAGE_HEADERS, "Referrer-Policy": "same-origin"})
    return response


async def handle_open_portal_link(request: web.Request) -> web.Response:
    """``POST /credits/portal/{token}`` (the confirmation page's Continue): use the link up
    and sign in (replacing any session the browser had), then 303 to the link's returnTo
    (percent-encoded) or ``/credits``.

    A foreign ``Origin``: 403 ``csrf_failed`` (the link is not used up). A used, expired or
    unknown link, or one whose account is gone or whose key was revoked since: 410, the
    HTML page pointing to ``/credits``. Redis or Postgres down: 503.
    """
    check_origin(request)
    try:
        grant = await consume_portal_link(request.app[appkeys.REDIS], request.match_info["token"])
    except REDIS_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc
    if grant is None or await _holder(request, grant) is None:
        return link_expired_page(request)
    location = str(URL(grant.return_to or CREDITS_PATH))  # yarl percent-encodes "/a b", "/ü"
    response = web.Response(status=303, headers={**_PAGE_HEADERS, "Location": location})
    await start_billing_session(
        request,
        response,
        account_id=grant.account_id,
        api_key_id=grant.api_key_id,
        via="portal",
    )
    return response


async def _holder(request: web.Request, grant: LinkGrant | None) -> SessionHolder | None:
    """The link's account while the link may still sign in (``session_holder``).

    Raises:
        BillingUnavailableError: Postgres unreachable (503).
    """
    if grant is None:
        return None
    try:
        return await session_holder(
            request.app[appkeys.DB_POOL], grant.account_id, grant.api_key_id
        )
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc


async def handle_get_session(request: web.Request) -> web.Response:
    """``GET /api/billing/session``: 200 ``session_json`` (the page reads its CSRF token
    here), or 401 ``not_signed_in``."""
    session, _ = await signed_in_session(request)
    return json_response(session_json(session), 200, {"Cache-Control": "no-store"})


async def handle_sign_in(request: web.Request) -> web.Response:
    """``POST /api/billing/session``: the sign-in form. Body ``{"apiKey": "..."}``; the key
    is checked, never stored or echoed; a suspended account's key signs in too (it may
    read). 201 ``session_json`` with the cookie.

    Errors: 403 ``csrf_failed`` when ``Origin`` is sent and is not ours (``check_origin``:
    login CSRF); 400 no ``apiKey``; 401 an unknown, revoked or expired key; 503.
    """
    check_origin(request)
    body = json_object(await request.read(), empty_is_object=True)
    key = body.get("apiKey")
    if not isinstance(key, str) or not key.strip():
        raise InvalidRequestError(
            "apiKey is required: one of your API keys.", param="apiKey", code="missing_api_key"
        )
    identity = await request.app[gateway_keys.AUTH].identify(key.strip())
    if identity is None:
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    response = web.Response(status=201, headers={"Cache-Control": "no-store"})
    session = await start_billing_session(
        request,
        response,
        account_id=identity.account_id,
        api_key_id=identity.api_key_id,
        via="api_key",
    )
    response.body = orjson.dumps(session_json(session))
    response.content_type = "application/json"
    return response


async def handle_sign_out(request: web.Request) -> web.Response:
    """``POST /api/billing/sign-out`` (``X-CSRF-Token``): the session deleted server-side,
    the cookie cleared; 200 ``{"object": "billing_session", "signedIn": false}``. Without a
    session: the same answer (nothing to protect, nothing to do)."""
    session = await load_billing_session(request)
    response = json_response(
        {"object": "billing_session", "signedIn": False}, 200, {"Cache-Control": "no-store"}
    )
    if not session.new:
        check_csrf(request, session)
    await end_billing_session(request, response, session)
    return response
