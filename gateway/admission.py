"""The admission steps of a billed request that size and hold its cost: the token estimate
and the worst-case hold within the spend caps.

``gateway.proxy`` runs them in order, cheapest check first (docs/design.md, "A request's
life", step 2): every refusal but the reserve's own 402 comes before any hold is placed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from billing.metering.estimate import Estimate, EstimateError, Estimator
from billing.metering.pricing import RateCard, RoundingMode, worst_case_millicredits
from billing.spend_controls import check_max_request
from gateway import appkeys as gateway_keys
from gateway.auth import Identity
from runtime import appkeys
from runtime.errors import InvalidRequestError


async def estimate_tokens(
    app: web.Application,
    estimator: Estimator,
    identity: Identity,
    card: RateCard,
    body: dict[str, Any],
    body_bytes: int,
    charged_rounding: RoundingMode | None,
) -> Estimate:
    """The request's token estimate, cheapest step first.

    A body of at most ``PROMPT_COUNT_INLINE_MAX_BYTES`` is counted on the event loop (a few
    ms at most). A larger one is first priced at a lower bound of its prompt plus its output
    allowance (at ``charged_rounding``; not when the request is not charged, None) and
    refused if the balance cannot cover even that (one Redis read, no tokenizing), then
    counted in the prompt-counting threads, so the loop is never blocked by it (tiktoken
    releases the GIL while it encodes).

    Raises:
        InvalidRequestError: a field of the wrong shape, or one that cannot be counted (400).
        InsufficientCreditsError, AccountSuspendedError: the balance cannot cover the lower
            bound (402).
        BillingUnavailableError: Redis or Postgres unreachable (503).
    """
    settings = app[appkeys.SETTINGS]
    tokens = app[gateway_keys.TOKENS]
    try:
        output_tokens = estimator.output_tokens(body, card)
        if body_bytes <= settings.prompt_count_inline_max_bytes:
            return Estimate(estimator.prompt_tokens(body, card, tokens), output_tokens)
        if charged_rounding is not None:
            lower_bound = worst_case_millicredits(
                card,
                prompt_tokens=estimator.prompt_tokens_lower_bound(body, card, tokens),
                max_output_tokens=output_tokens,
                rounding_mode=charged_rounding,
            )
            await app[appkeys.HOLDS].refuse_uncovered(identity.account_id, lower_bound)
        prompt_tokens = await asyncio.get_running_loop().run_in_executor(
            app[gateway_keys.PROMPT_COUNTING], estimator.prompt_tokens, body, card, tokens
        )
    except EstimateError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    return Estimate(prompt_tokens, output_tokens)


async def reserve_worst_case(
    app: web.Application,
    identity: Identity,
    card: RateCard,
    estimate: Estimate,
    request_id: str,
    rounding_mode: RoundingMode,
    started_ms: int,
) -> tuple[int, int]:
    """Hold a charged request's worst-case cost within the spend caps of its key and
    account; returns the millicredits held and the account's available balance after the
    hold (millicredits).

    Raises:
        InsufficientCreditsError, AccountSuspendedError: the account cannot cover it (402).
        SpendCapExceededError: the hold is above a maximum per request, or would pass a daily
            or monthly cap (402); nothing held.
        BillingUnavailableError: Redis or Postgres unreachable (503).
    """
    settings = app[appkeys.SETTINGS]
    hold_millicredits = worst_case_millicredits(
        card,
        prompt_tokens=estimate.prompt_tokens,
        max_output_tokens=estimate.max_completion_tokens,
        rounding_mode=rounding_mode,
    )
    controls = identity.controls
    if controls is not None:
        check_max_request(controls, hold_millicredits)
    available_millicredits = await app[appkeys.HOLDS].reserve(
        identity.account_id,
        hold_millicredits,
        request_id=request_id,
        ttl_s=settings.hold_deadline_s,
        api_key_id=identity.api_key_id,
        started_ms=started_ms,
        window_caps=None if controls is None else controls.window_caps,
    )
    return hold_millicredits, available_millicredits
