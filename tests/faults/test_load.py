"""Load faults: 1,000 concurrent open streams on a slow upstream, and the slow-header and
idle-socket attack (issue 11, defect 9)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

import aiohttp
import pytest

from devtools.simulator import Scenario
from tests.faults.stack import FaultStack
from tests.faults.traffic import DEFAULT_SCENARIO, MAX_TOKENS, MESSAGES, MODEL, Completed, Traffic
from tests.faults.verdict import assert_verdict

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

_STREAMS = 1_000
_STREAM_ACCOUNTS = 10
# Generous bounds: a regression to a buffer per stream or a blocked loop trips them; noise
# on two shared cores does not.
_MAX_KIB_PER_STREAM = 100
_MAX_OTHER_USER_LATENCY_S = 2.0


async def _other_user_latency_s(
    stack: FaultStack, traffic: Traffic, key: str, account: int
) -> float:
    """Median of three plain requests of a user who is not streaming (fast answers)."""
    times = []
    for _ in range(3):
        stack.sim.push(DEFAULT_SCENARIO)
        started = time.monotonic()
        done = await traffic.one(account, key, streamed=False)
        assert done is not None, f"the other user's request failed: {dict(traffic.failures)}"
        times.append(time.monotonic() - started)
    return statistics.median(times)


async def _open_stream(
    session: aiohttp.ClientSession, url: str, key: str, opened: list[Any]
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
    response = await session.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
    opened.append(response)
    assert response.status == 200, await response.text()
    async for line in response.content:  # until the first content event
        if b'"content":" hello"' in line:
            return


async def test_thousand_open_streams_on_slow_upstream(make_stack: Any) -> None:
    stack: FaultStack = await make_stack(HOLD_TTL_S="120")  # streams outlive the suite's TTL
    traffic = await Traffic(stack).start()
    opened: list[aiohttp.ClientResponse] = []
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))
    try:
        await asyncio.sleep(0.5)
        await traffic.quiesce()
        other_account, other_key = await stack.create_account()
        baseline_s = await _other_user_latency_s(stack, traffic, other_key, other_account)
        rss_before = stack.gateway.rss_kib()
        # One chunk, then the upstream stays silent until the stream is closed.
        stack.sim.set_default(Scenario(chunks=10, hang_after_chunks=1))
        keys = [await stack.create_account() for _ in range(_STREAM_ACCOUNTS)]
        url = stack.gateway.base_url + "/chat/completions"
        async with asyncio.timeout(120):
            await asyncio.gather(
                *(
                    _open_stream(session, url, keys[i % _STREAM_ACCOUNTS][1], opened)
                    for i in range(_STREAMS)
                )
            )
        open_upstream = sum(1 for r in stack.sim.requests if r.outcome == "pending")
        assert open_upstream >= _STREAMS
        rss_during = stack.gateway.rss_kib()
        during_s = await _other_user_latency_s(stack, traffic, other_key, other_account)
        per_stream = (rss_during - rss_before) / _STREAMS
        print(
            f"[faults] {_STREAMS} open streams: RSS {rss_before} -> {rss_during} KiB "
            f"({per_stream:.1f} KiB/stream); other user's latency {baseline_s * 1000:.0f} -> "
            f"{during_s * 1000:.0f} ms"
        )
        assert per_stream < _MAX_KIB_PER_STREAM
        assert during_s < _MAX_OTHER_USER_LATENCY_S
        for response in opened:
            request_id = response.headers["x-request-id"]
            stream_account = next(a for a, k in keys if k == _key_of(response))
            traffic.partial.append(Completed(request_id, stream_account, MODEL, True, None, False))
            response.close()
        await stack.sim.wait_for_disconnects(_STREAMS, timeout_s=60)
        ended = time.monotonic()
        stack.sim.set_default(DEFAULT_SCENARIO)
        traffic.resume()
        await assert_verdict(
            stack, traffic, case="1,000 open streams", fault_ended_at=ended, settle_timeout_s=60
        )
    finally:
        for response in opened:
            response.close()
        await session.close()
        await traffic.close()


def _key_of(response: aiohttp.ClientResponse) -> str:
    return response.request_info.headers["Authorization"].removeprefix("Bearer ")


# --- the slow-header and idle-socket attack ----------------------------------------------

_TRICKLING = 500
_IDLE = 500
_HEADER_TIMEOUT_S = 2
_IDLE_TIMEOUT_S = 2


async def _closed_by_server(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(4096):
            pass


async def test_slow_header_and_idle_socket_attack(make_stack: Any) -> None:
    # The HTTP edge's limits (issue 11, defect 9; runtime/http_protocol.py). A socket that
    # never sends a byte is cut by the header deadline, counted from the connection's opening.
    stack: FaultStack = await make_stack(
        HTTP_HEADER_TIMEOUT_S=str(_HEADER_TIMEOUT_S),
        HTTP_KEEPALIVE_TIMEOUT_S=str(_IDLE_TIMEOUT_S),
    )
    traffic = await Traffic(stack).start()
    sockets: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await asyncio.sleep(0.5)
        for _ in range(_TRICKLING + _IDLE):
            sockets.append(await asyncio.open_connection("127.0.0.1", stack.gateway.port))
        trickling = [writer for _, writer in sockets[:_TRICKLING]]
        for writer in trickling:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        watchers = [asyncio.ensure_future(_closed_by_server(r)) for r, _ in sockets]
        started = time.monotonic()
        deadline = started + _HEADER_TIMEOUT_S + _IDLE_TIMEOUT_S + 10
        while not all(w.done() for w in watchers) and time.monotonic() < deadline:
            for writer in trickling:  # one header byte per socket every 0.5 s
                if not writer.is_closing():
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write(b"a")
            await asyncio.sleep(0.5)
        closed_trickling = sum(w.done() for w in watchers[:_TRICKLING])
        closed_idle = sum(w.done() for w in watchers[_TRICKLING:])
        print(
            f"[faults] slow-header attack: {closed_trickling}/{_TRICKLING} trickling and "
            f"{closed_idle}/{_IDLE} idle sockets closed by the gateway within "
            f"{time.monotonic() - started:.1f} s"
        )
        for watcher in watchers:
            watcher.cancel()
        ended = time.monotonic()
        assert (closed_trickling, closed_idle) == (_TRICKLING, _IDLE)
        await assert_verdict(
            stack, traffic, case="slow-header and idle sockets", fault_ended_at=ended
        )
    finally:
        for _, writer in sockets:
            writer.transport.abort()
        await traffic.close()
