"""``billing.units``: display conversions at the JSON edge."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.units import (
    credits_text,
    microusd_text,
    millicredits_to_credits,
    millicredits_to_usd,
    money_fields,
    usd_to_microusd,
)


def test_millicredits_to_usd_small_negative_amount_is_positive_zero() -> None:
    usd = millicredits_to_usd(-1_000)  # -1 credit = -$0.001, rounds to zero cents
    assert usd == 0.0
    assert math.copysign(1.0, usd) == 1.0


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_money_fields_never_print_negative_zero(amount_millicredits: int) -> None:
    printed = orjson.dumps(money_fields("amount", amount_millicredits))
    assert b"-0.0," not in printed and b"-0.0}" not in printed
    for value in (
        millicredits_to_usd(amount_millicredits),
        millicredits_to_credits(amount_millicredits),
    ):
        assert not (value == 0.0 and math.copysign(1.0, value) < 0)


def test_credits_text_has_three_decimals_exactly() -> None:
    assert [credits_text(mc) for mc in (2_400, 0, 1, 123_456_789, -1_500)] == [
        "2.400",
        "0.000",
        "0.001",
        "123456.789",
        "-1.500",
    ]


def test_usd_to_microusd_and_back() -> None:
    assert usd_to_microusd("0.00015") == 150
    assert usd_to_microusd("2") == 2_000_000
    assert microusd_text(150) == "0.000150"
    assert microusd_text(usd_to_microusd("12.5")) == "12.500000"
    for bad in ("0.0000001", "abc", "", "NaN", "Infinity"):
        with pytest.raises(ValueError):
            usd_to_microusd(bad)
