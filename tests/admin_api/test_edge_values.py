"""Values at the edges of Postgres's and JSON's ranges get 400, never 500 (verify findings)."""

from __future__ import annotations

import pytest

from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi


@pytest.mark.parametrize(
    "path",
    [
        "/admin/v1/ledger?since=9999-12-31T23:59:59-01:00",
        "/admin/v1/usage?until=0001-01-01T00:00:00%2B01:00",
        "/admin/v1/audit-log?since=0001-01-01T00:00:00%2B01:00",
    ],
)
async def test_a_time_outside_the_range_is_400(admin_api: AdminApi, path: str) -> None:
    response, body = await admin_api.call("GET", path, role=Role.VIEWER)
    assert response.status == 400, body
    assert response.headers["x-request-id"]


async def test_a_token_expiry_in_year_one_is_400_and_nothing_stored(admin_api: AdminApi) -> None:
    response, body = await admin_api.call(
        "POST",
        "/admin/v1/tokens",
        json={"name": "t", "role": "viewer", "expiresAt": "0001-01-01T00:00:00Z"},
    )
    assert response.status == 400, body


async def test_a_flag_integer_beyond_its_maximum_is_400(admin_api: AdminApi) -> None:
    response, body = await admin_api.call(
        "PUT",
        "/admin/v1/flags/billing.low_balance_threshold_credits",
        json={"value": 99999999999999999999},
    )
    assert response.status == 400, body


async def test_a_viewer_lists_tokens_but_cannot_create_one(admin_api: AdminApi) -> None:
    listed, _ = await admin_api.call("GET", "/admin/v1/tokens", role=Role.VIEWER)
    created, _ = await admin_api.call(
        "POST", "/admin/v1/tokens", role=Role.VIEWER, json={"name": "x", "role": "admin"}
    )
    assert (listed.status, created.status) == (200, 403)
