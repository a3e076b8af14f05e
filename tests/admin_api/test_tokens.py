"""Admin tokens over HTTP: created and shown once, stored as digests, listed, renamed,
expired, revoked; each mutation with exactly one audit row."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi


async def test_create_token_shown_once_stored_as_digest_and_usable(admin_api: AdminApi):
    before = await admin_api.audit_count()
    response, created = await admin_api.call(
        "POST", "/admin/v1/tokens", json={"name": "deploys", "role": "viewer"}
    )
    assert response.status == 201
    token = created["token"]
    assert token.startswith("cg_admin_") and len(token) == len("cg_admin_") + 43
    assert created["tokenPrefix"] == token[:13]
    assert (created["name"], created["role"], created["revokedAt"]) == ("deploys", "viewer", None)
    row = await admin_api.pool.fetchrow("SELECT * FROM admin_tokens WHERE id = $1", created["id"])
    assert bytes(row["token_digest"]) == hashlib.sha256(token.encode()).digest()
    assert token not in " ".join(str(value) for value in row.values())
    assert row["created_by_token_id"] is not None
    assert await admin_api.audit_count() == before + 1

    response, me = await admin_api.call("GET", "/admin/v1/me", token=token)
    assert (response.status, me["tokenId"], me["role"]) == (200, created["id"], "viewer")

    response, listed = await admin_api.call("GET", "/admin/v1/tokens")
    assert all("token" not in item for item in listed["data"])


async def test_create_token_expiry_in_the_past_is_422_and_writes_nothing(admin_api: AdminApi):
    before = await admin_api.audit_count()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    response, body = await admin_api.call(
        "POST", "/admin/v1/tokens", json={"role": "admin", "expiresAt": past}
    )
    assert response.status == 422
    assert body["error"]["param"] == "expiresAt"
    assert await admin_api.audit_count() == before


async def test_list_tokens_pages_newest_first(admin_api: AdminApi):
    for index in range(5):
        await admin_api.mint(Role.VIEWER, name=f"page-{index}")
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        response, page = await admin_api.call("GET", "/admin/v1/tokens", params=params)
        assert response.status == 200
        assert len(page["data"]) <= 3
        seen += [item["id"] for item in page["data"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen)) == 8  # 3 fixture tokens + 5


async def test_patch_token_renames_and_sets_expiry_with_one_audit_row(admin_api: AdminApi):
    _, token_id = await admin_api.mint(Role.OPERATOR, name="old")
    before = await admin_api.audit_count()
    expiry = datetime.now(UTC) + timedelta(days=3)
    response, body = await admin_api.call(
        "PATCH",
        f"/admin/v1/tokens/{token_id}",
        json={"name": "new", "expiresAt": expiry.isoformat()},
    )
    assert response.status == 200
    assert body["name"] == "new"
    assert datetime.fromisoformat(body["expiresAt"]) == expiry
    row = await admin_api.pool.fetchrow(
        "SELECT * FROM audit_log WHERE id = (SELECT max(id) FROM audit_log)"
    )
    assert row["action"] == "admin_token.update"
    assert row["target_id"] == str(token_id)
    assert await admin_api.audit_count() == before + 1

    response, body = await admin_api.call(
        "PATCH", f"/admin/v1/tokens/{token_id}", json={"expiresAt": None}
    )
    assert (response.status, body["expiresAt"], body["name"]) == (200, None, "new")


async def test_revoke_token_refuses_it_then_conflicts_on_second_revoke(admin_api: AdminApi):
    token, token_id = await admin_api.mint(Role.ADMIN)
    response, body = await admin_api.call("POST", f"/admin/v1/tokens/{token_id}/revoke")
    assert response.status == 200
    assert body["revokedAt"] is not None
    response, _ = await admin_api.call("GET", "/admin/v1/me", token=token)
    assert response.status == 401
    before = await admin_api.audit_count()
    response, body = await admin_api.call("POST", f"/admin/v1/tokens/{token_id}/revoke")
    assert response.status == 409
    response, body = await admin_api.call(
        "PATCH", f"/admin/v1/tokens/{token_id}", json={"name": "x"}
    )
    assert response.status == 409
    assert await admin_api.audit_count() == before


async def test_unknown_token_id_is_404(admin_api: AdminApi):
    response, body = await admin_api.call("POST", "/admin/v1/tokens/987654/revoke")
    assert response.status == 404
    assert body["error"]["code"] == "not_found"
