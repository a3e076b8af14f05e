"""Chat completions through the gateway with the official SDK: charged exactly."""

from __future__ import annotations

import openai
import pytest

from billing.metering.pricing import charge_millicredits
from devtools.simulator import Scenario


async def test_chat_non_streamed_charges_upstream_usage_exactly(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=200, prompt_tokens=750))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.usage.prompt_tokens == 750
    assert completion.usage.completion_tokens == 200
    request_id = raw.headers["x-request-id"]
    await gw.settled()
    usage = await gw.usage(request_id)
    assert usage["charged_millicredits"] == 3_720  # docs/design.md: 750 in / 200 out -> 3.720
    assert usage["usage_source"] == "upstream"
    assert await gw.balance(account) == 1_000_000 - 3_720
    assert await gw.ledger_sum(account) == await gw.balance(account)
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


async def test_chat_streamed_without_include_usage_hides_usage_chunk(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=5, prompt_tokens=1_000))
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == " hello" * 5
    # The gateway asked the upstream for usage anyway.
    assert sim.requests[-1].json["stream_options"] == {"include_usage": True}
    await gw.settled()
    expected = charge_millicredits(
        gw.rate_cards.get("gpt-4o-mini"), prompt_tokens=1_000, completion_tokens=5
    )
    assert await gw.balance(account) == 1_000_000 - expected


async def test_chat_streamed_with_include_usage_passes_usage_chunk(gw, sim):
    account, key = await gw.create_account(10_000_000)
    sim.push(Scenario(chunks=3, prompt_tokens=10_000, cached_tokens=0))
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o",
        # Long enough that 10,000 prompt tokens are within the bound (gateway.usage).
        messages=[{"role": "user", "content": "hi " * 5_000}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 10_000
    assert chunks[-1].choices == []
    await gw.settled()
    assert await gw.balance(account) == 10_000_000 - (200_000 + 240)


async def test_chat_user_key_never_reaches_upstream(gw, sim):
    _, key = await gw.create_account(1_000_000)
    await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert sim.requests[-1].api_key == "sk-upstream-operator"
    assert key not in str(dict(sim.requests[-1].headers))


async def test_chat_insufficient_credits_is_402_and_forwards_nothing(gw, sim):
    account, key = await gw.create_account(5)  # 0.005 credits
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client(key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
    err = info.value
    assert err.status_code == 402
    body = err.body
    assert body["code"] == "insufficient_credits"
    assert body["currentCredits"] == 0.005
    assert body["requiredCredits"] > body["currentCredits"]
    assert body["requiredMillicredits"].isdigit()
    assert body["buyCreditsUrl"].endswith("/credits")
    assert sim.requests == []
    assert await gw.balance(account) == 5


async def test_chat_upstream_error_before_output_voids_hold(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(fail_status=500))
    with pytest.raises(openai.InternalServerError):
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    state = await gw.state(account)
    assert state.held_millicredits == 0
    await gw.settled()
    assert await gw.balance(account) == 1_000_000


async def test_chat_streamed_with_include_usage_false_is_charged_and_sees_no_usage(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=3, prompt_tokens=400))
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": False},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert sim.requests[-1].json["stream_options"] == {"include_usage": True}
    await gw.settled()
    await gw.assert_charged_upstream_usage(
        stream.response.headers["x-request-id"],
        account,
        opening_millicredits=1_000_000,
        prompt_tokens=400,
        completion_tokens=3,
    )
