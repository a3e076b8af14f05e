"""Ledger entries and usage events over HTTP, per account and across accounts, newest first,
with filters and cursor pagination. Viewers and above.

Usage rows carry the rates in force when they happened (the rate card snapshot each usage
event keeps), so publishing a new rate card never changes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from admin_api.account_models import LedgerEntryOut, ModelName, UsageOut
from admin_api.framework import AdminContext, AdminRouter, IdPath, Page, Paginated, Role
from admin_api.models import Id, Timestamp
from billing import accounts, ledger

router = AdminRouter(tag="ledger")


class LedgerQuery(Page):
    """Filters of an account's ledger: every one given must match."""

    entry_type: Literal["purchase", "deduction", "refund", "adjustment", "reversal"] | None = None
    since: Timestamp | None = Field(None, description="created at or after (ISO 8601).")
    until: Timestamp | None = Field(None, description="created before (ISO 8601).")


class AllLedgerQuery(LedgerQuery):
    """Filters of the ledger across accounts."""

    account_id: Id | None = None


class UsageQuery(Page):
    """Filters of an account's usage: every one given must match."""

    model: ModelName | None = None
    api_key_id: Id | None = None
    since: Timestamp | None = Field(None, description="started at or after (ISO 8601).")
    until: Timestamp | None = Field(None, description="started before (ISO 8601).")


class AllUsageQuery(UsageQuery):
    """Filters of usage across accounts."""

    account_id: Id | None = None


async def _ledger_page(
    ctx: AdminContext, query: LedgerQuery, account_id: int | None
) -> Paginated[LedgerEntryOut]:
    rows = await ledger.list_ledger_entries(
        ctx.pool,
        account_id=account_id,
        entry_type=query.entry_type,
        since=query.since,
        until=query.until,
        before_id=query.after_id,
        limit=query.limit + 1,
    )
    kept, next_cursor = query.window(rows, key=lambda row: row.id)
    return Paginated[LedgerEntryOut](
        data=[LedgerEntryOut.of(row) for row in kept], next_cursor=next_cursor
    )


async def _usage_page(
    ctx: AdminContext, query: UsageQuery, account_id: int | None
) -> Paginated[UsageOut]:
    rows = await ledger.list_usage_events(
        ctx.pool,
        account_id=account_id,
        model=query.model,
        api_key_id=query.api_key_id,
        since=query.since,
        until=query.until,
        before_id=query.after_id,
        limit=query.limit + 1,
    )
    kept, next_cursor = query.window(rows, key=lambda row: row.id)
    return Paginated[UsageOut](data=[UsageOut.of(row) for row in kept], next_cursor=next_cursor)


@router.get(
    "/admin/v1/accounts/{id}/ledger",
    role=Role.VIEWER,
    params=IdPath,
    query=LedgerQuery,
    response=Paginated[LedgerEntryOut],
    summary="An account's ledger entries, newest first",
)
async def list_account_ledger(ctx: AdminContext) -> Paginated[LedgerEntryOut]:
    account = await accounts.get_account(ctx.pool, ctx.params.id)
    return await _ledger_page(ctx, ctx.query, account.id)


@router.get(
    "/admin/v1/ledger",
    role=Role.VIEWER,
    query=AllLedgerQuery,
    response=Paginated[LedgerEntryOut],
    summary="Ledger entries across accounts, newest first",
)
async def list_ledger(ctx: AdminContext) -> Paginated[LedgerEntryOut]:
    return await _ledger_page(ctx, ctx.query, ctx.query.account_id)


@router.get(
    "/admin/v1/accounts/{id}/usage",
    role=Role.VIEWER,
    params=IdPath,
    query=UsageQuery,
    response=Paginated[UsageOut],
    summary="An account's usage events, newest first",
)
async def list_account_usage(ctx: AdminContext) -> Paginated[UsageOut]:
    account = await accounts.get_account(ctx.pool, ctx.params.id)
    return await _usage_page(ctx, ctx.query, account.id)


@router.get(
    "/admin/v1/usage",
    role=Role.VIEWER,
    query=AllUsageQuery,
    response=Paginated[UsageOut],
    summary="Usage events across accounts, newest first",
)
async def list_usage(ctx: AdminContext) -> Paginated[UsageOut]:
    return await _usage_page(ctx, ctx.query, ctx.query.account_id)
