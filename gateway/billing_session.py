"""Who is calling the user billing API (``/api/billing/*``): an API key as a bearer token, or
the billing session cookie set by a portal link or the sign-in form.

``billing_caller(request)`` is the one way a billing route learns its caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway import appkeys as gateway_keys


@dataclass(frozen=True, slots=True)
class BillingCaller:
    """The account a billing request acts for.

    Attributes:
        account_id: the account (every query a billing route makes is scoped to it).
        api_key_id: the key that authenticated the request or signed the session in; None for
            a session opened by a portal link.
        via: ``"bearer"`` (an ``Authorization: Bearer`` API key) or ``"session"`` (cookie).
    """

    account_id: int
    api_key_id: int | None
    via: str


async def billing_caller(request: web.Request, *, state_changing: bool = False) -> BillingCaller:
    """The caller of a billing route.

    ``state_changing`` marks a POST that changes something: a cookie-authenticated one must
    also carry the session's CSRF token.

    Raises:
        AuthenticationError: no key and no session, or an unknown, revoked or expired key (401).
        BillingUnavailableError: Postgres unreachable (503).
    """
    identity = await request.app[gateway_keys.AUTH].authenticate(request)
    return BillingCaller(identity.account_id, identity.api_key_id, "bearer")
