"""A month of books for the finance report tests: an opening balance, purchases on two
accounts, usage on two models (and one without a rate card), a refund, a dispute and an
adjustment, plus usage and a grant before and after the month that must stay out of it.
Posted through the ledger's own functions, then dated by a superuser (every entry is dated
``now()``, and the ledger is append-only)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg

from billing import ledger
from billing.metering.outbox import posting_row
from billing.metering.posting import post_settlements
from billing.statements import month_bounds
from tests.billing.money import usage_record

MONTH = date(2026, 5, 1)
START, END = month_bounds(MONTH)
BEFORE = START - timedelta(days=3)
AFTER = END  # the first instant of the next month: out


@dataclass
class Books:
    """What the test posted: account ids and the rate cards' ids by model."""

    accounts: tuple[int, int]
    rate_cards: dict[str, int]


async def _post(
    conn: asyncpg.Connection,
    account_id: int,
    entry_type: str,
    amount: int,
    key: str,
    reverses: int | None = None,
) -> int:
    result = await ledger.post_entry(
        conn,
        account_id=account_id,
        entry_type=entry_type,
        amount_millicredits=amount,
        idempotency_key=key,
        reverses_entry_id=reverses,
    )
    return result.entry.id


async def _use(
    conn: asyncpg.Connection,
    account_id: int,
    request_id: str,
    model: str,
    rate_card_id: int | None,
    tokens: tuple[int, int, int],
    cost: int,
) -> None:
    prompt, cached, completion = tokens
    record = usage_record(request_id=request_id, account_id=account_id, cost_millicredits=cost)
    record = record._replace(
        model=model,
        rate_card_id=rate_card_id,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
    )
    await post_settlements(
        conn, "[" + posting_row(record.to_json(), charged_millicredits=cost) + "]"
    )


async def _move(conn: asyncpg.Connection, when: datetime, keys: list[str]) -> None:
    """Date entries (and their usage events) to ``when``: as a superuser with triggers off,
    since the ledger is append-only and every entry is dated ``now()``."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "UPDATE ledger_entries SET created_at = $1 WHERE idempotency_key = ANY($2)", when, keys
        )
        await conn.execute(
            "UPDATE usage_events SET recorded_at = $1, started_at = $1"
            " WHERE 'usage:' || request_id = ANY($2)",
            when,
            keys,
        )


async def post_month_of_books(pool: asyncpg.Pool) -> Books:
    tag = uuid.uuid4().hex[:8]
    async with pool.acquire() as conn:
        cards = {}
        for model, upstream_in, upstream_out in (("fin-a", 150, 600), ("fin-b", 2_500, 10_000)):
            cards[model] = await conn.fetchval(
                """INSERT INTO rate_cards (model, model_kind, input_millicredits_per_1k_tokens,
                       output_millicredits_per_1k_tokens, max_output_tokens,
                       upstream_input_microusd_per_1k_tokens,
                       upstream_output_microusd_per_1k_tokens, effective_at)
                   VALUES ($1, 'chat', 1000, 4000, 4096, $2, $3, $4) RETURNING id""",
                model,
                upstream_in,
                upstream_out,
                BEFORE,
            )
        first = await ledger.create_account(conn, f"a-{tag}@example.com")
        second = await ledger.create_account(conn, f"b-{tag}@example.com")
        # Before the month: a grant, and a request on fin-a (its charge is in the opening).
        await _post(conn, first, "adjustment", 5_000_000, f"grant:{tag}:old")
        await _use(conn, first, f"{tag}-old", "fin-a", cards["fin-a"], (999, 0, 999), 700)
        await _move(conn, BEFORE, [f"grant:{tag}:old", f"usage:{tag}-old"])
        # The month.
        bought = await _post(conn, first, "purchase", 10_000_000, f"purchase:cs_{tag}")
        await _post(conn, second, "purchase", 2_000_000, f"purchase:cs_{tag}_2")
        await _use(conn, first, f"{tag}-a1", "fin-a", cards["fin-a"], (1_000, 200, 500), 3_000)
        await _use(conn, first, f"{tag}-a2", "fin-a", cards["fin-a"], (333, 0, 77), 457)
        await _use(
            conn, second, f"{tag}-b1", "fin-b", cards["fin-b"], (2_000, 1_000, 1_000), 20_000
        )
        await _use(conn, second, f"{tag}-x", "fin-x", None, (10, 0, 10), 5)
        await _post(conn, first, "reversal", -2_500_000, f"refund:re_{tag}", bought)
        await _post(conn, first, "reversal", -1_000_000, f"dispute:dp_{tag}:opened", bought)
        await _post(conn, first, "adjustment", 123, f"grant:{tag}:goodwill")
        in_month = [
            f"purchase:cs_{tag}",
            f"purchase:cs_{tag}_2",
            f"usage:{tag}-a1",
            f"usage:{tag}-a2",
            f"usage:{tag}-b1",
            f"usage:{tag}-x",
            f"refund:re_{tag}",
            f"dispute:dp_{tag}:opened",
            f"grant:{tag}:goodwill",
        ]
        await _move(conn, START, in_month)  # the first instant of the month: in
        # After the month: a request on fin-b and a grant, in neither report.
        await _use(conn, second, f"{tag}-late", "fin-b", cards["fin-b"], (5, 0, 5), 999)
        await _post(conn, first, "adjustment", 77, f"grant:{tag}:late")
        await _move(conn, AFTER, [f"usage:{tag}-late", f"grant:{tag}:late"])
    return Books((first, second), cards)
