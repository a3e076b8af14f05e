"""Rate cards over HTTP: the cards in force (and scheduled), a model's history, publishing a
new version (admin role).

Prices are credits per 1,000 tokens as decimal strings with at most three decimals
(``"2.400"``), shown beside the integer millicredits stored (``2400``); upstream costs are
US dollars per 1,000 tokens with at most six decimals (``"0.000150"``), stored as micro-USD.
A published card takes effect on every gateway at its ``effectiveAt`` (``RATE_CARDS`` event,
then the book's timer; docs/design.md, "Admin API and live control").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from admin_api.framework import AdminContext, AdminModel, AdminRouter, NotFound, Role
from admin_api.models import ShortText, Timestamp
from billing.metering.pricing import ModelKind, RateCard
from billing.metering.rate_cards import (
    ListedRateCard,
    RateCardDraft,
    current_and_scheduled,
    publish_rate_card,
    rate_card_history,
)
from billing.units import credits_text, credits_to_millicredits, microusd_text, usd_to_microusd

router = AdminRouter(tag="rate-cards")

#: A model name as the upstream spells it (no "/": it is a path segment here).
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
#: Credits per 1k tokens: up to a million, at most three decimals, never negative.
CreditsPer1k = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,6}(\.[0-9]{1,3})?$")]
#: US dollars per 1k tokens: at most six decimals, never negative.
UsdPer1k = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,6}(\.[0-9]{1,6})?$")]


def _camel(name: str) -> str:
    """camelCase with the unit as written: ``input_credits_per_1k_tokens`` ->
    ``inputCreditsPer1kTokens`` (not pydantic's ``...Per1KTokens``)."""
    return to_camel(name).replace("1K", "1k")


class RateCardModel(AdminModel):
    """The admin API's base model with the rate card's unit spelling."""

    model_config = ConfigDict(alias_generator=_camel)


class RateCardOut(RateCardModel):
    """One version of a model's card. Prices twice: decimal credits and integer millicredits
    per 1k tokens; ``cachedInput*`` null bills cached prompt tokens at the input rate."""

    id: int
    model: str
    model_kind: ModelKind
    display_label: str
    effective_at: datetime
    scheduled: bool = Field(description="true: effectiveAt is still ahead (not yet in force).")
    input_credits_per_1k_tokens: str
    input_millicredits_per_1k_tokens: int
    cached_input_credits_per_1k_tokens: str | None
    cached_input_millicredits_per_1k_tokens: int | None
    output_credits_per_1k_tokens: str
    output_millicredits_per_1k_tokens: int
    max_output_tokens: int
    upstream_input_usd_per_1k_tokens: str
    upstream_input_microusd_per_1k_tokens: int
    upstream_output_usd_per_1k_tokens: str
    upstream_output_microusd_per_1k_tokens: int

    @classmethod
    def of(cls, card: RateCard, *, scheduled: bool) -> RateCardOut:
        """The JSON form of a stored card."""
        cached = card.cached_input_millicredits_per_1k_tokens
        return cls(
            id=card.id,
            model=card.model,
            model_kind=card.model_kind,
            display_label=card.display_label,
            effective_at=card.effective_at,
            scheduled=scheduled,
            input_credits_per_1k_tokens=credits_text(card.input_millicredits_per_1k_tokens),
            input_millicredits_per_1k_tokens=card.input_millicredits_per_1k_tokens,
            cached_input_credits_per_1k_tokens=None if cached is None else credits_text(cached),
            cached_input_millicredits_per_1k_tokens=cached,
            output_credits_per_1k_tokens=credits_text(card.output_millicredits_per_1k_tokens),
            output_millicredits_per_1k_tokens=card.output_millicredits_per_1k_tokens,
            max_output_tokens=card.max_output_tokens,
            upstream_input_usd_per_1k_tokens=microusd_text(
                card.upstream_input_microusd_per_1k_tokens
            ),
            upstream_input_microusd_per_1k_tokens=card.upstream_input_microusd_per_1k_tokens,
            upstream_output_usd_per_1k_tokens=microusd_text(
                card.upstream_output_microusd_per_1k_tokens
            ),
            upstream_output_microusd_per_1k_tokens=card.upstream_output_microusd_per_1k_tokens,
        )

    @classmethod
    def listed(cls, item: ListedRateCard) -> RateCardOut:
        """The JSON form of a listed card (in force, or scheduled)."""
        return cls.of(item.card, scheduled=item.scheduled)


class RateCardList(RateCardModel):
    """Rate cards: in force first (one per model, by model), then scheduled (soonest
    first); a history lists one model's versions, newest ``effectiveAt`` first."""

    data: list[RateCardOut]


class ModelPath(RateCardModel):
    """The path of a model's cards."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "gpt-4o-mini"}]})

    model: ModelName


class RateCardPublish(RateCardModel):
    """A new version of a model's card.

    Prices describe it completely (``cachedInputCreditsPer1kTokens`` absent or null: the
    input rate). ``modelKind``, ``maxOutputTokens``, ``displayLabel`` and the upstream costs
    are taken from the model's latest version when absent; a model's first card needs
    ``modelKind`` and ``maxOutputTokens`` (else 422). A known model keeps its kind (another
    -> 422). ``effectiveAt`` absent: now; in the past: 422; a model's second card at the same
    instant: 409.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "gpt-4o-mini",
                    "inputCreditsPer1kTokens": "2.400",
                    "cachedInputCreditsPer1kTokens": "1.200",
                    "outputCreditsPer1kTokens": "9.600",
                    "modelKind": "chat",
                    "maxOutputTokens": 16384,
                    "displayLabel": "Eco",
                }
            ]
        }
    )

    model: ModelName
    effective_at: Timestamp | None = None
    input_credits_per_1k_tokens: CreditsPer1k
    cached_input_credits_per_1k_tokens: CreditsPer1k | None = None
    output_credits_per_1k_tokens: CreditsPer1k
    model_kind: ModelKind | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    display_label: ShortText | None = None
    upstream_input_usd_per_1k_tokens: UsdPer1k | None = None
    upstream_output_usd_per_1k_tokens: UsdPer1k | None = None

    def draft(self) -> RateCardDraft:
        """The billing layer's draft: decimal strings as integer millicredits / micro-USD."""
        cached = self.cached_input_credits_per_1k_tokens
        up_in = self.upstream_input_usd_per_1k_tokens
        up_out = self.upstream_output_usd_per_1k_tokens
        return RateCardDraft(
            model=self.model,
            input_millicredits_per_1k_tokens=credits_to_millicredits(
                self.input_credits_per_1k_tokens
            ),
            output_millicredits_per_1k_tokens=credits_to_millicredits(
                self.output_credits_per_1k_tokens
            ),
            cached_input_millicredits_per_1k_tokens=(
                None if cached is None else credits_to_millicredits(cached)
            ),
            effective_at=self.effective_at,
            model_kind=self.model_kind,
            max_output_tokens=self.max_output_tokens,
            display_label=self.display_label,
            upstream_input_microusd_per_1k_tokens=None if up_in is None else usd_to_microusd(up_in),
            upstream_output_microusd_per_1k_tokens=(
                None if up_out is None else usd_to_microusd(up_out)
            ),
        )


@router.get(
    "/admin/v1/rate-cards",
    role=Role.VIEWER,
    response=RateCardList,
    summary="The rate cards in force (one per model) and the scheduled ones",
)
async def list_rate_cards(ctx: AdminContext) -> RateCardList:
    """``GET /admin/v1/rate-cards``."""
    return RateCardList(data=[RateCardOut.listed(c) for c in await current_and_scheduled(ctx.pool)])


@router.get(
    "/admin/v1/rate-cards/{model}/history",
    role=Role.VIEWER,
    params=ModelPath,
    response=RateCardList,
    summary="Every version of a model's rate card, newest first",
)
async def rate_card_versions(ctx: AdminContext) -> RateCardList:
    """``GET /admin/v1/rate-cards/{model}/history``; 404 for a model without cards."""
    model = ctx.params.model
    history = await rate_card_history(ctx.pool, model)
    if not history:
        raise NotFound(f"Model {model!r} has no rate card.", param="model")
    return RateCardList(data=[RateCardOut.listed(c) for c in history])


@router.post(
    "/admin/v1/rate-cards",
    role=Role.ADMIN,
    body=RateCardPublish,
    response=RateCardOut,
    status=201,
    summary="Publish a new version of a model's rate card (now or later)",
)
async def publish_rate_card_version(ctx: AdminContext) -> RateCardOut:
    """``POST /admin/v1/rate-cards``: one audit row (``rate_card.publish``), one
    ``RATE_CARDS`` event; refusals are answered by ``admin_api.errors.BILLING_ANSWERS``."""
    async with ctx.pool.acquire() as conn:
        card = await publish_rate_card(conn, ctx.actor, ctx.body.draft())
    return RateCardOut.of(card, scheduled=card.effective_at > datetime.now(UTC))
