"""Holds in Redis over the Lua scripts: reserve, settle, void, expiry and balance sync."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from billing import ledger
from billing.errors import (
    AccountSuspendedError,
    BillingUnavailableError,
    InsufficientCreditsError,
)
from billing.metering.holds import HoldStore, PostedBalance, parse_hold_value
from billing.metering.outbox import STREAM_FIELDS, SettlementRecord
from billing.metering.redis_keys import (
    SHARD_COUNT,
    deadlines_key,
    deadlines_keys,
    holds_key,
    outbox_key,
    shard_of,
)
from devtools.localservices import free_port
from tests.billing.money import grant, new_account, reserve_and_settle, usage_payload


async def _settle(holds: HoldStore, account_id: int, request_id: str, cost: int):
    return await holds.settle(
        account_id,
        request_id=request_id,
        cost_millicredits=cost,
        payload=usage_payload(request_id=request_id, account_id=account_id, cost_millicredits=cost),
    )


def _deadlines(account_id: int) -> str:
    return deadlines_key(shard_of(account_id))


def _outbox(account_id: int) -> str:
    return outbox_key(shard_of(account_id))


async def _open_holds(holds: HoldStore, account_id: int) -> dict[str, int]:
    raw = await holds.redis.hgetall(holds_key(account_id))
    return {rid: parse_hold_value(value).amount_millicredits for rid, value in raw.items()}


# -- reserve ------------------------------------------------------------------------------


async def test_reserve_uncached_balance_loads_from_postgres(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    posted = await grant(pool, account_id, 10_000)  # Postgres only: Redis has no balance

    assert (await holds.account_state(account_id)).balance_millicredits is None
    available = await holds.reserve(account_id, 4_000, request_id="r1")

    state = await holds.account_state(account_id)
    assert available == 6_000
    assert (state.balance_millicredits, state.version) == (10_000, posted.version)
    assert state.held_millicredits == 4_000


async def test_reserve_cached_balance_does_not_reload(pool: asyncpg.Pool, redis_client) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000)
    loads: list[int] = []

    async def load(account: int) -> PostedBalance:
        loads.append(account)
        return await ledger.posted_balance(pool, account)

    holds = HoldStore(redis_client, load)
    await holds.reserve(account_id, 1_000, request_id="r1")
    await holds.reserve(account_id, 1_000, request_id="r2")

    assert loads == [account_id]


async def test_reserve_uncached_empty_account_refused(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)

    with pytest.raises(InsufficientCreditsError) as err:
        await holds.reserve(account_id, 1, request_id="r1")

    assert (err.value.required_millicredits, err.value.available_millicredits) == (1, 0)
    # The zero came from Postgres (version 0 cached), not from a missing key.
    assert (await holds.account_state(account_id)).version == 0


async def test_reserve_above_available_raises_insufficient(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await holds.reserve(account_id, 3_000, request_id="r1")

    with pytest.raises(InsufficientCreditsError) as err:
        await holds.reserve(account_id, 2_001, request_id="r2")

    assert err.value.required_millicredits == 2_001
    assert err.value.available_millicredits == 2_000
    assert await _open_holds(holds, account_id) == {"r1": 3_000}
    assert (await holds.account_state(account_id)).held_millicredits == 3_000
    # Exactly the rest is still available.
    assert await holds.reserve(account_id, 2_000, request_id="r3") == 0


async def test_reserve_same_request_id_holds_once(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)

    first = await holds.reserve(account_id, 3_000, request_id="r1")
    repeat = await holds.reserve(account_id, 3_000, request_id="r1")

    assert first == repeat == 2_000
    state = await holds.account_state(account_id)
    assert state.held_millicredits == 3_000
    assert await _open_holds(holds, account_id) == {"r1": 3_000}
    assert await holds.redis.zcard(_deadlines(account_id)) == 1


async def test_reserve_concurrent_exactly_k_succeed(holds: HoldStore, pool: asyncpg.Pool) -> None:
    hold_mc, k = 1_000, 7
    account_id = await new_account(pool)
    # Not synced: the first reserves race to load the balance as well.
    await grant(pool, account_id, k * hold_mc)

    results = await asyncio.gather(
        *(holds.reserve(account_id, hold_mc, request_id=f"r{i}") for i in range(50)),
        return_exceptions=True,
    )

    succeeded = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, InsufficientCreditsError)]
    assert len(succeeded) == k
    assert len(refused) == 50 - k
    assert sorted(succeeded) == [hold_mc * i for i in range(k)]
    state = await holds.account_state(account_id)
    assert state.held_millicredits == k * hold_mc
    assert state.available_millicredits == 0
    assert len(await _open_holds(holds, account_id)) == k


# -- settle and void ----------------------------------------------------------------------


async def test_settle_charges_cost_and_releases_hold(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    await holds.reserve(account_id, 5_000, request_id="r1")

    settled = await _settle(holds, account_id, "r1", 3_000)

    assert (settled.charged_millicredits, settled.hold_millicredits) == (3_000, 5_000)
    state = await holds.account_state(account_id)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 3_000)
    assert state.available_millicredits == 7_000
    assert await _open_holds(holds, account_id) == {}
    assert await holds.redis.zcard(_deadlines(account_id)) == 0
    [(entry_id, fields)] = await holds.redis.xrange(_outbox(account_id))
    assert entry_id == settled.outbox_entry_id
    assert fields[STREAM_FIELDS.charged_millicredits] == "3000"
    assert fields[STREAM_FIELDS.account_id] == str(account_id)
    assert SettlementRecord.from_json(fields[STREAM_FIELDS.record]).request_id == "r1"


async def test_settle_cost_above_hold_charges_what_balance_covers(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    await holds.reserve(account_id, 2_000, request_id="r1")
    await holds.reserve(account_id, 3_000, request_id="r2")

    # Above the hold but within the balance: charged in full.
    first = await _settle(holds, account_id, "r1", 4_500)
    # Above what is left once r2's hold is kept aside: charged up to the balance.
    second_cost = 20_000
    await holds.reserve(account_id, 500, request_id="r3")
    second = await _settle(holds, account_id, "r3", second_cost)

    assert first.charged_millicredits == 4_500
    assert second.charged_millicredits == 10_000 - 4_500 - 3_000
    state = await holds.account_state(account_id)
    assert state.pending_millicredits == 10_000 - 3_000
    assert state.held_millicredits == 3_000
    assert state.available_millicredits == 0


async def test_settle_without_hold_charges_cost_for_postgres_to_cap(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000, holds=holds)
    await holds.reserve(account_id, 1_000, request_id="r1")
    first = await _settle(holds, account_id, "r1", 600)

    # r2's hold is gone (voided at its deadline by the sweeper): its cost is not capped
    # against Redis's view; Postgres keeps one settlement per request id and caps it there.
    late = await _settle(holds, account_id, "r2", 600)

    assert first.charged_millicredits == 600
    assert (late.hold_millicredits, late.charged_millicredits) == (0, 600)
    assert (await holds.account_state(account_id)).available_millicredits == -200


async def test_void_releases_hold_once(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await holds.reserve(account_id, 5_000, request_id="r1")

    assert await holds.void(account_id, request_id="r1") == 5_000
    assert await holds.void(account_id, request_id="r1") == 0

    state = await holds.account_state(account_id)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)
    assert state.available_millicredits == 5_000
    assert await holds.redis.zcard(_deadlines(account_id)) == 0
    assert await holds.redis.xlen(_outbox(account_id)) == 0


async def test_void_with_deadline_guard_keeps_live_hold(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await holds.reserve(account_id, 2_000, request_id="r1", ttl_s=900)
    now_ms = int(time.time() * 1000)

    assert await holds.void(account_id, request_id="r1", expired_before_ms=now_ms) == 0
    assert await _open_holds(holds, account_id) == {"r1": 2_000}


# -- expiry -------------------------------------------------------------------------------


async def test_sweep_expired_voids_only_expired_holds(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    other_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    await grant(pool, other_id, 10_000, holds=holds)
    start_ms = int(time.time() * 1000)
    await holds.reserve(account_id, 1_000, request_id="short", ttl_s=1)
    await holds.reserve(other_id, 2_000, request_id="short-too", ttl_s=1)
    await holds.reserve(account_id, 3_000, request_id="long", ttl_s=900)

    assert await holds.sweep_expired(now_ms=start_ms) == 0
    assert await holds.sweep_expired(now_ms=start_ms + 60_000) == 2
    assert await holds.sweep_expired(now_ms=start_ms + 60_000) == 0

    assert await _open_holds(holds, account_id) == {"long": 3_000}
    assert await _open_holds(holds, other_id) == {}
    assert (await holds.account_state(account_id)).held_millicredits == 3_000
    assert (await holds.account_state(other_id)).held_millicredits == 0
    assert await holds.redis.zrange(_deadlines(account_id), 0, -1) == [f"{account_id}|long"]
    if shard_of(other_id) != shard_of(account_id):
        assert await holds.redis.zcard(_deadlines(other_id)) == 0


@pytest.mark.parametrize(
    "member", ["not-a-member", "x|req_1", "42|", "|req_1", "4 2|req_1", "other-shard"]
)
async def test_sweep_expired_drops_an_unreadable_deadline_and_goes_on(
    holds: HoldStore, pool: asyncpg.Pool, member: str
) -> None:
    """A member that names no hold comes first in the index; the sweep still voids the
    expired hold behind it, and removes the member so it cannot block the next sweep."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000, holds=holds)
    start_ms = int(time.time() * 1000)
    await holds.reserve(account_id, 1_000, request_id="crashed", ttl_s=1)
    if member == "other-shard":  # an account whose hold would be in another shard's index
        member = f"{account_id + 1}|req_1"
    await holds.redis.zadd(_deadlines(account_id), {member: 0})

    assert await holds.sweep_expired(now_ms=start_ms + 60_000) == 1

    assert await _open_holds(holds, account_id) == {}
    assert await holds.redis.zrange(_deadlines(account_id), 0, -1) == []


async def test_reserve_refused_reclaims_expired_hold(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await holds.reserve(account_id, 3_000, request_id="crashed", ttl_s=0)  # deadline: now
    await holds.reserve(account_id, 2_000, request_id="live", ttl_s=900)

    available = await holds.reserve(account_id, 3_000, request_id="next")

    assert available == 0
    assert await _open_holds(holds, account_id) == {"live": 2_000, "next": 3_000}
    assert (await holds.account_state(account_id)).held_millicredits == 5_000
    members = set(await holds.redis.zrange(_deadlines(account_id), 0, -1))
    assert members == {f"{account_id}|live", f"{account_id}|next"}
    # The live hold is never reclaimed.
    with pytest.raises(InsufficientCreditsError):
        await holds.reserve(account_id, 1, request_id="one-more")


async def test_reserve_with_room_keeps_expired_hold_for_sweeper(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await holds.reserve(account_id, 1_000, request_id="crashed", ttl_s=0)

    await holds.reserve(account_id, 1_000, request_id="next")
    assert set(await _open_holds(holds, account_id)) == {"crashed", "next"}

    assert await holds.sweep_expired() == 1
    assert await _open_holds(holds, account_id) == {"next": 1_000}


# -- balance sync -------------------------------------------------------------------------


async def test_sync_balance_applies_only_newer_versions(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)

    assert await holds.sync_balance(account_id, PostedBalance(5_000, 5))
    assert not await holds.sync_balance(account_id, PostedBalance(9_999, 3))
    assert not await holds.sync_balance(account_id, PostedBalance(9_999, 5))
    state = await holds.account_state(account_id)
    assert (state.balance_millicredits, state.version) == (5_000, 5)

    assert await holds.sync_balance(account_id, PostedBalance(4_000, 6))
    state = await holds.account_state(account_id)
    assert (state.balance_millicredits, state.version) == (4_000, 6)


async def test_sync_balance_keeps_holds(holds: HoldStore, pool: asyncpg.Pool) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 5_000, holds=holds)
    await holds.reserve(account_id, 2_000, request_id="r1")

    await grant(pool, account_id, 1_000, holds=holds)

    state = await holds.account_state(account_id)
    assert (state.balance_millicredits, state.held_millicredits) == (6_000, 2_000)
    assert state.available_millicredits == 4_000


async def test_reserve_with_shortfall_raises_suspended(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 3_000, holds=holds)
    async with pool.acquire() as conn:
        refund = await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="refund",
            amount_millicredits=-3_500,
            idempotency_key="refund:r1",
            rule=ledger.PostingRule.OWE,
        )
    await holds.sync_balance(account_id, refund.posted)
    await grant(pool, account_id, 10_000, holds=holds)  # credit again, shortfall still owed

    with pytest.raises(AccountSuspendedError) as err:
        await holds.reserve(account_id, 1, request_id="r1")

    assert err.value.account_id == account_id
    assert err.value.shortfall_millicredits == 500
    assert (await holds.account_state(account_id)).held_millicredits == 0


async def _owing(pool: asyncpg.Pool, shortfall_millicredits: int) -> int:
    """A new account with nothing and ``shortfall_millicredits`` owed (a reversal of credits
    already spent), in Postgres only: Redis has no cached balance for it."""
    account_id = await new_account(pool)
    async with pool.acquire() as conn:
        await ledger.post_entry(
            conn,
            account_id=account_id,
            entry_type="reversal",
            amount_millicredits=-shortfall_millicredits,
            idempotency_key="reversal:r1",
            rule=ledger.PostingRule.OWE,
        )
    return account_id


async def test_reserve_uncached_shortfall_loaded_and_suspends(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _owing(pool, 700)

    with pytest.raises(AccountSuspendedError) as err:
        await holds.reserve(account_id, 1, request_id="r1")
    assert err.value.shortfall_millicredits == 700


# -- Redis down ---------------------------------------------------------------------------


@pytest.fixture
async def unreachable_holds(pool: asyncpg.Pool) -> AsyncIterator[HoldStore]:
    client = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}/0",
        decode_responses=True,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield HoldStore(client, lambda account_id: ledger.posted_balance(pool, account_id))
    finally:
        await client.aclose()


async def test_reserve_redis_unreachable_raises_billing_unavailable(
    unreachable_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await new_account(pool)
    await grant(pool, account_id, 10_000)
    holds = unreachable_holds

    with pytest.raises(BillingUnavailableError):
        await holds.reserve(account_id, 1_000, request_id="r1")
    with pytest.raises(BillingUnavailableError):
        await _settle(holds, account_id, "r1", 500)
    with pytest.raises(BillingUnavailableError):
        await holds.void(account_id, request_id="r1")
    with pytest.raises(BillingUnavailableError):
        await holds.account_state(account_id)
    with pytest.raises(BillingUnavailableError):
        await holds.sweep_expired()
    # Documented: sync_balance lets RedisError through for its callers to log.
    with pytest.raises(RedisError):
        await holds.sync_balance(account_id, PostedBalance(10_000, 1))


async def test_zero_amount_hold_settles_voids_and_sweeps(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    """A free model's estimate is 0 mc: its hold must still settle, void and expire."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 1_000, holds=holds)
    await holds.reserve(account_id, 0, request_id="settled")
    await holds.reserve(account_id, 0, request_id="voided")
    await holds.reserve(account_id, 0, request_id="expired", ttl_s=0)

    settled = await _settle(holds, account_id, "settled", 250)
    assert (settled.hold_millicredits, settled.charged_millicredits) == (0, 250)
    assert await holds.void(account_id, request_id="voided") == 0
    await holds.sweep_expired(now_ms=int(time.time() * 1000) + 1_000)

    assert await _open_holds(holds, account_id) == {}
    assert await holds.redis.zcard(_deadlines(account_id)) == 0
    state = await holds.account_state(account_id)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 250)
    assert await holds.redis.xlen(_outbox(account_id)) == 1


async def test_ack_posted_of_more_entries_than_one_xdel_slice_releases_each_once(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    """One ack_posted call for 2,100 entries (the script deletes them 1,000 at a time), then
    the same call again: every charge leaves ``pending`` exactly once, the outbox is empty."""
    account_id = await new_account(pool)
    await grant(pool, account_id, 100_000_000, holds=holds)
    count = 2_100
    redis_client = holds.redis
    await redis_client.xgroup_create(_outbox(account_id), "g", id="0", mkstream=True)
    for i in range(count):
        await reserve_and_settle(
            holds, account_id, request_id=f"r{i}", hold_millicredits=100, cost_millicredits=7
        )
    assert (await holds.account_state(account_id)).pending_millicredits == 7 * count
    reply = await redis_client.xreadgroup("g", "c", {_outbox(account_id): ">"}, count=count)
    pairs: list[object] = []
    for entry_id, fields in reply[0][1]:
        pairs += [entry_id, int(fields[STREAM_FIELDS.charged_millicredits])]
    posted = await ledger.posted_balance(pool, account_id)
    assert await holds.ack_posted(account_id, posted, pairs, group="g") == 7 * count
    assert await holds.ack_posted(account_id, posted, pairs, group="g") == 0
    assert (await holds.account_state(account_id)).pending_millicredits == 0
    assert await redis_client.xlen(_outbox(account_id)) == 0


async def test_sweep_expired_voids_expired_holds_on_every_shard(
    holds: HoldStore, pool: asyncpg.Pool
) -> None:
    """Accounts on several shards: each shard's deadline index is swept."""
    accounts: dict[int, int] = {}  # shard -> account
    while len(accounts) < 4:
        account_id = await new_account(pool)
        accounts.setdefault(shard_of(account_id), account_id)
    start_ms = int(time.time() * 1000)
    for account_id in accounts.values():
        await grant(pool, account_id, 10_000, holds=holds)
        await holds.reserve(account_id, 1_000, request_id="crashed", ttl_s=1)
        await holds.reserve(account_id, 2_000, request_id="live", ttl_s=900)
    assert len(accounts) == 4 and SHARD_COUNT >= 4

    assert await holds.sweep_expired(now_ms=start_ms + 60_000) == 4

    for shard, account_id in accounts.items():
        assert await _open_holds(holds, account_id) == {"live": 2_000}
        assert (await holds.account_state(account_id)).held_millicredits == 2_000
        assert await holds.redis.zrange(deadlines_key(shard), 0, -1) == [f"{account_id}|live"]
    indexes = [key for key in deadlines_keys() if await holds.redis.exists(key)]
    assert indexes == sorted(deadlines_key(shard) for shard in accounts)
