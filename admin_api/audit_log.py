"""``GET /admin/v1/audit-log``: the audit log, newest first, with filters."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from admin_api.framework import AdminContext, AdminModel, AdminRouter, Id, Page, Paginated, Role
from admin_api.models import ShortText, Timestamp
from billing.audit import AuditEntry, AuditFilter, list_audit_entries

router = AdminRouter(tag="audit")


class AuditQuery(Page):
    """Filters of the audit log; each one given narrows it."""

    actor_token_id: Id | None = Field(None, description="The acting admin token's id.")
    action: ShortText | None = Field(None, description="e.g. `account.suspend`.")
    target_type: ShortText | None = Field(None, description="e.g. `account`, `admin_token`.")
    target_id: ShortText | None = None
    since: Timestamp | None = Field(None, description="From this time (inclusive).")
    until: Timestamp | None = Field(None, description="Before this time (exclusive).")


class AuditEntryOut(AdminModel):
    """One audit row: who did what to which target, its state before and after."""

    id: int
    at: datetime
    actor_kind: str = Field(description="`token` or `cli`.")
    actor_token_id: int | None
    actor_name: str
    action: str
    target_type: str
    target_id: str | None
    before: Any
    after: Any
    request_id: str | None
    client_address: str | None


@router.get(
    "/admin/v1/audit-log",
    role=Role.VIEWER,
    query=AuditQuery,
    response=Paginated[AuditEntryOut],
    summary="List the audit log, newest first",
)
async def list_audit_log(ctx: AdminContext) -> Paginated[AuditEntryOut]:
    query: AuditQuery = ctx.query
    where = AuditFilter(
        actor_token_id=query.actor_token_id,
        action=query.action,
        target_type=query.target_type,
        target_id=query.target_id,
        since=query.since,
        until=query.until,
    )
    rows: list[AuditEntry] = await list_audit_entries(
        ctx.pool, where, limit=query.limit + 1, before_id=query.after_id
    )
    kept, next_cursor = query.window(rows, key=lambda row: row.id)
    data = [AuditEntryOut.model_validate(row, from_attributes=True) for row in kept]
    return Paginated[AuditEntryOut](data=data, next_cursor=next_cursor)
