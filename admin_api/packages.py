"""Packages over HTTP: list and show (viewer), create, edit, activate and deactivate (admin).

Price, currency, credits and Stripe price id are fixed per version: a PATCH that changes any
of them makes a new version (the old one is superseded; purchases keep the version they
bought). Name, badge, tag line, sort order and ``active`` change in place. Prices are given
in the currency's minor units as a string of digits (``"999"`` for $9.99, Stripe's
``unit_amount``: exact in every currency, no decimals to round); answers show ``price`` in
major units beside them. Credits are given as decimal strings of credits (``"9990"``, at
most three decimals) and answered as ``billing.units.money_fields``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, model_validator

from admin_api.framework import AdminContext, AdminModel, AdminRouter, Role
from admin_api.models import ShortText
from billing.purchases.packages import (
    Package,
    PackageSpec,
    create_package,
    edit_package,
    list_packages,
    minor_units_per_major,
    package_versions,
    set_package_active,
)
from billing.units import credits_to_millicredits, money_fields

router = AdminRouter(tag="packages")

PackageCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,39}$")]
#: A price in minor units: a positive integer that fits the column (int4).
MinorUnits = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,8}$")]
#: Credits as a decimal string, at most three decimals.
Credits = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}(\.[0-9]{1,3})?$")]
SortOrder = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
StripePriceId = Annotated[str, StringConstraints(pattern=r"^price_[A-Za-z0-9_]{1,200}$")]


def _supported(currency: str) -> str:
    minor_units_per_major(currency)  # ValueError: a currency we have no exponent for
    return currency


Currency = Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$"), AfterValidator(_supported)]


def _positive(credits: str) -> str:
    if credits_to_millicredits(credits) <= 0:
        raise ValueError("must be above 0")
    return credits


class PackageOut(AdminModel):
    """One version of a package."""

    id: int = Field(description="This version's id (purchases name it as packageId).")
    code: str
    version: int
    name: str
    badge: str | None
    tagline: str | None
    currency: str
    price: str = Field(description='In major units ("9.99").')
    price_minor_units: str = Field(description='In minor units ("999"), as Stripe\'s.')
    base_millicredits: str
    base_credits: float
    base_usd: float
    bonus_millicredits: str
    bonus_credits: float
    bonus_usd: float
    total_millicredits: str
    total_credits: float
    total_usd: float
    stripe_price_id: str | None
    active: bool
    sort_order: int
    created_at: datetime
    superseded_at: datetime | None = Field(description="null: the current version.")

    @classmethod
    def of(cls, package: Package) -> PackageOut:
        """The JSON form of a stored version."""
        values: dict[str, Any] = {
            "id": package.id,
            "code": package.code,
            "version": package.version,
            "name": package.name,
            "badge": package.badge,
            "tagline": package.tagline,
            "currency": package.currency,
            "price": str(package.price),
            "priceMinorUnits": str(package.price_minor_units),
            **money_fields("base", package.base_millicredits),
            **money_fields("bonus", package.bonus_millicredits),
            **money_fields("total", package.total_millicredits),
            "stripePriceId": package.stripe_price_id,
            "active": package.active,
            "sortOrder": package.sort_order,
            "createdAt": package.created_at,
            "supersededAt": package.superseded_at,
        }
        return cls.model_validate(values)


class PackageList(AdminModel):
    """Packages in display order (sort order, then code; a code's newest version first)."""

    data: list[PackageOut]


class PackageDetail(PackageOut):
    """The current version of a package, and every version (newest first)."""

    versions: list[PackageOut]


class PackageListQuery(AdminModel):
    """``?includeHistory=true`` adds superseded versions."""

    include_history: bool = False


class CodePath(AdminModel):
    """The path of one package."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"code": "starter"}]})

    code: PackageCode


class PackageCreate(AdminModel):
    """A new package (its version 1). ``total = base + bonus``, fixed."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "code": "team",
                    "name": "Team",
                    "priceMinorUnits": "19900",
                    "currency": "usd",
                    "baseCredits": "199000",
                    "bonusCredits": "20000",
                    "badge": "New",
                    "tagline": "For teams that ship daily",
                    "sortOrder": 25,
                }
            ]
        }
    )

    code: PackageCode
    name: Name
    price_minor_units: MinorUnits
    currency: Currency = "usd"
    base_credits: Annotated[Credits, AfterValidator(_positive)]
    bonus_credits: Credits = "0"
    badge: ShortText | None = None
    tagline: ShortText | None = None
    sort_order: SortOrder = 0
    stripe_price_id: StripePriceId | None = None
    active: bool = True

    def spec(self) -> PackageSpec:
        """The billing layer's spec (credits in millicredits, price an int)."""
        return PackageSpec(
            code=self.code,
            name=self.name,
            price_minor_units=int(self.price_minor_units),
            currency=self.currency,
            base_millicredits=credits_to_millicredits(self.base_credits),
            bonus_millicredits=credits_to_millicredits(self.bonus_credits),
            sort_order=self.sort_order,
            badge=self.badge,
            tagline=self.tagline,
            stripe_price_id=self.stripe_price_id,
            active=self.active,
        )


#: Fields a PATCH may not set to null (badge, tagline and stripePriceId may: null clears).
_NOT_NULL = (
    "name",
    "price_minor_units",
    "currency",
    "base_credits",
    "bonus_credits",
    "sort_order",
    "active",
)


class PackageEdit(AdminModel):
    """Changes to a package; absent fields stay. Changing ``priceMinorUnits``,
    ``currency``, ``baseCredits``, ``bonusCredits`` or ``stripePriceId`` makes a new version;
    the other fields change the current version in place."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"priceMinorUnits": "1099", "badge": "Popular"}]}
    )

    name: Name | None = None
    price_minor_units: MinorUnits | None = None
    currency: Currency | None = None
    base_credits: Annotated[Credits, AfterValidator(_positive)] | None = None
    bonus_credits: Credits | None = None
    badge: ShortText | None = None
    tagline: ShortText | None = None
    sort_order: SortOrder | None = None
    stripe_price_id: StripePriceId | None = None
    active: bool | None = None

    @model_validator(mode="after")
    def _something_non_null(self) -> PackageEdit:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give at least one field")
        nulls = [f for f in _NOT_NULL if f in self.model_fields_set and getattr(self, f) is None]
        if nulls:
            raise ValueError(f"cannot be null: {', '.join(nulls)}")
        return self

    def changes(self) -> dict[str, Any]:
        """The given fields as ``edit_package`` changes (``Package`` field names, units)."""
        changes = self.model_dump(exclude_unset=True)
        if "price_minor_units" in changes:
            changes["price_minor_units"] = int(changes["price_minor_units"])
        for credits in ("base", "bonus"):
            if f"{credits}_credits" in changes:
                text = changes.pop(f"{credits}_credits")
                changes[f"{credits}_millicredits"] = credits_to_millicredits(text)
        return changes


@router.get(
    "/admin/v1/packages",
    role=Role.VIEWER,
    query=PackageListQuery,
    response=PackageList,
    summary="Packages (current versions, active and inactive; ?includeHistory for all)",
)
async def list_all_packages(ctx: AdminContext) -> PackageList:
    """``GET /admin/v1/packages``."""
    packages = await list_packages(
        ctx.pool, include_inactive=True, include_history=ctx.query.include_history
    )
    return PackageList(data=[PackageOut.of(p) for p in packages])


@router.get(
    "/admin/v1/packages/{code}",
    role=Role.VIEWER,
    params=CodePath,
    response=PackageDetail,
    summary="A package's current version and every version",
)
async def show_package(ctx: AdminContext) -> PackageDetail:
    """``GET /admin/v1/packages/{code}``; 404 for an unknown code."""
    return _detail(await package_versions(ctx.pool, ctx.params.code))


@router.post(
    "/admin/v1/packages",
    role=Role.ADMIN,
    body=PackageCreate,
    response=PackageDetail,
    status=201,
    summary="Create a package",
)
async def create_new_package(ctx: AdminContext) -> PackageDetail:
    """``POST /admin/v1/packages``: 409 when the code exists (any version)."""
    async with ctx.pool.acquire() as conn:
        package = await create_package(conn, ctx.actor, ctx.body.spec())
    return _detail([package])


@router.patch(
    "/admin/v1/packages/{code}",
    role=Role.ADMIN,
    params=CodePath,
    body=PackageEdit,
    response=PackageDetail,
    summary="Edit a package (price, currency, credits or Stripe price: a new version)",
)
async def edit_existing_package(ctx: AdminContext) -> PackageDetail:
    """``PATCH /admin/v1/packages/{code}``."""
    code = ctx.params.code
    async with ctx.pool.acquire() as conn:
        await edit_package(conn, ctx.actor, code, ctx.body.changes())
        return _detail(await package_versions(conn, code))


@router.post(
    "/admin/v1/packages/{code}/activate",
    role=Role.ADMIN,
    params=CodePath,
    response=PackageDetail,
    summary="Offer a package to buyers again",
)
async def activate_package(ctx: AdminContext) -> PackageDetail:
    """``POST /admin/v1/packages/{code}/activate``."""
    return await _set_active(ctx, active=True)


@router.post(
    "/admin/v1/packages/{code}/deactivate",
    role=Role.ADMIN,
    params=CodePath,
    response=PackageDetail,
    summary="Stop offering a package (it can no longer be bought)",
)
async def deactivate_package(ctx: AdminContext) -> PackageDetail:
    """``POST /admin/v1/packages/{code}/deactivate``."""
    return await _set_active(ctx, active=False)


async def _set_active(ctx: AdminContext, *, active: bool) -> PackageDetail:
    code = ctx.params.code
    async with ctx.pool.acquire() as conn:
        await set_package_active(conn, ctx.actor, code, active=active)
        return _detail(await package_versions(conn, code))


def _detail(versions: list[Package]) -> PackageDetail:
    """The current version (the first) with every version beside it."""
    current = PackageOut.of(versions[0])
    return PackageDetail.model_validate(
        {**current.model_dump(by_alias=True), "versions": [PackageOut.of(v) for v in versions]}
    )
