"""``POST /admin/v1/accounts/{id}/portal-sessions``: operators make a single-use sign-in link
for an account; one audit row; the link opens a session on the gateway."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import DummyCookieJar

from admin_api.openapi import OPENAPI_PATH
from billing import ledger
from billing.admin_tokens import Role
from gateway.app import create_app
from gateway.billing_session_store import COOKIE_NAME
from runtime import appkeys
from tests.admin_api.conftest import AdminApi, admin_settings


async def _account(admin_api: AdminApi) -> int:
    async with admin_api.pool.acquire() as conn:
        return await ledger.create_account(conn, "portal@example.com")


def _path(account_id: int) -> str:
    return f"/admin/v1/accounts/{account_id}/portal-sessions"


async def test_operator_makes_a_link_with_one_audit_row(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    before = await admin_api.audit_count()

    response, body = await admin_api.call(
        "POST", _path(account_id), role=Role.OPERATOR, json={"returnTo": "/credits?tab=usage"}
    )

    assert response.status == 201, body
    assert body["object"] == "billing_portal.session"
    assert body["url"].startswith("http://gateway.test/credits/portal/")
    assert body["returnTo"] == "/credits?tab=usage"
    assert body["expiresAt"]
    assert await admin_api.audit_count() == before + 1
    row = await admin_api.pool.fetchrow("SELECT * FROM audit_log ORDER BY id DESC LIMIT 1")
    assert (row["action"], row["target_type"], row["target_id"]) == (
        "portal_session.create",
        "account",
        str(account_id),
    )
    token = body["url"].rsplit("/", 1)[1]
    assert token not in str(dict(row))


async def test_viewer_cannot_make_a_link(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)

    response, body = await admin_api.call("POST", _path(account_id), role=Role.VIEWER, json={})

    assert response.status == 403
    assert body["error"]["code"] == "insufficient_role"
    redis = admin_api.client.app[appkeys.REDIS]
    assert [k async for k in redis.scan_iter("cg:v1:portal_link:*")] == []


async def test_link_for_an_unknown_account_is_404_without_audit(admin_api: AdminApi) -> None:
    before = await admin_api.audit_count()

    response, _ = await admin_api.call("POST", _path(987_654), role=Role.OPERATOR, json={})

    assert response.status == 404
    assert await admin_api.audit_count() == before


@pytest.mark.parametrize("return_to", ["https://evil.example/", "//evil.example", "credits"])
async def test_link_refuses_open_redirects(admin_api: AdminApi, return_to: str) -> None:
    account_id = await _account(admin_api)
    before = await admin_api.audit_count()

    response, body = await admin_api.call(
        "POST", _path(account_id), role=Role.OPERATOR, json={"returnTo": return_to}
    )

    assert response.status == 400
    assert body["error"]["param"] == "returnTo"
    assert await admin_api.audit_count() == before


async def test_route_is_in_the_openapi_document(admin_api: AdminApi) -> None:
    document = await (await admin_api.client.get(OPENAPI_PATH)).json()

    operation = document["paths"]["/admin/v1/accounts/{id}/portal-sessions"]["post"]

    assert "201" in operation["responses"]


async def test_admin_link_opens_a_portal_session_on_the_gateway(
    admin_api: AdminApi, database_url: str, redis_url: str, aiohttp_client: Any
) -> None:
    account_id = await _account(admin_api)
    _, link = await admin_api.call("POST", _path(account_id), role=Role.OPERATOR, json={})
    gateway = await aiohttp_client(
        create_app(admin_settings(database_url, redis_url)), cookie_jar=DummyCookieJar()
    )

    shown = await gateway.get(urlsplit(link["url"]).path, allow_redirects=False)
    opened = await gateway.post(urlsplit(link["url"]).path, allow_redirects=False)
    cookie = opened.cookies[COOKIE_NAME].value
    session = await gateway.get(
        "/api/billing/session", headers={"Cookie": f"{COOKIE_NAME}={cookie}"}
    )
    again = await gateway.post(urlsplit(link["url"]).path, allow_redirects=False)

    assert shown.status == 200
    assert "Set-Cookie" not in shown.headers
    assert opened.status == 303
    assert opened.headers["Location"] == "/credits"
    assert session.status == 200
    body = await session.json()
    assert (body["accountId"], body["via"]) == (str(account_id), "portal")
    assert again.status == 410
