"""The body the gateway forwards for a stream whose client did not ask for usage."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy import _asking_for_usage

ASKED = {"include_usage": True}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(
    extra=st.dictionaries(st.text().filter(lambda k: k != "stream_options"), json_values),
    indent=st.sampled_from([None, orjson.OPT_INDENT_2]),
    leading=st.sampled_from([b"", b" ", b"\n\t "]),
)
def test_body_without_stream_options_gets_the_member_spliced_in(extra, indent, leading):
    body = {"model": "gpt-4o-mini", **extra, "stream": True}
    raw = leading + (orjson.dumps(body, option=indent) if indent else orjson.dumps(body))
    forwarded = _asking_for_usage(raw, dict(body), {})
    assert orjson.loads(forwarded) == {**body, "stream_options": ASKED}
    # Spliced, not re-encoded: the client's bytes are all still there, in order.
    assert forwarded.replace(b'"stream_options":{"include_usage":true},', b"", 1) == raw


def test_body_with_stream_options_keeps_the_clients_options():
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": False, "x": 1}}
    forwarded = _asking_for_usage(orjson.dumps(body), body, body["stream_options"])
    assert orjson.loads(forwarded)["stream_options"] == {"include_usage": True, "x": 1}


# -- client JSON of any depth and type, through the gateway (issue 11, defect 5) -----------


def _nested(depth: int) -> object:
    value: object = "leaf"
    for level in range(depth):
        value = {"properties": value} if level % 2 else [value]
    return value


HI = [{"role": "user", "content": "hi"}]
DEEP = _nested(300)


async def _post(gw, path: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        # The standard library writes any depth up to Python's recursion limit; orjson stops
        # at 254 levels.
        data = json.dumps(body).encode()
        async with session.post(gw.base_url + path, data=data, headers=headers) as r:
            assert r.headers.get("x-request-id", "").startswith("req_")
            answer = await r.read()
            if r.status == 200:  # a stream or a JSON body, as the simulator answered
                return r.status, {}
            obj = orjson.loads(answer)
            assert set(obj["error"]) >= {"message", "type", "param", "code"}
            return r.status, obj


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": HI, "tools": [{"type": "function", "x": DEEP}]},
            "tools",
        ),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": HI, "functions": DEEP},
            "functions",
        ),
        ("/responses", {"model": "gpt-4o-mini", "input": "hi", "tools": [DEEP]}, "tools"),
        ("/responses", {"model": "gpt-4o-mini", "input": [{"type": "x", "y": DEEP}]}, "input"),
        (
            "/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": HI,
                "stream": True,
                "stream_options": {"include_usage": False},
                "metadata": DEEP,
            },
            None,
        ),
        (
            "/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": HI,
                "response_format": {"type": "json_schema", "json_schema": {"schema": DEEP}},
            },
            "response_format",
        ),
        (
            "/responses",
            {
                "model": "gpt-4o-mini",
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": DEEP}},
            },
            "text",
        ),
    ],
    ids=[
        "chat-tools",
        "chat-functions",
        "responses-tools",
        "responses-input",
        "stream-options",
        "chat-response-format",
        "responses-text-format",
    ],
)
async def test_body_nested_300_deep_answers_400_nothing_held(gw, sim, path, body, param):
    account, key = await gw.create_account(1_000_000)
    status, obj = await _post(gw, path, key, body)
    assert status == 400
    assert obj["error"]["type"] == "invalid_request_error"
    assert obj["error"]["param"] == param
    assert "nested too deeply" in obj["error"]["message"]
    assert sim.requests == []
    state = await gw.state(account)
    assert state.held_millicredits == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": HI, "metadata": DEEP}),
        ("/responses", {"model": "gpt-4o-mini", "input": [[DEEP]]}),
        ("/responses", {"model": "gpt-4o-mini", "input": [{"role": "user", "content": DEEP}]}),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": DEEP}]},
        ),
    ],
    ids=["uncounted-field", "responses-nested-item", "responses-content", "chat-content"],
)
async def test_body_nested_300_deep_where_not_serialized_is_forwarded_and_charged(
    gw, sim, path, body
):
    account, key = await gw.create_account(1_000_000)
    status, _ = await _post(gw, path, key, body)
    assert status == 200
    assert len(sim.requests) == 1
    await gw.settled()
    assert await gw.balance(account) < 1_000_000


SURPRISES: list[object] = [None, True, 7, -1.5, "x", [], ["x"], {}, {"type": "text"}]


@pytest.mark.parametrize("value", SURPRISES, ids=repr)
async def test_fields_of_any_type_never_answer_500(gw, sim, value):
    _, key = await gw.create_account(1_000_000)
    bodies = [
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": value, "content": value}]},
        ),
        (
            "/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": [{"type": value, "text": value}]}],
            },
        ),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": HI, "tools": value, "tool_choice": value},
        ),
        (
            "/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "assistant", "tool_calls": [{"function": value}]}],
            },
        ),
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": HI, "response_format": value}),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": HI, "max_tokens": value, "n": value},
        ),
        (
            "/chat/completions",
            {"model": "gpt-4o-mini", "messages": HI, "stream": True, "stream_options": value},
        ),
        (
            "/responses",
            {"model": "gpt-4o-mini", "input": [value, {"type": value, "content": value}]},
        ),
        (
            "/responses",
            {"model": "gpt-4o-mini", "input": [{"type": "function_call_output", "output": value}]},
        ),
        (
            "/responses",
            {"model": "gpt-4o-mini", "input": "hi", "instructions": value, "tools": value},
        ),
        (
            "/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": [value, [value]], "best_of": value},
        ),
        ("/embeddings", {"model": "text-embedding-3-small", "input": [value]}),
    ]
    for path, body in bodies:
        status, _ = await _post(gw, path, key, body)
        assert status in (200, 400), (path, body, status)
