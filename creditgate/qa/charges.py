"""The charge arithmetic of ``creditgate qa``, written from docs/design.md ("Units and
arithmetic") with integers, not with ``billing.metering.pricing``: the script is the
independent check of that code."""

from __future__ import annotations

from decimal import Decimal

#: Millicredits per credit; a USD cent buys 10 credits (1,000 credits = $1).
MC_PER_CREDIT = 1000
MC_PER_CENT = 10 * MC_PER_CREDIT


def credits_to_mc(text: str | float | int) -> int:
    """Credits (a decimal string, at most 3 decimals) to integer millicredits."""
    value = Decimal(str(text)) * MC_PER_CREDIT
    if value != value.to_integral_value():
        raise ValueError(f"{text} credits is not a whole number of millicredits")
    return int(value)


def mc_to_credits(mc: int) -> str:
    """Integer millicredits as a credits string with 3 decimals."""
    sign = "-" if mc < 0 else ""
    whole, frac = divmod(abs(mc), MC_PER_CREDIT)
    return f"{sign}{whole}.{frac:03d}"


def expected_charge_mc(
    *,
    prompt: int,
    cached: int,
    completion: int,
    rates_mc: tuple[int, int, int],
    rounding_mode: str,
) -> int:
    """The charge in millicredits: ``(prompt - cached) * in + cached * cached_in +
    completion * out`` per 1,000 tokens, rounded up once, to the millicredit (``exact``) or
    to the whole credit (``ceil``)."""
    input_mc, cached_mc, output_mc = rates_mc
    cached = min(cached, prompt)
    raw = (prompt - cached) * input_mc + cached * cached_mc + completion * output_mc  # mc/1000
    unit = 1000 * (MC_PER_CREDIT if rounding_mode == "ceil" else 1)
    return -(-raw // unit) * (unit // 1000)
