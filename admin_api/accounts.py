"""Accounts over HTTP: create, search, show, suspend and reactivate, spend controls,
forgive a shortfall, and adjustments (credits and debits keyed by ``Idempotency-Key``).

Viewers read; operators change. Each change is one transaction with one audit row
(``billing.accounts``, ``billing.adjustments``); a change of the balance or shortfall is
pushed to Redis after its commit (``publish_balance``) so the gateways reserve against it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from admin_api.account_models import (
    ControlsIn,
    ControlsOut,
    CreditsAmount,
    KeyOut,
    LedgerEntryOut,
    Reason,
    UsageOut,
    controls_fields,
)
from admin_api.framework import (
    AdminContext,
    AdminModel,
    AdminRouter,
    Conflict,
    IdPath,
    Page,
    Paginated,
    Role,
    Unprocessable,
)
from admin_api.models import Id, ShortText
from billing import accounts, api_keys, ledger
from billing.accounts import Account
from billing.adjustments import AdjustmentRequest, forgive_shortfall, post_adjustment
from billing.errors import IdempotencyKeyReusedError, NegativeBalanceError, NoShortfallError
from billing.purchases.fulfilment import publish_balance
from billing.units import credits_to_millicredits, money_fields

router = AdminRouter(tag="accounts")

#: An email address: one ``@`` with text either side (the gateway's users are identified by
#: it, not mailed here), up to 254 characters.
Email = Annotated[
    str, StringConstraints(min_length=3, max_length=254, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")
]

RECENT_ACTIVITY_ROWS = 10


class _AccountFields(AdminModel):
    """An account's own fields (before its controls in the JSON)."""

    id: int
    email: str
    external_id: str | None
    status: Literal["active", "suspended"]
    created_at: datetime
    suspended_at: datetime | None
    suspension_reason: str | None
    balance_millicredits: str = Field(description="Posted balance (Postgres).")
    balance_credits: float
    balance_usd: float
    shortfall_millicredits: str = Field(description="Owed; > 0 stops paid use.")
    shortfall_credits: float
    shortfall_usd: float


class AccountOut(ControlsOut, _AccountFields):
    """An account: its posted balance and shortfall, status and spend controls."""

    @classmethod
    def fields_of(cls, account: Account) -> dict[str, Any]:
        """The camelCase fields of a stored account."""
        return {
            "id": account.id,
            "email": account.email,
            "externalId": account.external_id,
            "status": account.status,
            "createdAt": account.created_at,
            "suspendedAt": account.suspended_at,
            "suspensionReason": account.suspension_reason,
            **money_fields("balance", account.posted.balance_millicredits),
            **money_fields("shortfall", account.posted.shortfall_millicredits),
            **controls_fields(account.controls),
        }

    @classmethod
    def of(cls, account: Account) -> AccountOut:
        """The JSON form of a stored account."""
        return cls.model_validate(cls.fields_of(account))


class AccountDetail(AccountOut):
    """An account with Redis's held and pending amounts, its keys and recent activity."""

    held_millicredits: str = Field(description="Open holds of requests in flight.")
    held_credits: float
    held_usd: float
    pending_settlement_millicredits: str = Field(description="Settled, not yet posted.")
    pending_settlement_credits: float
    pending_settlement_usd: float
    available_millicredits: str = Field(description="balance - held - pending, >= 0.")
    available_credits: float
    available_usd: float
    keys: list[KeyOut]
    recent_ledger_entries: list[LedgerEntryOut]
    recent_usage: list[UsageOut]


class AccountCreate(AdminModel):
    """A new account; ``startingCredits`` is granted as an adjustment."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"email": "ann@example.com", "externalId": "crm-42", "startingCredits": "100"}
            ]
        }
    )

    email: Email
    external_id: ShortText | None = None
    starting_credits: CreditsAmount | None = None


class AccountQuery(Page):
    """Search: every filter given must match."""

    email: ShortText | None = Field(None, description="Prefix, case-insensitive.")
    id: Id | None = None
    external_id: ShortText | None = None


class AccountUpdate(ControlsIn):
    """Spend controls and the external id; absent fields are unchanged, null clears."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"dailySpendCapCredits": "50", "allowedModels": ["gpt-4o-mini"]}]
        }
    )

    external_id: ShortText | None = None


class ReasonBody(AdminModel):
    """Why (kept in the audit log)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "ticket 123"}]})

    reason: Reason


class ForgivenOut(AdminModel):
    """A forgiven shortfall: the account after, and the two entries that wrote it off."""

    account: AccountOut
    forgiven_millicredits: str
    forgiven_credits: float
    forgiven_usd: float
    entries: list[LedgerEntryOut]


class AdjustmentCreate(AdminModel):
    """A credit or a debit of ``amountCredits`` (> 0) with a reason."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "direction": "credit",
                    "amountCredits": "25.5",
                    "reason": "refund correction",
                    "externalReference": "ticket 123",
                }
            ]
        }
    )

    direction: Literal["credit", "debit"]
    amount_credits: CreditsAmount
    reason: Reason
    external_reference: ShortText | None = None


class IdempotencyHeader(AdminModel):
    """The caller's key of one adjustment: a retry with the same key and body is answered
    with the same entry."""

    idempotency_key: str = Field(
        alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$"
    )


class AdjustmentOut(LedgerEntryOut):
    """The adjustment's entry; ``created`` false when the key had been posted before."""

    created: bool


@router.post(
    "/admin/v1/accounts",
    role=Role.OPERATOR,
    body=AccountCreate,
    response=AccountOut,
    status=201,
    summary="Create an account (409 on a duplicate email or external id)",
)
async def create_account(ctx: AdminContext) -> AccountOut:
    body: AccountCreate = ctx.body
    async with ctx.pool.acquire() as conn:
        account = await accounts.create_account(
            conn,
            ctx.actor,
            email=body.email,
            external_id=body.external_id,
            starting_millicredits=credits_to_millicredits(body.starting_credits or "0"),
        )
    return AccountOut.of(account)


@router.get(
    "/admin/v1/accounts",
    role=Role.VIEWER,
    query=AccountQuery,
    response=Paginated[AccountOut],
    summary="Search accounts, newest first",
)
async def list_accounts(ctx: AdminContext) -> Paginated[AccountOut]:
    query: AccountQuery = ctx.query
    rows = await accounts.search_accounts(
        ctx.pool,
        email_prefix=query.email,
        account_id=query.id,
        external_id=query.external_id,
        before_id=query.after_id,
        limit=query.limit + 1,
    )
    kept, next_cursor = query.window(rows, key=lambda row: row.id)
    return Paginated[AccountOut](data=[AccountOut.of(a) for a in kept], next_cursor=next_cursor)


@router.get(
    "/admin/v1/accounts/{id}",
    role=Role.VIEWER,
    params=IdPath,
    response=AccountDetail,
    summary="Show an account: balances, keys, recent activity",
)
async def show_account(ctx: AdminContext) -> AccountDetail:
    account = await accounts.get_account(ctx.pool, ctx.params.id)
    balances = await accounts.balance_fields(ctx.holds, account.id, account.posted)
    keys = await api_keys.list_api_keys(ctx.pool, account.id)
    entries = await ledger.list_ledger_entries(
        ctx.pool, account_id=account.id, limit=RECENT_ACTIVITY_ROWS
    )
    usage = await ledger.list_usage_events(
        ctx.pool, account_id=account.id, limit=RECENT_ACTIVITY_ROWS
    )
    return AccountDetail.model_validate(
        {
            **AccountOut.fields_of(account),
            **balances,
            "keys": [KeyOut.of(k) for k in keys],
            "recentLedgerEntries": [LedgerEntryOut.of(e) for e in entries],
            "recentUsage": [UsageOut.of(u) for u in usage],
        }
    )


@router.post(
    "/admin/v1/accounts/{id}/suspend",
    role=Role.OPERATOR,
    params=IdPath,
    body=ReasonBody,
    response=AccountOut,
    summary="Suspend an account (its requests are refused on every gateway)",
)
async def suspend_account(ctx: AdminContext) -> AccountOut:
    async with ctx.pool.acquire() as conn:
        account = await accounts.suspend_account(
            conn, ctx.actor, ctx.params.id, reason=ctx.body.reason
        )
    return AccountOut.of(account)


@router.post(
    "/admin/v1/accounts/{id}/reactivate",
    role=Role.OPERATOR,
    params=IdPath,
    response=AccountOut,
    summary="Reactivate a suspended account",
)
async def reactivate_account(ctx: AdminContext) -> AccountOut:
    async with ctx.pool.acquire() as conn:
        account = await accounts.reactivate_account(conn, ctx.actor, ctx.params.id)
    return AccountOut.of(account)


@router.patch(
    "/admin/v1/accounts/{id}",
    role=Role.OPERATOR,
    params=IdPath,
    body=AccountUpdate,
    response=AccountOut,
    summary="Set an account's spend controls or external id",
)
async def update_account(ctx: AdminContext) -> AccountOut:
    body: AccountUpdate = ctx.body
    changes = body.control_changes()
    if "external_id" in body.model_fields_set:
        changes["external_id"] = body.external_id
    async with ctx.pool.acquire() as conn:
        account = await accounts.update_account(conn, ctx.actor, ctx.params.id, changes)
    return AccountOut.of(account)


@router.post(
    "/admin/v1/accounts/{id}/forgive-shortfall",
    role=Role.OPERATOR,
    params=IdPath,
    body=ReasonBody,
    response=ForgivenOut,
    summary="Forgive an account's outstanding shortfall (422 when there is none)",
)
async def forgive_account_shortfall(ctx: AdminContext) -> ForgivenOut:
    try:
        async with ctx.pool.acquire() as conn:
            forgiven = await forgive_shortfall(
                conn, ctx.actor, ctx.params.id, reason=ctx.body.reason
            )
            account = await accounts.get_account(conn, ctx.params.id)
    except NoShortfallError as exc:
        raise Unprocessable(str(exc), code="no_shortfall") from None
    await publish_balance(ctx.holds, account.id, forgiven.posted)
    return ForgivenOut.model_validate(
        {
            "account": AccountOut.of(account),
            **money_fields("forgiven", forgiven.forgiven_millicredits),
            "entries": [LedgerEntryOut.of(entry) for entry in forgiven.entries],
        }
    )


@router.post(
    "/admin/v1/accounts/{id}/adjustments",
    role=Role.OPERATOR,
    params=IdPath,
    headers=IdempotencyHeader,
    body=AdjustmentCreate,
    response=AdjustmentOut,
    summary="Credit or debit an account once per Idempotency-Key (422 below zero)",
)
async def create_adjustment(ctx: AdminContext) -> AdjustmentOut:
    body: AdjustmentCreate = ctx.body
    amount = credits_to_millicredits(body.amount_credits)
    if amount == 0:
        raise Unprocessable("amountCredits must be above 0.", param="amountCredits")
    request = AdjustmentRequest(
        account_id=ctx.params.id,
        amount_millicredits=amount if body.direction == "credit" else -amount,
        reason=body.reason,
        external_reference=body.external_reference,
    )
    try:
        async with ctx.pool.acquire() as conn:
            result = await post_adjustment(
                conn, ctx.actor, request, idempotency_key=ctx.headers.idempotency_key
            )
    except IdempotencyKeyReusedError as exc:
        raise Conflict(str(exc), param="Idempotency-Key", code="idempotency_key_reused") from None
    except NegativeBalanceError as exc:
        raise Unprocessable(
            f"The debit exceeds the posted balance ({exc.balance_millicredits} millicredits).",
            param="amountCredits",
            code="insufficient_balance",
        ) from None
    await publish_balance(ctx.holds, request.account_id, result.posted)
    return AdjustmentOut.model_validate(
        {**LedgerEntryOut.of(result.entry).model_dump(by_alias=True), "created": result.created}
    )
