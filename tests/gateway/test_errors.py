"""Refusals and failures: each answers in OpenAI's error envelope, forwards nothing it should
not, and leaves no hold or charge behind."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from billing import api_keys
from billing.metering.estimate import CHAT
from billing.metering.pricing import charge_millicredits
from devtools.localservices import free_port
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys

HI = [{"role": "user", "content": "hi"}]
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


async def _raw(
    gw,
    method: str,
    path: str,
    *,
    key: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    """One raw HTTP request to the gateway: (status, headers, body)."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session:
        async with session.request(method, gw.base_url + path, data=data, headers=sent) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


def _error(body: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI envelope, checking the envelope's shape."""
    obj = orjson.loads(body)
    assert set(obj) >= {"error"}
    error = obj["error"]
    assert set(error) >= ENVELOPE_FIELDS
    assert isinstance(error["message"], str) and error["message"]
    return error


async def _key_id(gw, account_id: int) -> int:
    return await gw.pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)


# -- authentication ---------------------------------------------------------------------


async def test_auth_unknown_revoked_expired_keys_get_identical_401(gw, sim):
    revoked_account, revoked_key = await gw.create_account(1_000_000)
    async with gw.pool.acquire() as conn:
        assert await api_keys.revoke_api_key(conn, await _key_id(gw, revoked_account))
        expired_account, _ = await gw.create_account(1_000_000)
        expired_key, _ = await api_keys.create_api_key(
            conn,
            expired_account,
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
        )
    unknown_key = api_keys.generate_key()
    errors = {}
    for name, key in [("unknown", unknown_key), ("revoked", revoked_key), ("expired", expired_key)]:
        with pytest.raises(openai.AuthenticationError) as info:
            await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HI)
        assert info.value.status_code == 401
        errors[name] = info.value.body
    assert errors["unknown"] == errors["revoked"] == errors["expired"]
    assert errors["unknown"]["code"] == "invalid_api_key"
    # The answer must not echo the key (or any part of it beyond what the client sent).
    assert revoked_key not in orjson.dumps(errors["revoked"]).decode()
    assert sim.requests == []


async def test_auth_revoked_key_worked_before_revocation(gw, sim):
    account, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    async with gw.pool.acquire() as conn:
        assert await api_keys.revoke_api_key(conn, await _key_id(gw, account))
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert len(sim.requests) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic dXNlcjpwYXNz"}],
    ids=["no-header", "empty-bearer", "basic-scheme"],
)
async def test_auth_missing_bearer_key_is_401_envelope(gw, sim, headers):
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": HI})
    status, response_headers, raw = await _raw(
        gw, "POST", "/chat/completions", data=body, headers=headers
    )
    assert status == 401
    error = _error(raw)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "missing_api_key"
    assert response_headers["x-request-id"].startswith("req_")
    assert sim.requests == []


async def test_auth_key_without_product_prefix_is_401(gw, sim):
    with pytest.raises(openai.AuthenticationError) as info:
        await gw.client("sk-not-ours").chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert info.value.body["code"] == "invalid_api_key"
    assert sim.requests == []


# -- request validation -----------------------------------------------------------------


async def test_unknown_model_is_404_and_forwards_nothing(gw, sim):
    account, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.NotFoundError) as info:
        await gw.client(key).chat.completions.create(model="gpt-9-imaginary", messages=HI)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"
    assert sim.requests == []
    assert (await gw.state(account)).held_millicredits == 0
    assert await gw.balance(account) == 1_000_000


async def test_malformed_json_is_400_envelope(gw, sim):
    _, key = await gw.create_account(1_000_000)
    status, headers, raw = await _raw(
        gw, "POST", "/chat/completions", key=key, data=b'{"model": "gpt-4o-mini", "messages": ['
    )
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    envelope = orjson.loads(raw)
    assert set(envelope) == {"error"}
    assert set(envelope["error"]) == ENVELOPE_FIELDS
    assert envelope["error"]["type"] == "invalid_request_error"
    assert envelope["error"]["code"] == "invalid_json"
    assert sim.requests == []


@pytest.mark.parametrize("body", [b"[1, 2]", b'"chat"', b"42", b"null"])
async def test_body_not_an_object_is_400(gw, sim, body):
    _, key = await gw.create_account(1_000_000)
    status, _, raw = await _raw(gw, "POST", "/chat/completions", key=key, data=body)
    assert status == 400
    assert _error(raw)["type"] == "invalid_request_error"
    assert sim.requests == []


@pytest.mark.parametrize(
    "body",
    [{"messages": HI}, {"model": 5, "messages": HI}, {"model": "", "messages": HI}],
    ids=["missing", "number", "empty"],
)
async def test_missing_model_is_400_with_param_model(gw, sim, body):
    _, key = await gw.create_account(1_000_000)
    status, _, raw = await _raw(gw, "POST", "/chat/completions", key=key, data=orjson.dumps(body))
    assert status == 400
    error = _error(raw)
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert sim.requests == []


async def test_invalid_field_is_400_with_its_param(gw, sim):
    _, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.BadRequestError) as info:
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=-5
        )
    assert info.value.body["param"] == "max_tokens"
    assert sim.requests == []


async def test_oversize_body_is_413_and_forwards_nothing(make_gateway, sim):
    gw = await make_gateway(max_body_bytes=2048)
    account, key = await gw.create_account(1_000_000)
    body = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 10_240}]}
    )
    assert len(body) > 10_000
    status, _, raw = await _raw(gw, "POST", "/chat/completions", key=key, data=body)
    assert status == 413
    error = _error(raw)
    assert error["code"] == "request_too_large"
    assert "2048" in error["message"]
    assert sim.requests == []
    assert (await gw.state(account)).held_millicredits == 0
    assert await gw.balance(account) == 1_000_000


async def test_body_under_limit_is_served(make_gateway, sim):
    """Control for the test above: the same limit lets a small body through."""
    gw = await make_gateway(max_body_bytes=2048)
    _, key = await gw.create_account(1_000_000)
    await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert len(sim.requests) == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/foo"),
        ("POST", "/foo"),
        ("POST", "/chat/completions/extra"),
        ("GET", "/chat/completions"),
        ("PUT", "/embeddings"),
        ("DELETE", "/models"),
        ("POST", "/models"),
    ],
)
async def test_unknown_path_or_method_is_404_envelope(gw, sim, method, path):
    _, key = await gw.create_account(1_000_000)
    status, _, raw = await _raw(gw, method, path, key=key, data=b"{}")
    assert status == 404
    error = _error(raw)
    assert error["type"] == "invalid_request_error"
    assert path in error["message"]
    assert sim.requests == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/../foo"), ("POST", "/../")])
async def test_paths_outside_v1_no_route_serves_get_404_envelope(gw, sim, method, path):
    """``/v1/../foo`` is ``/foo``: no route serves it."""
    _, key = await gw.create_account(1_000_000)
    got, headers, raw = await _raw(gw, method, path, key=key, data=b"{}")
    assert got == 404
    assert headers["x-request-id"].startswith("req_")
    error = _error(raw)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "not_found"
    assert "Unknown request URL" in error["message"]
    assert sim.requests == []


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/../api/billing/checkout", "POST"), ("DELETE", "/../healthz", "GET")],
)
async def test_paths_outside_v1_served_for_other_methods_get_405_with_allow(
    gw, sim, method, path, allowed
):
    """A 405 says the method is not allowed there (not that the URL is unknown) and lists
    the methods that are, in ``Allow``."""
    _, key = await gw.create_account(1_000_000)
    got, headers, raw = await _raw(gw, method, path, key=key, data=b"{}")
    assert got == 405
    assert headers["Allow"] == allowed
    assert headers["x-request-id"].startswith("req_")
    error = _error(raw)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "method_not_allowed"
    assert "Unknown request URL" not in error["message"]
    assert f"Method {method} is not allowed" in error["message"]
    assert sim.requests == []


# -- upstream failures ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_upstream_unreachable_is_502_and_voids_hold(make_gateway, sim, stream):
    gw = await make_gateway(upstream_base_url=f"http://127.0.0.1:{free_port()}/v1")
    account, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=stream
        )
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_unavailable"
    request_id = info.value.response.headers["x-request-id"]
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)
    await gw.settled()
    assert await gw.usage(request_id) is None
    assert await gw.balance(account) == 1_000_000


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
async def test_upstream_error_status_passes_through_and_voids_hold(gw, sim, status, error_class):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(fail_status=status, fail_message="Scripted upstream refusal."))
    with pytest.raises(error_class) as info:
        await gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert info.value.status_code == status
    assert info.value.body["message"] == "Scripted upstream refusal."
    assert len(sim.requests) == 1
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)
    await gw.settled()
    assert await gw.usage(info.value.response.headers["x-request-id"]) is None
    assert await gw.balance(account) == 1_000_000


def _sse_data(body: bytes) -> list[Any]:
    """The parsed ``data:`` payloads of an SSE body, in order (``[DONE]`` as a string)."""
    payloads = []
    for event in body.split(b"\n\n"):
        data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            joined = b"\n".join(data)
            payloads.append("[DONE]" if joined == b"[DONE]" else orjson.loads(joined))
    return payloads


@pytest.mark.parametrize("fail_mode", ["disconnect", "error_event"])
async def test_upstream_failure_mid_stream_ends_with_error_event_and_charges_generated(
    gw, sim, fail_mode
):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=10, fail_after_chunks=2, fail_mode=fail_mode))
    request = {"model": "gpt-4o-mini", "messages": HI, "stream": True, "max_tokens": 50}
    status, headers, raw = await _raw(
        gw, "POST", "/chat/completions", key=key, data=orjson.dumps(request)
    )
    assert status == 200  # the status went out with the first bytes
    payloads = _sse_data(raw)
    content = [
        p["choices"][0]["delta"].get("content")
        for p in payloads
        if isinstance(p, dict) and p.get("choices")
    ]
    assert "".join(c or "" for c in content) == " hello" * 2
    assert "[DONE]" not in payloads
    last = payloads[-1]
    assert set(last) == {"error"}
    assert set(last["error"]) >= ENVELOPE_FIELDS
    assert last["error"]["code"] == "upstream_error"

    await gw.settled()
    row = await gw.usage(headers["x-request-id"])
    assert row is not None
    assert row["usage_source"] == "estimated"
    assert row["status"] == "upstream_error"
    assert row["completion_tokens"] == 2
    card = gw.rate_cards.get("gpt-4o-mini")
    prompt_tokens = CHAT.estimate(request, card, gw.app[gateway_keys.TOKENS]).prompt_tokens
    assert row["prompt_tokens"] == prompt_tokens
    expected = charge_millicredits(card, prompt_tokens=prompt_tokens, completion_tokens=2)
    assert row["charged_millicredits"] == expected
    assert await gw.balance(account) == 1_000_000 - expected
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


async def test_upstream_failure_mid_stream_sdk_yields_chunks_then_raises(gw, sim):
    _, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=10, fail_after_chunks=3))
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == " hello" * 3
    assert info.value.body["code"] == "upstream_error"


# -- billing store down -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_redis_down_is_503_billing_unavailable_and_forwards_nothing(
    make_gateway, sim, stream
):
    gw = await make_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    account, key = await gw.create_account(1_000_000)
    with pytest.raises(openai.APIStatusError) as info:
        await gw.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, stream=stream
        )
    assert info.value.status_code == 503
    assert info.value.body["code"] == "billing_unavailable"
    assert sim.requests == []
    assert await gw.balance(account) == 1_000_000


async def test_error_answers_carry_distinct_request_ids(gw, sim):
    ids = set()
    for _ in range(2):
        status, headers, _ = await _raw(gw, "GET", "/models", key=f"cg_live_{uuid.uuid4().hex}")
        assert status == 401
        ids.add(headers["x-request-id"])
    assert len(ids) == 2
