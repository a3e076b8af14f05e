"""The ledger of record at the size real traffic makes (``make bench-ledger``).

Loads ``--rows`` usage events (default 50 million) and one deduction entry each over
``--accounts`` accounts (default 10,000) into a private PostgreSQL server (fsync on, as a
deployment; ``--fast`` turns it off), spread evenly over ``--months`` months ending this
month, one heavy account (id 1) taking ``--heavy-share`` of the rows. The rows are made by
``generate_series`` in SQL, ``--chunk`` rows a statement, with the migrations' schema
(partitioned by month, migration 0012) and triggers bypassed for the load only
(``session_replication_role = replica``; the monthly totals' triggers, 0013, are ENABLE
ALWAYS, so the load builds the totals statements read); every account then gets one grant and
its balance (grant minus its deductions), so reconciliation's balance check holds. Then it
reports:

- the settlement writer's posting rate: ``post_settlements`` batches of ``--batch`` fresh
  settlements (random accounts, started now) into the big tables, rows per second;
- the heavy account's usage page and ledger page (the Credits page's first page, and a page
  of one month), and its statement of last month: p50/p99 over ``--runs`` runs each (the
  issue's target for user-facing queries: p99 under 50 ms);
- a reconciliation of one day (yesterday): the per-day check alone, and the whole run
  (which also sums every account's entries, and compares the monthly totals with the rows
  of yesterday's month).

Numbers on a shared machine are indicative only. ``--rows 1000000`` is the smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from billing import ledger, reconciliation, statements  # noqa: E402
from billing.metering import outbox, posting  # noqa: E402
from billing.metering.outbox import SettlementRecord  # noqa: E402
from billing.partitions import add_months, create_ahead, month_start  # noqa: E402
from creditgate.migrator import apply_migrations  # noqa: E402
from devtools.localservices import start_postgres  # noqa: E402

GRANT_MILLICREDITS = 10**15
HEAVY_ACCOUNT = 1

# $1, $2: the chunk's first and last row number; $3 rows in all; $4 accounts; $5 the heavy
# account's share in thousandths; $6 the first month's start; $7 the span in seconds. Row g
# starts at first + span * g / rows (rows arrive in time order, as posting writes them).
_ROWS_SQL = """
SELECT g,
       'req_bench_' || lpad(to_hex(g), 12, '0') AS request_id,
       CASE WHEN g % 1000 < $5 THEN 1 ELSE 2 + (g * 7919) % ($4 - 1) END AS account_id,
       $6::timestamptz + make_interval(secs => $7 * g::double precision / $3) AS started_at,
       (100 + g % 900)::bigint AS prompt_tokens,
       (20 + g % 300)::bigint AS completion_tokens
  FROM generate_series($1::bigint, $2::bigint) AS g
"""

_USAGE_INSERT = f"""
INSERT INTO usage_events (request_id, account_id, api_key_id, model, endpoint, prompt_tokens,
    cached_tokens, completion_tokens, rate_card_id, input_millicredits_per_1k_tokens,
    cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens, rounding_mode,
    cost_millicredits, charged_millicredits, shortfall_millicredits, hold_millicredits,
    usage_source, status, started_at, finished_at, upstream_latency_ms, recorded_at)
SELECT r.request_id, r.account_id, NULL, 'gpt-4o-mini', 'chat.completions', r.prompt_tokens, 0,
       r.completion_tokens, NULL, 150, 75, 600, 'ceil',
       (r.prompt_tokens * 150 + r.completion_tokens * 600 + 999) / 1000,
       (r.prompt_tokens * 150 + r.completion_tokens * 600 + 999) / 1000, 0, 5000,
       'upstream', 'completed', r.started_at, r.started_at + interval '800 ms', 700,
       r.started_at + interval '900 ms'
  FROM ({_ROWS_SQL}) AS r
"""

_LEDGER_INSERT = f"""
INSERT INTO ledger_entries (account_id, entry_type, amount_millicredits,
    balance_after_millicredits, idempotency_key, reference, created_at)
SELECT r.account_id, 'deduction',
       -((r.prompt_tokens * 150 + r.completion_tokens * 600 + 999) / 1000),
       {GRANT_MILLICREDITS // 2}, 'usage:' || r.request_id, r.request_id, r.started_at
  FROM ({_ROWS_SQL}) AS r
"""


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "runs": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def _timed(runs: int, call: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    await call()  # warm: plans and pages
    samples: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


async def load(pool: asyncpg.Pool, args: argparse.Namespace, first_month: date) -> dict[str, Any]:
    """Accounts, usage rows, their deductions, one grant per account, balances; seconds."""
    started = time.perf_counter()
    first = datetime(first_month.year, first_month.month, 1, tzinfo=UTC)
    span_s = (datetime.now(UTC) - first).total_seconds()
    heavy_thousandths = round(args.heavy_share * 1000)
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO accounts (id, email, balance_millicredits, created_at)
               SELECT g, 'bench-' || g || '@example.com', 0, $2::timestamptz
                 FROM generate_series(1, $1::bigint) AS g""",
            args.accounts,
            first - timedelta(days=1),
        )
        await conn.execute("SELECT setval('accounts_id_seq', $1)", args.accounts)
        await conn.execute("SET session_replication_role = replica")
        for low in range(1, args.rows + 1, args.chunk):
            high = min(args.rows, low + args.chunk - 1)
            params = (low, high, args.rows, args.accounts, heavy_thousandths, first, span_s)
            await conn.execute(_USAGE_INSERT, *params)
            await conn.execute(_LEDGER_INSERT, *params)
            print(f"loaded {high:,} / {args.rows:,} rows", file=sys.stderr, flush=True)
        await conn.execute(
            """INSERT INTO ledger_entries (account_id, entry_type, amount_millicredits,
                   balance_after_millicredits, idempotency_key, created_at)
               SELECT id, 'adjustment', $1, $1, 'grant:bench:' || id, $2
                 FROM accounts""",
            GRANT_MILLICREDITS,
            first - timedelta(days=1),
        )
        await conn.execute(
            """UPDATE accounts a SET balance_millicredits = s.total, balance_version = s.n
                 FROM (SELECT account_id, sum(amount_millicredits) AS total, count(*) AS n
                         FROM ledger_entries GROUP BY account_id) s
                WHERE s.account_id = a.id"""
        )
        await conn.execute("SET session_replication_role = origin")
        loaded_s = time.perf_counter() - started
        await conn.execute("VACUUM ANALYZE usage_events")
        await conn.execute("VACUUM ANALYZE ledger_entries")
        await conn.execute("VACUUM ANALYZE accounts")
    return {
        "load_s": round(loaded_s, 1),
        "vacuum_analyze_s": round(time.perf_counter() - started - loaded_s, 1),
    }


def _settlement_batch(accounts: int, size: int) -> str:
    now_ms = int(time.time() * 1000)
    rows = []
    for _ in range(size):
        record = SettlementRecord(
            request_id=f"req_{uuid.uuid4().hex}",
            account_id=random.randint(2, accounts),
            api_key_id=None,
            model="gpt-4o-mini",
            endpoint="chat.completions",
            prompt_tokens=500,
            cached_tokens=0,
            completion_tokens=100,
            rate_card_id=None,
            input_millicredits_per_1k_tokens=150,
            cached_input_millicredits_per_1k_tokens=75,
            output_millicredits_per_1k_tokens=600,
            rounding_mode="ceil",
            cost_millicredits=135,
            hold_millicredits=5000,
            usage_source="upstream",
            status="completed",
            started_at_ms=now_ms - 900,
            finished_at_ms=now_ms,
            upstream_latency_ms=700,
        )
        rows.append(outbox.posting_row(record.to_json(), charged_millicredits=135))
    return "[" + ",".join(rows) + "]"


async def posting_rate(pool: asyncpg.Pool, args: argparse.Namespace) -> dict[str, Any]:
    """``post_settlements`` batches, one after another, as one settlement writer posts."""
    batches = [_settlement_batch(args.accounts, args.batch) for _ in range(args.post_batches)]
    async with pool.acquire() as conn:
        started = time.perf_counter()
        posted = 0
        for batch in batches:
            for account in await posting.post_settlements(conn, batch):
                posted += account.posted
        elapsed = time.perf_counter() - started
    return {
        "batches": args.post_batches,
        "batch_size": args.batch,
        "settlements_posted": posted,
        "settlements_per_s": round(posted / elapsed),
    }


async def user_queries(pool: asyncpg.Pool, args: argparse.Namespace) -> dict[str, Any]:
    """The heavy account's pages and last month's statement, p50/p99."""
    this_month = month_start(datetime.now(UTC).date())
    last_month = add_months(this_month, -1)
    since = datetime(last_month.year, last_month.month, 1, tzinfo=UTC)
    until = datetime(this_month.year, this_month.month, 1, tzinfo=UTC)
    heavy_rows = await pool.fetchval(
        "SELECT count(*) FROM usage_events WHERE account_id = $1", HEAVY_ACCOUNT
    )
    return {
        "heavy_account_usage_rows": heavy_rows,
        "usage_page": await _timed(
            args.runs,
            lambda: ledger.list_usage_events(pool, account_id=HEAVY_ACCOUNT, limit=50),
        ),
        "usage_page_of_last_month": await _timed(
            args.runs,
            lambda: ledger.list_usage_events(
                pool, account_id=HEAVY_ACCOUNT, since=since, until=until, limit=50
            ),
        ),
        "ledger_page": await _timed(
            args.runs,
            lambda: ledger.list_ledger_entries(pool, account_id=HEAVY_ACCOUNT, limit=50),
        ),
        "statement_of_last_month": await _timed(
            max(3, args.runs // 10),
            lambda: statements.monthly_statement(pool, HEAVY_ACCOUNT, last_month),
        ),
    }


async def reconcile_one_day(pool: asyncpg.Pool) -> dict[str, Any]:
    """Yesterday's per-day check alone, then the whole reconciliation since yesterday."""
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    report = reconciliation.ReconciliationReport(since=yesterday, started_at=datetime.now(UTC))
    started = time.perf_counter()
    async with pool.acquire() as conn:
        await reconciliation.check_daily_deductions(conn, report)
    daily_s = time.perf_counter() - started
    started = time.perf_counter()
    whole = await reconciliation.reconcile(pool, None, since=yesterday)
    return {
        "daily_check_s": round(daily_s, 3),
        "daily_check_ok": report.mismatch_counts.get("daily_deductions", 0) == 0,
        "whole_run_s": round(time.perf_counter() - started, 3),
        "whole_run_ok": whole.ok,
        "whole_run_mismatches": whole.mismatch_counts,
    }


async def run(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    await apply_migrations(dsn)
    first_month = add_months(month_start(datetime.now(UTC).date()), 1 - args.months)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        await create_ahead(pool, months_ahead=args.months + 2, today=first_month)
        result: dict[str, Any] = {"rows": args.rows, "accounts": args.accounts}
        result["load"] = await load(pool, args, first_month)
        result["posting"] = await posting_rate(pool, args)
        # As the service reads them (runtime.resources.postgres_ctx's READ_POOL).
        reads = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=2,
            server_settings={
                "default_transaction_read_only": "on",
                "plan_cache_mode": "force_custom_plan",
            },
        )
        try:
            result["user_queries"] = await user_queries(reads, args)
        finally:
            await reads.close()
        result["reconciliation"] = await reconcile_one_day(pool)
        return result
    finally:
        await pool.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--heavy-share", type=float, default=0.05, help="of all rows (0-1)")
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500, help="settlements per batch")
    parser.add_argument("--post-batches", type=int, default=40)
    parser.add_argument("--runs", type=int, default=200, help="runs per user query")
    parser.add_argument("--fast", action="store_true", help="fsync off (a quicker load)")
    parser.add_argument("--dsn", default=None, help="an empty database instead of a private server")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.dsn is not None:
        result = asyncio.run(run(args, args.dsn))
    else:
        with tempfile.TemporaryDirectory(prefix="cg-ledger-bench-") as tmp:
            server = start_postgres(Path(tmp), fast=args.fast)
            try:
                result = asyncio.run(run(args, server.dsn))
            finally:
                server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
