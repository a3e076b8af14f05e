"""Every billed endpoint, the model list and the pricing switches, through the official SDK."""

from __future__ import annotations

import re
import time

import openai
import pytest

from billing.metering.estimate import CHAT
from billing.metering.pricing import RoundingMode, charge_millicredits, worst_case_millicredits
from billing.metering.rate_cards import DEFAULT_RATES
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys
from runtime.request_ids import new_request_id

HI = [{"role": "user", "content": "hi"}]
# About 600 tokens: the usage these tests script (1,234 prompt tokens and so on) must be
# within what the request could produce (gateway.usage.usage_bound: twice our count + 1,000).
LONG = [{"role": "user", "content": "hi " * 600}]


def _charge(gw, model: str, **tokens: int) -> int:
    return charge_millicredits(gw.rate_cards.get(model), **tokens)


async def _settled_usage(gw, request_id: str):
    await gw.settled()
    row = await gw.usage(request_id)
    assert row is not None, f"no usage row for {request_id}"
    return row


# -- completions ------------------------------------------------------------------------


async def test_completions_non_streamed_charges_upstream_usage(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=40, prompt_tokens=333))
    raw = await gw.client(key).completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=100
    )
    completion = raw.parse()
    assert completion.choices[0].text == " hello" * 40
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (333, 40)
    expected = _charge(gw, "gpt-3.5-turbo-instruct", prompt_tokens=333, completion_tokens=40)
    assert expected == 9_272  # 333 * 24 + 40 * 32
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    assert row["endpoint"] == "completions"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (333, 40)
    assert row["charged_millicredits"] == expected
    assert row["usage_source"] == "upstream"
    assert await gw.balance(account) == 1_000_000 - expected
    assert await gw.ledger_sum(account) == await gw.balance(account)


async def test_completions_streamed_charges_hidden_usage_chunk(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=7, prompt_tokens=1_000))
    raw = await gw.client(key).completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=50, stream=True
    )
    chunks = [chunk async for chunk in raw.parse()]
    assert "".join(c.choices[0].text for c in chunks) == " hello" * 7
    assert all(c.usage is None for c in chunks)
    assert sim.requests[-1].json["stream_options"] == {"include_usage": True}
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    expected = _charge(gw, "gpt-3.5-turbo-instruct", prompt_tokens=1_000, completion_tokens=7)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1_000, 7)
    assert row["charged_millicredits"] == expected
    assert row["usage_source"] == "upstream"
    assert await gw.balance(account) == 1_000_000 - expected


# -- responses --------------------------------------------------------------------------


async def test_responses_non_streamed_charges_input_output_and_cached(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=12, prompt_tokens=2_000, cached_tokens=500))
    raw = await gw.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="hello there " * 300, max_output_tokens=100
    )
    response = raw.parse()
    assert response.output_text == " hello" * 12
    assert response.usage.input_tokens == 2_000
    assert response.usage.output_tokens == 12
    assert response.usage.input_tokens_details.cached_tokens == 500
    expected = _charge(
        gw, "gpt-4o-mini", prompt_tokens=2_000, completion_tokens=12, cached_tokens=500
    )
    assert expected == 4_316  # 1500 * 2.4 + 500 * 1.2 + 12 * 9.6 = 4315.2, rounded up
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    assert row["endpoint"] == "responses"
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
        2_000,
        500,
        12,
    )
    assert row["charged_millicredits"] == expected
    assert await gw.balance(account) == 1_000_000 - expected


async def test_responses_streamed_charges_completed_event_usage(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=5, prompt_tokens=800, cached_tokens=100))
    raw = await gw.client(key).responses.with_raw_response.create(
        model="gpt-4o", input="hello there", max_output_tokens=100, stream=True
    )
    events = [event async for event in raw.parse()]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == " hello" * 5
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage
    assert (usage.input_tokens, usage.output_tokens) == (800, 5)
    assert usage.input_tokens_details.cached_tokens == 100
    expected = _charge(gw, "gpt-4o", prompt_tokens=800, completion_tokens=5, cached_tokens=100)
    assert expected == 15_400  # 700 * 20 + 100 * 10 + 5 * 80
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    assert row["charged_millicredits"] == expected
    assert row["usage_source"] == "upstream"
    assert await gw.balance(account) == 1_000_000 - expected


# -- embeddings -------------------------------------------------------------------------


async def test_embeddings_charges_input_tokens_only(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(prompt_tokens=1_234, chunks=50))
    raw = await gw.client(key).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["first text " * 150, "second text " * 150]
    )
    result = raw.parse()
    assert len(result.data) == 2
    assert result.usage.prompt_tokens == 1_234
    expected = _charge(gw, "text-embedding-3-small", prompt_tokens=1_234, completion_tokens=0)
    assert expected == 395  # 1234 * 0.32 = 394.88, rounded up
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    assert row["endpoint"] == "embeddings"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1_234, 0)
    assert row["charged_millicredits"] == expected
    assert await gw.balance(account) == 1_000_000 - expected


# -- models -----------------------------------------------------------------------------


async def test_models_list_returns_exactly_seeded_rate_card_models(gw, sim):
    _, key = await gw.create_account(0)
    page = await gw.client(key).models.list()
    ids = [model.id for model in page.data]
    assert sorted(ids) == sorted(rate.model for rate in DEFAULT_RATES)
    assert len(ids) == len(set(ids))
    assert sim.requests == []  # answered from the rate cards, not the upstream


async def test_models_list_with_allowlist_returns_only_allowed(make_gateway, sim):
    gw = await make_gateway(model_allowlist=frozenset({"gpt-4o-mini", "text-embedding-3-small"}))
    _, key = await gw.create_account(0)
    page = await gw.client(key).models.list()
    assert sorted(model.id for model in page.data) == ["gpt-4o-mini", "text-embedding-3-small"]


async def test_models_retrieve_known_model_returns_it(gw):
    _, key = await gw.create_account(0)
    model = await gw.client(key).models.retrieve("gpt-4o")
    assert model.id == "gpt-4o"
    assert model.object == "model"


async def test_models_retrieve_unknown_model_is_404_model_not_found(gw):
    _, key = await gw.create_account(0)
    with pytest.raises(openai.NotFoundError) as info:
        await gw.client(key).models.retrieve("gpt-nonexistent")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


async def test_models_retrieve_model_outside_allowlist_is_404(make_gateway, sim):
    gw = await make_gateway(model_allowlist=frozenset({"gpt-4o-mini"}))
    account, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.NotFoundError) as info:
        await gw.client(key).models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await gw.client(key).chat.completions.create(model="gpt-4o", messages=HI)
    assert sim.requests == []
    assert await gw.balance(account) == 1_000_000


# -- cached tokens, request ids ---------------------------------------------------------


async def test_chat_cached_tokens_charged_at_cached_rate(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=10, prompt_tokens=1_000, cached_tokens=600))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI
    )
    assert raw.parse().usage.prompt_tokens_details.cached_tokens == 600
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    # 400 uncached * 2.4 + 600 cached * 1.2 + 10 out * 9.6 = 1,776 mc (vs 2,496 all uncached)
    assert row["charged_millicredits"] == 1_776
    assert row["cached_tokens"] == 600
    assert row["cached_input_millicredits_per_1k_tokens"] == 1_200
    assert await gw.balance(account) == 1_000_000 - 1_776


async def test_usage_row_carries_every_field_of_the_settlement(gw, sim):
    """The outbox record is positional (billing.metering.outbox, format 2): every column must
    come out
    of the position it was written to, not a neighbour's."""
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=7, prompt_tokens=1_234, cached_tokens=34))
    before = time.time()
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=LONG, max_tokens=50
    )
    after = time.time()
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    card = await gw.pool.fetchrow(
        """SELECT * FROM rate_cards WHERE model = 'gpt-4o' AND effective_at <= now()
            ORDER BY effective_at DESC LIMIT 1"""
    )
    key_id = await gw.pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account)
    assert (row["account_id"], row["api_key_id"], row["rate_card_id"]) == (
        account,
        key_id,
        card["id"],
    )
    assert (row["model"], row["endpoint"]) == ("gpt-4o", "chat.completions")
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (1_234, 34, 7)
    assert (
        row["input_millicredits_per_1k_tokens"],
        row["cached_input_millicredits_per_1k_tokens"],
        row["output_millicredits_per_1k_tokens"],
    ) == (20_000, 10_000, 80_000)
    expected = _charge(gw, "gpt-4o", prompt_tokens=1_234, completion_tokens=7, cached_tokens=34)
    assert row["cost_millicredits"] == row["charged_millicredits"] == expected
    card_now = gw.rate_cards.get("gpt-4o")
    body = {"model": "gpt-4o", "messages": LONG, "max_tokens": 50}
    estimate = CHAT.estimate(body, card_now, gw.app[gateway_keys.TOKENS])
    assert row["hold_millicredits"] == worst_case_millicredits(
        card_now,
        prompt_tokens=estimate.prompt_tokens,
        max_output_tokens=50,
        rounding_mode=RoundingMode.EXACT,
    )
    assert (row["rounding_mode"], row["usage_source"], row["status"]) == (
        "exact",
        "upstream",
        "completed",
    )
    assert before - 1 <= row["started_at"].timestamp() <= row["finished_at"].timestamp()
    assert row["finished_at"].timestamp() <= after + 1
    span_ms = (row["finished_at"] - row["started_at"]).total_seconds() * 1000
    assert 0 <= row["upstream_latency_ms"] <= span_ms + 1


@pytest.mark.parametrize(
    ("endpoint", "kwargs"),
    [
        ("chat", {"model": "gpt-4o-mini", "messages": HI}),
        ("chat", {"model": "gpt-4o-mini", "messages": HI, "stream": True}),
        ("completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 20}),
        ("completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True}),
        ("responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 20}),
        ("responses", {"model": "gpt-4o-mini", "input": "hi", "stream": True}),
        ("embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    ],
    ids=[
        "chat",
        "chat-stream",
        "completions",
        "completions-stream",
        "responses",
        "responses-stream",
        "embeddings",
    ],
)
async def test_request_id_header_matches_usage_row(gw, sim, endpoint, kwargs):
    account, key = await gw.create_account(10_000_000)
    client = gw.client(key)
    resource = {
        "chat": client.chat.completions,
        "completions": client.completions,
        "responses": client.responses,
        "embeddings": client.embeddings,
    }[endpoint]
    raw = await resource.with_raw_response.create(**kwargs)
    parsed = raw.parse()
    if kwargs.get("stream"):
        [_ async for _ in parsed]
    request_id = raw.headers["x-request-id"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", request_id)
    row = await _settled_usage(gw, request_id)
    assert row["account_id"] == account
    assert row["model"] == kwargs["model"]


async def test_request_ids_differ_between_requests(gw, sim):
    _, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    ids = set()
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI
        )
        ids.add(raw.headers["x-request-id"])
    assert len(ids) == 3


def test_request_ids_sort_by_creation_time(monkeypatch):
    """Time first (ms, 12 hex digits), so Postgres's unique indexes take them at one edge."""
    now = [1_764_420_000.000]
    monkeypatch.setattr("runtime.request_ids.time", lambda: now[0])
    first = new_request_id()
    same_ms = new_request_id()
    now[0] += 0.001
    later = new_request_id()
    assert first[4:16] == same_ms[4:16] == f"{1_764_420_000_000:012x}"
    assert first != same_ms  # 80 random bits after the time
    assert later[4:16] == f"{1_764_420_000_001:012x}"
    assert first < later and same_ms < later


# -- rounding, charging switch, n -------------------------------------------------------


async def test_rounding_ceil_charges_whole_credits(make_gateway, sim):
    gw = await make_gateway(rounding_mode=RoundingMode.CEIL)
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=567, prompt_tokens=1_234))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=LONG, max_tokens=600
    )
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    # docs/design.md: gpt-4o 1,234 in / 567 out is 70.040 credits exact, 71 in ceil mode.
    assert row["charged_millicredits"] == 71_000
    assert row["rounding_mode"] == "ceil"
    assert await gw.balance(account) == 1_000_000 - 71_000


async def test_rounding_exact_charges_to_the_millicredit(gw, sim):
    _, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=567, prompt_tokens=1_234))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=LONG, max_tokens=600
    )
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    assert row["charged_millicredits"] == 70_040
    assert row["rounding_mode"] == "exact"


async def test_charging_disabled_zero_balance_request_served_uncharged(make_gateway, sim):
    gw = await make_gateway(charging_enabled=False)
    account, key = await gw.create_account(0)
    sim.push(Scenario(chunks=20, prompt_tokens=5_000))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI
    )
    assert raw.parse().usage.completion_tokens == 20
    row = await _settled_usage(gw, raw.headers["x-request-id"])
    assert row["status"] == "uncharged"
    assert row["charged_millicredits"] == 0
    assert row["cost_millicredits"] == 0
    assert row["hold_millicredits"] == 0
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5_000, 20)
    assert await gw.balance(account) == 0


async def _end_stalled_stream(sim, stream) -> None:
    """Cut a stream whose upstream stalls (stopping the simulator drops its connection); the
    gateway then ends the client's stream with an error event."""
    await sim.stop()
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_charging_disabled_places_no_hold_and_deducts_nothing(make_gateway, sim):
    gw = await make_gateway(charging_enabled=False)
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=5, hang_after_chunks=2))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI, stream=True
    )
    stream = raw.parse()
    first = await stream.__anext__()
    assert first.choices
    # Mid-stream, while the upstream stalls: nothing is held.
    state = await gw.state(account)
    assert state.held_millicredits == 0
    await _end_stalled_stream(sim, stream)
    await gw.settled()
    assert await gw.balance(account) == 1_000_000
    deductions = await gw.pool.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE account_id = $1 AND entry_type = 'deduction'",
        account,
    )
    assert deductions == 0


async def test_charging_enabled_holds_worst_case_mid_stream(gw, sim):
    """Control for the test above: with charging on, the same stream holds credits."""
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=5, hang_after_chunks=2))
    raw = await gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI, stream=True, max_tokens=100
    )
    stream = raw.parse()
    await stream.__anext__()
    state = await gw.state(account)
    assert state.held_millicredits > 100 * 80  # at least the 100 output tokens at 80 mc
    await _end_stalled_stream(sim, stream)


async def test_chat_n2_doubles_hold_beyond_balance_for_one(gw, sim):
    body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 1_000}
    card = gw.rate_cards.get("gpt-4o-mini")
    estimate = CHAT.estimate(dict(body), card, gw.app[gateway_keys.TOKENS])

    def hold(n: int) -> int:
        return worst_case_millicredits(
            card,
            prompt_tokens=estimate.prompt_tokens,
            max_output_tokens=1_000 * n,
            rounding_mode=RoundingMode.EXACT,
        )

    balance = (hold(1) + hold(2)) // 2  # covers n=1, not n=2
    assert hold(1) <= balance < hold(2)
    account, key = await gw.create_account(balance)
    client = gw.client(key)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(**body, n=2)
    assert info.value.status_code == 402
    assert info.value.body["requiredMillicredits"] == str(hold(2))
    assert sim.requests == []
    sim.push(Scenario(chunks=3, prompt_tokens=estimate.prompt_tokens))
    completion = await client.chat.completions.create(**body, n=1)
    assert completion.usage.completion_tokens == 3
    await gw.settled()
    expected = _charge(gw, "gpt-4o-mini", prompt_tokens=estimate.prompt_tokens, completion_tokens=3)
    assert await gw.balance(account) == balance - expected
