"""Spend controls through the gateway with the official SDK: daily caps under concurrency,
a lowered cap, a suspended account, the model allow list, the maximum per request and the
requests-per-minute limit.

The auth cache: these gateways keep identities ``AUTH_CACHE_TTL_S`` (0.2 s here, or the
harness's 0), so a change in Postgres is seen once that passes; the control listener that
drops the cache on ``notify_control`` is the flags branch's, and the tests send the event as
the admin API does.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import openai
import pytest

from billing.control import ControlKind, notify_control
from billing.spend_controls import spend_windows
from devtools.simulator import Scenario

MESSAGES = [{"role": "user", "content": "hi"}]
AUTH_CACHE_TTL_S = 0.2


async def _set_key(gw, key_id_of, column: str, value) -> None:
    async with gw.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"UPDATE api_keys SET {column} = $1 WHERE id = $2", value, key_id_of)
        await notify_control(conn, ControlKind.KEYS, api_key_id=key_id_of)


async def _set_account(gw, account_id: int, column: str, value) -> None:
    async with gw.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"UPDATE accounts SET {column} = $1 WHERE id = $2", value, account_id)
        await notify_control(conn, ControlKind.ACCOUNTS, account_id=account_id)


async def _key_id(gw, account_id: int) -> int:
    return await gw.pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)


async def _hold_of_one_request(gw, model: str = "gpt-4o-mini", max_tokens: int = 50) -> int:
    """The hold the gateway places for the tests' request (read back from its usage row)."""
    _, key = await gw.create_account(10_000_000)
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens
    )
    await gw.settled()
    usage = await gw.usage(raw.headers["x-request-id"])
    return int(usage["hold_millicredits"])


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


async def test_fifty_concurrent_requests_against_a_daily_cap_admit_exactly_what_fits(
    make_gateway, sim
) -> None:
    gw = await make_gateway()
    hold = await _hold_of_one_request(gw)
    account, key = await gw.create_account(10_000_000)
    fits = 7
    await _set_key(
        gw, await _key_id(gw, account), "daily_spend_cap_millicredits", fits * hold + hold // 2
    )
    # Slow answers: every request reserves before any settles (a settled request counts its
    # charge, below its hold, which would leave room for one more).
    sim.set_default(Scenario(chunks=1, delay_s=2.0))
    client = gw.client(key)

    async def one() -> str:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
            )
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            return _error(exc)["code"]
        return "ok"

    answers = await asyncio.gather(*(one() for _ in range(50)))

    assert answers.count("ok") == fits
    assert answers.count("spend_cap_exceeded") == 50 - fits
    await gw.settled()
    state = await gw.state(account)
    assert state.held_millicredits == 0
    charged = await gw.pool.fetchval(
        "SELECT count(*) FROM usage_events WHERE account_id = $1", account
    )
    assert charged == fits


async def test_cap_body_names_the_cap_its_window_and_when_it_resets(make_gateway, sim) -> None:
    gw = await make_gateway()
    account, key = await gw.create_account(10_000_000)
    await _set_account(gw, account, "daily_spend_cap_millicredits", 1)

    with pytest.raises(openai.APIStatusError) as refused:
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
        )

    assert refused.value.status_code == 402
    assert refused.value.response.headers["x-request-id"]
    error = _error(refused.value)
    resets = spend_windows(int(dt.datetime.now(dt.UTC).timestamp() * 1000)).day_reset_ms
    resets_at = dt.datetime.fromtimestamp(resets / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (error["code"], error["cap"], error["window"], error["resetsAt"]) == (
        "spend_cap_exceeded",
        "account_daily",
        "day",
        resets_at,
    )
    assert error["message"] == (
        f"The account's daily spend cap of 0.001 credits would be exceeded; it resets at "
        f"{resets_at}."
    )
    assert (error["capCredits"], error["spentCredits"]) == (0.001, 0)
    assert error["requiredCredits"] > 0
    assert sim.requests == []
    assert (await gw.state(account)).held_millicredits == 0


async def test_lowering_a_cap_takes_effect_on_a_running_gateway(make_gateway, sim) -> None:
    gw = await make_gateway(auth_cache_ttl_s=AUTH_CACHE_TTL_S)
    account, key = await gw.create_account(10_000_000)
    key_id = await _key_id(gw, account)
    await _set_key(gw, key_id, "daily_spend_cap_millicredits", 1_000_000)
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)

    await _set_key(gw, key_id, "daily_spend_cap_millicredits", 10)
    await asyncio.sleep(AUTH_CACHE_TTL_S + 0.1)

    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert refused.value.status_code == 402
    error = _error(refused.value)
    assert (error["cap"], error["capCredits"]) == ("key_daily", 0.01)
    assert error["spentCredits"] > 0  # the first request's charge, counted in today's window


async def test_suspended_account_gets_403_and_nothing_is_forwarded(make_gateway, sim) -> None:
    gw = await make_gateway(auth_cache_ttl_s=AUTH_CACHE_TTL_S)
    account, key = await gw.create_account(10_000_000)
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    forwarded = len(sim.requests)

    await _set_account(gw, account, "status", "suspended")
    await asyncio.sleep(AUTH_CACHE_TTL_S + 0.1)

    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    error = _error(refused.value)
    assert (error["code"], error["message"]) == (
        "account_deactivated",
        "This account is suspended. Contact support to reactivate it.",
    )
    assert len(sim.requests) == forwarded
    assert (await gw.state(account)).held_millicredits == 0

    await _set_account(gw, account, "status", "active")
    await asyncio.sleep(AUTH_CACHE_TTL_S + 0.1)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_model_outside_an_allow_list_gets_403(gw, sim) -> None:
    account, key = await gw.create_account(10_000_000)
    await _set_key(gw, await _key_id(gw, account), "allowed_models", ["gpt-4o", "gpt-4o-mini"])
    await _set_account(gw, account, "allowed_models", ["gpt-4o-mini"])
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    error = _error(refused.value)
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert error["message"] == "The model `gpt-4o` is not in this account's allowed models."
    assert [r.json["model"] for r in sim.requests] == ["gpt-4o-mini"]


async def test_request_above_the_maximum_per_request_gets_402(gw, sim) -> None:
    account, key = await gw.create_account(10_000_000)
    await _set_key(gw, await _key_id(gw, account), "max_request_millicredits", 5_000)
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)

    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10_000
        )

    assert refused.value.status_code == 402
    error = _error(refused.value)
    assert (error["code"], error["cap"], error["window"], error["resetsAt"]) == (
        "spend_cap_exceeded",
        "key_max_request",
        "request",
        None,
    )
    assert error["capCredits"] == 5.0 and error["requiredCredits"] > 5.0
    assert len(sim.requests) == 1


async def test_requests_per_minute_limit_answers_429_with_retry_after(gw, sim) -> None:
    account, key = await gw.create_account(10_000_000)
    await _set_key(gw, await _key_id(gw, account), "requests_per_minute", 2)
    client = gw.client(key)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    response = refused.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-limit-requests"] == "2"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    error = _error(refused.value)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for requests per minute")
    assert len(sim.requests) == 2


async def test_key_without_controls_leaves_no_spend_counters(gw, sim) -> None:
    _, key = await gw.create_account(10_000_000)
    await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert await gw.redis.keys("*:spend:*") == []
    assert await gw.redis.keys("*:rpm:*") == []
