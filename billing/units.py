"""Money units. All amounts are ``int`` millicredits; floats exist only for display.

1 credit = 1,000 millicredits (mc); $1.00 = 1,000 credits = 1,000,000 mc.
Source: docs/design.md, "Units and arithmetic".
"""

from __future__ import annotations

MILLICREDITS_PER_CREDIT = 1_000
CREDITS_PER_USD = 1_000
MILLICREDITS_PER_USD = MILLICREDITS_PER_CREDIT * CREDITS_PER_USD


def credits_to_millicredits(credits: int | str) -> int:
    """Whole or decimal credits (``"12.5"``, up to 3 decimals) -> millicredits.

    Raises:
        ValueError: more than three decimals, or not a number.
    """
    text = str(credits).strip()
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    whole, _, frac = text.partition(".")
    if not whole.isdigit() and not (whole == "" and frac.isdigit()):
        raise ValueError(f"not a credit amount: {credits!r}")
    if len(frac) > 3 or (frac and not frac.isdigit()):
        raise ValueError(f"credits have at most 3 decimals: {credits!r}")
    return sign * (int(whole or "0") * MILLICREDITS_PER_CREDIT + int(frac.ljust(3, "0") or "0"))


def millicredits_to_credits(amount_millicredits: int) -> float:
    """Display value in credits (e.g. 1234567 -> 1234.567). Never feed back into arithmetic."""
    return amount_millicredits / MILLICREDITS_PER_CREDIT


def millicredits_to_usd(amount_millicredits: int) -> float:
    """Approximate USD equivalent rounded to cents (1,000,000 mc = $1.00), for display.

    Never ``-0.0``: a negative amount under half a cent rounds to ``0.0``.
    """
    # round(-0.001, 2) is -0.0, which JSON prints as "-0.0"; ``or 0.0`` maps both zeros to +0.0.
    return round(amount_millicredits / MILLICREDITS_PER_USD, 2) or 0.0


def money_fields(prefix: str, amount_millicredits: int) -> dict[str, object]:
    """The JSON edge shape of an amount: ``{"<prefix>Millicredits": "123456",
    "<prefix>Credits": 123.456, "<prefix>Usd": 0.12}`` (millicredits as a string)."""
    return {
        f"{prefix}Millicredits": str(amount_millicredits),
        f"{prefix}Credits": millicredits_to_credits(amount_millicredits),
        f"{prefix}Usd": millicredits_to_usd(amount_millicredits),
    }


def credits_text(amount_millicredits: int) -> str:
    """Millicredits as a decimal string of credits with exactly 3 decimals (2400 -> "2.400"),
    the API's text for prices; exact, unlike ``millicredits_to_credits``."""
    sign = "-" if amount_millicredits < 0 else ""
    whole, frac = divmod(abs(amount_millicredits), MILLICREDITS_PER_CREDIT)
    return f"{sign}{whole}.{frac:03d}"
