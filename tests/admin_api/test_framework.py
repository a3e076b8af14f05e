"""The admin framework: authentication, roles, the error shape, validation, pagination, the
request id shared by the answer and the audit row."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import Field, ValidationError

from admin_api import tokens
from admin_api.app import create_admin_app
from admin_api.framework import AdminContext, AdminModel, AdminRouter, Conflict
from admin_api.models import Page, QueryBool, ShortText, decode_cursor, encode_cursor
from billing.admin_tokens import Role
from billing.errors import AccountNotFoundError
from tests.admin_api.conftest import AdminApi, admin_settings


def _assert_envelope(body: dict, code: str) -> None:
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize(
    "header",
    [None, "Basic abc", "Bearer ", "Bearer cg_admin_short", "Bearer cg_live_" + "a" * 43],
    ids=["none", "basic", "empty", "malformed", "api-key"],
)
async def test_missing_or_malformed_token_is_401_in_envelope(admin_api: AdminApi, header):
    headers = {} if header is None else {"Authorization": header}
    response = await admin_api.client.get("/admin/v1/me", headers=headers)
    assert response.status == 401
    assert response.headers["x-request-id"].startswith("req_")
    _assert_envelope(await response.json(), "invalid_admin_token")


async def test_unknown_shaped_token_is_401(admin_api: AdminApi):
    response, body = await admin_api.call("GET", "/admin/v1/me", token="cg_admin_" + "A" * 43)
    assert response.status == 401
    _assert_envelope(body, "invalid_admin_token")


async def test_revoked_and_expired_tokens_are_401(admin_api: AdminApi):
    expiring, expiring_id = await admin_api.mint(
        Role.ADMIN, expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    revoked, revoked_id = await admin_api.mint(Role.ADMIN)
    response, _ = await admin_api.call("POST", f"/admin/v1/tokens/{revoked_id}/revoke")
    assert response.status == 200
    await admin_api.pool.execute(
        "UPDATE admin_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
        expiring_id,
    )
    for token in (expiring, revoked):
        response, body = await admin_api.call("GET", "/admin/v1/me", token=token)
        assert response.status == 401
        _assert_envelope(body, "invalid_admin_token")


async def test_bearer_scheme_is_case_insensitive(admin_api: AdminApi):
    response = await admin_api.client.get(
        "/admin/v1/me", headers={"Authorization": f"bearer {admin_api.tokens[Role.VIEWER]}"}
    )
    assert response.status == 200


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR])
async def test_role_below_route_is_403_insufficient_role(admin_api: AdminApi, role: Role):
    response, body = await admin_api.call(
        "PUT", "/admin/v1/flags/billing.charging_rollout_percent", role=role, json={"value": 5}
    )
    assert response.status == 403
    _assert_envelope(body, "insufficient_role")
    assert "admin" in body["error"]["message"]


async def test_me_answers_token_identity_and_role(admin_api: AdminApi):
    response, body = await admin_api.call("GET", "/admin/v1/me", role=Role.OPERATOR)
    assert response.status == 200
    assert body["role"] == "operator"
    assert body["name"] == "test-operator"
    assert isinstance(body["tokenId"], int)


async def test_body_not_json_is_400_invalid_json(admin_api: AdminApi):
    response, body = await admin_api.call("POST", "/admin/v1/tokens", data=b"{not json")
    assert response.status == 400
    _assert_envelope(body, "invalid_json")
    response, body = await admin_api.call("POST", "/admin/v1/tokens", json=[1, 2])
    assert response.status == 400
    _assert_envelope(body, "invalid_json")


async def test_invalid_fields_are_400_with_details_per_field(admin_api: AdminApi):
    response, body = await admin_api.call(
        "POST", "/admin/v1/tokens", json={"role": "root", "name": 5, "colour": "red"}
    )
    assert response.status == 400
    _assert_envelope(body, "invalid_request")
    fields = {detail["field"] for detail in body["error"]["details"]}
    assert fields == {"role", "name", "colour"}
    assert all(detail["message"] for detail in body["error"]["details"])


async def test_invalid_query_and_path_are_400_naming_the_field(admin_api: AdminApi):
    response, body = await admin_api.call("GET", "/admin/v1/tokens", params={"limit": "0"})
    assert response.status == 400
    assert body["error"]["details"][0]["field"] == "limit"
    response, body = await admin_api.call("GET", "/admin/v1/tokens", params={"cursor": "@@"})
    assert response.status == 400
    assert body["error"]["details"][0]["field"] == "cursor"
    response, body = await admin_api.call(
        "PATCH", "/admin/v1/tokens/99999999999999999999", json={"name": "x"}
    )
    assert response.status == 400
    assert body["error"]["details"][0]["field"] == "id"


async def test_strict_body_types_refuse_a_string_for_an_integer_field(admin_api: AdminApi):
    response, body = await admin_api.call(
        "POST", "/admin/v1/tokens", json={"role": "viewer", "name": 12}
    )
    assert response.status == 400
    assert body["error"]["details"][0]["field"] == "name"


async def test_unknown_admin_path_is_404_in_envelope(admin_api: AdminApi):
    response = await admin_api.client.get("/admin/v1/nothing-here")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_request_id_of_answer_is_the_audit_rows(admin_api: AdminApi):
    response, body = await admin_api.call(
        "POST", "/admin/v1/tokens", json={"name": "ops", "role": "operator"}
    )
    assert response.status == 201
    row = await admin_api.pool.fetchrow(
        "SELECT * FROM audit_log WHERE action = 'admin_token.create' AND target_id = $1",
        str(body["id"]),
    )
    assert row["request_id"] == response.headers["x-request-id"]
    assert row["actor_kind"] == "token"
    assert row["actor_name"] == "test-admin"
    assert row["client_address"] == "127.0.0.1"


async def test_last_used_at_written_once_within_a_minute(admin_api: AdminApi):
    token, token_id = await admin_api.mint(Role.VIEWER)
    assert (
        await admin_api.pool.fetchval(
            "SELECT last_used_at FROM admin_tokens WHERE id = $1", token_id
        )
        is None
    )
    await admin_api.call("GET", "/admin/v1/me", token=token)
    first = None
    for _ in range(100):
        first = await admin_api.pool.fetchval(
            "SELECT last_used_at FROM admin_tokens WHERE id = $1", token_id
        )
        if first is not None:
            break
        await asyncio.sleep(0.02)
    assert first is not None
    await admin_api.call("GET", "/admin/v1/me", token=token)
    await asyncio.sleep(0.1)
    second = await admin_api.pool.fetchval(
        "SELECT last_used_at FROM admin_tokens WHERE id = $1", token_id
    )
    assert second == first


def test_cursor_round_trips_and_refuses_foreign_text():
    assert decode_cursor(encode_cursor(12345)) == 12345
    for bad in ("", "@@", encode_cursor(0), "LTE", "MDE"):  # "", junk, 0, "-1", "01"
        with pytest.raises(ValueError):
            decode_cursor(bad)


def test_page_window_gives_next_cursor_only_when_more_rows():
    page = Page(limit=2)
    kept, cursor = page.window([9, 8, 7], key=lambda x: x)
    assert (kept, decode_cursor(cursor)) == ([9, 8], 8)
    assert page.window([9, 8], key=lambda x: x) == ([9, 8], None)


@pytest.mark.parametrize("value", ["0.5", "1700000000", "2026-01-31", "2026-01-31T00:00:00"])
async def test_times_must_be_iso_8601_with_offset(admin_api: AdminApi, value: str):
    response, body = await admin_api.call("GET", "/admin/v1/audit-log", params={"until": value})
    assert response.status == 400
    assert body["error"]["details"][0]["field"] == "until"
    response, body = await admin_api.call(
        "POST", "/admin/v1/tokens", json={"role": "viewer", "expiresAt": 1700000000}
    )
    assert response.status == 400


async def test_times_with_offset_are_accepted(admin_api: AdminApi):
    response, _ = await admin_api.call(
        "GET", "/admin/v1/audit-log", params={"until": "2026-01-31T00:00:00Z"}
    )
    assert response.status == 200


# -- a route declared here: headers, handler errors, the OpenAPI of a header -------------

_probe = AdminRouter(tag="probe")


class _Idempotency(AdminModel):
    idempotency_key: ShortText = Field(alias="Idempotency-Key", min_length=1)


class _Echo(AdminModel):
    idempotency_key: str


@_probe.post(
    "/admin/v1/probe", role=Role.OPERATOR, headers=_Idempotency, response=_Echo, summary="Echo"
)
async def probe(ctx: AdminContext) -> _Echo:
    if ctx.headers.idempotency_key == "taken":
        raise Conflict("This idempotency key was used with other content.")
    if ctx.headers.idempotency_key == "no-account":
        raise AccountNotFoundError(42)
    if ctx.headers.idempotency_key == "db-down":
        raise ConnectionRefusedError("connection refused")
    return _Echo(idempotency_key=ctx.headers.idempotency_key)


@pytest.fixture
async def probe_api(database_url, redis_url, aiohttp_client) -> AdminApi:
    app = create_admin_app(admin_settings(database_url, redis_url), routers=[tokens.router, _probe])
    api = AdminApi(await aiohttp_client(app), {})
    api.tokens[Role.OPERATOR], _ = await api.mint(Role.OPERATOR)
    return api


async def test_declared_header_is_validated_and_given_to_the_handler(probe_api: AdminApi):
    client = probe_api.client
    auth = probe_api.headers(Role.OPERATOR)
    response = await client.post("/admin/v1/probe", headers={**auth, "idempotency-key": "k1"})
    assert (response.status, await response.json()) == (200, {"idempotencyKey": "k1"})
    response = await client.post("/admin/v1/probe", headers=auth)
    assert response.status == 400
    assert (await response.json())["error"]["details"][0]["field"] == "Idempotency-Key"


async def test_handler_errors_answer_their_status_with_the_request_id(probe_api: AdminApi):
    auth = probe_api.headers(Role.OPERATOR)
    for key, status, code in (
        ("taken", 409, "conflict"),
        ("no-account", 404, "not_found"),
        ("db-down", 503, "database_unavailable"),
    ):
        response = await probe_api.client.post(
            "/admin/v1/probe", headers={**auth, "Idempotency-Key": key}
        )
        assert response.status == status
        assert response.headers["x-request-id"].startswith("req_")
        assert (await response.json())["error"]["code"] == code


async def test_openapi_documents_a_declared_header(probe_api: AdminApi):
    document = await (await probe_api.client.get("/admin/v1/openapi.json")).json()
    (parameter,) = document["paths"]["/admin/v1/probe"]["post"]["parameters"]
    assert (parameter["name"], parameter["in"], parameter["required"]) == (
        "Idempotency-Key",
        "header",
        True,
    )


async def test_missing_token_message_says_what_to_send_unredacted(admin_api: AdminApi):
    response = await admin_api.client.get("/admin/v1/me")
    message = (await response.json())["error"]["message"]
    assert "Authorization" in message and "Bearer" in message
    assert "REDACTED" not in message


def test_query_bool_takes_only_true_and_false():
    class _Flags(AdminModel):
        all: QueryBool = False

    assert _Flags.model_validate({"all": "true"}).all is True
    assert _Flags.model_validate({"all": "false"}).all is False
    for loose in ("yes", "1", "on", "True"):
        with pytest.raises(ValidationError):
            _Flags.model_validate({"all": loose})
