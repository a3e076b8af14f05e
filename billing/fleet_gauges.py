"""Fleet-wide money readings from Postgres, for the gauges every process exports.

``read_fleet`` reads, in a few cheap queries:

- the outstanding credits (the sum of account balances, which the ledger sums to: see
  ``billing.finance``) and the accounts with a shortfall, from ``accounts`` (one row per
  account, far smaller than the ledger);
- today's (UTC) revenue, upstream cost and gross margin per model, by
  ``billing.finance.revenue_by_model`` (the monthly report's SQL and arithmetic, over one day:
  the month partition and BRIN index on ``usage_events.started_at`` keep it to the day's
  pages). Models without a rate card are summed under ``other`` (label values stay bounded);
- the reconciliation run the gauges show and the runs counted by outcome (``ok`` or
  ``mismatch``; a run that raised records no row, so the table has no ``error``). A run is
  complete when it covered the default window up to its day and checked Redis
  (``counts.complete``, ``billing.reconciliation``). The run shown is the newest run that was
  complete or found mismatches: a partial clean run (a late ``--since``, no Redis) never hides
  a mismatch, a partial run that found one still shows it. The last success is the newest
  complete run that was ok.

Every process reads the same numbers; dashboards take ``max without (instance)``.
Postgres unreachable: ``OSError``/``asyncpg`` errors propagate (the refresh loop is
supervised and the gauges keep their last values).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from billing.finance import ModelRevenue, RevenueReport, revenue_by_model
from billing.metering.rate_cards import UNRATED_MODEL_LABEL

#: The model label of usage whose model has no rate card.
OTHER_MODEL = UNRATED_MODEL_LABEL


@dataclass(frozen=True, slots=True)
class ShownRun:
    """The reconciliation run the gauges show (see the module docstring).

    Attributes:
        mismatch_counts: its mismatches per check.
        mismatched_millicredits: its ``|expected - actual|`` summed over its amount-bearing
            mismatches (``counts.mismatchedMillicredits``).
        daily_deductions_millicredits: the deductions of an average day it checked
            (``counts.dailyDeductionsMillicredits``).
    """

    run_id: int
    finished_at: datetime
    ok: bool
    mismatch_counts: dict[str, int]
    mismatched_millicredits: int
    daily_deductions_millicredits: int


@dataclass(frozen=True, slots=True)
class ReconciliationReading:
    """The reconciliation runs so far.

    Attributes:
        shown: the run the gauges show, or None (no complete or mismatching run yet).
        runs_by_outcome: every recorded run by outcome (``ok``, ``mismatch``).
        last_success_at: the newest complete run that found nothing, or None.
    """

    shown: ShownRun | None
    runs_by_outcome: dict[str, int]
    last_success_at: datetime | None


@dataclass(frozen=True, slots=True)
class FleetReading:
    """One read of the fleet's money (see the module docstring)."""

    read_at: datetime
    outstanding_millicredits: int
    accounts_in_shortfall: int
    day: date
    models: tuple[ModelRevenue, ...]
    reconciliation: ReconciliationReading | None


_ACCOUNTS_SQL = """SELECT COALESCE(sum(balance_millicredits), 0),
       count(*) FILTER (WHERE shortfall_millicredits > 0)
  FROM accounts"""

_COMPLETE = "(counts->>'complete') = '1'"

_SHOWN_RUN_SQL = f"""SELECT id, finished_at, ok, mismatch_counts, counts
  FROM reconciliation_runs WHERE {_COMPLETE} OR NOT ok
 ORDER BY started_at DESC, id DESC LIMIT 1"""

_RUNS_SQL = f"""SELECT count(*), count(*) FILTER (WHERE ok), count(*) FILTER (WHERE NOT ok),
       max(finished_at) FILTER (WHERE ok AND {_COMPLETE})
  FROM reconciliation_runs"""


def _json(value: Any) -> dict[str, Any]:
    return dict(orjson.loads(value)) if isinstance(value, str | bytes) else dict(value or {})


def bounded_models(
    day: date, rows: tuple[ModelRevenue, ...], rated: frozenset[str]
) -> tuple[ModelRevenue, ...]:
    """``rows`` with every model not in ``rated`` summed into one ``OTHER_MODEL`` row (by
    ``RevenueReport.total``, the reports' own sum)."""
    groups: dict[str, list[ModelRevenue]] = defaultdict(list)
    for row in rows:
        groups[row.model if row.model in rated else OTHER_MODEL].append(row)
    return tuple(
        dataclasses.replace(RevenueReport(day, tuple(group)).total, model=label)
        for label, group in sorted(groups.items())
    )


async def _reconciliation(conn: asyncpg.Connection) -> ReconciliationReading | None:
    runs, ok_runs, mismatch_runs, last_success_at = await conn.fetchrow(_RUNS_SQL)
    if not runs:
        return None
    row = await conn.fetchrow(_SHOWN_RUN_SQL)
    shown = None
    if row is not None:
        counts = _json(row["counts"])
        shown = ShownRun(
            run_id=row["id"],
            finished_at=row["finished_at"],
            ok=row["ok"],
            mismatch_counts={k: int(v) for k, v in _json(row["mismatch_counts"]).items()},
            mismatched_millicredits=int(counts.get("mismatchedMillicredits", 0)),
            daily_deductions_millicredits=int(counts.get("dailyDeductionsMillicredits", 0)),
        )
    return ReconciliationReading(
        shown=shown,
        runs_by_outcome={"ok": int(ok_runs), "mismatch": int(mismatch_runs)},
        last_success_at=last_success_at,
    )


async def read_fleet(pool: asyncpg.Pool, *, now: datetime | None = None) -> FleetReading:
    """Read the fleet's money now (``now`` for tests: which UTC day is today).

    Raises:
        OSError, asyncpg.PostgresError: Postgres unreachable or failing.
    """
    now = datetime.now(UTC) if now is None else now
    day = now.astimezone(UTC).date()
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    async with pool.acquire() as conn:
        outstanding, in_shortfall = await conn.fetchrow(_ACCOUNTS_SQL)
        rows = await revenue_by_model(conn, start, start + timedelta(days=1))
        rated = frozenset(r[0] for r in await conn.fetch("SELECT DISTINCT model FROM rate_cards"))
        reconciliation = await _reconciliation(conn)
    return FleetReading(
        read_at=now,
        outstanding_millicredits=int(outstanding),
        accounts_in_shortfall=int(in_shortfall),
        day=day,
        models=bounded_models(day, rows, rated),
        reconciliation=reconciliation,
    )
