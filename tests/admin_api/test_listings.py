"""Ledger and usage listings over the admin API: per account and across accounts, filters,
cursor pagination newest first; usage rows keep the rates in force when they happened."""

from __future__ import annotations

from typing import Any

from billing.admin_tokens import Role
from devtools.simulator import Scenario
from tests.admin_api.conftest import AdminApi


async def _account(admin_api: AdminApi, email: str, credits: str) -> int:
    _, body = await admin_api.call(
        "POST", "/admin/v1/accounts", json={"email": email, "startingCredits": credits}
    )
    return int(body["id"])


async def _credit(admin_api: AdminApi, account_id: int, key: str, credits: str) -> None:
    headers = {**admin_api.headers(), "Idempotency-Key": key}
    response = await admin_api.client.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"direction": "credit", "amountCredits": credits, "reason": "test"},
        headers=headers,
    )
    assert response.status == 200, await response.text()


async def _all_pages(admin_api: AdminApi, path: str, params: dict[str, str]) -> list[Any]:
    rows: list[Any] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response, page = await admin_api.call("GET", path, role=Role.VIEWER, params=query)
        assert response.status == 200, page
        rows.extend(page["data"])
        cursor = page["nextCursor"]
        if cursor is None:
            return rows


async def test_account_ledger_pages_newest_first(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api, "a@example.com", "1")
    for n in range(4):
        await _credit(admin_api, account_id, f"k{n}", f"{n + 2}")
    rows = await _all_pages(admin_api, f"/admin/v1/accounts/{account_id}/ledger", {"limit": "2"})
    assert [r["amountMillicredits"] for r in rows] == ["5000", "4000", "3000", "2000", "1000"]
    assert rows[0]["balanceAfterMillicredits"] == "15000"


async def test_ledger_across_accounts_filters_by_account_type_and_time(
    admin_api: AdminApi,
) -> None:
    first = await _account(admin_api, "a@example.com", "1")
    second = await _account(admin_api, "b@example.com", "2")
    await _credit(admin_api, second, "k", "3")
    every = await _all_pages(admin_api, "/admin/v1/ledger", {})
    assert [r["accountId"] for r in every] == [second, second, first]
    mine = await _all_pages(admin_api, "/admin/v1/ledger", {"accountId": str(second)})
    assert [r["amountMillicredits"] for r in mine] == ["3000", "2000"]
    typed = await _all_pages(admin_api, "/admin/v1/ledger", {"entryType": "purchase"})
    assert typed == []
    later = await _all_pages(admin_api, "/admin/v1/ledger", {"since": "2999-01-01T00:00:00Z"})
    earlier = await _all_pages(admin_api, "/admin/v1/ledger", {"until": "2999-01-01T00:00:00Z"})
    assert (later, len(earlier)) == ([], 3)


async def test_listing_bad_filters_400_and_unknown_account_404(admin_api: AdminApi) -> None:
    for params in ({"entryType": "gift"}, {"since": "yesterday"}, {"cursor": "!!"}):
        response, body = await admin_api.call("GET", "/admin/v1/ledger", params=params)
        assert response.status == 400, (params, body)
    for path in ("/admin/v1/accounts/999/ledger", "/admin/v1/accounts/999/usage"):
        response, _ = await admin_api.call("GET", path)
        assert response.status == 404


async def test_usage_rows_keep_their_rates_after_a_rate_card_change(
    admin_api: AdminApi, gw: Any, sim: Any
) -> None:
    account_id = await _account(admin_api, "a@example.com", "1000")
    _, created = await admin_api.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", json={"name": "sdk"}
    )
    sim.push(Scenario(chunks=200, prompt_tokens=750))
    raw = await gw.client(created["key"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    request_id = raw.headers["x-request-id"]
    await gw.settled()
    await admin_api.pool.execute(
        """INSERT INTO rate_cards (model, model_kind, input_millicredits_per_1k_tokens,
               cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
               max_output_tokens, effective_at)
           VALUES ('gpt-4o-mini', 'chat', 5000, 2500, 20000, 16384, now())"""
    )
    path = f"/admin/v1/accounts/{account_id}/usage"
    [row] = await _all_pages(admin_api, path, {"model": "gpt-4o-mini"})
    assert row["requestId"] == request_id
    assert (row["inputCreditsPer1kTokens"], row["outputCreditsPer1kTokens"]) == ("2.400", "9.600")
    assert row["chargedMillicredits"] == "3720"  # docs/design.md: 750 in / 200 out
    assert (row["promptTokens"], row["completionTokens"]) == (750, 200)
    by_key = await _all_pages(admin_api, "/admin/v1/usage", {"apiKeyId": str(created["id"])})
    assert [r["id"] for r in by_key] == [row["id"]]
    assert await _all_pages(admin_api, path, {"model": "gpt-4o"}) == []
    assert await _all_pages(admin_api, "/admin/v1/usage", {"apiKeyId": "999"}) == []
