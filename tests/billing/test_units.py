"""``billing.units``: display conversions at the JSON edge."""

from __future__ import annotations

import math

import orjson
from hypothesis import given
from hypothesis import strategies as st

from billing.units import millicredits_to_credits, millicredits_to_usd, money_fields


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
