"""Month partitions of the ledger of record: ``usage_events`` and ``ledger_entries`` (0012).

- ``create_ahead``: this month's partitions and ``MONTHS_AHEAD`` more, through the SQL
  function ``create_month_partitions`` (``migrations/functions/``; idempotent). The service
  runs it at start and every ``MAINTENANCE_INTERVAL_S`` (``run_maintenance``), once per fleet
  at a time: each run takes ``pg_try_advisory_xact_lock`` in its own transaction, and a
  process that does not get it skips the run (another one is doing it).
- ``detach_before``: ``ALTER TABLE ... DETACH PARTITION`` of every month before a given one,
  for archiving (the table stays, outside the ledger). Refused for a month not fully in the
  past or one the reconciliation's default window still covers. A detached ledger month's
  per-account sums go to ``ledger_archived_totals`` in the same transaction, so balances still
  equal the ledger's sums (reconciliation counts them). Runs as the tables' owner.
- ``list_partitions``: every partition with its month and estimated rows.

Rows outside every month partition land in each table's DEFAULT partition.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

import asyncpg

from billing.errors import POSTGRES_UNAVAILABLE
from billing.reconciliation import DEFAULT_DAYS, default_since

log = logging.getLogger(__name__)

#: The partitioned tables, each with its partition key.
PARTITIONED_TABLES = {"usage_events": "started_at", "ledger_entries": "created_at"}
#: Months created ahead of the current one.
MONTHS_AHEAD = 3
#: Seconds between maintenance runs of the service.
MAINTENANCE_INTERVAL_S = 3600.0
#: The advisory lock that makes a maintenance run once per fleet ("cgpm").
MAINTENANCE_LOCK_ID = 0x6367706D
#: How long creating a partition waits for its table's lock before the run gives up.
LOCK_TIMEOUT = "5s"

_MONTH_SUFFIX = re.compile(r"_p(\d{4})_(\d{2})$")


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition: its table, name, month (None: the DEFAULT partition) and the
    planner's estimate of its rows (-1: never analysed)."""

    table: str
    name: str
    month: date | None
    estimated_rows: int


@dataclass(frozen=True, slots=True)
class CreatedMonth:
    """A month ``create_ahead`` looked at: ``created`` now, or there already; a month whose
    rows sit in the DEFAULT partition is not created (``default_rows`` > 0)."""

    table: str
    name: str
    created: bool
    default_rows: int


class DetachRefusedError(ValueError):
    """``detach_before`` refused the month (the message says why); nothing was detached."""


def month_start(day: date) -> date:
    """The first day of ``day``'s month."""
    return day.replace(day=1)


def add_months(month: date, months: int) -> date:
    """The first day of the month ``months`` after ``month``'s."""
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _today() -> date:
    return datetime.now(UTC).date()


async def list_partitions(conn: asyncpg.Connection | asyncpg.Pool) -> list[Partition]:
    """Every partition of the partitioned tables, by table and name."""
    rows = await conn.fetch(
        """SELECT p.relname AS parent, c.relname AS name, c.reltuples::bigint AS estimated
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
            WHERE p.relname = ANY($1::text[])
            ORDER BY p.relname, c.relname""",
        list(PARTITIONED_TABLES),
    )
    return [Partition(r["parent"], r["name"], _month_of(r["name"]), r["estimated"]) for r in rows]


def _month_of(name: str) -> date | None:
    match = _MONTH_SUFFIX.search(name)
    return None if match is None else date(int(match.group(1)), int(match.group(2)), 1)


async def create_ahead(
    pool: asyncpg.Pool, *, months_ahead: int = MONTHS_AHEAD, today: date | None = None
) -> list[CreatedMonth] | None:
    """Create the partitions of this month (UTC) and ``months_ahead`` more, one table per
    transaction (never holding both tables' locks); None when another process holds the
    maintenance lock (it is doing the same)."""
    first = month_start(today or _today())
    months: list[CreatedMonth] = []
    async with pool.acquire() as conn:
        for table in PARTITIONED_TABLES:
            async with conn.transaction():
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK_ID
                ):
                    return None
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                rows = await conn.fetch(
                    "SELECT * FROM create_month_partitions($1, $2, $3)",
                    table,
                    first,
                    add_months(first, months_ahead),
                )
            months.extend(CreatedMonth(*row) for row in rows)
    return months


async def maintain_once(pool: asyncpg.Pool) -> None:
    """One maintenance run: ``create_ahead``, logging what it created and any month left to
    the DEFAULT partition. Postgres unavailable or a lock wait timed out: logged, the next
    run tries again."""
    try:
        months = await create_ahead(pool)
    except (*POSTGRES_UNAVAILABLE, asyncpg.LockNotAvailableError) as exc:
        log.warning("partition maintenance failed (next run retries): %r", exc)
        return
    for month in months or []:
        if month.created:
            log.info("partition created", extra={"event": "partition.created", **_doc(month)})
        elif month.default_rows:
            log.error(
                "partition not created: its rows are in the DEFAULT partition",
                extra={"event": "partition.blocked", **_doc(month)},
            )


def _doc(month: CreatedMonth) -> dict[str, object]:
    return {"table": month.table, "partition": month.name, "defaultRows": month.default_rows}


async def run_maintenance(pool: asyncpg.Pool, interval_s: float = MAINTENANCE_INTERVAL_S) -> None:
    """The service's loop: ``maintain_once`` at start, then every ``interval_s``."""
    while True:
        await maintain_once(pool)
        await asyncio.sleep(interval_s)


def check_detachable(before: date, *, today: date | None = None) -> date:
    """The first day of ``before``'s month when every month before it may be detached.

    Raises:
        DetachRefusedError: a month before it is not fully in the past (UTC), or the
            reconciliation's default window (its last ``DEFAULT_DAYS`` days) reaches into it.
    """
    today = today or _today()
    bound = month_start(before)
    if bound > month_start(today):
        raise DetachRefusedError(
            f"cannot detach months before {bound:%Y-%m}: {month_start(today):%Y-%m} is not "
            "fully in the past (UTC)"
        )
    since = default_since(today)
    if bound > since:
        raise DetachRefusedError(
            f"cannot detach months before {bound:%Y-%m}: reconciliation still covers them "
            f"(its last {DEFAULT_DAYS} days start on {since.isoformat()}); detach months "
            f"before {month_start(since):%Y-%m} at most"
        )
    return bound


async def detach_before(
    conn: asyncpg.Connection, before: date, *, today: date | None = None
) -> list[str]:
    """Detach every month partition before ``before``'s month, in one transaction; a ledger
    month's per-account sums are recorded in ``ledger_archived_totals`` first. Answers the
    names detached (the tables stay, to archive and drop).

    Raises:
        DetachRefusedError: see ``check_detachable``.
    """
    bound = check_detachable(before, today=today)
    old = [p for p in await list_partitions(conn) if p.month is not None and p.month < bound]
    async with conn.transaction():
        for partition in old:
            if partition.table == "ledger_entries":
                await conn.execute(
                    f"""INSERT INTO ledger_archived_totals
                               (partition_name, account_id, amount_millicredits, entries)
                        SELECT $1, account_id, sum(amount_millicredits), count(*)
                          FROM {partition.name} GROUP BY account_id""",
                    partition.name,
                )
            await conn.execute(f"ALTER TABLE {partition.table} DETACH PARTITION {partition.name}")
    return [p.name for p in old]
