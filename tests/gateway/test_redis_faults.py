"""Redis faults on the money path, against real Redis and Postgres (issue 11, defects 2, 7, 11).

A delivered answer is charged exactly once whatever Redis does after delivery; a stall
answers 503 ``billing_unavailable`` and leaks no connection; a hold whose void failed is
released as soon as Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from billing.errors import BillingUnavailableError
from devtools.localservices import RedisServer, start_redis
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys
from runtime import appkeys
from runtime.resources import SCRIPT_CHANNEL_NAME
from tests.harness import GatewayHarness

HI = [{"role": "user", "content": "hi"}]
# The channel's reply timeout in these tests: a pause longer than it loses a reply.
TIMEOUT_S = 0.4


async def _pause(redis_url: str, pause_ms: int) -> None:
    """CLIENT PAUSE ALL: what Redis's FAILOVER does (every client's commands wait)."""
    admin = aioredis.from_url(redis_url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    finally:
        await admin.aclose()


async def _until(check, *, limit_s: float = 30.0) -> None:
    """Wait until ``await check()`` is true (a bound, not a speed target)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.05)


async def _held(gw: GatewayHarness, account: int) -> bool:
    return (await gw.state(account)).held_millicredits > 0


async def _request_during_pause(
    gw: GatewayHarness, key: str, account: int, *, stream: bool, pause_ms: int
) -> tuple[str, str]:
    """A chat request whose upstream answers while Redis is paused (after its hold was
    placed): returns (x-request-id, the text the client received)."""
    client = gw.client(key)

    async def call() -> tuple[str, str]:
        if stream:
            response = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HI, stream=True
            )
            text = "".join(
                [c.choices[0].delta.content or "" async for c in response.parse() if c.choices]
            )
            return response.headers["x-request-id"], text
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI
        )
        return raw.headers["x-request-id"], raw.parse().choices[0].message.content or ""

    task = asyncio.create_task(call())
    await _until(lambda: _held(gw, account))
    await _pause(gw.settings.redis_url, pause_ms)
    return await task


async def _assert_charged_once(gw: GatewayHarness, account: int, request_id: str) -> None:
    """The request has its usage row (charged as the upstream reported), the account's
    only charge; nothing held or pending is left."""

    async def posted() -> bool:
        return await gw.usage(request_id) is not None

    await _until(posted)
    await gw.settled(timeout_s=30)
    usage = await gw.usage(request_id)
    assert usage is not None
    assert (usage["status"], usage["usage_source"]) == ("completed", "upstream")
    assert usage["charged_millicredits"] > 0
    assert await gw.balance(account) == 1_000_000 - usage["charged_millicredits"]
    assert await gw.ledger_sum(account) == await gw.balance(account)
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_settle_reply_lost_in_a_stall_is_sent_again_and_charged_once(
    make_gateway, sim, stream
):
    """CLIENT PAUSE longer than the channel's timeout, while a delivered answer's settle is
    in flight: the channel drops the connection (Redis discards the command), the rescue
    sends it again once Redis answers, and the answer is charged exactly once."""
    gw = await make_gateway(redis_socket_timeout_s=TIMEOUT_S)
    account, key = await gw.create_account(1_000_000)
    # The answer takes 2 s after the hold, the pause starts well within that (the hold is seen
    # in ~0.05 s) and lasts 3.5 s: the settle is sent while Redis is paused, however loaded
    # the machine (with 0.6 s, a slow poll let the settle land before the pause began).
    sim.push(Scenario(chunks=4, delay_s=0.5, prompt_tokens=20))
    request_id, text = await _request_during_pause(gw, key, account, stream=stream, pause_ms=3_500)
    assert text == " hello" * 4  # delivered
    await _assert_charged_once(gw, account, request_id)
    rescue = gw.app[gateway_keys.SETTLEMENT_RESCUE]
    assert (rescue.stats.resettled, rescue.outstanding) == (1, 0)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, without an append-only file: a restart comes back empty."""
    server = start_redis(tmp_path / "redis-a", appendonly=False)
    try:
        yield server
    finally:
        server.stop()


async def test_settle_lost_when_redis_restarts_empty_is_charged_once(
    make_gateway, sim, own_redis: RedisServer, tmp_path: Path
):
    """The settle of a delivered answer waits in a paused Redis that is then stopped and
    started again empty (no hold, no balance, no outbox): the rescue settles it in the new
    Redis, whose outbox the poster posts to Postgres."""
    gw = await make_gateway(redis_url=own_redis.url, redis_socket_timeout_s=TIMEOUT_S)
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=4, delay_s=0.15, prompt_tokens=20))
    request_id, text = await _request_during_pause(gw, key, account, stream=False, pause_ms=30_000)
    assert text == " hello" * 4
    own_redis.stop()
    restarted = start_redis(tmp_path / "redis-b", port=own_redis.port, appendonly=False)
    with contextlib.suppress(redis.exceptions.ConnectionError):
        await gw.redis.ping()  # the test's own client drops its connection to the old server
    try:
        await _assert_charged_once(gw, account, request_id)
    finally:
        await gw.stop()
        restarted.stop()


async def _script_channels(redis_url: str) -> int:
    admin = aioredis.from_url(redis_url, decode_responses=True)
    try:
        clients = await admin.client_list(_type="normal")
    finally:
        await admin.aclose()
    return sum(c["name"] == SCRIPT_CHANNEL_NAME for c in clients)


async def test_redis_stall_answers_503_billing_unavailable_and_leaks_no_connection(
    make_gateway, sim
):
    """Requests during a stall longer than the timeout: the first times out on the live
    connection, the next ones on reconnects whose SCRIPT LOAD waits. Each answers 503
    ``billing_unavailable`` in the envelope with an x-request-id, and no connection is left
    open behind the stall."""
    gw = await make_gateway(redis_socket_timeout_s=TIMEOUT_S)
    _, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert await _script_channels(gw.settings.redis_url) == 1
    await _pause(gw.settings.redis_url, 2_500)
    for _ in range(4):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "billing_unavailable"
        assert info.value.response.headers["x-request-id"].startswith("req_")
    await _until(_paused_over(gw.settings.redis_url))
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert await _script_channels(gw.settings.redis_url) == 1
    assert len(sim.requests) == 2  # nothing forwarded during the stall


def _paused_over(redis_url: str):
    async def check() -> bool:
        admin = aioredis.from_url(redis_url)
        try:
            await asyncio.wait_for(admin.ping(), 0.2)
        except TimeoutError:
            return False
        finally:
            await admin.aclose()
        return True

    return check


async def test_void_failed_in_a_stall_is_voided_once_redis_answers(make_gateway, sim):
    """The upstream breaks before any output while Redis is paused: the void fails, and the
    hold is released as soon as Redis answers, not at its deadline minutes later."""
    gw = await make_gateway(redis_socket_timeout_s=TIMEOUT_S)
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=4, delay_s=0.3, fail_after_chunks=1))
    client = gw.client(key)
    task = asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini", messages=HI))
    await _until(lambda: _held(gw, account))
    await _pause(gw.settings.redis_url, 1_500)
    with pytest.raises(openai.APIStatusError) as info:
        await task
    assert info.value.status_code == 502

    async def released() -> bool:
        return not await _held(gw, account)

    await _until(released)  # bounded well below the hold's deadline (670 s by default)
    assert gw.app[gateway_keys.SETTLEMENT_RESCUE].stats.voided == 1
    assert await gw.balance(account) == 1_000_000
    assert (await gw.state(account)).pending_millicredits == 0


async def test_redis_py_clients_fail_in_a_stall_instead_of_hanging(make_gateway):
    """The sweeper's (and the poster's claims', the admin service's) redis-py client has a
    socket timeout: a stalled Redis fails the call, which is retried, rather than hanging."""
    gw = await make_gateway(redis_socket_timeout_s=TIMEOUT_S)
    holds = gw.app[appkeys.HOLDS]
    await _pause(gw.settings.redis_url, 3_000)
    with pytest.raises(BillingUnavailableError):
        # wait_for only guards the test: without a socket timeout this raises TimeoutError.
        await asyncio.wait_for(holds.sweep_expired(), 2.0)


async def test_settle_lost_at_shutdown_is_posted_to_postgres(
    make_gateway, sim, own_redis: RedisServer
):
    """The gateway stops while Redis is still stalled: its rescue posts the delivered
    answer's settlement to Postgres directly instead of dropping it."""
    gw = await make_gateway(redis_url=own_redis.url, redis_socket_timeout_s=TIMEOUT_S)
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=4, delay_s=0.15, prompt_tokens=20))
    request_id, text = await _request_during_pause(gw, key, account, stream=False, pause_ms=30_000)
    assert text == " hello" * 4
    rescue = gw.app[gateway_keys.SETTLEMENT_RESCUE]
    await gw.runner.cleanup()  # the gateway's shutdown (the harness's stop runs it again)
    assert rescue.stats.posted_directly == 1
    usage = await gw.usage(request_id)
    assert usage is not None
    assert usage["charged_millicredits"] > 0
    assert await gw.balance(account) == 1_000_000 - usage["charged_millicredits"]


async def test_settle_failed_before_delivery_voids_the_hold_once_redis_is_back(
    make_gateway, sim, tmp_path: Path
):
    """Redis goes away while the upstream answers: the settle cannot be sent, the client
    gets 503 and is not charged, and the hold (kept by Redis's append-only file across the
    restart) is voided as soon as Redis is back, not at its deadline."""
    server = start_redis(tmp_path / "redis-aof", appendonly=True)
    try:
        gw = await make_gateway(redis_url=server.url, redis_socket_timeout_s=TIMEOUT_S)
        account, key = await gw.create_account(1_000_000)
        sim.push(Scenario(chunks=4, delay_s=0.3, prompt_tokens=20))
        client = gw.client(key)
        task = asyncio.create_task(client.chat.completions.create(model="gpt-4o-mini", messages=HI))
        await _until(lambda: _held(gw, account))
        server.stop()  # SIGTERM: the append-only file keeps the hold
        with pytest.raises(openai.APIStatusError) as info:
            await task
        assert info.value.status_code == 503
        assert info.value.body["code"] == "billing_unavailable"
        server = start_redis(tmp_path / "redis-aof", port=server.port, appendonly=True)
        with contextlib.suppress(redis.exceptions.ConnectionError):
            await gw.redis.ping()

        async def released() -> bool:
            return not await _held(gw, account)

        await _until(released)
        assert gw.app[gateway_keys.SETTLEMENT_RESCUE].stats.voided == 1
        assert await gw.usage(request_id=info.value.response.headers["x-request-id"]) is None
        assert await gw.balance(account) == 1_000_000
    finally:
        server.stop()
