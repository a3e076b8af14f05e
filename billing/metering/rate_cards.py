"""Versioned per-model rate cards: the ones in force, scheduled ones, publishing, seeding.

A rate card row is never edited: a new price is a new row (a *version*) for the model with
its own ``effective_at``. The row in force for a model is the newest with
``effective_at <= now()``; rows with a later ``effective_at`` are *scheduled*. Usage rows keep
the id and rates of the card they were charged at, so publishing never changes history.

The gateway keeps an in-memory ``RateCardBook``: reloaded on a ``RATE_CARDS`` control event
and every ``RATE_CARD_REFRESH_S``, and switching to a scheduled card by a timer at its
``effective_at`` (no reload, no query per request).

Postgres unreachable: every function here raises ``OSError`` / ``asyncpg`` errors
(``billing.errors.POSTGRES_UNAVAILABLE``); the book keeps the cards it holds.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from billing.audit import Actor, record_audit
from billing.control import ControlKind, notify_control
from billing.errors import BillingError
from billing.metering.pricing import ModelKind, RateCard

#: The ``model`` label of metrics for a model without a rate card (label values stay
#: bounded: a client's made-up model name never becomes a series of its own).
UNRATED_MODEL_LABEL = "other"

_COLUMNS = """id, model, model_kind, input_millicredits_per_1k_tokens,
       cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
       max_output_tokens, effective_at, upstream_input_microusd_per_1k_tokens,
       upstream_output_microusd_per_1k_tokens, display_label"""

_IN_FORCE_SQL = f"""
SELECT DISTINCT ON (model) {_COLUMNS}
FROM rate_cards
WHERE effective_at <= now()
ORDER BY model, effective_at DESC
"""

# The book's load and the admin listing: each model's card in force, then every scheduled
# card (oldest first), read at one instant (one statement, one now()).
_CURRENT_AND_SCHEDULED_SQL = f"""
SELECT * FROM (
    SELECT DISTINCT ON (model) {_COLUMNS}, false AS scheduled
    FROM rate_cards WHERE effective_at <= now()
    ORDER BY model, effective_at DESC
) AS in_force
UNION ALL
SELECT {_COLUMNS}, true AS scheduled FROM rate_cards WHERE effective_at > now()
ORDER BY scheduled, effective_at, model
"""


class RateCardError(BillingError):
    """A rate card cannot be published as asked (the admin API answers 409 or 422)."""


class RateCardInPastError(RateCardError):
    """``effective_at`` lies in the past: history is never rewritten (422)."""

    def __init__(self, effective_at: datetime) -> None:
        super().__init__(
            f"effectiveAt {effective_at.isoformat()} is in the past: a rate card takes effect "
            "now (leave it out) or later"
        )
        self.effective_at = effective_at


class ModelKindMismatchError(RateCardError):
    """The new card's kind is not the model's current kind (422): an endpoint serves one
    kind, so a model keeps its kind across versions."""

    def __init__(self, model: str, current: ModelKind, asked: ModelKind) -> None:
        super().__init__(f"model {model!r} is a {current.value} model, not {asked.value}")
        self.model = model
        self.current = current
        self.asked = asked


class IncompleteRateCardError(RateCardError):
    """A model's first card lacks a field that later versions inherit (422)."""

    def __init__(self, model: str, field: str) -> None:
        super().__init__(f"model {model!r} has no rate card yet: {field} is required")
        self.model = model
        self.field = field


class DuplicateRateCardError(RateCardError):
    """The model already has a card with this ``effective_at`` (409)."""

    def __init__(self, model: str, effective_at: datetime) -> None:
        super().__init__(
            f"model {model!r} already has a rate card effective at {effective_at.isoformat()}"
        )
        self.model = model
        self.effective_at = effective_at


@dataclass(frozen=True, slots=True)
class RateCardDraft:
    """A new version to publish for ``model``.

    Prices describe the new version completely: ``cached_input_millicredits_per_1k_tokens``
    None bills cached tokens at the input rate. The other fields left None are taken from
    the model's latest version (required for a model's first card: ``model_kind`` and
    ``max_output_tokens``; the label and upstream costs default to "" and 0).

    Attributes:
        effective_at: when it takes effect; None: now (the transaction's time).
        upstream_*_microusd_per_1k_tokens: what the upstream charges us, in micro-USD per 1k.
    """

    model: str
    input_millicredits_per_1k_tokens: int
    output_millicredits_per_1k_tokens: int
    cached_input_millicredits_per_1k_tokens: int | None = None
    effective_at: datetime | None = None
    model_kind: ModelKind | None = None
    max_output_tokens: int | None = None
    display_label: str | None = None
    upstream_input_microusd_per_1k_tokens: int | None = None
    upstream_output_microusd_per_1k_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ListedRateCard:
    """A card in the admin listing: in force now, or ``scheduled`` for later."""

    card: RateCard
    scheduled: bool


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
    display_label: str = ""


# Credits per 1k tokens x 1000 = millicredits per 1k tokens. gpt-4o-mini 2.4 / 9.6 and
# gpt-4o 20 / 80 credits per 1k come from the product's QA list (docs/design.md); the rest follow
# OpenAI's list prices with the same 16x markup (2.4 credits = $0.0024 vs $0.00015).
DEFAULT_RATES: tuple[DefaultRate, ...] = (
    DefaultRate("gpt-4o-mini", ModelKind.CHAT, 2_400, 1_200, 9_600, 16_384, 150, 600, "Eco"),
    DefaultRate(
        "gpt-4o", ModelKind.CHAT, 20_000, 10_000, 80_000, 16_384, 2_500, 10_000, "Advanced"
    ),
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
        display_label=row["display_label"],
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
                   upstream_output_microusd_per_1k_tokens, model_kind, display_label,
                   effective_at)
               SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, '2024-01-01T00:00:00Z'
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
            rate.display_label,
        )
        if inserted:
            added.append(inserted)
    return added


async def current_and_scheduled(conn: asyncpg.Connection | asyncpg.Pool) -> list[ListedRateCard]:
    """Each model's card in force (by model), then every scheduled card (by effective_at).

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    rows = await conn.fetch(_CURRENT_AND_SCHEDULED_SQL)
    return [ListedRateCard(_rate_card(row), row["scheduled"]) for row in rows]


async def rate_card_history(
    conn: asyncpg.Connection | asyncpg.Pool, model: str
) -> list[ListedRateCard]:
    """Every version of ``model``'s card, newest ``effective_at`` first; [] for an unknown
    model. ``scheduled`` marks the versions not yet in force.

    Raises:
        OSError / asyncpg.PostgresError: Postgres unreachable.
    """
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS}, effective_at > now() AS scheduled FROM rate_cards
            WHERE model = $1 ORDER BY effective_at DESC""",
        model,
    )
    return [ListedRateCard(_rate_card(row), row["scheduled"]) for row in rows]


def rate_card_snapshot(card: RateCard) -> dict[str, Any]:
    """A card as plain JSON-able values (the audit log's before/after)."""
    return asdict(card)


async def publish_rate_card(
    conn: asyncpg.Connection, actor: Actor, draft: RateCardDraft
) -> RateCard:
    """Publish a new version of a model's rate card, audited, with a ``RATE_CARDS`` event.

    One transaction: the model's versions are locked (a transaction-scoped advisory lock on
    the model name, so two publishes for a new model cannot disagree on its kind), the draft
    is checked and completed from the latest version, the row inserted, one audit row
    (``rate_card.publish``; before: the card in force, after: the new one) written and the
    event queued (delivered at commit).

    Raises:
        RateCardInPastError: ``effective_at`` before the transaction's ``now()``.
        IncompleteRateCardError: a first card without ``model_kind`` or ``max_output_tokens``.
        ModelKindMismatchError: ``model_kind`` differs from the model's kind.
        DuplicateRateCardError: the model has a card at exactly this ``effective_at``.
        asyncpg.CheckViolationError: a negative price or a max_output_tokens <= 0.
        OSError / asyncpg.PostgresError: Postgres unreachable (nothing is published).
    """
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('rate_card:' || $1))", draft.model
        )
        now: datetime = await conn.fetchval("SELECT now()")
        if draft.effective_at is not None and draft.effective_at < now:
            raise RateCardInPastError(draft.effective_at)
        history = await rate_card_history(conn, draft.model)
        latest = history[0].card if history else None
        in_force = next((v.card for v in history if not v.scheduled), None)
        card = _complete(draft, latest, effective_at=draft.effective_at or now)
        row = await conn.fetchrow(
            f"""INSERT INTO rate_cards (model, model_kind, input_millicredits_per_1k_tokens,
                   cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
                   max_output_tokens, effective_at, upstream_input_microusd_per_1k_tokens,
                   upstream_output_microusd_per_1k_tokens, display_label)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
               ON CONFLICT (model, effective_at) DO NOTHING
               RETURNING {_COLUMNS}""",
            card.model,
            card.model_kind.value,
            card.input_millicredits_per_1k_tokens,
            card.cached_input_millicredits_per_1k_tokens,
            card.output_millicredits_per_1k_tokens,
            card.max_output_tokens,
            card.effective_at,
            card.upstream_input_microusd_per_1k_tokens,
            card.upstream_output_microusd_per_1k_tokens,
            card.display_label,
        )
        if row is None:
            raise DuplicateRateCardError(card.model, card.effective_at)
        published = _rate_card(row)
        await record_audit(
            conn,
            actor,
            action="rate_card.publish",
            target_type="rate_card",
            target_id=published.id,
            before=None if in_force is None else rate_card_snapshot(in_force),
            after=rate_card_snapshot(published),
        )
        await notify_control(conn, ControlKind.RATE_CARDS)
    return published


def _complete(draft: RateCardDraft, latest: RateCard | None, *, effective_at: datetime) -> RateCard:
    """The draft as a full card: unset fields from ``latest`` (the model's newest version)."""
    if latest is None:
        if draft.model_kind is None:
            raise IncompleteRateCardError(draft.model, "modelKind")
        if draft.max_output_tokens is None:
            raise IncompleteRateCardError(draft.model, "maxOutputTokens")
        latest = RateCard(
            id=0,
            model=draft.model,
            input_millicredits_per_1k_tokens=0,
            cached_input_millicredits_per_1k_tokens=None,
            output_millicredits_per_1k_tokens=0,
            max_output_tokens=draft.max_output_tokens,
            effective_at=effective_at,
            model_kind=draft.model_kind,
        )
    elif draft.model_kind is not None and draft.model_kind is not latest.model_kind:
        raise ModelKindMismatchError(draft.model, latest.model_kind, draft.model_kind)

    def inherit(value: Any, field: str) -> Any:
        return getattr(latest, field) if value is None else value

    return replace(
        latest,
        input_millicredits_per_1k_tokens=draft.input_millicredits_per_1k_tokens,
        cached_input_millicredits_per_1k_tokens=draft.cached_input_millicredits_per_1k_tokens,
        output_millicredits_per_1k_tokens=draft.output_millicredits_per_1k_tokens,
        effective_at=effective_at,
        max_output_tokens=inherit(draft.max_output_tokens, "max_output_tokens"),
        display_label=inherit(draft.display_label, "display_label"),
        upstream_input_microusd_per_1k_tokens=inherit(
            draft.upstream_input_microusd_per_1k_tokens, "upstream_input_microusd_per_1k_tokens"
        ),
        upstream_output_microusd_per_1k_tokens=inherit(
            draft.upstream_output_microusd_per_1k_tokens,
            "upstream_output_microusd_per_1k_tokens",
        ),
    )


class RateCardBook:
    """The rate cards in force, held in memory, and the scheduled ones waiting for their time.

    Reads are lock-free dictionary lookups. ``refresh`` replaces everything atomically (one
    statement, so in-force and scheduled are read at one instant). A scheduled card takes
    effect by a timer on the event loop at its ``effective_at`` (by this host's clock, which
    NTP keeps within milliseconds of Postgres's): the delay after ``effective_at`` is the
    loop's timer lag, a millisecond or so on an idle loop and well under a second on a busy
    one, with no reload and no check on the request path. Call ``close`` at shutdown.
    """

    def __init__(self, cards: dict[str, RateCard] | None = None) -> None:
        self._cards: dict[str, RateCard] = dict(cards or {})
        # Scheduled cards, sorted by effective_at (then id: a stable order).
        self._scheduled: list[RateCard] = []
        self._timer: asyncio.TimerHandle | None = None

    def get(self, model: str) -> RateCard | None:
        """The rate card in force for ``model``, or None when the model has none."""
        return self._cards.get(model)

    def models(self) -> list[RateCard]:
        """All rate cards in force, sorted by model name."""
        return [self._cards[m] for m in sorted(self._cards)]

    def scheduled(self) -> list[RateCard]:
        """The cards waiting for their ``effective_at``, soonest first."""
        return list(self._scheduled)

    async def refresh(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        """Reload from Postgres. Raises on Postgres errors (the old cards stay in use)."""
        listed = await current_and_scheduled(pool)
        self.load(
            {item.card.model: item.card for item in listed if not item.scheduled},
            [item.card for item in listed if item.scheduled],
        )

    def load(self, cards: dict[str, RateCard], scheduled: Iterable[RateCard]) -> None:
        """Replace the cards in force and the scheduled ones; arm the timer for the next.

        Must run on the event loop that serves requests (the timer is that loop's).
        """
        self._cards = dict(cards)
        self._scheduled = sorted(scheduled, key=_schedule_order)
        self._promote_due()

    def close(self) -> None:
        """Stop the timer (the scheduled cards stay unapplied)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _promote_due(self) -> None:
        """Put every scheduled card whose time has come in force; re-arm for the next."""
        self.close()
        now = datetime.now(UTC)
        due = bisect.bisect_right(self._scheduled, now, key=lambda card: card.effective_at)
        if due:
            cards = dict(self._cards)
            for card in self._scheduled[:due]:
                cards[card.model] = card
            self._cards = cards
            self._scheduled = self._scheduled[due:]
        if self._scheduled:
            delay_s = (self._scheduled[0].effective_at - now).total_seconds()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay_s, self._promote_due)


def _schedule_order(card: RateCard) -> tuple[datetime, int]:
    return card.effective_at, card.id
