"""Rate cards over HTTP: listing with scheduled cards, history, publishing (both units in the
answer, one audit row) and its refusals (400, 409, 422, 403), writing nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from billing.admin_tokens import Role
from billing.metering.rate_cards import seed_rate_cards
from tests.admin_api.conftest import AdminApi

PUBLISH = {
    "model": "gpt-4o-mini",
    "inputCreditsPer1kTokens": "3.1",
    "cachedInputCreditsPer1kTokens": "1.550",
    "outputCreditsPer1kTokens": "12.000",
    "displayLabel": "Eco",
    "upstreamInputUsdPer1kTokens": "0.0002",
}


@pytest.fixture
async def api(admin_api: AdminApi) -> AdminApi:
    async with admin_api.pool.acquire() as conn:
        await seed_rate_cards(conn)
    return admin_api


async def publish(api: AdminApi, **fields: Any) -> tuple[int, dict[str, Any]]:
    response, body = await api.call("POST", "/admin/v1/rate-cards", json={**PUBLISH, **fields})
    return response.status, body


async def test_publish_answers_decimal_strings_and_millicredits_with_one_audit_row(
    api: AdminApi,
) -> None:
    before = await api.audit_count()

    status, card = await publish(api)

    assert status == 201, card
    assert card["model"] == "gpt-4o-mini" and card["modelKind"] == "chat"
    assert (card["inputCreditsPer1kTokens"], card["inputMillicreditsPer1kTokens"]) == (
        "3.100",
        3_100,
    )
    assert card["cachedInputCreditsPer1kTokens"] == "1.550"
    assert card["cachedInputMillicreditsPer1kTokens"] == 1_550
    assert (card["outputCreditsPer1kTokens"], card["outputMillicreditsPer1kTokens"]) == (
        "12.000",
        12_000,
    )
    assert (card["upstreamInputUsdPer1kTokens"], card["upstreamInputMicrousdPer1kTokens"]) == (
        "0.000200",
        200,
    )
    # Not given: the model's latest version's upstream output cost and output cap.
    assert card["upstreamOutputMicrousdPer1kTokens"] == 600
    assert card["maxOutputTokens"] == 16_384
    assert (card["displayLabel"], card["scheduled"]) == ("Eco", False)
    assert await api.audit_count() == before + 1
    row = await api.pool.fetchrow("SELECT * FROM audit_log ORDER BY id DESC LIMIT 1")
    assert (row["action"], row["target_id"], row["actor_kind"]) == (
        "rate_card.publish",
        str(card["id"]),
        "token",
    )
    stored = await api.pool.fetchrow("SELECT * FROM rate_cards WHERE id = $1", card["id"])
    assert stored["upstream_input_microusd_per_1k_tokens"] == 200
    assert stored["display_label"] == "Eco"


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"inputCreditsPer1kTokens": "2.4001"}, 400, "inputCreditsPer1kTokens"),
        ({"outputCreditsPer1kTokens": "-1.000"}, 400, "outputCreditsPer1kTokens"),
        ({"inputCreditsPer1kTokens": 2.4}, 400, "inputCreditsPer1kTokens"),
        ({"upstreamInputUsdPer1kTokens": "0.0000001"}, 400, "upstreamInputUsdPer1kTokens"),
        ({"effectiveAt": "2020-01-01T00:00:00"}, 400, "effectiveAt"),
        ({"modelKind": "image"}, 400, "modelKind"),
        ({"model": "a/b"}, 400, "model"),
        ({"priceMultiplier": 2}, 400, "priceMultiplier"),
        ({"effectiveAt": "2020-01-01T00:00:00Z"}, 422, None),
        ({"modelKind": "embedding"}, 422, None),
        ({"model": "brand-new"}, 422, None),
        ({"model": "brand-new", "modelKind": "chat"}, 422, None),
    ],
)
async def test_publish_refusals_write_nothing(
    api: AdminApi, fields: dict[str, Any], status: int, param: str | None
) -> None:
    before = await api.audit_count()
    cards = await api.pool.fetchval("SELECT count(*) FROM rate_cards")

    answered, body = await publish(api, **fields)

    assert answered == status, body
    if param:
        assert body["error"]["param"] == param
        assert body["error"]["details"]
    assert await api.audit_count() == before
    assert await api.pool.fetchval("SELECT count(*) FROM rate_cards") == cards


async def test_publish_twice_at_one_instant_is_409(api: AdminApi) -> None:
    at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert (await publish(api, effectiveAt=at))[0] == 201
    status, body = await publish(api, effectiveAt=at)
    assert status == 409
    assert body["error"]["code"] == "conflict"


async def test_first_card_of_a_new_model(api: AdminApi) -> None:
    status, card = await publish(
        api, model="o9-mini", modelKind="completion", maxOutputTokens=2048, displayLabel=None
    )
    assert status == 201, card
    assert (card["modelKind"], card["maxOutputTokens"], card["displayLabel"]) == (
        "completion",
        2048,
        "",
    )


async def test_list_shows_cards_in_force_and_flags_scheduled_ones(api: AdminApi) -> None:
    at = datetime.now(UTC) + timedelta(days=1)
    _, future = await publish(api, effectiveAt=at.isoformat())
    assert future["scheduled"] is True

    response, listed = await api.call("GET", "/admin/v1/rate-cards", role=Role.VIEWER)

    assert response.status == 200
    in_force = [c for c in listed["data"] if not c["scheduled"]]
    assert len(in_force) == 8 and len({c["model"] for c in in_force}) == 8
    assert [c["id"] for c in listed["data"] if c["scheduled"]] == [future["id"]]
    mini = next(c for c in in_force if c["model"] == "gpt-4o-mini")
    assert (mini["inputCreditsPer1kTokens"], mini["outputCreditsPer1kTokens"]) == (
        "2.400",
        "9.600",
    )

    response, history = await api.call(
        "GET", "/admin/v1/rate-cards/gpt-4o-mini/history", role=Role.VIEWER
    )
    assert response.status == 200
    assert [c["id"] for c in history["data"]] == [future["id"], mini["id"]]
    assert [c["scheduled"] for c in history["data"]] == [True, False]


async def test_history_of_an_unknown_model_is_404(api: AdminApi) -> None:
    response, body = await api.call("GET", "/admin/v1/rate-cards/nope/history")
    assert response.status == 404
    assert body["error"]["param"] == "model"


async def test_only_admins_publish(api: AdminApi) -> None:
    for role in (Role.VIEWER, Role.OPERATOR):
        response, body = await api.call("POST", "/admin/v1/rate-cards", json=PUBLISH, role=role)
        assert response.status == 403, body
