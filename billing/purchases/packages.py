"""The credit package catalogue: what a user can buy, at what price, for how many credits.

Packages live in Postgres (``packages``) so admins can change prices, Stripe price ids and
badges without a release. The server alone maps a package code to its price and credits; any
amount a client sends is ignored. Totals are fixed numbers, never recomputed from a bonus
percentage. Source: docs/design.md, "Units and arithmetic" (Starter $9.99 -> 9,990 credits;
Professional $49.99 -> 49,990 + 2,500 bonus = 52,490; Enterprise $99.99 -> 99,990 + 10,000
bonus = 109,990).

Postgres unreachable: every function raises ``OSError``/``asyncpg`` errors; the HTTP layers
answer 503.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import asyncpg

from billing.errors import BillingError
from billing.units import MILLICREDITS_PER_CREDIT

_PACKAGE_COLUMNS = """id, code, name, price_minor_units, currency, base_millicredits,
    bonus_millicredits, total_millicredits, stripe_price_id, active, sort_order, badge"""

# Minor units per major unit for the currencies we sell in (Stripe's "smallest currency unit").
_MINOR_UNITS_PER_MAJOR = {"usd": 100, "eur": 100, "gbp": 100}


class UnknownPackageError(BillingError):
    """No active package with that code (HTTP 400 on the purchase endpoint)."""

    def __init__(self, code: str) -> None:
        super().__init__(f"unknown package {code!r}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Package:
    """One row of the catalogue.

    Attributes:
        code: stable identifier clients send (``starter``, ``professional``, ``enterprise``).
        price_minor_units: price in the currency's minor units (cents for USD), as Stripe's
            ``unit_amount``.
        currency: ISO 4217 code, lower case as Stripe spells it (``usd``).
        base_millicredits / bonus_millicredits / total_millicredits: credits granted, in
            millicredits; ``total == base + bonus`` (a database CHECK).
        stripe_price_id: a Stripe Price to charge, or None to send inline ``price_data``.
        badge: short marketing label such as ``"Best value"``, or None.
    """

    id: int
    code: str
    name: str
    price_minor_units: int
    currency: str
    base_millicredits: int
    bonus_millicredits: int
    total_millicredits: int
    stripe_price_id: str | None
    active: bool
    sort_order: int
    badge: str | None

    @property
    def price(self) -> Decimal:
        """The price in major units (``Decimal("9.99")``), for display and JSON strings."""
        return Decimal(self.price_minor_units) / minor_units_per_major(self.currency)


@dataclass(frozen=True, slots=True)
class PackageSpec:
    """A package as seeded: the catalogue's default rows (no id)."""

    code: str
    name: str
    price_minor_units: int
    currency: str
    base_millicredits: int
    bonus_millicredits: int
    sort_order: int
    badge: str | None = None

    @property
    def total_millicredits(self) -> int:
        """Base plus bonus, in millicredits."""
        return self.base_millicredits + self.bonus_millicredits


_MC = MILLICREDITS_PER_CREDIT

DEFAULT_PACKAGES: tuple[PackageSpec, ...] = (
    PackageSpec("starter", "Starter", 999, "usd", 9_990 * _MC, 0, 10),
    PackageSpec("professional", "Professional", 4_999, "usd", 49_990 * _MC, 2_500 * _MC, 20),
    PackageSpec(
        "enterprise", "Enterprise", 9_999, "usd", 99_990 * _MC, 10_000 * _MC, 30, "Best value"
    ),
)
"""The catalogue of docs/design.md; ``migrations/0002_create_purchases.sql`` inserts the same
rows."""


def minor_units_per_major(currency: str) -> int:
    """100 for the two-decimal currencies we sell in.

    Raises:
        ValueError: a currency this service has no exponent for (add it before selling in it).
    """
    try:
        return _MINOR_UNITS_PER_MAJOR[currency.lower()]
    except KeyError:
        raise ValueError(f"unsupported currency {currency!r}") from None


def _package(row: asyncpg.Record) -> Package:
    return Package(*row)


async def seed_packages(conn: asyncpg.Connection) -> list[Package]:
    """Insert or reset the three default packages (``DEFAULT_PACKAGES``), by code.

    Prices, credits, names, sort order and badge are set to the defaults; an admin-set
    ``stripe_price_id`` and the ``active`` flag are kept. Other packages are left alone.

    Returns:
        The seeded packages as stored.
    """
    seeded: list[Package] = []
    async with conn.transaction():
        for spec in DEFAULT_PACKAGES:
            row = await conn.fetchrow(
                f"""INSERT INTO packages (code, name, price_minor_units, currency,
                        base_millicredits, bonus_millicredits, total_millicredits, sort_order,
                        badge)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                    ON CONFLICT (code) WHERE superseded_at IS NULL DO UPDATE SET
                        name = EXCLUDED.name,
                        price_minor_units = EXCLUDED.price_minor_units,
                        currency = EXCLUDED.currency,
                        base_millicredits = EXCLUDED.base_millicredits,
                        bonus_millicredits = EXCLUDED.bonus_millicredits,
                        total_millicredits = EXCLUDED.total_millicredits,
                        sort_order = EXCLUDED.sort_order,
                        badge = EXCLUDED.badge,
                        updated_at = now()
                    RETURNING {_PACKAGE_COLUMNS}""",
                spec.code,
                spec.name,
                spec.price_minor_units,
                spec.currency,
                spec.base_millicredits,
                spec.bonus_millicredits,
                spec.total_millicredits,
                spec.sort_order,
                spec.badge,
            )
            seeded.append(_package(row))
    return seeded


async def list_packages(
    conn: asyncpg.Connection | asyncpg.Pool, *, include_inactive: bool = False
) -> list[Package]:
    """Packages in display order (``sort_order``, then code); active ones only by default."""
    rows = await conn.fetch(
        f"""SELECT {_PACKAGE_COLUMNS} FROM packages
            WHERE active OR $1 ORDER BY sort_order, code""",
        include_inactive,
    )
    return [_package(r) for r in rows]


async def get_package(conn: asyncpg.Connection | asyncpg.Pool, code: str) -> Package:
    """The active package with this code.

    Raises:
        UnknownPackageError: no such code, or the package is inactive.
    """
    row = await conn.fetchrow(
        f"SELECT {_PACKAGE_COLUMNS} FROM packages WHERE code = $1 AND active", code
    )
    if row is None:
        raise UnknownPackageError(code)
    return _package(row)


def price_per_1k_credits(package: Package) -> Decimal:
    """Effective price of 1,000 credits in major units, rounded half-up to 4 places.

    E.g. Starter: 9.99 / 9,990 * 1,000 = 1.0000; Enterprise: 99.99 / 109,990 * 1,000 = 0.9091.
    """
    per_1k = package.price * 1000 * MILLICREDITS_PER_CREDIT / package.total_millicredits
    return per_1k.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def savings_percent(package: Package, reference: Package) -> Decimal:
    """How much cheaper per credit ``package`` is than ``reference`` (Starter), in percent,
    rounded half-up to one decimal; 0 for the reference itself, negative if dearer."""
    mine = package.price / package.total_millicredits
    theirs = reference.price / reference.total_millicredits
    saving = (1 - mine / theirs) * 100
    return saving.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
