"""Each billed endpoint takes only the models whose rate card serves its kind; any other model
is refused as OpenAI refuses an unsupported one (404 ``model_not_found``), before anything is
held, forwarded or charged."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from billing.metering.pricing import ENDPOINT_MODEL_KINDS, ModelKind
from billing.metering.rate_cards import DEFAULT_RATES

HI = [{"role": "user", "content": "hi"}]


def _call(client: openai.AsyncOpenAI, endpoint: str, model: str) -> Any:
    if endpoint == "chat.completions":
        return client.chat.completions.create(model=model, messages=HI)
    if endpoint == "completions":
        return client.completions.create(model=model, prompt="hi", max_tokens=5)
    if endpoint == "responses":
        return client.responses.create(model=model, input="hi")
    return client.embeddings.create(model=model, input="hi")


async def test_embeddings_with_chat_model_is_404_and_charges_nothing(gw, sim):
    account, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.NotFoundError) as info:
        await gw.client(key).embeddings.create(model="gpt-4o-mini", input="hi")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"
    assert info.value.body["message"] == (
        "The model `gpt-4o-mini` is a chat model and is not supported on /v1/embeddings."
    )
    await gw.settled()
    assert sim.requests == []
    assert await gw.pool.fetchval("SELECT count(*) FROM usage_events") == 0
    assert await gw.balance(account) == 1_000_000
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


@pytest.mark.parametrize(
    ("endpoint", "model"),
    [
        ("chat.completions", "text-embedding-3-small"),
        ("chat.completions", "gpt-3.5-turbo-instruct"),
        ("responses", "text-embedding-3-large"),
        ("completions", "gpt-4o-mini"),
        ("embeddings", "gpt-3.5-turbo-instruct"),
    ],
)
async def test_endpoint_refuses_a_model_of_another_kind(gw, sim, endpoint, model):
    account, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.NotFoundError) as info:
        await _call(gw.client(key), endpoint, model)
    assert info.value.code == "model_not_found"
    assert sim.requests == []
    assert await gw.balance(account) == 1_000_000


def test_every_seeded_model_has_an_endpoint_that_serves_it():
    kinds = {rate.model: rate.model_kind for rate in DEFAULT_RATES}
    assert kinds["gpt-4o-mini"] is ModelKind.CHAT
    assert kinds["gpt-3.5-turbo-instruct"] is ModelKind.COMPLETION
    assert kinds["text-embedding-3-small"] is ModelKind.EMBEDDING
    assert set(kinds.values()) <= set(ENDPOINT_MODEL_KINDS.values())
