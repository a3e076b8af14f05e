"""Posting settlements to the Postgres ledger: one statement per outbox batch.

The SQL function ``record_settlement_rows`` (see ``migrations/``) writes a usage event and a
deduction ledger entry per request id, at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from billing.ledger import PostedBalance
from billing.metering import outbox


@dataclass(frozen=True, slots=True)
class RecordedSettlement:
    """What Postgres did with one outbox settlement."""

    request_id: str
    account_id: int
    recorded: bool
    charged_millicredits: int


async def record_settlements(
    conn: asyncpg.Connection, settlements: list[dict[str, Any]]
) -> tuple[list[RecordedSettlement], dict[int, PostedBalance]]:
    """Post a batch of settlements (usage event + deduction entry each) in one transaction.

    Args:
        settlements: usage records keyed by ``billing.metering.outbox.FIELDS``, each with
            ``charged``
            (the millicredits the settle script charged).

    Returns:
        Per settlement whether it was new, and each touched account's posted balance after
        the commit. A request id seen before is skipped (``recorded=False``).
    """
    rows = [
        outbox.posting_row(outbox.encode(item), charged=item["charged"], seq=seq)
        for seq, item in enumerate(settlements)
    ]
    return await record_settlement_rows(conn, "[" + ",".join(rows) + "]")


async def record_settlement_rows(
    conn: asyncpg.Connection, batch: str
) -> tuple[list[RecordedSettlement], dict[int, PostedBalance]]:
    """``record_settlements`` for a batch that is already JSON (the settlement writer's
    form: it splices outbox payloads without decoding them).

    Args:
        batch: a JSON array of posting rows (``billing.metering.outbox.posting_row``: a format-2
            payload with ``charged`` and ``seq``, its position, which orders an account's
            settlements), read by ``migrations/0006_record_settlement_rows.sql``.
    """
    # One statement, so one transaction: the function locks, posts and reports balances.
    rows = await conn.fetch("SELECT * FROM record_settlement_rows($1::jsonb)", batch)
    return (
        [RecordedSettlement(r[0], r[1], r[2], r[3]) for r in rows],
        {r[1]: PostedBalance(r[4], r[5], r[6]) for r in rows},
    )


@dataclass(frozen=True, slots=True)
class AccountPosting:
    """What one settlement batch did to one account (``record_settlement_rows_by_account``).

    Attributes:
        recorded: settlements posted now (a usage event each, a deduction entry if charged).
        duplicates: settlements whose request id was posted before (nothing changed).
        charged_millicredits: sum of what the recorded settlements took from the balance.
        posted: the account's balance, version and shortfall after the batch.
    """

    account_id: int
    recorded: int
    duplicates: int
    charged_millicredits: int
    posted: PostedBalance


# The same function and transaction as record_settlement_rows, summed per account in the same
# statement: the writer needs no row per settlement, and reading 500 result rows and building
# an object for each cost it ~3 µs per settlement (a backlog drained by one writer, /proc CPU).
# balance, version and shortfall are the account's values after the batch on every row.
_BY_ACCOUNT_SQL = """
SELECT out_account_id,
       count(*) FILTER (WHERE out_recorded),
       count(*) FILTER (WHERE NOT out_recorded),
       coalesce(sum(out_charged_millicredits) FILTER (WHERE out_recorded), 0)::bigint,
       min(out_balance_millicredits), min(out_balance_version), min(out_shortfall_millicredits)
  FROM record_settlement_rows($1::jsonb)
 GROUP BY out_account_id
"""


async def record_settlement_rows_by_account(
    conn: asyncpg.Connection, batch: str
) -> list[AccountPosting]:
    """``record_settlement_rows``, answered per account instead of per settlement.

    Args:
        batch: a JSON array of posting rows (see ``record_settlement_rows``).

    Returns:
        One ``AccountPosting`` per account in the batch.

    Raises:
        asyncpg.PostgresError: nothing was posted (the batch is one transaction).
    """
    return [
        AccountPosting(r[0], r[1], r[2], r[3], PostedBalance(r[4], r[5], r[6]))
        for r in await conn.fetch(_BY_ACCOUNT_SQL, batch)
    ]
