"""The admission steps of a billed request that size and hold its cost: the token estimate
and the worst-case hold within the spend caps.

``gateway.proxy`` runs them in order, cheapest check first (docs/design.md, "A request's
life", step 2): every refusal but the reserve's own 402 comes before any hold is placed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from billing.errors import InsufficientCreditsError, SpendCapExceededError
from billing.metering.estimate import Estimate, EstimateError, Estimator
from billing.metering.pricing import RateCard, RoundingMode, worst_case_millicredits
from billing.spend_controls import check_max_request
from gateway import appkeys as gateway_keys
from gateway.auth import Identity
from runtime import appkeys
from runtime.errors import InvalidRequestError


def estimate_tokens(
    app: web.Application,
    estimator: Estimator,
    card: RateCard,
    body: dict[str, Any],
    body_bytes: int,
) -> Estimate:
    """The request's token estimate, with no tokenizing beyond a small body.

    A body of at most ``PROMPT_COUNT_INLINE_MAX_BYTES`` is counted on the event loop (tens
    of µs at most). A larger one gets the upper bound of its prompt (each text's UTF-8
    length, ``prompt_counted`` False): ``reserve_worst_case`` holds that when it fits and
    counts only when it does not, so a large prompt is counted only when it matters.

    Raises:
        InvalidRequestError: a field of the wrong shape, or one that cannot be counted (400).
    """
    tokens = app[gateway_keys.TOKENS]
    try:
        output_tokens = estimator.output_tokens(body, card)
        if body_bytes <= app[appkeys.SETTINGS].prompt_count_inline_max_bytes:
            return Estimate(estimator.prompt_tokens(body, card, tokens), output_tokens)
        bound = estimator.prompt_tokens_upper_bound(body, card, tokens)
    except EstimateError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    return Estimate(bound, output_tokens, prompt_counted=False)


async def count_prompt(
    app: web.Application, estimator: Estimator, card: RateCard, body: dict[str, Any]
) -> int:
    """The prompt's exact count, in one of the prompt-counting threads, so the loop is never
    blocked by it (tiktoken releases the GIL while it encodes).

    Raises:
        InvalidRequestError: a field that cannot be counted (400).
    """
    try:
        return await asyncio.get_running_loop().run_in_executor(
            app[gateway_keys.PROMPT_COUNTING],
            estimator.prompt_tokens,
            body,
            card,
            app[gateway_keys.TOKENS],
        )
    except EstimateError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None


async def reserve_worst_case(
    app: web.Application,
    identity: Identity,
    card: RateCard,
    estimate: Estimate,
    request_id: str,
    rounding_mode: RoundingMode,
    started_ms: int,
    *,
    estimator: Estimator,
    body: dict[str, Any],
) -> tuple[Estimate, int, int]:
    """Hold a charged request's worst-case cost within the spend caps of its key and
    account; returns the estimate held for (the count, when the upper bound did not fit),
    the millicredits held and the account's available balance after the hold (millicredits).

    An estimate at the prompt's upper bound is held as it is when the account covers it
    (a larger hold costs nothing: the charge is the settled usage). When it does not, the
    prompt is first priced at its lower bound and refused if the available balance cannot
    cover even that (no tokenizing); otherwise it is counted (``count_prompt``) and the count
    is held or refused, so a refusal is never decided on the upper bound.

    Raises:
        InsufficientCreditsError, AccountSuspendedError: the account cannot cover it (402).
        SpendCapExceededError: the hold is above a maximum per request, or would pass a daily
            or monthly cap (402); nothing held.
        BillingUnavailableError: Redis or Postgres unreachable (503).
        InvalidRequestError: a field that cannot be counted (400).
    """
    if estimate.prompt_counted:
        held = await _reserve(app, identity, card, request_id, rounding_mode, started_ms, estimate)
        return estimate, *held
    args = (identity, card, request_id, rounding_mode, started_ms)
    try:
        return estimate, *await _reserve(app, *args, estimate)
    except InsufficientCreditsError as exc:
        tokens = app[gateway_keys.TOKENS]
        lower_bound = worst_case_millicredits(
            card,
            prompt_tokens=estimator.prompt_tokens_lower_bound(body, card, tokens),
            max_output_tokens=estimate.max_completion_tokens,
            rounding_mode=rounding_mode,
        )
        if lower_bound > exc.available_millicredits:
            raise InsufficientCreditsError(
                required_millicredits=lower_bound,
                available_millicredits=exc.available_millicredits,
            ) from None
    except SpendCapExceededError:
        pass
    counted = Estimate(
        await count_prompt(app, estimator, card, body), estimate.max_completion_tokens
    )
    return counted, *await _reserve(app, *args, counted)


async def _reserve(
    app: web.Application,
    identity: Identity,
    card: RateCard,
    request_id: str,
    rounding_mode: RoundingMode,
    started_ms: int,
    estimate: Estimate,
) -> tuple[int, int]:
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
