"""Adjustments over the admin API: the Idempotency-Key rules, the floor at zero, one audit row
per new entry, and the balance pushed to Redis."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from billing import ledger
from billing.admin_tokens import Role
from runtime import appkeys
from tests.admin_api.conftest import AdminApi

CREDIT = {"direction": "credit", "amountCredits": "25.5", "reason": "goodwill"}


async def _account(admin_api: AdminApi, credits: str = "0") -> int:
    _, body = await admin_api.call(
        "POST", "/admin/v1/accounts", json={"email": "ann@example.com", "startingCredits": credits}
    )
    return int(body["id"])


async def _adjust(
    admin_api: AdminApi, account_id: int, body: dict[str, Any], key: str | None, **kwargs: Any
) -> tuple[int, Any]:
    headers = admin_api.headers(kwargs.pop("role", Role.OPERATOR))
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await admin_api.client.post(
        f"/admin/v1/accounts/{account_id}/adjustments", json=body, headers=headers
    )
    return response.status, await response.json()


async def _adjustment_audits(admin_api: AdminApi) -> int:
    return int(
        await admin_api.pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'adjustment.create'"
        )
    )


async def test_credit_posts_an_entry_and_pushes_the_balance_to_redis(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    status, body = await _adjust(
        admin_api, account_id, {**CREDIT, "externalReference": "T-1"}, "k-1"
    )
    assert status == 200, body
    assert (body["created"], body["entryType"], body["amountMillicredits"]) == (
        True,
        "adjustment",
        "25500",
    )
    assert body["balanceAfterMillicredits"] == "25500"
    assert body["reference"] == "goodwill (external reference: T-1)"
    state = await admin_api.client.app[appkeys.HOLDS].account_state(account_id)
    assert state.balance_millicredits == 25_500
    assert await _adjustment_audits(admin_api) == 1


async def test_same_key_same_body_returns_the_same_entry_once(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    _, first = await _adjust(admin_api, account_id, CREDIT, "k-1")
    status, again = await _adjust(admin_api, account_id, CREDIT, "k-1")
    assert status == 200
    assert (again["id"], again["created"]) == (first["id"], False)
    assert (await ledger.posted_balance(admin_api.pool, account_id)).balance_millicredits == 25_500
    assert await _adjustment_audits(admin_api) == 1


async def test_same_key_other_body_409_idempotency_key_reused(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    await _adjust(admin_api, account_id, CREDIT, "k-1")
    for changed in (
        {**CREDIT, "amountCredits": "26"},
        {**CREDIT, "direction": "debit"},
        {**CREDIT, "reason": "other"},
    ):
        status, body = await _adjust(admin_api, account_id, changed, "k-1")
        assert status == 409, body
        assert body["error"]["code"] == "idempotency_key_reused"
    assert (await ledger.posted_balance(admin_api.pool, account_id)).balance_millicredits == 25_500
    assert await _adjustment_audits(admin_api) == 1


async def test_missing_idempotency_key_400(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    status, body = await _adjust(admin_api, account_id, CREDIT, None)
    assert status == 400, body
    assert body["error"]["details"][0]["field"] == "Idempotency-Key"
    assert await _adjustment_audits(admin_api) == 0


async def test_debit_below_zero_422_and_balance_unchanged(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api, "10")
    debit = {"direction": "debit", "amountCredits": "10.001", "reason": "correction"}
    status, body = await _adjust(admin_api, account_id, debit, "d-1")
    assert status == 422, body
    assert body["error"]["code"] == "insufficient_balance"
    assert (await ledger.posted_balance(admin_api.pool, account_id)).balance_millicredits == 10_000
    assert await _adjustment_audits(admin_api) == 0
    status, body = await _adjust(admin_api, account_id, {**debit, "amountCredits": "10"}, "d-1")
    assert status == 200 and body["balanceAfterMillicredits"] == "0"


async def test_zero_amount_422_unknown_account_404_viewer_403(admin_api: AdminApi) -> None:
    account_id = await _account(admin_api)
    status, _ = await _adjust(admin_api, account_id, {**CREDIT, "amountCredits": "0.000"}, "z")
    assert status == 422
    status, _ = await _adjust(admin_api, 999_999, CREDIT, "u")
    assert status == 404
    status, _ = await _adjust(admin_api, account_id, CREDIT, "v", role=Role.VIEWER)
    assert status == 403
    assert await _adjustment_audits(admin_api) == 0


def _posted_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "adjustment.posted"]


async def test_starting_credits_and_adjustments_log_one_adjustment_posted_each(
    admin_api: AdminApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    account_id = await _account(admin_api, "12.5")
    [grant] = _posted_lines(caplog)
    assert (grant.accountId, grant.millicredits, grant.kind) == (  # type: ignore[attr-defined]
        account_id,
        "12500",
        "starting_grant",
    )
    caplog.clear()
    _, body = await _adjust(admin_api, account_id, CREDIT, "k-1")
    await _adjust(admin_api, account_id, CREDIT, "k-1")  # a repeat: nothing posted or logged
    [adjustment] = _posted_lines(caplog)
    assert (adjustment.accountId, adjustment.millicredits) == (  # type: ignore[attr-defined]
        account_id,
        "25500",
    )
    assert adjustment.ledgerEntryId == body["id"]  # type: ignore[attr-defined]
    assert adjustment.actorKind == "token"  # type: ignore[attr-defined]
