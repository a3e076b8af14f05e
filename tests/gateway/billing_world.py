"""Helpers for the user billing API tests: a bearer client on a running gateway and direct
rows (usage events in bulk, back-dated ledger entries)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg

from billing import ledger

USAGE_INSERT_SQL = """
INSERT INTO usage_events (request_id, account_id, api_key_id, model, endpoint, prompt_tokens,
                          cached_tokens, completion_tokens, input_millicredits_per_1k_tokens,
                          cached_input_millicredits_per_1k_tokens,
                          output_millicredits_per_1k_tokens, rounding_mode, cost_millicredits,
                          charged_millicredits, usage_source, status, started_at, finished_at)
SELECT $1 || '-' || g, $2, $3, $4, 'chat.completions', 100 + g % 50, g % 10, 20 + g % 7,
       2400, 1200, 9600, 'exact', $5 + g % 13, $5 + g % 13, $6, 'completed',
       $7::timestamptz + g * interval '1 second', $7::timestamptz + g * interval '1 second'
  FROM generate_series(1, $8) AS g
"""


async def insert_usage(
    pool: asyncpg.Pool,
    account_id: int,
    api_key_id: int | None,
    *,
    count: int,
    started_at: datetime,
    model: str = "gpt-4o-mini",
    base_charge_millicredits: int = 1000,
    usage_source: str = "upstream",
) -> None:
    """``count`` usage events in one ``INSERT ... SELECT generate_series``; event ``g``
    (1..count) starts ``g`` seconds after ``started_at`` and is charged
    ``base + g % 13`` millicredits."""
    await pool.execute(
        USAGE_INSERT_SQL,
        f"req-{uuid.uuid4().hex[:12]}",
        account_id,
        api_key_id,
        model,
        base_charge_millicredits,
        usage_source,
        started_at,
        count,
    )


def expected_usage_charge(count: int, base_charge_millicredits: int = 1000) -> int:
    """The sum of the charges ``insert_usage`` writes."""
    return sum(base_charge_millicredits + g % 13 for g in range(1, count + 1))


async def post_at(
    pool: asyncpg.Pool, account_id: int, entry_type: str, amount: int, at: datetime, **kw: Any
) -> ledger.LedgerEntry:
    """Post an entry through the one writer, then back-date it (tests only: the trigger that
    keeps the ledger append-only is bypassed for this session with replica mode)."""
    async with pool.acquire() as conn:
        result = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type=entry_type,
            amount_millicredits=amount,
            idempotency_key=f"test:{uuid.uuid4()}",
            **kw,
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE ledger_entries SET created_at = $2 WHERE id = $1", result.entry.id, at
            )
    return result.entry


async def key_id(pool: asyncpg.Pool, account_id: int) -> int:
    """The account's (first) API key id."""
    value: int = await pool.fetchval(
        "SELECT id FROM api_keys WHERE account_id = $1 ORDER BY id LIMIT 1", account_id
    )
    return value


class BillingClient:
    """``/api/billing/*`` on a running gateway with one API key as bearer."""

    def __init__(self, gw: Any, key: str) -> None:
        self.root = gw.base_url.removesuffix("/v1")
        self.key = key

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        """GET; JSON bodies decoded, others returned as bytes."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.root + path, params=params, headers=self._headers()) as response,
        ):
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.read()

    async def response(self, path: str, **params: Any) -> tuple[aiohttp.ClientSession, Any]:
        """An open session and response (the caller reads the body in chunks, then closes
        the session)."""
        http = aiohttp.ClientSession()
        response = await http.get(self.root + path, params=params, headers=self._headers())
        return http, response

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.root + path, json=body, headers=self._headers()) as response,
        ):
            return response.status, await response.json()
