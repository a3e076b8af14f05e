"""Upstream faults under paid traffic: hostile usage and shapes (defects 1, 3 and 6), garbage
SSE, a cut stream, 30 s of silence, and a client that disconnects at every stage.

A hostile answer is scripted with the simulator's queue, which serves requests in arrival
order; so the background traffic is held (``Traffic.quiesce``) while a burst runs: the hostile
answer and three honest companions from other accounts, at once, so their settlements share a
poster batch (defect 1: one bad record must not stop the others).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest

from devtools.simulator import Scenario
from tests.faults.stack import FaultStack
from tests.faults.traffic import (
    DEFAULT_SCENARIO,
    MAX_TOKENS,
    MESSAGES,
    MODEL,
    Completed,
    Traffic,
)
from tests.faults.verdict import assert_verdict

# Bounded: a failing case waits out its verdict's timeouts (recovery 60 s, settling 30 s).
pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

_COMPANIONS = 3


def _usage(prompt: Any, completion: Any) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}


_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":" hello"},"finish_reason":null}]}\n\n'
)
_DONE = b"data: [DONE]\n\n"
_MESSAGE = (
    b'{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":" hello hello"},"finish_reason":"stop"}]'
)
_ABOVE_2_64 = b"18446744073709551617"

# name -> (scenario, streamed); usage scenarios run both plain and streamed.
HOSTILE: dict[str, tuple[Scenario, bool]] = {
    "usage 10^12 tokens, plain": (Scenario(chunks=3, usage=_usage(10**12, 10**12)), False),
    "usage 10^12 tokens, streamed": (Scenario(chunks=3, usage=_usage(10**12, 10**12)), True),
    "usage 2x10^9 tokens": (Scenario(chunks=3, usage=_usage(2 * 10**9, 2 * 10**9)), True),
    "negative usage": (Scenario(chunks=3, usage=_usage(-1000, -1000)), False),
    "string usage": (Scenario(chunks=3, usage=_usage("1000", "1000")), True),
    "float usage": (Scenario(chunks=3, usage=_usage(1000.0, 1000.0)), False),
    "usage above 2^64, plain": (
        Scenario(
            raw_answer=_MESSAGE
            + b',"usage":{"prompt_tokens":'
            + _ABOVE_2_64
            + b',"completion_tokens":2,"total_tokens":3}}'
        ),
        False,
    ),
    "usage above 2^64, streamed": (
        Scenario(
            raw_answer=_CHUNK
            + b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":'
            + b'{"prompt_tokens":10,"completion_tokens":'
            + _ABOVE_2_64
            + b',"total_tokens":1}}\n\n'
            + _DONE
        ),
        True,
    ),
    "choices not a list": (
        Scenario(
            raw_answer=b'{"id":"c1","object":"chat.completion","model":"gpt-4o-mini",'
            b'"choices":{"0":{"message":{"content":"hi"}}}}'
        ),
        False,
    ),
    "tool_calls not a list": (
        Scenario(
            raw_answer=_CHUNK
            + b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
            + b'"delta":{"tool_calls":{"0":{"function":{"name":"f"}}}}}]}\n\n'
            + _DONE
        ),
        True,
    ),
    "garbage SSE": (
        Scenario(
            raw_answer=b"data: {not json\n\n\xff\xfe\x00garbage\n\nevent: x\ndata: [1,2\n\n"
            + _CHUNK
            + b'data: {"choices": 7, "usage": "lots"}\n\n'
            + _DONE
        ),
        True,
    ),
    "a body that is not JSON": (Scenario(raw_answer=b"<html>502 Bad Gateway</html>"), False),
    "a cut stream": (Scenario(chunks=10, delay_s=0.01, fail_after_chunks=3), True),
    "a cut answer": (Scenario(chunks=10, delay_s=0.01, fail_after_chunks=3), False),
}


async def _burst(stack: FaultStack, traffic: Traffic, hostile: Scenario, streamed: bool) -> None:
    """The hostile answer plus honest companions, concurrently, with the traffic held."""
    await traffic.quiesce()
    try:
        stack.sim.push(hostile, *[DEFAULT_SCENARIO] * _COMPANIONS)
        accounts = traffic.accounts
        await asyncio.gather(
            *(
                traffic.probe(*accounts[i % len(accounts)], streamed=streamed)
                for i in range(_COMPANIONS + 1)
            )
        )
        stack.sim.clear()
    finally:
        traffic.resume()


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_upstream(stack: FaultStack, traffic: Traffic, name: str) -> None:
    scenario, streamed = HOSTILE[name]
    await asyncio.sleep(0.5)
    for _ in range(2):
        await _burst(stack, traffic, scenario, streamed)
        await asyncio.sleep(0.3)
    ended = time.monotonic()
    await assert_verdict(stack, traffic, case=f"upstream: {name}", fault_ended_at=ended)


async def test_upstream_silent_30_s(make_stack: Any) -> None:
    stack: FaultStack = await make_stack(UPSTREAM_READ_TIMEOUT_S="2")
    traffic = await Traffic(stack).start()
    try:
        await asyncio.sleep(0.5)
        # Silent after two chunks, and silent from the start; it would stay so for good (the
        # simulator hangs until the gateway goes), the read timeout must end both.
        started = time.monotonic()
        await _burst(stack, traffic, Scenario(chunks=10, hang_after_chunks=2), True)
        await _burst(stack, traffic, Scenario(hang=True), False)
        assert time.monotonic() - started < 30, "the upstream's silence was not cut short"
        ended = time.monotonic()
        await assert_verdict(stack, traffic, case="upstream silent 30 s", fault_ended_at=ended)
    finally:
        await traffic.close()
    assert len(traffic.partial) >= 1, "the silent stream's delivered chunks were not seen"


# --- a client that disconnects at every stage --------------------------------------------


def _body(streamed: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    if streamed:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def _leave_during_body(stack: FaultStack, key: str) -> bool:
    """Headers and part of the body sent, then the socket closes."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"model": "gpt-4o-mini", '
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    writer.close()
    return False


async def _leave(
    stack: FaultStack, key: str, *, streamed: bool, after: str
) -> tuple[str | None, bool]:
    """One request left at stage ``after``: ``sent`` (no answer yet), ``headers``, ``chunks``
    (three content events), ``usage`` (the usage event). Returns (request id, bytes seen)."""
    url = stack.gateway.base_url + "/chat/completions"
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        request = session.post(
            url, json=_body(streamed), headers={"Authorization": f"Bearer {key}"}
        )
        if after == "sent":
            task = asyncio.ensure_future(request.__aenter__())
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None, False
        response = await request.__aenter__()
        request_id = response.headers.get("x-request-id")
        seen = b""
        if after != "headers":
            async for line in response.content:
                seen += line
                if after == "chunks" and seen.count(b'"content":" hello"') >= 3:
                    break
                if after == "usage" and b'"usage":{' in line:
                    break
        response.close()
        return request_id, bool(seen)


STAGES: list[tuple[str, Scenario, bool, str]] = [
    ("before the answer, plain", Scenario(chunks=20, delay_s=0.05), False, "sent"),
    ("before the answer, streamed", Scenario(hang=True), True, "sent"),
    ("after the headers", Scenario(chunks=5, delay_s=0.5), True, "headers"),
    ("mid-stream", Scenario(chunks=20, delay_s=0.05), True, "chunks"),
    ("after the usage event", Scenario(chunks=3, stream_trailer_delay_s=1.0), True, "usage"),
]


async def test_client_disconnects_at_every_stage(stack: FaultStack, traffic: Traffic) -> None:
    await asyncio.sleep(0.5)
    account_id, key = traffic.accounts[0]
    await traffic.quiesce()
    try:
        await _leave_during_body(stack, key)
        for _, scenario, streamed, after in STAGES:
            stack.sim.push(scenario)
            request_id, seen = await _leave(stack, key, streamed=streamed, after=after)
            if seen:
                assert request_id is not None
                traffic.partial.append(
                    Completed(request_id, account_id, MODEL, streamed, None, trusted=False)
                )
            await asyncio.sleep(0.3)
        stack.sim.clear()
    finally:
        traffic.resume()
    ended = time.monotonic()
    await assert_verdict(
        stack, traffic, case="client disconnects at every stage", fault_ended_at=ended
    )
    assert len(traffic.partial) >= 2, "the mid-stream stages saw no bytes"
