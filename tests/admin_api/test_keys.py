"""API keys over the admin API: issue (shown once), list, show, change, revoke; one audit
row and a control event per change; and through a running gateway with the official SDK, a
revoked key and a suspended account are refused within 5 s whatever the auth cache."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai

from billing import api_keys
from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi

REFUSAL_DEADLINE_S = 5.0


async def _account(admin_api: AdminApi, credits: str = "0") -> int:
    _, body = await admin_api.call(
        "POST", "/admin/v1/accounts", json={"email": "ann@example.com", "startingCredits": credits}
    )
    return int(body["id"])


async def _key_audits(admin_api: AdminApi) -> list[str]:
    rows = await admin_api.pool.fetch(
        "SELECT action FROM audit_log WHERE target_type = 'api_key' ORDER BY id"
    )
    return [row["action"] for row in rows]


async def test_issue_key_shows_it_once_and_it_authenticates(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    response, created = await admin_api.call(
        "POST",
        f"/admin/v1/accounts/{account_id}/keys",
        role=Role.OPERATOR,
        json={
            "name": "prod",
            "expiresAt": "2099-01-01T00:00:00Z",
            "dailySpendCapCredits": "5",
            "monthlySpendCapCredits": "100",
            "maxRequestCredits": "0.5",
            "allowedModels": ["gpt-4o-mini"],
            "requestsPerMinute": 60,
        },
    )
    assert response.status == 201, created
    assert created["key"].startswith("cg_live_") and created["keyPrefix"] == created["key"][:12]
    assert created["dailySpendCapMillicredits"] == "5000"
    assert created["maxRequestMillicredits"] == "500"
    assert (created["requestsPerMinute"], created["allowedModels"]) == (60, ["gpt-4o-mini"])
    assert created["lastUsedAt"] is None
    found = await api_keys.find_active_key(admin_api.pool, created["key"])
    assert found is not None
    _, shown = await admin_api.call("GET", f"/admin/v1/keys/{created['id']}", role=Role.VIEWER)
    assert "key" not in shown and shown["name"] == "prod"
    _, listed = await admin_api.call("GET", f"/admin/v1/accounts/{account_id}/keys")
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert await _key_audits(admin_api) == ["key.create"]


async def test_key_last_used_is_its_newest_usage_event(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    _, created = await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", json={"name": "k"}
    )
    for finished in ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"):
        await admin_api.pool.execute(
            """INSERT INTO usage_events (request_id, account_id, api_key_id, model, endpoint,
                   input_millicredits_per_1k_tokens, cached_input_millicredits_per_1k_tokens,
                   output_millicredits_per_1k_tokens, rounding_mode, cost_millicredits,
                   charged_millicredits, usage_source, status, started_at, finished_at)
               VALUES ($1, $2, $3, 'gpt-4o-mini', '/v1/chat/completions', 1, 1, 1, 'exact',
                       0, 0, 'upstream', 'completed', $4::text::timestamptz,
                       $4::text::timestamptz)""",
            f"req-{finished}",
            account_id,
            created["id"],
            finished,
        )
    _, shown = await admin_api.call("GET", f"/admin/v1/keys/{created['id']}")
    assert shown["lastUsedAt"].startswith("2026-02-01T00:00:00")


async def test_patch_key_changes_only_given_fields(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    _, created = await admin_api.call(
        "POST",
        f"/admin/v1/accounts/{account_id}/keys",
        json={"name": "a", "requestsPerMinute": 10, "maxRequestCredits": "1"},
    )
    response, changed = await admin_api.call(
        "PATCH",
        f"/admin/v1/keys/{created['id']}",
        role=Role.OPERATOR,
        json={"name": "b", "requestsPerMinute": None, "expiresAt": "2099-01-01T00:00:00Z"},
    )
    assert response.status == 200, changed
    assert (changed["name"], changed["requestsPerMinute"]) == ("b", None)
    assert changed["expiresAt"].startswith("2099-01-01")
    assert changed["maxRequestMillicredits"] == "1000"  # absent: unchanged
    assert await _key_audits(admin_api) == ["key.create", "key.update"]


async def test_revoke_key_refuses_it_and_audits(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    _, created = await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", json={"name": "a"}
    )
    response, revoked = await admin_api.call(
        "POST", f"/admin/v1/keys/{created['id']}/revoke", role=Role.OPERATOR
    )
    assert response.status == 200 and revoked["revokedAt"] is not None
    assert await api_keys.find_active_key(admin_api.pool, created["key"]) is None
    assert await _key_audits(admin_api) == ["key.create", "key.revoke"]


async def test_unknown_key_404_and_viewer_cannot_change_keys(admin_api: AdminApi) -> None:
    for method, path in (
        ("GET", "/admin/v1/keys/999"),
        ("PATCH", "/admin/v1/keys/999"),
        ("POST", "/admin/v1/keys/999/revoke"),
    ):
        response, body = await admin_api.call(
            method, path, json={"name": "x"} if method == "PATCH" else None
        )
        assert response.status == 404, (path, body)
    account_id = await _account(admin_api)
    response, _ = await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", role=Role.VIEWER, json={}
    )
    assert response.status == 403
    assert await _key_audits(admin_api) == []


async def _refused_within(
    call: Callable[[], Awaitable[Any]], error: type[openai.APIStatusError]
) -> openai.APIStatusError:
    """Call until the gateway refuses with ``error``; fail after ``REFUSAL_DEADLINE_S``."""
    deadline = asyncio.get_running_loop().time() + REFUSAL_DEADLINE_S
    while True:
        try:
            await call()
        except error as exc:
            return exc
        assert asyncio.get_running_loop().time() < deadline, "still served after 5 s"
        await asyncio.sleep(0.1)


def _chat(client: openai.AsyncOpenAI) -> Callable[[], Awaitable[Any]]:
    return lambda: client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


async def test_revoked_key_refused_by_a_running_gateway_within_5s(
    admin_api: AdminApi, make_gateway: Any
) -> None:
    """Needs the control listener (branch ``flags``): the gateway caches keys for 60 s here,
    so only the KEYS control event can drop the revoked one in time."""
    gw = await make_gateway(auth_cache_ttl_s=60.0)
    account_id = await _account(admin_api, "100")
    _, created = await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", json={"name": "sdk"}
    )
    client = gw.client(created["key"])
    await _chat(client)()  # served, and now in the gateway's auth cache
    await admin_api.call("POST", f"/admin/v1/keys/{created['id']}/revoke")
    refusal = await _refused_within(_chat(client), openai.AuthenticationError)
    assert refusal.status_code == 401


async def test_suspended_account_refused_403_by_a_running_gateway_within_5s(
    admin_api: AdminApi, make_gateway: Any
) -> None:
    """Needs the gateway side of suspension (branch ``caps``: 403 ``account_deactivated``)
    and the control listener (branch ``flags``) to drop the 60 s auth cache; reactivating
    serves the key again."""
    gw = await make_gateway(auth_cache_ttl_s=60.0)
    account_id = await _account(admin_api, "100")
    _, created = await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", json={"name": "sdk"}
    )
    client = gw.client(created["key"])
    await _chat(client)()
    await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/suspend", json={"reason": "review"}
    )
    status = await admin_api.pool.fetchval("SELECT status FROM accounts WHERE id = $1", account_id)
    assert status == "suspended"
    refusal = await _refused_within(_chat(client), openai.PermissionDeniedError)
    assert refusal.status_code == 403
    assert refusal.code == "account_deactivated"
