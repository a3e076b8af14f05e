"""Packages over HTTP: create, show with versions, edit (a new version or in place),
activate and deactivate; one audit row per mutation; refusals write nothing."""

from __future__ import annotations

from typing import Any

import pytest

from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi

TEAM = {
    "code": "team",
    "name": "Team",
    "priceMinorUnits": "19900",
    "baseCredits": "199000",
    "bonusCredits": "20000.5",
    "badge": "New",
    "tagline": "For teams that ship daily",
    "sortOrder": 25,
}


async def call(api: AdminApi, method: str, path: str, body: Any = None, **kwargs: Any):
    response, answer = await api.call(method, path, json=body, **kwargs)
    return response.status, answer


async def test_create_shows_the_package_with_money_fields_and_writes_one_audit_row(
    admin_api: AdminApi,
) -> None:
    before = await admin_api.audit_count()

    status, team = await call(admin_api, "POST", "/admin/v1/packages", TEAM)

    assert status == 201, team
    assert (team["code"], team["version"], team["currency"], team["active"]) == (
        "team",
        1,
        "usd",
        True,
    )
    assert (team["price"], team["priceMinorUnits"]) == ("199.00", "19900")
    assert (team["baseMillicredits"], team["bonusMillicredits"]) == ("199000000", "20000500")
    assert (team["totalMillicredits"], team["totalCredits"]) == ("219000500", 219_000.5)
    assert team["tagline"] == "For teams that ship daily"
    assert team["supersededAt"] is None
    assert [v["id"] for v in team["versions"]] == [team["id"]]
    assert await admin_api.audit_count() == before + 1

    status, again = await call(admin_api, "POST", "/admin/v1/packages", TEAM)
    assert status == 409, again
    assert await admin_api.audit_count() == before + 1


async def test_price_edit_is_a_new_version_cosmetic_edit_is_in_place(
    admin_api: AdminApi,
) -> None:
    _, v1 = await call(admin_api, "GET", "/admin/v1/packages/starter")
    before = await admin_api.audit_count()

    status, edited = await call(
        admin_api,
        "PATCH",
        "/admin/v1/packages/starter",
        {"priceMinorUnits": "1099", "baseCredits": "11000", "badge": "Popular"},
    )

    assert status == 200, edited
    assert (edited["version"], edited["price"], edited["totalMillicredits"]) == (
        2,
        "10.99",
        "11000000",
    )
    assert edited["badge"] == "Popular" and edited["id"] != v1["id"]
    assert [v["version"] for v in edited["versions"]] == [2, 1]
    assert edited["versions"][1]["priceMinorUnits"] == "999"
    assert edited["versions"][1]["supersededAt"] is not None

    status, renamed = await call(
        admin_api, "PATCH", "/admin/v1/packages/starter", {"name": "Starter+", "tagline": None}
    )
    assert status == 200, renamed
    assert (renamed["id"], renamed["version"], renamed["name"]) == (edited["id"], 2, "Starter+")
    assert await admin_api.audit_count() == before + 2

    _, listed = await call(admin_api, "GET", "/admin/v1/packages", role=Role.VIEWER)
    assert [(p["code"], p["version"]) for p in listed["data"]] == [
        ("starter", 2),
        ("professional", 1),
        ("enterprise", 1),
    ]
    _, everything = await call(
        admin_api, "GET", "/admin/v1/packages", params={"includeHistory": "true"}
    )
    assert [(p["code"], p["version"]) for p in everything["data"]][:2] == [
        ("starter", 2),
        ("starter", 1),
    ]


async def test_deactivate_and_activate(admin_api: AdminApi) -> None:
    before = await admin_api.audit_count()

    status, off = await call(admin_api, "POST", "/admin/v1/packages/enterprise/deactivate")
    assert status == 200 and off["active"] is False and off["version"] == 1
    _, listed = await call(admin_api, "GET", "/admin/v1/packages")
    assert "enterprise" in [p["code"] for p in listed["data"]]  # inactive ones too

    status, on = await call(admin_api, "POST", "/admin/v1/packages/enterprise/activate")
    assert status == 200 and on["active"] is True
    actions = await admin_api.pool.fetch("SELECT action FROM audit_log ORDER BY id DESC LIMIT 2")
    assert [r["action"] for r in actions] == ["package.activate", "package.deactivate"]
    assert await admin_api.audit_count() == before + 2


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("PATCH", "/admin/v1/packages/starter", {}, 400),
        ("PATCH", "/admin/v1/packages/starter", {"name": None}, 400),
        ("PATCH", "/admin/v1/packages/starter", {"priceMinorUnits": "9.99"}, 400),
        ("PATCH", "/admin/v1/packages/starter", {"priceMinorUnits": 999}, 400),
        ("PATCH", "/admin/v1/packages/starter", {"baseCredits": "0"}, 400),
        ("PATCH", "/admin/v1/packages/starter", {"currency": "jpy"}, 400),
        ("PATCH", "/admin/v1/packages/starter", {"code": "other"}, 400),
        ("PATCH", "/admin/v1/packages/platinum", {"name": "x"}, 404),
        ("POST", "/admin/v1/packages/platinum/deactivate", None, 404),
        ("GET", "/admin/v1/packages/platinum", None, 404),
        ("POST", "/admin/v1/packages", {**TEAM, "code": "Bad Code"}, 400),
        ("POST", "/admin/v1/packages", {**TEAM, "baseCredits": "1.2345"}, 400),
        ("POST", "/admin/v1/packages", {**TEAM, "stripePriceId": "prod_1"}, 400),
    ],
)
async def test_refusals_write_nothing(
    admin_api: AdminApi, method: str, path: str, body: Any, status: int
) -> None:
    before = await admin_api.audit_count()
    rows = await admin_api.pool.fetchval("SELECT count(*) FROM packages")

    answered, answer = await call(admin_api, method, path, body)

    assert answered == status, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert await admin_api.audit_count() == before
    assert await admin_api.pool.fetchval("SELECT count(*) FROM packages") == rows


async def test_operators_cannot_change_packages(admin_api: AdminApi) -> None:
    status, _ = await call(admin_api, "POST", "/admin/v1/packages", TEAM, role=Role.OPERATOR)
    assert status == 403
    status, _ = await call(
        admin_api, "POST", "/admin/v1/packages/starter/deactivate", role=Role.OPERATOR
    )
    assert status == 403
