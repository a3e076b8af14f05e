"""A request's hold settles at most once, is never charged after it was voided, and is never
voided once its settle was sent."""

from __future__ import annotations

import time
from types import SimpleNamespace

import aiohttp
import pytest

from billing.errors import BillingUnavailableError
from billing.metering.estimate import Estimate
from billing.metering.holds import HoldStore
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys
from gateway.proxy import ENDPOINTS, BilledCall, HoldState
from gateway.usage import Usage
from runtime import appkeys
from runtime.request_ids import new_request_id


@pytest.fixture
def settles(monkeypatch) -> list[str]:
    """The request id of every settle script the gateway sends, in order."""
    sent: list[str] = []
    send_settle = HoldStore.send_settle

    async def recording(self, account_id, *, request_id, **kwargs):
        sent.append(request_id)
        return await send_settle(self, account_id, request_id=request_id, **kwargs)

    monkeypatch.setattr(HoldStore, "send_settle", recording)
    return sent


async def _call(gw, key: str, *, hold_millicredits: int) -> BilledCall:
    """A call as ``_prepare`` builds it, its hold (if any) placed in Redis."""
    identity = await gw.app[gateway_keys.AUTH].identify(key)
    flags = gw.app[appkeys.CONTROL].flags
    request_id = new_request_id()
    if hold_millicredits:
        await gw.app[appkeys.HOLDS].reserve(
            identity.account_id, hold_millicredits, request_id=request_id
        )
    return BilledCall(
        SimpleNamespace(app=gw.app),
        ENDPOINTS[0],
        identity,
        request_id=request_id,
        started_ms=int(time.time() * 1000),
        model="gpt-4o-mini",
        card=gw.rate_cards.get("gpt-4o-mini"),
        estimate=Estimate(prompt_tokens=100, max_completion_tokens=50),
        hold_millicredits=hold_millicredits,
        charged=flags.charging_enabled,
        rounding_mode=flags.rounding_mode,
        body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    )


async def test_settle_twice_sends_one_settlement(gw, settles):
    account, key = await gw.create_account(1_000_000)
    call = await _call(gw, key, hold_millicredits=2_000)
    assert call.hold_state is HoldState.RESERVED
    await call.settle(Usage(100, 10), source="upstream", status="completed")
    await call.settle(Usage(100, 40), source="estimated", status="upstream_error")
    await call.void()
    assert call.hold_state is HoldState.CHARGED
    assert settles == [call.request_id]
    await gw.settled()
    assert (await gw.usage(call.request_id))["completion_tokens"] == 10
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


async def test_settle_after_void_charges_nothing(gw, settles):
    account, key = await gw.create_account(1_000_000)
    call = await _call(gw, key, hold_millicredits=2_000)
    await call.void()
    await call.settle(Usage(100, 10), source="estimated", status="upstream_error")
    assert call.hold_state is HoldState.VOIDED
    assert settles == []
    await gw.settled()
    assert await gw.usage(call.request_id) is None
    assert await gw.balance(account) == 1_000_000
    assert (await gw.state(account)).held_millicredits == 0


async def test_a_settle_whose_reply_is_lost_is_never_voided(gw, monkeypatch):
    """Redis fails while the settle is in flight: the script may have run, so the hold is
    left to the sweeper rather than released by a void that could overtake the settle."""
    account, key = await gw.create_account(1_000_000)
    call = await _call(gw, key, hold_millicredits=2_000)

    async def lost(self, account_id, **kwargs):
        raise BillingUnavailableError("redis: connection reset while sending")

    monkeypatch.setattr(HoldStore, "send_settle", lost)
    with pytest.raises(BillingUnavailableError):
        await call.settle(Usage(100, 10), source="upstream", status="completed")
    await call.void()
    assert call.hold_state is HoldState.CHARGED
    assert (await gw.state(account)).held_millicredits == 2_000


async def test_without_a_hold_a_void_leaves_the_usage_to_be_recorded(make_gateway, settles):
    gw = await make_gateway(charging_enabled=False)
    account, key = await gw.create_account(1_000_000)
    call = await _call(gw, key, hold_millicredits=0)
    await call.void()
    assert call.hold_state is HoldState.NOTHING_HELD
    await call.settle(Usage(100, 10), source="upstream", status="completed")
    assert call.hold_state is HoldState.CHARGED
    assert settles == [call.request_id]
    await gw.settled()
    usage = await gw.usage(call.request_id)
    assert (usage["status"], usage["charged_millicredits"]) == ("uncharged", 0)
    assert await gw.balance(account) == 1_000_000


async def test_responses_stream_cut_after_its_usage_is_settled_once(gw, sim, settles):
    """The Responses API sends no ``[DONE]``: its usage arrives in ``response.completed``,
    and a connection cut after it is seen as a broken stream. The request was settled on
    the usage; the break must not settle it again (estimated, as ``upstream_error``)."""
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=3, prompt_tokens=500, disconnect_after_stream=True))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gw.base_url}/responses",
            json={"model": "gpt-4o-mini", "input": "hi", "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            body = await response.read()
            request_id = response.headers["x-request-id"]
    assert b"response.completed" in body
    await gw.settled()
    assert settles == [request_id]
    usage = await gw.usage(request_id)
    assert (usage["usage_source"], usage["status"]) == ("upstream", "completed")
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (500, 3)
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)
