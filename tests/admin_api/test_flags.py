"""``/admin/v1/flags``: list (viewer), set and reset (admin); one audit row per change, 400 on a
bad value, 404 on an unknown flag; the admin service's own listener has the change."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from billing.admin_tokens import Role
from billing.live_flags import DEFINITIONS
from runtime import appkeys
from tests.admin_api.conftest import AdminApi

ROLLOUT = "/admin/v1/flags/billing.charging_rollout_percent"


async def _audit_rows(api: AdminApi) -> list[dict]:
    rows = await api.pool.fetch(
        "SELECT action, target_type, target_id, actor_name, before, after, request_id "
        "FROM audit_log WHERE target_type = 'flag' ORDER BY id"
    )
    return [dict(row) for row in rows]


async def test_list_flags_shows_every_flag_from_the_environment(admin_api: AdminApi):
    response, body = await admin_api.call("GET", "/admin/v1/flags", role=Role.VIEWER)
    assert response.status == 200
    flags = {flag["name"]: flag for flag in body["data"]}
    assert list(flags) == [d.name for d in DEFINITIONS]
    rollout = flags["billing.charging_rollout_percent"]
    assert rollout["value"] == rollout["initialValue"] == 100
    assert (rollout["source"], rollout["updatedAt"], rollout["updatedBy"]) == (
        "environment",
        None,
        None,
    )
    assert rollout["env"] == "CHARGING_ROLLOUT_PERCENT"
    assert rollout["valueSchema"] == {"type": "integer", "minimum": 0, "maximum": 100}
    assert rollout["description"]


async def test_set_flag_overrides_audits_once_and_reaches_the_listener(admin_api: AdminApi):
    response, body = await admin_api.call("PUT", ROLLOUT, json={"value": 25})
    assert response.status == 200
    assert (body["value"], body["initialValue"], body["source"]) == (25, 100, "database")
    assert body["updatedBy"] == "test-admin"
    [row] = await _audit_rows(admin_api)
    assert (row["action"], row["target_id"], row["actor_name"]) == (
        "flag.set",
        "billing.charging_rollout_percent",
        "test-admin",
    )
    assert orjson.loads(row["before"]) == {"value": 100, "source": "environment"}
    assert orjson.loads(row["after"]) == {"value": 25, "source": "database"}
    assert row["request_id"] == response.headers["x-request-id"]

    listener = admin_api.client.app[appkeys.CONTROL]
    for _ in range(100):  # the admin service's own listener: within 2 s
        if listener.flags.charging_rollout_percent == 25:
            break
        await asyncio.sleep(0.02)
    assert listener.flags.charging_rollout_percent == 25

    _, listed = await admin_api.call("GET", "/admin/v1/flags", role=Role.VIEWER)
    [rollout] = [f for f in listed["data"] if f["name"] == "billing.charging_rollout_percent"]
    assert (rollout["value"], rollout["source"]) == (25, "database")


async def test_reset_flag_back_to_the_initial_value_audited(admin_api: AdminApi):
    await admin_api.call("PUT", ROLLOUT, json={"value": 5})
    response, body = await admin_api.call("DELETE", ROLLOUT)
    assert response.status == 200
    assert (body["value"], body["source"], body["updatedAt"]) == (100, "environment", None)
    assert await admin_api.pool.fetchval("SELECT count(*) FROM flags") == 0
    rows = await _audit_rows(admin_api)
    assert [r["action"] for r in rows] == ["flag.set", "flag.reset"]
    assert orjson.loads(rows[1]["before"]) == {"value": 5, "source": "database"}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (ROLLOUT, 101),
        (ROLLOUT, "25"),
        ("/admin/v1/flags/billing.charging_enabled", "no"),
        ("/admin/v1/flags/billing.charging_paused_mode", "stop"),
        ("/admin/v1/flags/billing.model_allowlist", ["gpt-4o", "bad\x00name"]),
        ("/admin/v1/flags/billing.model_allowlist", None),
    ],
)
async def test_set_flag_bad_value_is_400_with_details_and_changes_nothing(
    admin_api: AdminApi, path: str, value: object
):
    response, body = await admin_api.call("PUT", path, json={"value": value})
    assert response.status == 400
    error = body["error"]
    assert (error["code"], error["param"]) == ("invalid_flag_value", "value")
    assert error["details"][0]["field"] == "value"
    assert error["details"][0]["message"].startswith("must be")
    assert await admin_api.pool.fetchval("SELECT count(*) FROM flags") == 0
    assert await _audit_rows(admin_api) == []


async def test_set_flag_without_a_value_is_400(admin_api: AdminApi):
    response, body = await admin_api.call("PUT", ROLLOUT, json={})
    assert response.status == 400
    assert body["error"]["details"][0]["field"] == "value"


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_unknown_flag_is_404(admin_api: AdminApi, method: str):
    response, body = await admin_api.call(
        method, "/admin/v1/flags/billing.nope", json={"value": True} if method == "PUT" else None
    )
    assert response.status == 404
    assert body["error"]["code"] == "not_found"
    assert await _audit_rows(admin_api) == []


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR])
async def test_changing_a_flag_needs_the_admin_role(admin_api: AdminApi, role: Role):
    response, _ = await admin_api.call("PUT", ROLLOUT, role=role, json={"value": 5})
    assert response.status == 403
    response, _ = await admin_api.call("DELETE", ROLLOUT, role=role)
    assert response.status == 403
    assert await _audit_rows(admin_api) == []
