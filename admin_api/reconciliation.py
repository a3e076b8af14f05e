"""Reconciliation runs through the admin API.

    POST /admin/v1/reconciliation-runs   (admin) run every check now (``billing.reconciliation``,
                                          as ``creditgate reconcile``), record it (source
                                          ``api``), one audit row; answers the report
    GET  /admin/v1/reconciliation-runs   (viewer) the recorded runs, newest first, cursor pages

A run reads every account: it is an operator's (or ``creditgate qa``'s) check, not something to
call in a loop. Mismatches are an answer (``ok: false``), not an error: the route answers 201
either way; Redis or Postgres unreachable answer 503.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import orjson
from pydantic import ConfigDict, Field, field_validator
from redis.exceptions import RedisError

from admin_api.framework import AdminContext, AdminModel, AdminRouter, Page, Paginated, Role
from billing import reconciliation
from billing.audit import record_audit
from billing.errors import BillingUnavailableError

router = AdminRouter(tag="reconciliation")

#: ``reconciliation_runs.source`` of a run started here.
API_SOURCE = "api"


class ReconciliationRunCreate(AdminModel):
    """Options of a run (all optional)."""

    since: date | None = Field(
        None,
        description="First UTC day of the per-day deduction check, from "
        f"{reconciliation.EARLIEST_SINCE.isoformat()} to today (default: the last "
        f"{reconciliation.DEFAULT_DAYS} days). A run starting after the default's first day "
        "is partial: its mismatches show in the metrics, its success does not.",
    )

    @field_validator("since")
    @classmethod
    def _check_since(cls, value: date | None) -> date | None:
        return None if value is None else reconciliation.check_since(value)

    model_config = ConfigDict(json_schema_extra={"examples": [{}, {"since": "2026-01-01"}]})


class ReconciliationRunOut(AdminModel):
    """One recorded run: what it examined (``counts``), per check how many mismatches, and
    up to ``MAX_LISTED_PER_CHECK`` of each listed (amounts in millicredits, as strings)."""

    id: int
    source: str = Field(description="`scheduled`, `cli` or `api`.")
    since: date
    started_at: datetime
    finished_at: datetime
    ok: bool
    counts: dict[str, int]
    mismatch_counts: dict[str, int]
    mismatches: list[dict[str, Any]]


_COLUMNS = """id, source, since_day, started_at, finished_at, ok, mismatches, mismatch_counts,
              counts"""


def _run_out(row: Any) -> ReconciliationRunOut:
    def doc(value: Any) -> Any:
        return orjson.loads(value) if isinstance(value, str | bytes) else value

    return ReconciliationRunOut(
        id=row["id"],
        source=row["source"],
        since=row["since_day"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        ok=row["ok"],
        counts=doc(row["counts"]),
        mismatch_counts=doc(row["mismatch_counts"]),
        mismatches=doc(row["mismatches"]),
    )


@router.post(
    "/admin/v1/reconciliation-runs",
    role=Role.ADMIN,
    body=ReconciliationRunCreate,
    response=ReconciliationRunOut,
    status=201,
    summary="Run the reconciliation checks now and record the run",
)
async def create_reconciliation_run(ctx: AdminContext) -> ReconciliationRunOut:
    body: ReconciliationRunCreate = ctx.body
    since = body.since or reconciliation.default_since()
    try:
        report = await reconciliation.reconcile(ctx.pool, ctx.holds.redis, since=since)
    except RedisError as exc:
        raise BillingUnavailableError(f"redis: {exc}") from exc
    async with ctx.transaction() as conn:
        run_id = await reconciliation.record_run(conn, report, source=API_SOURCE)
        await record_audit(
            conn,
            ctx.actor,
            action="reconciliation.run",
            target_type="reconciliation_run",
            target_id=run_id,
            after={"ok": report.ok, "since": since.isoformat(), **report.mismatch_counts},
        )
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM reconciliation_runs WHERE id = $1", run_id
        )
    return _run_out(row)


@router.get(
    "/admin/v1/reconciliation-runs",
    role=Role.VIEWER,
    query=Page,
    response=Paginated[ReconciliationRunOut],
    summary="List reconciliation runs, newest first",
)
async def list_reconciliation_runs(ctx: AdminContext) -> Paginated[ReconciliationRunOut]:
    page: Page = ctx.query
    rows = await ctx.pool.fetch(
        f"""SELECT {_COLUMNS} FROM reconciliation_runs
             WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2""",
        page.after_id,
        page.limit + 1,
    )
    kept, next_cursor = page.window(rows, key=lambda row: row["id"])
    return Paginated[ReconciliationRunOut](
        data=[_run_out(row) for row in kept], next_cursor=next_cursor
    )
