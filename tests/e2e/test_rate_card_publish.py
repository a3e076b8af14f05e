"""Publishing a rate card through the admin API reaches a running gateway: requests through
the official ``openai`` SDK are charged at the new card once published (or once a scheduled
card's time has come), and the usage rows of earlier requests keep the rates they were
charged at."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from admin_api.app import create_admin_app
from billing.admin_tokens import Role, create_admin_token
from billing.audit import CLI_ACTOR
from billing.metering.pricing import RateCard, charge_millicredits
from billing.metering.rate_cards import current_and_scheduled
from devtools.simulator import Scenario
from tests.admin_api.conftest import admin_settings
from tests.harness import GatewayHarness

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Price me."}]
PROMPT_TOKENS = 1_000
COMPLETION_TOKENS = 10


@pytest.fixture
async def admin(database_url: str, redis_url: str, aiohttp_client: Any) -> TestClient:
    """The admin service (its API) on the gateway's database."""
    client = await aiohttp_client(create_admin_app(admin_settings(database_url, redis_url)))
    return client


async def publish(gw: GatewayHarness, admin: TestClient, **fields: Any) -> RateCard:
    """``POST /admin/v1/rate-cards`` for MODEL (3.000 / 12.000 credits per 1k unless
    overridden); returns the published card as the gateway's book will hold it."""
    async with gw.pool.acquire() as conn:
        token, _ = await create_admin_token(conn, CLI_ACTOR, role=Role.ADMIN, name="e2e")
    body = {
        "model": MODEL,
        "inputCreditsPer1kTokens": "3.000",
        "outputCreditsPer1kTokens": "12.000",
        **fields,
    }
    response = await admin.post(
        "/admin/v1/rate-cards", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status == 201, await response.text()
    published = await response.json()
    [card] = [c for c in await current_and_scheduled(gw.pool) if c.card.id == published["id"]]
    return card.card


async def ask(gw: GatewayHarness, key: str) -> str:
    """One chat completion; returns its request id."""
    response = await gw.client(key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=COMPLETION_TOKENS
    )
    return response.headers["x-request-id"]


async def wait_in_force(gw: GatewayHarness, card: RateCard) -> datetime:
    """Poll the gateway's book until ``card`` is in force; returns when that was seen."""
    for _ in range(500):  # ~10 s at most on a loaded machine
        if gw.rate_cards.get(MODEL) == card:
            return datetime.now(UTC)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{card} never took effect; in force: {gw.rate_cards.get(MODEL)}")


async def usage(gw: GatewayHarness, request_id: str) -> asyncpg.Record:
    await gw.settled()
    row = await gw.usage(request_id)
    assert row is not None
    return row


def charge(card: RateCard) -> int:
    return charge_millicredits(
        card, prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS
    )


async def test_published_card_changes_what_a_running_gateway_charges(
    make_gateway, sim, admin
) -> None:
    # No periodic reload during the test: only the RATE_CARDS event can bring the card in.
    gw = await make_gateway(rate_card_refresh_s=3600)
    sim.set_default(Scenario(chunks=COMPLETION_TOKENS, prompt_tokens=PROMPT_TOKENS))
    _, key = await gw.create_account(10_000_000)
    old = gw.rate_cards.get(MODEL)
    assert old is not None
    before = await ask(gw, key)

    new = await publish(gw, admin, displayLabel="Eco")
    await wait_in_force(gw, new)
    after = await ask(gw, key)

    first, second = await usage(gw, before), await usage(gw, after)
    assert charge(old) != charge(new)
    assert (first["rate_card_id"], first["charged_millicredits"]) == (old.id, charge(old))
    assert (second["rate_card_id"], second["charged_millicredits"]) == (new.id, charge(new))
    # History keeps its rates: the first row still names the old card and its prices.
    rows = await gw.pool.fetch(
        """SELECT request_id, input_millicredits_per_1k_tokens AS input,
                  output_millicredits_per_1k_tokens AS output
           FROM usage_events ORDER BY id"""
    )
    assert [(r["request_id"], r["input"], r["output"]) for r in rows] == [
        (before, old.input_millicredits_per_1k_tokens, old.output_millicredits_per_1k_tokens),
        (after, 3_000, 12_000),
    ]


async def test_scheduled_card_takes_effect_at_its_time(make_gateway, sim, admin) -> None:
    # No periodic reload during the test: only the book's own timer can switch the card.
    gw = await make_gateway(rate_card_refresh_s=3600)
    sim.set_default(Scenario(chunks=COMPLETION_TOKENS, prompt_tokens=PROMPT_TOKENS))
    _, key = await gw.create_account(10_000_000)
    old = gw.rate_cards.get(MODEL)
    at = datetime.now(UTC) + timedelta(seconds=3)

    new = await publish(gw, admin, effectiveAt=at.isoformat())
    early = await ask(gw, key)
    switched_at = await wait_in_force(gw, new)
    late = await ask(gw, key)

    assert switched_at >= at
    assert (await usage(gw, early))["rate_card_id"] == old.id
    assert (await usage(gw, late))["rate_card_id"] == new.id
    assert (await usage(gw, late))["charged_millicredits"] == charge(new)
