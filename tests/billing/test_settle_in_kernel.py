"""Settling over the pipelined channel: sent at once, reply read later (or awaited)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from billing import ledger
from billing.errors import BillingUnavailableError
from billing.metering.holds import HoldStore, PendingSettlement
from billing.metering.script_channel import ScriptChannel
from tests.billing.money import grant, new_account, usage_payload


@pytest.fixture
async def channel_holds(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, redis_url: str
) -> AsyncIterator[HoldStore]:
    channel = ScriptChannel(redis_url, timeout_s=2.0)
    try:
        yield HoldStore(
            redis_client,
            lambda account_id: ledger.posted_balance(pool, account_id),
            channel=channel,
        )
    finally:
        await channel.close()


async def _send(holds: HoldStore, account_id: int, request_id: str, cost: int) -> PendingSettlement:
    return await holds.send_settle(
        account_id,
        request_id=request_id,
        cost_millicredits=cost,
        payload=usage_payload(request_id=request_id, account_id=account_id, cost_millicredits=cost),
    )


async def test_settle_is_in_the_kernel_before_its_reply(
    channel_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=channel_holds)
    await channel_holds.reserve(account_id, 3_000, request_id="r1")  # connects the channel
    pending = await _send(channel_holds, account_id, "r1", 1_200)
    assert await pending.in_kernel()
    settled = await pending.result()
    assert (settled.charged_millicredits, settled.hold_millicredits) == (1_200, 3_000)
    state = await channel_holds.account_state(account_id)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 1_200)


async def test_settle_before_any_connection_is_not_in_the_kernel_and_still_settles(
    channel_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=channel_holds)
    pending = await _send(channel_holds, account_id, "r-cold", 500)
    assert not await pending.in_kernel()  # the caller must await it before delivering
    assert (await pending.result()).charged_millicredits == 500


async def test_flushed_script_is_loaded_and_run_once(
    channel_holds: HoldStore, pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=channel_holds)
    await channel_holds.reserve(account_id, 2_000, request_id="r2")
    await redis_client.script_flush()
    failures: list[BaseException] = []
    pending = await _send(channel_holds, account_id, "r2", 800)
    assert await pending.in_kernel()
    pending.on_failure(failures.append)
    for _ in range(100):
        state = await channel_holds.account_state(account_id)
        if state.pending_millicredits:
            break
        await asyncio.sleep(0.02)
    assert failures == []
    assert (state.held_millicredits, state.pending_millicredits) == (0, 800)


async def test_failed_reply_is_reported_after_delivery() -> None:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[object] = loop.create_future()

    async def run_again() -> object:
        raise AssertionError("only NOSCRIPT is retried")

    written: asyncio.Future[bool] = loop.create_future()
    written.set_result(True)
    pending = PendingSettlement(reply, run_again, written=written)
    assert await pending.in_kernel()
    failures: list[BaseException] = []
    pending.on_failure(failures.append)
    reply.set_exception(redis.exceptions.ConnectionError("redis reply took over 5s"))
    await asyncio.sleep(0)
    assert len(failures) == 1
    assert isinstance(failures[0], BillingUnavailableError)
    assert "took over 5s" in str(failures[0])


async def test_reserve_on_the_connected_channel_survives_a_flushed_script(
    channel_holds: HoldStore, pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    """The reserve's fast path (the reply's bare future) meets NOSCRIPT after a live
    SCRIPT FLUSH: the script is loaded and the hold placed once."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=channel_holds)
    await channel_holds.reserve(account_id, 1_000, request_id="r-a")  # connects the channel
    await redis_client.script_flush()
    assert await channel_holds.reserve(account_id, 2_000, request_id="r-b") == 7_000
    state = await channel_holds.account_state(account_id)
    assert state.held_millicredits == 3_000
