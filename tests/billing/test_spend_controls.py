"""Spend caps in the reserve script, the spend counters through reserve, settle, void and
expiry, their load from Postgres, the windows, and the per-key request rate limit."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
import redis.asyncio as aioredis

from billing import api_keys, ledger
from billing.errors import RateLimitedError, SpendCapExceededError
from billing.metering import outbox, posting
from billing.metering.holds import HoldStore, parse_hold_value
from billing.metering.rate_limit import RateLimiter
from billing.metering.redis_keys import holds_key, spend_key
from billing.spend_controls import (
    Limits,
    SpendCap,
    SpendControls,
    WindowCaps,
    check_max_request,
    check_model,
    spend_windows,
    window_spend,
)
from devtools.localservices import free_port
from tests.billing.money import grant, new_account, usage_payload, usage_record

DAY_MS = 86_400_000


@pytest.fixture
def capped_holds(redis_client: aioredis.Redis, pool: asyncpg.Pool) -> HoldStore:
    """A HoldStore that loads missing spend counters from Postgres, as the gateway's does."""
    return HoldStore(
        redis_client,
        lambda account_id: ledger.posted_balance(pool, account_id),
        load_spend=lambda account_id, key_id, windows: window_spend(
            pool, account_id, key_id, windows
        ),
    )


async def _new_key(pool: asyncpg.Pool, account_id: int) -> int:
    async with pool.acquire() as conn:
        _, record = await api_keys.create_api_key(conn, account_id)
    return record.id


async def _funded(pool: asyncpg.Pool, holds: HoldStore, credits_mc: int = 1_000_000) -> int:
    account_id = await new_account(pool)
    await grant(pool, account_id, credits_mc, holds=holds)
    return account_id


async def _spend(
    holds: HoldStore, account_id: int, key_id: int, started_ms: int
) -> list[int | None]:
    """The counters (day account, day key, month account, month key) of the windows."""
    windows = spend_windows(started_ms)
    day = await holds.redis.hmget(spend_key(account_id, "d", windows.day_id), ["a", f"k:{key_id}"])
    month = await holds.redis.hmget(
        spend_key(account_id, "m", windows.month_id), ["a", f"k:{key_id}"]
    )
    return [None if v is None else int(v) for v in (*day, *month)]


def _caps(
    *,
    key_daily: int | None = None,
    account_daily: int | None = None,
    key_monthly: int | None = None,
    account_monthly: int | None = None,
) -> WindowCaps:
    return (account_daily, key_daily, account_monthly, key_monthly)


async def _settle(holds: HoldStore, account_id: int, request_id: str, cost: int) -> None:
    await holds.settle(
        account_id,
        request_id=request_id,
        cost_millicredits=cost,
        payload=usage_payload(request_id=request_id, account_id=account_id, cost_millicredits=cost),
    )


async def _post_usage(
    pool: asyncpg.Pool, account_id: int, key_id: int, charges: list[int], started_ms: int
) -> None:
    """Usage events already posted to Postgres (as the poster writes them)."""
    rows = []
    for i, charge in enumerate(charges):
        record = usage_record(
            request_id=f"posted-{key_id}-{started_ms}-{i}",
            account_id=account_id,
            cost_millicredits=charge,
        )._replace(api_key_id=key_id, started_at_ms=started_ms, finished_at_ms=started_ms + 10)
        rows.append(outbox.posting_row(record.to_json(), charged_millicredits=charge))
    async with pool.acquire() as conn:
        await posting.post_settlements(conn, "[" + ",".join(rows) + "]")


# -- the caps in reserve.lua ---------------------------------------------------------------


async def test_reserve_past_a_key_daily_cap_names_the_cap_and_writes_nothing(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    now_ms = int(time.time() * 1000)
    caps = _caps(key_daily=5_000)
    await capped_holds.reserve(
        account_id, 3_000, request_id="r1", api_key_id=key_id, started_ms=now_ms, window_caps=caps
    )
    before_holds = await capped_holds.redis.hgetall(holds_key(account_id))

    with pytest.raises(SpendCapExceededError) as refused:
        await capped_holds.reserve(
            account_id,
            2_001,
            request_id="r2",
            api_key_id=key_id,
            started_ms=now_ms,
            window_caps=caps,
        )

    exc = refused.value
    assert (exc.cap, exc.cap_millicredits, exc.spent_millicredits, exc.required_millicredits) == (
        SpendCap.KEY_DAILY,
        5_000,
        3_000,
        2_001,
    )
    assert exc.resets_at_ms == (now_ms // DAY_MS + 1) * DAY_MS
    assert await capped_holds.redis.hgetall(holds_key(account_id)) == before_holds
    assert (await capped_holds.account_state(account_id)).held_millicredits == 3_000
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [3_000, 3_000, 3_000, 3_000]
    # Exactly up to the cap is admitted.
    await capped_holds.reserve(
        account_id, 2_000, request_id="r3", api_key_id=key_id, started_ms=now_ms, window_caps=caps
    )


async def test_reserve_names_the_account_monthly_cap_when_it_is_the_one_passed(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    now_ms = int(time.time() * 1000)
    caps = _caps(key_daily=100_000, account_monthly=1_000)
    with pytest.raises(SpendCapExceededError) as refused:
        await capped_holds.reserve(
            account_id,
            1_001,
            request_id="r1",
            api_key_id=key_id,
            started_ms=now_ms,
            window_caps=caps,
        )
    assert refused.value.cap == SpendCap.ACCOUNT_MONTHLY
    assert refused.value.resets_at_ms == spend_windows(now_ms).month_reset_ms


async def test_concurrent_reserves_admit_exactly_what_the_cap_allows(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    caps = _caps(account_daily=7_500)

    async def one(i: int) -> bool:
        try:
            await capped_holds.reserve(
                account_id, 1_000, request_id=f"r{i}", api_key_id=key_id, window_caps=caps
            )
        except SpendCapExceededError:
            return False
        return True

    admitted = await asyncio.gather(*(one(i) for i in range(50)))
    assert sum(admitted) == 7
    assert (await capped_holds.account_state(account_id)).held_millicredits == 7_000


# -- the counters ----------------------------------------------------------------------------


async def test_counters_follow_reserve_settle_void_and_expiry(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    now_ms = int(time.time() * 1000)
    caps = _caps(key_monthly=1_000_000)

    async def reserve(request_id: str, amount: int, ttl_s: float = 900) -> None:
        await capped_holds.reserve(
            account_id,
            amount,
            request_id=request_id,
            api_key_id=key_id,
            started_ms=now_ms,
            window_caps=caps,
            ttl_s=ttl_s,
        )

    await reserve("r1", 2_000)
    await reserve("r2", 3_000)
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [5_000] * 4
    value = parse_hold_value(await capped_holds.redis.hget(holds_key(account_id), "r1"))
    assert (value.amount_millicredits, value.api_key_id, value.counted) == (
        2_000,
        key_id,
        (True, True, True, True),
    )

    await _settle(capped_holds, account_id, "r1", 1_500)  # hold 2,000 -> charge 1,500
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [4_500] * 4
    await _settle(capped_holds, account_id, "r1", 1_500)  # a repeat changes nothing
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [4_500] * 4

    assert await capped_holds.void(account_id, request_id="r2") == 3_000
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [1_500] * 4

    await reserve("r3", 700, ttl_s=0.001)
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [2_200] * 4
    await asyncio.sleep(0.01)
    assert await capped_holds.sweep_expired() == 1
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [1_500] * 4


async def test_reserve_refused_by_a_cap_first_voids_overdue_holds_from_the_counters(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    caps = _caps(key_daily=1_000)
    await capped_holds.reserve(
        account_id, 1_000, request_id="crashed", api_key_id=key_id, window_caps=caps, ttl_s=0.001
    )
    await asyncio.sleep(0.01)
    # The crashed gateway's hold is past its deadline: it no longer counts against the cap.
    await capped_holds.reserve(
        account_id, 1_000, request_id="next", api_key_id=key_id, window_caps=caps
    )
    assert await capped_holds.redis.hkeys(holds_key(account_id)) == ["next"]


async def test_settle_after_midnight_moves_the_window_the_request_started_in(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    now_ms = int(time.time() * 1000)
    yesterday_late = (now_ms // DAY_MS) * DAY_MS - 1  # 23:59:59.999 UTC yesterday
    await _post_usage(pool, account_id, key_id, [5_000], now_ms - 1_000)  # today's, not counted
    await capped_holds.reserve(
        account_id,
        4_000,
        request_id="r1",
        api_key_id=key_id,
        started_ms=yesterday_late,
        window_caps=_caps(key_daily=10_000),
    )
    assert (await _spend(capped_holds, account_id, key_id, yesterday_late))[:2] == [4_000, 4_000]

    await _settle(capped_holds, account_id, "r1", 2_500)  # settled today

    assert (await _spend(capped_holds, account_id, key_id, yesterday_late))[:2] == [2_500, 2_500]
    today = spend_windows(now_ms)
    assert not await capped_holds.redis.exists(spend_key(account_id, "d", today.day_id))


async def test_missing_counters_are_loaded_from_postgres_before_deciding(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    other_key = await _new_key(pool, account_id)
    now_ms = int(time.time() * 1000)
    windows = spend_windows(now_ms)
    await _post_usage(pool, account_id, key_id, [1_000, 2_000], now_ms - 1_000)
    await _post_usage(pool, account_id, other_key, [500], now_ms - 1_000)
    if windows.month_start_ms < windows.day_start_ms:  # earlier this month, not today
        await _post_usage(pool, account_id, key_id, [10_000], windows.day_start_ms - 1)
    await _post_usage(pool, account_id, key_id, [99_000], windows.month_start_ms - 1)  # last month
    month_extra = 10_000 if windows.month_start_ms < windows.day_start_ms else 0

    with pytest.raises(SpendCapExceededError) as refused:
        await capped_holds.reserve(
            account_id,
            600,
            request_id="r1",
            api_key_id=key_id,
            started_ms=now_ms,
            window_caps=_caps(account_daily=4_000),
        )

    assert refused.value.spent_millicredits == 3_500
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [
        3_500,
        3_000,
        3_500 + month_extra,
        3_000 + month_extra,
    ]
    ttl_ms = await capped_holds.redis.pttl(spend_key(account_id, "d", windows.day_id))
    assert windows.day_reset_ms - now_ms < ttl_ms <= windows.day_reset_ms + DAY_MS - now_ms


async def test_uncapped_holds_count_in_counters_that_exist_and_create_none(
    capped_holds: HoldStore, pool: asyncpg.Pool
) -> None:
    account_id = await _funded(pool, capped_holds)
    key_id = await _new_key(pool, account_id)
    other_key = await _new_key(pool, account_id)
    now_ms = int(time.time() * 1000)

    await capped_holds.reserve(account_id, 1_000, request_id="before", api_key_id=other_key)
    assert await _spend(capped_holds, account_id, other_key, now_ms) == [None] * 4

    await capped_holds.reserve(
        account_id,
        2_000,
        request_id="capped",
        api_key_id=key_id,
        window_caps=_caps(account_daily=50_000),
    )
    await capped_holds.reserve(account_id, 300, request_id="after", api_key_id=other_key)
    # Loaded at 0 (nothing posted), then both holds placed since count in the account field;
    # the other key's own field was not loaded (no cap of its own asked for it).
    assert await _spend(capped_holds, account_id, other_key, now_ms) == [2_300, None, 2_300, None]
    assert await _spend(capped_holds, account_id, key_id, now_ms) == [2_300, 2_000, 2_300, 2_000]

    # The hold placed before the counters existed is not in them; its charge is, in full,
    # when it settles (Postgres did not have it when they were loaded).
    await _settle(capped_holds, account_id, "before", 800)
    assert await _spend(capped_holds, account_id, other_key, now_ms) == [3_100, None, 3_100, None]


# -- checks without I/O, windows -------------------------------------------------------------


def test_windows_of_the_last_day_of_a_year() -> None:
    started_ms = 1_798_761_599_000  # 2026-12-31T23:59:59Z
    windows = spend_windows(started_ms)
    assert (windows.day_id, windows.month_id) == ("20261231", "202612")
    assert windows.day_reset_ms == windows.month_reset_ms == 1_798_761_600_000
    assert windows.month_start_ms == 1_796_083_200_000  # 2026-12-01
    assert spend_windows(started_ms + 1_000).day_id == "20270101"


def test_controls_of_nothing_set_are_none() -> None:
    none = SpendControls.of(
        account_suspended=False, key=Limits(), account=Limits(), requests_per_minute=None
    )
    assert none is None


def test_max_request_names_the_lower_cap_and_allow_lists_both_apply() -> None:
    controls = SpendControls.of(
        account_suspended=False,
        key=Limits(max_request_millicredits=5_000, allowed_models=frozenset({"a", "b"})),
        account=Limits(max_request_millicredits=3_000, allowed_models=frozenset({"a"})),
        requests_per_minute=None,
    )
    assert controls is not None and controls.window_caps is None
    check_max_request(controls, 3_000)
    with pytest.raises(SpendCapExceededError) as refused:
        check_max_request(controls, 3_001)
    assert refused.value.cap == SpendCap.ACCOUNT_MAX_REQUEST
    check_model(controls, "a")
    with pytest.raises(Exception, match="account's allowed models"):
        check_model(controls, "b")
    with pytest.raises(Exception, match="key's allowed models"):
        check_model(controls, "c")


def test_hold_values_of_both_forms_parse() -> None:
    assert parse_hold_value("12:34").counted == (False,) * 4
    value = parse_hold_value("12:34:20261203:202612:7:1010")
    assert (value.day_id, value.month_id, value.api_key_id) == ("20261203", "202612", 7)
    assert value.counted == (True, False, True, False)


# -- requests per minute ---------------------------------------------------------------------


async def test_rate_limit_is_shared_and_refuses_past_the_limit(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    other = aioredis.from_url(redis_url, decode_responses=True)
    try:
        first, second = RateLimiter(redis_client), RateLimiter(other)
        assert [await first.admit(1, 9, 3), await second.admit(1, 9, 3)] == [1, 2]
        assert await first.admit(1, 9, 3) == 3
        with pytest.raises(RateLimitedError) as refused:
            await second.admit(1, 9, 3)
        assert 0 < refused.value.retry_after_ms <= 60_000
        assert await first.admit(1, 10, 3) == 1  # another key counts apart
    finally:
        await other.aclose()


async def test_rate_limit_fails_open_and_counts_it_when_redis_is_unreachable() -> None:
    dead = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}", decode_responses=True, socket_connect_timeout=0.2
    )
    try:
        limiter = RateLimiter(dead)
        assert await limiter.admit(1, 9, 1) == 0
        assert limiter.failed_open == 1
    finally:
        await dead.aclose()
