"""Admin tokens over HTTP: create (the token shown once), list, rename and expire, revoke;
and ``GET /admin/v1/me``. Every route but ``me`` needs the admin role."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ConfigDict, Field

from admin_api.framework import (
    AdminContext,
    AdminModel,
    AdminRouter,
    IdPath,
    Page,
    Paginated,
    Role,
    Unprocessable,
)
from admin_api.models import ShortText, Timestamp
from billing import admin_tokens
from billing.admin_tokens import AdminTokenRecord, Keep

router = AdminRouter(tag="tokens")


class TokenOut(AdminModel):
    """An admin token as listed (never the token itself)."""

    id: int
    name: str
    role: Role
    token_prefix: str = Field(description="The token's first 13 characters.")
    created_at: datetime
    created_by_token_id: int | None = Field(description="null: created by the CLI.")
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(description="Updated at most once a minute.")

    @classmethod
    def of(cls, record: AdminTokenRecord) -> TokenOut:
        """The JSON form of a stored token."""
        return cls.model_validate(record, from_attributes=True)


class TokenCreated(TokenOut):
    """A new token: ``token`` is shown this once; only its SHA-256 digest is stored."""

    token: str = Field(description="`cg_admin_` + 43 characters; shown once.")


class TokenCreate(AdminModel):
    """A new token's name, role and optional expiry (in the future)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "ci deploys", "role": "viewer"}]}
    )

    name: ShortText = ""
    role: Role
    expires_at: Timestamp | None = None


class TokenUpdate(AdminModel):
    """Rename and/or set the expiry (null: never expires); absent fields are unchanged."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "renamed"}]})

    name: ShortText | None = None
    expires_at: Timestamp | None = None


class Me(AdminModel):
    """The calling token."""

    token_id: int
    name: str
    role: Role


def _future(expires_at: datetime | None) -> datetime | None:
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise Unprocessable("expiresAt must be in the future.", param="expiresAt")
    return expires_at


@router.post(
    "/admin/v1/tokens",
    role=Role.ADMIN,
    body=TokenCreate,
    response=TokenCreated,
    status=201,
    summary="Create an admin token (shown once)",
)
async def create_token(ctx: AdminContext) -> TokenCreated:
    body: TokenCreate = ctx.body
    async with ctx.pool.acquire() as conn:
        token, record = await admin_tokens.create_admin_token(
            conn, ctx.actor, role=body.role, name=body.name, expires_at=_future(body.expires_at)
        )
    return TokenCreated(**TokenOut.of(record).model_dump(), token=token)


@router.get(
    "/admin/v1/tokens",
    role=Role.VIEWER,
    query=Page,
    response=Paginated[TokenOut],
    summary="List admin tokens, newest first",
)
async def list_tokens(ctx: AdminContext) -> Paginated[TokenOut]:
    page: Page = ctx.query
    rows = await admin_tokens.list_admin_tokens(
        ctx.pool, limit=page.limit + 1, before_id=page.after_id
    )
    kept, next_cursor = page.window(rows, key=lambda row: row.id)
    return Paginated[TokenOut](data=[TokenOut.of(row) for row in kept], next_cursor=next_cursor)


@router.patch(
    "/admin/v1/tokens/{id}",
    role=Role.ADMIN,
    params=IdPath,
    body=TokenUpdate,
    response=TokenOut,
    summary="Rename an admin token or set its expiry",
)
async def update_token(ctx: AdminContext) -> TokenOut:
    body: TokenUpdate = ctx.body
    given = body.model_fields_set
    expires_at = _future(body.expires_at) if "expires_at" in given else Keep.EXPIRY
    async with ctx.pool.acquire() as conn:
        record = await admin_tokens.update_admin_token(
            conn, ctx.actor, ctx.params.id, name=body.name, expires_at=expires_at
        )
    return TokenOut.of(record)


@router.post(
    "/admin/v1/tokens/{id}/revoke",
    role=Role.ADMIN,
    params=IdPath,
    response=TokenOut,
    summary="Revoke an admin token now",
)
async def revoke_token(ctx: AdminContext) -> TokenOut:
    async with ctx.pool.acquire() as conn:
        record = await admin_tokens.revoke_admin_token(conn, ctx.actor, ctx.params.id)
    return TokenOut.of(record)


@router.get("/admin/v1/me", role=Role.VIEWER, response=Me, summary="The calling token")
async def me(ctx: AdminContext) -> Me:
    assert ctx.actor.token_id is not None  # every admin route authenticates a token
    return Me(token_id=ctx.actor.token_id, name=ctx.actor.name, role=ctx.role)
