"""Accounts over the admin API: create, search, show, suspend, reactivate, spend controls,
forgive a shortfall; one audit row per change, 404 for an unknown account."""

from __future__ import annotations

import pytest

from billing import ledger
from billing.admin_tokens import Role
from billing.ledger import PostingRule
from runtime import appkeys
from tests.admin_api.conftest import AdminApi


async def _create(admin_api: AdminApi, email: str, **fields: object) -> dict:
    response, body = await admin_api.call(
        "POST", "/admin/v1/accounts", role=Role.OPERATOR, json={"email": email, **fields}
    )
    assert response.status == 201, body
    return body


async def _audit(admin_api: AdminApi, action: str) -> list:
    return await admin_api.pool.fetch(
        "SELECT * FROM audit_log WHERE action = $1 ORDER BY id", action
    )


async def test_create_account_with_starting_credits_grants_them(admin_api: AdminApi) -> None:
    body = await _create(admin_api, "ann@example.com", externalId="crm-1", startingCredits="12.5")
    assert body["balanceMillicredits"] == "12500"
    assert body["balanceCredits"] == 12.5
    assert (body["status"], body["externalId"]) == ("active", "crm-1")
    assert body["dailySpendCapMillicredits"] is None and body["allowedModels"] is None
    [row] = await _audit(admin_api, "account.create")
    assert row["target_id"] == str(body["id"]) and row["actor_name"] == "test-operator"
    entries = await ledger.list_ledger_entries(admin_api.pool, account_id=body["id"])
    assert [e.amount_millicredits for e in entries] == [12_500]


async def test_create_account_duplicate_email_or_external_id_409(admin_api: AdminApi) -> None:
    await _create(admin_api, "ann@example.com", externalId="crm-1")
    for fields in (
        {"email": "ann@example.com"},
        {"email": "bob@example.com", "externalId": "crm-1"},
    ):
        response, body = await admin_api.call("POST", "/admin/v1/accounts", json=fields)
        assert response.status == 409, body
    assert len(await _audit(admin_api, "account.create")) == 1


async def test_create_account_as_viewer_403_and_bad_body_400(admin_api: AdminApi) -> None:
    response, _ = await admin_api.call(
        "POST", "/admin/v1/accounts", role=Role.VIEWER, json={"email": "a@example.com"}
    )
    assert response.status == 403
    response, body = await admin_api.call(
        "POST", "/admin/v1/accounts", json={"email": "no-at-sign", "startingCredits": "1.2345"}
    )
    assert response.status == 400
    assert {d["field"] for d in body["error"]["details"]} == {"email", "startingCredits"}


async def test_search_accounts_by_email_prefix_id_external_id_with_cursor(
    admin_api: AdminApi,
) -> None:
    made = [await _create(admin_api, f"user{n}@Example.com", externalId=f"x{n}") for n in range(3)]
    await _create(admin_api, "other@example.com")
    response, page = await admin_api.call(
        "GET", "/admin/v1/accounts", role=Role.VIEWER, params={"email": "USER", "limit": "2"}
    )
    assert response.status == 200
    assert [a["id"] for a in page["data"]] == [made[2]["id"], made[1]["id"]]
    _, rest = await admin_api.call(
        "GET", "/admin/v1/accounts", params={"email": "user", "cursor": page["nextCursor"]}
    )
    assert [a["id"] for a in rest["data"]] == [made[0]["id"]] and rest["nextCursor"] is None
    _, by_external = await admin_api.call("GET", "/admin/v1/accounts", params={"externalId": "x1"})
    _, by_id = await admin_api.call("GET", "/admin/v1/accounts", params={"id": str(made[1]["id"])})
    assert [a["id"] for a in by_external["data"]] == [a["id"] for a in by_id["data"]]
    assert by_id["data"][0]["email"] == "user1@Example.com"


async def test_show_account_has_balances_keys_and_recent_activity(admin_api: AdminApi) -> None:
    account = await _create(admin_api, "ann@example.com", startingCredits="10")
    await admin_api.call("POST", f"/admin/v1/accounts/{account['id']}/keys", json={"name": "prod"})
    response, body = await admin_api.call(
        "GET", f"/admin/v1/accounts/{account['id']}", role=Role.VIEWER
    )
    assert response.status == 200, body
    assert body["balanceMillicredits"] == "10000"
    assert (body["heldMillicredits"], body["pendingSettlementMillicredits"]) == ("0", "0")
    assert body["availableMillicredits"] == "10000" and body["shortfallMillicredits"] == "0"
    assert [k["name"] for k in body["keys"]] == ["prod"] and "key" not in body["keys"][0]
    assert [e["amountMillicredits"] for e in body["recentLedgerEntries"]] == ["10000"]
    assert body["recentUsage"] == []


@pytest.mark.parametrize(
    ("method", "path", "json"),
    [
        ("GET", "/admin/v1/accounts/999", None),
        ("POST", "/admin/v1/accounts/999/suspend", {"reason": "x"}),
        ("POST", "/admin/v1/accounts/999/reactivate", None),
        ("PATCH", "/admin/v1/accounts/999", {"maxRequestCredits": "1"}),
        ("POST", "/admin/v1/accounts/999/forgive-shortfall", {"reason": "x"}),
        ("GET", "/admin/v1/accounts/999/keys", None),
        ("POST", "/admin/v1/accounts/999/keys", {"name": "k"}),
    ],
)
async def test_unknown_account_404_and_no_audit_row(
    admin_api: AdminApi, method: str, path: str, json: object
) -> None:
    response, body = await admin_api.call(method, path, json=json)
    assert response.status == 404, body
    assert body["error"]["code"] == "not_found"
    assert await admin_api.audit_count() == len(Role)  # the fixture's tokens only


async def test_suspend_and_reactivate_audit_and_notify(admin_api: AdminApi) -> None:
    account = await _create(admin_api, "ann@example.com")
    listener = await admin_api.pool.acquire()
    events: list[str] = []

    def heard(*args: object) -> None:
        events.append(str(args[3]))

    await listener.add_listener("creditgate_control", heard)
    try:
        response, suspended = await admin_api.call(
            "POST", f"/admin/v1/accounts/{account['id']}/suspend", json={"reason": "fraud check"}
        )
        assert response.status == 200, suspended
        assert (suspended["status"], suspended["suspensionReason"]) == ("suspended", "fraud check")
        assert suspended["suspendedAt"] is not None
        _, active = await admin_api.call("POST", f"/admin/v1/accounts/{account['id']}/reactivate")
        assert (active["status"], active["suspendedAt"]) == ("active", None)
        await listener.execute("SELECT 1")  # notifications arrive with the next round trip
    finally:
        await listener.remove_listener("creditgate_control", heard)
        await admin_api.pool.release(listener)
    [suspend] = await _audit(admin_api, "account.suspend")
    [reactivate] = await _audit(admin_api, "account.reactivate")
    assert suspend["target_id"] == reactivate["target_id"] == str(account["id"])
    assert '"kind":"accounts"' in events[0] and len(events) == 2


async def test_patch_account_sets_and_clears_spend_controls(admin_api: AdminApi) -> None:
    account = await _create(admin_api, "ann@example.com")
    path = f"/admin/v1/accounts/{account['id']}"
    response, body = await admin_api.call(
        "PATCH",
        path,
        json={
            "dailySpendCapCredits": "50",
            "monthlySpendCapCredits": "1000.5",
            "maxRequestCredits": "2",
            "allowedModels": ["gpt-4o-mini"],
            "externalId": "crm-9",
        },
    )
    assert response.status == 200, body
    assert body["dailySpendCapMillicredits"] == "50000"
    assert body["monthlySpendCapMillicredits"] == "1000500"
    assert body["maxRequestMillicredits"] == "2000"
    assert (body["allowedModels"], body["externalId"]) == (["gpt-4o-mini"], "crm-9")
    _, cleared = await admin_api.call("PATCH", path, json={"dailySpendCapCredits": None})
    assert cleared["dailySpendCapMillicredits"] is None
    assert cleared["monthlySpendCapMillicredits"] == "1000500"  # absent: unchanged
    row = await admin_api.pool.fetchrow(
        "SELECT daily_spend_cap_millicredits, allowed_models FROM accounts WHERE id = $1",
        account["id"],
    )
    assert (row[0], row[1]) == (None, ["gpt-4o-mini"])
    assert len(await _audit(admin_api, "account.update")) == 2


async def test_patch_account_external_id_of_another_account_409(admin_api: AdminApi) -> None:
    await _create(admin_api, "ann@example.com", externalId="taken")
    other = await _create(admin_api, "bob@example.com")
    response, _ = await admin_api.call(
        "PATCH", f"/admin/v1/accounts/{other['id']}", json={"externalId": "taken"}
    )
    assert response.status == 409
    assert await _audit(admin_api, "account.update") == []


async def test_forgive_shortfall_clears_it_in_postgres_and_redis(admin_api: AdminApi) -> None:
    account = await _create(admin_api, "ann@example.com", startingCredits="2")
    async with admin_api.pool.acquire() as conn:
        await ledger.post_entry(
            conn,
            account_id=account["id"],
            entry_type="reversal",
            amount_millicredits=-5_000,
            idempotency_key="refund-1",
            rule=PostingRule.OWE,
        )
    path = f"/admin/v1/accounts/{account['id']}/forgive-shortfall"
    response, body = await admin_api.call("POST", path, json={"reason": "goodwill"})
    assert response.status == 200, body
    assert body["forgivenMillicredits"] == "3000"
    assert body["account"]["shortfallMillicredits"] == "0"
    assert [e["amountMillicredits"] for e in body["entries"]] == ["3000", "-3000"]
    posted = await ledger.posted_balance(admin_api.pool, account["id"])
    assert (posted.balance_millicredits, posted.shortfall_millicredits) == (0, 0)
    _, shown = await admin_api.call("GET", f"/admin/v1/accounts/{account['id']}")
    assert shown["shortfallMillicredits"] == "0"
    state = await admin_api.client.app[appkeys.HOLDS].account_state(account["id"])
    assert (state.shortfall_millicredits, state.version) == (0, posted.version)
    response, again = await admin_api.call("POST", path, json={"reason": "twice"})
    assert response.status == 422, again
    assert again["error"]["code"] == "no_shortfall"
    assert len(await _audit(admin_api, "account.forgive_shortfall")) == 1
