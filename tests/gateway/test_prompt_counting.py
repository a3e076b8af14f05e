"""Counting a prompt is the gateway's most expensive step before the hold (issue 11, defect 4):
what the balance cannot cover is refused before any tokenizing, and a large prompt is counted
off the event loop, so other requests are not held up while it is counted."""

from __future__ import annotations

import asyncio
import io
import random
import string
import threading
from collections.abc import Callable, Iterator, Sized
from typing import Any

import aiohttp
import orjson
import pytest

from billing.control import ControlKind, notify_control
from billing.metering.estimate import CHAT
from billing.metering.pricing import worst_case_millicredits
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys

# Below the gateway's default 4 MiB body limit; tiktoken takes a few hundred ms to count it.
BIG_PROMPT_CHARS = 3_600_000


def _prose(chars: int, seed: int = 0) -> str:
    """Deterministic word salad: about 0.45 tokens per character in o200k_base."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    text = " ".join(rng.choices(words, k=chars // 5 + 1))
    return text[:chars]


@pytest.fixture(scope="module")
def big_prompt() -> str:
    return _prose(BIG_PROMPT_CHARS)


class EncodeCalls:
    """Wraps the gateway's encodings: records the name of the thread of every tiktoken call."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def wrap(self, encode: Callable[..., Sized]) -> Callable[..., Sized]:
        def recorded(text: str, **options: Any) -> Sized:
            self.threads.append(threading.current_thread().name)
            return encode(text, **options)

        return recorded


@pytest.fixture
def encode_calls(gw, monkeypatch) -> Iterator[EncodeCalls]:
    calls = EncodeCalls()
    counter = gw.app[gateway_keys.TOKENS]
    for model in ("gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small"):
        encoding = counter.encoding_for_model(model)
        # Short texts are counted with encode_ordinary, long ones with encode_to_numpy.
        for method in ("encode_ordinary", "encode_to_numpy"):
            original = getattr(encoding, method)
            if not hasattr(original, "__wrapped_by_test__"):
                wrapped = calls.wrap(original)
                wrapped.__wrapped_by_test__ = True  # type: ignore[attr-defined]
                monkeypatch.setattr(encoding, method, wrapped)
    yield calls


async def _post(gw, path: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        data = io.BytesIO(orjson.dumps(body))
        async with session.post(gw.base_url + path, data=data, headers=headers) as r:
            assert r.headers.get("x-request-id", "").startswith("req_")
            return r.status, orjson.loads(await r.read())


def _big_bodies(prompt: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "chat": (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]},
        ),
        "completions": (
            "/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": prompt, "max_tokens": 16},
        ),
        "responses": ("/responses", {"model": "gpt-4o-mini", "input": prompt}),
        # No output tokens: only the prompt's lower bound (chars / 128) refuses it.
        "embeddings": ("/embeddings", {"model": "text-embedding-3-small", "input": [prompt]}),
    }


@pytest.mark.parametrize("cached_balance", [False, True], ids=["balance-not-cached", "cached"])
async def test_zero_balance_big_prompts_refused_402_without_tokenizing(
    gw, sim, encode_calls, big_prompt, cached_balance
):
    account, key = await gw.create_account(0)
    if cached_balance:  # a small request first: it loads the balance into Redis
        small = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        status, _ = await _post(gw, "/chat/completions", key, small)
        assert status == 402
    encode_calls.threads.clear()
    bodies = _big_bodies(big_prompt)
    answers = await asyncio.gather(
        *(_post(gw, path, key, body) for path, body in bodies.values()),
        *(_post(gw, bodies["chat"][0], key, bodies["chat"][1]) for _ in range(3)),
    )
    for status, obj in answers:
        assert status == 402
        assert obj["error"]["code"] == "insufficient_credits"
        assert obj["currentMillicredits"] == "0"
        assert int(obj["requiredMillicredits"]) > 0
    assert encode_calls.threads == []
    assert sim.requests == []
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


async def test_big_prompt_counted_off_the_loop_as_inline_count(gw, sim, encode_calls, big_prompt):
    """The balance covers the lower bound, not the whole prompt: the gateway counts it (in a
    worker thread, the loop free meanwhile) and the reserve refuses the exact worst case,
    the same as counted inline."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big_prompt}]}
    card = gw.rate_cards.get("gpt-4o-mini")
    estimate = CHAT.estimate(body, card, gw.app[gateway_keys.TOKENS])
    worst_case = worst_case_millicredits(
        card,
        prompt_tokens=estimate.prompt_tokens,
        max_output_tokens=estimate.max_completion_tokens,
        rounding_mode=gw.settings.rounding_mode,
    )
    _, key = await gw.create_account(worst_case - 1)
    encode_calls.threads.clear()
    status, obj = await _post(gw, "/chat/completions", key, body)
    assert status == 402
    assert obj["requiredMillicredits"] == str(worst_case)
    assert obj["currentMillicredits"] == str(worst_case - 1)
    assert encode_calls.threads and all(
        name.startswith("prompt-count") for name in encode_calls.threads
    )
    assert sim.requests == []


async def _post_with_id(gw, path: str, key: str, body: dict[str, Any]) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        data = io.BytesIO(orjson.dumps(body))
        async with session.post(gw.base_url + path, data=data, headers=headers) as r:
            return r.status, r.headers["x-request-id"], orjson.loads(await r.read())


def _worst_case(gw, body: dict[str, Any], prompt_tokens: int) -> int:
    card = gw.rate_cards.get(body["model"])
    return worst_case_millicredits(
        card,
        prompt_tokens=prompt_tokens,
        max_output_tokens=CHAT.output_tokens(body, card),
        rounding_mode=gw.settings.rounding_mode,
    )


def _bounds(gw, body: dict[str, Any]) -> tuple[int, int]:
    """The chat body's prompt: (exact count, upper bound)."""
    card, tokens = gw.rate_cards.get(body["model"]), gw.app[gateway_keys.TOKENS]
    return CHAT.prompt_tokens(body, card, tokens), CHAT.prompt_tokens_upper_bound(
        body, card, tokens
    )


async def test_big_prompt_paid_is_held_at_its_upper_bound_without_counting(gw, sim, encode_calls):
    """Above the inline threshold, the balance covering the upper bound (the body's UTF-8
    bytes): held at that bound and forwarded with no tokenizing at all; charged the
    upstream's usage (the hold only reserved more while the request ran)."""
    prompt = _prose(200_000, seed=1)
    account, key = await gw.create_account(10_000_000)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }
    exact, bound = _bounds(gw, body)
    assert bound > exact
    encode_calls.threads.clear()
    status, request_id, obj = await _post_with_id(gw, "/chat/completions", key, body)
    assert status == 200, obj
    assert encode_calls.threads == []
    await gw.settled()
    row = await gw.usage(request_id)
    assert row["hold_millicredits"] == _worst_case(gw, body, bound)
    assert row["usage_source"] == "upstream"
    assert row["charged_millicredits"] < row["hold_millicredits"]
    assert await gw.balance(account) == 10_000_000 - row["charged_millicredits"]
    assert await gw.ledger_sum(account) == await gw.balance(account)


async def test_balance_between_count_and_bound_is_served_on_the_count(gw, sim, encode_calls):
    """The balance covers the counted worst case but not the upper bound's: the gateway
    counts the prompt (off the loop) and holds the count; the request is served."""
    prompt = _prose(200_000, seed=2)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }
    exact, bound = _bounds(gw, body)
    counted_hold, bound_hold = _worst_case(gw, body, exact), _worst_case(gw, body, bound)
    assert counted_hold < bound_hold
    account, key = await gw.create_account(counted_hold)
    encode_calls.threads.clear()
    status, request_id, obj = await _post_with_id(gw, "/chat/completions", key, body)
    assert status == 200, obj
    assert encode_calls.threads and all(
        name.startswith("prompt-count") for name in encode_calls.threads
    )
    await gw.settled()
    row = await gw.usage(request_id)
    assert row["hold_millicredits"] == counted_hold
    assert await gw.ledger_sum(account) == await gw.balance(account)


async def test_balance_below_the_count_refused_with_the_counted_requirement(gw, sim, encode_calls):
    """Below the counted worst case (but above the lower bound): 402 decided on the count,
    never on the upper bound; requiredMillicredits is the counted worst case."""
    prompt = _prose(200_000, seed=3)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }
    exact, _ = _bounds(gw, body)
    counted_hold = _worst_case(gw, body, exact)
    account, key = await gw.create_account(counted_hold - 1)
    encode_calls.threads.clear()
    status, _, obj = await _post_with_id(gw, "/chat/completions", key, body)
    assert status == 402
    assert obj["error"]["code"] == "insufficient_credits"
    assert obj["requiredMillicredits"] == str(counted_hold)
    assert obj["currentMillicredits"] == str(counted_hold - 1)
    assert encode_calls.threads
    assert sim.requests == []
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


async def test_prompt_held_at_its_bound_is_counted_for_an_estimated_charge(gw, sim):
    """No usage from the upstream: a prompt held at its upper bound is charged at its count
    (tiktoken), never at the bound."""
    prompt = _prose(20_000, seed=4)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }
    exact, bound = _bounds(gw, body)
    _, key = await gw.create_account(10_000_000)
    sim.push(Scenario(omit_usage=True))
    status, request_id, obj = await _post_with_id(gw, "/chat/completions", key, body)
    assert status == 200, obj
    await gw.settled()
    row = await gw.usage(request_id)
    assert row["usage_source"] == "estimated"
    assert row["hold_millicredits"] == _worst_case(gw, body, bound)
    assert row["prompt_tokens"] == exact


async def test_small_prompt_counted_inline(gw, sim, encode_calls):
    """Below ``PROMPT_COUNT_INLINE_MAX_BYTES`` nothing changes: counted on the loop's thread,
    no extra Redis read."""
    _, key = await gw.create_account(1_000_000)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
    status, _ = await _post(gw, "/chat/completions", key, body)
    assert status == 200
    assert encode_calls.threads
    assert set(encode_calls.threads) == {threading.main_thread().name}


async def test_big_prompt_suspended_account_refused_without_tokenizing(
    gw, sim, encode_calls, big_prompt
):
    account, key = await gw.create_account(1_000_000)
    await gw.pool.execute(
        "UPDATE accounts SET shortfall_millicredits = 5000 WHERE id = $1", account
    )
    path, body = _big_bodies(big_prompt)["chat"]
    status, obj = await _post(gw, path, key, body)
    assert status == 402
    assert obj["error"]["code"] == "account_suspended"
    assert encode_calls.threads == []


async def _cap_per_request(gw, account: int, millicredits: int) -> None:
    key_id = await gw.pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account)
    async with gw.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE api_keys SET max_request_millicredits = $1 WHERE id = $2", millicredits, key_id
        )
        await notify_control(conn, ControlKind.KEYS, api_key_id=key_id)


@pytest.mark.parametrize("below_the_count", [False, True], ids=["cap-fits-count", "cap-below"])
async def test_cap_per_request_decided_on_the_count(gw, sim, encode_calls, below_the_count):
    """A key's maximum per request between the count's worst case and the bound's: served,
    held at the count. Below the count: 402 ``spend_cap_exceeded`` requiring the count's
    worst case, never the bound's."""
    prompt = _prose(200_000, seed=5)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }
    exact, bound = _bounds(gw, body)
    counted_hold, bound_hold = _worst_case(gw, body, exact), _worst_case(gw, body, bound)
    account, key = await gw.create_account(10 * bound_hold)
    await _cap_per_request(gw, account, counted_hold - 1 if below_the_count else counted_hold)
    encode_calls.threads.clear()
    status, request_id, obj = await _post_with_id(gw, "/chat/completions", key, body)
    assert encode_calls.threads
    if below_the_count:
        assert status == 402
        assert obj["error"]["code"] == "spend_cap_exceeded"
        assert obj["error"]["requiredCredits"] == counted_hold / 1000
        assert sim.requests == []
        return
    assert status == 200, obj
    await gw.settled()
    row = await gw.usage(request_id)
    assert row["hold_millicredits"] == counted_hold < bound_hold
