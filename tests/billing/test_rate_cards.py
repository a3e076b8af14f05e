"""Rate cards: publishing versions (audited, notified), listing, and the gateway's book
switching to a scheduled card at its time, against a real Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from billing.audit import CLI_ACTOR
from billing.control import CONTROL_CHANNEL
from billing.metering.pricing import ModelKind
from billing.metering.rate_cards import (
    DuplicateRateCardError,
    IncompleteRateCardError,
    ModelKindMismatchError,
    RateCardBook,
    RateCardDraft,
    RateCardInPastError,
    current_and_scheduled,
    publish_rate_card,
    rate_card_history,
    rate_cards_in_force,
    seed_rate_cards,
)


@pytest.fixture
async def seeded(pool: asyncpg.Pool) -> asyncpg.Pool:
    async with pool.acquire() as conn:
        await seed_rate_cards(conn)
    return pool


async def publish(pool: asyncpg.Pool, draft: RateCardDraft):
    async with pool.acquire() as conn:
        return await publish_rate_card(conn, CLI_ACTOR, draft)


def mini(**fields) -> RateCardDraft:
    values = {
        "model": "gpt-4o-mini",
        "input_millicredits_per_1k_tokens": 3_000,
        "output_millicredits_per_1k_tokens": 12_000,
    }
    values.update(fields)
    return RateCardDraft(**values)


async def test_publish_now_puts_the_card_in_force_and_keeps_the_old_version(
    seeded: asyncpg.Pool,
) -> None:
    old = (await rate_cards_in_force(seeded))["gpt-4o-mini"]

    card = await publish(seeded, mini(display_label="Eco"))

    assert (await rate_cards_in_force(seeded))["gpt-4o-mini"] == card
    assert card.input_millicredits_per_1k_tokens == 3_000
    assert card.cached_input_millicredits_per_1k_tokens is None
    assert card.cached_rate == 3_000
    assert card.display_label == "Eco"
    # Unset descriptive fields come from the model's latest version.
    assert card.model_kind is ModelKind.CHAT
    assert card.max_output_tokens == old.max_output_tokens
    assert card.upstream_input_microusd_per_1k_tokens == old.upstream_input_microusd_per_1k_tokens
    history = await rate_card_history(seeded, "gpt-4o-mini")
    assert [v.card.id for v in history] == [card.id, old.id]
    assert [v.scheduled for v in history] == [False, False]


async def test_publish_writes_one_audit_row_and_a_rate_cards_event(seeded: asyncpg.Pool) -> None:
    events: asyncio.Queue[str] = asyncio.Queue()

    def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        events.put_nowait(payload)

    async with seeded.acquire() as listening:
        await listening.add_listener(CONTROL_CHANNEL, heard)
        old = (await rate_cards_in_force(seeded))["gpt-4o-mini"]
        card = await publish(seeded, mini())
        payload = await asyncio.wait_for(events.get(), timeout=10)
        await listening.remove_listener(CONTROL_CHANNEL, heard)

    assert orjson.loads(payload) == {"kind": "rate_cards"}
    rows = await seeded.fetch("SELECT * FROM audit_log")
    assert len(rows) == 1
    row = rows[0]
    assert (row["action"], row["target_type"], row["target_id"]) == (
        "rate_card.publish",
        "rate_card",
        str(card.id),
    )
    assert (row["actor_kind"], row["actor_name"]) == ("cli", "cli")
    assert orjson.loads(row["before"])["id"] == old.id
    after = orjson.loads(row["after"])
    assert after["input_millicredits_per_1k_tokens"] == 3_000


async def test_publish_in_the_past_is_refused(seeded: asyncpg.Pool) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    with pytest.raises(RateCardInPastError):
        await publish(seeded, mini(effective_at=past))
    assert len(await rate_card_history(seeded, "gpt-4o-mini")) == 1
    assert await seeded.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_publish_of_another_kind_for_a_known_model_is_refused(seeded: asyncpg.Pool) -> None:
    with pytest.raises(ModelKindMismatchError) as caught:
        await publish(seeded, mini(model_kind=ModelKind.EMBEDDING))
    assert caught.value.current is ModelKind.CHAT
    card = await publish(seeded, mini(model_kind=ModelKind.CHAT))
    assert card.model_kind is ModelKind.CHAT


async def test_first_card_of_a_model_needs_kind_and_max_output_tokens(
    seeded: asyncpg.Pool,
) -> None:
    with pytest.raises(IncompleteRateCardError) as caught:
        await publish(seeded, mini(model="o9"))
    assert caught.value.field == "modelKind"
    with pytest.raises(IncompleteRateCardError) as caught:
        await publish(seeded, mini(model="o9", model_kind=ModelKind.CHAT))
    assert caught.value.field == "maxOutputTokens"

    card = await publish(
        seeded, mini(model="o9", model_kind=ModelKind.CHAT, max_output_tokens=1_000)
    )

    assert (card.model, card.display_label, card.upstream_output_microusd_per_1k_tokens) == (
        "o9",
        "",
        0,
    )


async def test_publish_twice_at_the_same_effective_at_conflicts(seeded: asyncpg.Pool) -> None:
    at = datetime.now(UTC) + timedelta(hours=1)
    await publish(seeded, mini(effective_at=at))
    with pytest.raises(DuplicateRateCardError):
        await publish(seeded, mini(effective_at=at, input_millicredits_per_1k_tokens=1))
    assert await seeded.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_negative_price_is_refused_by_the_table(seeded: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await publish(seeded, mini(input_millicredits_per_1k_tokens=-1))


async def test_listing_flags_scheduled_cards(seeded: asyncpg.Pool) -> None:
    at = datetime.now(UTC) + timedelta(days=1)
    future = await publish(seeded, mini(effective_at=at))

    listed = await current_and_scheduled(seeded)

    in_force = [item.card.model for item in listed if not item.scheduled]
    assert in_force == sorted(in_force) and len(in_force) == 8
    assert [item.card for item in listed if item.scheduled] == [future]
    assert (await rate_cards_in_force(seeded))["gpt-4o-mini"].id != future.id
    history = await rate_card_history(seeded, "gpt-4o-mini")
    assert [v.scheduled for v in history] == [True, False]
    assert await rate_card_history(seeded, "no-such-model") == []


async def test_book_switches_to_a_scheduled_card_at_its_time_without_a_reload(
    seeded: asyncpg.Pool,
) -> None:
    book = RateCardBook()
    await book.refresh(seeded)
    old = book.get("gpt-4o-mini")
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    future = await publish(seeded, mini(effective_at=at))
    await book.refresh(seeded)
    try:
        assert book.get("gpt-4o-mini") == old
        assert book.scheduled() == [future]

        for _ in range(500):  # up to ~10 s on a loaded machine; the switch itself is a timer
            if book.get("gpt-4o-mini") == future:
                break
            await asyncio.sleep(0.02)
        switched_at = datetime.now(UTC)
        assert book.get("gpt-4o-mini") == future
    finally:
        book.close()

    assert switched_at >= at
    assert book.scheduled() == []
    assert book.get("gpt-4o") is not None


async def test_seeded_cards_carry_the_credits_pages_labels(seeded: asyncpg.Pool) -> None:
    cards = await rate_cards_in_force(seeded)

    assert (cards["gpt-4o-mini"].display_label, cards["gpt-4o"].display_label) == (
        "Eco",
        "Advanced",
    )
    assert cards["gpt-4.1"].display_label == ""
