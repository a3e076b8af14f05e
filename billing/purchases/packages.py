"""The credit package catalogue: what a user can buy, at what price, for how many credits.

Packages live in Postgres (``packages``) so admins can change prices, Stripe price ids and
badges without a release. The server alone maps a package code to its price and credits; any
amount a client sends is ignored. Totals are fixed numbers, never recomputed from a bonus
percentage. Source: docs/design.md, "Units and arithmetic" (Starter $9.99 -> 9,990 credits;
Professional $49.99 -> 49,990 + 2,500 bonus = 52,490; Enterprise $99.99 -> 99,990 + 10,000
bonus = 109,990).

Packages are versioned (migration 0007): price, currency, credits and Stripe price id are
fixed per version; changing any of them makes a new row with the same code and
``version + 1`` and marks the old one ``superseded_at``. Name, badge, tag line, sort order
and ``active`` are shown to buyers but change nothing they pay or get, so they are edited in
place on the current version. A purchase keeps the ``package_id`` of the version it bought
(and snapshots its price and credits). Every reader here sees only current versions
(``superseded_at IS NULL``) unless it asks for history.

Postgres unreachable: every function raises ``OSError``/``asyncpg`` errors; the HTTP layers
answer 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg

from billing.audit import Actor, record_audit
from billing.control import ControlKind, notify_control
from billing.errors import BillingError
from billing.units import MILLICREDITS_PER_CREDIT

_PACKAGE_COLUMNS = """id, code, version, name, price_minor_units, currency, base_millicredits,
    bonus_millicredits, total_millicredits, stripe_price_id, active, sort_order, badge,
    tagline, created_at, superseded_at"""

VERSIONED_FIELDS = frozenset(
    {"price_minor_units", "currency", "base_millicredits", "bonus_millicredits", "stripe_price_id"}
)
"""Fields fixed per version: a change makes a new version (they decide what a buyer pays and
gets: the Stripe price id sets the amount Stripe charges)."""

COSMETIC_FIELDS = frozenset({"name", "badge", "tagline", "sort_order", "active"})
"""Fields edited in place on the current version."""

# Minor units per major unit for the currencies we sell in (Stripe's "smallest currency unit").
_MINOR_UNITS_PER_MAJOR = {"usd": 100, "eur": 100, "gbp": 100}


class UnknownPackageError(BillingError):
    """No active package with that code (HTTP 400 on the purchase endpoint; 404 on the admin
    API, where it means no package with that code at all)."""

    def __init__(self, code: str) -> None:
        super().__init__(f"unknown package {code!r}")
        self.code = code


class DuplicatePackageError(BillingError):
    """A package with this code exists already (HTTP 409): edit it instead."""

    def __init__(self, code: str) -> None:
        super().__init__(f"package {code!r} exists already")
        self.code = code


@dataclass(frozen=True, slots=True)
class Package:
    """One row of the catalogue.

    Attributes:
        code: stable identifier clients send (``starter``, ``professional``, ``enterprise``).
        version: 1 for a code's first row, + 1 for each edit of price, currency, credits or
            Stripe price id.
        price_minor_units: price in the currency's minor units (cents for USD), as Stripe's
            ``unit_amount``.
        currency: ISO 4217 code, lower case as Stripe spells it (``usd``).
        base_millicredits / bonus_millicredits / total_millicredits: credits granted, in
            millicredits; ``total == base + bonus`` (a database CHECK).
        stripe_price_id: a Stripe Price to charge, or None to send inline ``price_data``.
        badge: short marketing label such as ``"Best value"``, or None.
        tagline: one line under the name ("For teams that ship daily"), or None.
        superseded_at: when a newer version replaced this one; None for the current version.
    """

    id: int
    code: str
    version: int
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
    tagline: str | None
    created_at: datetime
    superseded_at: datetime | None

    @property
    def price(self) -> Decimal:
        """The price in major units with the currency's decimals (``Decimal("9.99")``,
        ``Decimal("199.00")``), for display and JSON strings."""
        per_major = minor_units_per_major(self.currency)
        return (Decimal(self.price_minor_units) / per_major).quantize(Decimal(1) / per_major)


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
    tagline: str | None = None
    stripe_price_id: str | None = None
    active: bool = True

    @property
    def total_millicredits(self) -> int:
        """Base plus bonus, in millicredits."""
        return self.base_millicredits + self.bonus_millicredits


_MC = MILLICREDITS_PER_CREDIT

DEFAULT_PACKAGES: tuple[PackageSpec, ...] = (
    PackageSpec("starter", "Starter", 999, "usd", 9_990 * _MC, 0, 10),
    PackageSpec(
        "professional",
        "Professional",
        4_999,
        "usd",
        49_990 * _MC,
        2_500 * _MC,
        20,
        "Best for frequent use",
    ),
    PackageSpec(
        "enterprise", "Enterprise", 9_999, "usd", 99_990 * _MC, 10_000 * _MC, 30, "Best value"
    ),
)
"""The catalogue of docs/design.md; ``migrations/0002_create_purchases.sql`` inserts the same
rows (0009 gives Professional its badge)."""


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
    return Package(**dict(row))


def package_snapshot(package: Package) -> dict[str, Any]:
    """A package as plain JSON-able values (the audit log's before/after)."""
    return asdict(package)


async def seed_packages(conn: asyncpg.Connection) -> list[Package]:
    """Insert each default package (``DEFAULT_PACKAGES``) whose code has no row yet; returns
    the current version of every default code.

    A code that exists is left alone, whatever its versions say: once a package exists the
    admin API owns it (a seeder that reset prices would undo an operator's edit at the next
    deploy, and could never change a version's price in place anyway). Migration 0002
    inserts the same rows, so on a migrated database this changes nothing.
    """
    async with conn.transaction():
        for spec in DEFAULT_PACKAGES:
            await conn.execute(
                """INSERT INTO packages (code, name, price_minor_units, currency,
                        base_millicredits, bonus_millicredits, total_millicredits, sort_order,
                        badge, tagline, stripe_price_id, active)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                    ON CONFLICT (code, version) DO NOTHING""",
                *_insert_values(spec),
            )
        rows = await conn.fetch(
            f"""SELECT {_PACKAGE_COLUMNS} FROM packages
                WHERE code = ANY($1::text[]) AND superseded_at IS NULL
                ORDER BY sort_order, code""",
            [spec.code for spec in DEFAULT_PACKAGES],
        )
    return [_package(r) for r in rows]


def _insert_values(spec: PackageSpec) -> tuple[Any, ...]:
    return (
        spec.code,
        spec.name,
        spec.price_minor_units,
        spec.currency,
        spec.base_millicredits,
        spec.bonus_millicredits,
        spec.total_millicredits,
        spec.sort_order,
        spec.badge,
        spec.tagline,
        spec.stripe_price_id,
        spec.active,
    )


async def list_packages(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    include_inactive: bool = False,
    include_history: bool = False,
) -> list[Package]:
    """Current packages in display order (``sort_order``, then code); active ones only by
    default. ``include_history`` adds the superseded versions, each after its code's current
    version (newest first)."""
    # The current version's sort order places every version of its code.
    rows = await conn.fetch(
        f"""SELECT {_PACKAGE_COLUMNS} FROM packages AS p
            WHERE (active OR $1) AND (superseded_at IS NULL OR $2)
            ORDER BY (SELECT c.sort_order FROM packages AS c
                      WHERE c.code = p.code AND c.superseded_at IS NULL), code, version DESC""",
        include_inactive,
        include_history,
    )
    return [_package(r) for r in rows]


async def get_package(conn: asyncpg.Connection | asyncpg.Pool, code: str) -> Package:
    """The current version of the active package with this code.

    Raises:
        UnknownPackageError: no such code, or the package is inactive.
    """
    row = await conn.fetchrow(
        f"""SELECT {_PACKAGE_COLUMNS} FROM packages
            WHERE code = $1 AND active AND superseded_at IS NULL""",
        code,
    )
    if row is None:
        raise UnknownPackageError(code)
    return _package(row)


async def package_versions(conn: asyncpg.Connection | asyncpg.Pool, code: str) -> list[Package]:
    """Every version of the package with this code, newest first (the current one first).

    Raises:
        UnknownPackageError: no package with that code, active or not.
    """
    rows = await conn.fetch(
        f"SELECT {_PACKAGE_COLUMNS} FROM packages WHERE code = $1 ORDER BY version DESC", code
    )
    if not rows:
        raise UnknownPackageError(code)
    return [_package(r) for r in rows]


async def create_package(conn: asyncpg.Connection, actor: Actor, spec: PackageSpec) -> Package:
    """Create a package (its version 1), audited (``package.create``), with a ``PACKAGES``
    event, in one transaction.

    Raises:
        DuplicatePackageError: the code exists (any version, active or not).
        asyncpg.CheckViolationError: a malformed code or currency, a price or base <= 0.
        OSError / asyncpg.PostgresError: Postgres unreachable (nothing is created).
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO packages (code, name, price_minor_units, currency,
                    base_millicredits, bonus_millicredits, total_millicredits, sort_order,
                    badge, tagline, stripe_price_id, active)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                ON CONFLICT (code, version) DO NOTHING
                RETURNING {_PACKAGE_COLUMNS}""",
            *_insert_values(spec),
        )
        if row is None:
            raise DuplicatePackageError(spec.code)
        package = _package(row)
        await record_audit(
            conn,
            actor,
            action="package.create",
            target_type="package",
            target_id=package.code,
            after=package_snapshot(package),
        )
        await notify_control(conn, ControlKind.PACKAGES)
    return package


async def edit_package(
    conn: asyncpg.Connection,
    actor: Actor,
    code: str,
    changes: Mapping[str, Any],
    *,
    action: str = "package.edit",
) -> Package:
    """Change the current version of a package; returns the current version afterwards.

    ``changes`` maps ``Package`` field names (``VERSIONED_FIELDS`` | ``COSMETIC_FIELDS``) to
    new values. When a versioned field gets a new value, the current version is superseded
    and a new one (``version + 1``) is inserted with every change applied; otherwise the
    cosmetic changes are made in place. Either way: one audit row (``action``; before and
    after are the current version) and a ``PACKAGES`` event, in one transaction. Edits of one
    code are serialized by a transaction-scoped advisory lock on the code.

    Raises:
        ValueError: a field that is not editable.
        UnknownPackageError: no package with that code.
        asyncpg.CheckViolationError: a price or base <= 0, a malformed currency.
        OSError / asyncpg.PostgresError: Postgres unreachable (nothing changes).
    """
    unknown = set(changes) - VERSIONED_FIELDS - COSMETIC_FIELDS
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('package:' || $1))", code)
        row = await conn.fetchrow(
            f"SELECT {_PACKAGE_COLUMNS} FROM packages WHERE code = $1 AND superseded_at IS NULL",
            code,
        )
        if row is None:
            raise UnknownPackageError(code)
        before = _package(row)
        if any(changes[f] != getattr(before, f) for f in VERSIONED_FIELDS & set(changes)):
            after = await _new_version(conn, before, changes)
        else:
            after = await _edit_in_place(conn, before, changes)
        await record_audit(
            conn,
            actor,
            action=action,
            target_type="package",
            target_id=code,
            before=package_snapshot(before),
            after=package_snapshot(after),
        )
        await notify_control(conn, ControlKind.PACKAGES)
    return after


async def _new_version(
    conn: asyncpg.Connection, current: Package, changes: Mapping[str, Any]
) -> Package:
    """Supersede ``current`` and insert its successor with ``changes`` applied."""
    values = {f.name: getattr(current, f.name) for f in fields(PackageSpec)} | dict(changes)
    spec = PackageSpec(**values)
    await conn.execute(
        "UPDATE packages SET superseded_at = now(), updated_at = now() WHERE id = $1",
        current.id,
    )
    row = await conn.fetchrow(
        f"""INSERT INTO packages (code, name, price_minor_units, currency,
                base_millicredits, bonus_millicredits, total_millicredits, sort_order,
                badge, tagline, stripe_price_id, active, version)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
            RETURNING {_PACKAGE_COLUMNS}""",
        *_insert_values(spec),
        current.version + 1,
    )
    return _package(row)


async def _edit_in_place(
    conn: asyncpg.Connection, current: Package, changes: Mapping[str, Any]
) -> Package:
    """Apply cosmetic ``changes`` to ``current`` (only ``COSMETIC_FIELDS`` reach here with
    new values; versioned fields equal to the current ones are dropped)."""
    cosmetic = {f: v for f, v in changes.items() if f in COSMETIC_FIELDS}
    # Column names come from COSMETIC_FIELDS, never from the caller's text.
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(cosmetic, start=2))
    row = await conn.fetchrow(
        f"""UPDATE packages SET {assignments + ", " if assignments else ""}updated_at = now()
            WHERE id = $1 RETURNING {_PACKAGE_COLUMNS}""",
        current.id,
        *cosmetic.values(),
    )
    return _package(row)


async def set_package_active(
    conn: asyncpg.Connection, actor: Actor, code: str, *, active: bool
) -> Package:
    """Activate or deactivate a package (in place: ``package.activate`` /
    ``package.deactivate``); an inactive package is not listed to buyers and cannot be
    bought. Raises as ``edit_package``."""
    action = "package.activate" if active else "package.deactivate"
    return await edit_package(conn, actor, code, {"active": active}, action=action)


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
