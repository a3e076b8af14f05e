"""API keys over HTTP: issue (the key shown once), list, show, change and revoke.

Viewers read; operators change. Each change is one transaction with one audit row and a
``KEYS`` control event (``billing.api_keys``), so every gateway drops the key from its auth
cache at once: a revoked key is refused within seconds, whatever ``AUTH_CACHE_TTL_S``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

from admin_api.account_models import ControlsIn, KeyOut
from admin_api.framework import AdminContext, AdminModel, AdminRouter, IdPath, Role
from admin_api.models import ShortText, Timestamp
from billing import accounts, api_keys

router = AdminRouter(tag="keys")

RequestsPerMinute = Annotated[int, Field(ge=1, le=1_000_000)]


class KeyCreate(ControlsIn):
    """A new key's name, optional expiry, spend controls and requests-per-minute limit."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "production", "monthlySpendCapCredits": "1000"}]}
    )

    name: ShortText = ""
    expires_at: Timestamp | None = None
    requests_per_minute: RequestsPerMinute | None = None


class KeyUpdate(KeyCreate):
    """Absent fields are unchanged; null clears (expiry, a cap, the model list, the limit)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"requestsPerMinute": 60}]})

    name: ShortText | None = None  # type: ignore[assignment]


class KeyList(AdminModel):
    """Every key of an account (revoked and expired too), oldest first."""

    data: list[KeyOut]


class KeyCreated(KeyOut):
    """A new key: ``key`` is shown this once; only its SHA-256 digest is stored."""

    key: str = Field(description="`cg_live_` + 43 characters; shown once.")


@router.post(
    "/admin/v1/accounts/{id}/keys",
    role=Role.OPERATOR,
    params=IdPath,
    body=KeyCreate,
    response=KeyCreated,
    status=201,
    summary="Issue an API key for an account (shown once)",
)
async def create_key(ctx: AdminContext) -> KeyCreated:
    body: KeyCreate = ctx.body
    async with ctx.pool.acquire() as conn:
        key, record = await api_keys.issue_api_key(
            conn,
            ctx.actor,
            ctx.params.id,
            name=body.name,
            expires_at=body.expires_at,
            controls=body.controls(),
            requests_per_minute=body.requests_per_minute,
        )
    return KeyCreated.model_validate({**KeyOut.of(record).model_dump(by_alias=True), "key": key})


@router.get(
    "/admin/v1/accounts/{id}/keys",
    role=Role.VIEWER,
    params=IdPath,
    response=KeyList,
    summary="An account's API keys, oldest first",
)
async def list_keys(ctx: AdminContext) -> KeyList:
    account = await accounts.get_account(ctx.pool, ctx.params.id)
    records = await api_keys.list_api_keys(ctx.pool, account.id)
    return KeyList(data=[KeyOut.of(record) for record in records])


@router.get(
    "/admin/v1/keys/{id}",
    role=Role.VIEWER,
    params=IdPath,
    response=KeyOut,
    summary="Show an API key",
)
async def show_key(ctx: AdminContext) -> KeyOut:
    return KeyOut.of(await api_keys.get_api_key(ctx.pool, ctx.params.id))


@router.patch(
    "/admin/v1/keys/{id}",
    role=Role.OPERATOR,
    params=IdPath,
    body=KeyUpdate,
    response=KeyOut,
    summary="Rename an API key, set its expiry, spend controls or rate limit",
)
async def update_key(ctx: AdminContext) -> KeyOut:
    body: KeyUpdate = ctx.body
    given = body.model_fields_set
    changes = body.control_changes()
    for name in ("expires_at", "requests_per_minute"):
        if name in given:
            changes[name] = getattr(body, name)
    if "name" in given:
        changes["name"] = body.name or ""
    async with ctx.pool.acquire() as conn:
        record = await api_keys.update_api_key(conn, ctx.actor, ctx.params.id, changes)
    return KeyOut.of(record)


@router.post(
    "/admin/v1/keys/{id}/revoke",
    role=Role.OPERATOR,
    params=IdPath,
    response=KeyOut,
    summary="Revoke an API key now (refused on every gateway within seconds)",
)
async def revoke_key(ctx: AdminContext) -> KeyOut:
    async with ctx.pool.acquire() as conn:
        record = await api_keys.revoke_api_key_audited(conn, ctx.actor, ctx.params.id)
    return KeyOut.of(record)
