"""Who is calling the user billing API (``/api/billing/*``): an API key as a bearer token, or
the billing session cookie set by a portal link or the sign-in form.

``billing_caller(request)`` is the one way a billing route learns its caller.

Sessions (aiohttp-session's storage, without its app-wide middleware: the proxy's hot path
must not pay for it; billing routes load and save the session themselves):

- The cookie ``creditgate_billing`` holds only a random id (``secrets.token_urlsafe(32)``);
  the data lives in Redis under ``cg:v1:billing_session:<id>`` for ``BILLING_SESSION_TTL_S``
  from sign-in (an absolute lifetime: reading does not extend it). Cookie attributes:
  ``Path=/api/billing; HttpOnly; SameSite=Lax``, ``Secure`` when ``PUBLIC_BASE_URL`` is
  https, ``Max-Age=BILLING_SESSION_TTL_S``.
- Data: ``{"accountId", "apiKeyId" (the key that signed it in, or null for an operator's
  portal link), "csrfToken", "via": "portal" | "api_key"}``.
- Each cookie-authenticated request re-checks the account exists and the signing-in key is
  still active (``billing.portal_links.session_holder_status``); otherwise it is signed out.
- CSRF: a cookie-authenticated state-changing call must send ``X-CSRF-Token`` equal to the
  session's token (constant-time compare), else 403 ``csrf_failed``. A bearer key is not
  ambient authority and needs none. Every state-changing call that a cookie could authorise
  or set (checkout and sign-out by cookie, sign-in, opening a portal link) also refuses a
  foreign ``Origin`` (``check_origin``, the one origin check).

Redis unreachable: 503 (``BillingUnavailableError``); Postgres unreachable: 503.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp_session import Session
from yarl import URL

from billing.errors import POSTGRES_UNAVAILABLE, REDIS_UNAVAILABLE, BillingUnavailableError
from billing.portal_links import session_holder_status
from gateway import appkeys as gateway_keys
from gateway.auth import INVALID_KEY_MESSAGE, bearer_key
from runtime import appkeys
from runtime.errors import AuthenticationError, GatewayError

CSRF_HEADER = "X-CSRF-Token"

_SIGNED_OUT_MESSAGE = "You are not signed in. Open a portal link or sign in with an API key."


class CsrfFailedError(GatewayError):
    """A cookie-authenticated state-changing call without the session's CSRF token, or a
    sign-in from another origin (403)."""

    status = 403
    error_type = "invalid_request_error"
    code = "csrf_failed"


@dataclass(frozen=True, slots=True)
class BillingCaller:
    """The account a billing request acts for.

    Attributes:
        account_id: the account (every query a billing route makes is scoped to it).
        api_key_id: the key that authenticated the request or signed the session in; None for
            a session opened by an operator's portal link.
        via: ``"bearer"`` (an ``Authorization: Bearer`` API key) or ``"session"`` (cookie).
        account_suspended: an operator suspended the account: it may read, not buy.
    """

    account_id: int
    api_key_id: int | None
    via: str
    account_suspended: bool = False


async def load_billing_session(request: web.Request) -> Session:
    """The request's billing session (new and empty when signed out).

    aiohttp-session's storage is called directly, not through ``get_session``: that needs
    its middleware's string keys on the request (aiohttp warns about those), and the
    session is loaded once per billing request anyway.

    Raises:
        BillingUnavailableError: Redis unreachable (503).
    """
    try:
        return await request.app[gateway_keys.BILLING_SESSIONS].load_session(request)
    except REDIS_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc


async def start_billing_session(
    request: web.Request,
    response: web.StreamResponse,
    *,
    account_id: int,
    api_key_id: int | None,
    via: str,
) -> Session:
    """Sign in: a new session (a new id, never the one the browser sent: no fixation) for
    ``account_id``, stored and set as a cookie on ``response``; the request's old session,
    if any, is deleted.

    Raises:
        BillingUnavailableError: Redis unreachable (503).
    """
    store = request.app[gateway_keys.BILLING_SESSIONS]
    old = await load_billing_session(request)
    try:
        if not old.new:
            old.invalidate()
            await store.save_session(request, response, old)
        session = await store.new_session()
        session.update(
            accountId=account_id,
            apiKeyId=api_key_id,
            csrfToken=secrets.token_urlsafe(32),
            via=via,
        )
        await store.save_session(request, response, session)
    except REDIS_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc
    return session


async def end_billing_session(
    request: web.Request, response: web.StreamResponse, session: Session
) -> None:
    """Sign out: the session's data deleted from Redis, its cookie cleared on ``response``.

    Raises:
        BillingUnavailableError: Redis unreachable (503).
    """
    session.invalidate()
    try:
        await request.app[gateway_keys.BILLING_SESSIONS].save_session(request, response, session)
    except REDIS_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc


def check_origin(request: web.Request) -> None:
    """A state-changing request that a browser marks with ``Origin`` must come from our own
    pages: that origin is ``PUBLIC_BASE_URL``'s, or the request's own (``scheme://Host`` as
    it arrived: the page opened as ``http://localhost:8080`` while ``PUBLIC_BASE_URL`` says
    127.0.0.1; behind a proxy that keeps ``Host``, the public host). Without ``Origin``
    (not a browser, or an old one) the request passes: the CSRF token or the key decides.

    Raises:
        CsrfFailedError: ``Origin`` is another site's, or ``null`` (403).
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return
    origin = origin.lower()
    public = str(URL(request.app[appkeys.SETTINGS].public_base_url).origin()).lower()
    if origin not in (public, f"{request.scheme}://{request.host}".lower()):
        raise CsrfFailedError("This request is only accepted from this site's own pages.")


def check_csrf(request: web.Request, session: Session) -> None:
    """A cookie-authenticated state-changing call: ``check_origin``, then the session's
    CSRF token.

    Raises:
        CsrfFailedError: a foreign ``Origin``, or ``X-CSRF-Token`` missing or not the
            session's token (403).
    """
    check_origin(request)
    given = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
    expected = str(session.get("csrfToken", "")).encode()
    if not given or not hmac.compare_digest(given, expected):
        raise CsrfFailedError(
            f"This request needs the {CSRF_HEADER} header of your billing session "
            "(GET /api/billing/session gives it)."
        )


def session_json(session: Session) -> dict[str, Any]:
    """A signed-in session at the JSON edge: ``{"object": "billing_session", "signedIn":
    true, "accountId": "<id>", "csrfToken", "via": "portal" | "api_key"}``."""
    return {
        "object": "billing_session",
        "signedIn": True,
        "accountId": str(session["accountId"]),
        "csrfToken": session["csrfToken"],
        "via": session["via"],
    }


async def signed_in_session(request: web.Request) -> tuple[Session, str]:
    """The request's session when it is signed in and still valid, with the account's
    status (``"active"`` or ``"suspended"``).

    Raises:
        AuthenticationError: no session, or its account is gone or its key revoked (401).
        BillingUnavailableError: Redis or Postgres unreachable (503).
    """
    session = await load_billing_session(request)
    if session.new or "accountId" not in session:
        raise AuthenticationError(_SIGNED_OUT_MESSAGE, code="not_signed_in")
    try:
        status = await session_holder_status(
            request.app[appkeys.DB_POOL], session["accountId"], session["apiKeyId"]
        )
    except POSTGRES_UNAVAILABLE as exc:
        raise BillingUnavailableError(f"postgres: {exc}") from exc
    if status is None:
        raise AuthenticationError(_SIGNED_OUT_MESSAGE, code="not_signed_in")
    return session, status


async def bearer_caller(request: web.Request) -> BillingCaller:
    """The caller of an ``Authorization: Bearer`` API key (a suspended account's too).

    Raises:
        AuthenticationError: no key, or an unknown, revoked or expired one (401).
        BillingUnavailableError: Postgres unreachable (503).
    """
    identity = await request.app[gateway_keys.AUTH].identify(bearer_key(request))
    if identity is None:
        raise AuthenticationError(INVALID_KEY_MESSAGE)
    suspended = identity.controls is not None and identity.controls.account_suspended
    return BillingCaller(identity.account_id, identity.api_key_id, "bearer", suspended)


async def billing_caller(request: web.Request, *, state_changing: bool = False) -> BillingCaller:
    """The caller of a billing route: the bearer key when an ``Authorization`` header is
    sent, else the session cookie.

    ``state_changing`` marks a POST that changes something: a cookie-authenticated one must
    also carry the session's CSRF token.

    Raises:
        AuthenticationError: no key and no session, or an unknown, revoked or expired key, or
            a session whose account is gone or whose key was revoked (401).
        CsrfFailedError: a cookie-authenticated state-changing call without the token (403).
        BillingUnavailableError: Postgres or Redis unreachable (503).
    """
    if "Authorization" in request.headers:
        return await bearer_caller(request)
    session, status = await signed_in_session(request)
    if state_changing:
        check_csrf(request, session)
    return BillingCaller(
        session["accountId"], session["apiKeyId"], "session", status == "suspended"
    )
