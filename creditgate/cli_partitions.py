"""``creditgate partitions``: the month partitions of the ledger of record
(``billing.partitions``).

    creditgate partitions list
    creditgate partitions create-ahead [--months N]
    creditgate partitions detach --before YYYY-MM

Each prints one JSON document; they read only DATABASE_URL. ``detach`` needs the tables'
owner (the migrations' role); a refused month is an error document and exit status 1.
"""

from __future__ import annotations

import argparse
from typing import Any

import asyncpg

from billing import partitions
from billing.statements import parse_month
from runtime.settings import StoreSettings


async def cmd_partitions_list(settings: StoreSettings, args: argparse.Namespace) -> dict[str, Any]:
    """Every partition with its month and estimated rows."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        found = await partitions.list_partitions(conn)
    finally:
        await conn.close()
    return {
        "partitions": [
            {
                "table": p.table,
                "partition": p.name,
                "month": None if p.month is None else f"{p.month:%Y-%m}",
                "estimatedRows": p.estimated_rows,
            }
            for p in found
        ]
    }


async def cmd_partitions_create_ahead(
    settings: StoreSettings, args: argparse.Namespace
) -> dict[str, Any]:
    """This month's partitions and ``--months`` more (what the service does every hour)."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        months = await partitions.create_ahead(pool, months_ahead=args.months)
    finally:
        await pool.close()
    if months is None:
        return {"skipped": "another process holds the partition maintenance lock"}
    return {
        "months": [
            {
                "table": m.table,
                "partition": m.name,
                "created": m.created,
                "defaultRows": m.default_rows,
            }
            for m in months
        ]
    }


async def cmd_partitions_detach(
    settings: StoreSettings, args: argparse.Namespace
) -> dict[str, Any]:
    """Detach every month before ``--before`` (refused: an error document, exit 1)."""
    partitions.check_detachable(args.before)
    conn = await asyncpg.connect(settings.database_url)
    try:
        detached = await partitions.detach_before(conn, args.before)
    finally:
        await conn.close()
    return {"detached": detached}


def _month(text: str) -> Any:
    try:
        return parse_month(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_partitions_parser(sub: Any) -> None:
    """The ``partitions`` command and its ``list``, ``create-ahead`` and ``detach``
    subcommands, on ``sub`` (the ``creditgate`` parser's subparsers)."""
    group = sub.add_parser(
        "partitions", help="month partitions of usage_events and ledger_entries"
    ).add_subparsers(dest="action", required=True)
    group.add_parser("list", help="every partition, its month and rows").set_defaults(
        fn=cmd_partitions_list, config=StoreSettings.from_env
    )
    ahead = group.add_parser("create-ahead", help="create this month's and the next ones")
    ahead.add_argument("--months", type=int, default=partitions.MONTHS_AHEAD)
    ahead.set_defaults(fn=cmd_partitions_create_ahead, config=StoreSettings.from_env)
    detaching = (
        "Detach every month partition before YYYY-MM (to archive it; the tables stay). "
        "Refused for a month not fully in the past or still in the reconciliation window."
    )
    detach = group.add_parser("detach", help=detaching, description=detaching)
    detach.add_argument("--before", type=_month, required=True, metavar="YYYY-MM")
    detach.set_defaults(fn=cmd_partitions_detach, config=StoreSettings.from_env)
