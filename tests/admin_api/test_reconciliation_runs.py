"""``POST`` and ``GET /admin/v1/reconciliation-runs`` (admin_api/reconciliation.py): a run
through the admin API is the CLI's reconciliation, recorded (source ``api``) and audited;
a corrupted balance shows in its answer; the listing pages newest first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing import ledger
from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi


async def _account(admin_api: AdminApi, email: str, credits: str) -> int:
    response, body = await admin_api.call(
        "POST", "/admin/v1/accounts", json={"email": email, "startingCredits": credits}
    )
    assert response.status == 201, body
    return int(body["id"])


async def test_a_run_reports_clean_books_records_and_audits_it(admin_api: AdminApi) -> None:
    await _account(admin_api, "clean@example.com", "12.5")

    response, body = await admin_api.call("POST", "/admin/v1/reconciliation-runs", json={})

    assert response.status == 201, body
    assert body["ok"] is True
    assert body["source"] == "api"
    assert body["counts"]["accounts"] == 1
    assert body["counts"]["redisChecked"] == 1
    assert set(body["mismatchCounts"].values()) == {0}
    row = await admin_api.pool.fetchrow(
        "SELECT source, ok FROM reconciliation_runs WHERE id = $1", body["id"]
    )
    assert (row["source"], row["ok"]) == ("api", True)
    audit = await admin_api.pool.fetchrow(
        "SELECT action, target_type, target_id FROM audit_log ORDER BY id DESC LIMIT 1"
    )
    assert tuple(audit) == ("reconciliation.run", "reconciliation_run", str(body["id"]))


async def test_a_corrupted_balance_is_a_mismatch_in_the_answer(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api, "corrupt@example.com", "10")
    # As a superuser (the fixture's pool), behind the ledger's back.
    await admin_api.pool.execute(
        "UPDATE accounts SET balance_millicredits = balance_millicredits + 7 WHERE id = $1",
        account_id,
    )

    response, body = await admin_api.call(
        "POST", "/admin/v1/reconciliation-runs", json={"since": "2026-01-01"}
    )

    assert response.status == 201, body
    assert body["ok"] is False
    assert body["since"] == "2026-01-01"
    assert body["mismatchCounts"]["account_balance"] == 1
    [mismatch] = [m for m in body["mismatches"] if m["check"] == "account_balance"]
    assert mismatch["accountId"] == account_id
    assert (mismatch["expectedMillicredits"], mismatch["actualMillicredits"]) == (
        "10000",
        "10007",
    )


async def test_a_since_outside_2000_to_today_is_refused_with_the_field(
    admin_api: AdminApi,
) -> None:
    """A `since` after today checks no day and would record a clean run: 400, nothing run."""
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    for since in ("9999-12-31", tomorrow, "1999-12-31"):
        response, body = await admin_api.call(
            "POST", "/admin/v1/reconciliation-runs", json={"since": since}
        )
        assert response.status == 400, body
        assert body["error"]["param"] == "since"
        assert "from 2000-01-01 to today" in body["error"]["message"]
    assert await admin_api.pool.fetchval("SELECT count(*) FROM reconciliation_runs") == 0


async def test_runs_are_listed_newest_first_in_cursor_pages(admin_api: AdminApi) -> None:
    async with admin_api.pool.acquire() as conn:
        await ledger.create_account(conn, "listed@example.com")
    ids = []
    for _ in range(3):
        response, body = await admin_api.call("POST", "/admin/v1/reconciliation-runs", json={})
        assert response.status == 201, body
        ids.append(body["id"])

    response, first = await admin_api.call(
        "GET", "/admin/v1/reconciliation-runs", role=Role.VIEWER, params={"limit": "2"}
    )
    assert response.status == 200, first
    assert [run["id"] for run in first["data"]] == [ids[2], ids[1]]
    assert first["nextCursor"] is not None
    response, second = await admin_api.call(
        "GET",
        "/admin/v1/reconciliation-runs",
        role=Role.VIEWER,
        params={"limit": "2", "cursor": first["nextCursor"]},
    )
    assert [run["id"] for run in second["data"]] == [ids[0]]
    assert second["nextCursor"] is None


async def test_an_operator_cannot_start_a_run(admin_api: AdminApi) -> None:
    response, body = await admin_api.call(
        "POST", "/admin/v1/reconciliation-runs", role=Role.OPERATOR, json={}
    )
    assert response.status == 403, body
    assert await admin_api.pool.fetchval("SELECT count(*) FROM reconciliation_runs") == 0
