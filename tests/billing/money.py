"""Helpers for the money-path tests: accounts, grants and settlement records as the gateway
writes them to the outbox."""

from __future__ import annotations

import time
import uuid

import asyncpg

from billing import ledger
from billing.ledger import PostedBalance
from billing.metering.holds import HoldStore
from billing.metering.outbox import SettlementRecord


async def new_account(pool: asyncpg.Pool) -> int:
    """A fresh account with a zero balance (unique email, so tests and examples never clash)."""
    async with pool.acquire() as conn:
        return await ledger.create_account(conn, f"{uuid.uuid4().hex}@example.com")


async def grant(
    pool: asyncpg.Pool,
    account_id: int,
    amount_millicredits: int,
    *,
    holds: HoldStore | None = None,
) -> PostedBalance:
    """Post an adjustment (a purchase-like grant); with ``holds``, tell Redis as a purchase does."""
    async with pool.acquire() as conn:
        result = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="adjustment",
            amount_millicredits=amount_millicredits,
            idempotency_key=f"grant:{uuid.uuid4().hex}",
        )
    if holds is not None:
        await holds.sync_balance(account_id, result.posted)
    return result.posted


#: When each request id of the session "started" (``usage_record``).
_REQUEST_TIMES_MS: dict[str, int] = {}


def usage_record(
    *,
    request_id: str,
    account_id: int,
    cost_millicredits: int,
    hold_millicredits: int = 0,
) -> SettlementRecord:
    """A settlement record as the gateway builds it (a gpt-4o-mini chat call). A request id
    names one request: its record always carries the same times (a repeat from the outbox is
    the same record, and the request's start is part of its usage row's key, 0012)."""
    now_ms = _REQUEST_TIMES_MS.setdefault(request_id, int(time.time() * 1000))
    return SettlementRecord(
        request_id=request_id,
        account_id=account_id,
        api_key_id=None,
        model="gpt-4o-mini",
        endpoint="chat.completions",
        prompt_tokens=100,
        cached_tokens=0,
        completion_tokens=50,
        rate_card_id=None,
        input_millicredits_per_1k_tokens=2_400,
        cached_input_millicredits_per_1k_tokens=0,
        output_millicredits_per_1k_tokens=9_600,
        rounding_mode="exact",
        cost_millicredits=cost_millicredits,
        hold_millicredits=hold_millicredits,
        usage_source="upstream",
        status="completed",
        started_at_ms=now_ms - 250,
        finished_at_ms=now_ms,
        upstream_latency_ms=200,
    )


def usage_payload(
    *, request_id: str, account_id: int, cost_millicredits: int, hold_millicredits: int = 0
) -> str:
    """``usage_record`` as the payload ``HoldStore.settle`` appends to the outbox."""
    return usage_record(
        request_id=request_id,
        account_id=account_id,
        cost_millicredits=cost_millicredits,
        hold_millicredits=hold_millicredits,
    ).to_json()


async def reserve_and_settle(
    holds: HoldStore,
    account_id: int,
    *,
    request_id: str,
    hold_millicredits: int,
    cost_millicredits: int,
) -> int:
    """A whole request's money path in Redis; returns the millicredits charged."""
    await holds.reserve(account_id, hold_millicredits, request_id=request_id)
    settled = await holds.settle(
        account_id,
        request_id=request_id,
        cost_millicredits=cost_millicredits,
        payload=usage_payload(
            request_id=request_id,
            account_id=account_id,
            cost_millicredits=cost_millicredits,
            hold_millicredits=hold_millicredits,
        ),
    )
    return settled.charged_millicredits


async def money_totals(pool: asyncpg.Pool) -> tuple[int, int]:
    """(sum of usage events' charges, sum of deduction entries) over the whole database."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT (SELECT COALESCE(sum(charged_millicredits), 0) FROM usage_events),
                      (SELECT COALESCE(sum(amount_millicredits), 0) FROM ledger_entries
                        WHERE entry_type = 'deduction')"""
        )
    return int(row[0]), int(row[1])


def raw_entries(
    entries: list[tuple[str, dict[str, str]]],
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Outbox entries read by a decoding client, as the poster reads them (undecoded)."""
    return [
        (entry_id.encode(), {name.encode(): value.encode() for name, value in fields.items()})
        for entry_id, fields in entries
    ]
