"""``POST /admin/v1/accounts/{id}/portal-sessions``: a portal link for an account, so an
operator can send a user a one-time sign-in to the Credits page (``billing.portal_links``).

Operators make them (a link signs in as the account); one audit row
``portal_session.create`` per link, with its expiry and returnTo, never its URL.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from admin_api.framework import AdminContext, AdminError, AdminModel, AdminRouter, BadRequest, Role
from admin_api.models import IdPath
from billing.accounts import get_account
from billing.audit import record_audit
from billing.errors import REDIS_UNAVAILABLE
from billing.portal_links import create_portal_link, portal_link_document
from runtime import appkeys
from runtime.errors import InvalidRequestError
from runtime.return_to import validated_return_to

# The accounts' tag: the route acts on an account (and the role matrix makes one for it).
router = AdminRouter(tag="accounts")


class LinksUnavailable(AdminError):
    """503: Redis is unreachable; no link was made and nothing was recorded."""

    status = 503
    error_type = "server_error"
    code = "redis_unavailable"


class PortalSessionCreate(AdminModel):
    """Where the opened link lands: a path on the gateway's site (default ``/credits``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"returnTo": "/credits"}]})

    return_to: str | None = Field(
        None,
        description="A path such as `/credits?tab=usage`, or a URL on `RETURN_TO_ORIGINS`.",
    )


class PortalSessionOut(AdminModel):
    """A single-use sign-in link: give ``url`` to the account's user; it works once, until
    ``expiresAt`` (``PORTAL_LINK_TTL_S``)."""

    object: Literal["billing_portal.session"]
    url: str = Field(description="`<PUBLIC_BASE_URL>/credits/portal/<token>`; shown once.")
    expires_at: str = Field(description="ISO 8601.")
    return_to: str | None


@router.post(
    "/admin/v1/accounts/{id}/portal-sessions",
    role=Role.OPERATOR,
    params=IdPath,
    body=PortalSessionCreate,
    response=PortalSessionOut,
    status=201,
    summary="Make a single-use link that signs the account's user in to the Credits page",
)
async def create_portal_session(ctx: AdminContext) -> PortalSessionOut:
    settings = ctx.settings
    try:
        return_to = validated_return_to(ctx.body.return_to, settings.return_to_origins)
    except InvalidRequestError as exc:
        raise BadRequest(exc.message, param="returnTo", code=exc.code) from None
    try:
        async with ctx.transaction() as conn:
            account = await get_account(conn, ctx.params.id)
            # The URL is answered only after the audit row commits: a link whose audit row
            # failed is never handed out (it expires unused).
            link = await create_portal_link(
                ctx.request.app[appkeys.REDIS],
                account_id=account.id,
                api_key_id=None,
                return_to=return_to,
                public_base_url=settings.public_base_url,
                ttl_s=settings.portal_link_ttl_s,
            )
            await record_audit(
                conn,
                ctx.actor,
                action="portal_session.create",
                target_type="account",
                target_id=account.id,
                after={"expiresAt": link.expires_at.isoformat(), "returnTo": return_to},
            )
    except REDIS_UNAVAILABLE as exc:
        raise LinksUnavailable(f"Redis is unreachable; no link was made ({exc}).") from None
    return PortalSessionOut.model_validate(portal_link_document(link))
