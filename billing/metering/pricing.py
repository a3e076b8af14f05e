"""Rate cards and the charge of one request.

A rate card row holds integer millicredits per 1,000 tokens. The charge sums
``prompt*in + cached*cached_in + completion*out`` (a value in mc/1000) and rounds once:
``exact`` to the next millicredit, ``ceil`` to the next whole credit.
Source: docs/design.md, "Units and arithmetic" (reference cases 12.000, 360.000, 3.720, 70.040).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from billing.units import MILLICREDITS_PER_CREDIT


class ModelKind(enum.StrEnum):
    """What a model serves (``rate_cards.model_kind``); each endpoint takes one kind."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


#: The kind of model each billed endpoint (by its OpenAI name) accepts; any other model is
#: refused as OpenAI refuses an unsupported one (404 ``model_not_found``).
ENDPOINT_MODEL_KINDS: Mapping[str, ModelKind] = MappingProxyType(
    {
        "chat.completions": ModelKind.CHAT,
        "responses": ModelKind.CHAT,
        "completions": ModelKind.COMPLETION,
        "embeddings": ModelKind.EMBEDDING,
    }
)


class RoundingMode(enum.StrEnum):
    """How the raw charge is rounded up: to the millicredit or to the whole credit."""

    EXACT = "exact"
    CEIL = "ceil"


@dataclass(frozen=True, slots=True)
class RateCard:
    """One model's prices in force.

    Attributes:
        input_millicredits_per_1k_tokens: price of 1,000 uncached prompt tokens.
        cached_input_millicredits_per_1k_tokens: price of 1,000 cached prompt tokens;
            ``None`` means cached tokens are billed at the input rate.
        output_millicredits_per_1k_tokens: price of 1,000 completion tokens.
        max_output_tokens: the model's output cap, used for the worst case when the
            client sends no ``max_tokens``.
        upstream_*_microusd_per_1k_tokens: what the upstream charges us (margin metrics).
        model_kind: what the model serves; an endpoint refuses models of another kind.
        display_label: the model's label for people ("Eco", "Advanced"); "" when none.
    """

    id: int
    model: str
    input_millicredits_per_1k_tokens: int
    cached_input_millicredits_per_1k_tokens: int | None
    output_millicredits_per_1k_tokens: int
    max_output_tokens: int
    effective_at: datetime
    upstream_input_microusd_per_1k_tokens: int = 0
    upstream_output_microusd_per_1k_tokens: int = 0
    model_kind: ModelKind = ModelKind.CHAT
    display_label: str = ""

    def serves(self, endpoint_name: str) -> bool:
        """Whether the billed endpoint ``endpoint_name`` (``"embeddings"``, ...) takes this
        model: its kind is the endpoint's (``ENDPOINT_MODEL_KINDS``)."""
        return ENDPOINT_MODEL_KINDS.get(endpoint_name) is self.model_kind

    @property
    def cached_rate(self) -> int:
        """Millicredits per 1k cached prompt tokens (the input rate when unset)."""
        if self.cached_input_millicredits_per_1k_tokens is None:
            return self.input_millicredits_per_1k_tokens
        return self.cached_input_millicredits_per_1k_tokens


def charge_millicredits(
    rate_card: RateCard,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    rounding_mode: RoundingMode = RoundingMode.EXACT,
) -> int:
    """The charge of a request in millicredits, rounded up once.

    Args:
        prompt_tokens: all prompt tokens as the upstream reports them, cached ones included
            (OpenAI's ``prompt_tokens``); the cached part is billed at the cached rate.
        cached_tokens: the cached part of ``prompt_tokens`` (clamped to it).
        completion_tokens: output tokens, reasoning included.

    Raises:
        ValueError: a negative token count.
    """
    if prompt_tokens < 0 or completion_tokens < 0 or cached_tokens < 0:
        raise ValueError("token counts must be >= 0")
    cached = min(cached_tokens, prompt_tokens)
    raw = (
        (prompt_tokens - cached) * rate_card.input_millicredits_per_1k_tokens
        + cached * rate_card.cached_rate
        + completion_tokens * rate_card.output_millicredits_per_1k_tokens
    )  # in millicredits / 1000
    return round_charge(raw, rounding_mode)


def round_charge(raw_millicredits_per_1000: int, rounding_mode: RoundingMode) -> int:
    """Round a raw charge (in units of 1/1000 millicredit) up to mc or to whole credits."""
    if rounding_mode is RoundingMode.CEIL:
        per_credit = 1000 * MILLICREDITS_PER_CREDIT
        return -(-raw_millicredits_per_1000 // per_credit) * MILLICREDITS_PER_CREDIT
    return -(-raw_millicredits_per_1000 // 1000)


def worst_case_millicredits(
    rate_card: RateCard,
    *,
    prompt_tokens: int,
    max_output_tokens: int,
    rounding_mode: RoundingMode,
) -> int:
    """Upper bound of a request's charge: every prompt token uncached, every output token used.

    The cached rate is never above the input rate in practice; the bound takes the larger of
    the two so it stays an upper bound whatever the rate card says.
    """
    in_rate = max(rate_card.input_millicredits_per_1k_tokens, rate_card.cached_rate)
    raw = prompt_tokens * in_rate + max_output_tokens * rate_card.output_millicredits_per_1k_tokens
    return round_charge(raw, rounding_mode)
