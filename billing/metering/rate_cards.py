"""Versioned per-model rate cards: reading the ones in force, seeding the defaults.

The row in force for a model is the newest with ``effective_at <= now()``. The gateway keeps
an in-memory ``RateCardBook`` refreshed on an interval, so pricing needs no query per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from billing.metering.pricing import ModelKind, RateCard

_IN_FORCE_SQL = """
SELECT DISTINCT ON (model) id, model, model_kind, input_millicredits_per_1k_tokens,
       cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
       max_output_tokens, effective_at, upstream_input_microusd_per_1k_tokens,
       upstream_output_microusd_per_1k_tokens
FROM rate_cards
WHERE effective_at <= now()
ORDER BY model, effective_at DESC
"""


@dataclass(frozen=True, slots=True)
class DefaultRate:
    """A seed row: prices in millicredits per 1k tokens; upstream cost in micro-USD per 1k."""

    model: str
    model_kind: ModelKind
    input: int
    cached_input: int | None
    output: int
    max_output_tokens: int
    upstream_input: int
    upstream_output: int


# Credits per 1k tokens x 1000 = millicredits per 1k tokens. gpt-4o-mini 2.4 / 9.6 and
# gpt-4o 20 / 80 credits per 1k come from the product's QA list (docs/design.md); the rest follow
# OpenAI's list prices with the same 16x markup (2.4 credits = $0.0024 vs $0.00015).
DEFAULT_RATES: tuple[DefaultRate, ...] = (
    DefaultRate("gpt-4o-mini", ModelKind.CHAT, 2_400, 1_200, 9_600, 16_384, 150, 600),
    DefaultRate("gpt-4o", ModelKind.CHAT, 20_000, 10_000, 80_000, 16_384, 2_500, 10_000),
    DefaultRate("gpt-4.1", ModelKind.CHAT, 32_000, 8_000, 128_000, 32_768, 2_000, 8_000),
    DefaultRate("gpt-4.1-mini", ModelKind.CHAT, 6_400, 1_600, 25_600, 32_768, 400, 1_600),
    DefaultRate("gpt-4.1-nano", ModelKind.CHAT, 1_600, 400, 6_400, 32_768, 100, 400),
    DefaultRate(
        "gpt-3.5-turbo-instruct", ModelKind.COMPLETION, 24_000, None, 32_000, 4_096, 1_500, 2_000
    ),
    DefaultRate("text-embedding-3-small", ModelKind.EMBEDDING, 320, None, 0, 1, 20, 0),
    DefaultRate("text-embedding-3-large", ModelKind.EMBEDDING, 2_080, None, 0, 1, 130, 0),
)


def _rate_card(row: asyncpg.Record) -> RateCard:
    return RateCard(
        id=row["id"],
        model=row["model"],
        input_millicredits_per_1k_tokens=row["input_millicredits_per_1k_tokens"],
        cached_input_millicredits_per_1k_tokens=row["cached_input_millicredits_per_1k_tokens"],
        output_millicredits_per_1k_tokens=row["output_millicredits_per_1k_tokens"],
        max_output_tokens=row["max_output_tokens"],
        effective_at=row["effective_at"],
        upstream_input_microusd_per_1k_tokens=row["upstream_input_microusd_per_1k_tokens"],
        upstream_output_microusd_per_1k_tokens=row["upstream_output_microusd_per_1k_tokens"],
        model_kind=ModelKind(row["model_kind"]),
    )


async def rate_cards_in_force(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, RateCard]:
    """Every model's rate card in force now, by model name.

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    return {row["model"]: _rate_card(row) for row in await conn.fetch(_IN_FORCE_SQL)}


async def seed_rate_cards(
    conn: asyncpg.Connection, rates: Iterable[DefaultRate] = DEFAULT_RATES
) -> list[str]:
    """Insert the default rate card for each model that has none yet; returns models added.

    Existing prices are never overwritten: a repeat run changes nothing.
    """
    added: list[str] = []
    for rate in rates:
        inserted = await conn.fetchval(
            """INSERT INTO rate_cards (model, input_millicredits_per_1k_tokens,
                   cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
                   max_output_tokens, upstream_input_microusd_per_1k_tokens,
                   upstream_output_microusd_per_1k_tokens, model_kind, effective_at)
               SELECT $1, $2, $3, $4, $5, $6, $7, $8, '2024-01-01T00:00:00Z'
               WHERE NOT EXISTS (SELECT 1 FROM rate_cards WHERE model = $1)
               RETURNING model""",
            rate.model,
            rate.input,
            rate.cached_input,
            rate.output,
            rate.max_output_tokens,
            rate.upstream_input,
            rate.upstream_output,
            rate.model_kind.value,
        )
        if inserted:
            added.append(inserted)
    return added


class RateCardBook:
    """The rate cards in force, held in memory and swapped whole on refresh.

    Reads are lock-free dictionary lookups; ``refresh`` replaces the dict atomically.
    """

    def __init__(self, cards: dict[str, RateCard] | None = None) -> None:
        self._cards: dict[str, RateCard] = dict(cards or {})

    def get(self, model: str) -> RateCard | None:
        """The rate card in force for ``model``, or None when the model has none."""
        return self._cards.get(model)

    def models(self) -> list[RateCard]:
        """All rate cards in force, sorted by model name."""
        return [self._cards[m] for m in sorted(self._cards)]

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Reload from Postgres. Raises on Postgres errors (the old cards stay in use)."""
        self._cards = await rate_cards_in_force(pool)
