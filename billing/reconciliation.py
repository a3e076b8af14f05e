"""Reconciliation: check that the money adds up, across Postgres and Redis.

Checks (each mismatch names its ``check``):

``account_balance``
    Per account, ``sum(ledger_entries.amount_millicredits) == accounts.balance_millicredits``
    (months detached for archiving count by their ``ledger_archived_totals``).
``daily_deductions``
    Per UTC day since ``since``, ``sum(usage_events.charged_millicredits)`` equals minus the
    sum of the day's deduction entries. ``post_settlements`` writes a usage event and its
    deduction (idempotency key ``usage:<request_id>``, amount ``-charged``; none for a
    charge of 0) in one transaction, the entry dated at the request's start (0012), so both
    fall on the day the request started (usage by ``started_at``, entries by
    ``created_at``). Deductions posted before 0012 are dated at their posting: a request
    started before midnight and posted after, in the days before the upgrade, shows there.
    A mismatched day also lists its unpaired requests (``deduction_pairing``).
``redis_balance``
    Redis's cached ``(bal, ver, shortfall)`` (``billing.metering.holds``) equals Postgres's
    ``(balance, balance_version, shortfall)`` where the versions match. Redis is read first,
    so a Postgres version ahead is an update in flight (skipped, counted as stale); a Redis
    version ahead of Postgres is a mismatch.
``expired_hold``
    No open hold (an account's holds hash, ``redis_keys.holds_key``) whose deadline passed
    more than ``HOLD_DEADLINE_GRACE_S`` ago: the sweeper should have voided it.
``month_totals``
    Per account and UTC month from the month of ``since`` on (months detached for archiving
    excepted), the monthly totals statements read (``account_month_ledger``,
    ``account_month_usage``, migration 0013) equal the sums of the rows they total: ledger
    amounts and entry counts per entry type and key prefix, usage requests, tokens and
    charges per model. The month's first day is the mismatch's ``day``; expected = the rows'
    sum, actual = the total (the ledger's amounts, or the usage's charges).
``rate_snapshot``
    A sample of usage rows recorded before ``since`` still carries its rate snapshot
    (non-null rates and rounding mode) and names an existing rate card when it names one.

Nothing here writes money. ``ReconciliationReport`` is the plain result (for the CLI, the
``reconciliation_runs`` table and metrics); ``DailyReconciliation`` is the service's daily run,
one at a time across processes (``pg_try_advisory_lock``).

Postgres unreachable: ``asyncpg`` / ``OSError`` propagate (the CLI exits 1; the daily loop is
supervised and retries). Redis unreachable: ``redis.exceptions.RedisError`` propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from billing.metering.holds import parse_hold_value
from billing.metering.redis_keys import account_key, holds_key

log = logging.getLogger(__name__)

CHECKS = (
    "account_balance",
    "daily_deductions",
    "deduction_pairing",
    "redis_balance",
    "expired_hold",
    "rate_snapshot",
    "month_totals",
)
#: Days the per-day check covers by default (``creditgate reconcile`` without ``--since``).
DEFAULT_DAYS = 7
#: The earliest ``since`` a run accepts (the latest is today, UTC).
EARLIEST_SINCE = date(2000, 1, 1)
#: Checks whose mismatches carry an amount that is off (expected and actual balances or
#: totals): ``mismatchedMillicredits`` sums their ``|expected - actual|``. Not
#: ``deduction_pairing`` (it itemises a ``daily_deductions`` difference, counted once) nor
#: ``expired_hold`` / ``rate_snapshot`` (nothing expected to compare with).
AMOUNT_CHECKS = frozenset({"account_balance", "daily_deductions", "redis_balance"})
#: How long past its deadline a hold may stay before it counts as a mismatch: the sweeper
#: runs every ``SWEEP_INTERVAL_S`` (seconds), this is many rounds of it.
HOLD_DEADLINE_GRACE_S = 300
#: Usage rows examined by the rate snapshot check.
RATE_SNAPSHOT_SAMPLE = 200
#: Mismatches listed per check (all are counted).
MAX_LISTED_PER_CHECK = 100
#: Accounts read from Redis per pipeline.
REDIS_BATCH = 500
#: The advisory lock of the daily run (``"recn"``); the migrator's is ``"cred"``.
ADVISORY_LOCK_ID = 0x7265636E
#: How often the service checks whether today's run is done (seconds).
SCHEDULE_CHECK_INTERVAL_S = 3600.0
#: Seconds after start-up before the service's first check (start-up's own work first).
SCHEDULE_FIRST_CHECK_S = 60.0


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One thing that does not add up. Amounts in millicredits; fields that do not apply
    to the check are None."""

    check: str
    account_id: int | None = None
    day: date | None = None
    request_id: str | None = None
    expected_millicredits: int | None = None
    actual_millicredits: int | None = None
    note: str = ""

    def to_doc(self) -> dict[str, Any]:
        """JSON form (amounts as strings, like every money field at the JSON edge)."""

        def mc(value: int | None) -> str | None:
            return None if value is None else str(value)

        return {
            "check": self.check,
            "accountId": self.account_id,
            "day": None if self.day is None else self.day.isoformat(),
            "requestId": self.request_id,
            "expectedMillicredits": mc(self.expected_millicredits),
            "actualMillicredits": mc(self.actual_millicredits),
            "note": self.note,
        }


@dataclass(slots=True)
class ReconciliationReport:
    """What one run examined and found.

    Attributes:
        counts: what was examined: ``accounts``, ``days`` (days with usage or deductions),
            ``deductedMillicredits`` (the days' deductions), ``dailyDeductionsMillicredits``
            (the deductions of an average day: ``deductedMillicredits // max(days, 1)``),
            ``mismatchedMillicredits`` (``|expected - actual|`` summed over every mismatch
            of the ``AMOUNT_CHECKS``, listed or not), ``redisBalancesCompared``,
            ``redisBalancesStale``, ``redisBalancesUncached``, ``holds``,
            ``usageRowsSampled``; ``redisChecked`` 0 when no Redis was given; ``complete``
            1 when the run covered at least the default window (``since`` on or before
            ``default_since()`` of its day) and checked Redis, else 0 (a partial run: its
            mismatches count, its success does not; ``billing.fleet_gauges``).
        mismatch_counts: per check in ``CHECKS``, how many mismatches (``mismatches`` lists
            at most ``MAX_LISTED_PER_CHECK`` of each).
    """

    since: date
    started_at: datetime
    finished_at: datetime | None = None
    counts: dict[str, int] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    mismatch_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))

    @property
    def ok(self) -> bool:
        """True when no check found a mismatch."""
        return not any(self.mismatch_counts.values())

    @property
    def complete(self) -> bool:
        """True when the run covered the default window up to today and checked Redis
        (``counts.complete``)."""
        return bool(self.counts.get("complete", 0))

    def add(self, mismatch: Mismatch) -> None:
        """Count a mismatch (and its amount off, for ``AMOUNT_CHECKS``) and list it unless
        its check already lists the maximum."""
        if mismatch.check in AMOUNT_CHECKS and mismatch.expected_millicredits is not None:
            self.counts["mismatchedMillicredits"] = self.counts.get(
                "mismatchedMillicredits", 0
            ) + abs(mismatch.expected_millicredits - (mismatch.actual_millicredits or 0))
        listed = self.mismatch_counts[mismatch.check]
        self.mismatch_counts[mismatch.check] = listed + 1
        if listed < MAX_LISTED_PER_CHECK:
            self.mismatches.append(mismatch)

    def to_doc(self) -> dict[str, Any]:
        """The JSON report ``creditgate reconcile`` prints."""
        return {
            "ok": self.ok,
            "since": self.since.isoformat(),
            "startedAt": self.started_at.isoformat(),
            "finishedAt": None if self.finished_at is None else self.finished_at.isoformat(),
            "counts": self.counts,
            "mismatchCounts": self.mismatch_counts,
            "mismatches": [m.to_doc() for m in self.mismatches],
        }


def default_since(today: date | None = None) -> date:
    """The first day of the default window: ``DEFAULT_DAYS`` UTC days, today included."""
    today = datetime.now(UTC).date() if today is None else today
    return today - timedelta(days=DEFAULT_DAYS - 1)


def check_since(since: date, *, today: date | None = None) -> date:
    """``since`` when a run may start there: from ``EARLIEST_SINCE`` to today (UTC). A later
    day would check no day and read as a clean run.

    Raises:
        ValueError: ``since`` outside that range (the CLI's usage error, the API's 400).
    """
    today = datetime.now(UTC).date() if today is None else today
    if not EARLIEST_SINCE <= since <= today:
        raise ValueError(
            f"must be a day from {EARLIEST_SINCE.isoformat()} to today ({today.isoformat()}, "
            f"UTC), not {since.isoformat()}"
        )
    return since


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def check_account_balances(conn: asyncpg.Connection, report: ReconciliationReport) -> None:
    """Per account: the sum of its ledger entries (detached months by their archived totals,
    ``billing.partitions``) equals its posted balance."""
    rows = await conn.fetch(
        """SELECT a.id, a.balance_millicredits, COALESCE(s.total, 0) AS total
             FROM accounts a
             LEFT JOIN (SELECT account_id, sum(amount_millicredits) AS total
                          FROM (SELECT account_id, amount_millicredits FROM ledger_entries
                                UNION ALL
                                SELECT account_id, amount_millicredits
                                  FROM ledger_archived_totals) AS e
                         GROUP BY account_id) s ON s.account_id = a.id
            ORDER BY a.id"""
    )
    report.counts["accounts"] = len(rows)
    for row in rows:
        if row["balance_millicredits"] != row["total"]:
            report.add(
                Mismatch(
                    "account_balance",
                    account_id=row["id"],
                    expected_millicredits=int(row["total"]),
                    actual_millicredits=row["balance_millicredits"],
                    note="balance differs from the sum of its ledger entries",
                )
            )


_DAILY_TOTALS = """
WITH u AS (SELECT (started_at AT TIME ZONE 'UTC')::date AS day,
                  sum(charged_millicredits) AS charged
             FROM usage_events WHERE started_at >= $1 GROUP BY 1),
     d AS (SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
                  -sum(amount_millicredits) AS deducted
             FROM ledger_entries
            WHERE entry_type = 'deduction' AND created_at >= $1 GROUP BY 1)
SELECT COALESCE(u.day, d.day) AS day, COALESCE(u.charged, 0) AS charged,
       COALESCE(d.deducted, 0) AS deducted
  FROM u FULL JOIN d ON u.day = d.day
 ORDER BY 1
"""

# A day's requests whose charge and deduction differ: usage without its entry (or with a
# different amount), and deduction entries without their usage row.
_UNPAIRED = """
SELECT u.request_id, u.account_id, u.charged_millicredits AS charged,
       -e.amount_millicredits AS deducted
  FROM usage_events u
  LEFT JOIN ledger_entries e ON e.idempotency_key = 'usage:' || u.request_id
 WHERE u.started_at >= $1 AND u.started_at < $2
   AND u.charged_millicredits <> COALESCE(-e.amount_millicredits, 0)
UNION ALL
SELECT e.reference, e.account_id, NULL, -e.amount_millicredits
  FROM ledger_entries e
 WHERE e.entry_type = 'deduction' AND e.created_at >= $1 AND e.created_at < $2
   AND NOT EXISTS (SELECT 1 FROM usage_events u
                    WHERE e.idempotency_key LIKE 'usage:%'
                      AND u.request_id = substr(e.idempotency_key, 7))
 LIMIT $3
"""


async def check_daily_deductions(conn: asyncpg.Connection, report: ReconciliationReport) -> None:
    """Per UTC day since ``report.since``: usage charges equal deductions; a day that differs
    also lists its unpaired requests."""
    rows = await conn.fetch(_DAILY_TOTALS, _day_start(report.since))
    report.counts["days"] = len(rows)
    deducted = sum(int(row["deducted"]) for row in rows)
    report.counts["deductedMillicredits"] = deducted
    report.counts["dailyDeductionsMillicredits"] = deducted // max(len(rows), 1)
    for row in rows:
        if row["charged"] == row["deducted"]:
            continue
        day: date = row["day"]
        report.add(
            Mismatch(
                "daily_deductions",
                day=day,
                expected_millicredits=int(row["charged"]),
                actual_millicredits=int(row["deducted"]),
                note="usage charges (expected) differ from deduction entries (actual)",
            )
        )
        start = _day_start(day)
        unpaired = await conn.fetch(
            _UNPAIRED, start, start + timedelta(days=1), MAX_LISTED_PER_CHECK
        )
        for pair in unpaired:
            report.add(
                Mismatch(
                    "deduction_pairing",
                    account_id=pair["account_id"],
                    day=day,
                    request_id=pair["request_id"],
                    expected_millicredits=pair["charged"],
                    actual_millicredits=pair["deducted"],
                    note="usage charge (expected) and its deduction entry (actual) differ",
                )
            )


# The months a run covers, rows against their totals. $1 the first month's start (the
# rows), $2 its first day (the totals). A month whose ledger partition was detached
# (``billing.partitions``: both tables' months go together) keeps its totals, not its rows.
_MONTH_TOTALS_DIFFER = """
WITH ledger_rows AS (
    SELECT account_id, date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS month,
           entry_type, ledger_statement_key_prefix(entry_type, idempotency_key) AS key_prefix,
           sum(amount_millicredits) AS amount, count(*) AS entries
      FROM ledger_entries WHERE created_at >= $1 GROUP BY 1, 2, 3, 4),
ledger_totals AS (
    SELECT account_id, month, entry_type, key_prefix, amount_millicredits AS amount, entries
      FROM account_month_ledger WHERE month >= $2),
usage_rows AS (
    SELECT account_id, date_trunc('month', started_at AT TIME ZONE 'UTC')::date AS month,
           model, count(*) AS requests, sum(prompt_tokens) AS prompt,
           sum(cached_tokens) AS cached, sum(completion_tokens) AS completion,
           sum(charged_millicredits) AS charged
      FROM usage_events WHERE started_at >= $1 GROUP BY 1, 2, 3),
usage_totals AS (
    SELECT account_id, month, model, requests, prompt_tokens AS prompt, cached_tokens AS cached,
           completion_tokens AS completion, charged_millicredits AS charged
      FROM account_month_usage WHERE month >= $2),
differ AS (
    SELECT 'ledger' AS source, account_id, month, COALESCE(r.amount, 0) AS expected,
           COALESCE(t.amount, 0) AS actual
      FROM ledger_rows r FULL JOIN ledger_totals t
           USING (account_id, month, entry_type, key_prefix)
     WHERE (COALESCE(r.amount, 0), COALESCE(r.entries, 0))
           <> (COALESCE(t.amount, 0), COALESCE(t.entries, 0))
    UNION ALL
    SELECT 'usage', account_id, month, COALESCE(r.charged, 0), COALESCE(t.charged, 0)
      FROM usage_rows r FULL JOIN usage_totals t USING (account_id, month, model)
     WHERE (COALESCE(r.requests, 0), COALESCE(r.prompt, 0), COALESCE(r.cached, 0),
            COALESCE(r.completion, 0), COALESCE(r.charged, 0))
           <> (COALESCE(t.requests, 0), COALESCE(t.prompt, 0), COALESCE(t.cached, 0),
               COALESCE(t.completion, 0), COALESCE(t.charged, 0)))
SELECT source, account_id, month, sum(expected) AS expected, sum(actual) AS actual
  FROM differ
 WHERE NOT EXISTS (SELECT 1 FROM ledger_archived_totals a
                    WHERE a.partition_name = 'ledger_entries_p' || to_char(month, 'YYYY_MM'))
 GROUP BY 1, 2, 3
 ORDER BY 2, 3, 1
"""


async def check_month_totals(conn: asyncpg.Connection, report: ReconciliationReport) -> None:
    """Per account and month from the month of ``report.since``: the monthly totals equal
    the sums of their rows (``month_totals``)."""
    first_day = report.since.replace(day=1)
    rows = await conn.fetch(_MONTH_TOTALS_DIFFER, _day_start(first_day), first_day)
    for row in rows:
        report.add(
            Mismatch(
                "month_totals",
                account_id=row["account_id"],
                day=row["month"],
                expected_millicredits=int(row["expected"]),
                actual_millicredits=int(row["actual"]),
                note=f"{row['source']} month totals (actual) differ from the sums of the rows "
                "(expected)",
            )
        )


async def check_rate_snapshots(
    conn: asyncpg.Connection,
    report: ReconciliationReport,
    *,
    recorded_before: datetime,
    sample_size: int = RATE_SNAPSHOT_SAMPLE,
) -> None:
    """About ``sample_size`` usage rows recorded before ``recorded_before``, evenly spread
    over their ids (index lookups, no scan of the table), still carry their rate snapshot."""
    bounds = await conn.fetchrow(
        """SELECT (SELECT min(id) FROM usage_events) AS low,
                  (SELECT id FROM usage_events WHERE recorded_at < $1
                    ORDER BY id DESC LIMIT 1) AS high""",
        recorded_before,
    )
    low, high = bounds["low"], bounds["high"]
    if low is None or high is None:
        report.counts["usageRowsSampled"] = 0
        return
    step = max(1, (high - low + 1) // sample_size)
    rows = await conn.fetch(
        """SELECT u.id, u.request_id, u.account_id, u.rate_card_id,
                  u.input_millicredits_per_1k_tokens IS NOT NULL
                  AND u.cached_input_millicredits_per_1k_tokens IS NOT NULL
                  AND u.output_millicredits_per_1k_tokens IS NOT NULL
                  AND u.rounding_mode IS NOT NULL AS has_rates,
                  u.rate_card_id IS NULL
                  OR EXISTS (SELECT 1 FROM rate_cards r WHERE r.id = u.rate_card_id) AS has_card
             FROM generate_series($1::bigint, $2::bigint, $3::bigint) AS g(id)
             JOIN usage_events u ON u.id = g.id
            WHERE u.recorded_at < $4""",
        low,
        high,
        step,
        recorded_before,
    )
    report.counts["usageRowsSampled"] = len(rows)
    for row in rows:
        if row["has_rates"] and row["has_card"]:
            continue
        report.add(
            Mismatch(
                "rate_snapshot",
                account_id=row["account_id"],
                request_id=row["request_id"],
                note="rate snapshot missing" if not row["has_rates"] else "rate card missing",
            )
        )


async def check_redis(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    report: ReconciliationReport,
    *,
    now_ms: int | None = None,
) -> None:
    """Redis's cached balances against Postgres (where the versions match), and no hold
    long past its deadline. Accounts in batches of ``REDIS_BATCH``: Redis first, then
    Postgres (see the module docstring)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    await redis.ping()  # an unreachable Redis fails the run even with no account to read
    for name in ("redisBalancesCompared", "redisBalancesStale", "redisBalancesUncached", "holds"):
        report.counts[name] = 0
    after = 0
    while True:
        ids: list[int] = [
            r["id"]
            for r in await pool.fetch(
                "SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2", after, REDIS_BATCH
            )
        ]
        if not ids:
            return
        after = ids[-1]
        async with redis.pipeline(transaction=False) as pipe:
            for account_id in ids:
                pipe.hmget(account_key(account_id), ["bal", "ver", "shortfall"])
                pipe.hgetall(holds_key(account_id))
            replies: list[Any] = await pipe.execute()
        posted = {
            r["id"]: r
            for r in await pool.fetch(
                """SELECT id, balance_millicredits, balance_version, shortfall_millicredits
                     FROM accounts WHERE id = ANY($1::bigint[])""",
                ids,
            )
        }
        for index, account_id in enumerate(ids):
            cached, holds = replies[2 * index], replies[2 * index + 1]
            _compare_balance(report, account_id, cached, posted[account_id])
            _check_holds(report, account_id, holds, now_ms)


def _compare_balance(
    report: ReconciliationReport, account_id: int, cached: Sequence[Any], row: asyncpg.Record
) -> None:
    bal, ver, shortfall = cached
    if ver is None:
        report.counts["redisBalancesUncached"] += 1
        return
    if int(ver) < row["balance_version"]:
        report.counts["redisBalancesStale"] += 1
        return
    report.counts["redisBalancesCompared"] += 1
    if int(ver) > row["balance_version"]:
        note = f"Redis version {ver} is ahead of Postgres's {row['balance_version']}"
    elif int(bal or 0) != row["balance_millicredits"]:
        note = f"balance differs at version {ver}"
    elif int(shortfall or 0) != row["shortfall_millicredits"]:
        note = (
            f"shortfall differs at version {ver}: Redis {shortfall or 0}, "
            f"Postgres {row['shortfall_millicredits']}"
        )
    else:
        return
    report.add(
        Mismatch(
            "redis_balance",
            account_id=account_id,
            expected_millicredits=row["balance_millicredits"],
            actual_millicredits=None if bal is None else int(bal),
            note=note,
        )
    )


def _check_holds(
    report: ReconciliationReport, account_id: int, holds: dict[str, str], now_ms: int
) -> None:
    report.counts["holds"] += len(holds)
    limit_ms = now_ms - HOLD_DEADLINE_GRACE_S * 1000
    for request_id, value in holds.items():
        try:
            hold = parse_hold_value(value)
        except ValueError:
            report.add(
                Mismatch(
                    "expired_hold",
                    account_id=account_id,
                    request_id=request_id,
                    note=f"unreadable hold value {value[:100]!r}",
                )
            )
            continue
        if hold.deadline_ms < limit_ms:
            report.add(
                Mismatch(
                    "expired_hold",
                    account_id=account_id,
                    request_id=request_id,
                    actual_millicredits=hold.amount_millicredits,
                    note=f"open {(now_ms - hold.deadline_ms) // 1000} s past its deadline",
                )
            )


async def reconcile(
    pool: asyncpg.Pool, redis: aioredis.Redis | None, *, since: date
) -> ReconciliationReport:
    """Run every check; without ``redis`` the Redis checks are skipped (``redisChecked`` 0).
    ``since`` is not checked here (callers take it through ``check_since``); a run that
    starts after ``default_since()`` or skips Redis is recorded as partial
    (``counts.complete`` 0).

    Raises:
        asyncpg.PostgresError, OSError: Postgres unreachable or failing.
        redis.exceptions.RedisError: Redis unreachable.
    """
    report = ReconciliationReport(since=since, started_at=datetime.now(UTC))
    report.counts["mismatchedMillicredits"] = 0
    async with pool.acquire() as conn:
        await check_account_balances(conn, report)
        await check_daily_deductions(conn, report)
        await check_month_totals(conn, report)
        await check_rate_snapshots(conn, report, recorded_before=_day_start(since))
    report.counts["redisChecked"] = int(redis is not None)
    if redis is not None:
        await check_redis(pool, redis, report)
    report.counts["complete"] = int(
        redis is not None and since <= default_since(report.started_at.date())
    )
    report.finished_at = datetime.now(UTC)
    return report


async def record_run(
    conn: asyncpg.Connection | asyncpg.Pool, report: ReconciliationReport, *, source: str
) -> int:
    """Append the report to ``reconciliation_runs`` and log ``reconciliation.finished``
    (the admin service's gauges read it: ``billing.fleet_gauges``); returns the row's id.

    Args:
        source: ``scheduled`` or ``cli``.
    """
    run_id: int = await conn.fetchval(
        """INSERT INTO reconciliation_runs (source, since_day, started_at, finished_at, ok,
                                            mismatches, mismatch_counts, counts)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb) RETURNING id""",
        source,
        report.since,
        report.started_at,
        report.finished_at or datetime.now(UTC),
        report.ok,
        orjson.dumps([m.to_doc() for m in report.mismatches]).decode(),
        orjson.dumps(report.mismatch_counts).decode(),
        orjson.dumps(report.counts).decode(),
    )
    log.log(
        logging.INFO if report.ok else logging.ERROR,
        "reconciliation finished",
        extra={
            "event": "reconciliation.finished",
            "runId": run_id,
            "source": source,
            "ok": report.ok,
            "since": report.since.isoformat(),
            "mismatchCounts": report.mismatch_counts,
            "complete": report.complete,
            "dailyDeductionsMillicredits": str(report.counts.get("dailyDeductionsMillicredits", 0)),
            "mismatchedMillicredits": str(report.counts.get("mismatchedMillicredits", 0)),
        },
    )
    return run_id


class DailyReconciliation:
    """The service's daily run: ``first_check_s`` after start, then every
    ``check_interval_s``, if no scheduled run started today (UTC), one process
    (``pg_try_advisory_lock``) runs ``reconcile`` over the default window and records it.

    Attributes:
        last_report: the latest report this process produced (None before its first), for
            metrics.
        runs: how many runs this process made.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis | None,
        *,
        check_interval_s: float = SCHEDULE_CHECK_INTERVAL_S,
        first_check_s: float = SCHEDULE_FIRST_CHECK_S,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._check_interval_s = check_interval_s
        self._first_check_s = first_check_s
        self.last_report: ReconciliationReport | None = None
        self.runs = 0

    async def run(self) -> None:
        """Forever (for ``supervise``): sleep ``first_check_s``, then ``run_once`` every
        ``check_interval_s``."""
        await asyncio.sleep(self._first_check_s)
        while True:
            await self.run_once()
            await asyncio.sleep(self._check_interval_s)

    async def run_once(self) -> ReconciliationReport | None:
        """Run today's reconciliation unless another process holds the lock or it ran
        already; returns the report, or None when it did not run.

        Raises:
            asyncpg.PostgresError, OSError, RedisError: a store unreachable (the supervisor
                restarts the loop; the lock dies with the session or is released here).
        """
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_ID):
                return None
            try:
                done = await conn.fetchval(
                    """SELECT EXISTS (SELECT 1 FROM reconciliation_runs
                                       WHERE source = 'scheduled'
                                         AND started_at >= date_trunc('day', now(), 'UTC'))"""
                )
                if done:
                    return None
                report = await reconcile(self._pool, self._redis, since=default_since())
                await record_run(conn, report, source="scheduled")
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
        self.last_report = report
        self.runs += 1  # record_run logged it (reconciliation.finished)
        return report
