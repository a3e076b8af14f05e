"""``GET /admin/v1/audit-log`` and the audit table's append-only guarantees."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi


async def test_audit_log_lists_newest_first_with_filters(admin_api: AdminApi):
    _, target = await admin_api.mint(Role.VIEWER, name="target")
    await admin_api.call("PATCH", f"/admin/v1/tokens/{target}", json={"name": "renamed"})
    await admin_api.call("POST", f"/admin/v1/tokens/{target}/revoke")
    me = (await admin_api.call("GET", "/admin/v1/me"))[1]

    response, page = await admin_api.call(
        "GET",
        "/admin/v1/audit-log",
        role=Role.VIEWER,
        params={"targetType": "admin_token", "targetId": str(target)},
    )
    assert response.status == 200
    actions = [entry["action"] for entry in page["data"]]
    assert actions == ["admin_token.revoke", "admin_token.update", "admin_token.create"]
    revoke = page["data"][0]
    assert revoke["actorTokenId"] == me["tokenId"]
    assert revoke["actorKind"] == "token"
    assert revoke["before"]["revoked_at"] is None
    assert revoke["after"]["revoked_at"] is not None

    by_actor = (
        await admin_api.call(
            "GET", "/admin/v1/audit-log", params={"actorTokenId": str(me["tokenId"])}
        )
    )[1]
    assert [entry["action"] for entry in by_actor["data"]] == actions[:2]
    by_action = (
        await admin_api.call("GET", "/admin/v1/audit-log", params={"action": "admin_token.update"})
    )[1]
    assert [entry["targetId"] for entry in by_action["data"]] == [str(target)]

    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    later = (await admin_api.call("GET", "/admin/v1/audit-log", params={"since": future}))[1]
    assert later == {"data": [], "nextCursor": None}
    earlier = (await admin_api.call("GET", "/admin/v1/audit-log", params={"until": future}))[1]
    assert len(earlier["data"]) == await admin_api.audit_count()


async def test_audit_log_cursor_pages_cover_every_row_once(admin_api: AdminApi):
    for index in range(4):
        await admin_api.mint(Role.VIEWER, name=f"t{index}")
    total = await admin_api.audit_count()
    ids: list[int] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await admin_api.call("GET", "/admin/v1/audit-log", params=params))[1]
        ids += [entry["id"] for entry in page["data"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == len(ids) == total


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET action = 'edited'", "DELETE FROM audit_log", "TRUNCATE audit_log"],
    ids=["update", "delete", "truncate"],
)
async def test_application_role_cannot_edit_the_audit_log(admin_api: AdminApi, statement):
    async with admin_api.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE creditgate_app")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET action = 'edited'", "DELETE FROM audit_log"],
    ids=["update", "delete"],
)
async def test_even_the_owner_cannot_edit_the_audit_log(admin_api: AdminApi, statement):
    assert await admin_api.audit_count() > 0
    with pytest.raises(asyncpg.PostgresError, match=r"append-only|audit_log"):
        await admin_api.pool.execute(statement)
    assert (
        await admin_api.pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'edited'") == 0
    )


async def test_application_role_can_append_and_read_audit_rows(admin_api: AdminApi):
    async with admin_api.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE creditgate_app")
            await conn.execute(
                "INSERT INTO audit_log (actor_kind, actor_name, action, target_type)"
                " VALUES ('cli', 'cli', 'test.append', 'test')"
            )
            assert await conn.fetchval("SELECT count(*) FROM audit_log") > 0
