"""Untrusted upstream usage and shapes, through the gateway (issue 11, defects 3 and 6).

Usage above what the request could produce is charged at ``gateway.usage.usage_bound`` and
recorded as reported (``clamped``); usage with counts that are not usable integers is charged
at our own count (``estimated``); both are logged and counted. Any 200 body or stream, whatever
its shape, is relayed and charged.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from billing.metering.estimate import CHAT, RESPONSES
from billing.metering.pricing import charge_millicredits
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys

HI = [{"role": "user", "content": "hi"}]
MODEL = "gpt-4o-mini"
OPENING = 1_000_000


async def _post(
    gw, key: str, path: str, request: dict[str, Any]
) -> tuple[int, CIMultiDict[str], bytes]:
    """One raw request to the gateway: (status, headers, body), the whole body read."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.base_url + path, data=orjson.dumps(request), headers=headers
        ) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


def _our_prompt(gw, request: dict[str, Any]) -> int:
    card = gw.rate_cards.get(request["model"])
    estimate = RESPONSES.estimate if "input" in request else CHAT.estimate
    return estimate(request, card, gw.app[gateway_keys.TOKENS]).prompt_tokens


def _charge(gw, prompt_tokens: int, completion_tokens: int) -> int:
    return charge_millicredits(
        gw.rate_cards.get(MODEL), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )


def _warnings(caplog, request_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and request_id in r.getMessage()
    ]


async def _row(gw, request_id: str, account: int):
    await gw.settled()
    row = await gw.usage(request_id)
    assert row is not None, f"no usage row for {request_id}"
    assert await gw.balance(account) == OPENING - row["charged_millicredits"]
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)
    return row


# -- defect 3: usage beyond what the request could produce ---------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_usage_of_billions_of_tokens_is_charged_at_the_bound_and_recorded_as_reported(
    gw, sim, caplog, stream
):
    caplog.set_level(logging.WARNING, logger="gateway.proxy")
    account, key = await gw.create_account(OPENING)
    reported = 2_000_000_000
    sim.push(Scenario(chunks=3, usage={"prompt_tokens": reported, "completion_tokens": reported}))
    request = {"model": MODEL, "messages": HI, "max_tokens": 50, "stream": stream}
    status, headers, _ = await _post(gw, key, "/chat/completions", request)
    assert status == 200
    request_id = headers["x-request-id"]
    row = await _row(gw, request_id, account)
    prompt_bound = 2 * _our_prompt(gw, request) + 1_000
    assert row["usage_source"] == "clamped"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (reported, reported)
    assert row["cost_millicredits"] == row["charged_millicredits"] == _charge(gw, prompt_bound, 50)
    assert gw.app[gateway_keys.USAGE_STATS].clamped == 1
    [warning] = _warnings(caplog, request_id)
    assert f"prompt_tokens={reported}" in warning
    assert f"prompt_tokens={prompt_bound} completion_tokens=50" in warning


@pytest.mark.parametrize(
    ("case", "source"),
    [("at_the_bound", "upstream"), ("prompt_above", "clamped"), ("completion_above", "clamped")],
)
async def test_usage_bound_is_twice_our_prompt_plus_1000_and_max_tokens_times_n(
    gw, sim, case, source
):
    account, key = await gw.create_account(OPENING)
    request = {"model": MODEL, "messages": HI, "max_tokens": 10, "n": 2}
    prompt_bound, completion_bound = 2 * _our_prompt(gw, request) + 1_000, 20
    reported = {
        "at_the_bound": (prompt_bound, completion_bound),
        "prompt_above": (prompt_bound + 1, completion_bound),
        "completion_above": (prompt_bound, completion_bound + 1),
    }[case]
    sim.push(
        Scenario(chunks=3, usage={"prompt_tokens": reported[0], "completion_tokens": reported[1]})
    )
    status, headers, _ = await _post(gw, key, "/chat/completions", request)
    assert status == 200
    row = await _row(gw, headers["x-request-id"], account)
    assert row["usage_source"] == source
    assert (row["prompt_tokens"], row["completion_tokens"]) == reported
    assert row["charged_millicredits"] == _charge(gw, prompt_bound, completion_bound)


# -- defect 3: usage that is not usable ----------------------------------------------------


@pytest.mark.parametrize("count", [-1000, "1000", 1000.0, True, None], ids=repr)
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_unusable_usage_counts_are_charged_at_our_count_and_logged(
    gw, sim, caplog, count, stream
):
    caplog.set_level(logging.WARNING, logger="gateway.proxy")
    account, key = await gw.create_account(OPENING)
    sim.push(Scenario(chunks=4, usage={"prompt_tokens": count, "completion_tokens": count}))
    request = {"model": MODEL, "messages": HI, "max_tokens": 50, "stream": stream}
    status, headers, body = await _post(gw, key, "/chat/completions", request)
    assert status == 200
    if stream:
        assert body.endswith(b"data: [DONE]\n\n")
        assert b'"usage":{' not in body  # the usage-only chunk stays hidden
    request_id = headers["x-request-id"]
    row = await _row(gw, request_id, account)
    prompt = _our_prompt(gw, request)
    assert (row["usage_source"], row["status"]) == ("estimated", "completed")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, 4)
    assert row["charged_millicredits"] == _charge(gw, prompt, 4)
    assert gw.app[gateway_keys.USAGE_STATS].unusable == 1
    [warning] = _warnings(caplog, request_id)
    assert "prompt_tokens" in warning


async def test_responses_stream_with_unusable_output_tokens_is_charged_at_our_count(gw, sim):
    account, key = await gw.create_account(OPENING)
    sim.push(Scenario(chunks=5, usage={"input_tokens": 10, "output_tokens": "5"}))
    request = {"model": MODEL, "input": "hello there", "max_output_tokens": 50, "stream": True}
    status, headers, body = await _post(gw, key, "/responses", request)
    assert status == 200
    assert b"response.completed" in body
    row = await _row(gw, headers["x-request-id"], account)
    prompt = _our_prompt(gw, request)
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == (
        "estimated",
        prompt,
        5,
    )
    assert row["charged_millicredits"] == _charge(gw, prompt, 5)


# -- defect 6: 200 bodies and streams of any shape -----------------------------------------

_HELLO_TWICE = b'[{"message":{"content":" hello hello"}}]'


@pytest.mark.parametrize(
    ("raw", "completion_tokens"),
    [
        (b'{"id":"x","object":"chat.completion","choices":5}', 0),
        (b'{"id":"x","object":"response","output":7}', 0),
        (b'{"choices":' + _HELLO_TWICE + b',"usage":{"prompt_tokens":18446744073709551616}}', 2),
        (b'{"choices":' + _HELLO_TWICE + b',"usage":{"prompt_tokens":9223372036854775808}}', 2),
        (b"<html>not JSON</html>", 0),
    ],
    ids=["choices_int", "output_int", "usage_above_2_64", "usage_2_63", "not_json"],
)
async def test_body_of_any_shape_is_relayed_and_charged_at_our_count(
    gw, sim, raw, completion_tokens
):
    account, key = await gw.create_account(OPENING)
    sim.push(Scenario(raw_answer=raw))
    request = {"model": MODEL, "messages": HI, "max_tokens": 50}
    status, headers, body = await _post(gw, key, "/chat/completions", request)
    assert (status, body) == (200, raw)
    row = await _row(gw, headers["x-request-id"], account)
    prompt = _our_prompt(gw, request)
    assert (row["usage_source"], row["status"]) == ("estimated", "completed")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion_tokens)
    assert row["charged_millicredits"] == _charge(gw, prompt, completion_tokens)


def _sse(*objects: bytes) -> bytes:
    return b"".join(b"data: " + obj + b"\n\n" for obj in objects)


_CONTENT = (
    b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" hello"}}]}'
)


@pytest.mark.parametrize(
    "odd_event",
    [
        b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":5}}]}',
        b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":{"a":1}}}]}',
        b'{"choices":[],"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":2}}',
        b'{"choices":7,"delta":[1]}',
    ],
    ids=["tool_calls_int", "tool_calls_object", "usage_above_2_64", "choices_int"],
)
async def test_stream_with_odd_events_is_relayed_whole_and_charged_for_what_was_delivered(
    gw, sim, odd_event
):
    account, key = await gw.create_account(OPENING)
    raw = _sse(_CONTENT, _CONTENT, odd_event) + b"data: [DONE]\n\n"
    sim.push(Scenario(raw_answer=raw))
    request = {"model": MODEL, "messages": HI, "max_tokens": 50, "stream": True}
    status, headers, body = await _post(gw, key, "/chat/completions", request)
    assert status == 200
    assert body.startswith(_sse(_CONTENT, _CONTENT))
    assert body.endswith(b"data: [DONE]\n\n")
    row = await _row(gw, headers["x-request-id"], account)
    prompt = _our_prompt(gw, request)
    assert (row["usage_source"], row["status"]) == ("estimated", "completed")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, 2)
    assert row["charged_millicredits"] == _charge(gw, prompt, 2)
