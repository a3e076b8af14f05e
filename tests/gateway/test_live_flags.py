"""Live flags and control events on a running gateway, through the official SDK.

Each flip goes through ``billing.live_flags.set_flag`` (the admin API's own call: the row, the
audit row and the NOTIFY in one transaction). The gateways here re-read on their own only
every 30 s (``control_refresh_s=30``), so a flip that lands within 2 s came by the event;
``test_flags_row_without_event_lands_by_the_periodic_reread`` covers the safety net.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import openai
import pytest

from billing import live_flags
from billing.audit import CLI_ACTOR
from billing.control import ControlKind, notify_control
from billing.live_flags import LiveFlags
from billing.metering.pricing import RoundingMode
from devtools.simulator import Scenario
from runtime import appkeys

HI = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "hi " * 600}]
FLAG_DELAY_S = 2.0  # the promise for a flag
KEY_DELAY_S = 5.0  # and for a revoked key


async def _flip(gw, name: str, value: object) -> None:
    async with gw.pool.acquire() as conn:
        await live_flags.set_flag(conn, CLI_ACTOR, name, value, gw.settings.initial_flags())


async def _within(seconds: float, check: Callable[[], object]) -> None:
    """Poll ``check()`` (sync or async) until it is truthy; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {seconds}s")
        await asyncio.sleep(0.02)


def _flags(gw) -> LiveFlags:
    return gw.app[appkeys.CONTROL].flags


async def _flipped(gw, name: str, value: object, *, expected: object = None) -> None:
    """Flip a flag and wait (at most FLAG_DELAY_S) until the gateway has it."""
    await _flip(gw, name, value)
    flag = live_flags.definition(name)
    want = flag.from_json(value) if expected is None else expected
    await _within(FLAG_DELAY_S, lambda: _flags(gw).value(flag) == want)


async def _usage_of(gw, raw) -> object:
    await gw.settled()
    row = await gw.usage(raw.headers["x-request-id"])
    assert row is not None
    return row


@pytest.fixture
async def slow_tick(make_gateway):
    return await make_gateway(control_refresh_s=30.0)


async def test_charging_off_flip_serves_uncharged(slow_tick, sim):
    gw = slow_tick
    account, key = await gw.create_account(0)
    with pytest.raises(openai.APIStatusError) as info:  # charged: 0 credits cannot pay
        await gw.client(key).chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.status_code == 402

    await _flipped(gw, "billing.charging_enabled", False)

    sim.push(Scenario(chunks=20, prompt_tokens=500))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI
    )
    row = await _usage_of(gw, raw)
    assert (row["status"], row["charged_millicredits"], row["hold_millicredits"]) == (
        "uncharged",
        0,
        0,
    )
    assert await gw.balance(account) == 0


async def test_paused_block_flip_refuses_with_503_charging_paused(slow_tick, sim):
    gw = slow_tick
    account, key = await gw.create_account(1_000_000)
    await _flipped(gw, "billing.charging_paused_mode", "block")
    await _flipped(gw, "billing.charging_enabled", False)

    with pytest.raises(openai.InternalServerError) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.status_code == 503
    assert info.value.code == "charging_paused"
    assert "paused" in info.value.message
    assert info.value.response.headers["x-request-id"]
    assert sim.requests == []
    assert (await gw.state(account)).held_millicredits == 0

    await _flipped(gw, "billing.charging_paused_mode", "free")
    sim.push(Scenario(chunks=3))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI
    )
    assert (await _usage_of(gw, raw))["status"] == "uncharged"


async def test_rounding_ceil_flip_charges_whole_credits(slow_tick, sim):
    gw = slow_tick
    account, key = await gw.create_account(1_000_000)
    await _flipped(gw, "billing.rounding_mode", "ceil")
    sim.push(Scenario(chunks=567, prompt_tokens=1_234))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=LONG, max_tokens=600
    )
    row = await _usage_of(gw, raw)
    # docs/design.md: gpt-4o 1,234 in / 567 out is 70.040 credits exact, 71 in ceil mode.
    assert (row["charged_millicredits"], row["rounding_mode"]) == (71_000, "ceil")
    assert await gw.balance(account) == 1_000_000 - 71_000


async def test_allowlist_flip_hides_other_models(slow_tick, sim):
    gw = slow_tick
    account, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    assert "gpt-4o" in [m.id for m in (await client.models.list()).data]

    await _flipped(gw, "billing.model_allowlist", ["gpt-4o-mini"])

    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.code == "model_not_found"
    assert [m.id for m in (await client.models.list()).data] == ["gpt-4o-mini"]
    assert sim.requests == []
    assert await gw.balance(account) == 1_000_000

    await _flipped(gw, "billing.model_allowlist", [])
    sim.push(Scenario(chunks=2))
    await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=50)


async def test_rollout_zero_serves_uncharged_and_hundred_charges(slow_tick, sim):
    gw = slow_tick
    account, key = await gw.create_account(1_000_000)
    await _flipped(gw, "billing.charging_rollout_percent", 0)
    sim.push(Scenario(chunks=10, prompt_tokens=100))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI
    )
    row = await _usage_of(gw, raw)
    assert (row["status"], row["charged_millicredits"]) == ("uncharged", 0)
    assert await gw.balance(account) == 1_000_000

    await _flipped(gw, "billing.charging_rollout_percent", 100)
    sim.push(Scenario(chunks=10, prompt_tokens=100))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI, max_tokens=50
    )
    row = await _usage_of(gw, raw)
    assert row["status"] == "completed" and row["charged_millicredits"] > 0
    assert await gw.balance(account) == 1_000_000 - row["charged_millicredits"]


async def test_purchase_disabled_flip_refuses_checkout(slow_tick):
    gw = slow_tick
    _, key = await gw.create_account(0)
    await _flipped(gw, "billing.purchase_enabled", False)
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            gw.base_url.removesuffix("/v1") + "/api/billing/checkout",
            json={"packageCode": "starter"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status == 503
        error = (await response.json())["error"]
    assert error["code"] == "purchases_unavailable"
    assert "temporarily disabled" in error["message"]


async def test_revoked_key_refused_within_5s_with_a_long_auth_cache(make_gateway, sim):
    gw = await make_gateway(auth_cache_ttl_s=300.0, control_refresh_s=30.0)
    account, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    await client.models.list()  # cached for 300 s

    async with gw.pool.acquire() as conn, conn.transaction():
        key_id = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE account_id = $1 RETURNING id", account
        )
        await notify_control(conn, ControlKind.KEYS, account_id=account, api_key_id=key_id)

    async def refused() -> bool:
        try:
            await client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    await _within(KEY_DELAY_S, refused)


async def test_listener_killed_reconnects_and_the_next_flip_lands(slow_tick):
    gw = slow_tick
    listener = gw.app[appkeys.CONTROL]
    await _within(FLAG_DELAY_S, lambda: listener.connected)
    listening = """SELECT pid FROM pg_stat_activity
                   WHERE datname = current_database() AND query LIKE 'LISTEN%'"""
    [old_pid] = [r["pid"] for r in await gw.pool.fetch(listening)]

    await gw.pool.execute("SELECT pg_terminate_backend($1)", old_pid)

    async def listening_again() -> bool:
        pids = [r["pid"] for r in await gw.pool.fetch(listening)]
        return listener.connected and bool(pids) and old_pid not in pids

    await _within(5.0, listening_again)
    await _flipped(gw, "billing.rounding_mode", "ceil")
    assert _flags(gw).rounding_mode is RoundingMode.CEIL


async def test_flags_row_without_event_lands_by_the_periodic_reread(make_gateway):
    gw = await make_gateway(control_refresh_s=0.2)
    # Written by hand, no NOTIFY: only the periodic re-read can bring it.
    await gw.pool.execute(
        "INSERT INTO flags (name, value, updated_by) "
        "VALUES ('billing.charging_rollout_percent', '5', 'psql')"
    )
    await _within(FLAG_DELAY_S, lambda: _flags(gw).charging_rollout_percent == 5)
    async with gw.pool.acquire() as conn:
        await live_flags.reset_flag(
            conn, CLI_ACTOR, "billing.charging_rollout_percent", gw.settings.initial_flags()
        )
    await _within(FLAG_DELAY_S, lambda: _flags(gw).charging_rollout_percent == 100)


async def test_environment_flags_in_force_until_a_row_overrides(make_gateway):
    gw = await make_gateway(charging_rollout_percent=40, control_refresh_s=30.0)
    assert _flags(gw).charging_rollout_percent == 40
    await _flipped(gw, "billing.low_balance_threshold_credits", 20)
    assert (_flags(gw).charging_rollout_percent, _flags(gw).low_balance_threshold_credits) == (
        40,
        20,
    )


async def test_low_balance_header_follows_the_live_threshold(slow_tick, sim):
    gw = slow_tick
    _, key = await gw.create_account(1_000_000)  # 1,000 credits; the default threshold is 500
    client = gw.client(key)
    sim.push(Scenario(chunks=2))
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=20
    )
    assert "x-creditgate-low-balance" not in raw.headers

    await _flipped(gw, "billing.low_balance_threshold_credits", 5_000)

    sim.push(Scenario(chunks=2))
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=20
    )
    assert raw.headers["x-creditgate-low-balance"] == "true"
    sim.push(Scenario(chunks=2))
    stream = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=20, stream=True
    )
    assert stream.headers["x-creditgate-low-balance"] == "true"
    async for _ in stream.parse():
        pass
