"""Charges to the millicredit: docs/design.md's reference cases and properties of the rounding."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.metering.pricing import (
    RateCard,
    RoundingMode,
    charge_millicredits,
    round_charge,
    worst_case_millicredits,
)
from billing.units import credits_to_millicredits, millicredits_to_usd, money_fields


def card(model: str, inp: int, out: int, cached: int | None = None) -> RateCard:
    return RateCard(
        id=1,
        model=model,
        input_millicredits_per_1k_tokens=inp,
        cached_input_millicredits_per_1k_tokens=cached,
        output_millicredits_per_1k_tokens=out,
        max_output_tokens=16_384,
        effective_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


MINI = card("gpt-4o-mini", 2_400, 9_600)
FOUR_O = card("gpt-4o", 20_000, 80_000)


@pytest.mark.parametrize(
    ("rate", "prompt", "completion", "exact_mc", "ceil_mc"),
    [
        (MINI, 1_000, 1_000, 12_000, 12_000),
        (FOUR_O, 10_000, 2_000, 360_000, 360_000),
        (MINI, 750, 200, 3_720, 4_000),
        (FOUR_O, 1_234, 567, 70_040, 71_000),
    ],
)
def test_charge_reference_cases_match_design(rate, prompt, completion, exact_mc, ceil_mc):
    exact = charge_millicredits(
        rate, prompt_tokens=prompt, completion_tokens=completion, rounding_mode=RoundingMode.EXACT
    )
    ceil = charge_millicredits(
        rate, prompt_tokens=prompt, completion_tokens=completion, rounding_mode=RoundingMode.CEIL
    )
    assert (exact, ceil) == (exact_mc, ceil_mc)


def test_charge_cached_tokens_billed_at_cached_rate():
    rate = card("gpt-4o-mini", 2_400, 9_600, cached=1_200)
    # 1000 prompt of which 600 cached: 400*2400 + 600*1200 = 1,680,000 -> 1,680 mc
    assert (
        charge_millicredits(rate, prompt_tokens=1_000, cached_tokens=600, completion_tokens=0)
        == 1_680
    )


def test_charge_cached_tokens_without_cached_rate_use_input_rate():
    assert (
        charge_millicredits(MINI, prompt_tokens=1_000, cached_tokens=600, completion_tokens=0)
        == 2_400
    )


def test_charge_rounds_up_a_fraction_of_a_millicredit():
    # One gpt-4o-mini input token costs 2.4 mc: rounds to 3 (exact) and 1,000 (ceil).
    assert charge_millicredits(MINI, prompt_tokens=1, completion_tokens=0) == 3
    assert (
        charge_millicredits(
            MINI, prompt_tokens=1, completion_tokens=0, rounding_mode=RoundingMode.CEIL
        )
        == 1_000
    )


def test_charge_negative_tokens_raise():
    with pytest.raises(ValueError):
        charge_millicredits(MINI, prompt_tokens=-1, completion_tokens=0)


tokens = st.integers(min_value=0, max_value=2_000_000)
rates = st.integers(min_value=0, max_value=10_000_000)


@given(prompt=tokens, completion=tokens, cached=tokens, inp=rates, out=rates, cached_rate=rates)
def test_charge_is_exact_ceiling_of_raw_cost(prompt, completion, cached, inp, out, cached_rate):
    rate = card("m", inp, out, cached=cached_rate)
    charged = charge_millicredits(
        rate, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
    )
    c = min(cached, prompt)
    raw = (prompt - c) * inp + c * cached_rate + completion * out
    # The smallest whole millicredit amount >= the raw cost.
    assert charged * 1000 >= raw
    assert (charged - 1) * 1000 < raw or charged == 0


@given(prompt=tokens, completion=tokens, inp=rates, out=rates)
def test_ceil_mode_is_whole_credits_never_below_exact(prompt, completion, inp, out):
    rate = card("m", inp, out)
    exact = charge_millicredits(rate, prompt_tokens=prompt, completion_tokens=completion)
    ceil = charge_millicredits(
        rate, prompt_tokens=prompt, completion_tokens=completion, rounding_mode=RoundingMode.CEIL
    )
    assert ceil % 1000 == 0
    assert exact <= ceil < exact + 1000


@given(
    prompt=tokens,
    used=tokens,
    cap=st.integers(min_value=0, max_value=2_000_000),
    inp=rates,
    out=rates,
    cached=st.integers(min_value=0, max_value=2_000_000),
)
def test_worst_case_bounds_every_actual_charge(prompt, used, cap, inp, out, cached):
    rate = card("m", inp, out, cached=inp // 2)
    completion = min(used, cap)
    for mode in RoundingMode:
        bound = worst_case_millicredits(
            rate, prompt_tokens=prompt, max_output_tokens=cap, rounding_mode=mode
        )
        actual = charge_millicredits(
            rate,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            rounding_mode=mode,
        )
        assert actual <= bound


def test_round_charge_zero_is_zero():
    assert round_charge(0, RoundingMode.EXACT) == 0
    assert round_charge(0, RoundingMode.CEIL) == 0


@pytest.mark.parametrize(
    ("text", "mc"),
    [("12", 12_000), ("3.72", 3_720), ("70.04", 70_040), ("0.001", 1), ("-5", -5_000)],
)
def test_credits_to_millicredits_parses_decimals(text, mc):
    assert credits_to_millicredits(text) == mc


@pytest.mark.parametrize("text", ["1.0001", "abc", "", "1e3"])
def test_credits_to_millicredits_rejects_bad_amounts(text):
    with pytest.raises(ValueError):
        credits_to_millicredits(text)


def test_money_fields_give_millicredits_as_string():
    assert money_fields("balance", 1_234_567) == {
        "balanceMillicredits": "1234567",
        "balanceCredits": 1234.567,
        "balanceUsd": 1.23,
    }
    assert millicredits_to_usd(9_990_000) == 9.99
